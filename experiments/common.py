"""What the sweep (experiments/sweep.py) and export_models.py share: flags and the run context, training through
the library (reusing a finished run, resuming an interrupted one), loading weights, sampling and scoring.

Everything here is a thin layer over the library: models and runs are ModelConfig / TrainConfig / SampleConfig
objects, training goes through `run_training`, sampling through `generate` (the one call into each), block costs
come from cost.py, compute plans from allocation.py (via sampling), and FID / classifier accuracy from `classifier`
(on fid.py's Frechet distance). Sampling seeds: seed s draws image i from generator seed `s * SEED_STRIDE + i`
(sampling.py's per-image streams), so different seeds never share images; allocation searches use their own seed
(SEARCH_SEED).
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

import classifier
import sampling
from allocation import IterationPlan, planned_macs
from checkpoint import load_model_for_sampling, load_safetensors, save_safetensors
from config import ModelConfig, SampleConfig, TrainConfig, UserError, build_config, check_choices, flag, parse_flags
from cost import training_units_per_step
from metrics import feature_metrics, inception_score_record
from records import read_json, to_jsonable, write_json, write_record

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "experiments" / "results"
PRETRAINED_DIR = REPO_ROOT / "pretrained"
CLASSIFIER_SEED = 0  # the cached classifiers were trained with seed 0 and their recipe's default steps
SEED_STRIDE = 1_000_000
SEARCH_SEED = 99  # allocation searches never use the seeds whose FID is reported
# FID sampling as the paper reports it: no guidance; large batches (image i is the same whatever the batch size).
EVALUATION_SAMPLING = SampleConfig(cfg_scale=1.0, batch_size=500, device="cpu")


#################################################################################
#                          Flags and the run context                            #
#################################################################################


@dataclass
class ExperimentConfig:
    """Flags every experiment script shares."""
    out_dir: str = flag(str(DEFAULT_OUT_DIR), "Folder for the results (and runs/ for the training runs).")
    quick: bool = flag(False, "Seconds-long smoke run (tiny models, few samples).")
    threads: int = flag(1, "torch intra-op threads (1: robust on a shared 2-core CPU; 2 only when idle).")

    def validate(self) -> "ExperimentConfig":
        if self.threads < 1:
            raise UserError(f"--threads: must be >= 1 (got {self.threads})")
        check_choices(self)
        return self


@dataclass(frozen=True)
class Run:
    """One experiment invocation: its name, output folder, the command that reproduces it and when it started."""
    name: str
    out_dir: Path
    command: str
    started: float


def start(name: str, cls: type, doc: str, argv: Sequence[str] | None) -> tuple[Any, Run]:
    """Parse `argv` into `cls`, set the threads and create --out_dir; returns the validated config and the run
    context."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config = build_config(cls, parse_flags(doc, [cls], argv)).validate()
    torch.set_num_threads(config.threads)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return config, Run(name, out_dir, shlex.join(["python", "-m", f"experiments.{name}", *argv]), time.time())


def int_list(text: str, flag: str) -> list[int]:
    """A comma-separated list of integers ("1,2,4") from flag --`flag`."""
    try:
        values = [int(piece) for piece in text.split(",") if piece.strip()]
    except ValueError:
        raise UserError(f"--{flag}: expected comma-separated integers such as 1,2,4 (got {text!r})") from None
    if not values:
        raise UserError(f"--{flag}: expected at least one integer (got {text!r})")
    return values


#################################################################################
#                                   Training                                    #
#################################################################################

def steps_for_units(total_units: float, config: ModelConfig) -> int:
    """Training steps that spend `total_units` block-pass units per image for this model."""
    return max(1, int(round(total_units / training_units_per_step(config))))


def finished_run(model_config: ModelConfig, train_config: TrainConfig) -> Optional[Path]:
    """The run folder of these configs if a finished run of exactly them is there (summary.json written), else None:
    an experiment run again, or after an interruption, reuses the models it already trained."""
    run_dir = Path(train_config.output_dir) / train_config.output_subdir
    if not (run_dir / "summary.json").is_file():
        return None
    return run_dir if holds_run_of(run_dir, model_config, train_config) else None


def holds_run_of(run_dir: Path, model_config: ModelConfig, train_config: TrainConfig) -> bool:
    """Whether run_dir/config.json records exactly these configs (whether or not the run was resumed)."""
    if not (run_dir / "config.json").is_file():
        return False
    recorded = read_json(run_dir / "config.json", flag="--output_dir")
    wanted = to_jsonable({"model": asdict(model_config), "train": asdict(train_config)})
    defaults = to_jsonable({"model": asdict(ModelConfig()), "train": asdict(TrainConfig())})
    if not isinstance(recorded, dict) or not all(isinstance(recorded.get(part), dict) for part in wanted):
        return False
    # A config.json written before a field existed was trained with that field's default.
    recorded = {part: {**defaults[part], **recorded[part]} for part in wanted}
    recorded["train"]["resume"] = wanted["train"]["resume"]
    return recorded == wanted


