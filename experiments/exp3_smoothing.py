"""Experiment 3 (paper Fig. 4): timestep smoothing at a fixed sampling budget.

At --budget block passes per image (default 80 = 10 steps of the 8-block DiT, the analogue of the paper's 280 =
10 steps of DiT-XL/2), the shipped FPDM runs k fixed-point iterations per step for k from 1 to many, so the number
of timesteps goes from budget // (k + 2) (many) to a few (1 pre + 1 post block per step; leftover blocks become
extra iterations, allocation.plan_iterations). DDPM, no solution reuse (pure smoothing; reuse is Exp. 4). The DiT
at the same budget is the reference point; in the paper's terms it corresponds to k = depth - 2 = 6.

    python experiments/exp3_smoothing.py
    python experiments/exp3_smoothing.py --quick --out_dir /tmp/exp3
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "exp3_smoothing"


def main(argv: list[str] | None = None) -> dict:
    """FPDM digits-FID across iterations per step at one budget, with the DiT point; JSON and plot."""
    parser = common.base_parser(__doc__.splitlines()[0])
    common.add_checkpoint_flags(parser)
    parser.add_argument("--budget", type=int, default=None, help="Block passes per image.")
    parser.add_argument("--iters", default=None, help="Comma-separated iterations per step to sweep.")
    parser.add_argument("--ddim", action="store_true", help="Use DDIM instead of DDPM.")
    args = parser.parse_args(argv)
    out_dir = common.setup_run(args)
    fpdm_path, dit_path = common.resolve_checkpoints(args, out_dir)
    budget = common.pick(args, "budget", 80, 16)
    iters = [int(k) for k in common.pick(args, "iters", "1,2,3,4,6,8,18,38", "1,6").split(",")]
    seeds = list(range(common.pick(args, "seeds", 2, 1)))
    num_samples = common.pick(args, "num_samples", 1000, 16)

    evaluator = common.DigitsEvaluator(args.classifier)
    fpdm, fpdm_config = common.load_model(fpdm_path)
    dit, dit_config = common.load_model(dit_path)
    points = []
    for k in common.fpdm_iteration_grid(budget, iters):
        config = common.sample_config(budget=budget, iters=k, ddim=args.ddim)
        result = common.evaluate_setting(fpdm, fpdm_config, evaluator, config, num_samples, seeds)
        points.append({"iters": k, **result})
        print(f"k={k}: {result['num_steps']} steps, FID {result['fid_mean']:.2f} ± {result['fid_std']:.2f}")
    config = common.sample_config(budget=budget, ddim=args.ddim)
    dit_result = common.evaluate_setting(dit, dit_config, evaluator, config, num_samples, seeds)
    best = min(points, key=lambda p: p["fid_mean"])
    payload = {"budget": budget, "sampler": "ddim" if args.ddim else "ddpm", "reuse": False, "seeds": seeds,
               "num_samples": num_samples, "fpdm_ckpt": str(fpdm_path), "dit_ckpt": str(dit_path),
               "quick": args.quick, "evaluator": evaluator.describe(), "fpdm": points, "dit": dit_result,
               "best_iters": best["iters"], "best_fid": best["fid_mean"],
               "paper": {"budget": 280, "best_iters": "4-8", "dit_equivalent_iters": 26}}
    common.write_result(out_dir, NAME, payload)
    plot(out_dir, points, dit_result, common.blocks_per_step(dit_config, 0) - 2, budget)
    return payload


def plot(out_dir: Path, points: list[dict], dit: dict, dit_iters: int, budget: int) -> None:
    """FID against iterations per step (top axis: timesteps), the DiT as a point and a dashed line."""
    plt = common.pyplot()
    if plt is None:
        return
    figure, axis = plt.subplots(figsize=(6.5, 4))
    ks = [p["iters"] for p in points]
    axis.errorbar(ks, [p["fid_mean"] for p in points], yerr=[p["fid_std"] for p in points], fmt="s-", capsize=3,
                  label="FPDM (1 pre + k iters + 1 post per step)")
    for p in points:
        axis.annotate(f"{p['num_steps']} steps", (p["iters"], p["fid_mean"]), textcoords="offset points",
                      xytext=(3, 5), fontsize=7)
    axis.errorbar([dit_iters], [dit["fid_mean"]], yerr=[dit["fid_std"]], fmt="o", color="C3", capsize=3,
                  label=f"DiT, 8 blocks x {dit['num_steps']} steps")
    axis.axhline(dit["fid_mean"], color="C3", linestyle="--", linewidth=1)
    axis.set_xscale("log", base=2)
    axis.set_xticks(ks)
    axis.set_xticklabels([str(k) for k in ks])
    axis.set_xlabel("fixed-point iterations per timestep")
    axis.set_ylabel("digits-FID (lower is better)")
    axis.set_title(f"Exp. 3: timestep smoothing at {budget} blocks/image")
    axis.legend(fontsize=8)
    common.save_figure(figure, out_dir, NAME)


if __name__ == "__main__":
    main()
