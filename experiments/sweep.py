"""The resumable sweep at the paper's settings: several training seeds per configuration, on digits and MNIST-5k.

One job is one (experiment, dataset, configuration, training seed). It trains its model (or reuses the finished run
folder of exactly the same configs, or resumes an interrupted one from its latest checkpoint; a sampling-only job
uses the run of its trainer experiment's job, training it when the folder is missing), evaluates it and writes
`<out_dir>/sweep/<experiment>/<dataset>/<configuration>/seed<k>.json`. A job whose JSON exists is skipped, so the
sweep can be run in several sittings; several workers may run the same command at once (a job is claimed by a
`.lock` file holding the worker's pid; the job of a worker that died is taken over). A model whose samples are NaN or
inf (a diverged training) is written as `"evaluation": {"non_finite": reason}`. `python -m experiments.claims`
then turns the JSON files into experiments/results/claims.json and RESULTS.md's summary table.

The paper's settings (Sec. 4.1, 5.3, 5.4): S-JFB with M = N = 12 for every FPDM except Table 5's variants; Table 5 at
N = 6 and N = 12 (JFB with m = 1, multi-step JFB with m = N, S-JFB with m ~ U{1..N}); 0, 1, 2 and 4 pre/post layers
(Fig. 7). Models of one experiment are trained for the same training compute, in block-pass units per image (forward
1, backward 2; cost.training_units_per_step), written as a number of steps of the dataset's DiT.

Experiments (in the order the jobs run; `--experiments` picks):
  table1     DiT vs FPDM, DDPM and DDIM at 5/10/20 DiT steps' worth of blocks (block-matched) and, for the FPDM,
             of GMACs (FLOP-matched, cost.macs_per_step); the FPDM's iterations per step are chosen on a separate
             search seed, with solution reuse (Sec. 3.3) as in the paper's Table 1.
  smoothing  sampling only, on table1's FPDMs: iterations per step at one block budget, with and without reuse
             (Fig. 4 and 6a).
  table5     the three training methods at N = 6 and 12, sampled at one budget.
  prepost    FPDMs with 0, 1, 2, 4 pre/post layers at the three budgets.
  depth      Table 1 at the paper's depth ratio: the FPDM (M = N = 12) against the 28-block DiT it replaces (the
             depth of DiT-XL/2) at 140 / 280 / 560 blocks (5 / 10 / 20 of its steps), and DiTs of depth 4, 8, 12
             at the same training compute (beyond the paper). The FPDM's iterations per step are searched over
             1, 2, 4, 8, 12, 26 (26: the 28-block DiT's equivalent).
  depth_smoothing  sampling only, on depth's FPDMs: Fig. 4 and 6a at 560 blocks over the same iterations.
  depth_solvers    sampling only, on depth's models: depth's evaluation under DPM-Solver++(2M) and UniPC (beyond
             the paper: does the advantage survive modern solvers?).
  solvers    sampling only, digits, on table1's DiTs: which settings of diffusers' solvers bring 10 steps closest
             to DDPM at 250 steps (spacing, final step, lower-order final steps, solver order, x0 clipping).
  depth_compute    does the answer move with training compute? On digits the FPDM, DiT-4 and the 28-block DiT at
             24,000 and 134,400 units per image (depth has 67,200), the FPDM, DiT-4 and DiT-8 at 268,800 and 537,600
             (DiT-28 and gradient's phantom-gradient FPDM at 268,800 only); on MNIST-5k the FPDM, DiT-4 and DiT-28
             at 134,400. Evaluated as depth, with DPM-Solver++(2M) beside DDPM and DDIM (COMPUTE_SAMPLERS).
  gradient   digits only, beyond the paper: depth's FPDM trained with phantom and IFT gradients (GRADIENTS) at
             depth's compute, evaluated as depth, with the activation memory of a training step of each method
             and of S-JFB (depth's FPDM, the reference); does S-JFB match costlier gradients at equal compute?

    python -m experiments.sweep                                      # every job, in priority order
    python -m experiments.sweep --experiments table1 --datasets mnist5k --training_seeds 0,1,2
    python -m experiments.sweep --quick --out_dir /tmp/sweep         # seconds: tiny runs of every experiment
"""
from __future__ import annotations

import functools
import os
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import cli
from config import ModelConfig, SampleConfig, TrainConfig, UserError, build_config, flag, load_preset
from cost import (blocks_per_step, default_sampling_iters, macs_per_step, model_architecture,
                  training_units_per_step)
