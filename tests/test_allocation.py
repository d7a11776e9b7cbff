"""Compute allocation across timesteps (allocation.py): budgets add up exactly, ramps point the right way,
adaptive never overspends, DiT accounting, and clear errors."""
import random
from dataclasses import replace

import pytest

from allocation import (adaptive_iteration_cap, dit_sampling_blocks, fpdm_sampling_blocks, largest_remainder,
                        plan_for_model, plan_iterations, ramp_iterations, spread_evenly)
from config import ModelConfig, SampleConfig


def _nondecreasing(values):
    return all(a <= b for a, b in zip(values, values[1:]))


#################################################################################
#                                 Exact budgets                                 #
#################################################################################

@pytest.mark.parametrize("schedule", ["fixed", "increasing", "decreasing"])
def test_budget_and_steps_spend_exactly_the_budget(schedule):
    rng = random.Random(0)
    for _ in range(300):
        pre, post = rng.randint(0, 4), rng.randint(0, 4)
        steps = rng.randint(1, 60)
        budget = steps * (pre + post + 1) + rng.randint(0, 400)
        plan = plan_iterations(fixed_point=True, pre_depth=pre, post_depth=post, num_sampling_steps=steps,
                               budget=budget, schedule=schedule)
        assert plan.num_steps == steps == len(plan.iters_per_step)
        assert min(plan.iters_per_step) >= 1
        assert fpdm_sampling_blocks(plan.iters_per_step, pre, post) == budget == plan.blocks_per_image


@pytest.mark.parametrize("schedule", ["fixed", "increasing", "decreasing"])
def test_budget_and_iterations_derive_steps_and_spend_everything(schedule):
    rng = random.Random(1)
    for _ in range(300):
        pre, post, k = rng.randint(0, 4), rng.randint(0, 4), rng.randint(1, 30)
        budget = rng.randint(pre + post + k, 2000)
        plan = plan_iterations(fixed_point=True, pre_depth=pre, post_depth=post, fixed_point_iters=k,
                               budget=budget, schedule=schedule)
        assert plan.num_steps == budget // (pre + k + post)
        assert fpdm_sampling_blocks(plan.iters_per_step, pre, post) == budget == plan.blocks_per_image
        assert min(plan.iters_per_step) >= 1
        if schedule == "fixed":  # leftover blocks become +1 iterations: at most one apart
            assert max(plan.iters_per_step) - min(plan.iters_per_step) <= 1 or plan.num_steps == 1
            assert min(plan.iters_per_step) >= k


def test_steps_and_iterations_give_the_paper_cost():
    # Sec. 4.2 footnote 4: (n_pre + n_iters + n_post) * S.
    plan = plan_iterations(fixed_point=True, pre_depth=1, post_depth=1, num_sampling_steps=40, fixed_point_iters=12)
    assert plan.iters_per_step == [12] * 40 and plan.blocks_per_image == 40 * 14
    same = plan_iterations(fixed_point=True, pre_depth=2, post_depth=2, num_sampling_steps=20, fixed_point_iters=10)
    other = plan_iterations(fixed_point=True, pre_depth=1, post_depth=1, num_sampling_steps=10, fixed_point_iters=26)
    assert same.blocks_per_image == other.blocks_per_image == dit_sampling_blocks(28, 10) == 280


def test_paper_smoothing_examples_at_280_blocks():
    # Fig. 4: 1 iteration over 93 timesteps ... 68 iterations over 4 timesteps, 1 pre + 1 post layer.
    def steps(k):
        return plan_iterations(fixed_point=True, pre_depth=1, post_depth=1, budget=280, fixed_point_iters=k).num_steps
    assert steps(1) == 93 and steps(68) == 4 and steps(26) == 10 and steps(8) == 28


