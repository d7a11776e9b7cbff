"""Peak training memory and step time: DiT vs FPDM at the same batch and width (paper Sec. 4.1, Table 3).

Every configuration runs in a FRESH PROCESS (this script re-invoking itself with --worker), one at a time, so a
peak never leaks from one configuration into the next. Memory is measured three ways:
  * CPU: peak resident set size (resource.getrusage ru_maxrss), raw and minus the RSS measured right after the
    imports (the interpreter + torch baseline); RSS includes allocator slack, so it is indicative.
  * CUDA: torch.cuda.max_memory_allocated over the training steps (parameters, gradients, Adam state, activations).
  * Both: bytes of the tensors autograd saves for backward during one step (torch.autograd.graph.saved_tensors_hooks,
    unique storages, parameters excluded): the activation memory, deterministic and noise-free.
FPDM runs S-JFB (Algorithm 1) with the bounds pinned at their maxima n = N and m = M (the largest step training
ever takes: memory grows with m only); the n-sweep shows that the n no-grad iterations cost no memory.

    python benchmarks/train_memory.py                 # XL/2 (batch 2), S/2 (batch 8), Ti/2 (batch 64), n-sweeps
    python benchmarks/train_memory.py --quick         # Ti/2 only, one step (CI)
    python benchmarks/train_memory.py --skip_xl --no_optimizer
The paper: FPDM-XL/2 10.2 GB vs DiT-XL/2 25.2 GB (ratio 0.40) at batch 64 on a V100.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from bench_common import RESULTS_DIR, format_table, limit_threads, machine_info

RESULT_PREFIX = "TRAIN_MEMORY_RESULT "
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

def make_spec(group: str, model: str, fixed_point: bool, data: str, batch: int, steps: int, *,
              n: int = 12, m: int = 12, optimizer: bool = True) -> dict[str, Any]:
    """One configuration (a JSON-able dict handed to a worker process)."""
    return {"group": group, "model": model, "fixed_point": fixed_point, "data": data, "batch": batch,
            "steps": steps, "n": n if fixed_point else 0, "m": m if fixed_point else 0, "optimizer": optimizer}


def spec_key(spec: dict[str, Any]) -> tuple:
    """Identity of a configuration, ignoring its table group (so the same run is not repeated)."""
    return tuple(sorted((k, v) for k, v in spec.items() if k != "group"))


def build_specs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(DiT-vs-FPDM comparison specs, FPDM n-sweep specs) for the chosen mode."""
    opt = not args.no_optimizer
    sweep_n = [int(v) for v in args.sweep_n.split(",")] if args.sweep_n else ([0, 12] if args.quick else [0, 6, 12, 24])
    pairs: list[dict[str, Any]] = []
    if args.quick:
        steps = args.steps or 1
        for fp in (False, True):
            pairs.append(make_spec("Ti/2 digits 8x8", "DiT-Ti/2", fp, "digits8", 64, steps, optimizer=opt))
        sweep = [make_spec("n-sweep Ti/2 digits 8x8", "DiT-Ti/2", True, "digits8", 64, steps, n=n, optimizer=opt)
                 for n in sweep_n]
        return pairs, sweep
    if not args.skip_xl:
        for fp in (False, True):
            pairs.append(make_spec("XL/2 latents 32x32x4", "DiT-XL/2", fp, "latents32", args.xl_batch,
                                   args.xl_steps, optimizer=opt))
    steps = args.steps or 2
    for fp in (False, True):
        pairs.append(make_spec("S/2 latents 32x32x4", "DiT-S/2", fp, "latents32", args.s_batch, steps, optimizer=opt))
    for fp in (False, True):
        pairs.append(make_spec("Ti/2 digits 8x8", "DiT-Ti/2", fp, "digits8", 64, steps + 1, optimizer=opt))
    sweep = []
    for size in [s.strip() for s in args.sweep_sizes.split(",") if s.strip()]:
        if size not in ("S/2", "XL/2"):
            raise ValueError(f"--sweep_sizes: unknown size {size!r} (valid: S/2, XL/2)")
        if size == "XL/2" and args.skip_xl:
            continue
        batch, size_steps = (args.xl_batch, args.xl_steps) if size == "XL/2" else (args.s_batch, steps)
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