from experiments import common
from records import resolve_path, write_record
from sampling import NonFiniteError

NAME = "sweep"
EXPERIMENTS = ("table1", "smoothing", "table5", "prepost", "depth", "depth_smoothing", "depth_compute", "depth_solvers",
               "solvers", "gradient")
# sampling-only experiments: whose models they use
TRAINED_BY = {"smoothing": "table1", "depth_smoothing": "depth", "depth_solvers": "depth", "solvers": "table1"}
PAPER_SAMPLERS = ("ddpm", "ddim")
MODERN_SAMPLERS = ("dpm++2m", "unipc")  # diffusers' multistep solvers (schedulers.py), depth_solvers

DATASETS = ("mnist5k", "digits")
PAPER_SJFB = (0, 12, 1, 12)  # (n_min, N, m_min, M): S-JFB with M = N = 12 (paper Sec. 4.1)
TABLE5_NS = (6, 12)
PREPOST_DEPTHS = (0, 1, 2, 4)
PAPER_DIT_DEPTH = 28  # DiT-XL/2's blocks: the baseline the paper's FPDM replaces (its budgets are 5/10/20 steps)
DIT_DEPTHS = (4, 8, 12, PAPER_DIT_DEPTH)
# depth_compute: training compute levels in steps of the 8-block DiT (x 24 units), beside depth's 2,800 (67,200 units);
# the shallow DiTs compared are depth's best two at 67,200 units (DiT-4, then DiT-8, in every cell over 3 seeds).
COMPUTE_LEVELS = {"24k": 1000, "134k": 5600, "268k": 11200, "537k": 22400}
# phantom: the gradient experiment's phantom-gradient FPDM (its 67k run is gradient's), to see whether the gradient
# moves the crossing with the best DiT.
COMPUTE_MODELS = ("fpdm", "dit28", "dit4", "dit8", "phantom")
# Which models each dataset trains at each level (the 28-block DiT, far behind, stops at 268k; DiT-8 starts there).
COMPUTE_GRID = {
    "digits": {"24k": ("fpdm", "dit28", "dit4"), "134k": ("fpdm", "dit28", "dit4"),
               "268k": ("fpdm", "dit4", "dit8", "dit28", "phantom"), "537k": ("fpdm", "dit4", "dit8")},
    "mnist5k": {"134k": ("fpdm", "dit4", "dit28")},
}
COMPUTE_SAMPLERS = (*PAPER_SAMPLERS, "dpm++2m")  # 24k and 134k on digits were evaluated before dpm++2m was added
# gradient: the implicit gradients trained like depth's FPDM (its S-JFB run is the reference), at depth's compute.
# Phantom: 5 damped steps at lambda = 0.5 (Geng et al. 2021's unrolled phantom gradient); IFT: 12 backward
# iterations, as many as S-JFB's N. Per step (digits, pre = post = 1, n ~ U{0..12}): S-JFB 31.5 units, both 27.
GRADIENTS = {"phantom": {"fixed_point_grad": "phantom", "fixed_point_phantom_steps": 5,
                         "fixed_point_phantom_damping": 0.5},
             "ift": {"fixed_point_grad": "ift", "fixed_point_ift_iters": 12}}


@dataclass(frozen=True)
class DatasetRecipe:
    """A dataset's FPDM recipe (its configs/*.yaml preset) and the sweep's compute and sample sizes on it."""
    preset: str
    compute: dict[str, int]        # experiment -> training compute in steps of this dataset's DiT
    search_samples: int            # per candidate when choosing iterations per step (on common.SEARCH_SEED)
    num_samples: int               # per sampling seed
    sampling_seeds: tuple[int, ...]


RECIPES = {
    # MNIST-5k: 2,000 DiT steps (~21 min for the DiT at 1 thread, 1.6 steps/s; the FPDM's 1,524 steps ~25 min).
    # depth: 2,800 steps of the 8-block DiT = 67,200 units per image = 800 steps of the 28-block DiT (~35 min at 1
    # thread on MNIST-5k, ~12 min on digits) = 2,133 FPDM steps (configs/*_dit28.yaml).
    "mnist5k": DatasetRecipe("configs/mnist5k.yaml", {"table1": 2000, "table5": 1000, "prepost": 1000, "depth": 2800},
                             search_samples=100, num_samples=500, sampling_seeds=(0,)),
    # digits: 1,000 DiT steps for Table 1 (the shipped models' compute); 300 for the ablations (~100 s per model).
    "digits": DatasetRecipe("configs/digits.yaml", {"table1": 1000, "table5": 300, "prepost": 300, "depth": 2800,
                                                    "gradient": 2800},
                            search_samples=250, num_samples=500, sampling_seeds=(0, 1)),
}
QUICK_COMPUTE, QUICK_SAMPLES = 2, 8


