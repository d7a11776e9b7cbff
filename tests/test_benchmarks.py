"""The benchmark scripts' --quick modes run and write JSON with the expected keys and sane values."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from config import ModelConfig, UserError
import cost
from benchmarks import default_run, gpu, macs, param_counts, report, sampling_throughput, train_speed

REPO = Path(__file__).resolve().parents[1]


def test_param_counts_quick_fpdm_is_87_percent_smaller_at_xl2(tmp_path):
    out = tmp_path / "params.json"
    param_counts.main(["--quick", "--out", str(out)])
    payload = json.loads(out.read_text())
    rows = {r["model"]: r for r in payload["rows"]}
    assert set(rows) == {"DiT-XL/2", "DiT-Ti/2"}
    xl = rows["DiT-XL/2"]
    assert 670e6 < xl["dit_params"] < 680e6          # paper: 674M (DiT's 675M)
    assert 80e6 < xl["fpdm_params"] < 90e6           # paper: 86M
    assert xl["ratio_fpdm_over_dit"] < 1 and round(xl["reduction_pct"]) == 87
    assert rows["DiT-Ti/2"]["ratio_fpdm_over_dit"] < 1


def test_param_counts_rejects_unknown_model(tmp_path):
    with pytest.raises(ValueError, match="--model"):
        param_counts.main(["--models", "DiT-XXL/2", "--out", str(tmp_path / "p.json")])


def test_macs_quick_rows_come_from_cost_py(tmp_path):
    out = tmp_path / "macs.json"
    payload = macs.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    steps = {r["setting"]: r for r in payload["steps"]}
    assert set(steps) == {"Ti/2 digits 8x8", "XL/2 latents 32x32x4"}
    xl, ti = steps["XL/2 latents 32x32x4"], steps["Ti/2 digits 8x8"]
    assert xl["tokens"] == 256 and ti["tokens"] == 16
    assert round(xl["iteration_over_block"], 2) == 1.48       # the injection MLP: +6TD^2 on a block's ~12TD^2
    dit_config, fpdm_config = macs.model_configs("XL/2 latents 32x32x4")
    assert xl["dit_step_macs"] == cost.macs_per_step(dit_config)
    assert xl["fpdm_step_macs"] == cost.macs_per_step(fpdm_config, 26) and xl["default_iters"] == 26
    assert xl["block_macs"] == cost.macs_per_block(1152, 256) and xl["dit_step_blocks"] == xl["fpdm_step_blocks"]
    equal = {(r["budget_blocks"], r["iters_per_step"]): r for r in payload["equal_blocks"]
             if r["setting"] == "XL/2 latents 32x32x4"}
    assert {b for b, _ in equal} == {280, 560}
    row = equal[(280, 12)]                                     # 20 FPDM steps of 1 + 12 + 1 blocks vs 10 DiT steps
    assert row["fpdm_steps"] == 20 and row["fpdm_blocks"] == 280 and row["dit_steps"] == 10
    assert row["fpdm_macs"] == 20 * cost.macs_per_step(fpdm_config, 12)
    assert 1.0 < row["fpdm_over_dit_gmacs"] < 1.48


def test_macs_rejects_unknown_setting(tmp_path):
    with pytest.raises(UserError, match="--settings"):
        macs.main(["--settings", "Z/9 latents", "--out", str(tmp_path / "m.json")])


def _run_quick(module: str, out: Path, timeout: float) -> dict:
    """`python -m benchmarks.<module> --quick --out OUT` in a fresh process; the JSON it wrote."""
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_train_memory_quick_fresh_processes(tmp_path):
    payload = _run_quick("train_memory", tmp_path / "memory.json", timeout=120)
    assert {"pairs", "comparisons", "n_sweep", "paper", "machine"} <= set(payload)
    dit, fpdm = payload["pairs"]
    assert not dit["fixed_point"] and fpdm["fixed_point"] and dit["batch"] == fpdm["batch"] == 64
    for r in payload["pairs"] + payload["n_sweep"]:
        assert r["peak_rss_mb"] >= r["post_build_rss_mb"] > 0 and r["saved_activation_mb"] > 0
        assert r["step_time_s"] > 0 and all(loss == loss for loss in r["losses"])  # finite (not NaN)
    comparison = payload["comparisons"][0]
    assert comparison["params_ratio"] < 1
    assert comparison["memory_ratio"] > 0 and comparison["step_time_ratio"] > 0
    # The n no-grad iterations store nothing for backward: activation bytes do not depend on n.
    sweep = payload["n_sweep"]
    assert sorted(r["n"] for r in sweep) == [0, 12] and len({r["m"] for r in sweep}) == 1
    assert len({r["saved_activation_mb"] for r in sweep}) == 1
    assert len({r["peak_tensor_mb"] for r in sweep}) == 1     # nor does the peak of live tensor bytes
    for r in payload["pairs"] + payload["n_sweep"] + payload["checkpointing"]["runs"]:
        assert r["peak_tensor_mb"] >= r["params"] * 4 / 2**20 + r["saved_activation_mb"] / 2
    # Gradient checkpointing: memory growth from m = 0 to m = 12 is at most 35% of the growth without it.
    ckpt = payload["checkpointing"]
    assert sorted((r["grad_checkpointing"], r["m"]) for r in ckpt["runs"]) == [(False, 0), (False, 12), (True, 0),
                                                                               (True, 12)]
    growth = ckpt["summary"]["growth"]
    assert ckpt["summary"]["primary_measure"] == "peak_tensor_mb" and ckpt["summary"]["target_ratio"] == 0.35
    for measure in ("peak_tensor_mb", "saved_activation_mb"):  # deterministic measures
        assert growth[measure]["plain_mb"] > 0 and growth[measure]["ratio"] <= 0.35, (measure, growth[measure])
    losses = {r["grad_checkpointing"]: r["losses"] for r in ckpt["runs"] if r["m"] == 12}
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)   # same computation, recomputed in backward


def test_train_speed_quick_interleaves_dit_fpdm_and_checkpointed_fpdm(tmp_path):
    out = tmp_path / "speed.json"
    train_speed.main(["--quick", "--out", str(out)])
    (run,) = json.loads(out.read_text())["runs"]
    assert run["size"] == "Ti/2-digits" and (run["n"], run["m"], run["rounds"], run["batch"]) == (12, 12, 2, 8)
    variants = run["variants"]
    assert list(variants) == ["DiT", "FPDM", "FPDM+ckpt"]
    for v in variants.values():
        assert len(v["raw_step_s"]) == 2 and v["step_s"]["median"] > 0 and v["over_dit"]["n"] == 2
        assert all(loss == loss for loss in v["losses"])                      # finite
    assert variants["DiT"]["over_dit"]["median"] == 1.0
    assert variants["FPDM"]["params"] == variants["FPDM+ckpt"]["params"] < variants["DiT"]["params"]
    # Same weights, same batches: checkpointing recomputes the same numbers.
    assert variants["FPDM+ckpt"]["losses"] == pytest.approx(variants["FPDM"]["losses"], rel=1e-5)
    # cost.py: 26 + 2 x 14 FPDM block forwards (x ~1.48 per iteration) vs 3 x 8 for the DiT.
    assert 2.5 < variants["FPDM"]["predicted_over_dit"] < variants["FPDM+ckpt"]["predicted_over_dit"] < 4.5
    assert run["checkpointed_over_plain_fpdm"]["median"] > 0


def test_sampling_throughput_quick(tmp_path):
    out = tmp_path / "throughput.json"
    sampling_throughput.main(["--quick", "--device", "cpu", "--out", str(out)])
    payload = json.loads(out.read_text())
    (run,) = payload["runs"]
    assert run["size"] == "Ti/2-digits" and set(run["models"]) == {"DiT", "FPDM"}
    dit, fpdm = run["models"]["DiT"], run["models"]["FPDM"]
    assert dit["blocks_per_image"] == fpdm["blocks_per_image"] == 4 * 8   # equal cost: 4 steps x 8 blocks
    assert fpdm["iters_per_step"] == 6 and fpdm["params"] < dit["params"]
    for m in (dit, fpdm):
        assert m["block_forwards_per_s"]["median"] > 0
        assert m["overhead_ratio"]["n"] == 2 and 0.3 < m["overhead_ratio"]["median"] < 20
        assert m["overhead_ratio"]["min"] <= m["overhead_ratio"]["median"] <= m["overhead_ratio"]["max"]
    assert run["sample_time_fpdm_over_dit"]["median"] > 0
    # Equal GMACs (--budget_gmacs = the DiT's, cost.py): the FPDM spends fewer blocks, at most the DiT's GMACs.
    equal = run["equal_gmacs"]
    fpdm_gmacs = equal["FPDM"]
    assert fpdm_gmacs["num_steps"] == dit["num_steps"] == 4 and fpdm_gmacs["params"] == fpdm["params"]
    assert fpdm_gmacs["blocks_per_image"] < dit["blocks_per_image"]
    assert 0.9 < equal["gmacs_fpdm_over_dit"] <= 1.0
    dit_config = ModelConfig(model="DiT-Ti/2", image_size=8, in_channels=1, num_classes=10)
    assert dit["gmacs_per_image"] * 1e9 == pytest.approx(4 * cost.macs_per_step(dit_config), rel=1e-12)
    assert fpdm["gmacs_per_image"] > dit["gmacs_per_image"]       # equal blocks: the injection MLP costs extra
    assert equal["sample_time_fpdm_over_dit"]["n"] == 2 and fpdm_gmacs["overhead_ratio"]["median"] > 0


def test_sampling_throughput_rejects_unknown_size(tmp_path):
    with pytest.raises(ValueError, match="--sizes"):
        sampling_throughput.main(["--sizes", "Z/9", "--out", str(tmp_path / "t.json")])


def test_report_renders_the_recorded_results(tmp_path):
    out = tmp_path / "section.md"
    text = report.main(["--out", str(out)])
    assert out.read_text() == text + "\n"
    for heading in ("### Parameter counts", "### Training memory", "### Sampling throughput", "### Analytic MACs",
                    "### Training step time"):
        assert heading in text
    assert "with / without (target <= 0.35)" in text and "FPDM@GMACs" in text   # checkpointing, equal GMACs


def test_default_run_quick_trains_samples_and_scores_both_models(tmp_path):
    out = tmp_path / "default_run.json"
    default_run.main(["--quick", "--out", str(out), "--work_dir", str(tmp_path / "work")])
    payload = json.loads(out.read_text())
    assert payload["quick"] and payload["train"]["steps"] == 4 and payload["train"]["seconds"] > 0
    assert "configs/digits.yaml" in " ".join(payload["train"]["command"])
    assert (tmp_path / "work" / "run" / "ema.safetensors").is_file()
    assert payload["sampling"]["num_samples"] == 10 and payload["sampling"]["cfg_scale"] == 1.0
    assert set(payload["models"]) == {"trained", "shipped"}
    for m in payload["models"].values():
        assert 0.0 <= m["classifier_accuracy"] <= 1.0 and m["digits_fid"] > 0 and m["sample_seconds"] > 0
        assert m["sampler"] == "ddpm" and m["num_sampling_steps"] == 5 and sum(m["predicted_class_histogram"]) == 10
    assert payload["models"]["shipped"]["weights"].endswith("pretrained/fpdm-digits.safetensors")
    ratio = payload["ratio_trained_over_shipped"]
    assert ratio["digits_fid"] > 0 and ratio["classifier_accuracy"] >= 0
    with pytest.raises(UserError, match="--work_dir"):  # never writes into a used folder
        default_run.main(["--quick", "--out", str(out), "--work_dir", str(tmp_path / "work")])


def test_sjfb_rank_skew_matches_simulated_per_rank_draws(tmp_path):
    import torch
    from dataclasses import replace
    from benchmarks import sjfb_rank_skew
    from cost import training_macs_per_image
    from models import draw_sjfb_iters
    payload = sjfb_rank_skew.main(["--out", str(tmp_path / "skew.json"), "--ranks", "1,8,16"])
    ratios = {row["ranks"]: row["per_rank_over_shared"] for row in payload["rows"]}
    assert ratios["1"] == pytest.approx(1.0) and 1.45 < ratios["8"] < 1.57 and 1.55 < ratios["16"] < 1.65
    # The exact expectation agrees with simulated DDP steps: 8 ranks each drawing their own (n, m).
    config = replace(sjfb_rank_skew.PAPER_FPDM, fixed_point_no_grad_max_iters=12, fixed_point_with_grad_max_iters=12)
    generator = torch.Generator().manual_seed(0)
    steps = [[training_macs_per_image(config, draw_sjfb_iters(config, generator)) for _ in range(8)]
             for _ in range(3000)]
    simulated = sum(max(s) for s in steps) / sum(sum(s) / 8 for s in steps)
    assert simulated == pytest.approx(ratios["8"], rel=0.02)


#################################################################################
#                    benchmarks/gpu.py: the prepared GPU check                  #
#################################################################################

def _strings(value):
    """Every string in a JSON value (keys included)."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *_strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _check_gpu_memory_part(part):
    assert part["measure"] == "peak_tensor_mb" and "cuda_max_allocated_mb" in part["skipped"]
    runs = {(r["label"], r["grad_checkpointing"]): r for r in part["runs"]}
    assert set(runs) == {(label, ckpt) for label in ("DiT", "FPDM m=12", "FPDM S-JFB draws") for ckpt in (False, True)}
    for (label, ckpt), r in runs.items():
        assert r["cuda_max_allocated_mb"] is None and r["peak_tensor_mb"] > 0 and r["losses_finite"]
        assert r["paths"] == {"device": "cpu", "autocast": "bf16", "tf32": None, "fused_adamw": False}
        assert r["batch"] == 4 and r["params"] < 10e6                       # toy size (Ti/2), not XL/2
        if label == "FPDM m=12":
            assert r["sjfb_iters"] == [[12, 12]] * 2
        elif label == "FPDM S-JFB draws":
            assert all(0 <= n <= 12 and 1 <= m <= 12 for n, m in r["sjfb_iters"])
    assert runs[("FPDM m=12", False)]["params"] < runs[("DiT", False)]["params"]
    for ckpt, suffix in ((False, ""), (True, " ckpt")):
        expected = runs[("FPDM m=12", ckpt)]["peak_tensor_mb"] / runs[("DiT", ckpt)]["peak_tensor_mb"]
        assert part["ratios"][f"FPDM m=12 / DiT{suffix}"] == pytest.approx(expected)
    assert part["ratios"]["DiT ckpt / plain"] == pytest.approx(
        runs[("DiT", True)]["peak_tensor_mb"] / runs[("DiT", False)]["peak_tensor_mb"])
    assert part["paper"]["fpdm_gb"] == 10.2 and part["paper"]["dit_gb"] == 25.2