def test_largest_remainder_is_exact_and_proportional():
    rng = random.Random(2)
    for _ in range(300):
        weights = [rng.randint(0, 9) for _ in range(rng.randint(1, 12))]
        if sum(weights) == 0:
            continue
        total = rng.randint(0, 500)
        parts = largest_remainder(total, weights)
        assert sum(parts) == total
        for part, w in zip(parts, weights):
            assert abs(part - total * w / sum(weights)) < 1
    assert spread_evenly(10, 4) == [2, 3, 2, 3] and sum(spread_evenly(7, 7)) == 7


#################################################################################
#                                  Ramps                                        #
#################################################################################

def test_increasing_and_decreasing_ramps_point_the_right_way():
    rng = random.Random(3)
    for _ in range(300):
        steps = rng.randint(1, 50)
        total = steps + rng.randint(0, 500)
        up = ramp_iterations(total, steps, "increasing")
        down = ramp_iterations(total, steps, "decreasing")
        assert _nondecreasing(up) and _nondecreasing(down[::-1])  # sampling order: t = T-1 first
        assert down == up[::-1] and sum(up) == sum(down) == total and min(up) >= 1
        if steps > 1 and total >= 3 * steps:
            assert up[-1] > up[0]  # a real ramp, not a flat line
    assert ramp_iterations(20 * 8, 20, "increasing")[0] < 8 < ramp_iterations(20 * 8, 20, "increasing")[-1]


def test_ramps_in_plans_keep_the_iteration_total():
    for schedule in ("increasing", "decreasing"):
        plan = plan_iterations(fixed_point=True, pre_depth=1, post_depth=1, num_sampling_steps=20,
                               fixed_point_iters=8, schedule=schedule)
        assert sum(plan.iters_per_step) == 160 and plan.blocks_per_image == 20 * 10
    up = plan_iterations(fixed_point=True, pre_depth=1, post_depth=1, num_sampling_steps=20, fixed_point_iters=8,
                         schedule="increasing")
    assert up.iters_per_step[-1] > up.iters_per_step[0]


#################################################################################
#                                  Adaptive                                     #
#################################################################################

def test_adaptive_never_exceeds_the_budget_and_leaves_one_iteration_per_step():
    rng = random.Random(4)
    for _ in range(300):
        pre, post = rng.randint(0, 3), rng.randint(0, 3)
        steps, cap = rng.randint(1, 40), rng.randint(1, 30)
        budget = steps * (pre + post + 1) + rng.randint(0, 300)
        plan = plan_iterations(fixed_point=True, pre_depth=pre, post_depth=post, num_sampling_steps=steps,
                               fixed_point_iters=cap, budget=budget, schedule="adaptive", fixed_point_tol=1e-3)
        assert sum(pre + k + post for k in plan.iters_per_step) <= budget  # worst case fits
        spent = 0
        for step in range(steps):
            allowed = plan.iteration_cap(step, spent)
            assert 1 <= allowed <= cap
            used = rng.randint(1, allowed)  # the solver may stop early at the tolerance
            spent += pre + used + post
        assert spent <= budget


def test_adaptive_cap_reserves_later_steps():
    assert adaptive_iteration_cap(remaining_blocks=30, remaining_steps=1, pre_depth=1, post_depth=1, max_iters=50) == 28
    assert adaptive_iteration_cap(30, 5, 1, 1, 50) == 30 - 4 * 3 - 2
    assert adaptive_iteration_cap(30, 5, 1, 1, 4) == 4
    with pytest.raises(ValueError, match="budget exhausted"):
        adaptive_iteration_cap(8, 3, 1, 1, 4)


def test_adaptive_defaults_budget_from_steps_and_cap():
    plan = plan_iterations(fixed_point=True, pre_depth=1, post_depth=1, num_sampling_steps=10, fixed_point_iters=6,
                           schedule="adaptive", fixed_point_tol=1e-2)
    assert plan.blocks_per_image == 10 * 8 and plan.max_iters_per_step == 6 and plan.adaptive


