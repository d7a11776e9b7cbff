"""cost.py: block passes, default iterations, training units, and analytic MACs checked against an independent count
(forward hooks on nn.Linear / nn.Conv2d and a wrapped scaled_dot_product_attention on tiny models)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cost
from config import ModelConfig, UserError
from models import create_model

DIGITS_FPDM = ModelConfig(model="DiT-Ti/2", image_size=8, in_channels=1, num_classes=10, fixed_point=True,
                          fixed_point_no_grad_max_iters=3, fixed_point_with_grad_max_iters=3)
DIGITS_DIT = replace(DIGITS_FPDM, fixed_point=False)


def measured_macs_per_image(model: nn.Module, monkeypatch, call) -> int:
    """MACs of `call()` divided by its number of images, counted at run time from the layers actually executed."""
    total = [0]

    def linear_hook(module: nn.Linear, inputs, output):
        rows = output.numel() // module.out_features
        total[0] += rows * module.in_features * module.out_features

    def conv_hook(module: nn.Conv2d, inputs, output):
        kh, kw = module.kernel_size
        total[0] += output.numel() * (module.in_channels // module.groups) * kh * kw

    original_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, *args, **kwargs):
        # Q K^T and A V: each (N, H, T, S) x Dh multiply-accumulates.
        total[0] += 2 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1]
        return original_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    handles = [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    handles += [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            num_images = call()
    finally:
        for handle in handles:
            handle.remove()
    assert total[0] % num_images == 0
    return total[0] // num_images


def digits_inputs(n: int = 2):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.tensor([5, 900][:n]), torch.tensor([1, 7][:n])


#################################################################################
#                                 Block passes                                  #
#################################################################################

def test_blocks_and_default_iterations():
    assert cost.blocks_per_step(DIGITS_DIT, 0) == 8 == cost.architecture("DiT-Ti/2").depth
    assert cost.blocks_per_step(DIGITS_FPDM, 5) == 1 + 5 + 1
    assert cost.default_sampling_iters(DIGITS_FPDM) == 6 and cost.default_sampling_iters(DIGITS_DIT) == 0
    xl = ModelConfig(model="DiT-XL/2", fixed_point=True)
    assert cost.default_sampling_iters(xl) == 26 and cost.blocks_per_step(xl, 26) == 28
    assert cost.default_sampling_iters(replace(xl, fixed_point_pre_depth=14, fixed_point_post_depth=14)) == 1
    assert cost.fpdm_step_blocks(2, 10, 2) == 14


def test_training_units_count_forward_and_backward():
    assert cost.training_units_per_step(DIGITS_DIT) == 24.0                  # 8 blocks x (1 fwd + 2 bwd)
    assert cost.training_units_per_step(DIGITS_FPDM) == 6 + 1.5 + 6.0        # 3 (pre + post) + E[n] + 3 E[m]


#################################################################################
#                              Multiply-accumulates                             #
#################################################################################

def test_fpdm_iteration_to_dit_block_mac_ratio():
    def ratio(D, T):
        block = cost.macs_per_block(D, T)
        return (block + cost.macs_injection(D, T)) / block

    # XL/2 at 256 px (32 x 32 latents, patch 2): the projection adds about half a block per iteration.
    assert ratio(1152, 256) == pytest.approx(1.48, abs=0.005)
    # Ti/2 on 8 x 8 digits (T = 16, D = 128): 1 + 6 / (12 + 2T/D + 6/T) = 1 + 6 / 12.625.
    assert ratio(128, 16) == pytest.approx(1 + 6 / 12.625)
    D, T = 1152, 256
    assert cost.macs_per_block(D, T) == 12 * T * D * D + 2 * T * T * D + 6 * D * D


@pytest.mark.parametrize("model_name", ["DiT-Ti/2", "DiT-Ti/4"])
def test_dit_step_macs_match_hooked_count(monkeypatch, model_name):
    config = replace(DIGITS_DIT, model=model_name)
    model = create_model(config).eval()
    x, t, y = digits_inputs()
    measured = measured_macs_per_image(model, monkeypatch, lambda: model(x, t, y).shape[0])
    assert measured == cost.macs_per_step(config)


@pytest.mark.parametrize("num_iters", [0, 3])
def test_fpdm_step_macs_match_hooked_count(monkeypatch, num_iters):
    model = create_model(DIGITS_FPDM).eval()
    x, t, y = digits_inputs()
    measured = measured_macs_per_image(model, monkeypatch, lambda: model(x, t, y, num_iters=num_iters).shape[0])
    assert measured == cost.macs_per_step(DIGITS_FPDM, num_iters)


def test_guidance_doubles_the_macs(monkeypatch):
    model = create_model(DIGITS_FPDM).eval()
    x, t, y = digits_inputs()
    null = torch.full_like(y, model.null_class)

    def guided() -> int:
        model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 4.0, num_iters=2)
        return x.shape[0]  # images, not rows

    assert measured_macs_per_image(model, monkeypatch, guided) == cost.macs_per_step(DIGITS_FPDM, 2, cfg=True)
    assert cost.macs_per_step(DIGITS_FPDM, 2, cfg=True) == 2 * cost.macs_per_step(DIGITS_FPDM, 2)


def test_depth_sets_blocks_macs_default_iterations_and_the_network(tmp_path):
    """--depth replaces the registry depth everywhere: the network, the block count, the MACs, the FPDM's
    DiT-equivalent iterations and the checkpoint's config."""
    from checkpoint import load_safetensors, save_safetensors
    deep_dit, deep_fpdm = replace(DIGITS_DIT, depth=28), replace(DIGITS_FPDM, depth=28)
    assert cost.blocks_per_step(deep_dit, 0) == 28 and cost.default_sampling_iters(deep_fpdm) == 26
    assert cost.default_sampling_iters(replace(DIGITS_FPDM, depth=4)) == 2
    per_block = cost.macs_per_step(DIGITS_DIT) - cost.macs_per_step(replace(DIGITS_DIT, depth=7))
    assert cost.macs_per_step(deep_dit) - cost.macs_per_step(DIGITS_DIT) == 20 * per_block > 0
    assert cost.training_units_per_step(deep_dit) == 84 and cost.training_units_per_step(deep_fpdm) == \
        cost.training_units_per_step(DIGITS_FPDM)
    network = create_model(replace(DIGITS_DIT, depth=3))
    assert network.depth == 3 and len(network.blocks) == 3
    fpdm = create_model(deep_fpdm)
    assert fpdm.default_num_iters == 26
    assert sum(p.numel() for p in fpdm.parameters()) == sum(p.numel() for p in create_model(DIGITS_FPDM).parameters())
    save_safetensors(network.state_dict(), replace(DIGITS_DIT, depth=3), tmp_path / "w.safetensors")
    assert load_safetensors(tmp_path / "w.safetensors")[1].depth == 3
    with pytest.raises(UserError, match="--depth: must be >= 1"):
        replace(DIGITS_DIT, depth=0).validate()
