"""Experiment 4 (paper Fig. 6a/6b/6c): reusing the previous timestep's fixed-point solution (Sec. 3.3).

(a) At --budget block passes per image, digits-FID of the shipped FPDM with and without reuse across iterations
    per timestep (DDPM). (b, c) For one setting (--diag_iters), the per-timestep residual delta_t (relative residual
    of the last iteration, sampling.TrajectoryStats) and the residual after each iteration for a few timesteps, over
    10 batches of 32 images, with and without reuse. The per-batch diagnostics are also written with
    records.write_diagnostics to exp4_reuse_delta_{no_reuse,reuse}.json.

    python -m experiments.exp4_reuse
    python -m experiments.exp4_reuse --quick --out_dir /tmp/exp4
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np

import cli
import records
from experiments import common
from config import flag

NAME = "exp4_reuse"
DIAG_BATCH_SIZE = 32


@dataclass
class Exp4Config(common.CheckpointConfig):
    """Flags of experiment 4."""
    budget: Optional[int] = flag(None, "Block passes per image (None: 80, --quick 16).")
    iters: Optional[str] = flag(None, "Comma-separated iterations per step to sweep (None: 1,2,4,8,18; --quick 1,2).")
    diag_iters: Optional[int] = flag(None, "Iterations per step of the residual study (None: 4, --quick 2).")
    diag_batches: Optional[int] = flag(None, "Batches of 32 images for the residuals (None: 10, --quick 2).")


FULL = {"budget": 80, "iters": "1,2,4,8,18", "diag_iters": 4, "diag_batches": 10, "seeds": 2, "num_samples": 1000}
QUICK = {"budget": 16, "iters": "1,2", "diag_iters": 2, "diag_batches": 2, "seeds": 1, "num_samples": 16}


def main(argv: list[str] | None = None) -> dict:
    """FID with/without reuse across iterations per step, plus per-timestep residuals; JSON and plot."""
    config, run = common.start(NAME, Exp4Config, __doc__, argv, FULL, QUICK)
    fpdm, _ = common.load_models(config, run.out_dir)
    seeds = list(range(config.seeds))
    evaluator = common.Evaluator(config.classifier)
    setting = replace(common.EVALUATION_SAMPLING, budget=config.budget)
    sweep = []
    for k in common.fpdm_iteration_grid(fpdm.config, config.budget, common.int_list(config.iters, "iters")):
        row = {"iters": k}
        for reuse in (False, True):
            row["reuse" if reuse else "no_reuse"] = common.evaluate_setting(
                fpdm, evaluator, replace(setting, fixed_point_iters=k, fixed_point_reuse_solution=reuse),
                config.num_samples, seeds)
        row["num_steps"] = row["reuse"]["num_steps"]
        sweep.append(row)
        print(f"k={k} ({row['num_steps']} steps): no reuse {row['no_reuse']['fid_mean']:.2f}, "
              f"reuse {row['reuse']['fid_mean']:.2f}")

    diagnostics = {}
    for reuse in (False, True):
        drawn = common.generate(fpdm.model, fpdm.config, replace(
            setting, fixed_point_iters=config.diag_iters, fixed_point_reuse_solution=reuse, seed=0,
            num_samples=DIAG_BATCH_SIZE * config.diag_batches, batch_size=DIAG_BATCH_SIZE))
        label = "reuse" if reuse else "no_reuse"
        records.write_diagnostics(run.out_dir / f"{NAME}_delta_{label}.json", drawn.plan, drawn.trajectories,
                                  setup={"fpdm_ckpt": str(fpdm.path), "reuse": reuse}, plot=False)
        deltas = np.array([s.delta_per_step for s in drawn.trajectories], dtype=np.float64)  # (batches, steps)
        diagnostics[label] = {
            "timesteps": drawn.trajectories[0].timesteps,
            "delta_mean": deltas.mean(axis=0).tolist(), "delta_per_batch": deltas.tolist(),
            "residual_curves_batch0": drawn.trajectories[0].residuals_per_step,
            "mean_delta_over_timesteps": float(deltas.mean()),
        }
    no_reuse, reuse = np.array(diagnostics["no_reuse"]["delta_mean"]), np.array(diagnostics["reuse"]["delta_mean"])
    payload = {"budget": config.budget, "sampler": "ddpm", "seeds": seeds, "num_samples": config.num_samples,
               "fpdm_ckpt": str(fpdm.path), "quick": config.quick, "evaluator": evaluator.describe(), "sweep": sweep,
               "diag_iters": config.diag_iters, "diag_batches": config.diag_batches,
               "diag_batch_size": DIAG_BATCH_SIZE, "diagnostics": diagnostics,
               "fraction_timesteps_reuse_lowers_delta": float(np.mean(reuse < no_reuse)),
               "reuse_lowers_delta_at_first_step": bool(reuse[0] < no_reuse[0])}
    return common.finish(run, payload, lambda plt: plot(plt, sweep, diagnostics, config.budget, config.diag_iters))


def plot(plt: Any, sweep: list[dict], diagnostics: dict, budget: int, diag_iters: int) -> Any:
    """(a) FID vs iterations, with/without reuse; (b) delta_t per timestep; (c) residual vs iteration."""
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    ks = [r["iters"] for r in sweep]
    for key, style in (("no_reuse", "o--"), ("reuse", "s-")):
        common.fid_errorbar(axes[0], ks, [r[key] for r in sweep], style, label=key.replace("_", " "))
    common.log2_axis(axes[0], ks, "fixed-point iterations per timestep")
    common.finish_axis(axes[0], "digits-FID", f"(a) reuse vs no reuse, {budget} blocks/image")
    for key, color in (("no_reuse", "C0"), ("reuse", "C1")):
        d = diagnostics[key]
        for curve in d["delta_per_batch"]:
            axes[1].plot(d["timesteps"], curve, color=color, alpha=0.25, linewidth=0.8)
        axes[1].plot(d["timesteps"], d["delta_mean"], color=color, linewidth=2, label=key.replace("_", " "))
        curves = d["residual_curves_batch0"]
        chosen = np.linspace(0, len(curves) - 1, min(5, len(curves))).round().astype(int)
        for j, i in enumerate(chosen):
            axes[2].plot(range(1, len(curves[i]) + 1), curves[i], color=color, alpha=0.4 + 0.6 * j / len(chosen),
                         marker=".", label=f"{key.replace('_', ' ')}, t={d['timesteps'][i]}")
    axes[1].set_yscale("log")
    axes[1].invert_xaxis()
    axes[1].set_xlabel("timestep t (sampling runs right to left)")
    common.finish_axis(axes[1], "delta_t (last relative residual)",
                       f"(b) delta_t per timestep, k={diag_iters} "
                       f"({len(diagnostics['reuse']['delta_per_batch'])} batches x {DIAG_BATCH_SIZE})")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("iteration")
    common.finish_axis(axes[2], "relative residual", "(c) convergence within a timestep (batch 0)", fontsize=6, ncol=2)
    return figure


if __name__ == "__main__":
    cli.run(main)