def _check_gpu_speed_part(part):
    assert part["peak_bf16_flops"] is None and "cpu" in part["skipped"]["mfu"]
    runs = {r["label"]: r for r in part["runs"]}
    assert set(runs) == {"DiT eager", "FPDM eager", "DiT compiled", "FPDM compiled"}
    fpdm_config, _ = gpu.preset_configs(True, True, gpu.PINNED_SJFB)
    dit_config, _ = gpu.preset_configs(False, True, {})
    for label, r in runs.items():
        assert r["compile"] == label.endswith("compiled") and r["mfu"] is None and r["losses_finite"]
        assert r["step_s"]["n"] == 2 and r["warmup_steps"] == 1
        assert r["images_per_s"] == pytest.approx(4 / r["step_s"]["median"])
        expected = cost.training_macs_per_image(fpdm_config, (12, 12)) if r["fixed_point"] else \
            cost.training_macs_per_image(dit_config, None)
        assert r["train_gflops_per_image"] == pytest.approx(2 * expected / 1e9)
    for mode in ("eager", "compiled"):
        assert part["ratios"][f"FPDM / DiT {mode}"] == pytest.approx(
            runs[f"FPDM {mode}"]["images_per_s"] / runs[f"DiT {mode}"]["images_per_s"])
    assert part["ratios"]["DiT compiled / eager"] == pytest.approx(
        runs["DiT compiled"]["images_per_s"] / runs["DiT eager"]["images_per_s"])


