"""Parameter counts of every registry size: DiT vs FPDM (one pre block, one fixed-point block, one post block).

Built on the meta device (no memory, instant), in the paper's ImageNet-256 latent setting (32x32x4 latents,
1000 classes, learned sigma). The paper (Sec. 4.1) reports DiT-XL/2 674M vs FPDM-XL/2 86M parameters (87% fewer).

    python -m benchmarks.param_counts            # all sizes -> benchmarks/results/param_counts.json
    python -m benchmarks.param_counts --quick    # XL/2 and Ti/2 only
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import cli
from benchmarks.bench_common import (RESULTS_DIR, format_table, limit_threads, machine_info, parse_config,
                                     require_at_least, write_payload)
from config import flag

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

@dataclass
class ParamCountsConfig:
    """Flags of the parameter-count benchmark."""
    quick: bool = flag(False, "Only DiT-XL/2 and DiT-Ti/2 (for CI).")
    models: Optional[str] = flag(None, "Comma-separated registry names (None: all, or XL/2 and Ti/2 with --quick).")
    pre_depth: int = flag(1, "FPDM explicit blocks before the fixed-point block.")
    post_depth: int = flag(1, "FPDM explicit blocks after the fixed-point block.")
    out: str = flag(str(RESULTS_DIR / "param_counts.json"), "JSON output path.")

    def validate(self) -> "ParamCountsConfig":
        """Depths are >= 0; returns self."""
        require_at_least(self, ("pre_depth", "post_depth"), low=0)
        return self


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Count, print a table, write JSON; returns the payload."""
    config = parse_config(ParamCountsConfig, __doc__, argv)
    limit_threads(1)
    from models import DiT_models

    if config.models is not None:
        models = [m.strip() for m in config.models.split(",") if m.strip()]
        for name in models:
            DiT_models[name]  # ValueError naming --model's valid names
    else:
        models = list(QUICK_MODELS if config.quick else DiT_models)
    rows = run(models, config.pre_depth, config.post_depth)
    payload = {"benchmark": "param_counts", "quick": config.quick, "setting": "32x32x4 latents, 1000 classes, "
               "learned sigma; FPDM pre/post depth = %d/%d" % (config.pre_depth, config.post_depth),
               "rows": rows, "paper": PAPER, "machine": machine_info("meta")}
    print(format_table(["model", "DiT params", "FPDM params", "FPDM/DiT", "reduction %"],
                       [[r["model"], r["dit_params"], r["fpdm_params"], r["ratio_fpdm_over_dit"], r["reduction_pct"]]
                        for r in rows]))
    print("paper (XL/2): 674M vs 86M (87% fewer)")
    write_payload(config.out, payload)
    return payload


if __name__ == "__main__":
    cli.run(main)