def run_worker(spec: dict[str, Any], device_name: str) -> dict[str, Any]:
    """Train `spec` for spec['steps'] steps in this (fresh) process; return memory and timing measurements."""
    limit_threads(1)
    import torch
    from config import ModelConfig
    from models import create_model

    device = torch.device(device_name)
    baseline_rss = current_rss_mb()          # interpreter + torch + library imports
    model_config = ModelConfig(model=spec["model"], fixed_point=spec["fixed_point"],
                               fixed_point_no_grad_max_iters=max(spec["n"], 0),
                               fixed_point_with_grad_max_iters=max(spec["m"], 1), **DATA[spec["data"]])
    torch.manual_seed(0)
    model = create_model(model_config).to(device)
    model.train()
    diffusion = model_config.create_diffusion("")  # all 1000 training timesteps, as train.py
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0) if spec["optimizer"] else None
    num_params = sum(p.numel() for p in model.parameters())
    built_rss = current_rss_mb()             # + parameters (+ empty optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    generator = torch.Generator().manual_seed(1)
    shape = (spec["batch"], model_config.in_channels, model_config.input_size, model_config.input_size)
    step_times, saved_bytes, losses = [], None, []
    for step in range(spec["steps"]):
        x = torch.randn(shape, generator=generator).to(device)
        y = torch.randint(0, model_config.num_classes, (spec["batch"],), generator=generator).to(device)
        t = torch.randint(0, diffusion.num_timesteps, (spec["batch"],), generator=generator).to(device)
        model_kwargs: dict[str, Any] = {"y": y}
        if model_config.fixed_point:  # S-JFB with (n, m) pinned: n no-grad iterations, then m backpropagated ones
            model_kwargs.update(num_no_grad_iters=spec["n"], num_iters=spec["m"])
        start = time.perf_counter()
        if step == 0:
            with SavedTensorBytes(model) as saved:
                loss = diffusion.training_losses(model, x, t, model_kwargs)["loss"].mean()
            saved_bytes = saved.total_bytes
        else:
            loss = diffusion.training_losses(model, x, t, model_kwargs)["loss"].mean()
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - start)
        losses.append(float(loss))

    result = {**spec, "device": device_name, "params": num_params,
              "baseline_rss_mb": baseline_rss, "post_build_rss_mb": built_rss, "peak_rss_mb": peak_rss_mb(),
              "saved_activation_mb": saved_bytes / 2**20, "step_times_s": step_times,
              "step_time_s": min(step_times[1:]) if len(step_times) > 1 else step_times[0], "losses": losses}
    result["peak_minus_baseline_mb"] = result["peak_rss_mb"] - baseline_rss
    if device.type == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


#################################################################################
#                                Orchestrator                                   #
#################################################################################

