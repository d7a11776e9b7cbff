"""Print the Markdown tables of RESULTS.md from the experiments' JSON files (so every number there is traceable).

    python -m experiments.summarize [--out_dir experiments/results]
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cli
from benchmarks.bench_common import format_table
from config import build_config, parse_flags

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class SummarizeConfig:
    """Flags of summarize."""
    out_dir: str = field(default=str(DEFAULT_OUT_DIR), metadata={"help": "Folder of the experiments' JSON files."})


def load(out_dir: Path, name: str) -> dict | None:
    """<out_dir>/<name>.json, or None if that experiment has not been run."""
    path = out_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def fid(record: dict) -> str:
    """'mean ± std' of a digits-FID record."""
    return f"{record['fid_mean']:.2f} ± {record['fid_std']:.2f}"


def acc(record: dict) -> str:
    """Classifier accuracy 'mean ± std' in percent."""
    return f"{100 * record['accuracy_mean']:.1f} ± {100 * record['accuracy_std']:.1f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table as lines (cells already formatted)."""
    return format_table(headers, rows).split("\n")


def search_key(iters: int, reuse: bool) -> str:
    """Column name of one allocation searched: k, with +R for solution reuse."""
    return f"k={iters}{'+R' if reuse else ''}"


def search_cells(search: list[dict], keys: Sequence[tuple[int, bool]]) -> list[str]:
    """Search-seed FID of each (iterations, reuse) in `keys`, '-' where it was not searched (did not fit)."""
    by_key = {(s["iters"], s["reuse"]): s["search_fid"] for s in search}
    return [f"{by_key[key]:.1f}" if key in by_key else "-" for key in keys]


def exp1(data: dict) -> list[str]:
    """Training table."""
    lines = table(["model", "params", "steps", "units/step", "total units", "wall-clock (s)", "final loss"],
                  [[name.upper(), f"{m['num_params']:,}", str(m["steps"]), f"{m['units_per_step']:g}",
                    f"{m['total_units']:,.0f}", f"{m['wall_clock_s']:.0f}", f"{m['final_loss']:.4f}"]
                   for name, m in data["models"].items()])
    lines.append(f"\nFPDM / DiT parameters: {data['param_ratio_fpdm_over_dit']:.3f}")
    for name, m in data["models"].items():
        lines.append(f"\n{name.upper()} command: `{m['command']}`")
    return lines


def exp2(data: dict) -> list[str]:
    """Table 1 in miniature."""
    rows = []
    for r in data["rows"]:
        paper, f = r.get("paper") or {}, r["FPDM"]
        paper_dit, paper_fpdm = (str(paper.get(model, {}).get(r["sampler"], "-")) for model in ("DiT", "FPDM"))
        rows.append([f"{r['budget']} ({r['paper_blocks']})", r["sampler"].upper(), fid(r["DiT"]), fid(f), paper_dit,
                     paper_fpdm, acc(r["DiT"]), acc(f),
                     f"k={f['best_iters']}, {f['num_steps']} steps, reuse={f['best_reuse']}"])
    lines = table(["budget (paper)", "sampler", "DiT FID", "FPDM FID", "paper DiT", "paper FPDM", "DiT acc %",
                   "FPDM acc %", "FPDM allocation (search winner)"], rows)
    lines.append("\nSearch (seed {}, {} samples each):".format(data["search_seed"], data["search_samples"]))
    keys = [(s["iters"], s["reuse"]) for s in data["rows"][0]["fpdm_search"]]
    searched = table(["budget", "sampler", *(search_key(*key) for key in keys)],
                     [[str(r["budget"]), r["sampler"].upper(), *search_cells(r["fpdm_search"], keys)]
                      for r in data["rows"]])
    return lines + ["\n" + searched[0], *searched[1:]]


def exp3(data: dict) -> list[str]:
    """Smoothing sweep."""
    d = data["dit"]
    return table(["iterations/step", "timesteps", "FPDM FID", "acc %"],
                 [[str(p["iters"]), str(p["num_steps"]), fid(p), acc(p)] for p in data["fpdm"]]
                 + [["DiT (8 blocks)", str(d["num_steps"]), fid(d), acc(d)]])


