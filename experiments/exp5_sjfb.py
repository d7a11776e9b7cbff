"""Experiment 5 (paper Tables 4-5): S-JFB vs JFB (1-step gradient) vs multi-step JFB at small M, N on digits.

Three FPDMs (1 pre + fixed-point block + 1 post, Ti/2 width), each trained for the SAME training compute in
block-pass units (forward 1, backward 2; see exp1), so cheaper gradients buy more steps:
  * S-JFB:           n ~ U{0..N}, m ~ U{1..M}      (Algorithm 1)
  * JFB:             n ~ U{0..N}, m = 1            (1-step gradient)
  * multi-step JFB:  n ~ U{0..N}, m = M            (fixed number of backpropagated iterations)
with M = N = 3 (small: the paper's Table 4 finds 3-6 best). Only the gradient part differs. Each is then sampled
at one fixed budget (DDPM, --budget blocks, --iters iterations per step) over several sampling seeds.

    python experiments/exp5_sjfb.py
    python experiments/exp5_sjfb.py --quick --out_dir /tmp/exp5
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "exp5_sjfb"


def variants(n_max: int, m_max: int) -> dict[str, tuple[int, int, int, int]]:
    """S-JFB bounds (n_min, N, m_min, M) of the three training methods."""
    return {"S-JFB": (0, n_max, 1, m_max), "JFB (m=1)": (0, n_max, 1, 1), f"multi-step JFB (m={m_max})":
            (0, n_max, m_max, m_max)}


def main(argv: list[str] | None = None) -> dict:
    """Train the three variants for equal compute, evaluate digits-FID at one budget, write JSON and plot."""
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dit_equivalent_steps", type=int, default=None,
                        help="Training compute of each variant, in 8-block DiT steps (24 units each).")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--N", type=int, default=3, help="Upper bound of the no-grad iterations n.")
    parser.add_argument("--M", type=int, default=3, help="Upper bound (S-JFB) / value (multi-step) of m.")
    parser.add_argument("--budget", type=int, default=None, help="Sampling budget in block passes per image.")
    parser.add_argument("--iters", type=int, default=None, help="Fixed-point iterations per sampling step.")
    args = parser.parse_args(argv)
    out_dir = common.setup_run(args)
    dit_steps = common.pick(args, "dit_equivalent_steps", 300, 2)
    budget = common.pick(args, "budget", 80, 8)
    iters = common.pick(args, "iters", 3, 2)
    seeds = list(range(common.pick(args, "seeds", 3, 1)))
    num_samples = common.pick(args, "num_samples", 1000, 16)

    units = dit_steps * 3 * 8
    evaluator = common.DigitsEvaluator(args.classifier)
    results = {}
    for label, bounds in variants(args.N, args.M).items():
        flags = common.model_flags(True, bounds)
        config = common.config_from_flags(flags)
        steps = common.steps_for_units(units, config)
        slug = label.split(" ")[0].lower().replace("-", "")
        record = common.train_digits_model(f"fpdm-{slug}-m{bounds[2]}-{bounds[3]}", flags, steps, args.lr,
                                           out_dir / "runs" / NAME, sample_grid=False)
        model, model_config = common.load_model(Path(record["run_dir"]) / "checkpoints" / "latest.pt")
        sample_config = common.sample_config(budget=budget, iters=iters)
        evaluation = common.evaluate_setting(model, model_config, evaluator, sample_config, num_samples, seeds)
        results[label] = {"bounds": dict(zip(("n_min", "N", "m_min", "M"), bounds)),
                          "units_per_step": common.training_units_per_step(config), "train": record,
                          **evaluation}
        print(f"{label}: {steps} steps, loss {record['final_loss']:.4f}, FID {evaluation['fid_mean']:.2f} "
              f"± {evaluation['fid_std']:.2f}, acc {evaluation['accuracy_mean']:.3f}")

    payload = {"training_units_each": units, "dit_equivalent_steps": dit_steps, "budget": budget,
               "iters_per_step": iters, "sampler": "ddpm", "seeds": seeds, "num_samples": num_samples,
               "quick": args.quick, "evaluator": evaluator.describe(), "variants": results}
    common.write_result(out_dir, NAME, payload)
    plot(out_dir, results, budget)
    return payload


def plot(out_dir: Path, results: dict, budget: int) -> None:
    """Bar chart of digits-FID (mean ± std over seeds) per training method."""
    plt = common.pyplot()
    if plt is None:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    labels = list(results)
    means = [results[k]["fid_mean"] for k in labels]
    stds = [results[k]["fid_std"] for k in labels]
    axis.bar(range(len(labels)), means, yerr=stds, capsize=4, color=["C0", "C1", "C2"])
    axis.set_xticks(range(len(labels)))
    axis.set_xticklabels([f"{k}\n{results[k]['train']['steps']} steps" for k in labels])
    axis.set_ylabel("digits-FID (lower is better)")
    axis.set_title(f"Exp. 5: training method at equal training compute\n(sampling: {budget} blocks/image, DDPM)")
    common.save_figure(figure, out_dir, NAME)


if __name__ == "__main__":
    main()
