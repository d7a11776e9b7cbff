"""Shared helpers for the miniature reproductions in experiments/.

Everything here is a thin layer over the library: training is `train.main([...])` with explicit flags, compute
plans come from `sampling.prepare_sampling` / `allocation`, trajectories from `sampling.generate`, and
digits-FID / classifier accuracy from `classifier` (on fid.py's Frechet distance). No sampling, allocation or FID
logic is re-implemented here.

Conventions of every experiment script:
  * one command, `--out_dir` (default experiments/results/), writes `<out_dir>/<name>.json` and `<name>.png`;
  * `--quick` runs in seconds (tiny models trained for a few steps, a handful of samples) for the tests;
  * sampling seeds: seed s draws image i from generator seed `s * SEED_STRIDE + i` (sampling.py's per-image
    streams), so different seeds never share images; allocation searches use their own seed (SEARCH_SEED).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import classifier  # noqa: E402
import sampling  # noqa: E402
from checkpoint import load_checkpoint, load_model_for_sampling, save_safetensors  # noqa: E402
from config import ModelConfig, SampleConfig, model_config_from_dict  # noqa: E402
from cost import blocks_per_step, training_units_per_step  # noqa: E402,F401  (the experiments use common.*)
from records import summarize_stats, write_json  # noqa: E402

DEFAULT_OUT_DIR = REPO_ROOT / "experiments" / "results"
PRETRAINED_DIR = REPO_ROOT / "pretrained"
FPDM_CKPT = PRETRAINED_DIR / "fpdm-digits.safetensors"
DIT_CKPT = PRETRAINED_DIR / "dit-digits.safetensors"
CLASSIFIER_PATH = DEFAULT_OUT_DIR / "digits_classifier.safetensors"
CLASSIFIER_SEED, CLASSIFIER_STEPS = 0, 400
SEED_STRIDE = 1_000_000
SEARCH_SEED = 99  # allocation searches never use the seeds whose FID is reported

# The recipe shared by every digits model here (paper Sec. 4.1: v-prediction + zero terminal SNR, learned sigma).
DIFFUSION_FLAGS = ["--predict_v", "True", "--use_zero_terminal_snr", "True", "--learn_sigma", "True"]
DEFAULT_SJFB = (0, 3, 1, 3)  # (n_min, N, m_min, M): S-JFB with M = N = 3 (Table 4: 3 is as good as 6, half the cost)


#################################################################################
#                             Command line and threads                          #
#################################################################################

def base_parser(description: str) -> argparse.ArgumentParser:
    """Flags every experiment shares: --out_dir, --quick, --threads, --seeds, --num_samples, checkpoints."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out_dir", default=str(DEFAULT_OUT_DIR), help="Folder for <name>.json and <name>.png.")
    parser.add_argument("--quick", action="store_true", help="Seconds-long smoke run (tiny models, few samples).")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: robust on a shared 2-core CPU; 2 only when idle).")
    parser.add_argument("--seeds", type=int, default=None, help="Number of sampling seeds (default per script).")
    parser.add_argument("--num_samples", type=int, default=None, help="Samples per FID evaluation.")
    parser.add_argument("--classifier", default=str(CLASSIFIER_PATH), help="Cached digits classifier (safetensors).")
    return parser


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    """--fpdm_ckpt / --dit_ckpt (default: the shipped models, or tiny quick models under --quick)."""
    parser.add_argument("--fpdm_ckpt", default="", help=f"FPDM weights (default {FPDM_CKPT.relative_to(REPO_ROOT)}).")
    parser.add_argument("--dit_ckpt", default="", help=f"DiT weights (default {DIT_CKPT.relative_to(REPO_ROOT)}).")


_RUN_STARTED = {"time": time.time()}  # when the experiment started (recorded as wall_clock_s by write_result)


def setup_run(args: argparse.Namespace) -> Path:
    """Set threads, create --out_dir and return it (and start the experiment's wall-clock)."""
    _RUN_STARTED["time"] = time.time()
    torch.set_num_threads(max(1, args.threads))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def pick(args: argparse.Namespace, name: str, full: Any, quick: Any) -> Any:
    """A flag's value if given, else the script's full or quick default."""
    value = getattr(args, name, None)
    if value is not None:
        return value
    return quick if args.quick else full


#################################################################################
#                                   Training                                    #
#################################################################################

def model_flags(fixed_point: bool, sjfb: Sequence[int] = DEFAULT_SJFB, model: str = "DiT-Ti/2",
                pre_post: int = 1) -> list[str]:
    """train.py flags of a digits DiT (8 blocks) or FPDM (`pre_post` pre + fixed-point block + `pre_post` post
    blocks, 1 by default) with S-JFB bounds."""
    flags = ["--model", model, "--dataset", "digits", *DIFFUSION_FLAGS]
    if fixed_point:
        n_lo, n_hi, m_lo, m_hi = sjfb
        flags += ["--fixed_point", "True", "--fixed_point_pre_depth", str(pre_post),
                  "--fixed_point_post_depth", str(pre_post),
                  "--fixed_point_no_grad_min_iters", str(n_lo), "--fixed_point_no_grad_max_iters", str(n_hi),
                  "--fixed_point_with_grad_min_iters", str(m_lo), "--fixed_point_with_grad_max_iters", str(m_hi)]
    else:
        flags += ["--fixed_point", "False"]  # explicit, so the recorded command reads the same either way
    return flags