@dataclass
class SweepConfig(common.ExperimentConfig):
    """Flags of the sweep (sample sizes come from RECIPES)."""
    experiments: str = flag(",".join(EXPERIMENTS), "Comma list of experiments to run (the list above).")
    datasets: str = flag(",".join(DATASETS), "Comma list of datasets (mnist5k, digits).")
    training_seeds: str = flag("0,1,2", "Comma list of training seeds (TrainConfig.global_seed).")
    configurations: str = flag("", "Comma list of configuration names to run, e.g. fpdm,dit28 (default: all).")
    train_only: bool = flag(False, "Only train (or resume) the models of the jobs; evaluate in a later run.")


@dataclass(frozen=True)
class Job:
    """One (experiment, dataset, configuration, training seed) and the run that trains its model."""
    experiment: str
    dataset: str
    name: str                       # the configuration, e.g. "fpdm", "N6-jfb", "prepost2"
    seed: int
    model: ModelConfig
    train: TrainConfig
    trains: bool = True             # False: sampling only, on a model another job trains

    def result_path(self, out_dir: Path) -> Path:
        return out_dir / NAME / self.experiment / self.dataset / self.name / f"seed{self.seed}.json"


#################################################################################
#                                  The jobs                                     #
#################################################################################

def base_model(dataset: str) -> ModelConfig:
    """The dataset's FPDM recipe (configs/<dataset>.yaml) with the paper's S-JFB bounds M = N = 12."""
    preset = load_preset(common.REPO_ROOT / RECIPES[dataset].preset, ModelConfig, TrainConfig)
    return with_sjfb(build_config(ModelConfig, preset), PAPER_SJFB)


def with_sjfb(model: ModelConfig, sjfb: Sequence[int]) -> ModelConfig:
    """`model` with S-JFB bounds (n_min, N, m_min, M)."""
    n_lo, n_hi, m_lo, m_hi = sjfb
    return replace(model, fixed_point_no_grad_min_iters=n_lo, fixed_point_no_grad_max_iters=n_hi,
                   fixed_point_with_grad_min_iters=m_lo, fixed_point_with_grad_max_iters=m_hi).validate()


def dit_model(dataset: str) -> ModelConfig:
    """The dataset's DiT: the FPDM recipe's model without the fixed-point block."""
    return replace(base_model(dataset), fixed_point=False).validate()


def reference_dit(experiment: str, dataset: str) -> ModelConfig:
    """The DiT whose steps an experiment's budgets count: the dataset's 8-block DiT, or the 28-block one (depth)."""
    dit = dit_model(dataset)
    return replace(dit, depth=PAPER_DIT_DEPTH).validate() if at_paper_depth(experiment) else dit


def at_paper_depth(experiment: str) -> bool:
    """Whether an experiment's budgets and iteration candidates are those of the 28-block DiT (depth's)."""
    return experiment.startswith("depth") or experiment == "gradient"


def trained_by(experiment: str) -> str:
    """The experiment whose jobs train the models `experiment` evaluates (itself, unless sampling only)."""
    return TRAINED_BY.get(experiment, experiment)


def table5_variants(n_max: int) -> dict[str, tuple[int, int, int, int]]:
    """Table 5's training methods at N = n_max (M = N, as Table 4's rows equal Table 5's S-JFB rows)."""
    return {f"N{n_max}-jfb": (0, n_max, 1, 1), f"N{n_max}-multistep": (0, n_max, n_max, n_max),
            f"N{n_max}-sjfb": (0, n_max, 1, n_max)}


