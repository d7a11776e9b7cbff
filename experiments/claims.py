"""experiments/results/claims.json and RESULTS.md's summary table, from the result files (nothing typed by hand).

One entry per paper claim: the paper's numbers, ours per dataset with the spread over training seeds, the settings
(M, N, depths, training compute, training seeds, whether they are the paper's), a verdict per dataset, and the files
the numbers come from. The evidence per dataset (e.g. mnist5k, digits) is the sweep (experiments/sweep.py) at the
paper's settings, >= 1 training seed; a FID difference counts only if Welch's t-test over training seeds gives
p < 0.05 ("exceeds the spread"); with one seed only the direction can be read.
Verdicts: agrees (every comparison the claim makes goes the paper's way), partly (some do), disagrees (none do),
not measured.

    python -m experiments.claims            # writes claims.json and rewrites the summary block of RESULTS.md
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

import cli
from config import ModelConfig, build_config, flag, parse_flags
from cost import mean_training_macs_per_image
from experiments.sweep import (COMPUTE_LEVELS, COMPUTE_MODELS, COMPUTE_SAMPLERS, DIT_DEPTHS, GRADIENTS, PAPER_DIT_DEPTH,
                               TRAINED_BY)
from records import write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
ALPHA = 0.05
BEGIN, END = "<!-- claims.py: begin -->", "<!-- claims.py: end -->"
DIT_STEPS_TO_PAPER_BLOCKS = {5: 140, 10: 280, 20: 560}
DEPTH_CONFIGS = (*(f"dit{d}" for d in DIT_DEPTHS), "fpdm")  # the depth experiment's configurations
DEPTH_BASELINE = f"dit{PAPER_DIT_DEPTH}"  # the DiT the paper's FPDM replaces (DiT-XL/2's 28 blocks)
DEPTH_ID_SUFFIX = f"_{DEPTH_BASELINE}"  # claim ids measured against it: table1_block_matched_dit28, ...
PAPER_TABLE1 = {  # paper blocks -> sampler -> (DiT FID, FPDM FID)
    140: {"ddpm": (148.0, 85.8), "ddim": (110.0, 33.9)},
    280: {"ddpm": (80.9, 43.3), "ddim": (35.2, 22.4)},
    560: {"ddpm": (37.9, 26.1), "ddim": (16.5, 19.6)},
}


@dataclass
class ClaimsConfig:
    """Flags of claims."""
    results_dir: str = flag(str(RESULTS), "Folder holding sweep/ (the sweep's result files).")
    results_md: str = flag(str(ROOT / "RESULTS.md"), "Markdown file whose summary block is rewritten ('': none).")
    include_quick: bool = flag(False, "Also read the sweep's --quick results (for tests; never for RESULTS.md).")


#################################################################################
#                                Statistics                                     #
#################################################################################

def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std and count of per-training-seed values."""
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "n": len(array), "values": [float(v) for v in array]}


def compare(lower_is_better_a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Is a's FID below b's beyond the spread over training seeds? Welch's t-test (two-sided) when both sides have
    >= 2 seeds; otherwise only the direction is known."""
    a, result = lower_is_better_a, {"a": spread(lower_is_better_a), "b": spread(b)}
    result["a_better"] = result["a"]["mean"] < result["b"]["mean"]
    if len(a) >= 2 and len(b) >= 2:
        from scipy.stats import ttest_ind
        p = float(ttest_ind(a, b, equal_var=False).pvalue)
        result.update(welch_p=p if math.isfinite(p) else 1.0, exceeds_spread=math.isfinite(p) and p < ALPHA)
    else:
        result.update(welch_p=None, exceeds_spread=None)
    return result


def fid_ratio(comparison: dict[str, Any]) -> float:
    """a's mean FID over b's, of a compare(a, b) result (below 1: a is better)."""
    return comparison["a"]["mean"] / comparison["b"]["mean"]


def model_label(name: str) -> str:
    """A sweep configuration's name as prose: dit28 -> DiT-28, fpdm -> FPDM, phantom -> FPDM (phantom)."""
    return name.replace("dit", "DiT-").replace("fpdm", "FPDM").replace("phantom", "FPDM (phantom)")


def winner(comparison: dict[str, Any], a: str, b: str) -> str:
    """a, b, or 'tie' (difference within the spread); with one seed, the direction alone."""
    if comparison["exceeds_spread"] is False:
        return "tie"
    return a if comparison["a_better"] else b


def verdict(matches: Sequence[bool]) -> str:
    """agrees / partly / disagrees from whether each comparison went the paper's way."""
    if not matches:
        return "not measured"
    return "agrees" if all(matches) else "partly" if any(matches) else "disagrees"


def table1_verdict(cells: Sequence[dict[str, Any]]) -> str:
    """Table 1's verdict: decided by the cells where the paper's FPDM wins (a DiT win the paper also has is no
    support for FPDM on its own); 'agrees' also needs the paper's one DiT win (DDIM at 560 blocks)."""
    core = verdict([c["winner"] == "FPDM" for c in cells if c["paper_winner"] == "FPDM"])
    others = [c["winner"] == c["paper_winner"] for c in cells if c["paper_winner"] != "FPDM"]
    return "partly" if core == "agrees" and not all(others) else core


def fmt(s: dict[str, Any], digits: int = 2) -> str:
    """'mean ± std (n=k)' of a spread; one seed has no spread: 'mean (n=1)'."""
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f} (n=1)"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} (n={s['n']})"


#################################################################################
#                                 Reading results                               #
#################################################################################

@dataclass
class Sweep:
    """The sweep's result files: (experiment, dataset, configuration) -> list of per-seed results, and the runs whose
    samples were non-finite (sweep.run_job), kept apart so that no FID mean includes them."""
    root: Path
    results: dict[tuple[str, str, str], list[dict[str, Any]]]
    non_finite: list[dict[str, Any]]

    @classmethod
    def read(cls, results_dir: Path, include_quick: bool = False) -> "Sweep":
        results: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        non_finite = []
        for path in sorted((results_dir / "sweep").glob("*/*/*/seed*.json")):
            record = json.loads(path.read_text())
            if record.get("quick") and not include_quick:
                continue
            record["_path"] = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
            key = (record["experiment"], record["dataset"], record["configuration"])
            if "non_finite" in record["evaluation"]:
                non_finite.append({"experiment": key[0], "dataset": key[1], "configuration": key[2],
                                   "training_seed": record["training_seed"], "final_loss": record["train"]["final_loss"],
                                   "reason": record["evaluation"]["non_finite"], "file": record["_path"]})
            else:
                results.setdefault(key, []).append(record)
        return cls(results_dir, results, non_finite)

    def get(self, experiment: str, dataset: str, configuration: str) -> list[dict[str, Any]]:
        return sorted(self.results.get((experiment, dataset, configuration), []), key=lambda r: r["training_seed"])

    def datasets(self, experiment: str) -> list[str]:
        return sorted({d for (e, d, _) in self.results if e == experiment})

    def settings(self, experiment: str, dataset: str, configurations: Sequence[str]) -> dict[str, Any]:
        """M, N, depths, compute and training seeds of the runs behind a comparison."""
        out = {}
        for name in configurations:
            records = self.get(experiment, dataset, name)
            if records:
                s = records[0]["settings"]
                out[name] = {**{k: s[k] for k in ("model", "image_size", "pre_depth", "post_depth", "N", "M",
                                                   "dit_equivalent_steps", "steps", "training_units_per_image")},
                             "dit_depth": s.get("dit_depth", 8),  # runs before --depth existed are 8-block DiT-Ti
                             "fixed_point": s["fixed_point"], "training_seeds": [r["training_seed"] for r in records],
                             "paper_settings": not s["fixed_point"] or s["N"] in (6, 12)}
        return out

    def files(self, experiment: str, dataset: str, configurations: Sequence[str]) -> list[str]:
        return [r["_path"] for name in configurations for r in self.get(experiment, dataset, name)]


def fid_of(record: dict[str, Any]) -> float:
    return float(record["fid_mean"])


#################################################################################
#                                   The claims                                  #
#################################################################################

