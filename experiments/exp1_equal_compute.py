"""Experiment 1: DiT vs FPDM trained for the same training compute on digits; ships the two models.

Both models: DiT-Ti/2 width (hidden 128, 4 heads, patch 2), class-conditional digits at 8x8, v-prediction + zero
terminal SNR, learned sigma, AdamW at the same lr, batch 64, seed 0. The DiT has 8 blocks; the FPDM has 1 pre block,
one fixed-point block and 1 post block, trained with S-JFB (n ~ U{0..N}, m ~ U{1..M}, Algorithm 1).

Equal compute is counted in transformer-block passes per image (forward = 1 unit, backward = 2 units), not
wall-clock: wall-clock on a shared 2-core CPU is noisy (other jobs), while block passes are what the paper's cost
model counts and are machine-independent. DiT: 3 * 8 = 24 units per step. FPDM: 3 * (pre + post) + E[n] + 3 * E[m]
(the n no-grad iterations are forward-only). The FPDM's step count is derived from the DiT's.

The EMA weights are exported (fp16) to pretrained/{fpdm,dit}-digits.safetensors (`python sample.py` uses the FPDM).

    python experiments/exp1_equal_compute.py            # full run (~15 min on 2 cores)
    python experiments/exp1_equal_compute.py --quick --out_dir /tmp/exp1
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "exp1_equal_compute"


def main(argv: list[str] | None = None) -> dict:
    """Train both models for equal block-pass compute, export them and write the record and loss plot."""
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dit_steps", type=int, default=None, help="DiT training steps (FPDM steps derived).")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (both models).")
    parser.add_argument("--sjfb", default="0,3,1,3", help="FPDM S-JFB bounds n_min,N,m_min,M.")
    parser.add_argument("--export_dir", default=None,
                        help="Where to write the shipped weights (default pretrained/; --quick: <out_dir>/pretrained).")
    args = parser.parse_args(argv)
    out_dir = common.setup_run(args)
    dit_steps = common.pick(args, "dit_steps", 1000, 4)
    export_dir = Path(args.export_dir or (out_dir / "pretrained" if args.quick else common.PRETRAINED_DIR))
    sjfb = tuple(int(v) for v in args.sjfb.split(","))
    if len(sjfb) != 4:
        raise ValueError(f"--sjfb must be four integers n_min,N,m_min,M (got {args.sjfb!r})")

    dit_flags = common.model_flags(False)
    fpdm_flags = common.model_flags(True, sjfb)
    dit_config, fpdm_config = common.config_from_flags(dit_flags), common.config_from_flags(fpdm_flags)
    units = dit_steps * common.training_units_per_step(dit_config)
    fpdm_steps = common.steps_for_units(units, fpdm_config)

    runs_dir = out_dir / "runs" / NAME
    records = {}
    for name, flags, steps, config in (("dit", dit_flags, dit_steps, dit_config),
                                       ("fpdm", fpdm_flags, fpdm_steps, fpdm_config)):
        record = common.train_digits_model(f"{name}-digits", flags, steps, args.lr, runs_dir,
                                           sample_grid=not args.quick)
        record["units_per_step"] = common.training_units_per_step(config)
        record["total_units"] = record["units_per_step"] * steps
        record["exported_to"] = str(common.export_ema(record["run_dir"], export_dir / f"{name}-digits.safetensors"))
        records[name] = record
        print(f"{name}: {record['num_params']:,} params, {steps} steps, {record['wall_clock_s']:.0f}s, "
              f"final loss {record['final_loss']:.4f}")

    payload = {
        "compute_measure": "transformer-block passes per image (forward 1, backward 2)",
        "sjfb": {"n_min": sjfb[0], "N": sjfb[1], "m_min": sjfb[2], "M": sjfb[3]},
        "lr": args.lr, "batch_size": 64, "seed": 0, "quick": args.quick,
        "param_ratio_fpdm_over_dit": records["fpdm"]["num_params"] / records["dit"]["num_params"],
        "models": records,
    }
    common.write_result(out_dir, NAME, payload)
    plot(out_dir, records)
    return payload


def plot(out_dir: Path, records: dict) -> None:
    """Training loss against training compute (block-pass units) for both models."""
    plt = common.pyplot()
    if plt is None:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, record in records.items():
        steps, losses = zip(*record["loss_curve"])
        units = [s * record["units_per_step"] for s in steps]
        axis.plot(units, losses, marker=".", label=f"{name.upper()} ({record['num_params'] / 1e6:.2f}M params, "
                                                   f"{record['steps']} steps)")
    axis.set_xlabel("training compute (block-pass units per image: fwd 1, bwd 2)")
    axis.set_ylabel("training loss (mean over log window)")
    axis.set_yscale("log")
    axis.set_title("Exp. 1: equal training compute on digits")
    axis.legend()
    common.save_figure(figure, out_dir, NAME)


if __name__ == "__main__":
    main()
