"""Peak training memory and step time: DiT vs FPDM at the same batch and width (paper Sec. 4.1, Table 3).

Every configuration runs in a FRESH PROCESS (a new interpreter calling `worker_main`), one at a time, so a peak
never leaks from one configuration into the next. Memory is measured four ways:
  * CPU: peak resident set size (resource.getrusage ru_maxrss), raw and minus the RSS measured right after the
    imports (the interpreter + torch baseline); RSS includes allocator slack, so it is indicative.
  * CUDA: torch.cuda.max_memory_allocated over the training steps (parameters, gradients, Adam state, activations).
  * Both: peak tensor bytes of the first step (bench_common.PeakTensorBytes: parameters + the peak of the live
    tensors created during the step, tracked at every operator): the CPU analogue of CUDA's max allocated.
  * Both: bytes of the tensors autograd saves for backward during one step (torch.autograd.graph.saved_tensors_hooks,
    unique storages, parameters excluded): the activation memory, deterministic and noise-free. Under gradient
    checkpointing these hooks do not see what checkpoint keeps (its inputs) or recomputes; the peaks do.
FPDM runs S-JFB (Algorithm 1) with the bounds pinned at their maxima n = N and m = M (the largest step training
ever takes: memory grows with m only); the n-sweep shows that the n no-grad iterations cost no memory. The
checkpointing axis runs FPDM at m = 0 and m = 12 with and without --grad_checkpointing: the growth from m = 0 to
m = 12 with checkpointing should be at most 35% of the growth without it.

    python -m benchmarks.train_memory                 # XL/2 (batch 2), S/2 (batch 8), Ti/2 (batch 64), n-sweeps,
                                                      # checkpointing axis at S/2 (batch 16)
    python -m benchmarks.train_memory --quick         # Ti/2 only, one step (CI)
    python -m benchmarks.train_memory --skip_xl --no_optimizer
The paper: FPDM-XL/2 10.2 GB vs DiT-XL/2 25.2 GB (ratio 0.40) at batch 64 on a V100.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import cli
from benchmarks.bench_common import (REPO, RESULTS_DIR, format_table, limit_threads, machine_info,
                                     parse_config, require_at_least, write_payload)
from config import UserError, flag

RESULT_PREFIX = "TRAIN_MEMORY_RESULT "
CHECKPOINT_TARGET = 0.35  # growth (m = 0 -> M) with checkpointing / growth without, at most
PAPER = {"setting": "XL/2, ImageNet 256 (32x32x4 latents), batch 64, V100", "dit_gb": 25.2, "fpdm_gb": 10.2,
         "ratio_fpdm_over_dit": 0.40}

# Data settings: (image_size, in_channels, latent, num_classes)
DATA = {
    "latents32": dict(image_size=256, in_channels=4, latent=True, num_classes=1000),
    "digits8": dict(image_size=8, in_channels=1, latent=False, num_classes=10),
}


#################################################################################
#                               Configurations                                  #
#################################################################################

@dataclass
class MemoryConfig:
    """Flags of the training-memory benchmark."""
    quick: bool = flag(False, "Ti/2 only, one step per configuration (CI).")
    skip_xl: bool = flag(False, "Skip the XL/2 pair (~11 GB each with AdamW).")
    xl_batch: int = flag(2, "Batch size of the XL/2 pair.")
    xl_steps: int = flag(1, "Training steps of the XL/2 runs (~1 min each on CPU).")
    s_batch: int = flag(8, "Batch size of the S/2 pair and n-sweep.")
    steps: Optional[int] = flag(None, "Steps per configuration (None: 1 with --quick, else 2; Ti/2: one more).")
    sweep_n: Optional[str] = flag(None, "Comma-separated no-grad iteration counts n, m fixed at 12 (None: 0,6,12,24;"
                                          " --quick 0,12).")
    sweep_sizes: str = flag("S/2,XL/2", "Sizes of the FPDM n-sweep (S/2 at --s_batch, XL/2 at --xl_batch; full "
                                          "mode only).")
    ckpt_batch: int = flag(16, "Batch size of the FPDM-S/2 checkpointing axis (full mode; --quick: Ti/2, 64).")
    ckpt_m: int = flag(12, "Backpropagated iterations m of the checkpointing axis (compared with m = 0).")
    skip_checkpointing: bool = flag(False, "Skip the --grad_checkpointing axis.")
    no_optimizer: bool = flag(False, "Forward + backward only (no AdamW state).")
    device: str = flag("auto", "auto, cpu, cuda or cuda:N.")
    timeout: float = flag(3600.0, "Seconds allowed per worker process.")
    out: str = flag(str(RESULTS_DIR / "train_memory.json"), "JSON output path.")

    def validate(self) -> "MemoryConfig":
        """Counts >= 1 and a known device; returns self."""
        require_at_least(self, ("xl_batch", "xl_steps", "s_batch", "steps", "ckpt_batch", "ckpt_m"))
        if self.sweep_n is not None and not all(v.strip().isdigit() for v in self.sweep_n.split(",")):
            raise UserError(f"--sweep_n: expected comma-separated whole numbers such as 0,12 (got {self.sweep_n!r})")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"--device: must be auto, cpu or cuda (got {self.device!r})")
        return self


def make_spec(group: str, model: str, fixed_point: bool, data: str, batch: int, steps: int, *,
              n: int = 12, m: int = 12, optimizer: bool = True, grad_checkpointing: bool = False) -> dict[str, Any]:
    """One configuration (a JSON-able dict handed to a worker process)."""
    return {"group": group, "model": model, "fixed_point": fixed_point, "data": data, "batch": batch,
            "steps": steps, "n": n if fixed_point else 0, "m": m if fixed_point else 0, "optimizer": optimizer,
            "grad_checkpointing": grad_checkpointing}


def spec_key(spec: dict[str, Any]) -> tuple:
    """Identity of a configuration, ignoring its table group (so the same run is not repeated)."""
    return tuple(sorted((k, v) for k, v in spec.items() if k != "group"))


def checkpointing_specs(config: MemoryConfig) -> list[dict[str, Any]]:
    """FPDM at m = 0 and m = ckpt_m, each without and with gradient checkpointing (empty with --skip_checkpointing)."""
    if config.skip_checkpointing:
        return []
    if config.quick:
        group, model, data, batch, steps = "checkpointing FPDM-Ti/2 digits 8x8", "DiT-Ti/2", "digits8", 64, 1
    else:
        group, model, data = "checkpointing FPDM-S/2 latents 32x32x4", "DiT-S/2", "latents32"
        batch, steps = config.ckpt_batch, config.steps or 2
    return [make_spec(group, model, True, data, batch, steps, n=12, m=m, optimizer=not config.no_optimizer,
                      grad_checkpointing=ckpt) for ckpt in (False, True) for m in (0, config.ckpt_m)]


def build_specs(config: MemoryConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(DiT-vs-FPDM comparison specs, FPDM n-sweep specs) for the chosen mode."""
    opt = not config.no_optimizer
    sweep_n = ([int(v) for v in config.sweep_n.split(",")] if config.sweep_n is not None
               else [0, 12] if config.quick else [0, 6, 12, 24])
    pairs: list[dict[str, Any]] = []
    if config.quick:
        steps = config.steps or 1
        for fp in (False, True):
            pairs.append(make_spec("Ti/2 digits 8x8", "DiT-Ti/2", fp, "digits8", 64, steps, optimizer=opt))
        sweep = [make_spec("n-sweep Ti/2 digits 8x8", "DiT-Ti/2", True, "digits8", 64, steps, n=n, optimizer=opt)
                 for n in sweep_n]
        return pairs, sweep
    if not config.skip_xl:
        for fp in (False, True):
            pairs.append(make_spec("XL/2 latents 32x32x4", "DiT-XL/2", fp, "latents32", config.xl_batch,
                                   config.xl_steps, optimizer=opt))
    steps = config.steps or 2
    for fp in (False, True):
        pairs.append(make_spec("S/2 latents 32x32x4", "DiT-S/2", fp, "latents32", config.s_batch, steps,
                               optimizer=opt))
    for fp in (False, True):
        pairs.append(make_spec("Ti/2 digits 8x8", "DiT-Ti/2", fp, "digits8", 64, steps + 1, optimizer=opt))
    sweep = []
    for size in [s.strip() for s in config.sweep_sizes.split(",") if s.strip()]:
        if size not in ("S/2", "XL/2"):
            raise UserError(f"--sweep_sizes: unknown size {size!r} (valid: S/2, XL/2)")
        if size == "XL/2" and config.skip_xl:
            continue
        batch, size_steps = (config.xl_batch, config.xl_steps) if size == "XL/2" else (config.s_batch, steps)
        sweep += [make_spec(f"n-sweep {size} latents 32x32x4", f"DiT-{size}", True, "latents32", batch, size_steps,
                            n=n, optimizer=opt) for n in sweep_n]
    return pairs, sweep