def table1_claim(sweep: Sweep, matching: str, experiment: str = "table1") -> dict[str, Any]:
    """Table 1: FPDM vs DiT at 140/280/560 blocks (5/10/20 steps of the experiment's DiT), DDPM and DDIM; block- or
    FLOP-matched. experiment "depth": against the 28-block DiT, the paper's depth ratio."""
    paper_winner = {(b, s): "FPDM" if fp < dit else "DiT" for b, row in PAPER_TABLE1.items() for s, (dit, fp) in row.items()}
    dit_name = DEPTH_BASELINE if experiment == "depth" else "dit"
    ours, verdicts, settings, files = {}, {}, {}, []
    for dataset in sweep.datasets(experiment):
        dits, fpdms = sweep.get(experiment, dataset, dit_name), sweep.get(experiment, dataset, "fpdm")
        if not dits or not fpdms:
            continue
        cells = []
        for i, row in enumerate(dits[0]["evaluation"]["rows"]):
            dit = [fid_of(r["evaluation"]["rows"][i]["block_matched"]) for r in dits]
            fpdm = [fid_of(r["evaluation"]["rows"][i][matching]) for r in fpdms]
            c = compare(fpdm, dit)
            blocks = DIT_STEPS_TO_PAPER_BLOCKS.get(row["dit_steps"])
            won = winner(c, "FPDM", "DiT")
            cells.append({"dit_steps": row["dit_steps"], "paper_blocks": blocks, "sampler": row["sampler"],
                          "budget_blocks": row["budget_blocks"], "budget_gmacs": row["budget_gmacs"],
                          "fpdm_fid": c["a"], "dit_fid": c["b"], "welch_p": c["welch_p"], "winner": won,
                          "paper_winner": paper_winner.get((blocks, row["sampler"])),
                          "fpdm_accuracy": spread([r["evaluation"]["rows"][i][matching]["accuracy_mean"]
                                                   for r in fpdms]),
                          "dit_accuracy": spread([r["evaluation"]["rows"][i]["block_matched"]["accuracy_mean"]
                                                  for r in dits]),
                          **coverage(fpdms, i, matching, "fpdm"), **coverage(dits, i, "block_matched", "dit")})
        ours[dataset], verdicts[dataset] = cells, table1_verdict(cells)
        settings[dataset] = sweep.settings(experiment, dataset, (dit_name, "fpdm"))
        files += sweep.files(experiment, dataset, (dit_name, "fpdm"))
    what = "equal GMACs per image (cost.macs_per_step)" if matching == "flop_matched" else "equal block passes"
    against = ", against the 28-block DiT it replaces (the paper's depth ratio)" if experiment == "depth" else ""
    suffix = DEPTH_ID_SUFFIX if experiment == "depth" else ""
    return {"id": f"table1_{matching}{suffix}", "claim": f"FPDM beats DiT at 140 and 280 blocks (DDPM and DDIM) and "
            f"at 560 with DDPM; DiT wins at 560 with DDIM (Table 1), compared at {what}{against}",
            "paper": {f"{b} blocks": {s: {"DiT": d, "FPDM": f} for s, (d, f) in row.items()}
                      for b, row in PAPER_TABLE1.items()},
            "ours": ours, "settings": settings, "verdict": verdicts, "files": files}


def coverage(records: Sequence[dict[str, Any]], row: int, matching: str, name: str) -> dict[str, Any]:
    """Precision (fidelity) and recall (coverage) spreads of one Table-1 cell, where the records hold them."""
    cells = [r["evaluation"]["rows"][row][matching] for r in records]
    return {f"{name}_{metric}": spread([c[f"{metric}_mean"] for c in cells]) for metric in ("precision", "recall")
            if all(f"{metric}_mean" in c for c in cells)}


def smoothing_claims(sweep: Sweep, experiment: str = "smoothing") -> list[dict[str, Any]]:
    """Fig. 4 (a few iterations over many steps is best; the DiT-equivalent allocation is worse than the DiT) and
    Fig. 6a (reuse helps at few iterations, barely at many). experiment "depth_smoothing": on the depth
    experiment's FPDMs, whose DiT-equivalent is 26 iterations of a 28-block DiT."""
    trained, dit_name = ("depth", DEPTH_BASELINE) if experiment == "depth_smoothing" else ("table1", "dit")
    suffix = DEPTH_ID_SUFFIX if experiment == "depth_smoothing" else ""
    fig4 = {"id": f"fig4_smoothing{suffix}", "claim": "At a fixed budget, a few iterations per step over many steps is best; "
            "the DiT-equivalent allocation (depth - pre - post iterations) is worse than the DiT (Fig. 4)",
            "paper": "best at 4-8 iterations per step at 560 blocks", "ours": {}, "settings": {}, "verdict": {},
            "files": []}
    fig6 = {"id": f"fig6a_reuse{suffix}", "claim": "Reusing the previous timestep's solution helps most at few iterations "
            "per step and barely at many (Fig. 6a)", "paper": "large gain at few iterations, little at many",
            "ours": {}, "settings": {}, "verdict": {}, "files": []}
    for dataset in sweep.datasets(experiment):
        records, dits = sweep.get(experiment, dataset, "fpdm"), sweep.get(trained, dataset, dit_name)
        rows0 = records[0]["evaluation"]["rows"]
        fids = {(row["iters"], row["reuse"]): [fid_of(r["evaluation"]["rows"][i]) for r in records]
                for i, row in enumerate(rows0)}
        iters = sorted({k for k, _ in fids})
        k_dit = records[0]["evaluation"]["dit_equivalent_iters"]
        best = min(iters, key=lambda k: np.mean(fids[(k, False)]))
        budget = records[0]["evaluation"]["budget_blocks"]
        dit = [fid_of(row["block_matched"]) for r in dits for row in r["evaluation"]["rows"]
               if row["sampler"] == "ddpm" and row["budget_blocks"] == budget]
        vs_dit = compare(fids[(k_dit, False)], dit) if dit else None
        fig4["ours"][dataset] = {"budget_blocks": budget, "fid_by_iters": {k: spread(fids[(k, False)]) for k in iters},
                                 "best_iters": best, "dit_equivalent_iters": k_dit, "dit_fid": spread(dit) if dit else None,
                                 "best_vs_dit_equivalent": compare(fids[(best, False)], fids[(k_dit, False)]),
                                 "dit_equivalent_vs_dit": vs_dit}
        fig4["verdict"][dataset] = verdict([best < k_dit and fig4["ours"][dataset]["best_vs_dit_equivalent"][
            "exceeds_spread"] is not False] + ([winner(vs_dit, "FPDM", "DiT") == "DiT"] if vs_dit else []))
        gains = {k: [a - b for a, b in zip(fids[(k, False)], fids[(k, True)])] for k in iters}
        fewest, most = iters[0], iters[-1]
        c = compare(fids[(fewest, True)], fids[(fewest, False)])
        fig6["ours"][dataset] = {"budget_blocks": budget, "reuse_gain_by_iters": {k: spread(g) for k, g in gains.items()},
                                 "reuse_vs_not_at_fewest": c}
        fig6["verdict"][dataset] = verdict([winner(c, "reuse", "no reuse") == "reuse",
                                            np.mean(gains[fewest]) > abs(np.mean(gains[most]))])
        for claim in (fig4, fig6):
            claim["settings"][dataset] = sweep.settings(trained, dataset, ("fpdm",))
            claim["files"] += sweep.files(experiment, dataset, ("fpdm",))
    return [fig4, fig6]


def table5_claims(sweep: Sweep) -> list[dict[str, Any]]:
    """Table 5 (S-JFB < multi-step JFB < JFB, which fails) and Table 4 (N = 6 beats N = 12)."""
    t5 = {"id": "table5_sjfb", "claim": "S-JFB beats multi-step JFB, and both beat 1-step JFB, which fails (Table 5, "
          "N = 6 and 12, M = N)", "paper": {"N=6": {"JFB": 567.6, "multi-step": 48.2, "S-JFB": 43.2},
                                            "N=12": {"JFB": 567.6, "multi-step": 79.9, "S-JFB": 61.5}},
          "ours": {}, "settings": {}, "verdict": {}, "files": []}
    t4 = {"id": "table4_mn", "claim": "Few training iterations (M = N = 3 or 6) beat many (12, 24) (Table 4)",
          "paper": {"3": 43.0, "6": 43.2, "12": 61.5, "24": 567.6}, "ours": {}, "settings": {}, "verdict": {},
          "files": []}
    for dataset in sweep.datasets("table5"):
        per_n, matches = {}, []
        for n in (6, 12):
            fids = {m: [fid_of(r["evaluation"]) for r in sweep.get("table5", dataset, f"N{n}-{m}")]
                    for m in ("jfb", "multistep", "sjfb")}
            if not all(fids.values()):
                continue
            s_vs_multi, multi_vs_jfb = compare(fids["sjfb"], fids["multistep"]), compare(fids["multistep"], fids["jfb"])
            s_vs_jfb = compare(fids["sjfb"], fids["jfb"])
            per_n[f"N={n}"] = {"fid": {m: spread(v) for m, v in fids.items()}, "sjfb_vs_multistep": s_vs_multi,
                               "multistep_vs_jfb": multi_vs_jfb, "sjfb_vs_jfb": s_vs_jfb}
            matches += [winner(s_vs_multi, "S-JFB", "multi") == "S-JFB", winner(multi_vs_jfb, "multi", "JFB") == "multi",
                        winner(s_vs_jfb, "S-JFB", "JFB") == "S-JFB"]
        names = [f"N{n}-{m}" for n in (6, 12) for m in ("jfb", "multistep", "sjfb")]
        t5["ours"][dataset], t5["verdict"][dataset] = per_n, verdict(matches)
        t5["settings"][dataset] = sweep.settings("table5", dataset, names)
        t5["files"] += sweep.files("table5", dataset, names)
        six, twelve = (sweep.get("table5", dataset, f"N{n}-sjfb") for n in (6, 12))
        if six and twelve:
            c = compare([fid_of(r["evaluation"]) for r in six], [fid_of(r["evaluation"]) for r in twelve])
            t4["ours"][dataset] = {"N=M=6_vs_12": c}
            t4["verdict"][dataset] = verdict([winner(c, "6", "12") == "6"])
            t4["settings"][dataset] = sweep.settings("table5", dataset, ("N6-sjfb", "N12-sjfb"))
            t4["files"] += sweep.files("table5", dataset, ("N6-sjfb", "N12-sjfb"))
    return [t5, t4]


