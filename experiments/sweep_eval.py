"""How experiments.sweep evaluates a trained model, one function per experiment (EVALUATIONS).

Every number is an FID on the dataset's classifier features against all its real images, with classifier accuracy
(common.Evaluator), over the recipe's sampling seeds; no guidance, as the paper's FIDs. Budgets are written as steps
of the dataset's DiT (5, 10, 20: the paper's 140 : 280 : 560 blocks of DiT-XL/2) and turned into block passes per
image (x the DiT's depth) or, FLOP-matched, into GMACs per image (x the DiT step's MACs, cost.macs_per_step). Where
an FPDM's iterations per step are chosen, they are chosen on common.SEARCH_SEED, never on the reported seeds.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from config import SampleConfig
from cost import blocks_per_step, default_sampling_iters, macs_per_step
from experiments import common
from experiments.sweep import QUICK_SAMPLES, RECIPES, Job, SweepConfig, reference_dit

DIT_STEPS = (5, 10, 20)          # budgets, in steps of the dataset's DiT
SMOOTHING_DIT_STEPS = 10         # the smoothing / reuse sweep's budget (the paper's Fig. 4 uses its middle one)
SMOOTHING_ITERS = (1, 2, 3, 4, 6)
TABLE5_DIT_STEPS, TABLE5_ITERS = 10, 3  # Table 5's sampling: one budget, fixed iterations (as exp5)
CANDIDATE_ITERS = (1, 2, 4, 6)
DEPTH_ITERS = (1, 2, 4, 8, 12, 26)   # depth experiments: candidates and smoothing curve (26 = 28 - 1 - 1)
DEPTH_SMOOTHING_DIT_STEPS = 20       # 560 blocks of the 28-block DiT


@dataclass(frozen=True)
class Sizes:
    """How much is sampled for one job."""
    dit_steps: tuple[int, ...]
    candidates: tuple[int, ...]
    search_samples: int
    num_samples: int
    seeds: tuple[int, ...]


def sizes(job: Job, quick: bool) -> Sizes:
    """The recipe's sample sizes, or tiny ones under --quick."""
    if quick:
        return Sizes((2,), (1, 2), 4, QUICK_SAMPLES, (0,))
    recipe = RECIPES[job.dataset]
    candidates = DEPTH_ITERS if job.experiment.startswith("depth") else CANDIDATE_ITERS
    return Sizes(DIT_STEPS, candidates, recipe.search_samples, recipe.num_samples, recipe.sampling_seeds)


@functools.lru_cache(maxsize=None)
def evaluator(dataset: str) -> common.Evaluator:
    """The dataset's evaluator (its classifier and reference statistics are loaded once per process)."""
    return common.Evaluator(common.classifier_path(dataset), dataset)


def load_trained(record: dict[str, Any]) -> common.Loaded:
    """The EMA weights of a finished run."""
    return common.load(Path(record["run_dir"]) / "checkpoints" / "latest.pt")


def dit_budgets(job: Job, dit_steps: int) -> tuple[int, float]:
    """(block passes, GMACs) per image of `dit_steps` steps of the experiment's reference DiT."""
    dit = reference_dit(job.experiment, job.dataset)
    return dit_steps * blocks_per_step(dit, 0), dit_steps * macs_per_step(dit, 0) / 1e9


def search_and_evaluate(loaded: common.Loaded, job: Job, setting: SampleConfig, size: Sizes) -> dict[str, Any]:
    """The FPDM's best iterations per step (with solution reuse) within setting's block or GMAC budget: each
    candidate that fits is scored on SEARCH_SEED, the winner evaluated on the reported seeds."""
    score = evaluator(job.dataset)
    search = []
    for k in size.candidates:
        fits = (macs_per_step(loaded.config, k) <= setting.budget_gmacs * 1e9 if setting.budget is None
                else blocks_per_step(loaded.config, k) <= setting.budget)
        if fits:
            candidate = replace(setting, fixed_point_iters=k, fixed_point_reuse_solution=True)
            result = common.evaluate_setting(loaded, score, candidate, size.search_samples, [common.SEARCH_SEED])
            search.append({"iters": k, "search_fid": result["fid_mean"], "num_steps": result["num_steps"]})
    best = min(search, key=lambda r: r["search_fid"])
    chosen = replace(setting, fixed_point_iters=best["iters"], fixed_point_reuse_solution=True)
    return {**common.evaluate_setting(loaded, score, chosen, size.num_samples, list(size.seeds)),
            "best_iters": best["iters"], "reuse": True, "search": search}