def configurations(experiment: str, dataset: str) -> dict[str, ModelConfig]:
    """The models an experiment compares on a dataset, by configuration name."""
    fpdm = base_model(dataset)
    if experiment in ("table1", "smoothing"):
        return {"dit": dit_model(dataset), "fpdm": fpdm} if experiment == "table1" else {"fpdm": fpdm}
    if experiment == "depth_compute":
        deep = configurations("depth", dataset) | configurations("gradient", dataset)
        return {f"{name}-{level}": deep[name] for level, models in COMPUTE_GRID[dataset].items() for name in models}
    if experiment == "solvers":
        return {"dit": dit_model(dataset)} if dataset == "digits" else {}
    if experiment == "depth_solvers":
        return configurations("depth", dataset)
    if experiment == "gradient":
        deep_fpdm = configurations("depth_smoothing", dataset)["fpdm"]
        return {name: replace(deep_fpdm, **flags).validate() for name, flags in GRADIENTS.items()} \
            if dataset == "digits" else {}
    if experiment in ("depth", "depth_smoothing"):
        # The FPDM's weights do not depend on depth; it sets the DiT-equivalent iterations (depth - pre - post).
        deep_fpdm = {"fpdm": replace(fpdm, depth=PAPER_DIT_DEPTH).validate()}
        if experiment == "depth_smoothing":
            return deep_fpdm
        return {**deep_fpdm, **{f"dit{d}": replace(dit_model(dataset), depth=d).validate() for d in DIT_DEPTHS}}
    if experiment == "table5":
        return {name: with_sjfb(fpdm, bounds) for n in TABLE5_NS for name, bounds in table5_variants(n).items()}
    return {f"prepost{p}": replace(fpdm, fixed_point_pre_depth=p, fixed_point_post_depth=p).validate()
            for p in PREPOST_DEPTHS}


def compute_in_dit_steps(experiment: str, dataset: str, name: str) -> int:
    """A configuration's training compute, in steps of the dataset's 8-block DiT."""
    if experiment == "depth_compute":
        return COMPUTE_LEVELS[name.rsplit("-", 1)[1]]
    return RECIPES[dataset].compute[experiment]


def training_config(experiment: str, dataset: str, name: str, seed: int, model: ModelConfig, runs_dir: Path,
                    quick: bool) -> TrainConfig:
    """The run of one model: the preset's training fields, seed `seed`, and the experiment's compute in steps."""
    preset = load_preset(common.REPO_ROOT / RECIPES[dataset].preset, ModelConfig, TrainConfig)
    dit_steps = QUICK_COMPUTE if quick else compute_in_dit_steps(experiment, dataset, name)
    steps = common.steps_for_units(dit_steps * training_units_per_step(dit_model(dataset)), model)
    # epochs >= steps: --epochs (the preset's 1,400) must not cap the run before max_steps (DiT-4 at 537k units on
    # digits would have stopped at 1,400 epochs x 28 steps = 39,200 of its 44,800 steps).
    train = build_config(TrainConfig, preset)
    return replace(train, global_seed=seed, max_steps=steps, epochs=max(train.epochs, steps),
                   log_every=max(1, min(100, steps)), ckpt_every=max(1, min(200, steps)), sample_grid=False,
                   output_dir=str(runs_dir / experiment / dataset), output_subdir=f"{name}-seed{seed}").validate()


def jobs(config: SweepConfig, out_dir: Path) -> list[Job]:
    """Every job the flags select, in run order: experiments as EXPERIMENTS orders them, then training seeds,
    then configurations (so a sitting that ends early leaves whole seeds)."""
    experiments = names(config.experiments, EXPERIMENTS, "experiments")
    datasets = names(config.datasets, DATASETS, "datasets")
    seeds = common.int_list(config.training_seeds, "training_seeds")
    runs_dir = out_dir / "runs" / NAME
    selected = []
    for experiment in EXPERIMENTS:
        for dataset in (d for d in DATASETS if d in datasets and experiment in experiments):
            for seed in seeds:
                for name, model in configurations(experiment, dataset).items():
                    train = training_config(trained_by(experiment), dataset, name, seed, model, runs_dir,
                                            config.quick)
                    selected.append(Job(experiment, dataset, name, seed, model, train,
                                        trains=trained_by(experiment) == experiment))
    if config.configurations:
        chosen = names(config.configurations, sorted({job.name for job in selected}), "configurations")
        selected = [job for job in selected if job.name in chosen]
    return selected


def names(text: str, allowed: Sequence[str], flag_name: str) -> list[str]:
    """A comma list of names, each one of `allowed`."""
    chosen = [piece.strip() for piece in text.split(",") if piece.strip()]
    unknown = [name for name in chosen if name not in allowed]
    if unknown or not chosen:
        raise UserError(f"--{flag_name}: expected a comma list of {', '.join(allowed)} (got {text!r})")
    return chosen


