"""Experiment 3 (paper Fig. 4): timestep smoothing at a fixed sampling budget.

At --budget block passes per image (default 80 = 10 steps of the 8-block DiT, the analogue of the paper's 280 =
10 steps of DiT-XL/2), the shipped FPDM runs k fixed-point iterations per step for k from 1 to many, so the number
of timesteps goes from budget // (k + 2) (many) to a few (1 pre + 1 post block per step; leftover blocks become
extra iterations, allocation.plan_iterations). DDPM, no solution reuse (pure smoothing; reuse is Exp. 4). The DiT
at the same budget is the reference point; in the paper's terms it corresponds to k = depth - 2 = 6
(cost.default_sampling_iters).

    python -m experiments.exp3_smoothing
    python -m experiments.exp3_smoothing --quick --out_dir /tmp/exp3
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import cli
from cost import default_sampling_iters
from experiments import common
from config import flag

NAME = "exp3_smoothing"


@dataclass
class Exp3Config(common.CheckpointConfig):
    """Flags of experiment 3."""
    budget: Optional[int] = flag(None, "Block passes per image (None: 80, --quick 16).")
    iters: Optional[str] = flag(None, "Comma-separated iterations per step to sweep (None: 1,2,3,4,6,8,18,38; "
                                        "--quick 1,6).")
    ddim: bool = flag(False, "Use DDIM instead of DDPM.")


FULL = {"budget": 80, "iters": "1,2,3,4,6,8,18,38", "seeds": 2, "num_samples": 1000}
QUICK = {"budget": 16, "iters": "1,6", "seeds": 1, "num_samples": 16}


def main(argv: list[str] | None = None) -> dict:
    """FPDM digits-FID across iterations per step at one budget, with the DiT point; JSON and plot."""
    config, run = common.start(NAME, Exp3Config, __doc__, argv, FULL, QUICK)
    fpdm, dit = common.load_models(config, run.out_dir)
    seeds = list(range(config.seeds))
    evaluator = common.Evaluator(config.classifier)
    setting = replace(common.EVALUATION_SAMPLING, budget=config.budget, ddim=config.ddim)
    points = []
    for k in common.fpdm_iteration_grid(fpdm.config, config.budget, common.int_list(config.iters, "iters")):
        result = common.evaluate_setting(fpdm, evaluator, replace(setting, fixed_point_iters=k), config.num_samples,
                                         seeds)
        points.append({"iters": k, **result})
        print(f"k={k}: {result['num_steps']} steps, FID {result['fid_mean']:.2f} ± {result['fid_std']:.2f}")
    dit_result = common.evaluate_setting(dit, evaluator, setting, config.num_samples, seeds)
    best = min(points, key=lambda p: p["fid_mean"])
    payload = {"budget": config.budget, "sampler": "ddim" if config.ddim else "ddpm", "reuse": False, "seeds": seeds,
               "num_samples": config.num_samples, "fpdm_ckpt": str(fpdm.path), "dit_ckpt": str(dit.path),
               "quick": config.quick, "evaluator": evaluator.describe(), "fpdm": points, "dit": dit_result,
               "best_iters": best["iters"], "best_fid": best["fid_mean"],
               "paper": {"budget": 280, "best_iters": "4-8", "dit_equivalent_iters": 26}}
    dit_iters = default_sampling_iters(fpdm.config)  # the FPDM step that costs one DiT step
    return common.finish(run, payload, lambda plt: plot(plt, points, dit_result, dit_iters, config.budget))


def plot(plt: Any, points: list[dict], dit: dict, dit_iters: int, budget: int) -> Any:
    """FID against iterations per step (top axis: timesteps), the DiT as a point and a dashed line."""
    figure, axis = plt.subplots(figsize=(6.5, 4))
    ks = [p["iters"] for p in points]
    common.fid_errorbar(axis, ks, points, "s-", label="FPDM (1 pre + k iters + 1 post per step)")
    for p in points:
        axis.annotate(f"{p['num_steps']} steps", (p["iters"], p["fid_mean"]), textcoords="offset points",
                      xytext=(3, 5), fontsize=7)
    common.fid_errorbar(axis, [dit_iters], [dit], "o", color="C3", label=f"DiT, 8 blocks x {dit['num_steps']} steps")
    axis.axhline(dit["fid_mean"], color="C3", linestyle="--", linewidth=1)
    common.log2_axis(axis, ks, "fixed-point iterations per timestep")
    common.finish_axis(axis, "digits-FID (lower is better)", f"Exp. 3: timestep smoothing at {budget} blocks/image",
                       fontsize=8)
    return figure


if __name__ == "__main__":
    cli.run(main)