#################################################################################
#                                     DiT                                       #
#################################################################################

def test_dit_budget_buys_whole_steps():
    plan = plan_iterations(fixed_point=False, depth=28, budget=280)
    assert plan.num_steps == 10 and plan.blocks_per_image == 280 and plan.step_blocks(0) == 28
    odd = plan_iterations(fixed_point=False, depth=28, budget=300)
    assert odd.num_steps == 10 and odd.unspent_blocks == 20 and odd.blocks_per_image == 280
    assert plan_iterations(fixed_point=False, depth=12, num_sampling_steps=7).blocks_per_image == 84


def test_dit_rejects_fixed_point_flags():
    with pytest.raises(ValueError, match="--fixed_point_iters"):
        plan_iterations(fixed_point=False, depth=28, budget=280, fixed_point_iters=8)
    with pytest.raises(ValueError, match="--iteration_schedule"):
        plan_iterations(fixed_point=False, depth=28, budget=280, schedule="increasing")
    with pytest.raises(ValueError, match="--budget"):
        plan_iterations(fixed_point=False, depth=28, budget=27)


#################################################################################
#                                    Errors                                     #
#################################################################################

@pytest.mark.parametrize("kwargs, flag", [
    (dict(budget=2), "--budget"),                                       # < pre + 1 + post = 3
    (dict(budget=20, num_sampling_steps=7), "--budget"),                # 7 steps need 21
    (dict(budget=10, fixed_point_iters=9), "--budget"),                 # one step costs 11
    (dict(fixed_point_iters=0, num_sampling_steps=5), "--fixed_point_iters"),
    (dict(num_sampling_steps=0), "--num_sampling_steps"),
    (dict(num_sampling_steps=5, schedule="cosine"), "--iteration_schedule"),
    (dict(budget=100, num_sampling_steps=5, fixed_point_iters=8), "give two"),
    (dict(num_sampling_steps=5, schedule="adaptive", fixed_point_tol=0.0), "--fixed_point_tol"),
    (dict(num_sampling_steps=2000, max_steps=1000), "--num_sampling_steps"),
    (dict(budget=10_000, fixed_point_iters=1, max_steps=1000), "--budget"),
])
def test_bad_plans_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        plan_iterations(fixed_point=True, pre_depth=1, post_depth=1, **kwargs)


def test_plan_for_model_derives_none_fields():
    fpdm = ModelConfig(fixed_point=True, fixed_point_no_grad_max_iters=3, fixed_point_with_grad_max_iters=3)
    default = plan_for_model(fpdm, SampleConfig(num_sampling_steps=20))
    assert default.iters_per_step == [6] * 20  # cost.default_sampling_iters: DiT-Ti/2 depth 8 - pre 1 - post 1
    wide_sjfb = plan_for_model(replace(fpdm, fixed_point_no_grad_max_iters=12, fixed_point_with_grad_max_iters=12),
                               SampleConfig(num_sampling_steps=20))
    assert wide_sjfb.iters_per_step == [6] * 20  # the S-JFB bounds do not set the sampling default
    derived = plan_for_model(fpdm, SampleConfig(budget=280, fixed_point_iters=8))
    assert derived.num_steps == 28 and derived.blocks_per_image == 280  # steps None: derived from the budget
    shared = plan_for_model(fpdm, SampleConfig(budget=300, num_sampling_steps=20, iteration_schedule="increasing"))
    assert shared.blocks_per_image == 300 and shared.num_steps == 20
    dit = ModelConfig(model="DiT-Ti/2", fixed_point=False)
    assert plan_for_model(dit, SampleConfig(budget=80)).num_steps == 10  # depth 8
    with pytest.raises(ValueError, match="--fixed_point_iters"):
        plan_for_model(dit, SampleConfig(budget=80, fixed_point_iters=4))
    with pytest.raises(ValueError, match="--budget"):
        plan_for_model(fpdm, SampleConfig(budget=-3))
