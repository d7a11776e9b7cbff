"""Sampling throughput (transformer-block forwards per second) of DiT and FPDM, and the sampler's overhead.

For each size, a DiT and an FPDM of the same width are sampled through the library's pipeline (sampling.generate
at the plan sampling.prepare_sampling makes, as sample.py does), with the same number of steps, twice for the FPDM:
  * at EQUAL BLOCKS: depth - pre - post fixed-point iterations per step, so both spend `depth` blocks per step
    (the paper's accounting, Sec. 4.2);
  * at EQUAL GMACs ("FPDM@GMACs"): --budget_gmacs set to the DiT's GMACs per image (cost.py), i.e. the largest plan
    whose analytic MACs fit; the injection MLP makes an FPDM iteration cost more than a block, so it runs fewer.
Throughput = block forwards per image x images / seconds. The sampler's overhead is

    (sampling seconds / blocks per image) / (seconds of one bare block forward on the same batch shape)

where the bare block is a DiTBlock called directly in a loop (DiT: blocks[0]; FPDM: block_fixed_point; the FPDM
fixed-point map, block + input-injection MLP, is timed too). It covers embeddings, the final layer, the FPDM's
injection MLP and residuals, and the diffusion step. DiT and FPDM are measured interleaved in the same process,
repeated; medians and spreads are reported. Shared CPUs are noisy: trust ratios, not absolute numbers. Weights are
random (speed does not depend on their values); no classifier-free guidance (cfg_scale 1), DDPM steps.

    python -m benchmarks.sampling_throughput             # Ti/2 digits (batch 64) and S/2 latents (batch 4)
    python -m benchmarks.sampling_throughput --quick     # Ti/2 digits, tiny (CI)
    python -m benchmarks.sampling_throughput --device cuda
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import cli
from benchmarks.bench_common import (RESULTS_DIR, format_table, limit_threads, machine_info, parse_config,
                                     parse_sizes, require_at_least, summarize, synchronize, write_payload)
from config import UserError, flag

# name -> (registry model, data kwargs for ModelConfig, default batch, default steps)
SIZES = {
    "Ti/2-digits": ("DiT-Ti/2", dict(image_size=8, in_channels=1, latent=False, num_classes=10), 64, 50),
    "S/2-latents": ("DiT-S/2", dict(image_size=256, in_channels=4, latent=True, num_classes=1000), 4, 10),
    "XL/2-latents": ("DiT-XL/2", dict(image_size=256, in_channels=4, latent=True, num_classes=1000), 2, 4),
}
EQUAL_GMACS = "FPDM@GMACs"
VARIANTS = ("DiT", "FPDM", EQUAL_GMACS)   # FPDM at equal blocks per step, FPDM at the DiT's GMACs per image


#################################################################################
#                                   Timing                                      #
#################################################################################

def timed(fn: Callable[[], Any], device) -> tuple[float, Any]:
    """Seconds taken by fn() (device-synchronised) and its result."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def bare_forward_seconds(fn: Callable, args: tuple, iters: int, device) -> float:
    """Seconds per call of fn(*args) in a plain loop under no_grad (after one warm-up call)."""
    import torch
    with torch.no_grad():
        fn(*args)
        seconds, _ = timed(lambda: [fn(*args) for _ in range(iters)], device)
    return seconds / iters


#################################################################################
#                                 Benchmark                                     #
#################################################################################

def build_variants(size: str, steps: int, device, precision: str = "auto") -> dict[str, dict[str, Any]]:
    """DiT, FPDM at equal blocks per step and FPDM at equal GMACs per image (same weights as FPDM), each with the
    plan sampling.prepare_sampling makes from its flags (and --precision), as sample.py would."""
    import torch
    from allocation import planned_macs
    from config import ModelConfig, SampleConfig
    from cost import default_sampling_iters
    from models import create_model
    from sampling import prepare_sampling

    model_name, data, _, _ = SIZES[size]
    models, variants = {}, {}
    for fixed_point in (False, True):
        torch.manual_seed(0)
        models[fixed_point] = create_model(ModelConfig(model=model_name, fixed_point=fixed_point, **data)).to(device)
    iters = default_sampling_iters(ModelConfig(model=model_name, fixed_point=True, **data))  # DiT depth - 2
    dit_gmacs = None
    for label in VARIANTS:
        fixed_point = label != "DiT"
        model_config = ModelConfig(model=model_name, fixed_point=fixed_point, **data)
        flags: dict[str, Any] = dict(cfg_scale=1.0, num_sampling_steps=steps, precision=precision)
        if label == "FPDM":
            flags["fixed_point_iters"] = iters
        elif label == EQUAL_GMACS:  # the largest plan of `steps` steps within the DiT's GMACs (cost.py)
            flags["budget_gmacs"] = dit_gmacs
        model = models[fixed_point].eval()
        sample_config, plan, _ = prepare_sampling(model_config, SampleConfig(**flags), model, device)
        if label == "DiT":
            dit_gmacs = planned_macs(model_config, plan) / 1e9
        variants[label] = dict(model=model, model_config=model_config, sample_config=sample_config, plan=plan,
                               block=model.block_fixed_point if fixed_point else model.blocks[0])
    return variants


