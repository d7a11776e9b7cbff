"""One prepared GPU check (issue #21): the paper's memory claim, bf16 training speed, sampling precisions and the
CUDA-only paths, in one command that fits a short loan of a GPU.

    python -m benchmarks.gpu                  # on the GPU: writes benchmarks/results/gpu_<device>.json
    python -m benchmarks.gpu --quick          # toy sizes, any device (the CPU test runs this)
    python -m benchmarks.gpu --parts sampling,cuda_paths --part_seconds 60

Four parts, run in this order; each stops at its time limit (--part_seconds) and keeps what it measured, and the
JSON is rewritten (atomically) after every part, so a killed run keeps the parts it finished. Every part is marked
done, timed_out, failed (with the error) or skipped (with the reason); CUDA-only figures are null with a reason off
CUDA. Estimated H200 time of the full run (limits in brackets):

  memory       ~75 s [90 s]   FPDM-XL/2 (1 + 1, configs/imagenet256_fpdm_xl2.yaml) vs DiT-XL/2
                              (configs/imagenet256_dit_xl2.yaml) on synthetic 32x32x4 latents, batch 64, bf16
                              autocast, fused AdamW and the EMA, through training.py's setup_state and train_step as
                              train.py runs them: peak torch.cuda.max_memory_allocated for the DiT, the FPDM with its
                              S-JFB draws pinned at n = N = 12, m = M = 12, and the FPDM at its S-JFB draws, each with
                              and without --grad_checkpointing (paper: 10.2 GB vs 25.2 GB). Off CUDA the figure is the
                              peak of live tensor bytes (bench_common.PeakTensorBytes) of the first step.
  train_speed  ~150 s [180 s] images/s and model FLOP utilisation (2 x cost.training_macs_per_image, which already
                              counts a backward as two forwards: the MACs x 2 x 3 of the issue, against the device's
                              dense bf16 peak), eager and --compile, DiT and FPDM at n = m = 12; FPDM/DiT ratios.
                              Most of it is the inductor builds of the two compiled runs (the FPDM's is last).
  sampling     ~70 s [90 s]   sampling_throughput.measure_size at XL/2, 10 steps (280 blocks per image) in fp32, tf32
                              and bf16: images/s of the DiT, the FPDM at equal blocks and at equal GMACs, and the
                              FPDM/DiT ratios; the residual floor of the fixed-point iteration in fp32 and bf16 (the
                              trained pretrained/fpdm-mnist5k.safetensors, 40 iterations per step, no reuse).
  cuda_paths   ~70 s [100 s]  a 1-GPU `torchrun --nproc_per_node 1 sample_ddp.py` (NCCL; gloo off CUDA), then
                              `pytest -m cuda tests` (tests/test_cuda.py; one inductor build).
Total ~6.1 min (at most 7.7 min by the limits, plus start-up), so a second try fits in 15 minutes of device time.
--quick runs Ti/2 on 8x8x4 latents, batch 4, sampling Ti/2 digits at 2 steps, and runs the compiled variants under
torch.compiler's force_eager stance off CUDA (the --compile code path without an inductor build).
"""
from __future__ import annotations

import contextlib
import gc
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import cli
from benchmarks.bench_common import (REPO, RESULTS_DIR, limit_threads, machine_info, parse_config,
                                     require_at_least, summarize, synchronize, training_batch, write_payload)
from benchmarks.train_memory import PAPER
from config import UserError, flag

PARTS = ("memory", "train_speed", "sampling", "cuda_paths")
PART_SECONDS = {"memory": 90.0, "train_speed": 180.0, "sampling": 90.0, "cuda_paths": 100.0}
QUICK_PART_SECONDS = 300.0
PRESETS = {False: REPO / "configs" / "imagenet256_dit_xl2.yaml", True: REPO / "configs" / "imagenet256_fpdm_xl2.yaml"}
QUICK_MODEL = {"model": "DiT-Ti/2", "image_size": 64}                     # 8x8x4 latents
PINNED_SJFB = {"fixed_point_no_grad_min_iters": 12, "fixed_point_no_grad_max_iters": 12,
               "fixed_point_with_grad_min_iters": 12, "fixed_point_with_grad_max_iters": 12}