def prepost_claim(sweep: Sweep) -> dict[str, Any]:
    """Fig. 7: >= 1 pre/post layer beats 0 at every budget; 1 is best at small budgets, 2 or 4 at larger ones."""
    claim = {"id": "fig7_prepost", "claim": "At least 1 explicit pre/post layer always beats 0; 1 is best at small "
             "budgets, 2 or 4 at larger ones (Fig. 7)", "paper": "plot only (0, 1, 2, 4 layers)", "ours": {},
             "settings": {}, "verdict": {}, "files": []}
    depths = (0, 1, 2, 4)
    for dataset in sweep.datasets("prepost"):
        records = {p: sweep.get("prepost", dataset, f"prepost{p}") for p in depths}
        if not all(records.values()):
            continue
        budgets, matches = [], []
        for i, row in enumerate(records[0][0]["evaluation"]["rows"]):
            fids = {p: [fid_of(r["evaluation"]["rows"][i]) for r in records[p]] for p in depths}
            best = min(depths, key=lambda p: np.mean(fids[p]))
            zero_vs_best_other = compare(fids[min((1, 2, 4), key=lambda p: np.mean(fids[p]))], fids[0])
            budgets.append({"budget_blocks": row["budget_blocks"], "fid": {p: spread(v) for p, v in fids.items()},
                            "best_depth": best, "best_nonzero_vs_zero": zero_vs_best_other})
            matches.append(winner(zero_vs_best_other, ">=1", "0") == ">=1")
        matches += [budgets[0]["best_depth"] == 1, budgets[-1]["best_depth"] in (2, 4)]
        claim["ours"][dataset], claim["verdict"][dataset] = budgets, verdict(matches)
        claim["settings"][dataset] = sweep.settings("prepost", dataset, [f"prepost{p}" for p in depths])
        claim["files"] += sweep.files("prepost", dataset, [f"prepost{p}" for p in depths])
    return claim


def static_claims(sweep: Sweep) -> list[dict[str, Any]]:
    """Parameters and training memory: measured once (no training seeds involved)."""
    claims = []
    params = json.loads((ROOT / "benchmarks/results/param_counts.json").read_text())
    xl = next(r for r in params["rows"] if r["model"] == "DiT-XL/2")
    ours = {"DiT-XL/2 (counted)": {"DiT": xl["dit_params"], "FPDM": xl["fpdm_params"]}}
    for dataset in sweep.datasets("table1"):
        dit, fpdm = sweep.get("table1", dataset, "dit"), sweep.get("table1", dataset, "fpdm")
        if dit and fpdm:
            ours[dataset] = {"DiT": dit[0]["train"]["num_params"], "FPDM": fpdm[0]["train"]["num_params"]}
    claims.append({"id": "params", "claim": "FPDM has far fewer parameters than DiT (86M vs 674M at XL/2)",
                   "paper": {"DiT": 674e6, "FPDM": 86e6}, "ours": ours, "settings": {"pre_depth": 1, "post_depth": 1},
                   "verdict": {k: verdict([v["FPDM"] < v["DiT"]]) for k, v in ours.items()},
                   "files": ["benchmarks/results/param_counts.json"]})
    memory = json.loads((ROOT / "benchmarks/results/train_memory.json").read_text())
    xl_pair = [p for p in memory["pairs"] if p["group"].startswith("XL/2") and not p["grad_checkpointing"]]
    dit_mb = next(p["peak_tensor_mb"] for p in xl_pair if not p["fixed_point"])
    fpdm_mb = next(p["peak_tensor_mb"] for p in xl_pair if p["fixed_point"])
    claims.append({"id": "memory", "claim": "FPDM needs about 60% less training memory than DiT (10.2 vs 25.2 GB)",
                   "paper": {"DiT_GB": 25.2, "FPDM_GB": 10.2},
                   "ours": {"XL/2 CPU": {"DiT": dit_mb, "FPDM (n = m = 12)": fpdm_mb,
                                                         "ratio": fpdm_mb / dit_mb}},
                   "settings": {"N": 12, "M": 12, "batch": xl_pair[0]["batch"], "device": "cpu"},
                   "verdict": {"XL/2 CPU": verdict([fpdm_mb < 0.6 * dit_mb])},
                   "files": ["benchmarks/results/train_memory.json"]})
    return claims


def depth_claim(sweep: Sweep, experiment: str = "depth") -> dict[str, Any]:
    """(beyond the paper) Which model is best at each budget when DiTs of every depth get the FPDM's training
    compute: FID per (budget, sampler) for DiT-4/8/12/28 and the FPDM (block-matched, best iterations), under
    DDPM and DDIM (depth) or DPM-Solver++ and UniPC (depth_solvers), with the FPDM / DiT-28 FID ratio."""
    ours, verdicts, settings, files = {}, {}, {}, []
    for dataset in sweep.datasets(experiment):
        runs = {name: sweep.get(experiment, dataset, name) for name in DEPTH_CONFIGS}
        runs = {name: records for name, records in runs.items() if records}
        if "fpdm" not in runs or len(runs) < 2:
            continue
        cells = []
        for i, row in enumerate(runs["fpdm"][0]["evaluation"]["rows"]):
            fids = {name: [fid_of(r["evaluation"]["rows"][i]["block_matched"]) for r in records]
                    for name, records in runs.items()}
            best_dit = min((n for n in fids if n != "fpdm"), key=lambda n: np.mean(fids[n]))
            c = compare(fids["fpdm"], fids[best_dit])
            cells.append({"sampler": row["sampler"], "budget_blocks": row["budget_blocks"],
                          "fid": {n: spread(v) for n, v in fids.items()},
                          "fpdm_vs_dit28": (compare(fids["fpdm"], fids[DEPTH_BASELINE])
                                            if DEPTH_BASELINE in fids else None),
                          "fpdm_searched_iters": [r["evaluation"]["rows"][i]["block_matched"]["best_iters"]
                                                  for r in runs["fpdm"]],  # one per training seed
                          "best": min(fids, key=lambda n: np.mean(fids[n])), "best_dit": best_dit,
                          "fpdm_vs_best_dit": c, "winner": winner(c, "FPDM", model_label(best_dit))})
        ours[dataset] = cells
        wins = sum(c["winner"] == "FPDM" for c in cells)
        verdicts[dataset] = f"FPDM best in {wins} of {len(cells)} cells"
        settings[dataset] = sweep.settings(TRAINED_BY.get(experiment, experiment), dataset, tuple(runs))
        files += sweep.files(experiment, dataset, tuple(runs))
    solvers = experiment == "depth_solvers"
    return {"id": "depth_every_dit" + ("_solvers" if solvers else ""), "claim": "(beyond the paper) the FPDM against "
            "DiTs of depth 4, 8, 12 and 28 trained with the same block-pass units per image, at equal sampling "
            "blocks" + (", under modern solvers (diffusers' DPM-Solver++(2M) and UniPC)" if solvers else ""),
            "paper": None,
            "ours": ours, "settings": settings, "verdict": verdicts, "files": files}


def solvers_claim(sweep: Sweep) -> dict[str, Any]:
    """Which settings of diffusers' solvers bring 10 steps of the DiT closest to DDPM at 250 steps (solvers)."""
    ours, verdicts, settings, files = {}, {}, {}, []
    for dataset in sweep.datasets("solvers"):
        records = sweep.get("solvers", dataset, "dit")
        labels = [row["label"] for row in records[0]["evaluation"]["rows"]]
        fids = {label: spread([fid_of(r["evaluation"]["rows"][i]) for r in records]) for i, label in enumerate(labels)}
        best = min(labels[:-1], key=lambda label: fids[label]["mean"])
        ours[dataset] = {"fid": fids, "best": best, "reference": labels[-1]}
        verdicts[dataset] = f"best: {best} ({fids[best]['mean']:.1f} vs {labels[-1]} {fids[labels[-1]]['mean']:.1f})"
        settings[dataset], files = sweep.settings("table1", dataset, ("dit",)), files + sweep.files("solvers", dataset, ("dit",))
    return {"id": "solver_settings", "claim": "(beyond the paper) the DiT at 10 steps under DDPM, DDIM and diffusers' "
            "solver settings, against DDPM at 250 steps", "paper": None, "ours": ours, "settings": settings,
            "verdict": verdicts, "files": files}


FRONTIER_BASE = ("67k", 67_200)  # the depth experiment's level (depth and depth_solvers; the phantom's: gradient)
COMPUTE_DITS = tuple(n for n in COMPUTE_MODELS if n.startswith("dit"))


def frontier_fids(sweep: Sweep, dataset: str) -> dict[str, dict[str, Any]]:
    """level -> {"training_units_per_image", "fids": model -> (sampler, blocks) -> per-seed FIDs} over every level
    measured: depth's 67k (DDPM and DDIM from depth, DPM-Solver++ from depth_solvers, the phantom from gradient) and
    depth_compute's levels."""
    sources = {FRONTIER_BASE[0]: [("depth", ""), ("depth_solvers", ""), ("gradient", "")]} | {
        level: [("depth_compute", f"-{level}")] for level in COMPUTE_LEVELS}
    levels = {}
    for level, places in sources.items():
        fids: dict[str, dict[tuple[str, int], list[float]]] = {}
        units = None
        for experiment, suffix in places:
            for name in COMPUTE_MODELS:
                for record in sweep.get(experiment, dataset, name + suffix):
                    units = units or (record["settings"]["training_units_per_image"] if name == "fpdm" else None)
                    for row in record["evaluation"]["rows"]:
                        if row["sampler"] in COMPUTE_SAMPLERS:
                            key = (row["sampler"], row["budget_blocks"])
                            fids.setdefault(name, {}).setdefault(key, []).append(fid_of(row["block_matched"]))
        if "fpdm" in fids:
            levels[level] = {"training_units_per_image": units, "fids": fids}
    return levels


