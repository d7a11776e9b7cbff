"""Shared helpers for the benchmark scripts (run from the repository root as `python -m benchmarks.<name>`): flags,
one-thread torch, machine description, tables and the JSON output."""
from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

from config import UserError, build_config, parse_flags

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"


#################################################################################
#                                     Flags                                     #
#################################################################################



def require_at_least(config: Any, names: Sequence[str], low: int = 1) -> None:
    """Raise UserError naming the flag unless each field in `names` is None or >= `low`."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < low:
            raise UserError(f"--{name}: must be >= {low} (got {value})")


def parse_sizes(sizes: Optional[str], quick: bool, known: Sequence[str]) -> list[str]:
    """--sizes as a list (None: Ti/2-digits, and S/2-latents unless --quick); UserError naming an unknown size."""
    if sizes is None:
        return ["Ti/2-digits"] if quick else ["Ti/2-digits", "S/2-latents"]
    chosen = [s.strip() for s in sizes.split(",") if s.strip()]
    for size in chosen:
        if size not in known:
            raise UserError(f"--sizes: unknown size {size!r}; valid: {', '.join(known)}")
    return chosen


def parse_config(cls: type, doc: str, argv: Sequence[str] | None) -> Any:
    """The validated `cls` from `argv` (the flags are its fields; --help shows `doc`)."""
    return build_config(cls, parse_flags(doc, [cls], argv)).validate()


#################################################################################
#                                Process setup                                  #
#################################################################################

def limit_threads(num_threads: int = 1) -> None:
    """Use `num_threads` intra-op threads (the machines are shared: one thread by default)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(num_threads))
    import torch
    torch.set_num_threads(num_threads)


def synchronize(device: Any) -> None:
    """Wait for queued device work (no-op on the CPU)."""
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """A short description of where the numbers were measured."""
    import torch
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": device,
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


#################################################################################
#                                   Output                                      #
#################################################################################

def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median and spread (min, max, relative half-range) of repeated measurements."""
    values = sorted(float(v) for v in values)
    median = statistics.median(values)
    return {"median": median, "min": values[0], "max": values[-1],
            "spread_pct": 100.0 * (values[-1] - values[0]) / (2 * median) if median else 0.0, "n": len(values)}


def write_payload(path: str | Path, payload: dict[str, Any]) -> None:
    """Write the results JSON (records.write_record: paths relative to the repository) and say where."""
    from records import write_record  # here, not at the top: records imports torch (threads are limited first)
    write_record(path, payload)
    print(f"wrote {path}")


#################################################################################
#                          One training step (train_*.py)                       #
#################################################################################

def training_batch(model_config: Any, batch: int, generator: Any, device: Any) -> tuple[Any, Any, Any]:
    """Random (x (N, C, H, W), y (N,), t (N,)) of the model's shape (training speed and memory do not depend on the
    values)."""
    import torch
    shape = (batch, model_config.in_channels, model_config.input_size, model_config.input_size)
    x = torch.randn(shape, generator=generator).to(device)
    y = torch.randint(0, max(model_config.num_classes, 1), (batch,), generator=generator).to(device)
    t = torch.randint(0, model_config.diffusion_steps, (batch,), generator=generator).to(device)
    return x, y, t


def training_step(model: Any, diffusion: Any, optimizer: Any, batch: tuple[Any, Any, Any],
                  sjfb_iters: tuple[int, int] | None) -> float:
    """One step of train.py's loss (diffusion.training_losses), backward and AdamW (None: gradients only).

    sjfb_iters pins S-JFB's draws (n no-grad, m backpropagated iterations) for an FPDM; None for a DiT.
    """
    x, y, t = batch
    model_kwargs: dict[str, Any] = {"y": y}
    if sjfb_iters is not None:
        model_kwargs["num_no_grad_iters"], model_kwargs["num_iters"] = sjfb_iters
    loss = diffusion.training_losses(model, x, t, model_kwargs)["loss"].mean()
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return float(loss.detach())


class PeakTensorBytes:
    """Context manager tracking the peak bytes of live tensor storages created inside it, at every operator
    (a TorchDispatchMode; backward and checkpoint recomputation included). Storages of the given parameters are
    ignored (their views, e.g. a transposed weight, are not new memory). On the CPU this is the analogue of
    torch.cuda.max_memory_allocated: deterministic, free of allocator slack."""

    def __init__(self, parameters: Any = ()):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self.live_bytes = 0
        self.peak_bytes = 0
        self._ignored = {p.untyped_storage().data_ptr() for p in parameters}
        self._finalizers: dict[int, Any] = {}

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._record(out)
                return out

        self._mode = _Mode()

    def _release(self, key: int, nbytes: int) -> None:
        self._finalizers.pop(key, None)
        self.live_bytes -= nbytes

    def _record(self, out: Any) -> None:
        import weakref
        import torch
        from torch.utils._pytree import tree_leaves
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()   # one Python object per storage (kept while the storage lives)
            key = id(storage)
            if key in self._finalizers or storage.data_ptr() in self._ignored:
                continue
            nbytes = storage.nbytes()
            self._finalizers[key] = weakref.finalize(storage, self._release, key, nbytes)
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def __enter__(self) -> "PeakTensorBytes":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._mode.__exit__(*exc)