def exp4(data: dict) -> list[str]:
    """Reuse sweep and residual summary."""
    lines = table(["iterations/step", "timesteps", "FID no reuse", "FID reuse", "acc % no reuse", "acc % reuse"],
                  [[str(r["iters"]), str(r["num_steps"]), fid(r["no_reuse"]), fid(r["reuse"]), acc(r["no_reuse"]),
                    acc(r["reuse"])] for r in data["sweep"]])
    d = data["diagnostics"]
    lines.append(f"\nResiduals at k={data['diag_iters']}: mean delta_t over timesteps "
                 f"{d['no_reuse']['mean_delta_over_timesteps']:.4f} (no reuse) vs "
                 f"{d['reuse']['mean_delta_over_timesteps']:.4f} (reuse); reuse lowers delta_t at "
                 f"{100 * data['fraction_timesteps_reuse_lowers_delta']:.0f}% of timesteps.")
    return lines


def exp5(data: dict) -> list[str]:
    """Training-method comparison."""
    rows = []
    for name, v in data["variants"].items():
        b = v["bounds"]
        m = f"U{{{b['m_min']}..{b['M']}}}" if b["m_min"] != b["M"] else str(b["M"])
        rows.append([name, f"U{{{b['n_min']}..{b['N']}}}", m, f"{v['units_per_step']:g}", str(v["train"]["steps"]),
                     f"{v['train']['final_loss']:.4f}", fid(v), acc(v)])
    return table(["method", "n", "m", "units/step", "steps", "final loss", "FID", "acc %"], rows)


def exp6(data: dict) -> list[str]:
    """Solver comparison."""
    return table(["budget", "iterations/step", "timesteps", "FID iteration", "FID Anderson", "mean delta_t iteration",
                  "mean delta_t Anderson"],
                 [[str(r["budget"]), str(r["iters"]), str(r["num_steps"]), fid(r["iteration"]), fid(r["anderson"]),
                   f"{r['iteration']['mean_delta']:.4f}", f"{r['anderson']['mean_delta']:.4f}"] for r in data["rows"]])


def exp7(data: dict) -> list[str]:
    """Pre/post depth comparison (DDPM, each model's own allocation search)."""
    depths = list(data["models"])
    rows = []
    for depth in depths:
        m = data["models"][depth]
        train = m.get("train", {})
        rows.append([depth, f"{m['num_params']:,}", str(train.get("steps", "-")), f"{m['units_per_step']:g}",
                     f"{m.get('total_units', math.nan):,.0f}",
                     f"{train['final_loss']:.4f}" if "final_loss" in train else "-",
                     *(f"{fid(r)} ({search_key(r['best_iters'], r['best_reuse'])}, {r['num_steps']} steps)"
                       for r in m["rows"])])
    lines = table(["pre = post", "params", "training steps", "units/step", "total units", "final loss",
                   *(f"FID @ {b}" for b in data["budgets"])], rows)
    lines.append("\nBest pre = post per budget: " + ", ".join(
        f"{b}: {d}" for b, d in data["best_pre_post_per_budget"].items()))
    lines.append(f"\nSearch (seed {data['search_seed']}, {data['search_samples']} samples each):")
    keys = [(k, reuse) for k in data["candidate_iters"] for reuse in (False, True)]
    searched = table(["pre = post", "budget", *(search_key(*key) for key in keys)],
                     [[depth, str(r["budget"]), *search_cells(r["search"], keys)]
                      for depth in depths for r in data["models"][depth]["rows"]])
    lines += ["\n" + searched[0], *searched[1:]]
    for depth in depths:
        if "source" not in data["models"][depth].get("train", {"source": None}):
            lines.append(f"\npre = post = {depth} command: `{data['models'][depth]['train']['command']}`")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Print every available table with the command that produced it."""
    config = build_config(SummarizeConfig, parse_flags(__doc__, [SummarizeConfig], argv))
    out_dir = Path(config.out_dir)
    for name, table in (("exp1_equal_compute", exp1), ("exp2_table1", exp2), ("exp3_smoothing", exp3),
                        ("exp4_reuse", exp4), ("exp5_sjfb", exp5), ("exp6_anderson", exp6),
                        ("exp7_prepost", exp7)):
        data = load(out_dir, name)
        if data is None:
            print(f"## {name}: not run\n")
            continue
        print(f"## {name}\n\nCommand: `{data['command']}`\n")
        print("\n".join(table(data)) + "\n")


if __name__ == "__main__":
    cli.run(main)
