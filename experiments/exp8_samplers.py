"""Experiment 8 (issue #18): which settings of diffusers' multistep solvers bring 10 steps of the shipped digits DiT
closest to DDPM at 250 steps.

Every row samples the DiT with one sampler at --steps steps (the DDPM-250 row at 250), no guidance, and reports
digits-FID and classifier accuracy over the sampling seeds. The rows vary what the issue asks about: the timestep
spacing (default = even spacing from T-1, diffusers' "linspace"; trailing = Lin et al. 2023), the final step
(final_sigmas_type zero: the last update lands on sigma = 0 with a first-order step; sigma_min: it stops at the
smallest training noise level), lower-order final steps, the solver order, and clipping x0 to [-1, 1] (diffusers'
thresholding with sample_max_value 1; the issue's first measurement ran without it). Budget-matched FPDM/DiT
comparisons under each sampler are the sweep's table1 with --samplers.

    python -m experiments.exp8_samplers --out_dir experiments/results/samplers
    python -m experiments.exp8_samplers --quick --out_dir /tmp/exp8      # 16 samples at 3 and 4 steps
"""
from __future__ import annotations

from dataclasses import dataclass, replace

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
class Exp8Config(common.ExperimentConfig):
    """Flags of experiment 8."""
    dit_ckpt: str = flag(str(common.REPO_ROOT / "pretrained" / "dit-digits.safetensors"), "DiT weights sampled.")
    steps: int = flag(10, "Steps of every solver row (--quick: 3).")
    reference_steps: int = flag(250, "Steps of the DDPM reference row (--quick: 4).")
    seeds: int = flag(1, "Sampling seeds per row (image i of seed s: generator s * SEED_STRIDE + i).")
    num_samples: int = flag(1000, "Samples per FID evaluation (--quick: 16).")


def main(argv: list[str] | None = None) -> dict:
    """digits-FID of the DiT under each solver setting and of DDPM at the reference steps; writes exp8_samplers.json."""
    config, run = common.start(NAME, Exp8Config, __doc__, argv)
    if config.quick:
        config = replace(config, steps=3, reference_steps=4, num_samples=16)
    dit = common.load(config.dit_ckpt)
    evaluator = common.Evaluator(common.classifier_path("digits"), "digits")
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
    best = min(rows[:-1], key=lambda r: r["fid_mean"])
    payload = {"dit_ckpt": str(dit.path), "steps": config.steps, "reference_steps": config.reference_steps,
               "seeds": seeds, "num_samples": config.num_samples, "quick": config.quick,
               "evaluator": evaluator.describe(), "rows": rows, "best": best["label"],
               "best_fid": best["fid_mean"], "reference_fid": rows[-1]["fid_mean"]}
    common.write_result(run, payload)
    return payload


if __name__ == "__main__":
    cli.run(main)