# Dense bf16 tensor-core peaks (FLOP/s), matched in order against the device name.
PEAK_BF16_FLOPS = (("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100", 989.4e12), ("A100", 312.0e12))
RESIDUAL_CKPT = "pretrained/fpdm-mnist5k.safetensors"
DDP_CKPT = "pretrained/fpdm-digits.safetensors"
PRECISIONS = ("fp32", "tf32", "bf16")


class PartTimeout(Exception):
    """A part ran past its time limit."""


#################################################################################
#                                     Flags                                     #
#################################################################################

@dataclass
class GpuConfig:
    """Flags of the prepared GPU check."""
    quick: bool = flag(False, "Toy sizes (Ti/2, batch 4, 2 timed steps, 2 sampling steps) on any device: the CPU test.")
    parts: str = flag(",".join(PARTS), "Comma-separated parts to run (in the fixed order memory, train_speed, "
                                       "sampling, cuda_paths).")
    part_seconds: Optional[float] = flag(None, "Time limit of every part in seconds (None: memory 90, train_speed "
                                                "180, sampling 90, cuda_paths 100; --quick 300).")
    batch: Optional[int] = flag(None, "Training batch of the memory and speed parts (None: 64; --quick 4).")
    steps: Optional[int] = flag(None, "Timed training steps per speed run, after warm-up (None: 10; --quick 2).")
    sample_batch: Optional[int] = flag(None, "Images per sampling batch (None: 32; --quick 4).")
    out: Optional[str] = flag(None, "JSON output (None: benchmarks/results/gpu_<device>.json).")

    def validate(self) -> "GpuConfig":
        """Known parts, positive limit and counts; returns self."""
        require_at_least(self, ("batch", "steps", "sample_batch"))
        unknown = [p for p in self.part_list() if p not in PARTS]
        if unknown or not self.part_list():
            raise UserError(f"--parts: unknown or no parts {unknown} (valid: {', '.join(PARTS)})")
        if self.part_seconds is not None and not self.part_seconds > 0:
            raise UserError(f"--part_seconds: must be > 0 (got {self.part_seconds})")
        return self

    def part_list(self) -> list[str]:
        """The parts asked for."""
        return [p.strip() for p in self.parts.split(",") if p.strip()]

    def limit(self, part: str) -> float:
        """Seconds allowed to `part`."""
        if self.part_seconds is not None:
            return self.part_seconds
        return QUICK_PART_SECONDS if self.quick else PART_SECONDS[part]

    def sizes(self) -> dict[str, int]:
        """Batch, timed steps and sampling batch after the --quick defaults."""
        return {"batch": self.batch or (4 if self.quick else 64), "steps": self.steps or (2 if self.quick else 10),
                "sample_batch": self.sample_batch or (4 if self.quick else 32)}


#################################################################################
#                         Device, paths and the record                          #
#################################################################################

def device_name() -> str:
    """The GPU's name, or 'cpu'."""
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def default_out(name: str) -> Path:
    """benchmarks/results/gpu_<device>.json, the device name in lower case with runs of other characters as '_'."""
    return RESULTS_DIR / f"gpu_{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')}.json"


def shown(value: str) -> str:
    """An argument as recorded: a path inside the repository relative to it, another absolute path by its name."""
    if not value.startswith("/"):
        return value
    path = Path(value).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else f"<outside the repository>/{path.name}"


def relative_text(text: str) -> str:
    """Text (a traceback) with the repository and the Python installation's absolute paths shortened."""
    for prefix, label in ((str(REPO) + "/", ""), (sys.prefix, "<python>"), (sys.base_prefix, "<python>")):
        text = text.replace(prefix, label)
    return text