def measure_size(size: str, batch: int, steps: int, repeats: int, bare_iters: int, device,
                 precision: str = "auto") -> dict[str, Any]:
    """Interleaved repeated measurements of sampling time (sampling.generate) and bare block time per variant, at
    sampling's --precision (auto: tf32 on CUDA, fp32 on the CPU; the bare block timings run without autocast)."""
    import torch
    from sampling import generate

    variants = build_variants(size, steps, device, precision)
    samples: dict[str, dict[str, list[float]]] = {k: {"sample_s": [], "block_s": [], "map_s": []} for k in variants}
    spent: dict[str, Any] = {}
    for entry in variants.values():
        model = entry["model"]
        entry["labels"] = torch.arange(batch) % entry["model_config"].num_classes
        gen = torch.Generator().manual_seed(0)
        entry["x"] = torch.randn(batch, model.pos_embed.shape[1], model.hidden_size, generator=gen).to(device)  # (N, T, D)
        entry["c"] = torch.randn(batch, model.hidden_size, generator=gen).to(device)                            # (N, D)

    def run_sampling(entry):
        return generate(entry["model"], entry["model_config"], entry["sample_config"], entry["plan"],
                        list(range(batch)), entry["labels"], seed=0, batch_size=batch, device=device,
                        keep_images=False)

    for entry in variants.values():  # warm-up (allocator, kernels)
        run_sampling(entry)
    for _ in range(repeats):
        for label, entry in variants.items():
            samples[label]["block_s"].append(bare_forward_seconds(entry["block"], (entry["x"], entry["c"]),
                                                                  bare_iters, device))
            if entry["model_config"].fixed_point:
                samples[label]["map_s"].append(bare_forward_seconds(
                    entry["model"].fixed_point_map, (entry["x"], entry["x"], entry["c"]), bare_iters, device))
            seconds, result = timed(lambda: run_sampling(entry), device)
            samples[label]["sample_s"].append(seconds)
            (spent[label],) = result.trajectories

    models = {}
    for label, entry in variants.items():
        s, blocks, macs = samples[label], spent[label].blocks_per_image, spent[label].macs_per_image
        per_block = [t / blocks for t in s["sample_s"]]
        iters = spent[label].iters_per_step
        models[label] = {
            "model": entry["model_config"].model, "fixed_point": entry["model_config"].fixed_point,
            "params": sum(p.numel() for p in entry["model"].parameters()),
            "num_steps": entry["plan"].num_steps,
            "iters_per_step": (max(iters) if len(set(iters)) == 1 else sorted(set(iters)))
            if entry["model_config"].fixed_point else 0,
            "blocks_per_image": blocks, "gmacs_per_image": macs / 1e9,
            "sample_s": summarize(s["sample_s"]), "bare_block_s": summarize(s["block_s"]),
            "per_block_in_sampling_s": summarize(per_block),
            "block_forwards_per_s": summarize([blocks * batch / t for t in s["sample_s"]]),
            "gmacs_per_s": summarize([macs * batch / 1e9 / t for t in s["sample_s"]]),
            "overhead_ratio": summarize([pb / b for pb, b in zip(per_block, s["block_s"])]),
            "raw": s,
        }
        if s["map_s"]:
            models[label]["bare_fixed_point_map_s"] = summarize(s["map_s"])
            models[label]["map_over_block"] = summarize([m / b for m, b in zip(s["map_s"], s["block_s"])])

    def time_ratio(label: str) -> dict[str, float]:
        return summarize([f / d for f, d in zip(samples[label]["sample_s"], samples["DiT"]["sample_s"])])

    dit, fpdm = models["DiT"], models[EQUAL_GMACS]
    return {"size": size, "batch": batch, "device": str(device), "repeats": repeats, "bare_iters": bare_iters,
            "precision": variants["DiT"]["sample_config"].precision,
            "models": {label: models[label] for label in ("DiT", "FPDM")},
            "sample_time_fpdm_over_dit": time_ratio("FPDM"),
            "equal_gmacs": {"FPDM": fpdm, "sample_time_fpdm_over_dit": time_ratio(EQUAL_GMACS),
                            "gmacs_fpdm_over_dit": fpdm["gmacs_per_image"] / dit["gmacs_per_image"],
                            "blocks_fpdm_over_dit": fpdm["blocks_per_image"] / dit["blocks_per_image"]}}