def _check_gpu_sampling_part(part):
    assert set(part["precisions"]) == {"fp32", "tf32", "bf16"}
    resolved = {k: v["precision"] for k, v in part["precisions"].items()}
    assert resolved == {"fp32": "fp32", "tf32": "fp32", "bf16": "bf16"}     # TF32 is a CUDA feature
    for summary in part["precisions"].values():
        models = summary["models"]
        two_steps = 2 * cost.architecture("DiT-Ti/2").depth                        # Ti/2, 2 steps: equal blocks
        assert models["DiT"]["blocks_per_image"] == models["FPDM"]["blocks_per_image"] == two_steps
        assert models["FPDM@GMACs"]["gmacs_per_image"] <= models["DiT"]["gmacs_per_image"]
        for key, label in (("equal_blocks", "FPDM"), ("equal_gmacs", "FPDM@GMACs")):
            assert summary["fpdm_over_dit_images_per_s"][key] == pytest.approx(
                models[label]["images_per_s"] / models["DiT"]["images_per_s"])
    floors = part["residual_floor"]
    assert floors["fp32"]["precision"] == "fp32" and floors["bf16"]["precision"] == "bf16"
    assert all(0 < floors[p]["floor"] < 1 for p in ("fp32", "bf16"))
    assert floors["bf16 / fp32"] == pytest.approx(floors["bf16"]["floor"] / floors["fp32"]["floor"])


