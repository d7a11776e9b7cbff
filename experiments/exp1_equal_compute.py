"""Experiment 1: DiT vs FPDM trained for the same training compute on digits; ships the two models.

Both models: DiT-Ti/2 width (hidden 128, 4 heads, patch 2), class-conditional digits at 8x8, v-prediction + zero
terminal SNR, learned sigma, AdamW at the same lr, batch 64, seed 0. The DiT has 8 blocks; the FPDM has 1 pre block,
one fixed-point block and 1 post block, trained with S-JFB (n ~ U{0..N}, m ~ U{1..M}, Algorithm 1).

Equal compute is counted in transformer-block passes per image (forward = 1 unit, backward = 2 units), not
wall-clock: wall-clock on a shared 2-core CPU is noisy (other jobs), while block passes are what the paper's cost
model counts and are machine-independent (cost.training_units_per_step: DiT 3 * 8 = 24 units per step, FPDM
3 * (pre + post) + E[n] + 3 * E[m], the n no-grad iterations being forward-only). The FPDM's step count is derived
from the DiT's.

The EMA weights are exported (fp16) to pretrained/{fpdm,dit}-digits.safetensors (`python sample.py` uses the FPDM).

    python -m experiments.exp1_equal_compute            # full run (~15 min on 2 cores)
    python -m experiments.exp1_equal_compute --quick --out_dir /tmp/exp1
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import cli
from config import UserError, flag
from cost import training_units_per_step
from experiments import common

NAME = "exp1_equal_compute"
FULL, QUICK = {"dit_steps": 1000}, {"dit_steps": 4}


@dataclass
class Exp1Config(common.ExperimentConfig):
    """Flags of experiment 1."""
    dit_steps: Optional[int] = flag(None, "DiT training steps; the FPDM's are derived (None: 1000, --quick 4).")
    lr: float = flag(1e-3, "AdamW learning rate (both models).")
    sjfb: str = flag("0,3,1,3", "FPDM S-JFB bounds n_min,N,m_min,M.")
    export_dir: Optional[str] = flag(None, "Where to write the shipped weights (None: pretrained/; --quick: "
                                             "<out_dir>/pretrained).")


def main(argv: list[str] | None = None) -> dict:
    """Train both models for equal block-pass compute, export them and write the record and loss plot."""
    config, run = common.start(NAME, Exp1Config, __doc__, argv, FULL, QUICK)
    export_dir = Path(config.export_dir or (run.out_dir / "pretrained" if config.quick else common.PRETRAINED_DIR))
    sjfb = tuple(common.int_list(config.sjfb, "sjfb"))
    if len(sjfb) != 4:
        raise UserError(f"--sjfb: must be four integers n_min,N,m_min,M (got {config.sjfb!r})")

    dit_config, fpdm_config = common.digits_model(False), common.digits_model(True, sjfb)
    units = config.dit_steps * training_units_per_step(dit_config)
    fpdm_steps = common.steps_for_units(units, fpdm_config)

    runs_dir = run.out_dir / "runs" / NAME
    records = {}
    for name, model_config, steps in (("dit", dit_config, config.dit_steps), ("fpdm", fpdm_config, fpdm_steps)):
        train_config = common.digits_training(f"{name}-digits", steps, config.lr, runs_dir,
                                              sample_grid=not config.quick)
        record = common.train_digits_model(model_config, train_config)
        record["units_per_step"] = training_units_per_step(model_config)
        record["total_units"] = record["units_per_step"] * steps
        record["exported_to"] = str(common.export_ema(record["run_dir"], export_dir / f"{name}-digits.safetensors"))
        records[name] = record
        print(f"{name}: {record['num_params']:,} params, {steps} steps, {record['wall_clock_s']:.0f}s, "
              f"final loss {record['final_loss']:.4f}")

    payload = {
        "compute_measure": "transformer-block passes per image (forward 1, backward 2)",
        "sjfb": {"n_min": sjfb[0], "N": sjfb[1], "m_min": sjfb[2], "M": sjfb[3]},
        "lr": config.lr, "batch_size": common.DIGITS_TRAINING.global_batch_size,
        "seed": common.DIGITS_TRAINING.global_seed, "quick": config.quick,
        "param_ratio_fpdm_over_dit": records["fpdm"]["num_params"] / records["dit"]["num_params"],
        "models": records,
    }
    return common.finish(run, payload, lambda plt: plot(plt, records))


def plot(plt: Any, records: dict) -> Any:
    """Training loss against training compute (block-pass units) for both models."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, record in records.items():
        steps, losses = zip(*record["loss_curve"])
        units = [s * record["units_per_step"] for s in steps]
        axis.plot(units, losses, marker=".", label=f"{name.upper()} ({record['num_params'] / 1e6:.2f}M params, "
                                                   f"{record['steps']} steps)")
    axis.set_xlabel("training compute (block-pass units per image: fwd 1, bwd 2)")
    axis.set_yscale("log")
    common.finish_axis(axis, "training loss (mean over log window)", "Exp. 1: equal training compute on digits")
    return figure


if __name__ == "__main__":
    cli.run(main)
