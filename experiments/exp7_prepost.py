"""Experiment 7 (paper Fig. 7 / Sec. 5.3 in miniature): how many explicit pre/post blocks should an FPDM have?

The paper finds that at least 1 explicit pre/post layer is always better than 0, that 1 is optimal for small
sampling budgets, and 2 or 4 for larger ones. Here: FPDMs with pre = post = 0, 1 and 2 around the one fixed-point
block, each trained with exp1's recipe (S-JFB M = N = 3, lr 1e-3, batch 64, v-prediction + zero terminal SNR, seed
0) for the SAME training compute as exp1: 24,000 block-pass units per image (forward 1, backward 2), where one
step costs 3 * (pre + post) + E[n] + 3 * E[m] units (cost.training_units_per_step). pre = post = 1 is the shipped
model pretrained/fpdm-digits (trained by exp1 with exactly this recipe: its stored ModelConfig and the settings in
experiments/results/exp1_equal_compute.json are checked); the other two are trained here (in parallel, one 1-thread
process each with --jobs 2) and exported as fp16 EMA weights too.

Each model is evaluated with DDPM at exp2's budgets (40, 80, 160 block passes per image, i.e. 5, 10, 20 steps of
the 8-block DiT). A step of a model with pre = post = p costs p + k + p blocks, so p = 0 spends the whole budget on
fixed-point iterations. As in exp2, each model's iterations per step k (with or without solution reuse) are chosen
on the separate search seed (common.SEARCH_SEED) and then evaluated on the reported seeds.

    python -m experiments.exp7_prepost                 # full run (~12.5 min on 2 idle cores, --jobs 2)
    python -m experiments.exp7_prepost --quick --out_dir /tmp/exp7
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

import cli
from checkpoint import load_safetensors
from config import ModelConfig, TrainConfig, UserError, config_diff, flag
from cost import training_units_per_step
from experiments import common, exp1_equal_compute
from records import read_json

NAME = "exp7_prepost"
EXP1_JSON = common.DEFAULT_OUT_DIR / f"{exp1_equal_compute.NAME}.json"


@dataclass
class Exp7Config(common.CheckpointConfig):
    """Flags of experiment 7 (--fpdm_ckpt is the pre = post = 1 model; --dit_ckpt is not used)."""
    depths: str = flag("0,1,2", "pre = post depths compared (comma list; 1 = --fpdm_ckpt).")
    units: Optional[float] = flag(None, "Training compute per image in block-pass units (None: exp1's, 1000 DiT "
                                          "steps; --quick: the quick models').")
    lr: float = flag(1e-3, "AdamW learning rate.")
    budgets: Optional[str] = flag(None, "Sampling budgets in block passes per image, comma list (None: 40,80,160; "
                                          "--quick 16).")
    candidate_iters: Optional[str] = flag(None, "Iterations per step searched, comma list (None: 1,2,4,6; "
                                                  "--quick 1,2).")
    search_samples: Optional[int] = flag(None, "Samples per search evaluation (None: 250, --quick 4).")
    jobs: Optional[int] = flag(None, "Worker processes, each with --threads threads (None: 2, --quick 1).")

    def validate(self) -> "Exp7Config":
        """The shared checks, and --units > 0; returns self."""
        if self.units is not None and not self.units > 0:
            raise UserError(f"--units: must be > 0 (got {self.units})")
        return super().validate()


FULL = {"budgets": "40,80,160", "candidate_iters": "1,2,4,6", "search_samples": 250, "seeds": 3,
        "num_samples": 1000, "jobs": 2}
QUICK = {"budgets": "16", "candidate_iters": "1,2", "search_samples": 4, "seeds": 1, "num_samples": 16, "jobs": 1}


def main(argv: list[str] | None = None) -> dict:
    """Train the pre/post = 0 and 2 FPDMs for exp1's compute, evaluate all three per budget, write JSON and plot."""
    config, run = common.start(NAME, Exp7Config, __doc__, argv, FULL, QUICK)
    depths = common.int_list(config.depths, "depths")
    budgets = common.int_list(config.budgets, "budgets")
    candidates = common.int_list(config.candidate_iters, "candidate_iters")
    seeds = list(range(config.seeds))
    reference = reference_model(config, run.out_dir)
    units = config.units or default_units(config.quick)

    # Train the other depths for the same compute (in parallel: one --threads process each).
    runs_dir = run.out_dir / "runs" / NAME
    train_tasks = {}
    for depth in depths:
        if depth != 1:
            model_config = common.digits_model(True, pre_post=depth)
            name = f"fpdm-prepost{depth}-digits"
            train_config = common.digits_training(name, common.steps_for_units(units, model_config), config.lr,
                                                  runs_dir, sample_grid=not config.quick)
            train_tasks[depth] = (model_config, train_config, config.threads, runs_dir / f"{name}.safetensors")
    trained = run_tasks(_train_task, train_tasks, config.jobs)
    models = {}
    for depth in depths:
        if depth == 1:
            models[depth] = dict(reference)
            continue
        record = trained[depth]
        record["units_per_step"] = training_units_per_step(train_tasks[depth][0])
        record["total_units"] = record["units_per_step"] * record["steps"]
        models[depth] = {"pre_post": depth, "ckpt": record.pop("exported_to"), "units_per_step":
                         record["units_per_step"], "total_units": record["total_units"], "train": record}
        print(f"pre = post = {depth}: {record['num_params']:,} params, {record['steps']} steps, "
              f"{record['wall_clock_s']:.0f}s, final loss {record['final_loss']:.4f}")

    # Evaluate every (model, budget) with its own allocation search (largest budgets first: better load balance).
    eval_tasks = {(depth, budget): (models[depth]["ckpt"], budget, candidates, config.search_samples, seeds,
                                    config.num_samples, config.classifier, config.threads)
                  for budget in sorted(budgets, reverse=True) for depth in depths}
    evaluated = run_tasks(_evaluate_task, eval_tasks, config.jobs)
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
               "lr": config.lr, "batch_size": common.DIGITS_TRAINING.global_batch_size,
               "seed": common.DIGITS_TRAINING.global_seed, "sampler": "ddpm", "budgets": budgets,
               "candidate_iters": candidates, "seeds": seeds, "num_samples": config.num_samples,
               "search_seed": common.SEARCH_SEED, "search_samples": config.search_samples, "jobs": config.jobs,
               "quick": config.quick, "evaluator": common.Evaluator(config.classifier).describe(),
               "depths": depths, "models": {str(d): models[d] for d in depths}, "best_pre_post_per_budget": best}
    return common.finish(run, payload, lambda plt: plot(plt, payload))


