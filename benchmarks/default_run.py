"""The README's main job, measured: train the digits FPDM with the shipped preset, then score it beside the shipped
pretrained/fpdm-digits.safetensors at the same sampling settings.

    python -m benchmarks.default_run           # the full job (minutes on CPU): run it on a quiet machine
    python -m benchmarks.default_run --quick   # a few training steps and samples (tests/test_benchmarks.py)

1. `accelerate launch --config_file aconfs/1_process.yaml train.py --config configs/digits.yaml` (the README's
   command) into a fresh folder, in a subprocess, timed by the wall clock (start-up included, as a user waits).
2. For the new EMA weights and for the shipped ones: --num_samples unguided samples with sample.py's defaults except
   --cfg_scale 1 (250 DDPM steps, the model's default fixed-point iterations, image i of class i mod 10, seed 0).
3. classifier.py's digits CNN (the cached experiments/results/digits_classifier.safetensors) scores both: accuracy
   of the predicted classes against the requested ones, and digits-FID against all 1,797 real digits. FID from a
   few hundred samples is biased upwards; both models get the same number, so the ratio is the comparison.

Writes benchmarks/results/default_run.json (times, accuracy and digits-FID of both models, trained / shipped ratios)
and prints a table.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import cli
from benchmarks.bench_common import (REPO, RESULTS_DIR, format_table, machine_info, parse_config,
                                     require_at_least, write_payload)
from config import UserError, flag

PRESET = REPO / "configs" / "digits.yaml"
LAUNCH_CONFIG = REPO / "aconfs" / "1_process.yaml"
SHIPPED = REPO / "pretrained" / "fpdm-digits.safetensors"
CLASSIFIER = REPO / "experiments" / "results" / "digits_classifier.safetensors"
QUICK_TRAIN_FLAGS = ["--max_steps", "4", "--log_every", "2", "--sample_grid", "False"]
QUICK_SAMPLE_FLAGS = ["--num_sampling_steps", "5"]


#################################################################################
#                                    Steps                                      #
#################################################################################

def run_command(command: list[str], log_path: Path) -> float:
    """Run `command` from the repository root with its output in `log_path`; the wall-clock seconds it took."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{' '.join(command)} failed (exit {result.returncode}); end of {log_path}:\n{tail}")
    return seconds