def versions() -> dict[str, Any]:
    """torch, CUDA, cuDNN and NCCL versions (None off CUDA) and the device's name, capability and memory."""
    import torch
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": None, "nccl": None,
                            "device": device_name(), "capability": None, "memory_gb": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(cudnn=torch.backends.cudnn.version(), capability=f"{props.major}.{props.minor}",
                    memory_gb=props.total_memory / 1e9,
                    nccl=nccl_version())
    return info


def nccl_version() -> Optional[str]:
    """NCCL's version as text (torch gives a tuple, older versions an int), None without NCCL."""
    import torch
    if not torch.distributed.is_nccl_available():
        return None
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def peak_bf16_flops(name: str) -> tuple[Optional[float], Optional[str]]:
    """(dense bf16 peak FLOP/s, None) of a known device, else (None, why)."""
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops, None
    return None, f"no bf16 peak known for {name!r} (known: {', '.join(k for k, _ in PEAK_BF16_FLOPS)})"


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    """num / den, None when either is missing or den is 0."""
    return num / den if num is not None and den else None


#################################################################################
#                           Parts and their time limits                         #
#################################################################################

@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise PartTimeout in the main thread once `seconds` have passed (SIGALRM; a subprocess is killed)."""
    def expire(signum: int, frame: Any) -> None:
        raise PartTimeout(f"ran past its limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_part(fn: Callable[[GpuConfig, dict[str, Any]], None], config: GpuConfig, limit: float) -> dict[str, Any]:
    """Run fn(config, part) under `limit` seconds; fn fills `part` as it goes, so a timed-out part keeps its
    figures. Returns part with its status (done / timed_out / failed, or skipped set by fn), limit and seconds."""
    part: dict[str, Any] = {"status": "running", "limit_s": limit}
    started = time.perf_counter()
    try:
        with time_limit(limit):
            fn(config, part)
        if part["status"] == "running":
            part["status"] = "done"
    except PartTimeout as error:
        part.update(status="timed_out", reason=str(error))
    except Exception as error:  # noqa: BLE001 -- one failing part must not cost the others their device time
        part.update(status="failed", error=relative_text(f"{type(error).__name__}: {error}"),
                    traceback=relative_text(traceback.format_exc())[-3000:])
    part["seconds"] = time.perf_counter() - started
    return part


def free_device_memory() -> None:
    """Drop unreferenced tensors and hand cached CUDA blocks back, so the next run's peak starts from nothing."""
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


#################################################################################
#                          Training runs (memory, speed)                        #
#################################################################################

def preset_configs(fixed_point: bool, quick: bool, overrides: dict[str, Any]) -> tuple[Any, Any]:
    """(ModelConfig, TrainConfig) of the paper's XL/2 preset (FPDM or DiT), toy-sized with --quick, with overrides."""
    from config import ModelConfig, TrainConfig, build_config, load_preset
    given = {**load_preset(PRESETS[fixed_point], ModelConfig, TrainConfig), **(QUICK_MODEL if quick else {}),
             **overrides}
    return build_config(ModelConfig, given).validate(), build_config(TrainConfig, given).validate()


@dataclass
class TrainSpec:
    """One training run: which model, S-JFB pinned at 12/12 or drawn, checkpointing, compile and how many steps."""
    label: str
    fixed_point: bool
    pinned: bool = True
    grad_checkpointing: bool = False
    compile: bool = False
    warmup: int = 0
    steps: int = 2


def compile_stance(quick: bool) -> contextlib.AbstractContextManager:
    """force_eager for --quick off CUDA (the compiled code path without an inductor build), else a no-op."""
    import torch
    if quick and not torch.cuda.is_available():
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()