def line_crossing(ratios: Sequence[tuple[float, float]]) -> Optional[tuple[float, float]]:
    """(units where the least-squares line of log(ratio) against log(units) reaches ratio 1, slope), or None where
    the line does not fall."""
    x, y = np.log([u for u, _ in ratios]), np.log([r for _, r in ratios])
    slope, intercept = np.polyfit(x, y, 1)
    return (float(np.exp(-intercept / slope)), float(slope)) if slope < 0 else None


def crossover(points: Sequence[tuple[float, dict[str, Any]]]) -> dict[str, Any]:
    """Where the FPDM's FID falls below a DiT's, from (training units, compare(fpdm, dit)) at each level, in order.
    measured: the first level where the FPDM is ahead beyond the spread; otherwise extrapolated from a line of
    log(FID ratio) against log(units) through every level (units) and, because the ratio's fall slows with compute,
    through the last two levels only (units_last_two: None where they do not approach), or 'not approaching'
    where the line through every level does not fall."""
    ratios = [(u, fid_ratio(c)) for u, c in points]
    ahead = [u for u, c in points if c["a_better"] and c["exceeds_spread"]]
    result = {"ratios": [{"units": u, "ratio": r} for u, r in ratios], "measured_at": ahead[0] if ahead else None}
    if ahead:
        return result | {"status": "measured", "units": ahead[0]}
    if len({u for u, _ in ratios}) < 2:
        return result | {"status": "one level", "units": None}
    every_level, last_two = line_crossing(ratios), line_crossing(ratios[-2:])
    if every_level is None:
        return result | {"status": "not approaching", "units": None}
    return result | {"status": "extrapolated", "units": every_level[0], "slope": every_level[1],
                     "units_last_two": last_two[0] if last_two else None,
                     "slope_last_two": last_two[1] if last_two else None}


def compute_claim(sweep: Sweep) -> dict[str, Any]:
    """(beyond the paper) Where, if anywhere, does the FPDM overtake the DiTs as training compute grows? For each
    (sampler, budget): FID of every model at every level, the FPDM against each DiT, and the crossover (crossover())
    against DiT-4 and against the best DiT of each level. Where a level has the FPDM alone, it is compared with the
    best DiT of the highest level below that has DiTs (bound_vs_lower_dit): as the DiTs' FID falls with compute
    at every level measured, the FID ratio against a DiT trained with less compute is a lower bound on the ratio at
    equal compute, so an FPDM still behind there has not crossed. Where the phantom-gradient FPDM was trained, it is
    compared with S-JFB's FPDM and the best DiT at each of its levels (phantom_vs), with its own crossover."""
    ours, verdicts, settings, files = {}, {}, {}, []
    for dataset in sweep.datasets("depth_compute"):
        levels = frontier_fids(sweep, dataset)
        if len(levels) < 2:  # the FPDM at depth's level only (its depth_compute runs not done): no compute trend
            continue
        order = sorted(levels, key=lambda lv: (levels[lv]["training_units_per_image"], int(lv.rstrip("k"))))
        keys = list(dict.fromkeys(k for lv in order for k in levels[lv]["fids"]["fpdm"]))
        cells = []
        for sampler, blocks in sorted(keys, key=lambda k: (COMPUTE_SAMPLERS.index(k[0]), k[1])):
            fid, versus, phantom_vs, best, bounds = {}, {}, {}, {}, []
            for level in order:
                at = {n: v[(sampler, blocks)] for n, v in levels[level]["fids"].items() if (sampler, blocks) in v}
                if "fpdm" not in at:
                    continue
                for name, values in at.items():
                    fid.setdefault(name, {})[level] = spread(values)
                dits = [n for n in at if n in COMPUTE_DITS]
                if not dits:
                    if best:  # the levels before this one, in order of compute
                        dit_level = list(best)[-1]
                        dit = best[dit_level]
                        bound = compare(at["fpdm"], levels[dit_level]["fids"][dit][(sampler, blocks)])
                        bounds.append(bound | {"level": level, "units": levels[level]["training_units_per_image"],
                                               "dit": dit, "dit_level": dit_level})
                    continue
                best[level] = min(dits, key=lambda n: np.mean(at[n]))
                for dit in dits:
                    c = compare(at["fpdm"], at[dit])
                    versus.setdefault(dit, {})[level] = c | {"winner": winner(c, "FPDM", model_label(dit))}
                versus.setdefault("best_dit", {})[level] = versus[best[level]][level] | {"dit": best[level]}
                if "phantom" in at:
                    for other, label in (("fpdm", "S-JFB"), (best[level], model_label(best[level]))):
                        c = compare(at["phantom"], at[other])
                        phantom_vs.setdefault("best_dit" if other == best[level] else other, {})[level] = c | {
                            "winner": winner(c, "phantom", label), "other": other}
            units = {lv: levels[lv]["training_units_per_image"] for lv in order}
            crossings = {dit: crossover([(units[lv], c) for lv, c in versus[dit].items()])
                         for dit in ("dit4", "best_dit") if dit in versus}
            if "best_dit" in phantom_vs:
                crossings["phantom_vs_best_dit"] = crossover(
                    [(units[lv], c) for lv, c in phantom_vs["best_dit"].items()])
            cells.append({"sampler": sampler, "budget_blocks": blocks, "fid": fid, "fpdm_vs": versus,
                          "phantom_vs": phantom_vs, "best_dit": best, "bound_vs_lower_dit": bounds,
                          "crossover": crossings})
        ours[dataset] = {"levels": {lv: {"training_units_per_image": levels[lv]["training_units_per_image"],
                                         "models": sorted(levels[lv]["fids"])} for lv in order}, "cells": cells}
        statuses = [c["crossover"]["best_dit"]["status"] for c in cells if "best_dit" in c["crossover"]]
        verdicts[dataset] = (f"FPDM ahead of the best DiT (measured) in {statuses.count('measured')} of "
                             f"{len(statuses)} (sampler, budget) cells; extrapolated crossing in "
                             f"{statuses.count('extrapolated')}, not approaching in {statuses.count('not approaching')}")
        for experiment, suffix in [("depth", ""), ("gradient", "")] + [("depth_compute", f"-{lv}")
                                                                        for lv in COMPUTE_LEVELS]:
            names = [n + suffix for n in (("phantom",) if experiment == "gradient" else COMPUTE_MODELS)]
            settings.setdefault(dataset, {}).update(sweep.settings(experiment, dataset, names))
            files += sweep.files(experiment, dataset, names)
        files += sweep.files("depth_solvers", dataset, COMPUTE_MODELS)
    return {"id": "depth_compute", "claim": "(beyond the paper) the FPDM against DiT-4, DiT-8 and the 28-block DiT "
            "as training compute grows (block-pass units per image): where, if anywhere, it overtakes the best DiT",
            "paper": None, "ours": ours, "settings": settings, "verdict": verdicts, "files": files}


GRADIENT_NAMES = ("sjfb", *GRADIENTS)  # sjfb: the depth experiment's FPDM, trained the same way otherwise
GRADIENT_LABELS = {"sjfb": "S-JFB", "phantom": "phantom", "ift": "IFT"}


def training_cost(record: dict[str, Any]) -> dict[str, Any]:
    """A run's training cost: block-pass units and GMACs per image, per step (expected over its draws) and in all,
    and its optimizer steps and wall-clock (the wall-clock of separate runs on a shared CPU: indicative only)."""
    model = ModelConfig(**record["train"]["config"]["model"])
    s, gmacs = record["settings"], mean_training_macs_per_image(model) / 1e9
    return {"units_per_step": s["units_per_step"], "training_units_per_image": s["training_units_per_image"],
            "gmacs_per_step": gmacs, "training_gmacs_per_image": gmacs * s["steps"], "steps": s["steps"],
            "wall_clock_s": record["train"]["wall_clock_s"]}


