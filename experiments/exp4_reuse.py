"""Experiment 4 (paper Fig. 6a/6b/6c): reusing the previous timestep's fixed-point solution (Sec. 3.3).

(a) At --budget block passes per image, digits-FID of the shipped FPDM with and without reuse across iterations
    per timestep (DDPM). (b, c) For one setting (--diag_iters), the per-timestep residual delta_t (relative residual
    of the last iteration, sampling.TrajectoryStats) and the residual after each iteration for a few timesteps, over
    10 batches of 32 images, with and without reuse. The per-batch diagnostics are also written with
    records.write_diagnostics to exp4_reuse_delta_{no_reuse,reuse}.json.

    python experiments/exp4_reuse.py
    python experiments/exp4_reuse.py --quick --out_dir /tmp/exp4
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import records  # noqa: E402

NAME = "exp4_reuse"


def main(argv: list[str] | None = None) -> dict:
    """FID with/without reuse across iterations per step, plus per-timestep residuals; JSON and plot."""
    parser = common.base_parser(__doc__.splitlines()[0])
    common.add_checkpoint_flags(parser)
    parser.add_argument("--budget", type=int, default=None, help="Block passes per image.")
    parser.add_argument("--iters", default=None, help="Comma-separated iterations per step to sweep.")
    parser.add_argument("--diag_iters", type=int, default=None, help="Iterations per step of the residual study.")
    parser.add_argument("--diag_batches", type=int, default=None, help="Batches of 32 images for the residuals.")
    args = parser.parse_args(argv)
    out_dir = common.setup_run(args)
    fpdm_path, _ = common.resolve_checkpoints(args, out_dir)
    budget = common.pick(args, "budget", 80, 16)
    iters = [int(k) for k in common.pick(args, "iters", "1,2,4,8,18", "1,2").split(",")]
    diag_iters = common.pick(args, "diag_iters", 4, 2)
    diag_batches = common.pick(args, "diag_batches", 10, 2)
    seeds = list(range(common.pick(args, "seeds", 2, 1)))
    num_samples = common.pick(args, "num_samples", 1000, 16)

    evaluator = common.DigitsEvaluator(args.classifier)
    fpdm, fpdm_config = common.load_model(fpdm_path)
    sweep = []
    for k in common.fpdm_iteration_grid(budget, iters):
        row = {"iters": k}
        for reuse in (False, True):
            config = common.sample_config(budget=budget, iters=k, reuse=reuse)
            row["reuse" if reuse else "no_reuse"] = common.evaluate_setting(
                fpdm, fpdm_config, evaluator, config, num_samples, seeds)
        row["num_steps"] = row["reuse"]["num_steps"]
        sweep.append(row)
        print(f"k={k} ({row['num_steps']} steps): no reuse {row['no_reuse']['fid_mean']:.2f}, "
              f"reuse {row['reuse']['fid_mean']:.2f}")

    diagnostics = {}
    for reuse in (False, True):
        config = common.sample_config(budget=budget, iters=diag_iters, reuse=reuse)
        drawn = common.draw_samples(fpdm, fpdm_config, config, 32 * diag_batches, seed=0, batch_size=32)
        label = "reuse" if reuse else "no_reuse"
        records.write_diagnostics(out_dir / f"{NAME}_delta_{label}.json", drawn["plan"], drawn["trajectories"],
                                  setup={"fpdm_ckpt": str(fpdm_path), "reuse": reuse}, plot=False)
        trajectories = drawn["trajectories"]
        deltas = np.array([s.delta_per_step for s in trajectories], dtype=np.float64)  # (batches, steps)
        diagnostics[label] = {
            "timesteps": trajectories[0].timesteps,
            "delta_mean": deltas.mean(axis=0).tolist(), "delta_per_batch": deltas.tolist(),
            "residual_curves_batch0": trajectories[0].residuals_per_step,
            "mean_delta_over_timesteps": float(deltas.mean()),
        }
    no_reuse, reuse = np.array(diagnostics["no_reuse"]["delta_mean"]), np.array(diagnostics["reuse"]["delta_mean"])
    payload = {"budget": budget, "sampler": "ddpm", "seeds": seeds, "num_samples": num_samples,
               "fpdm_ckpt": str(fpdm_path), "quick": args.quick, "evaluator": evaluator.describe(), "sweep": sweep,
               "diag_iters": diag_iters, "diag_batches": diag_batches, "diag_batch_size": 32,
               "diagnostics": diagnostics,
               "fraction_timesteps_reuse_lowers_delta": float(np.mean(reuse < no_reuse)),
               "reuse_lowers_delta_at_first_step": bool(reuse[0] < no_reuse[0])}
    common.write_result(out_dir, NAME, payload)
    plot(out_dir, sweep, diagnostics, budget, diag_iters)
    return payload


def plot(out_dir: Path, sweep: list[dict], diagnostics: dict, budget: int, diag_iters: int) -> None:
    """(a) FID vs iterations, with/without reuse; (b) delta_t per timestep; (c) residual vs iteration."""
    plt = common.pyplot()
    if plt is None:
        return
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    ks = [r["iters"] for r in sweep]
    for key, style in (("no_reuse", "o--"), ("reuse", "s-")):
        axes[0].errorbar(ks, [r[key]["fid_mean"] for r in sweep], yerr=[r[key]["fid_std"] for r in sweep],
                         fmt=style, capsize=3, label=key.replace("_", " "))
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks(ks)
    axes[0].set_xticklabels([str(k) for k in ks])
    axes[0].set_xlabel("fixed-point iterations per timestep")
    axes[0].set_ylabel("digits-FID")
    axes[0].set_title(f"(a) reuse vs no reuse, {budget} blocks/image")
    axes[0].legend()
    for key, color in (("no_reuse", "C0"), ("reuse", "C1")):
        d = diagnostics[key]
        for b, curve in enumerate(d["delta_per_batch"]):
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
    axes[1].set_ylabel("delta_t (last relative residual)")
    axes[1].set_title(f"(b) delta_t per timestep, k={diag_iters} (10 batches x 32)")
    axes[1].legend()
    axes[2].set_yscale("log")
    axes[2].set_xlabel("iteration")
    axes[2].set_ylabel("relative residual")
    axes[2].set_title("(c) convergence within a timestep (batch 0)")
    axes[2].legend(fontsize=6, ncol=2)
    common.save_figure(figure, out_dir, NAME)


if __name__ == "__main__":
    main()
