"""Experiment 7 (paper Fig. 7 / Sec. 5.3 in miniature): how many explicit pre/post blocks should an FPDM have?

The paper finds that at least 1 explicit pre/post layer is always better than 0, that 1 is optimal for small
sampling budgets, and 2 or 4 for larger ones. Here: FPDMs with pre = post = 0, 1 and 2 around the one fixed-point
block, each trained with exp1's recipe (S-JFB M = N = 3, lr 1e-3, batch 64, v-prediction + zero terminal SNR, seed
0) for the SAME training compute as exp1: 24,000 block-pass units per image (forward 1, backward 2), where one
step costs 3 * (pre + post) + E[n] + 3 * E[m] units. pre = post = 1 is the shipped model pretrained/fpdm-digits
(trained by exp1 with exactly this recipe, checked against experiments/results/exp1_equal_compute.json); the other
two are trained here (in parallel, one 1-thread process each with --jobs 2) and exported as fp16 EMA weights too.

Each model is evaluated with DDPM at exp2's budgets (40, 80, 160 block passes per image, i.e. 5, 10, 20 steps of
the 8-block DiT). A step of a model with pre = post = p costs p + k + p blocks, so p = 0 spends the whole budget on
fixed-point iterations. As in exp2, each model's iterations per step k (with or without solution reuse) are chosen
on the separate search seed (common.SEARCH_SEED) and then evaluated on the reported seeds.

    python experiments/exp7_prepost.py                 # full run (~12.5 min on 2 idle cores, --jobs 2)
    python experiments/exp7_prepost.py --quick --out_dir /tmp/exp7
"""
from __future__ import annotations

import multiprocessing
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "exp7_prepost"
EXP1_JSON = common.DEFAULT_OUT_DIR / "exp1_equal_compute.json"
# Flags that name where a run goes or how often it logs, not what it trains (ignored when comparing recipes).
NON_RECIPE_FLAGS = {"--output_dir", "--output_subdir", "--sample_grid", "--log_every", "--ckpt_every", "--max_steps"}


