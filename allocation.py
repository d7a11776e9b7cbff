"""Compute allocation across timesteps: sampling cost in transformer-block forward passes (paper Sec. 4.2) and the
iteration schedules of Sec. 3.3 (smoothing, reallocation, adaptive).

Per-step costs come from cost.py (Sec. 4.2, footnote 4: an FPDM step is pre + iters_t + post block passes per image,
a DiT step depth); sampling costs the sum over visited timesteps. Classifier-free guidance doubles the batch, not
the count per image.

Everything here is plain integer arithmetic on arguments: no model, no state. Lists are in *sampling order*
(index 0 is the noisiest timestep t = T-1, the last index is t = 0).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from config import DEFAULT_FIXED_POINT_TOL, DEFAULT_SAMPLING_STEPS, UserError
from cost import blocks_per_step, default_sampling_iters, fpdm_step_blocks, macs_per_step

SCHEDULES = ("fixed", "increasing", "decreasing", "adaptive")


#################################################################################
#                                  Block costs                                  #
#################################################################################

def fpdm_sampling_blocks(iters_per_step: list[int], pre_depth: int, post_depth: int) -> int:
    """Block passes per image for a whole FPDM trajectory: sum over steps of (pre + iters_t + post)."""
    return sum(fpdm_step_blocks(pre_depth, k, post_depth) for k in iters_per_step)


def dit_sampling_blocks(depth: int, num_steps: int) -> int:
    """Block passes per image for a DiT trajectory: depth per step."""
    return depth * num_steps


#################################################################################
#                             Integer apportionment                             #
#################################################################################

def spread_evenly(total: int, num_steps: int) -> list[int]:
    """Split `total` into `num_steps` integers differing by at most 1, the +1s spaced evenly along the trajectory."""
    base, extra = divmod(total, num_steps)
    # Step i gets a +1 when floor((i+1) * extra / S) steps past floor(i * extra / S) (Bresenham spacing).
    return [base + ((i + 1) * extra // num_steps - i * extra // num_steps) for i in range(num_steps)]


def largest_remainder(total: int, weights: list[int]) -> list[int]:
    """Integers proportional to `weights` summing exactly to `total` (largest-remainder rounding, exact arithmetic).

    Ties in the remainder go to the larger weight, then the later index, so non-decreasing weights give a
    non-decreasing result.
    """
    weight_sum = sum(weights)
    if weight_sum <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative with a positive sum (got {weights})")
    floors = [total * w // weight_sum for w in weights]
    remainders = [total * w % weight_sum for w in weights]
    leftover = total - sum(floors)
    order = sorted(range(len(weights)), key=lambda i: (remainders[i], weights[i], i), reverse=True)
    for i in order[:leftover]:
        floors[i] += 1
    return floors


def ramp_iterations(total_iters: int, num_steps: int, schedule: str) -> list[int]:
    """Iterations per step (sampling order) for a schedule, each >= 1, summing exactly to `total_iters`.

    fixed:      as equal as possible (Sec. 3.3 smoothing).
    increasing: a linear ramp, more iterations at the end of sampling (less noisy timesteps).
    decreasing: the same ramp reversed, more iterations at the start (noisiest timesteps).
    The ramp gives every step 1 iteration and shares the remaining ones with weights 1, 2, ..., S, so with a
    mean of k iterations per step it runs from about 1 to about 2k - 1.
    """
    if num_steps < 1:
        raise UserError(f"--num_sampling_steps must be >= 1 (got {num_steps})")
    if total_iters < num_steps:
        raise UserError(f"{total_iters} fixed-point iterations cannot give each of {num_steps} steps at least one")
    if schedule == "fixed":
        return spread_evenly(total_iters, num_steps)
    if schedule not in ("increasing", "decreasing"):
        raise UserError(f"--iteration_schedule must be one of {SCHEDULES} (got {schedule!r})")
    extra = largest_remainder(total_iters - num_steps, list(range(1, num_steps + 1)))
    increasing = [1 + e for e in extra]
    return increasing if schedule == "increasing" else increasing[::-1]


#################################################################################
#                                   Adaptive                                    #
#################################################################################

def adaptive_iteration_cap(remaining_blocks: int, remaining_steps: int, pre_depth: int, post_depth: int,
                           max_iters: int) -> int:
    """Cap on this step's iterations: at most `max_iters`, leaving every later step pre + 1 + post blocks.

    remaining_blocks: budget left per image before this step; remaining_steps: steps left including this one.
    """
    if remaining_steps < 1:
        raise ValueError(f"remaining_steps must be >= 1 (got {remaining_steps})")
    reserved_later = (remaining_steps - 1) * fpdm_step_blocks(pre_depth, 1, post_depth)
    available = remaining_blocks - reserved_later - fpdm_step_blocks(pre_depth, 0, post_depth)
    if available < 1:
        raise UserError(f"budget exhausted: {remaining_blocks} blocks left for {remaining_steps} steps of at least "
                         f"{fpdm_step_blocks(pre_depth, 1, post_depth)} blocks each")
    return min(max_iters, available)


#################################################################################
#                                    Plans                                      #
#################################################################################

@dataclass
class IterationPlan:
    """How a sampling run spends its compute across timesteps (lists in sampling order, t = T-1 first).

    iters_per_step:   fixed-point iterations per step. For "adaptive" these are upper bounds (what the run would
                      spend if no step stopped early); DiT plans hold zeros.
    blocks_per_image: planned block passes per image (for "adaptive": the budget, never exceeded).
    """
    num_steps: int
    iters_per_step: list[int]
    schedule: str
    blocks_per_image: int
    fixed_point: bool = True
    pre_depth: int = 0
    post_depth: int = 0
    depth: int = 0                          # explicit DiT depth (0 for FPDM)
    budget: Optional[int] = None            # the requested --budget (None: derived from steps and iterations)
    max_iters_per_step: Optional[int] = None  # adaptive: per-timestep cap
    fixed_point_tol: Optional[float] = None   # adaptive: relative-residual tolerance
    unspent_blocks: int = 0                 # part of --budget no whole step fits in (DiT only)
    notes: list[str] = field(default_factory=list)

    @property
    def adaptive(self) -> bool:
        """Whether the iterations are decided at run time (tolerance, cap and budget)."""
        return self.schedule == "adaptive"

    def step_blocks(self, num_iters: int) -> int:
        """Block passes per image for one step of this model with `num_iters` fixed-point iterations."""
        if not self.fixed_point:
            return self.depth
        return fpdm_step_blocks(self.pre_depth, num_iters, self.post_depth)

    def iteration_cap(self, step_index: int, blocks_spent: int) -> int:
        """Iterations allowed at step `step_index` after `blocks_spent` blocks per image (0 for a DiT)."""
        if not self.fixed_point:
            return 0
        if not self.adaptive:
            return self.iters_per_step[step_index]
        return adaptive_iteration_cap(self.blocks_per_image - blocks_spent, self.num_steps - step_index,
                                      self.pre_depth, self.post_depth, self.max_iters_per_step)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (recorded next to every sample set)."""
        return asdict(self)