#################################################################################
#                                 Evaluations                                   #
#################################################################################
# One function per experiment (EVALUATIONS). Every number is an FID on the dataset's classifier features against all
# its real images, with classifier accuracy (common.Evaluator), over the recipe's sampling seeds; no guidance, as the
# paper's FIDs. Budgets are written as steps of the dataset's DiT (5, 10, 20: the paper's 140 : 280 : 560 blocks of
# DiT-XL/2) and turned into block passes per image (x the DiT's depth) or, FLOP-matched, into GMACs per image (x the
# DiT step's MACs, cost.macs_per_step). Where an FPDM's iterations per step are chosen, they are chosen on
# common.SEARCH_SEED, never on the reported seeds.

DIT_STEPS = (5, 10, 20)          # budgets, in steps of the dataset's DiT
SMOOTHING_DIT_STEPS = 10         # the smoothing / reuse sweep's budget (the paper's Fig. 4 uses its middle one)
SMOOTHING_ITERS = (1, 2, 3, 4, 6)
TABLE5_DIT_STEPS, TABLE5_ITERS = 10, 3  # Table 5's sampling: one budget, fixed iterations
CANDIDATE_ITERS = (1, 2, 4, 6)
DEPTH_ITERS = (1, 2, 4, 8, 12, 26)   # depth experiments: candidates and smoothing curve (26 = 28 - 1 - 1)
DEPTH_SMOOTHING_DIT_STEPS = 20       # 560 blocks of the 28-block DiT


@dataclass(frozen=True)
class Sizes:
    """How much is sampled for one job."""
    dit_steps: tuple[int, ...]
    candidates: tuple[int, ...]
    search_samples: int
    num_samples: int
    seeds: tuple[int, ...]


def sizes(job: Job, quick: bool) -> Sizes:
    """The recipe's sample sizes, or tiny ones under --quick."""
    if quick:
        return Sizes((2,), (1, 2), 4, QUICK_SAMPLES, (0,))
    recipe = RECIPES[job.dataset]
    candidates = DEPTH_ITERS if at_paper_depth(job.experiment) else CANDIDATE_ITERS
    return Sizes(DIT_STEPS, candidates, recipe.search_samples, recipe.num_samples, recipe.sampling_seeds)


@functools.lru_cache(maxsize=None)
def evaluator(dataset: str) -> common.Evaluator:
    """The dataset's evaluator (its classifier and reference statistics are loaded once per process)."""
    return common.Evaluator(common.classifier_path(dataset), dataset)


def load_trained(record: dict[str, Any]) -> common.Loaded:
    """The EMA weights of a finished run (its run_dir relative to the repository root, or absolute)."""
    return common.load(resolve_path(record["run_dir"], common.REPO_ROOT) / "checkpoints" / "latest.pt")


def dit_budgets(job: Job, dit_steps: int) -> tuple[int, float]:
    """(block passes, GMACs) per image of `dit_steps` steps of the experiment's reference DiT."""
    dit = reference_dit(job.experiment, job.dataset)
    return dit_steps * blocks_per_step(dit, 0), dit_steps * macs_per_step(dit, 0) / 1e9


def search_and_evaluate(loaded: common.Loaded, job: Job, setting: SampleConfig, size: Sizes) -> dict[str, Any]:
    """The FPDM's best iterations per step (with solution reuse) within setting's block or GMAC budget: each
    candidate that fits is scored on SEARCH_SEED, the winner evaluated on the reported seeds."""
    score = evaluator(job.dataset)
    search = []
    for k in size.candidates:
        fits = (macs_per_step(loaded.config, k) <= setting.budget_gmacs * 1e9 if setting.budget is None
                else blocks_per_step(loaded.config, k) <= setting.budget)
        if fits:
            candidate = replace(setting, fixed_point_iters=k, fixed_point_reuse_solution=True)
            result = common.evaluate_setting(loaded, score, candidate, size.search_samples, [common.SEARCH_SEED])
            search.append({"iters": k, "search_fid": result["fid_mean"], "num_steps": result["num_steps"]})
    best = min(search, key=lambda r: r["search_fid"])
    chosen = replace(setting, fixed_point_iters=best["iters"], fixed_point_reuse_solution=True)
    return {**common.evaluate_setting(loaded, score, chosen, size.num_samples, list(size.seeds)),
            "best_iters": best["iters"], "reuse": True, "search": search}