def gradient_claim(sweep: Sweep) -> dict[str, Any]:
    """(beyond the paper) S-JFB against phantom and IFT gradients at equal training compute (block-pass units):
    FID per (sampler, budget) of each, each method against S-JFB, training cost and step memory."""
    ours, verdicts, settings, files = {}, {}, {}, []
    for dataset in sweep.datasets("gradient"):
        runs = {"sjfb": sweep.get("depth", dataset, "fpdm")} | {n: sweep.get("gradient", dataset, n) for n in GRADIENTS}
        runs = {n: records for n, records in runs.items() if records}
        if "sjfb" not in runs or len(runs) < 2:
            continue
        by_key = {n: [{(row["sampler"], row["budget_blocks"]): fid_of(row["block_matched"])
                       for row in r["evaluation"]["rows"]} for r in records] for n, records in runs.items()}
        cells = []
        for key in by_key["sjfb"][0]:
            fids = {n: [seed[key] for seed in seeds] for n, seeds in by_key.items() if all(key in x for x in seeds)}
            versus = {n: compare(fids[n], fids["sjfb"]) for n in fids if n != "sjfb"}
            cells.append({"sampler": key[0], "budget_blocks": key[1], "fid": {n: spread(v) for n, v in fids.items()},
                          "best": min(fids, key=lambda n: np.mean(fids[n])),
                          "vs_sjfb": {n: c | {"winner": winner(c, GRADIENT_LABELS[n], "S-JFB")}
                                      for n, c in versus.items()}})
        memory = {}
        for name in GRADIENTS:
            memory.update(runs[name][0]["evaluation"]["step_memory"] if name in runs else {})
        cost = {n: {k: spread([training_cost(r)[k] for r in records]) for k in training_cost(records[0])}
                for n, records in runs.items()}
        bests = [c["best"] for c in cells]
        ours[dataset] = {"cells": cells, "step_memory": memory, "training_cost": cost,
                         "best_in_cells": {n: bests.count(n) for n in runs}}
        beaten = [c["vs_sjfb"][n]["winner"] != "S-JFB" and c["vs_sjfb"][n]["exceeds_spread"] is not False
                  for c in cells for n in c["vs_sjfb"]]
        verdicts[dataset] = verdict([not b for b in beaten]) + " (best in most cells: " + GRADIENT_LABELS[
            max(runs, key=bests.count)] + ")"
        settings[dataset] = sweep.settings("depth", dataset, ("fpdm",)) | sweep.settings("gradient", dataset, GRADIENTS)
        files += sweep.files("depth", dataset, ("fpdm",)) + sweep.files("gradient", dataset, GRADIENTS)
    return {"id": "gradient_methods", "claim": "(beyond the paper) S-JFB trains as well as costlier gradients "
            "(phantom, implicit differentiation) at equal training compute (Sec. 3.4)",
            "paper": "approximate gradients beat implicit differentiation, which is drastically more expensive "
            "(no numbers)", "ours": ours, "settings": settings, "verdict": verdicts, "files": files}


def all_claims(sweep: Sweep) -> list[dict[str, Any]]:
    """Every claim from the sweep's result files."""
    claims = static_claims(sweep)
    claims += [table1_claim(sweep, "block_matched"), table1_claim(sweep, "flop_matched")]
    claims += smoothing_claims(sweep) + table5_claims(sweep)
    claims.append(prepost_claim(sweep))
    claims += [table1_claim(sweep, "block_matched", "depth"), table1_claim(sweep, "flop_matched", "depth")]
    claims += [depth_claim(sweep), depth_claim(sweep, "depth_solvers"), solvers_claim(sweep)]
    claims += smoothing_claims(sweep, "depth_smoothing") + [compute_claim(sweep), gradient_claim(sweep)]
    return claims


#################################################################################
#                                  Markdown                                     #
#################################################################################

def ours_cell(claim: dict[str, Any], dataset: str) -> str:
    """A short, readable summary of our numbers for one dataset."""
    data, cid = claim["ours"][dataset], claim["id"]
    if cid.startswith("table1"):
        return "; ".join(f"{c['sampler'].upper()} {c['paper_blocks']}: FPDM {c['fpdm_fid']['mean']:.1f} vs DiT "
                         f"{c['dit_fid']['mean']:.1f} ({c['winner']}{p_text(c['welch_p'])})" for c in data)
    if cid == "table5_sjfb":
        return "; ".join(f"{n}: S-JFB {fmt(v['fid']['sjfb'], 1)}, multi {fmt(v['fid']['multistep'], 1)}, JFB "
                         f"{fmt(v['fid']['jfb'], 1)}" for n, v in data.items())
    if cid == "table4_mn":
        c = data["N=M=6_vs_12"]
        return f"S-JFB N=M=6 {fmt(c['a'], 1)} vs 12 {fmt(c['b'], 1)}{p_text(c['welch_p'])}"
    if cid == "fig7_prepost":
        return "; ".join(f"{b['budget_blocks']} blocks: " + ", ".join(f"{p}: {s['mean']:.1f}" for p, s in
                                                                      b["fid"].items()) + f" (best {b['best_depth']})"
                         for b in data)
    if cid.startswith("fig4_smoothing"):
        parts = ", ".join(f"k={k}: {s['mean']:.1f}" for k, s in data["fid_by_iters"].items())
        dit = f"; DiT {data['dit_fid']['mean']:.1f}" if data["dit_fid"] else ""
        return f"{data['budget_blocks']} blocks: {parts}{dit}"
    if cid == "depth_compute":  # ratio ranges per level and the crossings; the full tables follow the summary
        def ratios(level: str) -> str:
            r = [fid_ratio(c["fpdm_vs"]["best_dit"][level]) for c in data["cells"]
                 if level in c["fpdm_vs"].get("best_dit", {})]
            return f"{level}: {min(r):.2f}-{max(r):.2f}x" if r else ""
        bounds = bound_summary([b for c in data["cells"] for b in c["bound_vs_lower_dit"]])
        phantom = [c["crossover"]["phantom_vs_best_dit"] for c in data["cells"]
                   if "phantom_vs_best_dit" in c["crossover"]]
        return ("FPDM / best DiT " + ", ".join(filter(None, (ratios(level) for level in data["levels"]))) + "; "
                + crossing_summary([c["crossover"]["best_dit"] for c in data["cells"]]) + (f"; {bounds}" if bounds
                                                                                        else "")
                + (f"; phantom-gradient FPDM vs the best DiT: {crossing_summary(phantom)}" if phantom else ""))
    if cid == "gradient_methods":
        return "; ".join(f"{c['sampler'].upper()} {c['budget_blocks']}: " + ", ".join(
            f"{GRADIENT_LABELS[n]} {v['mean']:.1f}" for n, v in c["fid"].items()) for c in data["cells"])
    if cid == "solver_settings":
        return ", ".join(f"{label} {v['mean']:.1f}" for label, v in data["fid"].items())
    if cid.startswith("depth_every_dit"):
        return "; ".join(f"{c['sampler'].upper()} {c['budget_blocks']}: " + ", ".join(
            f"{model_label(n)} {v['mean']:.1f}" for n, v in c["fid"].items()) +
            f" (best {c['best']})" for c in data)
    if cid.startswith("fig6a_reuse"):
        return "FID gain from reuse: " + ", ".join(f"k={k}: {s['mean']:+.1f}" for k, s in
                                                  data["reuse_gain_by_iters"].items())
    return compact(data)


def crossing_summary(crossings: Sequence[dict[str, Any]]) -> str:
    """'crossed (measured) in k, extrapolated at a-b units in j, not approaching in i' over cells."""
    measured = [c["units"] for c in crossings if c["status"] == "measured"]
    extrapolated = [c["units"] for c in crossings if c["status"] == "extrapolated"]
    parts = [f"crossed (measured) in {len(measured)} of {len(crossings)} cells"]
    if extrapolated:
        last_two = [c["units_last_two"] for c in crossings if c["status"] == "extrapolated" and c["units_last_two"]]
        parts.append(f"extrapolated crossing in {len(extrapolated)} at {units_text(min(extrapolated))}-"
                     f"{units_text(max(extrapolated))} units (every level)"
                     + (f", {units_text(min(last_two))}-{units_text(max(last_two))} (last two levels, "
                        f"{len(last_two)} cells)" if last_two else ", none from the last two levels"))
    parts.append(f"not approaching in {sum(c['status'] == 'not approaching' for c in crossings)}")
    return ", ".join(parts)


def bound_summary(bounds: Sequence[dict[str, Any]]) -> str:
    """'at 537k (FPDM alone) against the best DiT at 268k: a-b x, behind beyond the spread in k of n cells' per
    level where compute_claim() compares the FPDM with a DiT trained with less compute."""
    parts = []
    for level in dict.fromkeys(b["level"] for b in bounds):
        at = [b for b in bounds if b["level"] == level]
        r = [fid_ratio(b) for b in at]
        behind = sum(not b["a_better"] and bool(b["exceeds_spread"]) for b in at)
        ahead = sum(b["a_better"] and bool(b["exceeds_spread"]) for b in at)
        lower = ", ".join(dict.fromkeys(f"{model_label(b['dit'])} at {b['dit_level']}" for b in at))
        parts.append(f"at {level} (FPDM alone) against the best DiT of a lower level ({lower}): {min(r):.2f}-"
                     f"{max(r):.2f}x, behind beyond the spread in {behind} of {len(at)} cells, ahead in {ahead}")
    return "; ".join(parts)


def units_text(units: float) -> str:
    """Training units per image, short: 67k, 1.2M, and 4.2e+16 for an extrapolation of a nearly flat ratio (not
    '4.2e+10M')."""
    if units >= 1e9:
        return f"{units:.2g}"
    if units >= 1e6:
        return f"{units / 1e6:.2g}M" if units < 1e8 else f"{units / 1e6:.0f}M"
    return f"{units / 1e3:.0f}k"


