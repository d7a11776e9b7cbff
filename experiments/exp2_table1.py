"""Experiment 2 (paper Table 1 in miniature): digits-FID and classifier accuracy of the shipped DiT and FPDM at
three sampling budgets in the paper's ratio 140 : 280 : 560, relative to the DiT's depth.

The paper's budgets are 5, 10 and 20 steps of the 28-block DiT-XL/2; ours are 5, 10 and 20 steps of the 8-block
DiT-Ti/2: 40, 80 and 160 transformer-block passes per image. DDPM and DDIM, no guidance (as the paper's numbers).
The FPDM uses its best allocation per budget and sampler: a small grid of iterations per step (timestep smoothing,
Sec. 3.3) with and without solution reuse is searched on a SEPARATE sampling seed (common.SEARCH_SEED) with fewer
samples; the winner is then evaluated on the reported seeds, so the selection is not made on the reported samples.

    python experiments/exp2_table1.py
    python experiments/exp2_table1.py --quick --out_dir /tmp/exp2
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "exp2_table1"
PAPER = {  # Table 1 (ImageNet 256, FID-50K): blocks -> model -> sampler -> FID
    140: {"DiT": {"ddpm": 148.0, "ddim": 110.0}, "FPDM": {"ddpm": 85.8, "ddim": 33.9}},
    280: {"DiT": {"ddpm": 80.9, "ddim": 35.2}, "FPDM": {"ddpm": 43.3, "ddim": 22.4}},
    560: {"DiT": {"ddpm": 37.9, "ddim": 16.5}, "FPDM": {"ddpm": 26.1, "ddim": 19.6}},
}


def main(argv: list[str] | None = None) -> dict:
    """Evaluate both models at the three budgets and both samplers; write JSON and plot."""
    parser = common.base_parser(__doc__.splitlines()[0])
    common.add_checkpoint_flags(parser)
    parser.add_argument("--dit_steps", default=None, help="Comma-separated DiT step counts (budgets = steps x depth).")
    parser.add_argument("--candidate_iters", default=None, help="FPDM iterations per step searched (comma list).")
    parser.add_argument("--search_samples", type=int, default=None, help="Samples per search evaluation.")
    args = parser.parse_args(argv)
    out_dir = common.setup_run(args)
    fpdm_path, dit_path = common.resolve_checkpoints(args, out_dir)
    dit_steps = [int(s) for s in common.pick(args, "dit_steps", "5,10,20", "2").split(",")]
    candidates = [int(k) for k in common.pick(args, "candidate_iters", "1,2,4,6", "1,2").split(",")]
    search_samples = common.pick(args, "search_samples", 250, 4)
    seeds = list(range(common.pick(args, "seeds", 3, 1)))
    num_samples = common.pick(args, "num_samples", 1000, 16)

    evaluator = common.DigitsEvaluator(args.classifier)
    fpdm, fpdm_config = common.load_model(fpdm_path)
    dit, dit_config = common.load_model(dit_path)
    depth = common.blocks_per_step(dit_config, 0)
    rows = []
    for steps in dit_steps:
        budget = steps * depth
        for sampler in ("ddpm", "ddim"):
            ddim = sampler == "ddim"
            config = common.sample_config(budget=budget, ddim=ddim)
            dit_result = common.evaluate_setting(dit, dit_config, evaluator, config, num_samples, seeds)
            search = []
            for k in common.fpdm_iteration_grid(budget, candidates):
                for reuse in (False, True):
                    config = common.sample_config(budget=budget, iters=k, ddim=ddim, reuse=reuse)
                    result = common.evaluate_setting(fpdm, fpdm_config, evaluator, config, search_samples,
                                                     [common.SEARCH_SEED])
                    search.append({"iters": k, "reuse": reuse, "search_fid": result["fid_mean"],
                                   "num_steps": result["num_steps"]})
            best = min(search, key=lambda r: r["search_fid"])
            config = common.sample_config(budget=budget, iters=best["iters"], ddim=ddim, reuse=best["reuse"])
            fpdm_result = common.evaluate_setting(fpdm, fpdm_config, evaluator, config, num_samples, seeds)
            paper_blocks = steps * 28
            rows.append({"budget": budget, "dit_steps": steps, "sampler": sampler, "paper_blocks": paper_blocks,
                         "paper": PAPER.get(paper_blocks, {}), "DiT": dit_result,
                         "FPDM": {**fpdm_result, "best_iters": best["iters"], "best_reuse": best["reuse"]},
                         "fpdm_search": search})
            print(f"{budget} blocks {sampler}: DiT {dit_result['fid_mean']:.2f}±{dit_result['fid_std']:.2f} "
                  f"(acc {dit_result['accuracy_mean']:.3f}) | FPDM k={best['iters']} reuse={best['reuse']} "
                  f"{fpdm_result['fid_mean']:.2f}±{fpdm_result['fid_std']:.2f} (acc {fpdm_result['accuracy_mean']:.3f})")

    payload = {"fpdm_ckpt": str(fpdm_path), "dit_ckpt": str(dit_path), "dit_depth": depth, "seeds": seeds,
               "num_samples": num_samples, "search_seed": common.SEARCH_SEED, "search_samples": search_samples,
               "candidate_iters": candidates, "quick": args.quick, "evaluator": evaluator.describe(),
               "params": {"DiT": sum(p.numel() for p in dit.parameters()),
                          "FPDM": sum(p.numel() for p in fpdm.parameters())},
               "rows": rows}
    common.write_result(out_dir, NAME, payload)
    plot(out_dir, rows)
    return payload


def plot(out_dir: Path, rows: list[dict]) -> None:
    """digits-FID against budget for both models and samplers (error bars: std over sampling seeds)."""
    plt = common.pyplot()
    if plt is None:
        return
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, sampler in zip(axes, ("ddpm", "ddim")):
        chosen = [r for r in rows if r["sampler"] == sampler]
        budgets = [r["budget"] for r in chosen]
        for model, marker in (("DiT", "o--"), ("FPDM", "s-")):
            axis.errorbar(budgets, [r[model]["fid_mean"] for r in chosen], yerr=[r[model]["fid_std"] for r in chosen],
                          fmt=marker, capsize=3, label=model)
        for r in chosen:
            axis.annotate(f"k={r['FPDM']['best_iters']}{'+reuse' if r['FPDM']['best_reuse'] else ''}",
                          (r["budget"], r["FPDM"]["fid_mean"]), textcoords="offset points", xytext=(4, -12),
                          fontsize=8)
        axis.set_xscale("log", base=2)
        axis.set_xticks(budgets)
        axis.set_xticklabels([str(b) for b in budgets])
        axis.set_xlabel("transformer-block passes per image")
        axis.set_title(f"{sampler.upper()}")
        axis.legend()
    axes[0].set_ylabel("digits-FID (lower is better)")
    figure.suptitle("Exp. 2: Table 1 in miniature (budgets 40:80:160 = 140:280:560)")
    common.save_figure(figure, out_dir, NAME)


if __name__ == "__main__":
    main()