def table1(job: Job, record: dict[str, Any], config: SweepConfig) -> dict[str, Any]:
    """DDPM and DDIM (depth_solvers: DPM-Solver++ and UniPC) at each budget: the DiT as is; the FPDM block-matched
    and FLOP-matched."""
    size, loaded, rows = sizes(job, config.quick), load_trained(record), []
    samplers = {"depth_solvers": MODERN_SAMPLERS, "depth_compute": COMPUTE_SAMPLERS}.get(job.experiment, PAPER_SAMPLERS)
    for dit_steps in size.dit_steps:
        blocks, gmacs = dit_budgets(job, dit_steps)
        for sampler in samplers:
            row = {"dit_steps": dit_steps, "sampler": sampler, "budget_blocks": blocks, "budget_gmacs": gmacs}
            block_matched = replace(common.EVALUATION_SAMPLING, budget=blocks, sampler=sampler)
            if not job.model.fixed_point:
                row["block_matched"] = common.evaluate_setting(loaded, evaluator(job.dataset), block_matched,
                                                               size.num_samples, list(size.seeds))
            else:
                row["block_matched"] = search_and_evaluate(loaded, job, block_matched, size)
                flop_matched = replace(block_matched, budget=None, budget_gmacs=gmacs)
                row["flop_matched"] = search_and_evaluate(loaded, job, flop_matched, size)
            rows.append(row)
    return {"evaluator": evaluator(job.dataset).describe(), "sizes": size.__dict__, "rows": rows}


MEMORY_BATCH = 64  # the recipes' batch size


def gradient(job: Job, record: dict[str, Any], config: SweepConfig) -> dict[str, Any]:
    """table1's evaluation, and the memory of one training step of this method and of S-JFB at n = N and each
    method's largest m (benchmarks.train_memory.step_memory: saved activations and peak live tensors)."""
    from benchmarks.train_memory import step_memory
    n_max = job.model.fixed_point_no_grad_max_iters
    memory = {}
    for model in (replace(job.model, fixed_point_grad="sjfb"), job.model):
        m_max = {"sjfb": model.fixed_point_with_grad_max_iters, "phantom": model.fixed_point_phantom_steps,
                 "ift": 1}[model.fixed_point_grad]
        memory[model.fixed_point_grad] = step_memory(model, QUICK_SAMPLES if config.quick else MEMORY_BATCH,
                                                     (n_max, m_max))
    return {**table1(job, record, config), "step_memory": memory}


def smoothing(job: Job, record: dict[str, Any], config: SweepConfig) -> dict[str, Any]:
    """Iterations per step at one block budget, with and without reuse (DDPM): Fig. 4's smoothing curve, including
    the DiT-equivalent allocation (depth - pre - post iterations), and Fig. 6a's reuse gain."""
    size, loaded, deep = sizes(job, config.quick), load_trained(record), at_paper_depth(job.experiment)
    full_steps, full_iters = (DEPTH_SMOOTHING_DIT_STEPS, DEPTH_ITERS) if deep else (SMOOTHING_DIT_STEPS, SMOOTHING_ITERS)
    blocks, gmacs = dit_budgets(job, size.dit_steps[0] if config.quick else full_steps)
    iters = sorted({*(size.candidates if config.quick else full_iters), default_sampling_iters(job.model)})
    rows = []
    for k in (k for k in iters if blocks_per_step(job.model, k) <= blocks):
        for reuse in (False, True):
            setting = replace(common.EVALUATION_SAMPLING, budget=blocks, fixed_point_iters=k,
                              fixed_point_reuse_solution=reuse)
            rows.append({"iters": k, "reuse": reuse, **common.evaluate_setting(
                loaded, evaluator(job.dataset), setting, size.num_samples, list(size.seeds))})
    return {"evaluator": evaluator(job.dataset).describe(), "sizes": size.__dict__, "budget_blocks": blocks,
            "budget_gmacs": gmacs, "dit_equivalent_iters": default_sampling_iters(job.model), "rows": rows}