def compact(value: Any) -> str:
    """A nested dict of numbers as 'key: value' text, floats to 3 significant digits."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {compact(v)}" if not isinstance(v, dict) else f"{k} ({compact(v)})"
                         for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(compact(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def p_text(p: Optional[float]) -> str:
    return "" if p is None else f", p={p:.2g}"


def markdown(claims: list[dict[str, Any]], figures: Optional[dict[str, str]] = None,
             non_finite: Sequence[dict[str, Any]] = ()) -> str:
    """The summary table: one row per (claim, dataset), then the per-dataset tables, each followed by links to its
    figures (`figures`: file name -> link, relative to the markdown file; None: no links)."""
    figures = figures or {}
    lines = [BEGIN, "", "Generated by `python -m experiments.claims` from `experiments/results/claims.json` (do not "
             "edit by hand). \"(n=3)\": mean ± std over 3 training seeds; p: Welch's t-test over training seeds "
             "(a 'tie' is p >= 0.05).", "", "| claim | paper | data (settings) | ours | verdict |", "|---|---|---|---|---|"]
    for claim in claims:
        paper = compact(claim["paper"]) if claim["paper"] is not None else "-"
        for dataset in claim["ours"]:
            s = claim["settings"].get(dataset, {})
            seeds = sorted({seed for v in s.values() if isinstance(v, dict) for seed in v.get("training_seeds", [])}
                           ) or s.get("training_seeds", [])
            paper_settings = all(v.get("paper_settings", True) for v in s.values() if isinstance(v, dict)) \
                and s.get("paper_settings", True)
            where = f"{dataset} (seeds {','.join(map(str, seeds)) or '-'}; {'paper' if paper_settings else 'other'} " \
                    f"settings)"
            lines.append(f"| {claim['claim']} | {paper} | {where} | {ours_cell(claim, dataset)} | "
                         f"{claim['verdict'].get(dataset, 'not measured')} |")
    if non_finite:
        lines += ["", "Left out of every mean (their samples were non-finite): " + "; ".join(
            f"{r['experiment']} {r['dataset']} {r['configuration']} seed {r['training_seed']} (final training loss "
            f"{r['final_loss']:.3f})" for r in non_finite) + "."]
    return "\n".join(lines + details(claims, figures) + depth_details(claims, figures) + gradient_details(claims, figures)
                     + ["", END])


def figure_line(figures: dict[str, str], *names: str) -> list[str]:
    """['', 'Figures: [a.png](link), ...'] for the named figures that were written ([] if none was)."""
    links = [f"[{name}]({figures[name]})" for name in names if name in figures]
    return ["", ("Figure: " if len(links) == 1 else "Figures: ") + ", ".join(links)] if links else []


def details(claims: list[dict[str, Any]], figures: dict[str, str]) -> list[str]:
    """Per-dataset tables of the sweep's comparisons (mean ± std over training seeds, Welch p)."""
    by_id, lines = {c["id"]: c for c in claims}, []
    block, flop = by_id["table1_block_matched"]["ours"], by_id["table1_flop_matched"]["ours"]
    for dataset in block:
        lines += ["", f"**Table 1 on {dataset}** (FID; block-matched: equal block passes; FLOP-matched: the FPDM "
                  "gets the DiT's GMACs per image):", "",
                  "| sampler | paper blocks | our blocks | GMACs | DiT | FPDM block-matched | p | FPDM FLOP-matched | p "
                  "| DiT acc. | FPDM acc. (block) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for b, f in zip(block[dataset], flop.get(dataset, [None] * len(block[dataset]))):
            flop_cells = f"{fmt(f['fpdm_fid'])} | {p_text(f['welch_p'])[2:] or '-'}" if f else "- | -"
            lines.append(f"| {b['sampler'].upper()} | {b['paper_blocks']} | {b['budget_blocks']} | "
                         f"{b['budget_gmacs']:.3g} | {fmt(b['dit_fid'])} | {fmt(b['fpdm_fid'])} | "
                         f"{p_text(b['welch_p'])[2:] or '-'} | {flop_cells} | {100 * b['dit_accuracy']['mean']:.1f}% | "
                         f"{100 * b['fpdm_accuracy']['mean']:.1f}% |")
        lines += figure_line(figures, f"sweep_table1_{dataset}.png", f"sweep_loss_table1_{dataset}.png")
    for dataset, per_n in by_id["table5_sjfb"]["ours"].items():
        lines += ["", f"**Table 5 on {dataset}** (FID at one budget, DDPM):", "",
                  "| N | JFB (m = 1) | multi-step (m = N) | S-JFB (m ~ U{1..N}) | p S-JFB vs multi | p multi vs JFB |",
                  "|---|---|---|---|---|---|"]
        for n, v in per_n.items():
            lines.append(f"| {n} | {fmt(v['fid']['jfb'])} | {fmt(v['fid']['multistep'])} | {fmt(v['fid']['sjfb'])} | "
                         f"{p_text(v['sjfb_vs_multistep']['welch_p'])[2:] or '-'} | "
                         f"{p_text(v['multistep_vs_jfb']['welch_p'])[2:] or '-'} |")
        lines += figure_line(figures, f"sweep_loss_table5_{dataset}.png")
    for dataset, budgets in by_id["fig7_prepost"]["ours"].items():
        lines += ["", f"**Fig. 7 on {dataset}** (FID, DDPM, best iterations per step with reuse):", "",
                  "| blocks | 0 | 1 | 2 | 4 | best | p best (>=1) vs 0 |", "|---|---|---|---|---|---|---|"]
        for b in budgets:
            lines.append(f"| {b['budget_blocks']} | " + " | ".join(fmt(b["fid"][p]) for p in (0, 1, 2, 4)) +
                         f" | {b['best_depth']} | {p_text(b['best_nonzero_vs_zero']['welch_p'])[2:] or '-'} |")
        lines += figure_line(figures, f"sweep_loss_prepost_{dataset}.png")
    smoothing = [(x, d, v) for x in ("", DEPTH_ID_SUFFIX) for d, v in by_id[f"fig4_smoothing{x}"]["ours"].items()]
    for suffix, dataset, data in smoothing:
        gains = by_id[f"fig6a_reuse{suffix}"]["ours"][dataset]["reuse_gain_by_iters"]
        which = "the depth experiment's FPDM, 28-block DiT" if suffix else "DiT"
        lines += ["", f"**Smoothing and reuse on {dataset}** ({data['budget_blocks']} blocks, DDPM; {which}: "
                  f"{fmt(data['dit_fid']) if data['dit_fid'] else '-'}):", "",
                  "| iterations per step | FID without reuse | FID gain from reuse |", "|---|---|---|"]
        for k, s in data["fid_by_iters"].items():
            lines.append(f"| {k}{' (DiT-equivalent)' if int(k) == data['dit_equivalent_iters'] else ''} | {fmt(s)} | "
                         f"{fmt(gains[k])} |")
    return lines


def depth_details(claims: list[dict[str, Any]], figures: dict[str, str]) -> list[str]:
    """Per-dataset table of the depth experiment: every DiT depth and the FPDM at equal training compute, with the
    FPDM/DiT-28 FID ratio and precision / recall (fidelity / coverage) of the FPDM and the 28-block DiT."""
    by_id, lines = {c["id"]: c for c in claims}, []
    block, flop = by_id["table1_block_matched_dit28"]["ours"], by_id["table1_flop_matched_dit28"]["ours"]
    for dataset, cells in by_id["depth_every_dit"]["ours"].items():
        s = by_id["depth_every_dit"]["settings"][dataset]
        steps = ", ".join(f"{n} {v['steps']}" for n, v in s.items())
        lines += ["", f"**Depth at equal training compute on {dataset}** ({s['fpdm']['training_units_per_image']:,.0f} "
                  f"block-pass units per image; optimizer steps: {steps}). FID; P / R: precision / recall:", "",
                  "| sampler | blocks | " + " | ".join(model_label(n) for n in DEPTH_CONFIGS[:-1]) +
                  " | FPDM (blocks) | FPDM (GMACs) | best | FPDM / DiT-28 | p | FPDM / best DiT | p | P / R FPDM | "
                  "P / R DiT-28 |", "|---" * 15 + "|"]
        for c, b, f in zip(cells, block.get(dataset, []), flop.get(dataset, [])):
            pr = {who: (f"{b[f'{who}_precision']['mean']:.2f} / {b[f'{who}_recall']['mean']:.2f}"
                        if f"{who}_precision" in b else "-") for who in ("fpdm", "dit")}
            lines.append(f"| {c['sampler'].upper()} | {c['budget_blocks']} | " + " | ".join(
                fmt(c["fid"][n], 1) if n in c["fid"] else "-" for n in DEPTH_CONFIGS[:-1]) +
                f" | {fmt(b['fpdm_fid'], 1)} | {fmt(f['fpdm_fid'], 1)} | {c['best']} | "
                f"{b['fpdm_fid']['mean'] / b['dit_fid']['mean']:.2f} | {p_text(b['welch_p'])[2:] or '-'} | "
                f"{ratio_and_p(c['fpdm_vs_best_dit'])} | {pr['fpdm']} | {pr['dit']} |")
        lines += figure_line(figures, f"sweep_depth_{dataset}.png", f"sweep_loss_depth_{dataset}.png")
    for dataset, cells in by_id["depth_every_dit_solvers"]["ours"].items():
        lines += ["", f"**Depth under modern solvers on {dataset}** (the depth experiment's models; FID, FPDM "
                  "block-matched with its best iterations):", "", "| sampler | blocks | " +
                  " | ".join(model_label(n) for n in DEPTH_CONFIGS) +
                  " | best | FPDM / DiT-28 | p | FPDM / best DiT | p |", "|---" * (len(DEPTH_CONFIGS) + 7) + "|"]
        for c in cells:
            lines.append(f"| {c['sampler']} | {c['budget_blocks']} | " + " | ".join(
                fmt(c["fid"][n], 1) if n in c["fid"] else "-" for n in DEPTH_CONFIGS) + f" | {c['best']} | "
                f"{ratio_and_p(c['fpdm_vs_dit28'])} | {ratio_and_p(c['fpdm_vs_best_dit'])} |")
        lines += figure_line(figures, f"sweep_depth_solvers_{dataset}.png")
    for dataset, data in by_id["depth_compute"]["ours"].items():
        dits, phantom = COMPUTE_DITS, any("phantom_vs_best_dit" in c["crossover"] for c in data["cells"])
        lines += ["", f"**Training compute on {dataset}** (FID at each level of training compute; FPDM block-matched "
                  "with its searched iterations; '-': not trained at that level):", "", "| units per image | sampler | "
                  "blocks | " + " | ".join(model_label(n) for n in COMPUTE_MODELS) + " | " +
                  " | ".join(f"FPDM / {model_label(d)} | p" for d in dits) + " |",
                  "|---" * (3 + len(COMPUTE_MODELS) + 2 * len(dits)) + "|"]
        for level, info in data["levels"].items():
            for c in (c for c in data["cells"] if level in c["fid"]["fpdm"]):
                lines.append(f"| {info['training_units_per_image']:,.0f} | {c['sampler'].upper()} | {c['budget_blocks']} | "
                             + " | ".join(fmt(c["fid"][n][level], 1) if level in c["fid"].get(n, {}) else "-"
                                          for n in COMPUTE_MODELS) + " | " +
                             " | ".join(ratio_and_p(c["fpdm_vs"].get(d, {}).get(level)) for d in dits) + " |")
        lines += ["", f"**Where the FPDM overtakes the DiTs on {dataset}** (FPDM / DiT FID ratio at each measured "
                  "level; the crossing is measured where the FPDM is ahead beyond the spread, else extrapolated from a "
                  "least-squares line of log ratio against log units, which is an extrapolation, not a "
                  "measurement; where a level has the FPDM alone, its ratio to the best DiT of a lower level, a lower "
                  "bound on the ratio at equal compute since every DiT's FID falls with compute):", "",
                  "| sampler | blocks | FPDM alone: / a DiT with less compute | FPDM / DiT-4 by level | crossing vs "
                  "DiT-4 | FPDM / best DiT by level | crossing vs the best DiT |" + (
                      " FPDM (phantom) / best DiT by level | its crossing |" if phantom else ""),
                  "|---" * (7 + 2 * phantom) + "|"]
        for c in data["cells"]:
            columns = [", ".join(f"{b['level']}: {fid_ratio(b):.2f} vs {model_label(b['dit'])} at "
                                 f"{b['dit_level']}{p_text(b['welch_p'])}"
                                 for b in c["bound_vs_lower_dit"]) or "-"]
            for dit in ("dit4", "best_dit") + ("phantom_vs_best_dit",) * phantom:
                cross = c["crossover"].get(dit)
                if cross is None:
                    columns += ["-", "-"]
                    continue
                columns += [", ".join(f"{units_text(r['units'])}: {r['ratio']:.2f}" for r in cross["ratios"]),
                            crossing_text(cross)]
            lines.append(f"| {c['sampler'].upper()} | {c['budget_blocks']} | " + " | ".join(columns) + " |")
        lines += figure_line(figures, f"sweep_depth_compute_{dataset}.png", f"sweep_loss_depth_compute_{dataset}.png")
    return lines


def gradient_details(claims: list[dict[str, Any]], figures: dict[str, str]) -> list[str]:
    """Per-dataset tables of the gradient methods: FID against S-JFB at equal training compute, and each method's
    training cost and step memory."""
    lines = []
    for dataset, data in next(c for c in claims if c["id"] == "gradient_methods")["ours"].items():
        names = list(data["training_cost"])
        lines += ["", f"**Training gradients on {dataset}** (the depth experiment's FPDM, trained with each gradient "
                  "for the same block-pass units per image; FID, block-matched, best iterations per step):", "",
                  "| sampler | blocks | " + " | ".join(GRADIENT_LABELS[n] for n in names) + " | best | " +
                  " | ".join(f"{GRADIENT_LABELS[n]} / S-JFB | p" for n in names[1:]) + " |",
                  "|---" * (3 + len(names) + 2 * (len(names) - 1)) + "|"]
        for c in data["cells"]:
            lines.append(f"| {c['sampler'].upper()} | {c['budget_blocks']} | " + " | ".join(
                fmt(c["fid"][n], 1) if n in c["fid"] else "-" for n in names) + f" | {GRADIENT_LABELS[c['best']]} | "
                + " | ".join(ratio_and_p(c["vs_sjfb"].get(n)) for n in names[1:]) + " |")
        lines += ["", "| method | units per step | GMACs per step | optimizer steps | training GMACs per image | "
                  "saved activations (MiB) | peak tensors (MiB) | training wall-clock (s) |", "|---" * 8 + "|"]
        for n in names:
            cost, memory = data["training_cost"][n], data["step_memory"].get(n)
            mem = f"{memory['saved_activation_mb']:.1f} | {memory['peak_tensor_mb']:.1f}" if memory else "- | -"
            lines.append(f"| {GRADIENT_LABELS[n]} | {cost['units_per_step']['mean']:.1f} | "
                         f"{cost['gmacs_per_step']['mean']:.4f} | {cost['steps']['mean']:,.0f} | "
                         f"{cost['training_gmacs_per_image']['mean']:,.0f} | {mem} | {fmt(cost['wall_clock_s'], 0)} |")
        memory = next(iter(data["step_memory"].values()), None)
        if memory:
            lines += ["", f"Step memory: one training step's forward and backward at batch {memory['batch']}, "
                      f"n = {memory['n']} and each method's largest m (benchmarks.train_memory.step_memory)."]
        lines += figure_line(figures, f"sweep_loss_gradient_{dataset}.png")
    return lines


def crossing_text(cross: dict[str, Any]) -> str:
    """One crossover() result as prose."""
    if cross["status"] == "measured":
        return f"measured: ahead at {units_text(cross['units'])}"
    if cross["status"] == "extrapolated":
        last_two = cross["units_last_two"]
        return (f"not reached; extrapolated at {units_text(cross['units'])} (every level), "
                + (f"{units_text(last_two)} (last two)" if last_two else "not approaching (last two)"))
    return "not reached; " + ("the ratio does not fall with compute" if cross["status"] == "not approaching"
                              else "one level measured")


def ratio_and_p(comparison: Optional[dict[str, Any]]) -> str:
    """'FPDM mean / DiT mean | Welch p' of a compare(fpdm, dit) ('-' where unmeasured or one seed)."""
    if comparison is None:
        return "- | -"
    return f"{fid_ratio(comparison):.2f} | {p_text(comparison['welch_p'])[2:] or '-'}"


def rewrite_block(path: Path, block: str) -> None:
    """Replace the text between BEGIN and END in `path` (append the block if the markers are absent)."""
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def plot_table1(claims: list[dict[str, Any]], results_dir: Path) -> list[Path]:
    """sweep_table1_<dataset>.png: FID against the budget (DiT steps' worth) for the DiT and the FPDM, block- and
    FLOP-matched, error bars the std over training seeds."""
    from experiments.common import pyplot, save_figure
    plt, by_id, written = pyplot(), {c["id"]: c for c in claims}, []
    if plt is None:
        return written
    for dataset, cells in by_id["table1_block_matched"]["ours"].items():
        flop = by_id["table1_flop_matched"]["ours"].get(dataset, [])
        figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for axis, sampler in zip(axes, ("ddpm", "ddim")):
            for label, rows, key, style in (("DiT", cells, "dit_fid", "o--"), ("FPDM, equal blocks", cells, "fpdm_fid",
                                            "s-"), ("FPDM, equal GMACs", flop, "fpdm_fid", "^:")):
                chosen = [r for r in rows if r["sampler"] == sampler]
                axis.errorbar([r["dit_steps"] for r in chosen], [r[key]["mean"] for r in chosen],
                              yerr=[r[key]["std"] for r in chosen], fmt=style, capsize=3, label=label)
            axis.set_xscale("log", base=2)
            axis.set_xlabel("budget (steps of the DiT)")
            axis.set_title(f"{dataset}: {sampler.upper()}")
            axis.legend()
        axes[0].set_ylabel("FID on classifier features (lower is better)")
        path = results_dir / f"sweep_table1_{dataset}.png"
        written.append(save_figure(plt, figure, path))
    return written


def plot_depth(claims: list[dict[str, Any]], results_dir: Path) -> list[Path]:
    """sweep_depth_<dataset>.png: FID against sampling blocks, one line per DiT depth and one for the FPDM, per
    sampler; error bars the std over training seeds."""
    from experiments.common import pyplot, save_figure
    plt, written = pyplot(), []
    figures = [(c, d, cells) for c in claims if c["id"].startswith("depth_every_dit") for d, cells in c["ours"].items()]
    if plt is None:
        return written
    for claim, dataset, cells in figures:
        samplers = list(dict.fromkeys(c["sampler"] for c in cells))
        figure, axes = plt.subplots(1, len(samplers), figsize=(5 * len(samplers), 4), squeeze=False)
        for axis, sampler in zip(axes[0], samplers):
            rows = [c for c in cells if c["sampler"] == sampler]
            for name in rows[0]["fid"]:
                axis.errorbar([c["budget_blocks"] for c in rows], [c["fid"][name]["mean"] for c in rows],
                              yerr=[c["fid"][name]["std"] for c in rows], marker="o", capsize=3,
                              label=model_label(name),
                              linewidth=2.5 if name == "fpdm" else 1.2)
            axis.set_xscale("log", base=2)
            axis.set_xticks([c["budget_blocks"] for c in rows], [str(c["budget_blocks"]) for c in rows])
            label_axis(axis, "transformer blocks per image", "FID (classifier features)",
                       f"{dataset}, {sampler}: equal training compute")
        name = "sweep_depth_solvers" if claim["id"].endswith("_solvers") else "sweep_depth"
        written.append(save_figure(plt, figure, results_dir / f"{name}_{dataset}.png"))
    return written


EXTRAPOLATION_SPAN = 30  # the frontier figure draws an extrapolated fit up to this many times the largest level


def plot_compute(claims: list[dict[str, Any]], results_dir: Path) -> list[Path]:
    """sweep_depth_compute_<dataset>.png, the compute frontier, one column per sampler. Top: FID against training
    units per image, one line per model (colour) and budget (line style), error bars the std over training seeds.
    Bottom: the FPDM / best-DiT FID ratio per budget; where the FPDM is not ahead, the least-squares line of log
    ratio against log units continues (dotted: an extrapolation) to its crossing of 1, marked x (measured: *);
    hollow markers: a level with the FPDM alone, against the best DiT of a lower level (a lower bound); filled plus
    signs on a dotted line: the phantom-gradient FPDM / best-DiT ratio, not extrapolated."""
    from experiments.common import pyplot, save_figure
    plt, written = pyplot(), []
    per_dataset = next(c for c in claims if c["id"] == "depth_compute")["ours"]
    if plt is None:
        return written
    from matplotlib.ticker import FuncFormatter, LogLocator
    for dataset, data in per_dataset.items():
        units = {level: v["training_units_per_image"] for level, v in data["levels"].items()}
        samplers = list(dict.fromkeys(c["sampler"] for c in data["cells"]))
        budgets = sorted({c["budget_blocks"] for c in data["cells"]})
        style = {b: (line, marker) for b, line, marker in zip(budgets, ("-", "--", "-."), ("o", "s", "^"))}
        figure, axes = plt.subplots(2, len(samplers), figsize=(5.5 * len(samplers), 8.5), squeeze=False)
        for column, sampler in enumerate(samplers):
            top, bottom, notes = axes[0][column], axes[1][column], []
            for j, c in enumerate(c for c in data["cells"] if c["sampler"] == sampler):
                line, marker = style[c["budget_blocks"]]
                for k, name in enumerate(COMPUTE_MODELS):
                    per = c["fid"].get(name, {})
                    levels = sorted(per, key=units.get)
                    if levels:
                        top.errorbar([units[lv] for lv in levels], [per[lv]["mean"] for lv in levels],
                                     yerr=[per[lv]["std"] for lv in levels], color=f"C{k}", linestyle=line,
                                     marker=marker, capsize=2, linewidth=2.2 if name == "fpdm" else 1.1,
                                     label=f"{model_label(name)}, {c['budget_blocks']} blocks")
                cross = c["crossover"].get("best_dit")
                if cross:
                    plot_crossing(bottom, cross, f"C{j}", line, marker, f"{c['budget_blocks']} blocks")
                    notes.append(f"{c['budget_blocks']} blocks: {crossing_text(cross)}")
                phantom = c["crossover"].get("phantom_vs_best_dit")
                if phantom:
                    bottom.plot([r["units"] for r in phantom["ratios"]], [r["ratio"] for r in phantom["ratios"]], "P:",
                                color=f"C{j}", label=f"{c['budget_blocks']} blocks, FPDM (phantom)")
                for b in c["bound_vs_lower_dit"]:  # hollow: the FPDM alone, against a DiT with less compute
                    bottom.plot([b["units"]], [fid_ratio(b)], marker, color=f"C{j}",
                                markerfacecolor="none", markersize=9)
            for axis in (top, bottom):
                axis.set_xscale("log")
                axis.set_yscale("log")
                axis.minorticks_off()
                axis.set_xticks(sorted(units.values()), [units_text(u) for u in sorted(units.values())])
                axis.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
                axis.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            bottom.axhline(1.0, color="black", linewidth=0.8)
            bottom.text(0.02, 0.02, "\n".join(notes), transform=bottom.transAxes, fontsize=7, va="bottom")
            label_axis(top, "training compute (block-pass units per image)", "FID (classifier features)",
                       f"{dataset}, {sampler}")
            label_axis(bottom, "training compute (block-pass units per image)", "FID ratio FPDM / best DiT",
                       f"{dataset}, {sampler}: below 1, the FPDM wins")
            top.legend(fontsize=6, ncol=2)
        written.append(save_figure(plt, figure, results_dir / f"sweep_depth_compute_{dataset}.png"))
    return written


def plot_crossing(axis: Any, cross: dict[str, Any], colour: str, line: str, marker: str, label: str) -> None:
    """One budget's FPDM / best-DiT ratios, and its measured or extrapolated crossing (crossover())."""
    xs, ys = [r["units"] for r in cross["ratios"]], [r["ratio"] for r in cross["ratios"]]
    axis.plot(xs, ys, color=colour, linestyle=line, marker=marker, label=label)
    if cross["status"] == "measured":
        axis.plot([cross["units"]], [ys[xs.index(cross["units"])]], "*", color=colour, markersize=14)
    elif cross["status"] == "extrapolated":
        # Both fits are straight lines on these log-log axes, reaching ratio 1 at their crossing: x every level's,
        # + the last two levels'.
        span = EXTRAPOLATION_SPAN * max(xs)
        end = min(cross["units"], span)
        axis.plot([max(xs), end], [(max(xs) / cross["units"]) ** cross["slope"], (end / cross["units"]) ** cross["slope"]],
                  ":", color=colour)
        if cross["units"] <= span:
            axis.plot([cross["units"]], [1.0], "x", color=colour, markersize=10)
        last_two = cross["units_last_two"]
        if last_two:
            end = min(last_two, span)
            axis.plot([xs[-1], end], [ys[-1], (end / last_two) ** cross["slope_last_two"]], "--", color=colour,
                      linewidth=0.8)
            if last_two <= span:
                axis.plot([last_two], [1.0], "+", color=colour, markersize=10)


def label_axis(axis: Any, xlabel: str, ylabel: str, title: str) -> None:
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize=8)


