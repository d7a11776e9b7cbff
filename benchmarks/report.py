"""Render the '## Benchmarks' markdown section of RESULTS.md from the JSON files in benchmarks/results/.

    python -m benchmarks.report --out /tmp/benchmarks_section.md
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import cli
from benchmarks.bench_common import RESULTS_DIR, format_table, option, parse_config


@dataclass
class ReportConfig:
    """Flags of the report."""
    results: str = option(str(RESULTS_DIR), "Folder of the benchmark JSON files.")
    out: Optional[str] = option(None, "Markdown output path (None: stdout only).")

    def validate(self) -> "ReportConfig":
        """Nothing to check beyond the types; returns self."""
        return self


def load(path: Path) -> dict[str, Any] | None:
    """A results JSON, or None when that benchmark has not been run."""
    return json.loads(path.read_text()) if path.exists() else None


def gb(mb: float) -> str:
    """MiB -> a GB-ish string with two decimals (GiB)."""
    return f"{mb / 1024:.2f}"


def param_section(p: dict[str, Any]) -> list[str]:
    """Parameter counts table."""
    rows = [[r["model"], f"{r['dit_params'] / 1e6:.1f}M", f"{r['fpdm_params'] / 1e6:.1f}M",
             f"{r['ratio_fpdm_over_dit']:.3f}", f"{r['reduction_pct']:.1f}%"] for r in p["rows"]]
    xl = next((r for r in p["rows"] if r["model"] == "DiT-XL/2"), None)
    out = ["### Parameter counts (meta device; 32x32x4 latents, 1000 classes, pre = post = 1)", ""]
    if xl:
        out += [format_table(["", "paper", "ours"],
                             [["DiT-XL/2", "674M", f"{xl['dit_params'] / 1e6:.1f}M"],
                              ["FPDM-XL/2", "86M", f"{xl['fpdm_params'] / 1e6:.1f}M"],
                              ["reduction", "87%", f"{xl['reduction_pct']:.1f}%"]]), ""]
    out += [format_table(["size", "DiT", "FPDM", "FPDM/DiT", "fewer"], rows), ""]
    return out


def memory_section(m: dict[str, Any]) -> list[str]:
    """Training-memory tables (pairs, ratios, n-sweep)."""
    def name(r):
        return ("FPDM" if r["fixed_point"] else "DiT") + r["model"][3:]

    out = [f"### Training memory and step time (device: {m['device']}, "
           f"{'forward+backward only' if m['no_optimizer'] else 'AdamW step included'}, one fresh process each)", ""]
    rows = [[r["group"], name(r), r["batch"], f"{r['n']}/{r['m']}" if r["fixed_point"] else "-",
             f"{r['params'] / 1e6:.2f}M", gb(r["peak_rss_mb"]), gb(r["peak_minus_baseline_mb"]),
             gb(r["saved_activation_mb"]), f"{r['step_time_s']:.2f}"] +
            ([gb(r["cuda_max_allocated_mb"])] if "cuda_max_allocated_mb" in r else [])
            for r in m["pairs"]]
    headers = ["setting", "model", "batch", "n/m", "params", "peak RSS GiB", "peak - import baseline GiB",
               "saved activations GiB", "step s"]
    if any("cuda_max_allocated_mb" in r for r in m["pairs"]):
        headers.append("CUDA max alloc GiB")
    out += [format_table(headers, rows), ""]
    def estimate(c):
        e = c.get("batch64_estimate_mb")
        return f"{c['batch64_estimate_ratio']:.2f} ({gb(e['fpdm'])} / {gb(e['dit'])} GiB)" if e else "-"

    out += [format_table(["setting", "batch", "params FPDM/DiT", "peak memory FPDM/DiT", "saved activations FPDM/DiT",
                          "step time FPDM/DiT", "batch-64 extrapolation FPDM/DiT"],
                         [[c["group"], c["batch"], f"{c['params_ratio']:.3f}", f"{c['memory_ratio']:.3f}",
                           f"{c['saved_activation_ratio']:.3f}", f"{c['step_time_ratio']:.2f}", estimate(c)]
                          for c in m["comparisons"]] +
                         [["**paper**: XL/2, V100", 64, "0.127 (85M / 674M)", "**0.40** (10.2 / 25.2 GB)", "-", "-",
                           "-"]]), ""]
    if m["n_sweep"]:
        out += ["FPDM peak memory vs the number n of no-grad iterations (m fixed):", ""]
        out += [format_table(["setting", "n", "m", "peak RSS GiB", "peak - import baseline GiB",
                              "saved activations MiB", "step s"],
                             [[r["group"], r["n"], r["m"], gb(r["peak_rss_mb"]), gb(r["peak_minus_baseline_mb"]),
                               f"{r['saved_activation_mb']:.2f}", f"{r['step_time_s']:.2f}"] for r in m["n_sweep"]]),
                ""]
    return out


def throughput_section(t: dict[str, Any]) -> list[str]:
    """Sampling throughput and overhead table."""
    out = ["### Sampling throughput and sampler overhead (equal blocks per step; median of interleaved repeats)", ""]
    rows = []
    for run in t["runs"]:
        for label, m in run["models"].items():
            o = m["overhead_ratio"]
            speed = m["block_forwards_per_s"]
            rows.append([run["size"], run["device"], label, run["batch"], m["num_steps"],
                         m["iters_per_step"] if m["fixed_point"] else "-", m["blocks_per_image"],
                         f"{speed['median']:,.0f} (±{speed['spread_pct']:.0f}%)",
                         f"{m['bare_block_s']['median'] * 1e3:.2f}",
                         f"{m['per_block_in_sampling_s']['median'] * 1e3:.2f}",
                         f"{o['median']:.2f} [{o['min']:.2f}, {o['max']:.2f}]"])
    out += [format_table(["size", "device", "model", "batch", "steps", "iters/step", "blocks/image",
                          "image-block forwards/s", "bare block ms", "block in sampling ms",
                          "overhead [min, max]"], rows), ""]
    for run in t["runs"]:
        r = run["sample_time_fpdm_over_dit"]
        mo = run["models"]["FPDM"].get("map_over_block")
        out.append(f"- {run['size']} ({run['device']}, {run['repeats']} repeats): sampling time FPDM/DiT at equal "
                   f"blocks {r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]"
                   + (f"; FPDM fixed-point map (block + injection MLP) / bare block {mo['median']:.2f}" if mo else ""))
    return out + [""]


def main(argv: Sequence[str] | None = None) -> str:
    """Write the markdown section (stdout and --out)."""
    config = parse_config(ReportConfig, __doc__, argv)
    folder = Path(config.results)
    lines: list[str] = []
    for name, render in (("param_counts", param_section), ("train_memory", memory_section)):
        payload = load(folder / f"{name}.json")
        if payload is not None:
            lines += render(payload)
    throughput = [json.loads(p.read_text()) for p in sorted(folder.glob("sampling_throughput*.json"))]
    if throughput:  # sampling_throughput.json plus optional extra runs (e.g. sampling_throughput_xl.json)
        lines += throughput_section({"runs": [run for payload in throughput for run in payload["runs"]]})
    text = "\n".join(lines)
    print(text)
    if config.out:
        Path(config.out).write_text(text + "\n")
    return text


if __name__ == "__main__":
    cli.run(main)