def run_training(model_config: ModelConfig, train_config: TrainConfig) -> Path:
    """Train with the library and return the run folder (the one place experiments call training). A finished run
    of the same configs is reused and an interrupted one resumed from its latest checkpoint; any other content of
    the folder is refused by training_loop."""
    from checkpoint import TRAINING_KEYS, load_checkpoint
    from training import training_loop
    finished = finished_run(model_config, train_config)
    if finished is not None:
        return finished
    run_dir = Path(train_config.output_dir) / train_config.output_subdir
    latest = run_dir / "checkpoints" / "latest.pt"
    if holds_run_of(run_dir, model_config, train_config):
        if latest.is_file():
            payload = load_checkpoint(str(latest), flag="--resume", require=TRAINING_KEYS)
            return training_loop(model_config, replace(train_config, resume=str(run_dir)), payload)
        # Interrupted before its first checkpoint: only this run's own logs are there, and it starts over.
        print(f"{run_dir}: interrupted before its first checkpoint; training it from the start")
        shutil.rmtree(run_dir)
    return training_loop(model_config, train_config)


def train_command(model_config: ModelConfig, train_config: TrainConfig) -> str:
    """The equivalent `python train.py` command (model, fixed_point, dataset and every non-default field), recorded
    so a run can be repeated by hand."""
    tokens = ["python", "train.py"]
    for config in (model_config, train_config):
        for f in fields(config):
            value = getattr(config, f.name)
            if f.name in ("model", "fixed_point", "dataset") or value != f.default:
                tokens += [f"--{f.name}", str(value)]
    return shlex.join(tokens)


def train_digits_model(model_config: ModelConfig, train_config: TrainConfig) -> dict[str, Any]:
    """Train and summarise: run folder, configs and command, wall-clock, final loss, loss curve, parameters."""
    start_time, reused = time.time(), finished_run(model_config, train_config) is not None
    run_dir = run_training(model_config, train_config)
    timing = run_dir / "training_seconds.json"  # kept beside the run so a reused run reports its own training time
    if not reused:
        write_json(timing, {"wall_clock_s": time.time() - start_time})
    seconds = read_json(timing, flag="--output_dir")["wall_clock_s"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = read_json(run_dir / "summary.json", flag="--output_dir")
    if summary["step"] != train_config.max_steps:  # e.g. --epochs stopped it first: its compute would be miscounted
        raise UserError(f"{run_dir} trained {summary['step']} steps, not --max_steps {train_config.max_steps} "
                        f"(raise --epochs {train_config.epochs})")
    return {"run_dir": str(run_dir), "command": train_command(model_config, train_config),
            "config": {"model": asdict(model_config), "train": asdict(train_config)},
            "steps": train_config.max_steps, "wall_clock_s": seconds, "final_loss": metrics[-1]["loss"],
            "final_mse": metrics[-1]["mse"], "loss_curve": [(m["step"], m["loss"]) for m in metrics],
            "num_params": summary["num_params"], "threads": torch.get_num_threads(), "reused_run": reused}


def export_ema(run_dir: str | Path, path: str | Path, half: bool = True) -> Path:
    """Publish a run's EMA weights (fp16 to keep pretrained/ small) with checkpoint.save_safetensors."""
    state, config = load_safetensors(Path(run_dir) / "ema.safetensors", flag="--output_dir")
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in state.items()}
    save_safetensors(state, config, path)
    return Path(path)


@dataclass
class Loaded:
    """A model loaded for sampling, with its weights file and ModelConfig."""
    path: Path
    model: torch.nn.Module
    config: ModelConfig


def load(path: str | Path) -> Loaded:
    """Load weights for sampling (eval mode, CPU) via checkpoint.load_model_for_sampling."""
    return Loaded(Path(path), *load_model_for_sampling(path, device="cpu", flag="--ckpt"))


#################################################################################
#                                   Sampling                                    #
#################################################################################

@dataclass
class Drawn:
    """Images drawn by `generate` with the plan they followed and what each batch's trajectory spent."""
    images: np.ndarray                       # (N, H, W, C) uint8
    labels: Optional[np.ndarray]             # (N,) class labels, None for an unconditional model
    plan: IterationPlan
    trajectories: list[sampling.TrajectoryStats]  # one per batch
    stats: dict[str, Any]                    # records.summarize_stats over the batches


def generate(model: torch.nn.Module, model_config: ModelConfig, config: SampleConfig) -> Drawn:
    """config.num_samples images, image i from seed config.seed + i with a random label, in batches of
    config.batch_size (the one place experiments call the sampler)."""
    config, plan, _ = sampling.prepare_sampling(model_config, config, model=model)
    indices = list(range(config.num_samples))
    labels = sampling.image_labels(indices, config.seed, model_config.num_classes, label_mode="random")
    drawn = sampling.generate(model, model_config, config, plan, indices, labels, seed=config.seed,
                              batch_size=config.batch_size)
    stats = drawn.summary(plan, model_config, config)
    return Drawn(drawn.images, None if labels is None else labels.numpy(), plan, drawn.trajectories, stats)


