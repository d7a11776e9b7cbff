"""What shared S-JFB draws save in data-parallel training: the expected DDP step time with per-rank (n, m) draws
against one draw shared by all ranks (analytic, instant).

    python -m benchmarks.sjfb_rank_skew            # FPDM-XL/2, 1 pre + 1 post, M = N = 12 (paper Sec. 4.1)

A DDP step waits for the slowest rank. When each rank draws its own n ~ U{N_min..N}, m ~ U{M_min..M} (Algorithm 1),
the step costs the maximum over the ranks' training MACs; with the draw shared (training.py), every rank does the
same work and the step costs one draw's MACs. Training MACs come from cost.training_macs_per_image (forward 1x,
backward 2x, the n no-grad iterations forward only), so this assumes a compute-bound step.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import product
from typing import Any, Optional, Sequence

import cli
from benchmarks.bench_common import RESULTS_DIR, format_table, parse_config, require_at_least, write_payload
from config import ModelConfig, flag

PAPER_FPDM = ModelConfig(model="DiT-XL/2", image_size=256, in_channels=4, latent=True, num_classes=1000,
                         fixed_point=True, predict_v=True, use_zero_terminal_snr=True)


def step_cost_distribution(model_config: ModelConfig) -> dict[int, float]:
    """{training MACs per image of one step: probability} over S-JFB's uniform (n, m) draw."""
    from cost import training_macs_per_image
    ns = range(model_config.fixed_point_no_grad_min_iters, model_config.fixed_point_no_grad_max_iters + 1)
    ms = range(model_config.fixed_point_with_grad_min_iters, model_config.fixed_point_with_grad_max_iters + 1)
    weight = 1.0 / (len(ns) * len(ms))
    distribution: dict[int, float] = {}
    for n, m in product(ns, ms):
        cost = training_macs_per_image(model_config, (n, m))
        distribution[cost] = distribution.get(cost, 0.0) + weight
    return distribution


def expected_max(distribution: dict[int, float], ranks: int) -> float:
    """E[max of `ranks` independent draws] = sum_c c * (F(c)^R - F(c-)^R), F the distribution function."""
    total, below = 0.0, 0.0
    for cost in sorted(distribution):
        at_or_below = below + distribution[cost]
        total += cost * (at_or_below ** ranks - below ** ranks)
        below = at_or_below
    return total


@dataclass
class SkewConfig:
    """Flags of the rank-skew benchmark."""
    max_iters: int = flag(12, "M = N, the S-JFB bounds (paper: 12).")
    ranks: str = flag("1,2,4,8,16,32,64", "Comma-separated numbers of data-parallel ranks.")
    out: Optional[str] = flag(str(RESULTS_DIR / "sjfb_rank_skew.json"), "JSON output path (None: do not write).")

    def validate(self) -> "SkewConfig":
        """M = N >= 1; returns self."""
        require_at_least(self, ("max_iters",))
        return self


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Print and write the expected step time of per-rank draws relative to shared ones."""
    config = parse_config(SkewConfig, __doc__, argv)
    model_config = replace(PAPER_FPDM, fixed_point_no_grad_max_iters=config.max_iters,
                           fixed_point_with_grad_max_iters=config.max_iters).validate()
    distribution = step_cost_distribution(model_config)
    shared = sum(cost * p for cost, p in distribution.items())
    rows = [{"ranks": r, "per_rank_over_shared": expected_max(distribution, int(r)) / shared}
            for r in config.ranks.split(",")]
    payload = {"benchmark": "sjfb_rank_skew", "model": "FPDM-XL/2, 1 pre + 1 post, 32x32x4 latents",
               "sjfb": {"N": config.max_iters, "M": config.max_iters}, "shared_gmacs_per_image": shared / 1e9,
               "rows": rows}
    print(format_table(["ranks", "step time, per-rank draws / shared draw"],
                       [[row["ranks"], row["per_rank_over_shared"]] for row in rows]))
    if config.out:
        write_payload(config.out, payload)
    return payload


if __name__ == "__main__":
    cli.run(main)