def train_run(spec: TrainSpec, config: GpuConfig, track_tensors: bool) -> dict[str, Any]:
    """spec's warm-up then timed steps of training.train_step (bf16 autocast, AdamW, EMA) on a synthetic batch."""
    import torch
    from training import setup_processes, setup_state
    overrides = {"global_batch_size": config.sizes()["batch"], "mixed_precision": "bf16",
                 "grad_checkpointing": spec.grad_checkpointing, "compile": spec.compile, "global_seed": 0,
                 **(PINNED_SJFB if spec.pinned else {})}
    model_config, train_config = preset_configs(spec.fixed_point, config.quick, overrides)
    accelerator = setup_processes(train_config)
    state = setup_state(model_config, train_config, accelerator, None)
    try:
        with compile_stance(config.quick):
            return timed_steps(spec, state, model_config, train_config, accelerator, track_tensors)
    finally:
        accelerator.free_memory()
        del state
        free_device_memory()


def timed_steps(spec: TrainSpec, state: Any, model_config: Any, train_config: Any, accelerator: Any,
                track_tensors: bool) -> dict[str, Any]:
    """Run the steps: peak memory over all of them, time over those after the warm-up (device-synchronised)."""
    import torch
    from benchmarks.bench_common import PeakTensorBytes
    from training import train_step
    device = accelerator.device
    x, y, _ = training_batch(model_config, train_config.global_batch_size, torch.Generator().manual_seed(1), device)
    free_device_memory()
    times, iters, losses, tensor_peak = [], [], [], None
    for step in range(spec.warmup + spec.steps):
        synchronize(device)
        start = time.perf_counter()
        if step == 0 and track_tensors:
            with PeakTensorBytes(list(state.model.parameters()) + list(state.ema.parameters())) as peak:
                terms, drawn = train_step(state, x, y, model_config, train_config, accelerator)
            tensor_peak = peak.peak_bytes
        else:
            terms, drawn = train_step(state, x, y, model_config, train_config, accelerator)
        synchronize(device)
        if step >= spec.warmup:
            times.append(time.perf_counter() - start)
        iters.append(drawn)
        losses.append(terms["loss"].detach())
    return run_record(spec, state, model_config, train_config, accelerator, times, iters, losses, tensor_peak)


def run_record(spec: TrainSpec, state: Any, model_config: Any, train_config: Any, accelerator: Any,
               times: list[float], iters: list[Any], losses: list[Any], tensor_peak: Optional[int]) -> dict[str, Any]:
    """What a training run measured, with the settings that show which CUDA paths it took."""
    import torch
    from cost import training_macs_per_image
    cuda = accelerator.device.type == "cuda"
    params = list(state.model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params + list(state.ema.parameters()))
    macs = [training_macs_per_image(model_config, drawn) for drawn in iters[spec.warmup:]]
    step_s = summarize(times)
    return {"label": spec.label, "model": model_config.model, "fixed_point": spec.fixed_point,
            "grad_checkpointing": spec.grad_checkpointing, "compile": spec.compile, "batch":
            train_config.global_batch_size, "params": sum(p.numel() for p in params), "sjfb_iters": iters,
            "warmup_steps": spec.warmup, "step_s": step_s,
            "images_per_s": train_config.global_batch_size / step_s["median"],
            "train_gflops_per_image": 2 * sum(macs) / len(macs) / 1e9,
            "losses_finite": bool(torch.isfinite(torch.stack(losses)).all()),
            "cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "peak_tensor_mb": (param_bytes + tensor_peak) / 2**20 if tensor_peak is not None else None,
            "paths": {"device": str(accelerator.device), "autocast": accelerator.mixed_precision,
                      "tf32": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
                      "fused_adamw": bool(getattr(state.optimizer, "optimizer", state.optimizer).defaults.get("fused"))}}


#################################################################################
#                                 Part 1: memory                                #
#################################################################################

def memory_specs(config: GpuConfig) -> list[TrainSpec]:
    """DiT, FPDM at m = 12 and FPDM at its S-JFB draws, each without and with gradient checkpointing."""
    draws = 2 if config.quick else 6
    return [spec for ckpt in (False, True) for spec in (
        TrainSpec("DiT", False, grad_checkpointing=ckpt),
        TrainSpec("FPDM m=12", True, grad_checkpointing=ckpt),
        TrainSpec("FPDM S-JFB draws", True, pinned=False, grad_checkpointing=ckpt, steps=draws))]