def table5(job: Job, record: dict[str, Any], config: SweepConfig) -> dict[str, Any]:
    """One budget, fixed iterations per step, DDPM (Table 5 compares training methods, not samplers)."""
    size, loaded = sizes(job, config.quick), load_trained(record)
    blocks, _ = dit_budgets(job, size.dit_steps[0] if config.quick else TABLE5_DIT_STEPS)
    setting = replace(common.EVALUATION_SAMPLING, budget=blocks, fixed_point_iters=TABLE5_ITERS)
    return {"evaluator": evaluator(job.dataset).describe(), "sizes": size.__dict__, "budget_blocks": blocks,
            "iters_per_step": TABLE5_ITERS, "sampler": "ddpm",
            **common.evaluate_setting(loaded, evaluator(job.dataset), setting, size.num_samples, list(size.seeds))}


def prepost(job: Job, record: dict[str, Any], config: SweepConfig) -> dict[str, Any]:
    """DDPM at each block budget with the best iterations per step (Fig. 7)."""
    size, loaded, rows = sizes(job, config.quick), load_trained(record), []
    for dit_steps in size.dit_steps:
        blocks, gmacs = dit_budgets(job, dit_steps)
        setting = replace(common.EVALUATION_SAMPLING, budget=blocks)
        rows.append({"dit_steps": dit_steps, "budget_blocks": blocks, "budget_gmacs": gmacs,
                     **search_and_evaluate(loaded, job, setting, size)})
    return {"evaluator": evaluator(job.dataset).describe(), "sizes": size.__dict__, "rows": rows}


# (label, --sampler, --timestep_spacing, --sampler_options) of the solvers experiment, at SOLVER_STEPS steps.
SOLVER_SETTINGS = [
    ("ddpm", "ddpm", "default", ""),
    ("ddim, trailing", "ddim", "trailing", ""),
    ("dpm++2m, trailing, no x0 clipping", "dpm++2m", "trailing", "thresholding=False"),
    ("dpm++2m, trailing", "dpm++2m", "trailing", ""),
    ("dpm++2m, trailing, final sigma_min", "dpm++2m", "trailing", "final_sigmas_type=sigma_min"),
    ("dpm++2m, default spacing", "dpm++2m", "default", ""),
    ("dpm++3m, trailing", "dpm++2m", "trailing", "solver_order=3"),
    ("dpm++3m, trailing, no lower-order final", "dpm++2m", "trailing", "solver_order=3,lower_order_final=False"),
    ("unipc, trailing", "unipc", "trailing", ""),
    ("euler, trailing", "euler", "trailing", ""),
]
SOLVER_STEPS, REFERENCE_STEPS = 10, 250


def solvers(job: Job, record: dict[str, Any], config: SweepConfig) -> dict[str, Any]:
    """The DiT under each of SOLVER_SETTINGS at 10 steps and DDPM at 250 (quick: 3 and 4 steps)."""
    size, loaded = sizes(job, config.quick), load_trained(record)
    steps, reference = (3, 4) if config.quick else (SOLVER_STEPS, REFERENCE_STEPS)
    rows = []
    for label, sampler, spacing, options in [*SOLVER_SETTINGS, (f"ddpm-{reference}", "ddpm", "default", "")]:
        setting = replace(common.EVALUATION_SAMPLING, sampler=sampler, timestep_spacing=spacing,
                          sampler_options=options, num_sampling_steps=reference if label.startswith("ddpm-") else steps)
        rows.append({"label": label, "timestep_spacing": spacing, "sampler_options": options,
                     **common.evaluate_setting(loaded, evaluator(job.dataset), setting, size.num_samples,
                                               list(size.seeds))})
    best = min(rows[:-1], key=lambda r: r["fid_mean"])
    return {"evaluator": evaluator(job.dataset).describe(), "sizes": size.__dict__, "steps": steps,
            "reference_steps": reference, "rows": rows, "best": best["label"]}


EVALUATIONS: dict[str, Callable[[Job, dict[str, Any], SweepConfig], dict[str, Any]]] = {
    "table1": table1, "smoothing": smoothing, "table5": table5, "prepost": prepost, "depth": table1,
    "depth_smoothing": smoothing, "depth_compute": table1, "depth_solvers": table1, "solvers": solvers,
    "gradient": gradient}


#################################################################################
#                              Claiming a job                                   #
#################################################################################

