"""Experiment 6 (beyond the paper): Anderson acceleration vs plain fixed-point iteration at equal budgets.

The shipped FPDM is sampled with the same compute plans (same budget, timesteps and iterations per step; one
function evaluation = one block pass, so both solvers spend exactly the same block passes) with
--fixed_point_solver iteration and anderson (memory --anderson_memory), DDPM, no reuse. Reported: digits-FID,
classifier accuracy and the mean last relative residual delta_t (how well each solver converges per step).

    python -m experiments.exp6_anderson
    python -m experiments.exp6_anderson --quick --out_dir /tmp/exp6
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np

import cli
from experiments import common
from config import flag

NAME = "exp6_anderson"
SOLVERS = ("iteration", "anderson")


@dataclass
class Exp6Config(common.CheckpointConfig):
    """Flags of experiment 6."""
    budgets: Optional[str] = flag(None, "Comma-separated block budgets per image (None: 80, --quick 16).")
    iters: Optional[str] = flag(None, "Comma-separated iterations per step (None: 2,4,8,18; --quick 2,6).")
    anderson_memory: int = flag(5, "Anderson acceleration: number of past iterates mixed.")


FULL = {"budgets": "80", "iters": "2,4,8,18", "seeds": 2, "num_samples": 1000}
QUICK = {"budgets": "16", "iters": "2,6", "seeds": 1, "num_samples": 16}


def main(argv: list[str] | None = None) -> dict:
    """FID and residuals of both solvers across iterations per step at one budget; JSON and plot."""
    config, run = common.start(NAME, Exp6Config, __doc__, argv, FULL, QUICK)
    fpdm, _ = common.load_models(config, run.out_dir)
    budgets = common.int_list(config.budgets, "budgets")
    seeds = list(range(config.seeds))
    evaluator = common.Evaluator(config.classifier)
    rows = []
    for budget in budgets:
        for k in common.fpdm_iteration_grid(fpdm.config, budget, common.int_list(config.iters, "iters")):
            row = {"budget": budget, "iters": k}
            for solver in SOLVERS:
                setting = replace(common.EVALUATION_SAMPLING, budget=budget, fixed_point_iters=k,
                                  fixed_point_solver=solver, anderson_memory=config.anderson_memory)
                result = common.evaluate_setting(fpdm, evaluator, setting, config.num_samples, seeds,
                                                 keep_trajectories=True)
                deltas = np.array([s.delta_per_step for s in result.pop("_trajectories")], dtype=np.float64)
                result["mean_delta"] = float(np.nanmean(deltas))
                result["delta_per_step_mean"] = np.nanmean(deltas, axis=0).tolist()
                row[solver] = result
            row["num_steps"] = row["iteration"]["num_steps"]
            rows.append(row)
            print(f"budget {budget}, k={k}: iteration FID {row['iteration']['fid_mean']:.2f} "
                  f"(delta {row['iteration']['mean_delta']:.3g}) | anderson {row['anderson']['fid_mean']:.2f} "
                  f"(delta {row['anderson']['mean_delta']:.3g})")
    payload = {"budgets": budgets, "sampler": "ddpm", "reuse": False, "anderson_memory": config.anderson_memory,
               "seeds": seeds, "num_samples": config.num_samples, "fpdm_ckpt": str(fpdm.path), "quick": config.quick,
               "evaluator": evaluator.describe(), "rows": rows}
    return common.finish(run, payload, lambda plt: plot(plt, rows))


def plot(plt: Any, rows: list[dict]) -> Any:
    """FID and mean delta_t against iterations per step, one line per solver (and budget)."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for budget in sorted({r["budget"] for r in rows}):
        chosen = [r for r in rows if r["budget"] == budget]
        ks = [r["iters"] for r in chosen]
        for solver, style in zip(SOLVERS, ("o--", "s-")):
            common.fid_errorbar(axes[0], ks, [r[solver] for r in chosen], style, label=f"{solver}, {budget} blocks")
            axes[1].plot(ks, [r[solver]["mean_delta"] for r in chosen], style, label=f"{solver}, {budget} blocks")
    for axis in axes:
        common.log2_axis(axis, sorted({r["iters"] for r in rows}),
                         "fixed-point iterations per timestep (equal block budget)")
        axis.legend()
    axes[0].set_ylabel("digits-FID")
    axes[1].set_ylabel("mean delta_t (last relative residual)")
    axes[1].set_yscale("log")
    figure.suptitle("Exp. 6: Anderson acceleration vs plain iteration")
    return figure


if __name__ == "__main__":
    cli.run(main)