def _positive(value: Optional[int], flag: str) -> None:
    if value is not None and value < 1:
        raise UserError(f"{flag} must be >= 1 (got {value})")


def plan_iterations(*, fixed_point: bool, pre_depth: int = 0, post_depth: int = 0, depth: int = 0,
                    num_sampling_steps: Optional[int] = None, fixed_point_iters: Optional[int] = None,
                    budget: Optional[int] = None, schedule: str = "fixed", default_iters: int = 1,
                    fixed_point_tol: Optional[float] = None, max_steps: Optional[int] = None) -> IterationPlan:
    """Plan steps and iterations per step; None means 'not given on the command line'.

    FPDM (cost pre + k_t + post per step):
      * steps S, iterations k (no budget): k per step, budget S * (pre + k + post); increasing/decreasing ramp the
        same S * k iterations; adaptive caps each step at k within that budget.
      * budget B, iterations k: S = B // (pre + k + post) steps (smoothing, Sec. 3.3); the leftover blocks become
        extra iterations so the plan spends exactly B (adaptive: k is the per-step cap, B the total).
      * budget B, steps S: B - S * (pre + post) iterations shared by the schedule.
      * budget B only: k = default_iters, then as above. Steps, iterations and budget together must agree
        (except for adaptive, where k is the cap and B the total).
    DiT (cost depth per step): S = B // depth if a budget is given; --fixed_point_iters and non-fixed schedules
    are errors.
    """
    if schedule not in SCHEDULES:
        raise UserError(f"--iteration_schedule must be one of {', '.join(SCHEDULES)} (got {schedule!r})")
    _positive(num_sampling_steps, "--num_sampling_steps")
    _positive(fixed_point_iters, "--fixed_point_iters")
    _positive(budget, "--budget")
    if max_steps is not None and num_sampling_steps is not None and num_sampling_steps > max_steps:
        raise UserError(f"--num_sampling_steps {num_sampling_steps} exceeds the {max_steps} diffusion timesteps")

    if not fixed_point:
        plan = _plan_dit(depth, num_sampling_steps, fixed_point_iters, budget, schedule)
    else:
        plan = _plan_fpdm(pre_depth, post_depth, num_sampling_steps, fixed_point_iters, budget, schedule,
                          default_iters, fixed_point_tol)
    if max_steps is not None and plan.num_steps > max_steps:
        raise UserError(f"--budget {budget} asks for {plan.num_steps} steps but the diffusion has only {max_steps} "
                         f"timesteps: lower --budget or raise --fixed_point_iters")
    return plan