#################################################################################
#                                     CLI                                       #
#################################################################################

@dataclass
class ThroughputConfig:
    """Flags of the sampling-throughput benchmark."""
    quick: bool = flag(False, "Ti/2 digits, batch 8, 4 steps, 2 repeats (CI).")
    sizes: Optional[str] = flag(None, f"Comma-separated sizes from {', '.join(SIZES)} (None: Ti/2-digits,"
                                        "S/2-latents; --quick Ti/2-digits).")
    batch: Optional[int] = flag(None, "Images per batch (None: the size's default; --quick 8).")
    steps: Optional[int] = flag(None, "Sampling steps (None: the size's default; --quick 4).")
    repeats: int = flag(5, "Interleaved repetitions (median and spread; --quick 2).")
    bare_iters: int = flag(50, "Calls per bare block timing (--quick 10).")
    device: str = flag("auto", "auto (CPU, and CUDA too when available), cpu or cuda.")
    out: str = flag(str(RESULTS_DIR / "sampling_throughput.json"), "JSON output path.")

    def validate(self) -> "ThroughputConfig":
        """Known sizes and device, counts >= 1; returns self."""
        require_at_least(self, ("batch", "steps", "repeats", "bare_iters"))
        self.size_list()
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"--device: must be auto, cpu or cuda (got {self.device!r})")
        return self

    def size_list(self) -> list[str]:
        """The sizes to measure."""
        return parse_sizes(self.sizes, self.quick, list(SIZES))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure, print tables, write JSON; returns the payload."""
    config = parse_config(ThroughputConfig, __doc__, argv)
    limit_threads(1)
    import torch

    sizes = config.size_list()
    if config.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [config.device]
    if "cuda" in devices and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available")
    repeats, bare_iters = (2, 10) if config.quick else (config.repeats, config.bare_iters)

    started = time.perf_counter()
    runs = []
    for device_name in devices:
        for size in sizes:
            _, _, default_batch, default_steps = SIZES[size]
            batch = config.batch or (8 if config.quick else default_batch)
            steps = config.steps or (4 if config.quick else default_steps)
            print(f"[{time.perf_counter() - started:6.1f}s] {size} on {device_name}: batch {batch}, {steps} steps, "
                  f"{repeats} repeats", flush=True)
            runs.append(measure_size(size, batch, steps, repeats, bare_iters, torch.device(device_name)))

    rows = []
    for run in runs:
        for label, m in [*run["models"].items(), (EQUAL_GMACS, run["equal_gmacs"]["FPDM"])]:
            rows.append([run["size"], run["device"], label, run["batch"], m["num_steps"], m["blocks_per_image"],
                         m["block_forwards_per_s"]["median"], m["block_forwards_per_s"]["spread_pct"],
                         m["bare_block_s"]["median"] * 1e3, m["per_block_in_sampling_s"]["median"] * 1e3,
                         m["overhead_ratio"]["median"], m["overhead_ratio"]["min"], m["overhead_ratio"]["max"]])
    print(format_table(["size", "device", "model", "batch", "steps", "blocks/image", "block fwd/s (median)",
                        "spread %", "bare block ms", "block in sampling ms", "overhead (median)", "min", "max"],
                       rows))
    for run in runs:
        r, eq = run["sample_time_fpdm_over_dit"], run["equal_gmacs"]
        fp, g = run["models"]["FPDM"], eq["sample_time_fpdm_over_dit"]
        print(f"{run['size']} {run['device']}: sampling time FPDM/DiT at equal blocks = {r['median']:.3f} "
              f"[{r['min']:.3f}, {r['max']:.3f}]; at equal GMACs ({eq['FPDM']['blocks_per_image']} vs "
              f"{run['models']['DiT']['blocks_per_image']} blocks, GMACs ratio {eq['gmacs_fpdm_over_dit']:.3f}) = "
              f"{g['median']:.3f} [{g['min']:.3f}, {g['max']:.3f}]; FPDM fixed-point map / bare block = "
              f"{fp['map_over_block']['median']:.3f}")
    payload = {"benchmark": "sampling_throughput", "quick": config.quick, "runs": runs,
               "machine": machine_info(devices[-1]), "total_runtime_s": time.perf_counter() - started}
    write_payload(config.out, payload)
    return payload


if __name__ == "__main__":
    cli.run(main)