def run_in_fresh_process(spec: dict[str, Any], device: str, timeout: float) -> dict[str, Any]:
    """Run one configuration in a new Python process and parse its result line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--device", device]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"worker failed for {spec} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


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
            "saved_activation_ratio": fpdm["saved_activation_mb"] / dit["saved_activation_mb"],
            "step_time_ratio": fpdm["step_time_s"] / dit["step_time_s"],
            "batch64_estimate_mb": estimate,
            "batch64_estimate_ratio": estimate["fpdm"] / estimate["dit"],
        })
    return comparisons


def print_tables(pairs: list[dict[str, Any]], sweep: list[dict[str, Any]], comparisons: list[dict[str, Any]]) -> None:
    """Print the comparison and sweep tables (markdown)."""
    def name(r):
        return ("FPDM" if r["fixed_point"] else "DiT") + r["model"][3:]

    cuda = any("cuda_max_allocated_mb" in r for r in pairs + sweep)
    headers = ["group", "model", "batch", "n, m", "params", "peak RSS MB", "peak - baseline MB",
               "saved activations MB", "step s"] + (["CUDA max alloc MB"] if cuda else [])
    def row(r):
        values = [r["group"], name(r), r["batch"], f"{r['n']}, {r['m']}" if r["fixed_point"] else "-", r["params"],
                  r["peak_rss_mb"], r["peak_minus_baseline_mb"], r["saved_activation_mb"], r["step_time_s"]]
        return values + ([r.get("cuda_max_allocated_mb")] if cuda else [])
    print(format_table(headers, [row(r) for r in pairs]))
    print()
    print(format_table(["group", "batch", "params FPDM/DiT", "memory FPDM/DiT", "(measure)", "peak RSS FPDM/DiT",
                        "saved act. FPDM/DiT", "step time FPDM/DiT", "batch-64 estimate FPDM/DiT"],
                       [[c["group"], c["batch"], c["params_ratio"], c["memory_ratio"], c["memory_measure"],
                         c["peak_rss_ratio"], c["saved_activation_ratio"], c["step_time_ratio"],
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


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Ti/2 only, one step per configuration (CI).")
    parser.add_argument("--skip_xl", action="store_true", help="Skip the XL/2 pair (~11 GB each with AdamW).")
    parser.add_argument("--xl_batch", type=int, default=2, help="Batch size of the XL/2 pair.")
    parser.add_argument("--xl_steps", type=int, default=1, help="Training steps of the XL/2 runs (~1 min each on CPU).")
    parser.add_argument("--s_batch", type=int, default=8, help="Batch size of the S/2 pair and n-sweep.")
    parser.add_argument("--steps", type=int, default=0, help="Steps per configuration (0: 1 quick, else 2; Ti: +1).")
    parser.add_argument("--sweep_n", default="", help="Comma-separated no-grad iteration counts n (m fixed at 12).")
    parser.add_argument("--sweep_sizes", default="S/2,XL/2", help="Sizes of the FPDM n-sweep (S/2 at --s_batch, "
                        "XL/2 at --xl_batch; full mode only).")
    parser.add_argument("--no_optimizer", action="store_true", help="Forward + backward only (no AdamW state).")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    parser.add_argument("--timeout", type=float, default=3600, help="Seconds allowed per worker process.")
    parser.add_argument("--out", default=str(RESULTS_DIR / "train_memory.json"), help="JSON output path.")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: one configuration as JSON
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run every configuration in its own process, print tables, write JSON; returns the payload."""
    args = build_parser().parse_args(argv)
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda (got {args.device!r})")
    if args.worker:
        result = run_worker(json.loads(args.worker), args.device)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return None

    pair_specs, sweep_specs = build_specs(args)
    done: dict[tuple, dict[str, Any]] = {}
    started = time.perf_counter()

    def run(spec):
        key = spec_key(spec)
        if key not in done:
            print(f"[{time.perf_counter() - started:7.1f}s] running {spec}", flush=True)
            done[key] = run_in_fresh_process(spec, args.device, args.timeout)
        return {**done[key], "group": spec["group"]}

    pairs = [run(s) for s in pair_specs]
    sweep = [run(s) for s in sweep_specs]
    comparisons = compare_pairs(pairs)
    print_tables(pairs, sweep, comparisons)
    payload = {"benchmark": "train_memory", "quick": args.quick, "device": args.device,
               "no_optimizer": args.no_optimizer, "pairs": pairs, "comparisons": comparisons, "n_sweep": sweep,
               "paper": PAPER, "machine": machine_info(args.device),
               "total_runtime_s": time.perf_counter() - started}
    from records import write_json  # here, not at the top: records imports torch (threads are limited first)
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