def plot_losses(sweep: Sweep, claims: list[dict[str, Any]], results_dir: Path) -> list[Path]:
    """sweep_loss_<experiment>_<dataset>.png: training loss against training compute (block-pass units per image),
    one colour per configuration, one line per training seed: how each setting trained at equal compute."""
    from experiments.common import pyplot, save_figure
    plt, written = pyplot(), []
    if plt is None:
        return written
    compute = next(c for c in claims if c["id"] == "depth_compute")["ours"]  # its datasets with a compute table
    trained = {(e, d) for (e, d, _) in sweep.results  # not the sampling-only experiments
               if e not in TRAINED_BY and (e != "depth_compute" or d in compute)}
    for experiment, dataset in sorted(trained):
        figure, axis = plt.subplots(figsize=(7, 4))
        names = sorted({c for (e, d, c) in sweep.results if (e, d) == (experiment, dataset)})
        for colour, name in enumerate(names):
            for i, record in enumerate(sweep.get(experiment, dataset, name)):
                units = record["settings"]["units_per_step"]
                steps, losses = zip(*record["train"]["loss_curve"])
                axis.plot([s * units for s in steps], losses, color=f"C{colour}", alpha=0.8, linewidth=1,
                          label=name if i == 0 else None)
        axis.set_yscale("log")
        label_axis(axis, "training compute (block-pass units per image)", "training loss (window mean)",
                   f"{experiment} on {dataset}: one line per training seed")
        written.append(save_figure(plt, figure, results_dir / f"sweep_loss_{experiment}_{dataset}.png"))
    return written


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    config = build_config(ClaimsConfig, parse_flags(__doc__, [ClaimsConfig], argv))
    results_dir = Path(config.results_dir)
    sweep = Sweep.read(results_dir, config.include_quick)
    claims = all_claims(sweep)
    write_json(results_dir / "claims.json", {"generated_by": "python -m experiments.claims", "alpha": ALPHA,
                                             "claims": claims, "non_finite_runs": sweep.non_finite})
    written = plot_table1(claims, results_dir) + plot_depth(claims, results_dir) + plot_compute(claims, results_dir)
    written += plot_losses(sweep, claims, results_dir)
    if config.results_md:
        here = Path(config.results_md).resolve().parent
        figures = {path.name: Path(os.path.relpath(path.resolve(), here)).as_posix() for path in written}
        rewrite_block(Path(config.results_md), markdown(claims, figures, sweep.non_finite))
    for claim in claims:
        print(f"{claim['id']}: " + ", ".join(f"{d}: {v}" for d, v in claim["verdict"].items()))
    return claims


if __name__ == "__main__":
    cli.run(main)
