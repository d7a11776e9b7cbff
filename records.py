"""Records written beside samples and evaluations: the one JSON writer, setup.json contents, statistics of the
compute actually spent, per-timestep diagnostics (delta_t, paper Fig. 6b/c) with their plot, and JSON-lines logs.

Every JSON file other processes or later runs read is written atomically (checkpoint.atomic_write).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence

from checkpoint import atomic_write
from config import UserError, config_diff

if TYPE_CHECKING:
    from allocation import IterationPlan

NEW_SAMPLER_FLAGS = {"sampler": None, "sampler_options": ""}  # SampleConfig fields added after setup.json existed
SETUP_FILE = "setup.json"  # written by sample.py / sample_ddp.py next to the samples; read by evaluate.py
REPO_ROOT = Path(__file__).resolve().parent


def repo_relative(path: str | os.PathLike) -> str:
    """`path` relative to the repository root (records must not hold absolute paths: they move between machines)."""
    return os.path.relpath(os.path.abspath(path), REPO_ROOT)


@dataclass
class TrajectoryStats:
    """What one batch's trajectory spent, per step in sampling order (t = T-1 first). Per image: every image of a
    batch runs the same number of iterations."""
    timesteps: list[int] = field(default_factory=list)          # original diffusion timesteps visited
    iteration_caps: list[int] = field(default_factory=list)     # iterations allowed (plan or adaptive cap)
    iters_per_step: list[int] = field(default_factory=list)     # fixed-point iterations actually run
    blocks_per_step: list[int] = field(default_factory=list)    # block passes per image actually run
    macs_per_step: list[int] = field(default_factory=list)      # MACs per image actually run (cost.macs_per_step)
    residuals_per_step: list[list[float]] = field(default_factory=list)  # relative residual after each iteration
    reused_solution: list[bool] = field(default_factory=list)   # whether the step started from the previous solution

    @property
    def blocks_per_image(self) -> int:
        """Total transformer-block forward passes per image for this trajectory."""
        return sum(self.blocks_per_step)

    @property
    def macs_per_image(self) -> int:
        """Total multiply-accumulates per image for this trajectory (guidance's doubled rows included)."""
        return sum(self.macs_per_step)

    @property
    def delta_per_step(self) -> list[Optional[float]]:
        """The paper's delta_t (Fig. 6b/c): the residual of the last iteration at each step."""
        return [r[-1] if r else None for r in self.residuals_per_step]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "blocks_per_image": self.blocks_per_image, "macs_per_image": self.macs_per_image,
                "delta_per_step": self.delta_per_step}


#################################################################################
#                                 JSON files                                    #
#################################################################################

def _json_default(value: Any) -> Any:
    """numpy scalars/arrays and tensors as numbers/lists; anything else (paths, devices, dtypes) as text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def to_jsonable(value: Any) -> Any:
    """`value` as it reads back from a JSON file (tuples become lists, paths text, ...)."""
    return json.loads(json.dumps(value, default=_json_default))


# An absolute path in a string: a "/" that starts a token, then at least two components ("GMACs /s", "1/2" are not).
ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/-])/[^\s/\"',;)]+/[^\s\"',;)]*")


def record_root(record_path: str | os.PathLike) -> Path:
    """The folder a record's paths are relative to: the repository holding it (the nearest folder with .git), else
    the record's own folder. So a committed record means the same in every clone."""
    folder = Path(os.path.abspath(record_path)).parent
    return next((f for f in (folder, *folder.parents) if (f / ".git").exists()), folder)


def relative_paths(text: str, root: str | os.PathLike) -> str:
    """`text` with every absolute path written relative to `root`; relative paths stay as they are (idempotent)."""
    return ABSOLUTE_PATH.sub(lambda match: os.path.relpath(match.group(0), root), text)


def resolve_path(stored: str | os.PathLike, root: str | os.PathLike) -> Path:
    """A path read from a record whose paths are relative to `root` (record_root); old absolute ones as they are."""
    return Path(root) / stored


def portable(payload: Any, record_path: str | os.PathLike) -> Any:
    """`payload` as the record at `record_path` stores it: JSON types, paths relative to record_root."""
    return json.loads(relative_paths(json.dumps(payload, default=_json_default), record_root(record_path)))