def memory_part(config: GpuConfig, part: dict[str, Any]) -> None:
    """Peak memory of every memory spec; the FPDM/DiT ratios beside the paper's."""
    import torch
    cuda = torch.cuda.is_available()
    part.update(measure="cuda_max_allocated_mb" if cuda else "peak_tensor_mb", paper=PAPER, runs=[])
    if not cuda:
        part["skipped"] = {"cuda_max_allocated_mb": "no CUDA device (torch.cuda.max_memory_allocated is CUDA-only); "
                                                    "peak_tensor_mb (bench_common.PeakTensorBytes) stands in"}
    for spec in memory_specs(config):
        part["runs"].append(train_run(spec, config, track_tensors=not cuda))
        part["ratios"] = memory_ratios(part["runs"], part["measure"])


def memory_ratios(runs: list[dict[str, Any]], measure: str) -> dict[str, Any]:
    """FPDM / DiT of `measure` at each checkpointing setting, and checkpointed / plain per model."""
    pick = {(r["label"], r["grad_checkpointing"]): r[measure] for r in runs}
    ratios: dict[str, Any] = {}
    for ckpt in (False, True):
        suffix = " ckpt" if ckpt else ""
        for label in ("FPDM m=12", "FPDM S-JFB draws"):
            ratios[f"{label} / DiT{suffix}"] = ratio(pick.get((label, ckpt)), pick.get(("DiT", ckpt)))
    for label in ("DiT", "FPDM m=12", "FPDM S-JFB draws"):
        ratios[f"{label} ckpt / plain"] = ratio(pick.get((label, True)), pick.get((label, False)))
    return ratios


#################################################################################
#                              Part 2: training speed                           #
#################################################################################

def speed_part(config: GpuConfig, part: dict[str, Any]) -> None:
    """Images/s and MFU of DiT and FPDM (n = m = 12), eager then compiled; FPDM/DiT and compiled/eager ratios."""
    peak, why = peak_bf16_flops(device_name())
    part.update(peak_bf16_flops=peak, runs=[])
    if why:
        part["skipped"] = {"mfu": why}
    steps, warmup = config.sizes()["steps"], 1 if config.quick else 2
    for compiled in (False, True):
        for fixed_point in (False, True):
            spec = TrainSpec(("FPDM" if fixed_point else "DiT") + (" compiled" if compiled else " eager"),
                             fixed_point, compile=compiled, warmup=warmup, steps=steps)
            run = train_run(spec, config, track_tensors=False)
            run["mfu"] = ratio(run["images_per_s"] * run["train_gflops_per_image"] * 1e9, peak)
            part["runs"].append(run)
            part["ratios"] = speed_ratios(part["runs"])


def speed_ratios(runs: list[dict[str, Any]]) -> dict[str, Optional[float]]:
    """FPDM / DiT images/s per mode and compiled / eager images/s per model."""
    ips = {r["label"]: r["images_per_s"] for r in runs}
    return {"FPDM / DiT eager": ratio(ips.get("FPDM eager"), ips.get("DiT eager")),
            "FPDM / DiT compiled": ratio(ips.get("FPDM compiled"), ips.get("DiT compiled")),
            "DiT compiled / eager": ratio(ips.get("DiT compiled"), ips.get("DiT eager")),
            "FPDM compiled / eager": ratio(ips.get("FPDM compiled"), ips.get("FPDM eager"))}


#################################################################################
#                                 Part 3: sampling                              #
#################################################################################

