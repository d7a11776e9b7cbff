"""Experiment 5 (paper Tables 4-5): S-JFB vs JFB (1-step gradient) vs multi-step JFB at small M, N on digits.

Three FPDMs (1 pre + fixed-point block + 1 post, Ti/2 width), each trained for the SAME training compute in
block-pass units (forward 1, backward 2; cost.training_units_per_step, see exp1), so cheaper gradients buy more
steps:
  * S-JFB:           n ~ U{0..N}, m ~ U{1..M}      (Algorithm 1)
  * JFB:             n ~ U{0..N}, m = 1            (1-step gradient)
  * multi-step JFB:  n ~ U{0..N}, m = M            (fixed number of backpropagated iterations)
with M = N = 3 (small: the paper's Table 4 finds 3-6 best). Only the gradient part differs. Each is then sampled
at one fixed budget (DDPM, --budget blocks, --iters iterations per step) over several sampling seeds.

    python -m experiments.exp5_sjfb
    python -m experiments.exp5_sjfb --quick --out_dir /tmp/exp5
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Optional

import cli
from cost import training_units_per_step
from experiments import common
from config import flag

NAME = "exp5_sjfb"


@dataclass
class Exp5Config(common.ExperimentConfig):
    """Flags of experiment 5."""
    dit_equivalent_steps: Optional[int] = flag(None, "Training compute of each variant, in steps of the 8-block "
                                                       "digits DiT (None: 300, --quick 2).")
    lr: float = flag(1e-3, "AdamW learning rate.")
    N: int = flag(3, "Upper bound of the no-grad iterations n.")
    M: int = flag(3, "Upper bound (S-JFB) / value (multi-step) of m.")
    budget: Optional[int] = flag(None, "Sampling budget in block passes per image (None: 80, --quick 8).")
    iters: Optional[int] = flag(None, "Fixed-point iterations per sampling step (None: 3, --quick 2).")
    zero_allowed: ClassVar[tuple[str, ...]] = ("N",)


FULL = {"dit_equivalent_steps": 300, "budget": 80, "iters": 3, "seeds": 3, "num_samples": 1000}
QUICK = {"dit_equivalent_steps": 2, "budget": 8, "iters": 2, "seeds": 1, "num_samples": 16}


def variants(n_max: int, m_max: int) -> dict[str, tuple[int, int, int, int]]:
    """S-JFB bounds (n_min, N, m_min, M) of the three training methods."""
    return {"S-JFB": (0, n_max, 1, m_max), "JFB (m=1)": (0, n_max, 1, 1), f"multi-step JFB (m={m_max})":
            (0, n_max, m_max, m_max)}


def main(argv: list[str] | None = None) -> dict:
    """Train the three variants for equal compute, evaluate digits-FID at one budget, write JSON and plot."""
    config, run = common.start(NAME, Exp5Config, __doc__, argv, FULL, QUICK)
    seeds = list(range(config.seeds))
    units = config.dit_equivalent_steps * training_units_per_step(common.digits_model(False))
    evaluator = common.Evaluator(config.classifier)
    setting = replace(common.EVALUATION_SAMPLING, budget=config.budget, fixed_point_iters=config.iters)
    results = {}
    for label, bounds in variants(config.N, config.M).items():
        model_config = common.digits_model(True, bounds)
        slug = label.split(" ")[0].lower().replace("-", "")
        train_config = common.digits_training(f"fpdm-{slug}-m{bounds[2]}-{bounds[3]}",
                                              common.steps_for_units(units, model_config), config.lr,
                                              run.out_dir / "runs" / NAME, sample_grid=False)
        record = common.train_digits_model(model_config, train_config)
        trained = common.load(Path(record["run_dir"]) / "checkpoints" / "latest.pt")
        evaluation = common.evaluate_setting(trained, evaluator, setting, config.num_samples, seeds)
        results[label] = {"bounds": dict(zip(("n_min", "N", "m_min", "M"), bounds)),
                          "units_per_step": training_units_per_step(model_config), "train": record, **evaluation}
        print(f"{label}: {record['steps']} steps, loss {record['final_loss']:.4f}, FID {evaluation['fid_mean']:.2f} "
              f"± {evaluation['fid_std']:.2f}, acc {evaluation['accuracy_mean']:.3f}")

    payload = {"training_units_each": units, "dit_equivalent_steps": config.dit_equivalent_steps,
               "budget": config.budget, "iters_per_step": config.iters, "sampler": "ddpm", "seeds": seeds,
               "num_samples": config.num_samples, "quick": config.quick, "evaluator": evaluator.describe(),
               "variants": results}
    return common.finish(run, payload, lambda plt: plot(plt, results, config.budget))


def plot(plt: Any, results: dict, budget: int) -> Any:
    """Bar chart of digits-FID (mean ± std over seeds) per training method."""
    figure, axis = plt.subplots(figsize=(6, 4))
    labels = list(results)
    means = [results[k]["fid_mean"] for k in labels]
    stds = [results[k]["fid_std"] for k in labels]
    axis.bar(range(len(labels)), means, yerr=stds, capsize=4, color=["C0", "C1", "C2"])
    axis.set_xticks(range(len(labels)))
    axis.set_xticklabels([f"{k}\n{results[k]['train']['steps']} steps" for k in labels])
    axis.set_ylabel("digits-FID (lower is better)")
    axis.set_title(f"Exp. 5: training method at equal training compute\n(sampling: {budget} blocks/image, DDPM)")
    return figure


if __name__ == "__main__":
    cli.run(main)