def test_gpu_quick_runs_every_part_on_the_cpu(tmp_path):
    payload = _run_quick("gpu", tmp_path / "gpu.json", timeout=600)
    assert payload["command"] == "python -m benchmarks.gpu --quick --out '<outside the repository>/gpu.json'"
    assert payload["versions"]["device"] == "cpu" and payload["versions"]["cuda"] is None
    assert payload["versions"]["torch"] and payload["quick"] and payload["sizes"]["batch"] == 4
    assert not [s for s in _strings(payload) if s.startswith("/") or str(REPO) in s or str(tmp_path) in s]
    parts = payload["parts"]
    assert list(parts) == list(gpu.PARTS)
    for part in parts.values():
        assert part["status"] == "done", part
        assert 0 < part["seconds"] <= part["limit_s"] == gpu.QUICK_PART_SECONDS
    assert payload["total_runtime_s"] >= sum(p["seconds"] for p in parts.values())
    _check_gpu_memory_part(parts["memory"])
    _check_gpu_speed_part(parts["train_speed"])
    _check_gpu_sampling_part(parts["sampling"])
    cuda_paths = parts["cuda_paths"]
    assert cuda_paths["pytest_cuda"]["status"] == "skipped" and "CUDA" in cuda_paths["pytest_cuda"]["reason"]
    ddp = cuda_paths["sample_ddp"]
    assert ddp["status"] == "done" and ddp["backend"] == "gloo" and ddp["device"] == "cpu" and ddp["images"] == 8


