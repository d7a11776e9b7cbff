"""--fixed_point_grad: S-JFB, phantom and IFT gradients of the fixed-point block, their limits and known equalities,
the memory each keeps for backward, their draws, their cost (block-pass units and MACs) and a training run of each.
Tiny models, CPU, a few seconds."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import cost
import train
from config import ModelConfig, UserError
from models import create_model, draw_sjfb_iters, draw_training_iters
from tests.test_models import _saved_tensor_bytes as saved_bytes, tiny_fpdm, tiny_inputs

FIXED_POINT_BLOCK = "block_fixed_point.mlp.fc1.weight"


def loss_and_grads(model, n: int, m: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and parameter gradients of a fixed weighted loss after n no-grad and m gradient-carrying iterations."""
    x, t, y = tiny_inputs()
    weights = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    model.zero_grad(set_to_none=True)
    out = model(x, t, y, num_no_grad_iters=n, num_iters=m)
    (out * weights).sum().backward()
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def contractive_fpdm(**options):
    """A tiny FPDM whose fixed-point map is a contraction, so iterating converges and the IFT gradient is exact."""
    model = tiny_fpdm(**options).eval()
    with torch.no_grad():
        model.block_fixed_point_projection_fc1.weight.mul_(0.3)
    return model


def test_ift_without_backward_iterations_is_the_one_step_jfb_gradient():
    _, jfb = loss_and_grads(tiny_fpdm(), 6, 1)
    _, ift = loss_and_grads(tiny_fpdm(fixed_point_grad="ift", fixed_point_ift_iters=0), 6, 1)
    assert set(ift) == set(jfb)
    assert all(torch.equal(ift[k], jfb[k]) for k in jfb)


def test_ift_gradient_converges_to_backpropagation_through_the_converged_solve():
    """On a contraction, backpropagating through 60 unrolled iterations from the start gives the implicit gradient;
    IFT reaches it from the no-grad solution with its backward solve, where the 1-step JFB gradient does not."""
    _, unrolled = loss_and_grads(contractive_fpdm(), 0, 60)
    _, ift = loss_and_grads(contractive_fpdm(fixed_point_grad="ift", fixed_point_ift_iters=40), 59, 1)
    _, jfb = loss_and_grads(contractive_fpdm(), 59, 1)
    assert relative_difference(ift[FIXED_POINT_BLOCK], unrolled[FIXED_POINT_BLOCK]) < 1e-4
    assert relative_difference(jfb[FIXED_POINT_BLOCK], unrolled[FIXED_POINT_BLOCK]) > 0.05
    assert relative_difference(ift["blocks_pre.0.mlp.fc1.weight"], unrolled["blocks_pre.0.mlp.fc1.weight"]) < 1e-4