def claim(path: Path) -> bool:
    """Create `path` (the job's .lock, holding this worker's host and pid) unless a live worker holds it; a lock
    left by a dead worker on this host is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if holder_alive(path):
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(owner)
        return True
    return False


def holder_alive(path: Path) -> bool:
    """Whether the worker named in a lock file still runs (a lock from another host counts as alive)."""
    try:
        host, pid = path.read_text().split()
    except (OSError, ValueError):
        return False  # half-written or vanished: the writer died between creating and writing it
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#################################################################################
#                                 Running                                       #
#################################################################################

def run_job(job: Job, config: SweepConfig, out_dir: Path) -> Optional[dict[str, Any]]:
    """Train (unless sampling only) and, unless --train_only, evaluate; returns the result written, or None when
    there is nothing to write yet (training only, or a sampling-only job whose model is not trained)."""
    if job.trains or common.finished_run(job.model, job.train) is not None:
        record = common.train_digits_model(job.model, job.train)
    else:
        # Sampling only, on a model nobody trained here yet (e.g. a fresh clone, whose trainer's result is committed
        # and so never runs again): train it under the trainer job's lock, so no two workers train one run folder.
        trainer_lock = replace(job, experiment=trained_by(job.experiment)).result_path(out_dir).with_suffix(".lock")
        if not claim(trainer_lock):
            print(f"skip {describe(job)}: its model ({trained_by(job.experiment)}) is being trained by another worker")
            return None
        try:
            record = common.train_digits_model(job.model, job.train)
        finally:
            trainer_lock.unlink(missing_ok=True)
    if config.train_only:
        return None
    try:
        evaluation = EVALUATIONS[job.experiment](job, record, config)
    except NonFiniteError as error:
        # A model that samples NaN or inf (a diverged training) is a result, not a crash: claims.py lists it and
        # leaves it out of every FID mean; rerunning would only diverge again.
        print(f"{describe(job)}: {error}; recorded as non-finite")
        evaluation = {"non_finite": str(error)}
    result = {"experiment": job.experiment, "dataset": job.dataset, "configuration": job.name,
              "training_seed": job.seed, "quick": config.quick, "settings": settings(job, config.quick),
              "train": record, "evaluation": evaluation, "machine": common.machine_description()}
    write_record(job.result_path(out_dir), result)
    return result


def settings(job: Job, quick: bool) -> dict[str, Any]:
    """What claims.json records about how a model was trained."""
    model = job.model
    return {"fixed_point": model.fixed_point, "dit_depth": model_architecture(model).depth, "pre_depth": model.fixed_point_pre_depth,
            "post_depth": model.fixed_point_post_depth, "n_min": model.fixed_point_no_grad_min_iters,
            "N": model.fixed_point_no_grad_max_iters, "m_min": model.fixed_point_with_grad_min_iters,
            "M": model.fixed_point_with_grad_max_iters, "fixed_point_grad": model.fixed_point_grad,
            "phantom_steps": model.fixed_point_phantom_steps, "phantom_damping": model.fixed_point_phantom_damping,
            "ift_iters": model.fixed_point_ift_iters, "model": model.model, "image_size": model.image_size,
            "dit_equivalent_steps": QUICK_COMPUTE if quick else compute_in_dit_steps(
                trained_by(job.experiment), job.dataset, job.name),
            "steps": job.train.max_steps, "units_per_step": training_units_per_step(model),
            "training_units_per_image": training_units_per_step(model) * job.train.max_steps,
            "lr": job.train.lr, "batch_size": job.train.global_batch_size}


def describe(job: Job) -> str:
    return f"{job.experiment}/{job.dataset}/{job.name}/seed{job.seed}"


def main(argv: list[str] | None = None) -> dict:
    """Run every selected job whose result is missing and that no live worker holds."""
    config, run = common.start(NAME, SweepConfig, __doc__, argv)
    done, ran, skipped = [], [], []
    for job in jobs(config, run.out_dir):
        path = job.result_path(run.out_dir)
        if path.is_file():
            done.append(describe(job))
            continue
        lock = path.with_suffix(".lock")
        if not claim(lock):
            skipped.append(describe(job))
            continue
        try:
            start_time = time.time()
            if run_job(job, config, run.out_dir) is not None:
                ran.append(describe(job))
                print(f"{describe(job)}: written in {time.time() - start_time:.0f} s", flush=True)
        finally:
            lock.unlink(missing_ok=True)
    print(f"sweep: {len(ran)} written now, {len(done)} already there, {len(skipped)} held by other workers")
    return {"written": ran, "already_there": done, "held_by_other_workers": skipped}


if __name__ == "__main__":
    cli.run(main)