def write_record(path: str | os.PathLike, payload: Any) -> Path:
    """write_json of a record that others read (results, setup.json): its paths relative to record_root(path)."""
    return write_json(path, portable(payload, path))


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write indented JSON atomically (creating the folder); returns the path."""
    text = json.dumps(payload, indent=2, default=_json_default) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return Path(path)


def read_json(path: str | os.PathLike, flag: str) -> Any:
    """Read a JSON file; a missing or malformed file is an error naming `flag` and the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: file not found: {path}")
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{flag}: {path} is not valid JSON ({error})") from error


def refuse_other_setup(folder: Path, setup: dict[str, Any], flag: str, image_files: Sequence[Path],
                       comparable: Callable[[Any], Any] = to_jsonable, noun: str = "image files") -> None:
    """Never let one sample folder hold images of two setups (sample.py, sample_ddp.py).

    UserError naming `flag` if `folder`'s setup.json records a setup whose `comparable` form differs from `setup`'s,
    or if it has no setup.json but holds `image_files` that nothing describes.
    """
    record_path = folder / SETUP_FILE
    if not record_path.is_file():
        if image_files:
            raise UserError(f"{flag} {folder} holds {len(image_files)} {noun} (e.g. "
                            f"{Path(image_files[0]).relative_to(folder)}) but no {SETUP_FILE} saying how they were "
                            f"made; pass another {flag}")
        return
    recorded = read_json(record_path, flag)
    before = recorded.get("setup", {}) if isinstance(recorded, dict) else {}
    # Both sides as stored, so a folder written with absolute paths (older versions) still compares equal.
    differences = config_diff(comparable(portable(before, record_path)), comparable(portable(setup, record_path)))
    if differences:
        raise UserError(f"{flag} {folder} holds images of a different setup (recorded != now: "
                        f"{'; '.join(differences[:8])}); pass another {flag}, or the same flags to continue it")


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line to `path` (creating the folder): logs that grow run after run."""
    line = relative_paths(json.dumps(record, default=_json_default), record_root(path))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(line + "\n")


def append_eval_record(path: str | os.PathLike, metrics: dict[str, Any], setup: dict[str, Any],
                       warnings: Sequence[str] = ()) -> dict[str, Any]:
    """Append {"time", "metrics", "setup", "warnings"} as one line of a JSON-lines file; returns the record."""
    record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "metrics": metrics, "setup": setup,
              "warnings": list(warnings)}
    append_jsonl(path, record)
    return record


#################################################################################
#                           Statistics and setups                               #
#################################################################################

def summarize_stats(plan: IterationPlan, trajectories: Sequence[TrajectoryStats],
                    images_per_trajectory: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Blocks per image actually spent (against the plan), mean iterations and delta_t per step."""
    if not trajectories:
        return {"num_batches": 0, "planned_blocks_per_image": plan.blocks_per_image}
    counts = list(images_per_trajectory or [1] * len(trajectories))
    blocks = [s.blocks_per_image for s in trajectories]
    total_images = sum(counts)
    mean_blocks = sum(b * c for b, c in zip(blocks, counts)) / total_images
    steps = len(trajectories[0].iters_per_step)
    mean_iters = [sum(s.iters_per_step[k] * c for s, c in zip(trajectories, counts)) / total_images
                  for k in range(steps)]
    deltas = [[d for d in (s.delta_per_step[k] for s in trajectories) if d is not None] for k in range(steps)]
    return {
        "num_batches": len(trajectories),
        "num_images": total_images,
        "planned_blocks_per_image": plan.blocks_per_image,
        "blocks_per_image_mean": mean_blocks,
        "blocks_per_image_min": min(blocks),
        "blocks_per_image_max": max(blocks),
        "within_budget": max(blocks) <= plan.blocks_per_image,
        "timesteps": trajectories[0].timesteps,
        "planned_iters_per_step": plan.iters_per_step,
        "mean_iters_per_step": mean_iters,
        "mean_delta_per_step": [sum(d) / len(d) if d else None for d in deltas],
    }


