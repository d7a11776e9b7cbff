"""sample_ddp.py: shards, resuming with any number of processes, packing, and failures on one rank (CPU, gloo)."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

import sample_ddp
import sample_folders
import sampling
from config import SampleConfig, UserError
from images import read_shard, save_shard
from test_sampling import REPO, TINY_FPDM, build, fixed_plan, write_pt
from test_sampling import fpdm, fpdm_ckpt  # noqa: F401 (module fixtures shared with test_sampling.py)



def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun_command(args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), str(REPO / "sample_ddp.py"), *args]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _torchrun(args, tmp_path, check=True):
    result = subprocess.run(_torchrun_command(args), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                            timeout=240)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _shard_indices(sample_dir: Path) -> list[int]:
    """Every index held by the shards, with repeats (so duplicates show)."""
    return sorted(i for path in sample_folders.shard_files(sample_dir) for i in read_shard(path, "x")["indices"].tolist())


#################################################################################
#                        Two processes: pack and resume                         #
#################################################################################

def test_sample_ddp_two_processes_packs_and_resumes(fpdm, fpdm_ckpt, tmp_path):
    sample_dir = tmp_path / "fid"
    common = ["--ckpt", str(fpdm_ckpt), "--sample-dir", str(sample_dir), "--per-proc-batch-size", "2",
              "--global-seed", "3", "--num_sampling_steps", "3", "--fixed_point_iters", "2",
              "--fixed_point_reuse_solution", "True", "--cfg_scale", "2.0", "--device", "cpu"]
    _torchrun(["--num-fid-samples", "5", *common], tmp_path)
    first = np.load(sample_dir / "samples_5.npz")
    assert first["arr_0"].shape == (5, 8, 8, 3) and first["arr_0"].dtype == np.uint8
    assert (first["arr_0"][..., 0] == first["arr_0"][..., 2]).all()  # grayscale repeated to RGB
    assert first["arr_1"].shape == (5,)

    # Same images as one process with another batch size (per-image seeds).
    config = SampleConfig(cfg_scale=2.0, fixed_point_reuse_solution=True, num_sampling_steps=3, fixed_point_iters=2)
    plan = fixed_plan(steps=3, iters=2)
    labels = sampling.image_labels(range(5), 3, 10, label_mode="random")
    assert first["arr_1"].tolist() == labels.tolist()
    local = sampling.generate(fpdm, TINY_FPDM, config, plan, list(range(5)), labels, seed=3, batch_size=5).images
    assert np.abs(local.astype(int) - first["arr_0"][..., :1].astype(int)).max() <= 1

    # Resume: existing shards are kept, only the new indices are drawn.
    stamps = {p.name: p.stat().st_mtime_ns for p in (sample_dir / "shards").iterdir()}
    result = _torchrun(["--num-fid-samples", "7", *common], tmp_path)
    assert "Generated 2 new images" in result.stdout
    assert all((sample_dir / "shards" / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items())
    second = np.load(sample_dir / "samples_7.npz")
    assert second["arr_0"].shape == (7, 8, 8, 3) and np.array_equal(second["arr_0"][:5], first["arr_0"])
    record = json.loads((sample_dir / "setup.json").read_text())
    assert [run["generated_now"] for run in record["runs"]] == [5, 2]
    assert record["runs"][-1]["stats"]["blocks_per_image_max"] == 3 * 4
    assert _shard_indices(sample_dir) == list(range(7)) and not (sample_dir / "images").exists()  # no PNGs
    assert [run["shards"]["files"] for run in record["runs"]] == [2, 4]  # one shard per rank and run
    assert record["runs"][-1]["shards"]["shard_size"] == 1000 and "rank{r}" in record["runs"][-1]["shards"]["layout"]


def test_sample_ddp_refuses_a_different_setup_in_the_same_folder(fpdm_ckpt, tmp_path):
    sample_dir = tmp_path / "fid"
    common = ["--ckpt", str(fpdm_ckpt), "--sample_dir", str(sample_dir), "--num_fid_samples", "2",
              "--num_sampling_steps", "2", "--fixed_point_iters", "1", "--cfg_scale", "1"]
    assert sample_ddp.main(common) == sample_dir / "samples_2.npz"
    with pytest.raises(ValueError, match=r"different setup.*fixed_point_iters: 1 != 2"):
        sample_ddp.main([*common, "--fixed_point_iters", "2"])


#################################################################################
#                    Interrupted, resumed with another world size               #
#################################################################################

def test_killed_two_process_run_resumes_on_one_process_exactly(fpdm, fpdm_ckpt, tmp_path):
    num = 100
    common = ["--ckpt", str(fpdm_ckpt), "--num_fid_samples", str(num), "--per_proc_batch_size", "1",
              "--shard_size", "2", "--global_seed", "5", "--num_sampling_steps", "3", "--fixed_point_iters", "2",
              "--cfg_scale", "2.0", "--device", "cpu"]
    sample_dir = tmp_path / "killed"
    shards = sample_dir / "shards"
    run = subprocess.Popen(_torchrun_command([*common, "--sample_dir", str(sample_dir)]), cwd=tmp_path, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill both ranks (SIGKILL: no clean-up) once each has written a shard or two
        deadline = time.time() + 200
        while len(list(shards.glob("rank*.npz"))) < 3 and run.poll() is None and time.time() < deadline:
            time.sleep(0.01)
    finally:
        for child in psutil.Process(run.pid).children(recursive=True):
            child.kill()
        run.kill()
        run.wait()
    assert not (sample_dir / f"samples_{num}.npz").exists()  # it was interrupted
    before = _shard_indices(sample_dir)
    assert 6 <= len(before) < num and len(set(before)) == len(before)
    (shards / ".rank0_00077.npz.x1y2.tmp").write_bytes(b"half a shard")  # as a write cut short leaves it

    npz = sample_ddp.main([*common, "--sample_dir", str(sample_dir)])  # one process now
    assert not list(shards.glob(".*.tmp")) and _shard_indices(sample_dir) == list(range(num))
    resumed = np.load(npz)
    reference = np.load(sample_ddp.main([*common, "--sample_dir", str(tmp_path / "whole")]))
    assert np.array_equal(resumed["arr_0"], reference["arr_0"]) and np.array_equal(resumed["arr_1"], reference["arr_1"])

    # ... and the packed arrays are the images sampling.generate draws (batch 1: bit for bit).
    config = SampleConfig(cfg_scale=2.0, num_sampling_steps=3, fixed_point_iters=2)
    labels = sampling.image_labels(range(num), 5, 10, label_mode="random")
    drawn = sampling.generate(fpdm, TINY_FPDM, config, fixed_plan(steps=3, iters=2), list(range(num)), labels,
                              seed=5, batch_size=1)
    assert np.array_equal(resumed["arr_0"], drawn.images.repeat(3, axis=-1))
    assert resumed["arr_1"].dtype == np.int64 and resumed["arr_1"].tolist() == labels.tolist()
    record = json.loads((sample_dir / "setup.json").read_text())
    assert [run["generated_now"] for run in record["runs"]] == [num - len(before)]  # the killed run never finished
    assert record["runs"][0]["world_size"] == 1 and record["runs"][0]["shards"]["files"] == num // 2


def test_png_flag_writes_pngs_beside_the_shards(fpdm_ckpt, tmp_path):
    from images import load_png_rgb
    sample_dir = tmp_path / "fid"
    npz = sample_ddp.main(["--ckpt", str(fpdm_ckpt), "--sample_dir", str(sample_dir), "--num_fid_samples", "3",
                           "--num_sampling_steps", "2", "--cfg_scale", "1", "--png", "True", "--shard_size", "2"])
    packed = np.load(npz)["arr_0"]
    assert sorted(p.name for p in (sample_dir / "images").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    for i in range(3):
        assert np.array_equal(load_png_rgb(sample_dir / "images" / f"{i:06d}.png"), packed[i])
    assert sorted(p.name for p in (sample_dir / "shards").iterdir()) == ["rank0_00000.npz", "rank0_00001.npz"]
    again = sample_ddp.main(["--ckpt", str(fpdm_ckpt), "--sample_dir", str(sample_dir), "--num_fid_samples", "2",
                             "--num_sampling_steps", "2", "--cfg_scale", "1"])  # all there: nothing to draw
    assert np.array_equal(np.load(again)["arr_0"], packed[:2])
    record = json.loads((sample_dir / "setup.json").read_text())
    assert [run["generated_now"] for run in record["runs"]] == [3, 0] and record["runs"][1]["png"] is False
    with pytest.raises(UserError, match="--shard_size: must be >= 1"):
        sample_ddp.main(["--ckpt", str(fpdm_ckpt), "--sample_dir", str(tmp_path / "b"), "--shard_size", "0"])


#################################################################################
#                         Work split and shard bookkeeping                      #
#################################################################################

def test_missing_indices_are_shared_across_ranks(tmp_path):
    # A 2-rank run wrote some shards and died; the rerun deals what is missing to all of its ranks.
    sample_dir = tmp_path / "fid"
    pixels = np.zeros((2, 4, 4, 1), np.uint8)
    save_shard(sample_folders.shard_path(sample_dir, 0, 0), [0, 2], pixels)
    save_shard(sample_folders.shard_path(sample_dir, 1, 0), [1, 3], pixels)
    save_shard(sample_folders.shard_path(sample_dir, 0, 1), [4, 6], pixels)
    save_shard(sample_folders.shard_path(sample_dir, 1, 3), [25, 27], pixels)  # beyond this run's 12 images: unused
    (sample_dir / "shards" / ".rank1_00001.npz.abc.tmp").write_bytes(b"cut short")
    (sample_dir / sample_folders.STOP_FILE).touch()
    scan = sample_folders.scan_shards(sample_dir, 12)
    assert len(scan.files) == 4 and scan.next_number == 4  # new shards of every rank start at 4
    missing = np.flatnonzero(~scan.covered).tolist()
    assert missing == [5, 7, 8, 9, 10, 11]
    for world_size in (1, 2, 3, 4):
        shares = [sample_folders.share_missing(missing, rank, world_size) for rank in range(world_size)]
        assert sorted(i for share in shares for i in share) == missing  # nothing lost, nothing twice
        assert max(map(len, shares)) - min(map(len, shares)) <= 1     # every rank busy
    assert sample_folders.share_missing(missing, 1, 3) == [7, 10]
    assert sample_folders.share_missing(range(7), 1, 2) == [1, 3, 5]  # a fresh run: rank r draws r, r + W, ...
    assert sample_folders.remove_unfinished(sample_dir) == 1
    assert not list((sample_dir / "shards").glob(".*")) and not (sample_dir / sample_folders.STOP_FILE).exists()

    save_shard(sample_folders.shard_path(sample_dir, 2, 0), [9, 3], pixels)  # image 3 twice
    with pytest.raises(UserError, match=r"image 3 is in both shards/rank1_00000.npz and shards/rank2_00000.npz"):
        sample_folders.scan_shards(sample_dir, 12)
    (sample_dir / "shards" / "rank2_00000.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="rank2_00000.npz.*delete that shard"):
        sample_folders.scan_shards(sample_dir, 12)


def test_shard_writer_writes_fixed_size_shards_and_stops_on_request(tmp_path):
    writer = sample_folders.ShardWriter(tmp_path, rank=1, first_number=7, shard_size=3)
    for start in (0, 2, 4):  # batches of 2 -> shards of 3, 3 and (flushed) 0
        batch = sampling.SampleBatch([10 + start, 11 + start], torch.tensor([start, start + 1]), torch.zeros(0), None)
        writer.add(batch, np.full((2, 4, 4, 1), start, np.uint8))
    assert [p.name for p in writer.written] == ["rank1_00007.npz", "rank1_00008.npz"]
    writer.flush()
    assert len(writer.written) == 2  # nothing buffered: no empty shard
    second = read_shard(writer.written[1], "x")
    assert second["indices"].tolist() == [13, 14, 15] and second["labels"].tolist() == [3, 4, 5]
    assert second["images"][:, 0, 0, 0].tolist() == [2, 4, 4]
    (tmp_path / sample_folders.STOP_FILE).touch()  # another rank failed
    with pytest.raises(sample_folders.StopRequested):
        writer.add(sampling.SampleBatch([20], None, torch.zeros(0), None), np.zeros((1, 4, 4, 1), np.uint8))
    writer.flush()  # the batch finished before the stop is kept
    assert read_shard(writer.written[-1], "x")["indices"].tolist() == [20] and "labels" not in read_shard(
        writer.written[-1], "x")


#################################################################################
#                         A failure on one rank only                            #
#################################################################################

def test_non_finite_output_on_one_rank_stops_every_rank_with_one_line(fpdm, tmp_path):
    # A huge (finite) embedding of one class makes only that class's images non-finite; pick a seed where that
    # class is image 1's (rank 1) and no image of rank 0's.
    num = 8
    seed = next(s for s in range(1000) if (lambda labels: labels[1] not in labels[0::2])(
        sampling.image_labels(range(num), s, 10, label_mode="random").tolist()))
    bad_class = int(sampling.image_labels([1], seed, 10, label_mode="random")[0])
    model = build(TINY_FPDM)
    with torch.no_grad():
        model.y_embedder.embedding_table.weight[bad_class] = 1e30
    ckpt = write_pt(model, TINY_FPDM, tmp_path / "fragile.pt")
    sample_dir = tmp_path / "fid"
    result = _torchrun(["--ckpt", str(ckpt), "--sample_dir", str(sample_dir), "--num_fid_samples", str(num),
                        "--per_proc_batch_size", "1", "--shard_size", "1", "--global_seed", str(seed),
                        "--num_sampling_steps", "2", "--cfg_scale", "1", "--device", "cpu"], tmp_path, check=False)
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: --ckpt") and "not finite" in errors[0] and "on rank 1" in errors[0]
    assert not (sample_dir / f"samples_{num}.npz").exists() and 0 in _shard_indices(sample_dir)  # rank 0's kept
    assert 1 not in _shard_indices(sample_dir)