def config_from_flags(flags: Sequence[str]) -> ModelConfig:
    """The ModelConfig train.py would build from `flags` (to count training units before training)."""
    import train
    model_config, _, _, _ = train.parse_configs(list(flags))
    return model_config


def steps_for_units(total_units: float, config: ModelConfig) -> int:
    """Training steps that spend `total_units` block-pass units per image for this model."""
    return max(1, int(round(total_units / training_units_per_step(config))))


def train_digits_model(name: str, flags: Sequence[str], steps: int, lr: float, out_dir: Path, seed: int = 0,
                       batch_size: int = 64, sample_grid: bool = True) -> dict[str, Any]:
    """Train with train.main and explicit flags; returns the run folder, command, wall-clock, final loss, params."""
    train_flags = ["--global_batch_size", str(batch_size), "--lr", str(lr), "--max_steps", str(steps),
                   "--global_seed", str(seed), "--log_every", str(max(1, min(100, steps))),
                   "--ckpt_every", str(steps), "--output_dir", str(out_dir), "--output_subdir", name,
                   "--sample_grid", str(sample_grid)]
    argv = [*flags, *train_flags]
    import train
    start = time.time()
    run_dir = Path(train.main(argv))
    seconds = time.time() - start
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"run_dir": str(run_dir), "command": "python train.py " + " ".join(argv), "steps": steps,
            "wall_clock_s": seconds, "final_loss": metrics[-1]["loss"], "final_mse": metrics[-1]["mse"],
            "loss_curve": [(m["step"], m["loss"]) for m in metrics], "num_params": summary["num_params"],
            "threads": torch.get_num_threads()}


def export_ema(run_dir: str | Path, path: str | Path, half: bool = True) -> Path:
    """Publish a run's EMA weights (fp16 to keep pretrained/ small) with checkpoint.save_safetensors."""
    payload = load_checkpoint(Path(run_dir) / "checkpoints" / "latest.pt", flag="--run_dir")
    config = model_config_from_dict(payload["config"]["model"])
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in payload["ema"].items()}
    save_safetensors(state, config, path)
    return Path(path)


def quick_models(out_dir: Path) -> tuple[Path, Path]:
    """Tiny FPDM and DiT (3 training steps) for --quick runs, trained once per out_dir and reused."""
    folder = out_dir / "quick_models"
    fpdm_path, dit_path = folder / "fpdm.safetensors", folder / "dit.safetensors"
    for path, fixed_point in ((fpdm_path, True), (dit_path, False)):
        if not path.is_file():
            record = train_digits_model(path.stem, model_flags(fixed_point), steps=3, lr=1e-3,
                                        out_dir=folder / "runs", sample_grid=False)
            export_ema(record["run_dir"], path)
    return fpdm_path, dit_path


def resolve_checkpoints(args: argparse.Namespace, out_dir: Path) -> tuple[Path, Path]:
    """(FPDM, DiT) weights: the flags, else the shipped models, else (under --quick) tiny quick models."""
    if args.quick and not (args.fpdm_ckpt and args.dit_ckpt):
        quick_fpdm, quick_dit = quick_models(out_dir)
        return Path(args.fpdm_ckpt or quick_fpdm), Path(args.dit_ckpt or quick_dit)
    fpdm_path, dit_path = Path(args.fpdm_ckpt or FPDM_CKPT), Path(args.dit_ckpt or DIT_CKPT)
    for path, flag in ((fpdm_path, "--fpdm_ckpt"), (dit_path, "--dit_ckpt")):
        if not path.is_file():
            raise FileNotFoundError(f"{flag}: {path} does not exist; run experiments/exp1_equal_compute.py first")
    return fpdm_path, dit_path


def load_model(path: str | Path) -> tuple[torch.nn.Module, ModelConfig]:
    """Load weights for sampling (eval mode, CPU) via checkpoint.load_model_for_sampling."""
    return load_model_for_sampling(path, device="cpu", flag="--ckpt")


#################################################################################
#                                   Sampling                                    #
#################################################################################

def sample_config(*, budget: int, iters: Optional[int] = None, ddim: bool = False, reuse: bool = False,
                  solver: str = "iteration", schedule: str = "fixed", steps: Optional[int] = None,
                  anderson_memory: int = 5) -> SampleConfig:
    """A SampleConfig for a budgeted run (no guidance, as the paper's FID numbers); None steps/iters are derived."""
    return SampleConfig(budget=budget, fixed_point_iters=iters, ddim=ddim, fixed_point_reuse_solution=reuse,
                        fixed_point_solver=solver, iteration_schedule=schedule, cfg_scale=1.0,
                        num_sampling_steps=steps, anderson_memory=anderson_memory)