def main(argv: list[str] | None = None) -> dict:
    """Train the pre/post = 0 and 2 FPDMs for exp1's compute, evaluate all three per budget, write JSON and plot."""
    parser = common.base_parser(__doc__.splitlines()[0])
    common.add_checkpoint_flags(parser)  # --fpdm_ckpt: the pre = post = 1 model (default: the shipped one)
    parser.add_argument("--depths", default="0,1,2", help="pre = post depths compared (comma list; 1 = --fpdm_ckpt).")
    parser.add_argument("--units", type=float, default=None,
                        help="Training compute per image in block-pass units (default: exp1's 1000 DiT steps x 24).")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--budgets", default=None, help="Sampling budgets in block passes per image (comma list).")
    parser.add_argument("--candidate_iters", default=None, help="Iterations per step searched (comma list).")
    parser.add_argument("--search_samples", type=int, default=None, help="Samples per search evaluation.")
    parser.add_argument("--jobs", type=int, default=None, help="Worker processes (each with --threads threads).")
    args = parser.parse_args(argv)
    out_dir = common.setup_run(args)
    depths = [int(d) for d in args.depths.split(",")]
    budgets = [int(b) for b in common.pick(args, "budgets", "40,80,160", "16").split(",")]
    candidates = [int(k) for k in common.pick(args, "candidate_iters", "1,2,4,6", "1,2").split(",")]
    search_samples = common.pick(args, "search_samples", 250, 4)
    seeds = list(range(common.pick(args, "seeds", 3, 1)))
    num_samples = common.pick(args, "num_samples", 1000, 16)
    jobs = common.pick(args, "jobs", 2, 1)

    if args.quick and not args.fpdm_ckpt:
        reference_ckpt, _ = common.quick_models(out_dir)  # tiny pre = post = 1 model, 3 training steps
        reference_steps = 3
    else:
        reference_ckpt = Path(args.fpdm_ckpt or common.FPDM_CKPT)
        reference_steps = None
    reference_config = common.config_from_flags(common.model_flags(True, pre_post=1))
    units = args.units or (reference_steps * common.training_units_per_step(reference_config) if args.quick
                           else 1000 * 24.0)
    reference = {"pre_post": 1, "ckpt": str(reference_ckpt),
                 "units_per_step": common.training_units_per_step(reference_config)}
    if reference_steps is not None:  # --quick: common.quick_models' recipe is exp1's, for 3 steps
        reference.update({"train": {"source": "common.quick_models", "steps": reference_steps},
                          "total_units": reference_steps * reference["units_per_step"]})
    elif not args.fpdm_ckpt:
        reference.update(check_exp1_recipe(args.lr))

    # Train the other depths for the same compute (in parallel: one --threads process each).
    runs_dir = out_dir / "runs" / NAME
    train_tasks = {}
    for depth in depths:
        if depth == 1:
            continue
        flags = common.model_flags(True, pre_post=depth)
        config = common.config_from_flags(flags)
        steps = common.steps_for_units(units, config)
        train_tasks[depth] = (f"fpdm-prepost{depth}-digits", flags, steps, args.lr, runs_dir, not args.quick,
                              args.threads, runs_dir / f"fpdm-prepost{depth}-digits.safetensors")
    trained = run_tasks(_train_task, train_tasks, jobs)
    models = {}
    for depth in depths:
        if depth == 1:
            models[depth] = dict(reference)
            continue
        record = trained[depth]
        config = common.config_from_flags(train_tasks[depth][1])
        record["units_per_step"] = common.training_units_per_step(config)
        record["total_units"] = record["units_per_step"] * record["steps"]
        models[depth] = {"pre_post": depth, "ckpt": record.pop("exported_to"), "units_per_step":
                         record["units_per_step"], "total_units": record["total_units"], "train": record}
        print(f"pre = post = {depth}: {record['num_params']:,} params, {record['steps']} steps, "
              f"{record['wall_clock_s']:.0f}s, final loss {record['final_loss']:.4f}")

    # Evaluate every (model, budget) with its own allocation search (largest budgets first: better load balance).
    eval_tasks = {(depth, budget): (models[depth]["ckpt"], budget, candidates, search_samples, seeds, num_samples,
                                    args.classifier, args.threads)
                  for budget in sorted(budgets, reverse=True) for depth in depths}
    evaluated = run_tasks(_evaluate_task, eval_tasks, jobs)
    for depth in depths:
        models[depth]["rows"] = [evaluated[(depth, budget)] for budget in budgets]
        models[depth]["num_params"] = models[depth]["rows"][0].pop("num_params")
        for row in models[depth]["rows"][1:]:
            row.pop("num_params")
    best = {}
    for i, budget in enumerate(budgets):
        best[str(budget)] = min(depths, key=lambda d: models[d]["rows"][i]["fid_mean"])
        print(f"{budget} blocks DDPM: " + " | ".join(
            f"pre=post={d}: {models[d]['rows'][i]['fid_mean']:.2f}±{models[d]['rows'][i]['fid_std']:.2f} "
            f"(k={models[d]['rows'][i]['best_iters']}{'+R' if models[d]['rows'][i]['best_reuse'] else ''}, "
            f"{models[d]['rows'][i]['num_steps']} steps)" for d in depths) + f"  -> best {best[str(budget)]}")

    payload = {"compute_measure": "transformer-block passes per image (forward 1, backward 2)",
               "training_units_per_image": units, "sjfb": dict(zip(("n_min", "N", "m_min", "M"), common.DEFAULT_SJFB)),
               "lr": args.lr, "batch_size": 64, "seed": 0, "sampler": "ddpm", "budgets": budgets,
               "candidate_iters": candidates, "seeds": seeds, "num_samples": num_samples,
               "search_seed": common.SEARCH_SEED, "search_samples": search_samples, "jobs": jobs,
               "quick": args.quick, "evaluator": common.DigitsEvaluator(args.classifier).describe(),
               "depths": depths, "models": {str(d): models[d] for d in depths}, "best_pre_post_per_budget": best}
    common.write_result(out_dir, NAME, payload)
    plot(out_dir, payload)
    return payload