def sampling_setup(*, ckpt: str | Path, model_config: Any, config: Any, plan: IterationPlan,
                   notes: Sequence[str] = (), exclude: Iterable[str] = (), **extra: Any) -> dict[str, Any]:
    """The full setup to record beside samples: checkpoint, architecture, every sampling flag (but `exclude`), the
    plan, and `extra` entries."""
    import torch
    from schedulers import sampler_record
    # --sampler and --sampler_options left at their defaults are not listed, so the setup.json of a run made before
    # they existed still describes the same setup (the sampler is recorded by name below either way).
    excluded = set(exclude) | {name for name, default in NEW_SAMPLER_FLAGS.items() if getattr(config, name) == default}
    return {
        "checkpoint": str(Path(ckpt).resolve()),
        "model_config": asdict(model_config),
        "sample_config": {k: v for k, v in asdict(config).items() if k not in excluded},
        "plan": plan.to_dict(),
        **sampler_record(model_config, config),
        "notes": list(notes) + list(plan.notes),
        "torch": torch.__version__,
        **extra,
    }


def describe_plan(plan: IterationPlan) -> str:
    """One line saying what a plan spends."""
    if not plan.fixed_point:
        return f"DiT: {plan.num_steps} steps x {plan.depth} blocks = {plan.blocks_per_image} blocks per image"
    if plan.adaptive:
        return (f"FPDM adaptive: {plan.num_steps} steps, <= {plan.max_iters_per_step} iterations per step until the "
                f"relative residual <= {plan.fixed_point_tol}, budget {plan.blocks_per_image} blocks per image")
    iters = plan.iters_per_step
    shown = f"{iters[0]} iterations" if len(set(iters)) == 1 else f"{iters[0]}..{iters[-1]} iterations"
    return (f"FPDM {plan.schedule}: {plan.num_steps} steps, {shown} per step (+{plan.pre_depth} pre "
            f"+{plan.post_depth} post blocks) = {plan.blocks_per_image} blocks per image")


#################################################################################
#                                 Diagnostics                                   #
#################################################################################

def write_diagnostics(path: str | Path, plan: IterationPlan, trajectories: Sequence[TrajectoryStats],
                      setup: Optional[dict[str, Any]] = None, plot: bool = True,
                      max_curves: int = 10) -> Optional[Path]:
    """Per-timestep iterations and residuals (delta_t, Fig. 6b/c) to JSON; a plot beside it if matplotlib is there.

    delta_t is written for every batch, the full residual curves for the first `max_curves` batches (the paper
    plots 10 batches). Returns the plot's path (or None).
    """
    steps = []
    for k in range(plan.num_steps):
        steps.append({
            "step": k,
            "timestep": trajectories[0].timesteps[k] if trajectories else None,
            "iteration_cap": [s.iteration_caps[k] for s in trajectories],
            "iters": [s.iters_per_step[k] for s in trajectories],
            "delta_t": [s.delta_per_step[k] for s in trajectories],
            "residuals": [s.residuals_per_step[k] for s in trajectories[:max_curves]],
            "reused_solution": [s.reused_solution[k] for s in trajectories],
        })
    payload = {"plan": plan.to_dict(), "setup": setup or {}, "per_batch_blocks_per_image":
               [s.blocks_per_image for s in trajectories], "steps": steps}
    write_record(path, payload)
    if not plot or not trajectories or not plan.fixed_point:
        return None
    return plot_deltas(Path(path).with_suffix(".png"), plan, trajectories[:max_curves])


def plot_deltas(path: Path, plan: IterationPlan, trajectories: Sequence[TrajectoryStats]) -> Optional[Path]:
    """delta_t against t (log scale), one curve per batch; None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for b, s in enumerate(trajectories):
        points = [(t, d) for t, d in zip(s.timesteps, s.delta_per_step) if d is not None and d > 0]
        if points:
            axis.plot(*zip(*points), marker=".", alpha=0.7, label=f"batch {b}")
    axis.set_xlabel("timestep t")
    axis.set_ylabel("delta_t (last relative residual)")
    axis.set_yscale("log")
    axis.invert_xaxis()  # sampling runs from t = T-1 to 0
    axis.set_title(f"{plan.schedule} schedule, {plan.blocks_per_image} blocks/image")
    if len(trajectories) > 1:
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
