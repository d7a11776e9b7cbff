"""Analytic multiply-accumulates (MACs) per image of DiT and FPDM, from cost.py only (no model is run; instant).

Two tables, for DiT-Ti/S/B/L/XL at patch 2 (32x32x4 latents, T = 256 tokens; Ti also on the 8x8 digits, T = 16):
  * per step: one DiT block vs one FPDM fixed-point iteration (the block plus the injection MLP, 6 T D^2 more), and
    a whole DiT step vs a whole FPDM step at the default iterations (depth - pre - post, the same block count);
  * at equal blocks per image (the paper's accounting, Sec. 4.2): a budget of B block passes spent by a DiT in
    B / depth steps and by an FPDM (pre = post = 1) in B // (k + 2) steps of k iterations each.
The paper counts transformer-block passes only; MACs also count the injection projection, which makes an FPDM
iteration about 1.48x a DiT-XL/2 block.

    python -m benchmarks.macs            # all sizes -> benchmarks/results/macs.json
    python -m benchmarks.macs --quick    # XL/2 and Ti/2 digits only
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import cli
from benchmarks.bench_common import RESULTS_DIR, format_table, machine_info, parse_config, write_payload
from config import UserError, flag

LATENTS = dict(image_size=256, in_channels=4, latent=True, num_classes=1000)   # 32x32x4 latents: T = 256
DIGITS = dict(image_size=8, in_channels=1, latent=False, num_classes=10)       # 8x8 digits: T = 16
# label -> (registry name, data settings)
SETTINGS = {
    "Ti/2 digits 8x8": ("DiT-Ti/2", DIGITS),
    "Ti/2 latents 32x32x4": ("DiT-Ti/2", LATENTS),
    "S/2 latents 32x32x4": ("DiT-S/2", LATENTS),
    "B/2 latents 32x32x4": ("DiT-B/2", LATENTS),
    "L/2 latents 32x32x4": ("DiT-L/2", LATENTS),
    "XL/2 latents 32x32x4": ("DiT-XL/2", LATENTS),
}
QUICK_SETTINGS = ("Ti/2 digits 8x8", "XL/2 latents 32x32x4")
DIT_STEPS = (10, 20)            # equal-block budgets = depth x these DiT steps (XL/2: 280 and 560 blocks)
ITERS = (1, 2, 5, 12, 26)       # FPDM iterations per step at the equal-block budgets (plus the default)


#################################################################################
#                                   Tables                                      #
#################################################################################

def model_configs(setting: str, pre_depth: int = 1, post_depth: int = 1) -> tuple[Any, Any]:
    """(DiT config, FPDM config) of one setting."""
    from config import ModelConfig
    name, data = SETTINGS[setting]
    dit = ModelConfig(model=name, fixed_point=False, fixed_point_pre_depth=pre_depth,
                      fixed_point_post_depth=post_depth, **data)
    return dit, replace(dit, fixed_point=True)


def step_row(setting: str) -> dict[str, Any]:
    """Per-block and per-step MACs of one setting (cost.py)."""
    import cost
    dit, fpdm = model_configs(setting)
    arch = cost.architecture(dit.model)
    tokens = (dit.input_size // arch.patch_size) ** 2
    block = cost.macs_per_block(arch.hidden_size, tokens, arch.mlp_ratio)
    iteration = block + cost.macs_injection(arch.hidden_size, tokens)
    iters = cost.default_sampling_iters(fpdm)
    dit_step, fpdm_step = cost.macs_per_step(dit), cost.macs_per_step(fpdm, iters)
    return {"setting": setting, "model": dit.model, "depth": arch.depth, "hidden_size": arch.hidden_size,
            "tokens": tokens, "block_macs": block, "iteration_macs": iteration,
            "iteration_over_block": iteration / block, "default_iters": iters,
            "dit_step_blocks": cost.blocks_per_step(dit, 0), "fpdm_step_blocks": cost.blocks_per_step(fpdm, iters),
            "dit_step_macs": dit_step, "fpdm_step_macs": fpdm_step, "dit_step_gmacs": dit_step / 1e9, "fpdm_step_gmacs": fpdm_step / 1e9,
            "fpdm_over_dit_step": fpdm_step / dit_step}


def equal_block_rows(setting: str, dit_steps: Sequence[int], iters: Sequence[int]) -> list[dict[str, Any]]:
    """GMACs per image of a DiT and an FPDM spending the same block budget (depth x DiT steps)."""
    import cost
    dit, fpdm = model_configs(setting)
    depth = cost.blocks_per_step(dit, 0)
    rows = []
    for steps in dit_steps:
        budget = steps * depth
        dit_macs = steps * cost.macs_per_step(dit)
        for k in sorted(set(iters) | {cost.default_sampling_iters(fpdm)}):
            per_step_blocks = cost.blocks_per_step(fpdm, k)
            fpdm_steps = budget // per_step_blocks       # as plan_for_model: whole steps within the budget
            if fpdm_steps < 1:
                continue
            fpdm_macs = fpdm_steps * cost.macs_per_step(fpdm, k)
            fpdm_blocks = fpdm_steps * per_step_blocks
            rows.append({"setting": setting, "model": dit.model, "budget_blocks": budget, "dit_steps": steps,
                         "dit_macs": dit_macs, "dit_gmacs": dit_macs / 1e9, "iters_per_step": k, "fpdm_steps": fpdm_steps,
                         "fpdm_blocks": fpdm_blocks, "fpdm_macs": fpdm_macs, "fpdm_gmacs": fpdm_macs / 1e9,
                         "fpdm_over_dit_gmacs": fpdm_macs / dit_macs,
                         "fpdm_over_dit_gmacs_per_block": (fpdm_macs / fpdm_blocks) / (dit_macs / budget)})
    return rows


def per_block_pivot(steps: Sequence[dict[str, Any]],
                    equal: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows): FPDM/DiT GMACs per block pass spent, one row per setting, one column per k in ITERS and one
    for the default k (the ratio does not depend on the budget)."""
    rows = []
    for step in steps:
        by_k = {r["iters_per_step"]: r["fpdm_over_dit_gmacs_per_block"] for r in equal
                if r["setting"] == step["setting"]}
        default = step["default_iters"]
        rows.append([step["setting"]] + [by_k.get(k) for k in ITERS] + [f"{by_k.get(default, float('nan')):.3g} "
                                                                         f"(k = {default})"])
    return ["setting"] + [f"k = {k}" for k in ITERS] + ["default k"], rows