def table1(job: Job, record: dict[str, Any], config: SweepConfig) -> dict[str, Any]:
    """Each of --samplers (DDPM and DDIM) at each budget: the DiT as is; the FPDM block-matched and FLOP-matched."""
    size, loaded, rows = sizes(job, config.quick), load_trained(record), []
    for dit_steps in size.dit_steps:
        blocks, gmacs = dit_budgets(job, dit_steps)
        for sampler in common.sampler_list(config.samplers, "samplers"):
            row = {"dit_steps": dit_steps, "sampler": sampler, "budget_blocks": blocks, "budget_gmacs": gmacs}
            block_matched = replace(common.EVALUATION_SAMPLING, budget=blocks, sampler=sampler)
            if not job.model.fixed_point:
                row["block_matched"] = common.evaluate_setting(loaded, evaluator(job.dataset), block_matched,
                                                               size.num_samples, list(size.seeds))
            else:
                row["block_matched"] = search_and_evaluate(loaded, job, block_matched, size)
                flop_matched = replace(block_matched, budget=None, budget_gmacs=gmacs)
                row["flop_matched"] = search_and_evaluate(loaded, job, flop_matched, size)
            rows.append(row)
    return {"evaluator": evaluator(job.dataset).describe(), "sizes": size.__dict__, "rows": rows}


def smoothing(job: Job, record: dict[str, Any], config: SweepConfig) -> dict[str, Any]:
    """Iterations per step at one block budget, with and without reuse (DDPM): Fig. 4's smoothing curve, including
    the DiT-equivalent allocation (depth - pre - post iterations), and Fig. 6a's reuse gain."""
    size, loaded, deep = sizes(job, config.quick), load_trained(record), job.experiment.startswith("depth")
    full_steps, full_iters = (DEPTH_SMOOTHING_DIT_STEPS, DEPTH_ITERS) if deep else (SMOOTHING_DIT_STEPS, SMOOTHING_ITERS)
    blocks, gmacs = dit_budgets(job, size.dit_steps[0] if config.quick else full_steps)
    iters = sorted({*(size.candidates if config.quick else full_iters), default_sampling_iters(job.model)})
    rows = []
    for k in (k for k in iters if blocks_per_step(job.model, k) <= blocks):
        for reuse in (False, True):
            setting = replace(common.EVALUATION_SAMPLING, budget=blocks, fixed_point_iters=k,
                              fixed_point_reuse_solution=reuse)
            rows.append({"iters": k, "reuse": reuse, **common.evaluate_setting(
                loaded, evaluator(job.dataset), setting, size.num_samples, list(size.seeds))})
    return {"evaluator": evaluator(job.dataset).describe(), "sizes": size.__dict__, "budget_blocks": blocks,
            "budget_gmacs": gmacs, "dit_equivalent_iters": default_sampling_iters(job.model), "rows": rows}


def table5(job: Job, record: dict[str, Any], config: SweepConfig) -> dict[str, Any]:
    """One budget, fixed iterations per step, DDPM (Table 5 compares training methods, not samplers)."""
    size, loaded = sizes(job, config.quick), load_trained(record)
    blocks, _ = dit_budgets(job, size.dit_steps[0] if config.quick else TABLE5_DIT_STEPS)
    setting = replace(common.EVALUATION_SAMPLING, budget=blocks, fixed_point_iters=TABLE5_ITERS)
    return {"evaluator": evaluator(job.dataset).describe(), "sizes": size.__dict__, "budget_blocks": blocks,
            "iters_per_step": TABLE5_ITERS, "sampler": "ddpm",
            **common.evaluate_setting(loaded, evaluator(job.dataset), setting, size.num_samples, list(size.seeds))}


def prepost(job: Job, record: dict[str, Any], config: SweepConfig) -> dict[str, Any]:
    """DDPM at each block budget with the best iterations per step (Fig. 7)."""
    size, loaded, rows = sizes(job, config.quick), load_trained(record), []
    for dit_steps in size.dit_steps:
        blocks, gmacs = dit_budgets(job, dit_steps)
        setting = replace(common.EVALUATION_SAMPLING, budget=blocks)
        rows.append({"dit_steps": dit_steps, "budget_blocks": blocks, "budget_gmacs": gmacs,
                     **search_and_evaluate(loaded, job, setting, size)})
    return {"evaluator": evaluator(job.dataset).describe(), "sizes": size.__dict__, "rows": rows}


EVALUATIONS: dict[str, Callable[[Job, dict[str, Any], SweepConfig], dict[str, Any]]] = {
    "table1": table1, "smoothing": smoothing, "table5": table5, "prepost": prepost, "depth": table1,
    "depth_smoothing": smoothing}
