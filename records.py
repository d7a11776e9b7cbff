"""Records written beside samples and evaluations: the one JSON writer, setup.json contents, statistics of the
compute actually spent, per-timestep diagnostics (delta_t, paper Fig. 6b/c) with their plot, and JSON-lines logs.

Every JSON file other processes or later runs read is written atomically (checkpoint.atomic_write).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence

from checkpoint import atomic_write
from config import UserError, config_diff

if TYPE_CHECKING:
    from allocation import IterationPlan
    from sampling import TrajectoryStats

NEW_SAMPLER_FLAGS = {"sampler": None, "sampler_options": ""}  # SampleConfig fields added after setup.json existed
SETUP_FILE = "setup.json"  # written by sample.py / sample_ddp.py next to the samples; read by evaluate.py


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
    differences = config_diff(comparable(before), comparable(setup))
    if differences:
        raise UserError(f"{flag} {folder} holds images of a different setup (recorded != now: "
                        f"{'; '.join(differences[:8])}); pass another {flag}, or the same flags to continue it")


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line to `path` (creating the folder): logs that grow run after run."""
    line = json.dumps(record, default=_json_default)
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
    write_json(path, payload)
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
