"""records.py: the one JSON writer, JSON-lines records, statistics of the blocks spent, diagnostics."""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from allocation import plan_iterations
from records import (ABSOLUTE_PATH, TrajectoryStats, append_eval_record, describe_plan, read_json, record_root,
                     resolve_path, summarize_stats, to_jsonable, write_diagnostics, write_json, write_record)

REPO = Path(__file__).resolve().parents[1]


def test_write_json_is_atomic_and_reads_back(tmp_path):
    path = tmp_path / "sub" / "record.json"
    payload = {"n": np.int64(3), "x": np.float32(0.5), "tensor": torch.tensor([1, 2]), "path": tmp_path, "t": (1, 2)}
    assert write_json(path, payload) == path
    assert read_json(path, "--record") == {"n": 3, "x": 0.5, "tensor": [1, 2], "path": str(tmp_path), "t": [1, 2]}
    assert read_json(path, "--record") == to_jsonable(payload)
    assert sorted(p.name for p in path.parent.iterdir()) == ["record.json"]  # no temp file left behind
    with pytest.raises(FileNotFoundError, match="--record"):
        read_json(tmp_path / "missing.json", "--record")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="--record.*bad.json"):
        read_json(tmp_path / "bad.json", "--record")


def test_eval_records_append_one_line_each(tmp_path):
    path = tmp_path / "logs" / "eval.jsonl"
    first = append_eval_record(path, {"fid": np.float64(1.5)}, {"samples": "a.npz"}, ["few samples"])
    append_eval_record(path, {"fid": 2.0}, {"samples": "b.npz"})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["metrics"]["fid"] for line in lines] == [1.5, 2.0]
    assert lines[0]["warnings"] == ["few samples"] and lines[0]["time"] == first["time"]


def test_statistics_and_diagnostics_of_trajectories(tmp_path):
    plan = plan_iterations(fixed_point=True, pre_depth=1, post_depth=1, num_sampling_steps=2, fixed_point_iters=2)
    trajectories = [TrajectoryStats(timesteps=[9, 0], iteration_caps=[2, 2], iters_per_step=[2, 2],
                                    blocks_per_step=[4, 4], residuals_per_step=[[0.5, r], [0.2, 0.1]],
                                    reused_solution=[False, True]) for r in (0.25, 0.75)]
    stats = summarize_stats(plan, trajectories, [3, 1])
    assert stats["num_images"] == 4 and stats["blocks_per_image_max"] == 8 == plan.blocks_per_image
    assert stats["within_budget"] and stats["mean_delta_per_step"] == [0.5, 0.1]
    assert "2 iterations per step" in describe_plan(plan)
    plot = write_diagnostics(tmp_path / "diag.json", plan, trajectories, setup={"ckpt": "x"}, plot=False)
    diagnostics = json.loads((tmp_path / "diag.json").read_text())
    assert plot is None and diagnostics["steps"][0]["delta_t"] == [0.25, 0.75]
    assert diagnostics["per_batch_blocks_per_image"] == [8, 8] and diagnostics["setup"] == {"ckpt": "x"}


def test_no_committed_record_holds_an_absolute_path():
    listed = subprocess.run(["git", "ls-files", "-z", "--", "*.json", "*.jsonl"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    records = [REPO / name for name in listed.split("\0") if name]
    assert any(p.match("experiments/results/sweep/*/*/*/seed*.json") for p in records)  # the listing really works
    offending = {}
    for path in records:
        text = path.read_text()
        found = ABSOLUTE_PATH.findall(text) + [p for p in ("/work/", "/tmp/", "/home/", "/root/") if p in text]
        if found:
            offending[str(path.relative_to(REPO))] = found[:2]
    assert offending == {}, "run python -m experiments.portable_records"


def test_records_store_paths_relative_to_the_repository_or_their_own_folder(tmp_path):
    repo = tmp_path / "clone"
    (repo / ".git").mkdir(parents=True)
    run_dir = repo / "experiments" / "runs" / "a"
    inside = write_record(repo / "experiments" / "results" / "r.json",
                          {"run_dir": run_dir, "command": f"python train.py --output_dir {run_dir} --lr 1e-3",
                           "model": "DiT-XL/2", "rate": "GMACs /s"})
    stored = read_json(inside, "--record")
    assert stored == {"run_dir": "experiments/runs/a", "command": "python train.py --output_dir experiments/runs/a "
                      "--lr 1e-3", "model": "DiT-XL/2", "rate": "GMACs /s"}
    assert record_root(inside) == repo and resolve_path(stored["run_dir"], repo) == run_dir
    outside = write_record(tmp_path / "scratch" / "r.json", {"weights": tmp_path / "scratch" / "w" / "ema.pt"})
    assert read_json(outside, "--record") == {"weights": "w/ema.pt"}


def test_portable_records_rewrites_another_checkouts_paths_once(tmp_path):
    from experiments.portable_records import rewrite
    repo = tmp_path / "clone"
    (repo / ".git").mkdir(parents=True)
    (repo / "experiments").mkdir()
    path = repo / "experiments" / "seed0.json"
    text = json.dumps({"run_dir": "/home/a/fpdm/experiments/runs/x", "weights": "/scratch/b/ema.pt",
                       "command": "python train.py --output_dir /home/a/fpdm/experiments/runs --lr 1e-3"}, indent=2)
    path.write_text(text)
    assert rewrite(path, repo) and not rewrite(path, repo)  # idempotent
    assert json.loads(path.read_text()) == {"run_dir": "experiments/runs/x", "weights": "../../../scratch/b/ema.pt",
                                            "command": "python train.py --output_dir experiments/runs --lr 1e-3"}
    assert path.read_text().count("\n") == text.count("\n")  # formatting kept: only the paths changed