#################################################################################
#                               Worker process                                  #
#################################################################################

def current_rss_mb() -> float:
    """Resident set size of this process now (Linux /proc), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class SavedTensorBytes:
    """Context manager summing the bytes autograd saves for backward (unique storages, parameters excluded)."""

    def __init__(self, model):
        import torch
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: dict[int, int] = {}

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._param_ptrs and ptr not in self._seen:
            self._seen[ptr] = storage.nbytes()
        return tensor

    @property
    def total_bytes(self) -> int:
        """Bytes of the distinct non-parameter storages saved so far."""
        return sum(self._seen.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def step_memory(model_config: Any, batch: int, iters: tuple[int, int]) -> dict[str, float]:
    """MiB autograd saves and peak live tensor MiB (parameters included) of one training step's forward and backward
    (no optimizer) of a freshly built model of `model_config` with (n, m) pinned, in this process, on the CPU."""
    import torch
    from benchmarks.bench_common import PeakTensorBytes, training_batch, training_step
    from models import create_model
    torch.manual_seed(0)
    model = create_model(model_config).train()
    diffusion = model_config.create_diffusion("")
    data = training_batch(model_config, batch, torch.Generator().manual_seed(1), "cpu")
    with PeakTensorBytes(model.parameters()) as peak, SavedTensorBytes(model) as saved:
        training_step(model, diffusion, None, data, iters)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"batch": batch, "n": iters[0], "m": iters[1], "saved_activation_mb": saved.total_bytes / 2**20,
            "peak_tensor_mb": (param_bytes + peak.peak_bytes) / 2**20}


def run_worker(spec: dict[str, Any], device_name: str) -> dict[str, Any]:
    """Train `spec` for spec['steps'] steps in this (fresh) process; return memory and timing measurements."""
    limit_threads(1)
    import torch
    from benchmarks.bench_common import PeakTensorBytes, training_batch, training_step
    from config import ModelConfig
    from models import create_model

    device = torch.device(device_name)
    baseline_rss = current_rss_mb()          # interpreter + torch + library imports
    model_config = ModelConfig(model=spec["model"], fixed_point=spec["fixed_point"],
                               fixed_point_no_grad_max_iters=max(spec["n"], 0),
                               fixed_point_with_grad_max_iters=max(spec["m"], 1), **DATA[spec["data"]])
    torch.manual_seed(0)
    model = create_model(model_config, grad_checkpointing=spec.get("grad_checkpointing", False)).to(device)
    model.train()
    diffusion = model_config.create_diffusion("")  # all 1000 training timesteps, as train.py
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0) if spec["optimizer"] else None
    num_params = sum(p.numel() for p in model.parameters())
    built_rss = current_rss_mb()             # + parameters (+ empty optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    generator = torch.Generator().manual_seed(1)
    # S-JFB with (n, m) pinned: n no-grad iterations, then m backpropagated ones
    sjfb_iters = (spec["n"], spec["m"]) if model_config.fixed_point else None
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    step_times, saved_bytes, peak_bytes, losses = [], None, None, []
    for step in range(spec["steps"]):
        batch = training_batch(model_config, spec["batch"], generator, device)
        start = time.perf_counter()
        if step == 0:  # the trackers slow the step a little: later steps give the time
            with PeakTensorBytes(model.parameters()) as peak, SavedTensorBytes(model) as saved:
                losses.append(training_step(model, diffusion, optimizer, batch, sjfb_iters))
            saved_bytes, peak_bytes = saved.total_bytes, param_bytes + peak.peak_bytes
        else:
            losses.append(training_step(model, diffusion, optimizer, batch, sjfb_iters))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - start)

    result = {**spec, "device": device_name, "params": num_params,
              "baseline_rss_mb": baseline_rss, "post_build_rss_mb": built_rss, "peak_rss_mb": peak_rss_mb(),
              "saved_activation_mb": saved_bytes / 2**20, "peak_tensor_mb": peak_bytes / 2**20,
              "step_times_s": step_times,
              "step_time_s": min(step_times[1:]) if len(step_times) > 1 else step_times[0], "losses": losses}
    result["peak_minus_baseline_mb"] = result["peak_rss_mb"] - baseline_rss
    if device.type == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


#################################################################################
#                                Orchestrator                                   #
#################################################################################

def run_in_fresh_process(spec: dict[str, Any], device: str, timeout: float) -> dict[str, Any]:
    """Run one configuration in a new Python process (worker_main) and parse its result line."""
    code = "import sys; from benchmarks.train_memory import worker_main; worker_main(sys.argv[1], sys.argv[2])"
    command = [sys.executable, "-c", code, json.dumps(spec), device]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"worker failed for {spec} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def worker_main(spec_json: str, device: str) -> None:
    """Entry point of a worker process: run one configuration and print its result line."""
    result = run_worker(json.loads(spec_json), device)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def memory_column(result: dict[str, Any]) -> str:
    """Which measurement the comparison uses: CUDA allocator peak, else RSS peak minus import baseline."""
    return "cuda_max_allocated_mb" if "cuda_max_allocated_mb" in result else "peak_minus_baseline_mb"


def batch64_estimate_mb(result: dict[str, Any]) -> float:
    """Extrapolation (not a measurement) to the paper's batch 64: fp32 weights + grads (+ 2 Adam moments) plus 64x the
    saved activations per image. Ignores transient buffers, so it is a lower bound of the real peak."""
    bytes_per_param = 16 if result["optimizer"] else 8
    return result["params"] * bytes_per_param / 2**20 + 64 * result["saved_activation_mb"] / result["batch"]


def compare_pairs(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """FPDM/DiT ratios for each group that has both models."""
    comparisons = []
    for group in dict.fromkeys(r["group"] for r in results):
        dit = next((r for r in results if r["group"] == group and not r["fixed_point"]), None)
        fpdm = next((r for r in results if r["group"] == group and r["fixed_point"]), None)
        if dit is None or fpdm is None:
            continue
        column = memory_column(dit)
        estimate = {label: batch64_estimate_mb(r) for label, r in (("dit", dit), ("fpdm", fpdm))}
        comparisons.append({
            "group": group, "batch": dit["batch"], "memory_measure": column,
            "params_ratio": fpdm["params"] / dit["params"],
            "memory_ratio": fpdm[column] / dit[column],
            "peak_rss_ratio": fpdm["peak_rss_mb"] / dit["peak_rss_mb"],
            "peak_tensor_ratio": fpdm["peak_tensor_mb"] / dit["peak_tensor_mb"],
            "saved_activation_ratio": fpdm["saved_activation_mb"] / dit["saved_activation_mb"],
            "step_time_ratio": fpdm["step_time_s"] / dit["step_time_s"],
            "batch64_estimate_mb": estimate,
            "batch64_estimate_ratio": estimate["fpdm"] / estimate["dit"],
        })
    return comparisons


def compare_checkpointing(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Growth of each memory measure from m = 0 to the largest m, with and without gradient checkpointing, and the
    ratio checkpointed / plain (the target: at most CHECKPOINT_TARGET)."""
    if not results:
        return None
    top_m = max(r["m"] for r in results)
    pick = {(r["grad_checkpointing"], r["m"]): r for r in results}
    measures = ["peak_tensor_mb", "saved_activation_mb", "peak_minus_baseline_mb"]
    if "cuda_max_allocated_mb" in results[0]:
        measures.insert(0, "cuda_max_allocated_mb")
    growth = {}
    for measure in measures:
        plain = pick[(False, top_m)][measure] - pick[(False, 0)][measure]
        ckpt = pick[(True, top_m)][measure] - pick[(True, 0)][measure]
        growth[measure] = {"plain_mb": plain, "checkpointed_mb": ckpt, "ratio": ckpt / plain if plain else None}
    first = results[0]
    return {"group": first["group"], "model": first["model"], "batch": first["batch"], "n": first["n"], "m": top_m,
            "target_ratio": CHECKPOINT_TARGET, "growth": growth,
            "primary_measure": measures[0],
            "step_time_ratio_checkpointed_over_plain": pick[(True, top_m)]["step_time_s"]
            / pick[(False, top_m)]["step_time_s"],
            "note": "saved_activation_mb misses what checkpoint keeps (its inputs: one (N, T, D) iterate per "
                    "iteration) and recomputes in backward; peak_tensor_mb and cuda_max_allocated_mb include both"}


