"""Parameter counts of every registry size: DiT vs FPDM (one pre block, one fixed-point block, one post block).

Built on the meta device (no memory, instant), in the paper's ImageNet-256 latent setting (32x32x4 latents,
1000 classes, learned sigma). The paper (Sec. 4.1) reports DiT-XL/2 674M vs FPDM-XL/2 86M parameters (87% fewer).

    python benchmarks/param_counts.py            # all sizes -> benchmarks/results/param_counts.json
    python benchmarks/param_counts.py --quick    # XL/2 and Ti/2 only
"""
from __future__ import annotations

import argparse
from typing import Any, Sequence

from bench_common import RESULTS_DIR, format_table, limit_threads, machine_info

PAPER = {"DiT-XL/2": {"dit_params": 674e6, "fpdm_params": 86e6, "reduction_pct": 87.0}}
QUICK_MODELS = ("DiT-XL/2", "DiT-Ti/2")


#################################################################################
#                                  Counting                                     #
#################################################################################

def count_params(name: str, fixed_point: bool, *, pre_depth: int = 1, post_depth: int = 1) -> int:
    """Number of parameters of registry model `name` (FPDM when fixed_point) at ImageNet-256 latent size."""
    import torch
    from config import ModelConfig
    from models import create_model

    config = ModelConfig(model=name, image_size=256, in_channels=4, latent=True, num_classes=1000,
                         fixed_point=fixed_point, fixed_point_pre_depth=pre_depth, fixed_point_post_depth=post_depth)
    with torch.device("meta"):
        model = create_model(config)
    return sum(p.numel() for p in model.parameters())


def run(models: Sequence[str], pre_depth: int, post_depth: int) -> list[dict[str, Any]]:
    """One row per registry name: DiT params, FPDM params, ratio and reduction."""
    rows = []
    for name in models:
        dit = count_params(name, False)
        fpdm = count_params(name, True, pre_depth=pre_depth, post_depth=post_depth)
        rows.append({"model": name, "dit_params": dit, "fpdm_params": fpdm, "ratio_fpdm_over_dit": fpdm / dit,
                     "reduction_pct": 100.0 * (1 - fpdm / dit)})
    return rows


#################################################################################
#                                     CLI                                       #
#################################################################################

def build_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Only DiT-XL/2 and DiT-Ti/2 (for CI).")
    parser.add_argument("--models", default="", help="Comma-separated registry names (default: all).")
    parser.add_argument("--pre_depth", type=int, default=1, help="FPDM explicit blocks before the fixed-point block.")
    parser.add_argument("--post_depth", type=int, default=1, help="FPDM explicit blocks after the fixed-point block.")
    parser.add_argument("--out", default=str(RESULTS_DIR / "param_counts.json"), help="JSON output path.")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Count, print a table, write JSON; returns the payload."""
    args = build_parser().parse_args(argv)
    limit_threads(1)
    from models import DiT_models

    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        for name in models:
            DiT_models[name]  # ValueError naming --model's valid names
    else:
        models = list(QUICK_MODELS if args.quick else DiT_models)
    rows = run(models, args.pre_depth, args.post_depth)
    payload = {"benchmark": "param_counts", "quick": args.quick, "setting": "32x32x4 latents, 1000 classes, "
               "learned sigma; FPDM pre/post depth = %d/%d" % (args.pre_depth, args.post_depth),
               "rows": rows, "paper": PAPER, "machine": machine_info("meta")}
    print(format_table(["model", "DiT params", "FPDM params", "FPDM/DiT", "reduction %"],
                       [[r["model"], r["dit_params"], r["fpdm_params"], r["ratio_fpdm_over_dit"], r["reduction_pct"]]
                        for r in rows]))
    print("paper (XL/2): 674M vs 86M (87% fewer)")
    from records import write_json  # here, not at the top: records imports torch (threads are limited first)
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