def sampling_part(config: GpuConfig, part: dict[str, Any]) -> None:
    """Images/s per precision (sampling_throughput.measure_size), then the fixed-point residual floors."""
    import torch
    from benchmarks import sampling_throughput
    from training import set_tf32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_tf32(False, device)  # train_speed left TF32 on; sampling's --precision turns it on for tf32 batches only
    size, steps, repeats, bare = ("Ti/2-digits", 2, 1, 2) if config.quick else ("XL/2-latents", 10, 2, 5)
    part.update(size=size, steps=steps, batch=config.sizes()["sample_batch"], precisions={})
    for precision in PRECISIONS:
        run = sampling_throughput.measure_size(size, part["batch"], steps, repeats, bare, device, precision)
        part["precisions"][precision] = throughput_summary(run)
        free_device_memory()
    part["residual_floor"] = {}
    for precision in ("fp32", "bf16"):
        part["residual_floor"][precision] = residual_floor(precision, config.quick, device)
    floors = part["residual_floor"]
    floors["bf16 / fp32"] = ratio(floors["bf16"]["floor"], floors["fp32"]["floor"])


def throughput_summary(run: dict[str, Any]) -> dict[str, Any]:
    """Images/s, blocks and GMACs per image of DiT, FPDM (equal blocks) and FPDM@GMACs; ratios to the DiT."""
    from benchmarks.sampling_throughput import EQUAL_GMACS
    models = {**run["models"], EQUAL_GMACS: run["equal_gmacs"]["FPDM"]}
    summary = {label: {"images_per_s": run["batch"] / m["sample_s"]["median"], "blocks_per_image":
                       m["blocks_per_image"], "gmacs_per_image": m["gmacs_per_image"], "num_steps": m["num_steps"],
                       "iters_per_step": m["iters_per_step"]} for label, m in models.items()}
    dit = summary["DiT"]["images_per_s"]
    return {"precision": run["precision"], "models": summary,
            "fpdm_over_dit_images_per_s": {"equal_blocks": ratio(summary["FPDM"]["images_per_s"], dit),
                                           "equal_gmacs": ratio(summary[EQUAL_GMACS]["images_per_s"], dit)},
            "throughput": {k: v for k, v in run.items() if k != "models"}}


def residual_floor(precision: str, quick: bool, device: Any) -> dict[str, Any]:
    """Smallest relative residual ||f(z) - z|| / ||f(z)|| the fixed-point iteration reaches per step (median over
    steps) on the trained FPDM, sampling with many iterations per step and no solution reuse."""
    from config import SampleConfig
    from sampling import generate, load_sampling_model, prepare_sampling
    steps, iters, batch = (3, 12, 4) if quick else (10, 40, 16)
    model, model_config, _ = load_sampling_model(str(REPO / RESIDUAL_CKPT), device)
    sample_config = SampleConfig(num_sampling_steps=steps, fixed_point_iters=iters, cfg_scale=1.0,
                                 precision=precision)
    sample_config, plan, _ = prepare_sampling(model_config, sample_config, model, device)
    result = generate(model, model_config, sample_config, plan, list(range(batch)), seed=0, batch_size=batch,
                      device=device, keep_images=False)
    per_step = [min(r) for r in result.trajectories[0].residuals_per_step]
    return {"ckpt": RESIDUAL_CKPT, "precision": sample_config.precision, "steps": steps, "iters_per_step": iters,
            "batch": batch, "floor": summarize(per_step)["median"], "min_residual_per_step": per_step}


#################################################################################
#                                Part 4: CUDA paths                             #
#################################################################################

def cuda_paths_part(config: GpuConfig, part: dict[str, Any]) -> None:
    """A one-process torchrun of sample_ddp.py (NCCL on CUDA, else gloo), then the CUDA-marked tests (CUDA only)."""
    import torch
    part["sample_ddp"] = sample_ddp_run(config.quick)
    if torch.cuda.is_available():
        part["pytest_cuda"] = pytest_cuda()
    else:
        part["pytest_cuda"] = {"status": "skipped", "reason": "no CUDA device: the CUDA-marked tests would skip"}