def stage_value_and_grads(model, n: int, m: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The fixed-point stage alone (fixed inputs): its value and the fixed-point block's gradients of a fixed linear
    loss of that value, so that gradients compare whatever the value is."""
    generator = torch.Generator().manual_seed(5)
    z0, injection, weights = (torch.randn(2, 16, 32, generator=generator) for _ in range(3))  # (N, T, D)
    c = torch.randn(2, 32, generator=generator)                                                # (N, D)
    model.zero_grad(set_to_none=True)
    z, _ = model.solve_fixed_point(z0, injection, c, n, m, None, "iteration", None, False)
    if m > 0:
        (z * weights).sum().backward()
    return z.detach(), {k: p.grad.clone() for k, p in model.named_parameters()
                        if p.grad is not None and k.startswith("block_fixed_point")}


def test_phantom_has_the_plain_iterations_value_and_damping_one_is_the_sjfb_gradient():
    sjfb_value, sjfb = stage_value_and_grads(tiny_fpdm().eval(), 3, 2)
    value, undamped = stage_value_and_grads(tiny_fpdm(fixed_point_grad="phantom",
                                                      fixed_point_phantom_damping=1.0).eval(), 3, 2)
    assert torch.allclose(value, sjfb_value, atol=1e-6)
    assert set(undamped) == set(sjfb) and max(relative_difference(undamped[k], sjfb[k]) for k in sjfb) < 1e-5
    value, damped = stage_value_and_grads(tiny_fpdm(fixed_point_grad="phantom",
                                                    fixed_point_phantom_damping=0.5).eval(), 3, 2)
    assert torch.allclose(value, sjfb_value, atol=1e-6)
    assert relative_difference(damped[FIXED_POINT_BLOCK], sjfb[FIXED_POINT_BLOCK]) > 1e-3


def test_the_gradient_of_one_damped_step_is_damping_times_the_maps():
    """z_out = z + 0.5 (f(z) - z) with z detached: half the gradient of one S-JFB step, for every parameter of f."""
    _, one_step = stage_value_and_grads(tiny_fpdm().eval(), 3, 1)
    _, damped = stage_value_and_grads(tiny_fpdm(fixed_point_grad="phantom",
                                                fixed_point_phantom_damping=0.5).eval(), 3, 1)
    assert max(relative_difference(damped[k], 0.5 * one_step[k]) for k in one_step) < 1e-5


def test_phantom_trains_on_what_sampling_computes():
    """The training output after n no-grad iterations and m phantom steps is the sampling output after n + m plain
    iterations: the loss sees the prediction sampling makes (it did not when the damped output was kept)."""
    model = tiny_fpdm(fixed_point_grad="phantom").eval()
    x, t, y = tiny_inputs()
    trained = model(x, t, y, num_no_grad_iters=4, num_iters=3)
    with torch.no_grad():
        sampled = model(x, t, y, num_iters=7)
    assert trained.requires_grad and torch.allclose(trained, sampled, atol=1e-6)


@pytest.mark.parametrize("method", ["phantom", "ift"])
def test_without_gradients_every_method_samples_alike(method):
    x, t, y = tiny_inputs()
    with torch.no_grad():
        reference = tiny_fpdm().eval()(x, t, y, num_iters=4)
        other = tiny_fpdm(fixed_point_grad=method).eval()(x, t, y, num_iters=4)
    assert torch.equal(other, reference)


def test_ift_stores_one_evaluation_whatever_its_backward_iterations():
    one_step = saved_bytes(tiny_fpdm().eval(), 4, 1)
    for iters in (0, 8):
        ift = tiny_fpdm(fixed_point_grad="ift", fixed_point_ift_iters=iters).eval()
        ift_bytes = saved_bytes(ift, 4, 1)
        assert one_step <= ift_bytes <= one_step + 2 * 2 * 16 * 32 * 4  # + the saved f(z*) and z* (N, T, D) fp32
        assert saved_bytes(ift, 4, 3) == ift_bytes  # extra evaluations before the last one store nothing
    assert saved_bytes(tiny_fpdm().eval(), 4, 3) > one_step  # S-JFB stores each of its m iterations


def test_training_draws_share_n_and_fix_m_per_method():
    sjfb = ModelConfig(fixed_point=True, fixed_point_no_grad_max_iters=6, fixed_point_with_grad_max_iters=6)
    draws = {}
    for method in ("sjfb", "phantom", "ift"):
        generator = torch.Generator().manual_seed(4)
        draws[method] = [draw_training_iters(replace(sjfb, fixed_point_grad=method, fixed_point_phantom_steps=3),
                                             generator) for _ in range(8)]
    generator = torch.Generator().manual_seed(4)
    assert draws["sjfb"] == [draw_sjfb_iters(sjfb, generator) for _ in range(8)]
    assert [n for n, _ in draws["phantom"]] == [n for n, _ in draws["sjfb"]] == [n for n, _ in draws["ift"]]
    assert {m for _, m in draws["phantom"]} == {3} and {m for _, m in draws["ift"]} == {1}
    assert len({m for _, m in draws["sjfb"]}) > 1


def test_training_units_count_each_method_as_it_runs():
    sjfb = ModelConfig(fixed_point=True, fixed_point_no_grad_max_iters=12, fixed_point_with_grad_max_iters=12)
    assert cost.training_units_per_step(sjfb) == 6 + 6 + 3 * 6.5                  # 3 (pre + post) + E[n] + 3 E[m]
    phantom = replace(sjfb, fixed_point_grad="phantom", fixed_point_phantom_steps=5)
    assert cost.training_units_per_step(phantom) == 6 + 6 + 3 * 5
    ift = replace(sjfb, fixed_point_grad="ift", fixed_point_ift_iters=12)
    assert cost.training_units_per_step(ift) == 6 + 6 + 3 * 1 + 12 * cost.VJP_UNITS
    assert cost.training_units_per_step(replace(ift, fixed_point_ift_iters=0)) == 6 + 6 + 3


def test_mean_training_macs_average_the_draws():
    sjfb = ModelConfig(fixed_point=True, fixed_point_no_grad_max_iters=2, fixed_point_with_grad_max_iters=2)
    draws = [(n, m) for n in range(3) for m in (1, 2)]
    assert cost.mean_training_macs_per_image(sjfb) == pytest.approx(
        sum(cost.training_macs_per_image(sjfb, d) for d in draws) / 6)
    ift = replace(sjfb, fixed_point_grad="ift")
    assert cost.mean_training_macs_per_image(ift) == pytest.approx(
        sum(cost.training_macs_per_image(ift, (n, 1)) for n in range(3)) / 3)
    dit = replace(sjfb, fixed_point=False)
    assert cost.mean_training_macs_per_image(dit) == 3 * cost.macs_per_step(dit)


def test_backward_solve_macs_match_a_flop_count():
    """macs_fixed_point_vjp against torch's FLOP counter of the VJP of the digits fixed-point map (its matrix
    products; the counter does not see the CPU attention kernel, whose four products are 4 T^2 D)."""
    config = ModelConfig(fixed_point=True).validate()
    model = create_model(config)
    z = torch.randn(3, 16, 128, requires_grad=True)
    fz = model.fixed_point_map(z, torch.randn(3, 16, 128), torch.randn(3, 128))
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(fz, z, torch.randn_like(fz))
    attention = 4 * 16 * 16 * 128
    assert counter.get_total_flops() / 2 / 3 == cost.macs_fixed_point_vjp(config) - attention
    ift = replace(config, fixed_point_grad="ift", fixed_point_ift_iters=5)
    # the evaluation with gradient is counted 3x, the others forward only, plus 5 VJPs
    assert cost.training_macs_per_image(ift, (4, 1)) == cost.training_macs_per_image(config, (4, 1)) + \
        5 * cost.macs_fixed_point_vjp(config)
    assert cost.training_macs_per_image(ift, (4, 3)) == cost.training_macs_per_image(config, (6, 1)) + \
        5 * cost.macs_fixed_point_vjp(config)


@pytest.mark.parametrize("flags, message", [
    (["--fixed_point_grad", "backprop"], "--fixed_point_grad: must be one of sjfb, phantom, ift"),
    (["--fixed_point_phantom_damping", "0"], "--fixed_point_phantom_damping: must be in (0, 1]"),
    (["--fixed_point_phantom_steps", "0"], "--fixed_point_phantom_steps: must be >= 1"),
    (["--fixed_point_ift_iters", "-1"], "--fixed_point_ift_iters: must be >= 0"),
])
def test_bad_gradient_flags_are_one_line_errors(tmp_path, flags, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        train.main(["--fixed_point", "True", *flags, "--output_dir", str(tmp_path), "--max_steps", "1"])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["phantom", "ift"])
def test_a_training_run_logs_the_method_and_its_compute(tmp_path, method):
    run = train.main(["--fixed_point", "True", "--fixed_point_no_grad_max_iters", "2", "--fixed_point_with_grad_max_iters",
                      "2", "--fixed_point_grad", method, "--fixed_point_phantom_steps", "2", "--fixed_point_ift_iters",
                      "3", "--global_batch_size", "8", "--max_steps", "3", "--log_every", "1", "--sample_grid", "False",
                      "--output_dir", str(tmp_path)])
    config = ModelConfig(**json.loads((run / "config.json").read_text())["model"])
    assert config.fixed_point_grad == method
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {row["sjfb_m"] for row in rows} == {2 if method == "phantom" else 1}
    for row in rows:
        expected = cost.training_macs_per_image(config, (row["sjfb_n"], row["sjfb_m"]))
        assert row["train_gmacs_per_image"] == pytest.approx(expected / 1e9, rel=1e-12)
        assert row["loss"] == row["loss"]  # finite (NaN != NaN)
