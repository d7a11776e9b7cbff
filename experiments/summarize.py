"""Print the Markdown tables of RESULTS.md from the experiments' JSON files (so every number there is traceable).

    python -m experiments.summarize [--out_dir experiments/results]
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import cli
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


def exp1(data: dict) -> list[str]:
    """Training table."""
    lines = ["| model | params | steps | units/step | total units | wall-clock (s) | final loss |",
             "|---|---|---|---|---|---|---|"]
    for name, m in data["models"].items():
        lines.append(f"| {name.upper()} | {m['num_params']:,} | {m['steps']} | {m['units_per_step']:g} | "
                     f"{m['total_units']:,.0f} | {m['wall_clock_s']:.0f} | {m['final_loss']:.4f} |")
    lines.append(f"\nFPDM / DiT parameters: {data['param_ratio_fpdm_over_dit']:.3f}")
    for name, m in data["models"].items():
        lines.append(f"\n{name.upper()} command: `{m['command']}`")
    return lines


def exp2(data: dict) -> list[str]:
    """Table 1 in miniature."""
    lines = ["| budget (paper) | sampler | DiT FID | FPDM FID | paper DiT | paper FPDM | DiT acc % | FPDM acc % | "
             "FPDM allocation (search winner) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        paper = r.get("paper") or {}
        p_dit = paper.get("DiT", {}).get(r["sampler"], "-")
        p_fpdm = paper.get("FPDM", {}).get(r["sampler"], "-")
        f = r["FPDM"]
        lines.append(f"| {r['budget']} ({r['paper_blocks']}) | {r['sampler'].upper()} | {fid(r['DiT'])} | {fid(f)} | "
                     f"{p_dit} | {p_fpdm} | {acc(r['DiT'])} | {acc(f)} | k={f['best_iters']}, {f['num_steps']} "
                     f"steps, reuse={f['best_reuse']} |")
    lines.append("\nSearch (seed {}, {} samples each):".format(data["search_seed"], data["search_samples"]))
    lines.append("\n| budget | sampler | " + " | ".join(
        f"k={s['iters']}{'+R' if s['reuse'] else ''}" for s in data["rows"][0]["fpdm_search"]) + " |")
    lines.append("|---|---|" + "---|" * len(data["rows"][0]["fpdm_search"]))
    for r in data["rows"]:
        by_key = {(s["iters"], s["reuse"]): s["search_fid"] for s in r["fpdm_search"]}
        cells = [f"{by_key[(s['iters'], s['reuse'])]:.1f}" if (s["iters"], s["reuse"]) in by_key else "-"
                 for s in data["rows"][0]["fpdm_search"]]
        lines.append(f"| {r['budget']} | {r['sampler'].upper()} | " + " | ".join(cells) + " |")
    return lines


def exp3(data: dict) -> list[str]:
    """Smoothing sweep."""
    lines = ["| iterations/step | timesteps | FPDM FID | acc % |", "|---|---|---|---|"]
    for p in data["fpdm"]:
        lines.append(f"| {p['iters']} | {p['num_steps']} | {fid(p)} | {acc(p)} |")
    d = data["dit"]
    lines.append(f"| DiT (8 blocks) | {d['num_steps']} | {fid(d)} | {acc(d)} |")
    return lines


def exp4(data: dict) -> list[str]:
    """Reuse sweep and residual summary."""
    lines = ["| iterations/step | timesteps | FID no reuse | FID reuse | acc % no reuse | acc % reuse |",
             "|---|---|---|---|---|---|"]
    for r in data["sweep"]:
        lines.append(f"| {r['iters']} | {r['num_steps']} | {fid(r['no_reuse'])} | {fid(r['reuse'])} | "
                     f"{acc(r['no_reuse'])} | {acc(r['reuse'])} |")
    d = data["diagnostics"]
    lines.append(f"\nResiduals at k={data['diag_iters']}: mean delta_t over timesteps "
                 f"{d['no_reuse']['mean_delta_over_timesteps']:.4f} (no reuse) vs "
                 f"{d['reuse']['mean_delta_over_timesteps']:.4f} (reuse); reuse lowers delta_t at "
                 f"{100 * data['fraction_timesteps_reuse_lowers_delta']:.0f}% of timesteps.")
    return lines


def exp5(data: dict) -> list[str]:
    """Training-method comparison."""
    lines = ["| method | n | m | units/step | steps | final loss | FID | acc % |", "|---|---|---|---|---|---|---|---|"]
    for name, v in data["variants"].items():
        b = v["bounds"]
        lines.append(f"| {name} | U{{{b['n_min']}..{b['N']}}} | "
                     f"{'U{%d..%d}' % (b['m_min'], b['M']) if b['m_min'] != b['M'] else b['M']} | "
                     f"{v['units_per_step']:g} | {v['train']['steps']} | {v['train']['final_loss']:.4f} | {fid(v)} | "
                     f"{acc(v)} |")
    return lines


def exp6(data: dict) -> list[str]:
    """Solver comparison."""
    lines = ["| budget | iterations/step | timesteps | FID iteration | FID Anderson | mean delta_t iteration | "
             "mean delta_t Anderson |", "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['budget']} | {r['iters']} | {r['num_steps']} | {fid(r['iteration'])} | "
                     f"{fid(r['anderson'])} | {r['iteration']['mean_delta']:.4f} | {r['anderson']['mean_delta']:.4f} |")
    return lines


def exp7(data: dict) -> list[str]:
    """Pre/post depth comparison (DDPM, each model's own allocation search)."""
    depths = list(data["models"])
    lines = ["| pre = post | params | training steps | units/step | total units | final loss | "
             + " | ".join(f"FID @ {b}" for b in data["budgets"]) + " |", "|---|---|---|---|---|---|"
             + "---|" * len(data["budgets"])]
    for depth in depths:
        m = data["models"][depth]
        cells = [f"{fid(r)} (k={r['best_iters']}{'+R' if r['best_reuse'] else ''}, {r['num_steps']} steps)"
                 for r in m["rows"]]
        train = m.get("train", {})
        loss = f"{train['final_loss']:.4f}" if "final_loss" in train else "-"
        lines.append(f"| {depth} | {m['num_params']:,} | {train.get('steps', '-')} | {m['units_per_step']:g} | "
                     f"{m.get('total_units', math.nan):,.0f} | {loss} | " + " | ".join(cells) + " |")
    lines.append("\nBest pre = post per budget: " + ", ".join(
        f"{b}: {d}" for b, d in data["best_pre_post_per_budget"].items()))
    lines.append(f"\nSearch (seed {data['search_seed']}, {data['search_samples']} samples each):")
    lines.append("\n| pre = post | budget | " + " | ".join(
        f"k={k}{'+R' if r else ''}" for k in data["candidate_iters"] for r in (False, True)) + " |")
    lines.append("|---|---|" + "---|" * (2 * len(data["candidate_iters"])))
    for depth in depths:
        for r in data["models"][depth]["rows"]:
            by_key = {(s["iters"], s["reuse"]): s["search_fid"] for s in r["search"]}
            cells = [f"{by_key[(k, reuse)]:.1f}" if (k, reuse) in by_key else "-"
                     for k in data["candidate_iters"] for reuse in (False, True)]
            lines.append(f"| {depth} | {r['budget']} | " + " | ".join(cells) + " |")
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
