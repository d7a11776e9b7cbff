"""The resumable sweep at the paper's settings: several training seeds per configuration, on digits and MNIST-5k.

One job is one (experiment, dataset, configuration, training seed). It trains its model (or reuses the finished run
folder of exactly the same configs, or resumes an interrupted one from its latest checkpoint), evaluates it and writes
`<out_dir>/sweep/<experiment>/<dataset>/<configuration>/seed<k>.json`. A job whose JSON exists is skipped, so the
sweep can be run in several sittings; several workers may run the same command at once (a job is claimed by a
`.lock` file holding the worker's pid; the job of a worker that died is taken over). `python -m experiments.claims`
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
  table5     the three training methods at N = 6 and 12, sampled at one budget (as exp5).
  prepost    FPDMs with 0, 1, 2, 4 pre/post layers at the three budgets (as exp7).
  depth      Table 1 at the paper's depth ratio: the FPDM (M = N = 12) against the 28-block DiT it replaces (the
             depth of DiT-XL/2) at 140 / 280 / 560 blocks (5 / 10 / 20 of its steps), and DiTs of depth 4, 8, 12
             at the same training compute (beyond the paper). The FPDM's iterations per step are searched over
             1, 2, 4, 8, 12, 26 (26: the 28-block DiT's equivalent).
  depth_smoothing  sampling only, on depth's FPDMs: Fig. 4 and 6a at 560 blocks over the same iterations.

    python -m experiments.sweep                                      # every job, in priority order
    python -m experiments.sweep --experiments table1 --datasets mnist5k --training_seeds 0,1,2
    python -m experiments.sweep --quick --out_dir /tmp/sweep         # seconds: tiny runs of every experiment
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import cli
from config import ModelConfig, TrainConfig, UserError, build_config, flag, load_preset
from cost import model_architecture, training_units_per_step
from experiments import common
from records import read_json, write_json

NAME = "sweep"
EXPERIMENTS = ("table1", "smoothing", "table5", "prepost", "depth", "depth_smoothing")
TRAINED_BY = {"smoothing": "table1", "depth_smoothing": "depth"}  # sampling-only experiments: whose models they use
DATASETS = ("mnist5k", "digits")
PAPER_SJFB = (0, 12, 1, 12)  # (n_min, N, m_min, M): S-JFB with M = N = 12 (paper Sec. 4.1)
TABLE5_NS = (6, 12)
PREPOST_DEPTHS = (0, 1, 2, 4)
PAPER_DIT_DEPTH = 28  # DiT-XL/2's blocks: the baseline the paper's FPDM replaces (its budgets are 5/10/20 steps)
DIT_DEPTHS = (4, 8, 12, PAPER_DIT_DEPTH)


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
    # digits: 1,000 DiT steps as exp1 for Table 1; 300 as exp5 for the ablations (~100 s per model at 1 thread).
    "digits": DatasetRecipe("configs/digits.yaml", {"table1": 1000, "table5": 300, "prepost": 300, "depth": 2800},
                            search_samples=250, num_samples=500, sampling_seeds=(0, 1)),
}
QUICK_COMPUTE, QUICK_SAMPLES = 2, 8


@dataclass
class SweepConfig(common.ExperimentConfig):
    """Flags of the sweep (--seeds and --num_samples of ExperimentConfig are not used: see RECIPES)."""
    experiments: str = flag(",".join(EXPERIMENTS), "Comma list of experiments to run (table1, smoothing, table5, "
                                                   "prepost).")
    datasets: str = flag(",".join(DATASETS), "Comma list of datasets (mnist5k, digits).")
    training_seeds: str = flag("0,1,2", "Comma list of training seeds (TrainConfig.global_seed).")
    train_only: bool = flag(False, "Only train (or resume) the models of the jobs; evaluate in a later run.")
    samplers: str = flag("ddpm,ddim", "Comma list of --sampler names of the table1 and depth evaluations (the "
                                      "paper: ddpm,ddim; also dpm++2m, unipc, euler). Results already written "
                                      "are kept: pass a new --out_dir to evaluate other samplers.")


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
    return replace(dit, depth=PAPER_DIT_DEPTH).validate() if experiment.startswith("depth") else dit


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


def training_config(experiment: str, dataset: str, name: str, seed: int, model: ModelConfig, runs_dir: Path,
                    quick: bool) -> TrainConfig:
    """The run of one model: the preset's training fields, seed `seed`, and the experiment's compute in steps."""
    preset = load_preset(common.REPO_ROOT / RECIPES[dataset].preset, ModelConfig, TrainConfig)
    dit_steps = QUICK_COMPUTE if quick else RECIPES[dataset].compute[experiment]
    steps = common.steps_for_units(dit_steps * training_units_per_step(dit_model(dataset)), model)
    return replace(build_config(TrainConfig, preset), global_seed=seed, max_steps=steps,
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
    return selected


def names(text: str, allowed: Sequence[str], flag_name: str) -> list[str]:
    """A comma list of names, each one of `allowed`."""
    chosen = [piece.strip() for piece in text.split(",") if piece.strip()]
    unknown = [name for name in chosen if name not in allowed]
    if unknown or not chosen:
        raise UserError(f"--{flag_name}: expected a comma list of {', '.join(allowed)} (got {text!r})")
    return chosen


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
    if not job.trains and common.finished_run(job.model, job.train) is None:
        print(f"skip {describe(job)}: its model ({trained_by(job.experiment)}) is not trained yet")
        return None
    record = common.train_digits_model(job.model, job.train)
    if config.train_only:
        return None
    from experiments import sweep_eval
    evaluation = sweep_eval.EVALUATIONS[job.experiment](job, record, config)
    result = {"experiment": job.experiment, "dataset": job.dataset, "configuration": job.name,
              "training_seed": job.seed, "quick": config.quick, "settings": settings(job, config.quick),
              "train": record, "evaluation": evaluation, "machine": common.machine_description()}
    write_json(job.result_path(out_dir), common._strip_private(result))
    return result


def settings(job: Job, quick: bool) -> dict[str, Any]:
    """What claims.json records about how a model was trained."""
    model = job.model
    return {"fixed_point": model.fixed_point, "dit_depth": model_architecture(model).depth, "pre_depth": model.fixed_point_pre_depth,
            "post_depth": model.fixed_point_post_depth, "n_min": model.fixed_point_no_grad_min_iters,
            "N": model.fixed_point_no_grad_max_iters, "m_min": model.fixed_point_with_grad_min_iters,
            "M": model.fixed_point_with_grad_max_iters, "model": model.model, "image_size": model.image_size,
            "dit_equivalent_steps": QUICK_COMPUTE if quick else RECIPES[job.dataset].compute[
                trained_by(job.experiment)],
            "steps": job.train.max_steps, "units_per_step": training_units_per_step(model),
            "training_units_per_image": training_units_per_step(model) * job.train.max_steps,
            "lr": job.train.lr, "batch_size": job.train.global_batch_size}


def describe(job: Job) -> str:
    return f"{job.experiment}/{job.dataset}/{job.name}/seed{job.seed}"


def main(argv: list[str] | None = None) -> dict:
    """Run every selected job whose result is missing and that no live worker holds."""
    config, run = common.start(NAME, SweepConfig, __doc__, argv, {}, {})
    common.sampler_list(config.samplers, "samplers")  # a bad name fails now, not after training
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