def subprocess_env() -> dict[str, str]:
    """The environment for child processes: one thread, the repository importable, NCCL's version line printed."""
    import os
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "NCCL_DEBUG": "VERSION"}


def pytest_cuda() -> dict[str, Any]:
    """`python -m pytest -q -m cuda tests`: exit status and its summary line."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests"]
    proc = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    status = "done" if proc.returncode == 0 else "no tests" if proc.returncode == 5 else "failed"
    record = {"status": status, "command": "python -m pytest -q -m cuda tests", "returncode": proc.returncode,
              "summary": lines[-1] if lines else ""}
    if status == "failed":
        record["output_tail"] = relative_text(proc.stdout[-3000:] + proc.stderr[-1000:])
    return record


def sample_ddp_run(quick: bool) -> dict[str, Any]:
    """torchrun --nproc_per_node 1 sample_ddp.py on the bundled digits FPDM into a temporary folder."""
    import torch
    from records import read_json
    cuda = torch.cuda.is_available()
    args = ["--ckpt", DDP_CKPT, "--num_fid_samples", "8" if quick else "64", "--per_proc_batch_size",
            "4" if quick else "32", "--num_sampling_steps", "5" if quick else "50", "--cfg_scale", "1",
            "--shard_size", "32"]
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   str(REPO / "sample_ddp.py"), *args, "--sample_dir", tmp]
        started = time.perf_counter()
        proc = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
        seconds = time.perf_counter() - started
        setup = read_json(Path(tmp) / "setup.json", "--sample_dir") if proc.returncode == 0 else None
    output = proc.stdout + proc.stderr
    record = {"status": "done" if proc.returncode == 0 else "failed", "returncode": proc.returncode,
              "command": "torchrun --standalone --nproc_per_node 1 sample_ddp.py " + " ".join(args) +
              " --sample_dir <temporary folder>", "backend": "nccl" if cuda else "gloo",
              "nccl_version_line": next((line.strip() for line in output.splitlines() if "NCCL version" in line),
                                        None) if cuda else None, "seconds": seconds}
    if setup is not None:
        run = setup["runs"][-1]
        record.update(device=run["device"], precision=setup["setup"]["sample_config"]["precision"],
                      images=run["generated_now"], seconds_max_rank=run["seconds_max_rank"])
    else:
        record["output_tail"] = relative_text(output[-3000:])
    return record


#################################################################################
#                                      CLI                                      #
#################################################################################

PART_FUNCTIONS: dict[str, Callable[[GpuConfig, dict[str, Any]], None]] = {
    "memory": memory_part, "train_speed": speed_part, "sampling": sampling_part, "cuda_paths": cuda_paths_part}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the parts asked for, rewriting the JSON after each; returns the payload."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config = parse_config(GpuConfig, __doc__, argv)
    limit_threads(1)
    name = device_name()
    out = Path(config.out) if config.out else default_out(name)
    cli.check_writable_folder(out.parent, "--out")
    payload: dict[str, Any] = {
        "benchmark": "gpu", "command": " ".join(["python -m benchmarks.gpu", *map(shlex.quote, map(shown, argv))]),
        "quick": config.quick, "versions": versions(), "machine": machine_info("cuda" if name != "cpu" else "cpu"),
        "sizes": config.sizes(), "parts": {p: {"status": "skipped", "reason": "not in --parts"} for p in PARTS}}
    started = time.perf_counter()
    for part in PARTS:
        if part in config.part_list():
            print(f"[{time.perf_counter() - started:6.1f}s] {part} (limit {config.limit(part):g} s)", flush=True)
            payload["parts"][part] = run_part(PART_FUNCTIONS[part], config, config.limit(part))
            print(f"    {payload['parts'][part]['status']} in {payload['parts'][part]['seconds']:.1f} s", flush=True)
        payload["total_runtime_s"] = time.perf_counter() - started
        write_payload(out, payload)
    return payload


if __name__ == "__main__":
    cli.run(main)