#################################################################################
#                                  Evaluation                                   #
#################################################################################

def classifier_path(dataset: str) -> Path:
    """The cached classifier of a built-in dataset (trained and written there on first use)."""
    return DEFAULT_OUT_DIR / f"{dataset}_classifier.safetensors"


class Evaluator:
    """FID on a built-in dataset's classifier features (vs all its real images) and classifier accuracy, with the
    cached classifier of classifier.py: digits-FID for digits (8x8), mnist5k-FID for MNIST-5k (28x28)."""

    def __init__(self, classifier_path: str | Path, dataset: str):
        self.dataset = dataset
        self.classifier, self.classifier_test_accuracy = classifier.load_or_train_classifier(
            dataset, str(classifier_path), seed=CLASSIFIER_SEED, flag="--classifier")
        self.reference = classifier.digits_reference_stats(self.classifier, "all")
        self.feature_extractor = classifier.digits_feature_extractor_id(self.classifier)
        self.real_features = classifier.digits_features(  # KID and precision/recall need the features themselves
            self.classifier, classifier.classifier_spec(dataset).load_uint8("all")[0])

    def __call__(self, images: np.ndarray, labels: Optional[np.ndarray]) -> dict[str, Any]:
        """{'fid', 'accuracy'} and metrics.py's (precision, recall, kid, inception_score, ...; None with a reason
        when there are too few samples) of uint8 (N, H, W, C) samples."""
        metrics = classifier.evaluate_digits_samples(self.classifier, images, labels, self.reference)
        more = feature_metrics(self.real_features, classifier.digits_features(self.classifier, images), self.reference)
        more.update(inception_score_record(classifier.digits_logits(self.classifier, images)))
        return {**more, "fid": float(metrics["digits_fid"]),
                "accuracy": float(metrics.get("classifier_accuracy", math.nan))}

    def describe(self) -> dict[str, Any]:
        """What the numbers are measured with (recorded in every JSON)."""
        spec = classifier.classifier_spec(self.dataset)
        return {"dataset": self.dataset, "feature_extractor": self.feature_extractor,
                "classifier_test_accuracy": self.classifier_test_accuracy,
                "reference": f"all real images of {spec.source}", "note": spec.fid_note}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def evaluate_setting(loaded: Loaded, evaluator: Evaluator, config: SampleConfig, num_samples: int,
                     seeds: Sequence[int]) -> dict[str, Any]:
    """FID and accuracy over sampling seeds (mean ± std), with the plan and the block passes actually spent."""
    per_seed, drawn, start_time = [], None, time.time()
    for seed in seeds:
        drawn = generate(loaded.model, loaded.config, replace(config, seed=seed * SEED_STRIDE,
                                                              num_samples=num_samples))
        per_seed.append({"seed": seed, **evaluator(drawn.images, drawn.labels)})
    fid_mean, fid_std = mean_std([r["fid"] for r in per_seed])
    acc_mean, acc_std = mean_std([r["accuracy"] for r in per_seed])
    more = {f"{name}_{stat}": value for name in ("precision", "recall", "kid", "inception_score") for stat, value in
            zip(("mean", "std"), mean_std([math.nan if r[name] is None else r[name] for r in per_seed]))}
    result = {"fid_mean": fid_mean, "fid_std": fid_std, "accuracy_mean": acc_mean, "accuracy_std": acc_std,
              "per_seed": per_seed, "num_samples": num_samples, "num_steps": drawn.plan.num_steps,
              "iters_per_step": drawn.plan.iters_per_step, "planned_blocks_per_image": drawn.plan.blocks_per_image,
              "blocks_per_image_max": drawn.stats["blocks_per_image_max"],
              "within_budget": drawn.stats["within_budget"],
              "planned_gmacs_per_image": planned_macs(loaded.config, drawn.plan) / 1e9, "sampler": config.resolved_sampler,
              "seconds": time.time() - start_time, **more}
    return result


#################################################################################
#                                 Writing results                               #
#################################################################################

def write_result(run: Run, payload: dict[str, Any]) -> Path:
    """Write <out_dir>/<name>.json (atomic, indented, paths relative) with the command line that produced it."""
    payload = {"experiment": run.name, "command": run.command, "machine": machine_description(),
               "wall_clock_s": time.time() - run.started, **payload}
    path = run.out_dir / f"{run.name}.json"
    write_record(path, payload)
    return path


def machine_description() -> dict[str, Any]:
    """CPU count, torch threads and version (the numbers are CPU-only)."""
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available()}


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (plots skipped with a message) if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return None
    return plt


def save_figure(plt: Any, figure: Any, path: Path) -> Path:
    """Save and close a matplotlib figure."""
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