def print_tables(pairs: list[dict[str, Any]], sweep: list[dict[str, Any]], comparisons: list[dict[str, Any]],
                 checkpointing: list[dict[str, Any]], ckpt_summary: dict[str, Any] | None) -> None:
    """Print the comparison and sweep tables (markdown)."""
    def name(r):
        return ("FPDM" if r["fixed_point"] else "DiT") + r["model"][3:]

    cuda = any("cuda_max_allocated_mb" in r for r in pairs + sweep)
    headers = ["group", "model", "batch", "n, m", "params", "peak RSS MB", "peak - baseline MB", "peak tensor MB",
               "saved activations MB", "step s"] + (["CUDA max alloc MB"] if cuda else [])
    def row(r):
        values = [r["group"], name(r), r["batch"], f"{r['n']}, {r['m']}" if r["fixed_point"] else "-", r["params"],
                  r["peak_rss_mb"], r["peak_minus_baseline_mb"], r["peak_tensor_mb"], r["saved_activation_mb"],
                  r["step_time_s"]]
        return values + ([r.get("cuda_max_allocated_mb")] if cuda else [])
    print(format_table(headers, [row(r) for r in pairs]))
    print()
    print(format_table(["group", "batch", "params FPDM/DiT", "memory FPDM/DiT", "(measure)", "peak RSS FPDM/DiT",
                        "peak tensor FPDM/DiT", "saved act. FPDM/DiT", "step time FPDM/DiT",
                        "batch-64 estimate FPDM/DiT"],
                       [[c["group"], c["batch"], c["params_ratio"], c["memory_ratio"], c["memory_measure"],
                         c["peak_rss_ratio"], c["peak_tensor_ratio"], c["saved_activation_ratio"], c["step_time_ratio"],
                         c["batch64_estimate_ratio"]] for c in comparisons]))
    print(f"paper: {PAPER['setting']}: FPDM {PAPER['fpdm_gb']} GB vs DiT {PAPER['dit_gb']} GB "
          f"(ratio {PAPER['ratio_fpdm_over_dit']})")
    if sweep:
        print()
        print(format_table(["group", "n (no-grad)", "m", "peak RSS MB", "peak - baseline MB", "saved activations MB",
                            "step s"] + (["CUDA max alloc MB"] if cuda else []),
                           [[r["group"], r["n"], r["m"], r["peak_rss_mb"], r["peak_minus_baseline_mb"],
                             r["saved_activation_mb"], r["step_time_s"]] + ([r.get("cuda_max_allocated_mb")] if cuda
                                                                            else []) for r in sweep]))
    if ckpt_summary:
        print()
        print(format_table(["group", "grad checkpointing", "n, m", "peak tensor MB", "saved activations MB",
                            "peak - baseline MB", "step s"],
                           [[r["group"], r["grad_checkpointing"], f"{r['n']}, {r['m']}", r["peak_tensor_mb"],
                             r["saved_activation_mb"], r["peak_minus_baseline_mb"], r["step_time_s"]]
                            for r in checkpointing]))
        print(format_table([f"growth m = 0 -> {ckpt_summary['m']}", "plain MB", "checkpointed MB",
                            f"ratio (target <= {CHECKPOINT_TARGET})"],
                           [[k, g["plain_mb"], g["checkpointed_mb"], g["ratio"]]
                            for k, g in ckpt_summary["growth"].items()]))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every configuration in its own process, print tables, write JSON; returns the payload."""
    config = parse_config(MemoryConfig, __doc__, argv)
    device = config.device
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"

    pair_specs, sweep_specs = build_specs(config)
    ckpt_specs = checkpointing_specs(config)
    done: dict[tuple, dict[str, Any]] = {}
    started = time.perf_counter()

    def run(spec):
        key = spec_key(spec)
        if key not in done:
            print(f"[{time.perf_counter() - started:7.1f}s] running {spec}", flush=True)
            done[key] = run_in_fresh_process(spec, device, config.timeout)
        return {**done[key], "group": spec["group"]}

    pairs = [run(s) for s in pair_specs]
    sweep = [run(s) for s in sweep_specs]
    checkpointing = [run(s) for s in ckpt_specs]
    comparisons = compare_pairs(pairs)
    ckpt_summary = compare_checkpointing(checkpointing)
    print_tables(pairs, sweep, comparisons, checkpointing, ckpt_summary)
    payload = {"benchmark": "train_memory", "quick": config.quick, "device": device,
               "no_optimizer": config.no_optimizer, "pairs": pairs, "comparisons": comparisons, "n_sweep": sweep,
               "checkpointing": {"runs": checkpointing, "summary": ckpt_summary}, "paper": PAPER, "machine": machine_info(device),
               "total_runtime_s": time.perf_counter() - started}
    write_payload(config.out, payload)
    return payload


if __name__ == "__main__":
    cli.run(main)
