"""Shared helpers for the benchmark scripts (run from the repository root as `python -m benchmarks.<name>`): flags,
one-thread torch, machine description, tables and the JSON output."""
from __future__ import annotations

import os
import platform
import statistics
from dataclasses import field
from pathlib import Path
from typing import Any, Sequence

from config import UserError, build_config, parse_flags

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"


#################################################################################
#                                     Flags                                     #
#################################################################################

def option(default: Any, help: str) -> Any:
    """A dataclass field that is one benchmark flag (config.parse_flags reads the `help` metadata)."""
    return field(default=default, metadata={"help": help})


def require_at_least(config: Any, names: Sequence[str], low: int = 1) -> None:
    """Raise UserError naming the flag unless each field in `names` is None or >= `low`."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < low:
            raise UserError(f"--{name}: must be >= {low} (got {value})")


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
    """Write the results JSON (records.write_json) and say where."""
    from records import write_json  # here, not at the top: records imports torch (threads are limited first)
    write_json(path, payload)
    print(f"wrote {path}")
