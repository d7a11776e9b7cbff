"""The CUDA-only paths, skipped without a GPU (`python -m benchmarks.gpu` runs them as `pytest -m cuda tests`):
bf16 autocast training with fused AdamW, TF32 and the EMA; the compiled FPDM against eager; CUDA sampling against
the CPU."""
from pathlib import Path

import pytest
import torch

from config import ModelConfig, SampleConfig
from models import create_model
from sampling import generate, load_sampling_model, prepare_sampling

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
REPO = Path(__file__).resolve().parents[1]
TINY_FPDM = ModelConfig(model="DiT-Ti/2", image_size=8, in_channels=1, num_classes=10, fixed_point=True)


def random_fpdm(device: str) -> torch.nn.Module:
    """A tiny FPDM with small random weights everywhere (DiT's zero-initialised layers would make outputs zero)."""
    torch.manual_seed(0)
    model = create_model(TINY_FPDM)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.05)
    return model.to(device).eval()


def test_bf16_training_steps_take_the_cuda_paths():
    from benchmarks.gpu import GpuConfig, TrainSpec, train_run
    run = train_run(TrainSpec("FPDM", True, steps=2), GpuConfig(quick=True), track_tensors=False)
    assert run["paths"] == {"device": "cuda:0", "autocast": "bf16", "tf32": True, "fused_adamw": True}
    assert run["losses_finite"] and [tuple(d) for d in run["sjfb_iters"]] == [(12, 12)] * 2
    assert run["cuda_max_allocated_mb"] > 0


def test_compiled_fpdm_matches_eager_on_cuda():
    model = random_fpdm("cuda")
    x = torch.randn(4, 1, 8, 8, device="cuda")
    t, y = torch.tensor([0, 10, 500, 999], device="cuda"), torch.arange(4, device="cuda")
    with torch.no_grad():
        eager = model(x, t, y, num_iters=4)
        model.compile_parts()
        compiled = model(x, t, y, num_iters=4)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)


def test_fp32_sampling_on_cuda_matches_the_cpu():
    images = {}
    for device in ("cpu", "cuda"):
        model, model_config, _ = load_sampling_model(str(REPO / "pretrained" / "fpdm-digits.safetensors"),
                                                     torch.device(device))
        config, plan, _ = prepare_sampling(model_config, SampleConfig(num_sampling_steps=5, cfg_scale=1.0,
                                                                      precision="fp32"), model, device)
        images[device] = generate(model, model_config, config, plan, list(range(4)), seed=0, batch_size=4,
                                  device=device).images.astype(int)
    assert abs(images["cuda"] - images["cpu"]).max() <= 2   # uint8 pixels: the same images up to rounding