def default_units(quick: bool) -> float:
    """Training compute per image of every model: exp1's (its full DiT steps), or the quick models' under --quick."""
    if quick:
        return common.QUICK_MODEL_STEPS * training_units_per_step(common.digits_model(True, pre_post=1))
    return exp1_equal_compute.FULL["dit_steps"] * training_units_per_step(common.digits_model(False))


def reference_model(config: Exp7Config, out_dir: Path) -> dict[str, Any]:
    """The pre = post = 1 model's entry: --fpdm_ckpt, the tiny quick model under --quick, else the shipped model
    with its exp1 training record (recipe checked)."""
    entry: dict[str, Any] = {"pre_post": 1,
                             "units_per_step": training_units_per_step(common.digits_model(True, pre_post=1))}
    if config.fpdm_ckpt:
        return {**entry, "ckpt": config.fpdm_ckpt}
    if config.quick:
        ckpt, _ = common.quick_models(out_dir)  # exp1's recipe for QUICK_MODEL_STEPS steps
        steps = common.QUICK_MODEL_STEPS
        return {**entry, "ckpt": str(ckpt), "train": {"source": "common.quick_models", "steps": steps},
                "total_units": steps * entry["units_per_step"]}
    return {**entry, "ckpt": str(common.FPDM_CKPT), **check_exp1_recipe(config.lr)}