def train(work_dir: Path, quick: bool) -> dict[str, Any]:
    """The README's training command into work_dir/run: its time and the EMA weights it published."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH_CONFIG),
               str(REPO / "train.py"), "--config", str(PRESET), "--output_dir", str(work_dir),
               "--output_subdir", "run", *(QUICK_TRAIN_FLAGS if quick else [])]
    seconds = run_command(command, work_dir / "train.log")
    from records import read_json
    summary = read_json(work_dir / "run" / "summary.json", "summary.json")
    return {"command": command[1:], "seconds": seconds, "steps": summary["step"],
            "num_params": summary["num_params"], "weights": str(work_dir / "run" / "ema.safetensors")}


def sample_and_score(weights: str, out_dir: Path, num_samples: int, quick: bool, classifier: Any,
                     reference: Any) -> dict[str, Any]:
    """sample.py (defaults but --cfg_scale 1) in a subprocess, then accuracy and digits-FID of its PNGs."""
    import numpy as np
    from classifier import evaluate_digits_samples
    from images import load_png_rgb
    from records import read_json

    command = [sys.executable, str(REPO / "sample.py"), "--ckpt", weights, "--cfg_scale", "1",
               "--num_samples", str(num_samples), "--output_dir", str(out_dir), *(QUICK_SAMPLE_FLAGS if quick else [])]
    seconds = run_command(command, out_dir.parent / f"{out_dir.name}.log")
    record = read_json(out_dir / "setup.json", "setup.json")
    images = np.stack([load_png_rgb(out_dir / f"{i:06d}.png") for i in range(num_samples)])  # (N, 8, 8, 3) uint8
    labels = np.asarray(record["setup"]["labels"], dtype=np.int64)                            # (N,)
    metrics = evaluate_digits_samples(classifier, images, labels, reference)
    return {"weights": weights, "sample_seconds": seconds, "sampler": record["setup"]["sampler"],
            "num_sampling_steps": record["setup"]["plan"]["num_steps"],
            "blocks_per_image": record["stats"]["blocks_per_image_max"],
            "classifier_accuracy": metrics["classifier_accuracy"], "digits_fid": metrics["digits_fid"],
            "predicted_class_histogram": metrics["predicted_class_histogram"]}


#################################################################################
#                                     CLI                                       #
#################################################################################

@dataclass
class DefaultRunConfig:
    """Flags of the default-run benchmark."""
    quick: bool = flag(False, f"Train {QUICK_TRAIN_FLAGS[1]} steps and sample with {QUICK_SAMPLE_FLAGS[1]} steps.")
    num_samples: Optional[int] = flag(None, "Samples per model (None: 200; 10 with --quick).")
    work_dir: Optional[str] = flag(None, "Fresh folder for the run and the samples (None: a new temporary folder, "
                                           "kept and printed).")
    out: str = flag(str(RESULTS_DIR / "default_run.json"), "JSON output path.")

    def validate(self) -> "DefaultRunConfig":
        """--num_samples >= 1 and --work_dir new or empty; returns self."""
        require_at_least(self, ("num_samples",))
        if self.work_dir and Path(self.work_dir).exists() and any(Path(self.work_dir).iterdir()):
            raise UserError(f"--work_dir {self.work_dir}: must be a new or empty folder")
        return self


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, sample, score, print a table and write JSON; returns the payload."""
    args = parse_config(DefaultRunConfig, __doc__, argv)
    num_samples = args.num_samples or (10 if args.quick else 200)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="fpdm-default-run-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    from classifier import digits_reference_stats, load_or_train_digits_classifier

    trained = train(work_dir, args.quick)
    classifier, classifier_accuracy = load_or_train_digits_classifier(str(CLASSIFIER))
    reference = digits_reference_stats(classifier, "all")
    models = {name: sample_and_score(weights, work_dir / f"samples_{name}", num_samples, args.quick, classifier,
                                     reference)
              for name, weights in (("trained", trained["weights"]), ("shipped", str(SHIPPED)))}
    new, old = models["trained"], models["shipped"]
    payload = {
        "benchmark": "default_run", "quick": args.quick, "work_dir": str(work_dir),
        "train": trained,
        "sampling": {"num_samples": num_samples, "cfg_scale": 1.0, "seed": 0,
                     "flags": ["--cfg_scale", "1", *(QUICK_SAMPLE_FLAGS if args.quick else [])]},
        "classifier": {"path": str(CLASSIFIER), "test_accuracy": classifier_accuracy,
                       "fid_reference": "all 1797 sklearn digits"},
        "models": models,
        "ratio_trained_over_shipped": {"digits_fid": new["digits_fid"] / old["digits_fid"],
                                       "classifier_accuracy": new["classifier_accuracy"]
                                       / max(old["classifier_accuracy"], 1e-12)},
        "machine": {**machine_info("cpu"), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
    }
    print(f"train.py --config configs/digits.yaml: {trained['steps']} steps in {trained['seconds']:.1f}s")
    print(format_table(["weights", "accuracy", "digits-FID", "sampling s", "blocks/image"],
                       [[name, m["classifier_accuracy"], m["digits_fid"], m["sample_seconds"], m["blocks_per_image"]]
                        for name, m in models.items()]))
    ratio = payload["ratio_trained_over_shipped"]
    print(f"trained / shipped: digits-FID x{ratio['digits_fid']:.3g}, accuracy x{ratio['classifier_accuracy']:.3g} "
          f"({num_samples} samples each)")
    write_payload(args.out, payload)
    print(f"run and samples in {work_dir}")
    return payload


if __name__ == "__main__":
    cli.run(main)
