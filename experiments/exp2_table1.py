"""Experiment 2 (paper Table 1 in miniature): digits-FID and classifier accuracy of the shipped DiT and FPDM at
three sampling budgets in the paper's ratio 140 : 280 : 560, relative to the DiT's depth.

The paper's budgets are 5, 10 and 20 steps of the 28-block DiT-XL/2; ours are 5, 10 and 20 steps of the 8-block
DiT-Ti/2: 40, 80 and 160 transformer-block passes per image. DDPM and DDIM, no guidance (as the paper's numbers);
--samplers adds diffusers' solvers (dpm++2m, unipc, euler).
The FPDM uses its best allocation per budget and sampler: a small grid of iterations per step (timestep smoothing,
Sec. 3.3) with and without solution reuse is searched on a SEPARATE sampling seed (common.SEARCH_SEED) with fewer
samples; the winner is then evaluated on the reported seeds, so the selection is not made on the reported samples.

    python -m experiments.exp2_table1
    python -m experiments.exp2_table1 --quick --out_dir /tmp/exp2
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import cli
from config import ModelConfig, flag
from cost import blocks_per_step
from experiments import common

NAME = "exp2_table1"
PAPER = {  # Table 1 (ImageNet 256, FID-50K): blocks -> model -> sampler -> FID
    140: {"DiT": {"ddpm": 148.0, "ddim": 110.0}, "FPDM": {"ddpm": 85.8, "ddim": 33.9}},
    280: {"DiT": {"ddpm": 80.9, "ddim": 35.2}, "FPDM": {"ddpm": 43.3, "ddim": 22.4}},
    560: {"DiT": {"ddpm": 37.9, "ddim": 16.5}, "FPDM": {"ddpm": 26.1, "ddim": 19.6}},
}
PAPER_DIT = ModelConfig(model="DiT-XL/2")  # the paper's budgets are steps of this model


@dataclass
class Exp2Config(common.CheckpointConfig):
    """Flags of experiment 2."""
    dit_steps: Optional[str] = flag(None, "Comma-separated DiT step counts; budgets = steps x depth (None: 5,10,20; "
                                            "--quick 2).")
    candidate_iters: Optional[str] = flag(None, "FPDM iterations per step searched, comma list (None: 1,2,4,6; "
                                                  "--quick 1,2).")
    search_samples: Optional[int] = flag(None, "Samples per search evaluation (None: 250, --quick 4).")
    samplers: str = flag("ddpm,ddim", "Comma-separated --sampler names evaluated at every budget (the paper: "
                                      "ddpm,ddim; also dpm++2m, unipc, euler).")


FULL = {"dit_steps": "5,10,20", "candidate_iters": "1,2,4,6", "search_samples": 250, "seeds": 3, "num_samples": 1000}
QUICK = {"dit_steps": "2", "candidate_iters": "1,2", "search_samples": 4, "seeds": 1, "num_samples": 16}


def main(argv: list[str] | None = None) -> dict:
    """Evaluate both models at the three budgets and both samplers; write JSON and plot."""
    config, run = common.start(NAME, Exp2Config, __doc__, argv, FULL, QUICK)
    samplers = common.sampler_list(config.samplers, "samplers")
    fpdm, dit = common.load_models(config, run.out_dir)
    dit_steps = common.int_list(config.dit_steps, "dit_steps")
    candidates = common.int_list(config.candidate_iters, "candidate_iters")
    seeds = list(range(config.seeds))

    evaluator = common.Evaluator(config.classifier)
    depth = blocks_per_step(dit.config, 0)
    rows = []
    for steps in dit_steps:
        budget = steps * depth
        for sampler in samplers:
            setting = replace(common.EVALUATION_SAMPLING, budget=budget, sampler=sampler)
            dit_result = common.evaluate_setting(dit, evaluator, setting, config.num_samples, seeds)
            fpdm_result = common.search_and_evaluate(fpdm, evaluator, setting, candidates, config.search_samples,
                                                     config.num_samples, seeds)
            search = fpdm_result.pop("search")
            paper_blocks = steps * blocks_per_step(PAPER_DIT, 0)
            rows.append({"budget": budget, "dit_steps": steps, "sampler": sampler, "paper_blocks": paper_blocks,
                         "paper": PAPER.get(paper_blocks, {}), "DiT": dit_result, "FPDM": fpdm_result,
                         "fpdm_search": search})
            print(f"{budget} blocks {sampler}: DiT {dit_result['fid_mean']:.2f}±{dit_result['fid_std']:.2f} "
                  f"(acc {dit_result['accuracy_mean']:.3f}) | FPDM k={fpdm_result['best_iters']} "
                  f"reuse={fpdm_result['best_reuse']} {fpdm_result['fid_mean']:.2f}±{fpdm_result['fid_std']:.2f} "
                  f"(acc {fpdm_result['accuracy_mean']:.3f})")

    payload = {"fpdm_ckpt": str(fpdm.path), "dit_ckpt": str(dit.path), "dit_depth": depth, "seeds": seeds,
               "num_samples": config.num_samples, "search_seed": common.SEARCH_SEED,
               "search_samples": config.search_samples, "candidate_iters": candidates, "quick": config.quick,
               "evaluator": evaluator.describe(),
               "params": {"DiT": common.num_params(dit.model), "FPDM": common.num_params(fpdm.model)}, "rows": rows}
    return common.finish(run, payload, lambda plt: plot(plt, rows))


def plot(plt: Any, rows: list[dict]) -> Any:
    """digits-FID against budget for both models and samplers (error bars: std over sampling seeds)."""
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    figure, axes = plt.subplots(1, len(samplers), figsize=(5 * len(samplers), 4), sharey=True, squeeze=False)
    for axis, sampler in zip(axes[0], samplers):
        chosen = [r for r in rows if r["sampler"] == sampler]
        budgets = [r["budget"] for r in chosen]
        for model, marker in (("DiT", "o--"), ("FPDM", "s-")):
            common.fid_errorbar(axis, budgets, [r[model] for r in chosen], marker, label=model)
        for r in chosen:
            axis.annotate(f"k={r['FPDM']['best_iters']}{'+reuse' if r['FPDM']['best_reuse'] else ''}",
                          (r["budget"], r["FPDM"]["fid_mean"]), textcoords="offset points", xytext=(4, -12),
                          fontsize=8)
        common.log2_axis(axis, budgets, "transformer-block passes per image")
        axis.set_title(f"{sampler.upper()}")
        axis.legend()
    axes[0][0].set_ylabel("digits-FID (lower is better)")
    figure.suptitle("Exp. 2: Table 1 in miniature (budgets 40:80:160 = 140:280:560)")
    return figure


if __name__ == "__main__":
    cli.run(main)