def test_gpu_part_past_its_limit_keeps_what_it_measured():
    def slow(config, part):
        part["runs"] = ["first"]
        time.sleep(5)
        part["runs"].append("second")

    started = time.perf_counter()
    part = gpu.run_part(slow, gpu.GpuConfig(), 0.3)
    assert time.perf_counter() - started < 3
    assert part["status"] == "timed_out" and part["runs"] == ["first"] and "0.3 s" in part["reason"]
    assert 0.3 <= part["seconds"] < 3 and part["limit_s"] == 0.3
    failed = gpu.run_part(lambda config, part: part.update(x=1 / 0), gpu.GpuConfig(), 5)
    assert failed["status"] == "failed" and failed["error"].startswith("ZeroDivisionError")
    assert str(REPO) not in failed["traceback"] and "benchmarks/gpu.py" in failed["traceback"]
    skipped = gpu.run_part(lambda config, part: part.update(status="skipped", reason="why"), gpu.GpuConfig(), 5)
    assert skipped["status"] == "skipped"


def test_gpu_writes_the_json_after_each_part(tmp_path, monkeypatch):
    def done(config, part):
        part["figure"] = 1.0

    def interrupted(config, part):
        raise KeyboardInterrupt  # a killed run: no later part and no final write

    monkeypatch.setitem(gpu.PART_FUNCTIONS, "memory", done)
    monkeypatch.setitem(gpu.PART_FUNCTIONS, "train_speed", interrupted)
    out = tmp_path / "gpu.json"
    with pytest.raises(KeyboardInterrupt):
        gpu.main(["--parts", "memory,train_speed,sampling", "--out", str(out)])
    parts = json.loads(out.read_text())["parts"]
    assert parts["memory"]["status"] == "done" and parts["memory"]["figure"] == 1.0
    assert parts["cuda_paths"] == {"status": "skipped", "reason": "not in --parts"}


@pytest.mark.parametrize("args, flag", [(["--parts", "memory,gpu_magic"], "--parts"), (["--parts", ","], "--parts"),
                                        (["--part_seconds", "0"], "--part_seconds"), (["--batch", "0"], "--batch")])
def test_gpu_rejects_bad_flags_naming_them(args, flag, tmp_path):
    with pytest.raises(UserError, match=flag):
        gpu.main([*args, "--out", str(tmp_path / "gpu.json")])


def test_gpu_device_table_and_default_output():
    assert gpu.peak_bf16_flops("NVIDIA H200") == (989.4e12, None)
    assert gpu.peak_bf16_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert gpu.peak_bf16_flops("NVIDIA A100-SXM4-80GB")[0] == 312e12
    flops, why = gpu.peak_bf16_flops("Tesla V100-SXM2-16GB")
    assert flops is None and "V100" in why
    assert gpu.default_out("NVIDIA H200") == REPO / "benchmarks" / "results" / "gpu_nvidia_h200.json"
    assert gpu.shown(str(REPO / "benchmarks" / "x.json")) == "benchmarks/x.json"