#################################################################################
#                                     CLI                                       #
#################################################################################

@dataclass
class MacsConfig:
    """Flags of the analytic MAC table."""
    quick: bool = flag(False, "Only XL/2 latents and Ti/2 digits (for CI).")
    settings: Optional[str] = flag(None, f"Comma-separated settings from: {', '.join(SETTINGS)} (None: all).")
    out: str = flag(str(RESULTS_DIR / "macs.json"), "JSON output path.")

    def validate(self) -> "MacsConfig":
        """Known settings; returns self."""
        for setting in self.setting_list():
            if setting not in SETTINGS:
                raise UserError(f"--settings: unknown setting {setting!r}; valid: {', '.join(SETTINGS)}")
        return self

    def setting_list(self) -> list[str]:
        """The settings to tabulate."""
        if self.settings is None:
            return list(QUICK_SETTINGS if self.quick else SETTINGS)
        return [s.strip() for s in self.settings.split(",") if s.strip()]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Tabulate, print, write JSON; returns the payload."""
    config = parse_config(MacsConfig, __doc__, argv)
    settings = config.setting_list()
    steps = [step_row(s) for s in settings]
    equal = [row for s in settings for row in equal_block_rows(s, DIT_STEPS, ITERS)]
    print(format_table(["setting", "T", "D", "block GMACs", "iteration GMACs", "iteration/block", "default k",
                        "DiT step GMACs", "FPDM step GMACs", "FPDM/DiT step"],
                       [[r["setting"], r["tokens"], r["hidden_size"], r["block_macs"] / 1e9,
                         r["iteration_macs"] / 1e9, r["iteration_over_block"], r["default_iters"],
                         r["dit_step_gmacs"], r["fpdm_step_gmacs"], r["fpdm_over_dit_step"]] for r in steps]))
    print()
    print("FPDM/DiT GMACs per block pass at k iterations per FPDM step:")
    print(format_table(*per_block_pivot(steps, equal)))
    payload = {"benchmark": "macs", "quick": config.quick,
               "setting": "analytic (cost.py), per image, no guidance; FPDM pre = post = 1",
               "steps": steps, "equal_blocks": equal, "machine": machine_info("none (analytic)")}
    write_payload(config.out, payload)
    return payload


if __name__ == "__main__":
    cli.run(main)