def _plan_dit(depth: int, steps: Optional[int], iters: Optional[int], budget: Optional[int],
              schedule: str) -> IterationPlan:
    if depth < 1:
        raise ValueError(f"a DiT plan needs its depth (got {depth})")
    if iters is not None:
        raise UserError("--fixed_point_iters applies to FPDM checkpoints only: this checkpoint is an explicit DiT "
                         f"({depth} blocks per step); use --budget or --num_sampling_steps")
    if schedule != "fixed":
        raise UserError(f"--iteration_schedule {schedule} applies to FPDM checkpoints only (this one is a DiT)")
    notes = []
    if budget is None:
        steps = DEFAULT_SAMPLING_STEPS if steps is None else steps
        return IterationPlan(steps, [0] * steps, "dit", dit_sampling_blocks(depth, steps), fixed_point=False,
                             depth=depth)
    if budget < depth:
        raise UserError(f"--budget {budget} is smaller than one DiT step ({depth} blocks)")
    derived = budget // depth
    if steps is not None and steps != derived:
        raise UserError(f"--budget {budget} and --num_sampling_steps {steps} disagree for a {depth}-block DiT "
                         f"(the budget buys {derived} steps): give one of them")
    unspent = budget - derived * depth
    if unspent:
        notes.append(f"{unspent} of the {budget} budgeted blocks fit no whole DiT step and stay unspent")
    return IterationPlan(derived, [0] * derived, "dit", dit_sampling_blocks(depth, derived), fixed_point=False,
                         depth=depth, budget=budget, unspent_blocks=unspent, notes=notes)


def _plan_fpdm(pre: int, post: int, steps: Optional[int], iters: Optional[int], budget: Optional[int],
               schedule: str, default_iters: int, tol: Optional[float]) -> IterationPlan:
    if pre < 0 or post < 0:
        raise ValueError(f"pre/post depths must be >= 0 (got {pre}, {post})")
    _positive(default_iters, "--fixed_point_iters (model default)")
    min_step = fpdm_step_blocks(pre, 1, post)
    if budget is not None and budget < min_step:
        raise UserError(f"--budget {budget} is smaller than one FPDM step: pre {pre} + 1 iteration + post {post} "
                         f"= {min_step} blocks")
    adaptive = schedule == "adaptive"
    if adaptive and (tol is None or not tol > 0):
        raise UserError(f"--fixed_point_tol must be > 0 for --iteration_schedule adaptive (got {tol})")
    k = default_iters if iters is None else iters

    if budget is None:
        steps = DEFAULT_SAMPLING_STEPS if steps is None else steps
        budget_blocks = steps * fpdm_step_blocks(pre, k, post)
    elif steps is None:
        step_cost = fpdm_step_blocks(pre, k, post)
        if budget < step_cost:
            raise UserError(f"--budget {budget} cannot pay for one step of --fixed_point_iters {k} "
                             f"({pre} + {k} + {post} = {step_cost} blocks)")
        steps = budget // step_cost
        budget_blocks = budget
    else:
        if budget < steps * min_step:
            raise UserError(f"--budget {budget} cannot pay for --num_sampling_steps {steps}: each step needs at "
                             f"least pre {pre} + 1 + post {post} = {min_step} blocks ({steps * min_step} in all)")
        if iters is not None and not adaptive and budget != steps * fpdm_step_blocks(pre, k, post):
            raise UserError(f"--budget {budget}, --num_sampling_steps {steps} and --fixed_point_iters {k} disagree "
                             f"({steps} x ({pre} + {k} + {post}) = {steps * fpdm_step_blocks(pre, k, post)}): "
                             "give two of them")
        budget_blocks = budget

    if adaptive:
        caps, spent = [], 0
        for i in range(steps):  # worst case: no step stops early
            cap = adaptive_iteration_cap(budget_blocks - spent, steps - i, pre, post, k)
            caps.append(cap)
            spent += fpdm_step_blocks(pre, cap, post)
        return IterationPlan(steps, caps, schedule, budget_blocks, pre_depth=pre, post_depth=post, budget=budget,
                             max_iters_per_step=k, fixed_point_tol=tol)

    total_iters = budget_blocks - steps * fpdm_step_blocks(pre, 0, post)
    per_step = ramp_iterations(total_iters, steps, schedule)
    blocks = fpdm_sampling_blocks(per_step, pre, post)
    assert blocks == budget_blocks, (blocks, budget_blocks)
    return IterationPlan(steps, per_step, schedule, blocks, pre_depth=pre, post_depth=post, budget=budget)


