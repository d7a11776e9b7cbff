"""Experiment 8 (issue #18): which settings of diffusers' multistep solvers bring 10 steps of the shipped digits DiT
closest to DDPM at 250 steps.

Every row samples the DiT with one sampler at --steps steps (the DDPM-250 row at 250), no guidance, and reports
digits-FID and classifier accuracy over the sampling seeds. The rows vary what the issue asks about: the timestep
spacing (default = even spacing from T-1, diffusers' "linspace"; trailing = Lin et al. 2023), the final step
(final_sigmas_type zero: the last update lands on sigma = 0 with a first-order step; sigma_min: it stops at the
smallest training noise level), lower-order final steps, the solver order, and clipping x0 to [-1, 1] (diffusers'
thresholding with sample_max_value 1; the issue's first measurement ran without it). Budget-matched FPDM/DiT
comparisons under each sampler are experiment 2 with --samplers.

    python -m experiments.exp8_samplers
    python -m experiments.exp8_samplers --quick --out_dir /tmp/exp8
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import cli
from config import flag
from experiments import common

NAME = "exp8_samplers"
# (label, --sampler, --timestep_spacing, --sampler_options): the settings compared at --steps steps.
SETTINGS = [
    ("ddpm", "ddpm", "default", ""),
    ("ddim, trailing", "ddim", "trailing", ""),
    ("dpm++2m, trailing, no clipping (the issue's run)", "dpm++2m", "trailing", "thresholding=False"),
    ("dpm++2m, trailing", "dpm++2m", "trailing", ""),
    ("dpm++2m, trailing, final sigma_min", "dpm++2m", "trailing", "final_sigmas_type=sigma_min"),
    ("dpm++2m, trailing, final sigma_min, euler at final", "dpm++2m", "trailing",
     "final_sigmas_type=sigma_min,euler_at_final=True"),
    ("dpm++2m, default spacing", "dpm++2m", "default", ""),
    ("dpm++2m, default spacing, final sigma_min", "dpm++2m", "default", "final_sigmas_type=sigma_min"),
    ("dpm++3m, trailing", "dpm++2m", "trailing", "solver_order=3"),
    ("dpm++3m, trailing, no lower-order final", "dpm++2m", "trailing", "solver_order=3,lower_order_final=False"),
    ("unipc, trailing", "unipc", "trailing", ""),
    ("unipc, default spacing", "unipc", "default", ""),
    ("euler, trailing", "euler", "trailing", ""),
]


@dataclass
class Exp8Config(common.CheckpointConfig):
    """Flags of experiment 8."""
    steps: Optional[int] = flag(None, "Steps of every solver row (None: 10, --quick 3).")
    reference_steps: Optional[int] = flag(None, "Steps of the DDPM reference row (None: 250, --quick 4).")


FULL = {"steps": 10, "reference_steps": 250, "seeds": 2, "num_samples": 1000}
QUICK = {"steps": 3, "reference_steps": 4, "seeds": 1, "num_samples": 16}


def main(argv: list[str] | None = None) -> dict:
    """digits-FID of the DiT under each solver setting and of DDPM at the reference steps; JSON and plot."""
    config, run = common.start(NAME, Exp8Config, __doc__, argv, FULL, QUICK)
    _, dit = common.load_models(config, run.out_dir)
    evaluator = common.Evaluator(config.classifier)
    seeds = list(range(config.seeds))
    rows = []
    for label, sampler, spacing, options in [*SETTINGS, (f"ddpm-{config.reference_steps}", "ddpm", "default", "")]:
        steps = config.reference_steps if label.startswith("ddpm-") else config.steps
        setting = replace(common.EVALUATION_SAMPLING, sampler=sampler, timestep_spacing=spacing,
                          sampler_options=options, num_sampling_steps=steps)
        result = common.evaluate_setting(dit, evaluator, setting, config.num_samples, seeds)
        rows.append({"label": label, "timestep_spacing": spacing, "sampler_options": options, **result})
        print(f"{label} ({steps} steps): FID {result['fid_mean']:.2f} ± {result['fid_std']:.2f}, "
              f"accuracy {result['accuracy_mean']:.3f}")
    reference = rows[-1]
    best = min(rows[:-1], key=lambda r: r["fid_mean"])
    payload = {"dit_ckpt": str(dit.path), "steps": config.steps, "reference_steps": config.reference_steps,
               "seeds": seeds, "num_samples": config.num_samples, "quick": config.quick,
               "evaluator": evaluator.describe(), "rows": rows, "best": best["label"],
               "best_fid": best["fid_mean"], "reference_fid": reference["fid_mean"]}
    return common.finish(run, payload, lambda plt: plot(plt, rows, config.steps))


def plot(plt: Any, rows: list[dict], steps: int) -> Any:
    """Horizontal bars of digits-FID per setting, the reference row dashed."""
    figure, axis = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    solver_rows = rows[:-1]
    axis.barh(range(len(solver_rows)), [r["fid_mean"] for r in solver_rows],
              xerr=[r["fid_std"] for r in solver_rows], color="C0")
    axis.set_yticks(range(len(solver_rows)), [r["label"] for r in solver_rows], fontsize=7)
    axis.axvline(rows[-1]["fid_mean"], color="C3", linestyle="--", label=rows[-1]["label"])
    axis.invert_yaxis()
    common.finish_axis(axis, "", f"Exp. 8: the digits DiT at {steps} steps", fontsize=8)
    axis.set_xlabel("digits-FID (lower is better)")
    return figure


if __name__ == "__main__":
    cli.run(main)