def draw_samples(model: torch.nn.Module, model_config: ModelConfig, config: SampleConfig,
                 num_samples: int, seed: int, batch_size: int = 500) -> dict[str, Any]:
    """Draw `num_samples` images (random labels, per-image seeds) with sampling.py; images, labels, plan, stats."""
    config, plan, notes = sampling.prepare_sampling(model_config, config, model=model)
    indices = list(range(num_samples))
    base_seed = seed * SEED_STRIDE
    labels = sampling.image_labels(indices, base_seed, model_config.num_classes, label_mode="random")
    drawn = sampling.generate(model, model_config, config, plan, indices, labels, seed=base_seed, batch_size=batch_size)
    stats = summarize_stats(plan, drawn.trajectories, drawn.counts)
    return {"images": drawn.images, "labels": None if labels is None else labels.numpy(), "plan": plan,
            "stats": stats, "trajectories": drawn.trajectories, "notes": notes}


#################################################################################
#                                  Evaluation                                   #
#################################################################################

class DigitsEvaluator:
    """digits-FID (vs all 1797 real digits) and classifier accuracy with a cached classifier (classifier.py)."""

    def __init__(self, classifier_path: str | Path = CLASSIFIER_PATH):
        self.classifier, self.classifier_test_accuracy = classifier.load_or_train_digits_classifier(
            str(classifier_path), seed=CLASSIFIER_SEED, steps=CLASSIFIER_STEPS, flag="--classifier")
        self.reference = classifier.digits_reference_stats(self.classifier, "all")
        self.feature_extractor = classifier.digits_feature_extractor_id(self.classifier)

    def __call__(self, images: np.ndarray, labels: Optional[np.ndarray]) -> dict[str, float]:
        """{'fid', 'accuracy'} of uint8 (N, H, W, C) samples."""
        metrics = classifier.evaluate_digits_samples(self.classifier, images, labels, self.reference)
        return {"fid": float(metrics["digits_fid"]), "accuracy": float(metrics.get("classifier_accuracy", math.nan))}

    def describe(self) -> dict[str, Any]:
        """What the numbers are measured with (recorded in every JSON)."""
        return {"feature_extractor": self.feature_extractor, "classifier_test_accuracy": self.classifier_test_accuracy,
                "reference": "all 1797 sklearn digits", "note": classifier.DIGITS_FID_NOTE}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def evaluate_setting(model: torch.nn.Module, model_config: ModelConfig, evaluator: DigitsEvaluator,
                     config: SampleConfig, num_samples: int, seeds: Sequence[int],
                     keep_trajectories: bool = False) -> dict[str, Any]:
    """FID and accuracy over sampling seeds (mean ± std), with the plan and the block passes actually spent."""
    per_seed, stats, trajectories, plan, start = [], None, [], None, time.time()
    for seed in seeds:
        drawn = draw_samples(model, model_config, config, num_samples, seed)
        per_seed.append({"seed": seed, **evaluator(drawn["images"], drawn["labels"])})
        stats, plan = drawn["stats"], drawn["plan"]
        if keep_trajectories:
            trajectories.extend(drawn["trajectories"])
    fid_mean, fid_std = mean_std([r["fid"] for r in per_seed])
    acc_mean, acc_std = mean_std([r["accuracy"] for r in per_seed])
    result = {"fid_mean": fid_mean, "fid_std": fid_std, "accuracy_mean": acc_mean, "accuracy_std": acc_std,
              "per_seed": per_seed, "num_samples": num_samples, "num_steps": plan.num_steps,
              "iters_per_step": plan.iters_per_step, "planned_blocks_per_image": plan.blocks_per_image,
              "blocks_per_image_max": stats["blocks_per_image_max"], "within_budget": stats["within_budget"],
              "sampler": "ddim" if config.ddim else "ddpm", "seconds": time.time() - start}
    if keep_trajectories:
        result["_trajectories"] = trajectories
        result["_plan"] = plan
    return result


def fpdm_iteration_grid(budget: int, candidates: Sequence[int], pre: int = 1, post: int = 1) -> list[int]:
    """Iterations per step from `candidates` that buy at least one step at `budget` (each step costs pre + k + post)."""
    return [k for k in candidates if budget // (pre + k + post) >= 1]


#################################################################################
#                                 Writing results                               #
#################################################################################

def write_result(out_dir: Path, name: str, payload: dict[str, Any]) -> Path:
    """Write <out_dir>/<name>.json (atomic, indented) with the command line that produced it."""
    payload = {"experiment": name, "command": "python " + " ".join([_relative_script(sys.argv[0]), *sys.argv[1:]]),
               "machine": machine_description(), "wall_clock_s": time.time() - _RUN_STARTED["time"], **payload}
    path = out_dir / f"{name}.json"
    write_json(path, _strip_private(payload))
    return path


def _relative_script(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return path


def _strip_private(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_private(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_strip_private(v) for v in value]
    return value


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


def save_figure(figure: Any, out_dir: Path, name: str) -> Path:
    """Save and close a matplotlib figure as <out_dir>/<name>.png."""
    path = out_dir / f"{name}.png"
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(figure)
    return path