def plan_for_model(model_config: Any, sample_config: Any) -> IterationPlan:
    """Plan from a ModelConfig and a SampleConfig; its None fields (steps, iterations, budget) are derived.

    --fixed_point_iters None is the model default (cost.default_sampling_iters: the same-named DiT's depth - pre -
    post); --num_sampling_steps None is 250 without a --budget and derived from it with one.
    """
    common = dict(num_sampling_steps=sample_config.num_sampling_steps,
                  fixed_point_iters=sample_config.fixed_point_iters, budget=sample_config.budget,
                  schedule=sample_config.iteration_schedule, max_steps=model_config.diffusion_steps)
    if not model_config.fixed_point:
        return plan_iterations(fixed_point=False, depth=blocks_per_step(model_config, 0), **common)
    return plan_iterations(fixed_point=True, pre_depth=model_config.fixed_point_pre_depth,
                           post_depth=model_config.fixed_point_post_depth,
                           default_iters=default_sampling_iters(model_config),
                           fixed_point_tol=DEFAULT_FIXED_POINT_TOL if sample_config.fixed_point_tol is None
                           else sample_config.fixed_point_tol, **common)


#################################################################################
#                                  MAC budgets                                  #
#################################################################################

def planned_macs(model_config: Any, plan: IterationPlan, cfg: bool = False) -> int:
    """MACs per image of a plan (adaptive: its per-step caps, the most it can spend); cfg doubles the rows."""
    return sum(macs_per_step(model_config, k, cfg) for k in plan.iters_per_step)


def budget_for_macs(model_config: Any, sample_config: Any, max_macs: float, cfg: bool = False) -> int:
    """The largest --budget (block passes per image) whose plan costs at most `max_macs` MACs per image.

    cost.macs_per_step is affine in the iterations, a + k d, so S steps with I iterations in all cost S a + I d, and
    a budget B buys I = B - S (pre + post). S is --num_sampling_steps, or B // (pre + k + post) as plan_for_model
    derives it; since adding a step can lower the cost, every S is tried and the largest B kept.
    """
    flag = f"--budget_gmacs {max_macs / 1e9:g}"
    steps, num_iters = sample_config.num_sampling_steps, sample_config.fixed_point_iters
    base = macs_per_step(model_config, 0, cfg)                  # a: a step without iterations (DiT: a whole step)
    if not model_config.fixed_point:
        steps = min(int(max_macs // base), model_config.diffusion_steps) if steps is None else steps
        if steps < 1 or steps * base > max_macs:
            raise UserError(f"{flag}: a DiT step costs {base / 1e9:g} GMACs per image"
                            f"{' (x2 with guidance)' if cfg else ''}; {max(steps, 1)} steps do not fit")
        return steps * blocks_per_step(model_config, 0)
    per_iter = macs_per_step(model_config, 1, cfg) - base       # d
    fixed = model_config.fixed_point_pre_depth + model_config.fixed_point_post_depth
    if steps is not None:
        if num_iters is not None and sample_config.iteration_schedule != "adaptive":
            raise UserError(f"{flag} with both --num_sampling_steps and --fixed_point_iters: give at most two of them")
        budget = steps * fixed + int((max_macs - steps * base) // per_iter)
        if budget < steps * (fixed + 1):
            raise UserError(f"{flag} cannot pay for --num_sampling_steps {steps}: each step costs at least "
                            f"{(base + per_iter) / 1e9:g} GMACs per image")
        return budget
    num_iters = default_sampling_iters(model_config) if num_iters is None else num_iters
    step_blocks, step_macs = fixed + num_iters, base + num_iters * per_iter
    budget = 0
    for s in range(1, model_config.diffusion_steps + 1):
        if s * step_macs > max_macs:
            break
        extra = min(step_blocks - 1, int((max_macs - s * step_macs) // per_iter))  # leftover blocks: iterations
        budget = max(budget, s * step_blocks + extra)
    if budget == 0:
        raise UserError(f"{flag} cannot pay for one step of {num_iters} iterations ({step_macs / 1e9:g} GMACs per "
                        "image)")
    return budget
