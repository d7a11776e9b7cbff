"""Experiment 6 (beyond the paper): Anderson acceleration vs plain fixed-point iteration at equal budgets.

The shipped FPDM is sampled with the same compute plans (same budget, timesteps and iterations per step; one
function evaluation = one block pass, so both solvers spend exactly the same block passes) with
--fixed_point_solver iteration and anderson (memory --anderson_memory), DDPM, no reuse. Reported: digits-FID,
classifier accuracy and the mean last relative residual delta_t (how well each solver converges per step).

    python experiments/exp6_anderson.py
    python experiments/exp6_anderson.py --quick --out_dir /tmp/exp6
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "exp6_anderson"
SOLVERS = ("iteration", "anderson")


def main(argv: list[str] | None = None) -> dict:
    """FID and residuals of both solvers across iterations per step at one budget; JSON and plot."""
    parser = common.base_parser(__doc__.splitlines()[0])
    common.add_checkpoint_flags(parser)
    parser.add_argument("--budgets", default=None, help="Comma-separated block budgets per image.")
    parser.add_argument("--iters", default=None, help="Comma-separated iterations per step.")
    parser.add_argument("--anderson_memory", type=int, default=5)
    args = parser.parse_args(argv)
    out_dir = common.setup_run(args)
    fpdm_path, _ = common.resolve_checkpoints(args, out_dir)
    budgets = [int(b) for b in common.pick(args, "budgets", "80", "16").split(",")]
    iters = [int(k) for k in common.pick(args, "iters", "2,4,8,18", "2,6").split(",")]
    seeds = list(range(common.pick(args, "seeds", 2, 1)))
    num_samples = common.pick(args, "num_samples", 1000, 16)

    evaluator = common.DigitsEvaluator(args.classifier)
    fpdm, fpdm_config = common.load_model(fpdm_path)
    rows = []
    for budget in budgets:
        for k in common.fpdm_iteration_grid(budget, iters):
            row = {"budget": budget, "iters": k}
            for solver in SOLVERS:
                config = common.sample_config(budget=budget, iters=k, solver=solver,
                                                     anderson_memory=args.anderson_memory)
                result = common.evaluate_setting(fpdm, fpdm_config, evaluator, config, num_samples, seeds,
                                                 keep_trajectories=True)
                deltas = np.array([s.delta_per_step for s in result.pop("_trajectories")], dtype=np.float64)
                result.pop("_plan")
                result["mean_delta"] = float(np.nanmean(deltas))
                result["delta_per_step_mean"] = np.nanmean(deltas, axis=0).tolist()
                row[solver] = result
            row["num_steps"] = row["iteration"]["num_steps"]
            rows.append(row)
            print(f"budget {budget}, k={k}: iteration FID {row['iteration']['fid_mean']:.2f} "
                  f"(delta {row['iteration']['mean_delta']:.3g}) | anderson {row['anderson']['fid_mean']:.2f} "
                  f"(delta {row['anderson']['mean_delta']:.3g})")
    payload = {"budgets": budgets, "sampler": "ddpm", "reuse": False, "anderson_memory": args.anderson_memory,
               "seeds": seeds, "num_samples": num_samples, "fpdm_ckpt": str(fpdm_path), "quick": args.quick,
               "evaluator": evaluator.describe(), "rows": rows}
    common.write_result(out_dir, NAME, payload)
    plot(out_dir, rows)
    return payload


def plot(out_dir: Path, rows: list[dict]) -> None:
    """FID and mean delta_t against iterations per step, one line per solver (and budget)."""
    plt = common.pyplot()
    if plt is None:
        return
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for budget in sorted({r["budget"] for r in rows}):
        chosen = [r for r in rows if r["budget"] == budget]
        ks = [r["iters"] for r in chosen]
        for solver, style in zip(SOLVERS, ("o--", "s-")):
            axes[0].errorbar(ks, [r[solver]["fid_mean"] for r in chosen], yerr=[r[solver]["fid_std"] for r in chosen],
                             fmt=style, capsize=3, label=f"{solver}, {budget} blocks")
            axes[1].plot(ks, [r[solver]["mean_delta"] for r in chosen], style, label=f"{solver}, {budget} blocks")
    ks = sorted({r["iters"] for r in rows})
    for axis in axes:
        axis.set_xscale("log", base=2)
        axis.set_xticks(ks)
        axis.set_xticklabels([str(k) for k in ks])
        axis.set_xlabel("fixed-point iterations per timestep (equal block budget)")
        axis.legend()
    axes[0].set_ylabel("digits-FID")
    axes[1].set_ylabel("mean delta_t (last relative residual)")
    axes[1].set_yscale("log")
    figure.suptitle("Exp. 6: Anderson acceleration vs plain iteration")
    common.save_figure(figure, out_dir, NAME)


if __name__ == "__main__":
    main()
