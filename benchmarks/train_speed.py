"""Training step time of DiT and FPDM at the same width and batch, measured side by side in ONE process.

Per size, a DiT, an FPDM and an FPDM with --grad_checkpointing take training steps in turn (train.py's loss, backward
and AdamW; the order rotates every round), repeated; the per-round ratios' median and spread are reported, so slow
phases of a shared machine hit all three alike. FPDM runs S-JFB with its draws pinned at n = N = 12 no-grad and
m = M = 12 backpropagated iterations (the largest step of the default recipe). The analytic prediction from cost.py
counts a backward as two forwards:

    DiT: 3 macs_per_step(DiT)      FPDM: macs_per_step(FPDM, n + m) + 2 macs_per_step(FPDM, m)
    FPDM with checkpointing: + macs_per_step(FPDM, m) (the gradient-carrying forward is recomputed in backward)

    python -m benchmarks.train_speed             # Ti/2 digits (batch 64) and S/2 latents (batch 8)
    python -m benchmarks.train_speed --quick     # Ti/2 digits, batch 8, 2 rounds (CI)
    python -m benchmarks.train_speed --device cuda
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import cli
from benchmarks.bench_common import (RESULTS_DIR, format_table, limit_threads, machine_info, parse_config,
                                     parse_sizes, require_at_least, summarize, synchronize, training_batch,
                                     training_step, write_payload)
from config import UserError, flag

# name -> (registry model, data kwargs for ModelConfig, default batch, default rounds)
SIZES = {
    "Ti/2-digits": ("DiT-Ti/2", dict(image_size=8, in_channels=1, latent=False, num_classes=10), 64, 10),
    "S/2-latents": ("DiT-S/2", dict(image_size=256, in_channels=4, latent=True, num_classes=1000), 8, 5),
    "XL/2-latents": ("DiT-XL/2", dict(image_size=256, in_channels=4, latent=True, num_classes=1000), 2, 3),
}
VARIANTS = ("DiT", "FPDM", "FPDM+ckpt")   # label -> (fixed_point, grad_checkpointing) in variant_flags


#################################################################################
#                                 Benchmark                                     #
#################################################################################

def variant_flags(label: str) -> tuple[bool, bool]:
    """(fixed_point, grad_checkpointing) of a variant label."""
    return label != "DiT", label.endswith("+ckpt")


def predicted_macs(model_config: Any, n: int, m: int, checkpointing: bool) -> int:
    """Analytic MACs per image of one training step (a backward = two forwards; see the module docstring)."""
    from cost import macs_per_step
    if not model_config.fixed_point:
        return 3 * macs_per_step(model_config)
    total = macs_per_step(model_config, n + m) + 2 * macs_per_step(model_config, m)
    return total + (macs_per_step(model_config, m) if checkpointing else 0)


def build_variants(size: str, n: int, m: int, device: Any) -> dict[str, dict[str, Any]]:
    """The three models of one size, each with its diffusion, AdamW and S-JFB draws."""
    import torch
    from config import ModelConfig
    from models import create_model

    model_name, data, _, _ = SIZES[size]
    variants = {}
    for label in VARIANTS:
        fixed_point, checkpointing = variant_flags(label)
        model_config = ModelConfig(model=model_name, fixed_point=fixed_point, fixed_point_no_grad_max_iters=n,
                                   fixed_point_with_grad_max_iters=max(m, 1), **data)
        torch.manual_seed(0)
        model = create_model(model_config, grad_checkpointing=checkpointing).to(device).train()
        variants[label] = dict(model=model, model_config=model_config, diffusion=model_config.create_diffusion(""),
                               optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0),
                               sjfb_iters=(n, m) if fixed_point else None,
                               predicted_macs=predicted_macs(model_config, n, m, checkpointing))
    return variants


def measure_size(size: str, batch: int, rounds: int, n: int, m: int, device: Any) -> dict[str, Any]:
    """Interleaved training steps of the three variants; per-round ratios to the DiT."""
    import torch

    variants = build_variants(size, n, m, device)
    generator = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {label: [] for label in variants}
    losses: dict[str, list[float]] = {label: [] for label in variants}

    def step(label: str, data: tuple, seed: int) -> float:
        v = variants[label]
        torch.manual_seed(seed)  # the same diffusion noise and label dropout for every variant
        synchronize(device)
        start = time.perf_counter()
        losses[label].append(training_step(v["model"], v["diffusion"], v["optimizer"], data, v["sjfb_iters"]))
        synchronize(device)
        return time.perf_counter() - start

    labels = list(variants)
    data = training_batch(variants["DiT"]["model_config"], batch, generator, device)
    for label in labels:  # warm-up: allocator, kernels, AdamW's lazy state
        step(label, data, seed=0)
    for r in range(rounds):
        data = training_batch(variants["DiT"]["model_config"], batch, generator, device)
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:   # rotate the order every round
            times[label].append(step(label, data, seed=r + 1))

    dit_macs = variants["DiT"]["predicted_macs"]
    result = {"size": size, "model": variants["DiT"]["model_config"].model, "batch": batch, "rounds": rounds,
              "n": n, "m": m, "device": str(device), "variants": {}}
    for label, v in variants.items():
        result["variants"][label] = {
            "params": sum(p.numel() for p in v["model"].parameters()), "step_s": summarize(times[label]),
            "predicted_gmacs_per_image": v["predicted_macs"] / 1e9, "raw_step_s": times[label],
            "losses": losses[label],
            "over_dit": summarize([t / d for t, d in zip(times[label], times["DiT"])]),
            "predicted_over_dit": v["predicted_macs"] / dit_macs}
    result["checkpointed_over_plain_fpdm"] = summarize([c / p for c, p in zip(times["FPDM+ckpt"], times["FPDM"])])
    return result


#################################################################################
#                                     CLI                                       #
#################################################################################

@dataclass
class SpeedConfig:
    """Flags of the training-speed benchmark."""
    quick: bool = flag(False, "Ti/2 digits, batch 8, 2 rounds (CI).")
    sizes: Optional[str] = flag(None, f"Comma-separated sizes from {', '.join(SIZES)} (None: Ti/2-digits,"
                                        "S/2-latents; --quick Ti/2-digits).")
    batch: Optional[int] = flag(None, "Images per step (None: the size's default; --quick 8).")
    rounds: Optional[int] = flag(None, "Interleaved rounds, one step of each variant per round (None: the size's "
                                         "default; --quick 2).")
    n: int = flag(12, "S-JFB no-grad iterations per FPDM step (pinned).")
    m: int = flag(12, "S-JFB backpropagated iterations per FPDM step (pinned).")
    device: str = flag("cpu", "cpu or cuda.")
    out: str = flag(str(RESULTS_DIR / "train_speed.json"), "JSON output path.")

    def validate(self) -> "SpeedConfig":
        """Known sizes and device, counts >= 1; returns self."""
        require_at_least(self, ("batch", "rounds", "m"))
        require_at_least(self, ("n",), low=0)
        self.size_list()
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"--device: must be cpu or cuda (got {self.device!r})")
        return self

    def size_list(self) -> list[str]:
        """The sizes to measure."""
        return parse_sizes(self.sizes, self.quick, list(SIZES))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure, print a table, write JSON; returns the payload."""
    config = parse_config(SpeedConfig, __doc__, argv)
    limit_threads(1)
    import torch

    if config.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available")
    started = time.perf_counter()
    runs = []
    for size in config.size_list():
        _, _, default_batch, default_rounds = SIZES[size]
        batch = config.batch or (8 if config.quick else default_batch)
        rounds = config.rounds or (2 if config.quick else default_rounds)
        print(f"[{time.perf_counter() - started:6.1f}s] {size} on {config.device}: batch {batch}, {rounds} rounds",
              flush=True)
        runs.append(measure_size(size, batch, rounds, config.n, config.m, torch.device(config.device)))
    rows = [[run["size"], run["batch"], label, v["params"], v["step_s"]["median"], v["over_dit"]["median"],
             f"[{v['over_dit']['min']:.2f}, {v['over_dit']['max']:.2f}]", v["predicted_over_dit"]]
            for run in runs for label, v in run["variants"].items()]
    print(format_table(["size", "batch", "model", "params", "step s (median)", "time / DiT (median)", "[min, max]",
                        "predicted MACs / DiT"], rows))
    payload = {"benchmark": "train_speed", "quick": config.quick, "runs": runs,
               "machine": machine_info(config.device), "total_runtime_s": time.perf_counter() - started}
    write_payload(config.out, payload)
    return payload


if __name__ == "__main__":
    cli.run(main)
