"""Render the '## Benchmarks' markdown section of RESULTS.md from the JSON files in benchmarks/results/.

    python -m benchmarks.report --out /tmp/benchmarks_section.md
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import cli
from benchmarks.bench_common import RESULTS_DIR, format_table, parse_config
from config import flag


@dataclass
class ReportConfig:
    """Flags of the report."""
    results: str = flag(str(RESULTS_DIR), "Folder of the benchmark JSON files.")
    out: Optional[str] = flag(None, "Markdown output path (None: stdout only).")

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


def macs_section(p: dict[str, Any]) -> list[str]:
    """Analytic MAC tables (cost.py): per block and step, and at equal blocks per image."""
    from benchmarks.macs import per_block_pivot

    out = ["### Analytic MACs per image (cost.py; FPDM pre = post = 1; no guidance)", ""]
    out += [format_table(["setting", "tokens T", "width D", "DiT block GMACs", "FPDM iteration GMACs",
                          "iteration / block", "default k", "DiT step GMACs", "FPDM step GMACs (k = default)",
                          "FPDM / DiT step"],
                         [[r["setting"], r["tokens"], r["hidden_size"], f"{r['block_macs'] / 1e9:.4g}",
                           f"{r['iteration_macs'] / 1e9:.4g}", f"{r['iteration_over_block']:.3f}",
                           r["default_iters"], f"{r['dit_step_gmacs']:.4g}", f"{r['fpdm_step_gmacs']:.4g}",
                           f"{r['fpdm_over_dit_step']:.3f}"] for r in p["steps"]]), ""]
    headers, rows = per_block_pivot(p["steps"], p["equal_blocks"])
    out += ["FPDM/DiT GMACs per block pass when an FPDM step runs k iterations (1 + k + 1 blocks); at equal blocks per "
            "image this is the FPDM/DiT GMAC ratio:", "",
            format_table(headers, [[row[0]] + [f"{v:.3f}" if isinstance(v, float) else v for v in row[1:]]
                                   for row in rows]), ""]
    xl = [r for r in p["equal_blocks"] if r["model"] == "DiT-XL/2"]
    if xl:
        out += ["XL/2 at the same block budget (280 = 10 DiT steps, 560 = 20):", "",
                format_table(["budget blocks", "DiT steps", "DiT GMACs", "k", "FPDM steps", "FPDM blocks",
                              "FPDM GMACs", "FPDM/DiT GMACs"],
                             [[r["budget_blocks"], r["dit_steps"], f"{r['dit_gmacs']:,.0f}", r["iters_per_step"],
                               r["fpdm_steps"], r["fpdm_blocks"], f"{r['fpdm_gmacs']:,.0f}",
                               f"{r['fpdm_over_dit_gmacs']:.3f}"] for r in xl]), ""]
    return out


def memory_section(m: dict[str, Any]) -> list[str]:
    """Training-memory tables (pairs, ratios, n-sweep)."""
    def name(r):
        return ("FPDM" if r["fixed_point"] else "DiT") + r["model"][3:]

    out = [f"### Training memory and step time (device: {m['device']}, "
           f"{'forward+backward only' if m['no_optimizer'] else 'AdamW step included'}, one fresh process each)", ""]
    tensor = all("peak_tensor_mb" in r for r in m["pairs"])   # recorded since the PeakTensorBytes tracker
    rows = [[r["group"], name(r), r["batch"], f"{r['n']}/{r['m']}" if r["fixed_point"] else "-",
             f"{r['params'] / 1e6:.2f}M", gb(r["peak_rss_mb"]), gb(r["peak_minus_baseline_mb"])] +
            ([gb(r["peak_tensor_mb"])] if tensor else []) + [gb(r["saved_activation_mb"]), f"{r['step_time_s']:.2f}"] +
            ([gb(r["cuda_max_allocated_mb"])] if "cuda_max_allocated_mb" in r else [])
            for r in m["pairs"]]
    headers = ["setting", "model", "batch", "n/m", "params", "peak RSS GiB", "peak - import baseline GiB"] + \
        (["peak tensor GiB"] if tensor else []) + ["saved activations GiB", "step s"]
    if any("cuda_max_allocated_mb" in r for r in m["pairs"]):
        headers.append("CUDA max alloc GiB")
    out += [format_table(headers, rows), ""]
    def estimate(c):
        e = c.get("batch64_estimate_mb")
        return f"{c['batch64_estimate_ratio']:.2f} ({gb(e['fpdm'])} / {gb(e['dit'])} GiB)" if e else "-"

    def tensor_ratio(c):
        return f"{c['peak_tensor_ratio']:.3f}" if "peak_tensor_ratio" in c else "-"

    out += [format_table(["setting", "batch", "params FPDM/DiT", "peak memory FPDM/DiT", "peak tensor FPDM/DiT",
                          "saved activations FPDM/DiT", "step time FPDM/DiT", "batch-64 extrapolation FPDM/DiT"],
                         [[c["group"], c["batch"], f"{c['params_ratio']:.3f}", f"{c['memory_ratio']:.3f}",
                           tensor_ratio(c), f"{c['saved_activation_ratio']:.3f}", f"{c['step_time_ratio']:.2f}",
                           estimate(c)] for c in m["comparisons"]] +
                         [["**paper**: XL/2, V100", 64, "0.127 (85M / 674M)", "**0.40** (10.2 / 25.2 GB)", "-", "-",
                           "-", "-"]]), ""]
    if m["n_sweep"]:
        out += ["FPDM peak memory vs the number n of no-grad iterations (m fixed):", ""]
        sweep_tensor = all("peak_tensor_mb" in r for r in m["n_sweep"])
        out += [format_table(["setting", "n", "m", "peak RSS GiB", "peak - import baseline GiB"] +
                             (["peak tensor MiB"] if sweep_tensor else []) + ["saved activations MiB", "step s"],
                             [[r["group"], r["n"], r["m"], gb(r["peak_rss_mb"]), gb(r["peak_minus_baseline_mb"])] +
                              ([f"{r['peak_tensor_mb']:.2f}"] if sweep_tensor else []) +
                              [f"{r['saved_activation_mb']:.2f}", f"{r['step_time_s']:.2f}"] for r in m["n_sweep"]]),
                ""]
    return out + checkpointing_section(m.get("checkpointing"))


MEASURES = {"cuda_max_allocated_mb": "CUDA max allocated", "peak_tensor_mb": "peak tensor bytes (deterministic)",
            "saved_activation_mb": "saved activations (misses checkpoint's kept inputs)",
            "peak_minus_baseline_mb": "peak RSS - import baseline (noisy)"}


def checkpointing_section(c: dict[str, Any] | None) -> list[str]:
    """FPDM with and without --grad_checkpointing: memory growth from m = 0 to m = M and its ratio."""
    if not c or not c.get("summary"):
        return []
    summary = c["summary"]
    out = [f"FPDM with and without `--grad_checkpointing` ({summary['group'].split(' ', 1)[1]}, batch "
           f"{summary['batch']}, n = {summary['n']}; one fresh process each):", "",
           format_table(["grad checkpointing", "m", "peak RSS - baseline MiB", "peak tensor MiB",
                         "saved activations MiB", "step s"],
                        [["on" if r["grad_checkpointing"] else "off", r["m"], f"{r['peak_minus_baseline_mb']:.0f}",
                          f"{r['peak_tensor_mb']:.0f}", f"{r['saved_activation_mb']:.0f}", f"{r['step_time_s']:.2f}"]
                         for r in c["runs"]]), "",
           format_table([f"memory growth m = 0 -> {summary['m']}", "without MiB", "with MiB",
                         f"with / without (target <= {summary['target_ratio']})"],
                        [[MEASURES.get(k, k), f"{g['plain_mb']:.0f}", f"{g['checkpointed_mb']:.0f}",
                          f"**{g['ratio']:.3f}**" if k == summary["primary_measure"] else f"{g['ratio']:.3f}"]
                         for k, g in summary["growth"].items()]), "",
           f"Step time with / without checkpointing at m = {summary['m']}: "
           f"{summary['step_time_ratio_checkpointed_over_plain']:.2f} (back-to-back processes; see the interleaved "
           "measurement below).", ""]
    return out


def speed_section(p: dict[str, Any]) -> list[str]:
    """Interleaved training step times and their cost.py predictions."""
    out = [f"### Training step time, interleaved in one process (device: {p['runs'][0]['device']}; median of "
           "per-round ratios)", ""]
    rows = []
    for run in p["runs"]:
        for label, v in run["variants"].items():
            o = v["over_dit"]
            rows.append([run["size"], run["batch"], label, f"{run['n']}/{run['m']}" if label != "DiT" else "-",
                         f"{v['params'] / 1e6:.2f}M", f"{v['step_s']['median']:.3f}",
                         f"{o['median']:.2f} [{o['min']:.2f}, {o['max']:.2f}]", f"{v['predicted_over_dit']:.2f}"])
    out += [format_table(["size", "batch", "model", "n/m", "params", "step s (median)", "time / DiT [min, max]",
                          "cost.py MACs / DiT"], rows), ""]
    for run in p["runs"]:
        r = run["checkpointed_over_plain_fpdm"]
        out.append(f"- {run['size']} ({run['rounds']} rounds): FPDM step time with / without checkpointing "
                   f"{r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]")
    return out + [""]


def throughput_section(t: dict[str, Any]) -> list[str]:
    """Sampling throughput and overhead table."""
    out = ["### Sampling throughput and sampler overhead (equal blocks per step, and FPDM at equal GMACs; median of "
           "interleaved repeats)", ""]
    rows = []
    for run in t["runs"]:
        equal = [("FPDM@GMACs", run["equal_gmacs"]["FPDM"])] if "equal_gmacs" in run else []
        for label, m in [*run["models"].items(), *equal]:
            o = m["overhead_ratio"]
            speed = m["block_forwards_per_s"]
            rows.append([run["size"], run["device"], label, run["batch"], m["num_steps"],
                         m["iters_per_step"] if m["fixed_point"] else "-", m["blocks_per_image"],
                         f"{m['gmacs_per_image']:.4g}" if "gmacs_per_image" in m else "-",
                         f"{speed['median']:,.0f} (±{speed['spread_pct']:.0f}%)",
                         f"{m['bare_block_s']['median'] * 1e3:.2f}",
                         f"{m['per_block_in_sampling_s']['median'] * 1e3:.2f}",
                         f"{o['median']:.2f} [{o['min']:.2f}, {o['max']:.2f}]"])
    out += [format_table(["size", "device", "model", "batch", "steps", "iters/step", "blocks/image", "GMACs/image",
                          "image-block forwards/s", "bare block ms", "block in sampling ms",
                          "overhead [min, max]"], rows), ""]
    for run in t["runs"]:
        r = run["sample_time_fpdm_over_dit"]
        mo = run["models"]["FPDM"].get("map_over_block")
        eq = run.get("equal_gmacs")
        g = eq["sample_time_fpdm_over_dit"] if eq else None
        out.append(f"- {run['size']} ({run['device']}, {run['repeats']} repeats): sampling time FPDM/DiT at equal "
                   f"blocks {r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]"
                   + (f"; at equal GMACs ({eq['FPDM']['blocks_per_image']} vs "
                      f"{run['models']['DiT']['blocks_per_image']} blocks, GMACs ratio "
                      f"{eq['gmacs_fpdm_over_dit']:.3f}) {g['median']:.2f} [{g['min']:.2f}, {g['max']:.2f}]"
                      if eq else "")
                   + (f"; FPDM fixed-point map (block + injection MLP) / bare block {mo['median']:.2f}" if mo else ""))
    return out + [""]


def main(argv: Sequence[str] | None = None) -> str:
    """Write the markdown section (stdout and --out)."""
    config = parse_config(ReportConfig, __doc__, argv)
    folder = Path(config.results)
    lines: list[str] = []
    for name, render in (("param_counts", param_section), ("macs", macs_section), ("train_memory", memory_section),
                         ("train_speed", speed_section)):
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