def check_exp1_recipe(lr: float, ckpt: Path = common.FPDM_CKPT, exp1_json: Path = EXP1_JSON) -> dict:
    """The shipped pre = post = 1 model's training record from exp1's JSON, checked to be this script's recipe: the
    weights' stored ModelConfig is digits_model(True, pre_post=1) and exp1 ran in full mode at `lr` with
    DIGITS_TRAINING's batch size and seed."""
    exp1 = read_json(exp1_json, flag="--fpdm_ckpt")
    _, shipped = load_safetensors(ckpt, flag="--fpdm_ckpt")
    expected_training = {"lr": lr, "batch_size": common.DIGITS_TRAINING.global_batch_size,
                         "seed": common.DIGITS_TRAINING.global_seed, "quick": False}
    differences = config_diff(asdict(common.digits_model(True, pre_post=1)), asdict(shipped))
    differences += config_diff(expected_training, {k: exp1.get(k) for k in expected_training})
    if differences:
        raise UserError(f"--fpdm_ckpt {ckpt}: the shipped FPDM was not trained with this recipe (expected != "
                        f"recorded in {exp1_json} / the weights): " + "; ".join(differences))
    record = exp1["models"]["fpdm"]
    return {"train": {"source": str(exp1_json.relative_to(common.REPO_ROOT)), "command": record["command"],
                      "steps": record["steps"], "final_loss": record["final_loss"],
                      "wall_clock_s": record["wall_clock_s"], "num_params": record["num_params"]},
            "total_units": record["total_units"], "recipe_matches_exp1": True}


def run_tasks(function: Callable, tasks: dict, jobs: int) -> dict:
    """{key: function(*arguments)} for {key: arguments}, in `jobs` spawned worker processes (inline if 1)."""
    if jobs <= 1 or len(tasks) <= 1:
        return {key: function(*arguments) for key, arguments in tasks.items()}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {key: pool.submit(function, *arguments) for key, arguments in tasks.items()}
        return {key: future.result() for key, future in futures.items()}


def _train_task(model_config: ModelConfig, train_config: TrainConfig, threads: int, export_path: Path) -> dict:
    """Train one FPDM and export its EMA weights (fp16, as the shipped model)."""
    torch.set_num_threads(threads)
    record = common.train_digits_model(model_config, train_config)
    record["exported_to"] = str(common.export_ema(record["run_dir"], export_path))
    return record


def _evaluate_task(ckpt: str, budget: int, candidates: Sequence[int], search_samples: int, seeds: Sequence[int],
                   num_samples: int, classifier: str, threads: int) -> dict:
    """exp2's DDPM protocol for one model and budget: search k (and reuse) on SEARCH_SEED, evaluate on `seeds`."""
    torch.set_num_threads(threads)
    evaluator = common.Evaluator(classifier)
    loaded = common.load(ckpt)
    setting = replace(common.EVALUATION_SAMPLING, budget=budget)
    result = common.search_and_evaluate(loaded, evaluator, setting, candidates, search_samples, num_samples, seeds)
    return {"budget": budget, **result, "num_params": common.num_params(loaded.model)}


def plot(plt: Any, payload: dict) -> Any:
    """digits-FID against budget for each pre/post depth (error bars: std over sampling seeds)."""
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    budgets = payload["budgets"]
    for (key, model), marker in zip(payload["models"].items(), ("o:", "s-", "^--", "d-.")):
        rows = model["rows"]
        common.fid_errorbar(axis, budgets, rows, marker,
                            label=f"pre = post = {key} ({model['num_params'] / 1e6:.2f}M params)")
        for r in rows:
            axis.annotate(f"k={r['best_iters']}{'+R' if r['best_reuse'] else ''}", (r["budget"], r["fid_mean"]),
                          textcoords="offset points", xytext=(4, 4), fontsize=7)
    common.log2_axis(axis, budgets, "transformer-block passes per image (DDPM)")
    common.finish_axis(axis, "digits-FID (lower is better)",
                       "Exp. 7: explicit pre/post blocks at equal training compute (Fig. 7)")
    return figure


if __name__ == "__main__":
    cli.run(main)