def check_exp1_recipe(lr: float) -> dict:
    """The shipped pre = post = 1 model's training record from exp1's JSON, checked to use this script's recipe."""
    import json
    exp1 = json.loads(EXP1_JSON.read_text())
    record = exp1["models"]["fpdm"]
    expected = common.model_flags(True, pre_post=1) + ["--global_batch_size", "64", "--lr", str(lr),
                                                       "--global_seed", "0"]
    recipe = lambda tokens: {k: v for k, v in zip(tokens[0::2], tokens[1::2]) if k not in NON_RECIPE_FLAGS}
    shipped = recipe(shlex.split(record["command"])[2:])  # drop "python train.py"
    if shipped != recipe(expected) or exp1["quick"]:
        raise ValueError(f"{EXP1_JSON}: the shipped FPDM was not trained with this recipe ({record['command']})")
    return {"train": {"source": str(EXP1_JSON.relative_to(common.REPO_ROOT)), "command": record["command"],
                      "steps": record["steps"], "final_loss": record["final_loss"],
                      "wall_clock_s": record["wall_clock_s"], "num_params": record["num_params"]},
            "total_units": record["total_units"], "recipe_matches_exp1": True}


def run_tasks(function, tasks: dict, jobs: int) -> dict:
    """{key: function(*arguments)} for {key: arguments}, in `jobs` spawned worker processes (inline if 1)."""
    if jobs <= 1 or len(tasks) <= 1:
        return {key: function(*arguments) for key, arguments in tasks.items()}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {key: pool.submit(function, *arguments) for key, arguments in tasks.items()}
        return {key: future.result() for key, future in futures.items()}


def _train_task(name, flags, steps, lr, runs_dir, sample_grid, threads, export_path) -> dict:
    """Train one FPDM with common.train_digits_model and export its EMA weights (fp16, as the shipped model)."""
    common.torch.set_num_threads(max(1, threads))
    record = common.train_digits_model(name, flags, steps, lr, Path(runs_dir), sample_grid=sample_grid)
    record["exported_to"] = str(common.export_ema(record["run_dir"], export_path))
    return record


def _evaluate_task(ckpt, budget, candidates, search_samples, seeds, num_samples, classifier, threads) -> dict:
    """exp2's DDPM protocol for one model and budget: search k (and reuse) on SEARCH_SEED, evaluate on `seeds`."""
    common.torch.set_num_threads(max(1, threads))
    evaluator = common.DigitsEvaluator(classifier)
    model, config = common.load_model(ckpt)
    pre, post = config.fixed_point_pre_depth, config.fixed_point_post_depth
    search = []
    for k in common.fpdm_iteration_grid(budget, candidates, pre, post):
        for reuse in (False, True):
            sample_config = common.sample_config(budget=budget, iters=k, reuse=reuse)
            result = common.evaluate_setting(model, config, evaluator, sample_config, search_samples,
                                             [common.SEARCH_SEED])
            search.append({"iters": k, "reuse": reuse, "search_fid": result["fid_mean"],
                           "num_steps": result["num_steps"]})
    winner = min(search, key=lambda r: r["search_fid"])
    sample_config = common.sample_config(budget=budget, iters=winner["iters"], reuse=winner["reuse"])
    result = common.evaluate_setting(model, config, evaluator, sample_config, num_samples, seeds)
    return {"budget": budget, **result, "best_iters": winner["iters"], "best_reuse": winner["reuse"],
            "search": search, "num_params": sum(p.numel() for p in model.parameters())}


def plot(out_dir: Path, payload: dict) -> None:
    """digits-FID against budget for each pre/post depth (error bars: std over sampling seeds)."""
    plt = common.pyplot()
    if plt is None:
        return
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    budgets = payload["budgets"]
    for (key, model), marker in zip(payload["models"].items(), ("o:", "s-", "^--", "d-.")):
        rows = model["rows"]
        axis.errorbar(budgets, [r["fid_mean"] for r in rows], yerr=[r["fid_std"] for r in rows], fmt=marker,
                      capsize=3, label=f"pre = post = {key} ({model['num_params'] / 1e6:.2f}M params)")
        for r in rows:
            axis.annotate(f"k={r['best_iters']}{'+R' if r['best_reuse'] else ''}", (r["budget"], r["fid_mean"]),
                          textcoords="offset points", xytext=(4, 4), fontsize=7)
    axis.set_xscale("log", base=2)
    axis.set_xticks(budgets)
    axis.set_xticklabels([str(b) for b in budgets])
    axis.set_xlabel("transformer-block passes per image (DDPM)")
    axis.set_ylabel("digits-FID (lower is better)")
    axis.set_title("Exp. 7: explicit pre/post blocks at equal training compute (Fig. 7)")
    axis.legend()
    common.save_figure(figure, out_dir, NAME)


if __name__ == "__main__":
    main()
