"""checkpoint.py: clear errors for bad checkpoint files, a full disk, latest.pt as a link, pruning old checkpoints."""
from __future__ import annotations

import errno
import os
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import checkpoint
from config import ModelConfig, UserError
from models import create_model

TINY = ModelConfig(model="DiT-Ti/2", fixed_point=True, fixed_point_no_grad_max_iters=1,
                   fixed_point_with_grad_max_iters=1)


def write_checkpoint(path: Path, config: ModelConfig, weights_config: ModelConfig | None = None) -> Path:
    """A training checkpoint whose stored config is `config` and whose weights are those of `weights_config`."""
    state = create_model(weights_config or config).state_dict()
    checkpoint.save_checkpoint({"model": state, "ema": state, "opt": {}, "step": 1, "rng": {},
                                "config": {"model": asdict(config), "train": {}}}, path)
    return path


#################################################################################
#                               Bad checkpoint files                            #
#################################################################################

def test_missing_truncated_and_foreign_files_are_user_errors_naming_the_file(tmp_path):
    good = write_checkpoint(tmp_path / "good.pt", TINY)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(2)}, foreign)  # a torch file, not one train.py wrote
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 10)
    for path in (tmp_path / "missing.pt", truncated, foreign, garbage):
        with pytest.raises(UserError, match=f"--resume: .*{path.name}"):
            checkpoint.load_checkpoint(path, flag="--resume")
    with pytest.raises(FileNotFoundError):  # a missing file is also a FileNotFoundError, as before
        checkpoint.load_checkpoint(tmp_path / "missing.pt")
    incomplete = tmp_path / "incomplete.pt"
    checkpoint.save_checkpoint({"model": {}, "step": 1}, incomplete)
    with pytest.raises(UserError, match="--resume: .*incomplete.pt.* lacks ema, opt, config, rng"):
        checkpoint.load_checkpoint(incomplete, flag="--resume", require=checkpoint.TRAINING_KEYS)


def test_wrong_shapes_name_the_file_and_the_first_mismatching_key(tmp_path):
    wrong = write_checkpoint(tmp_path / "wrong.pt", replace(TINY, in_channels=3), weights_config=TINY)
    with pytest.raises(UserError, match=r"--ckpt: .*wrong\.pt.*'x_embedder\.proj\.weight': \(128, 1, 2, 2\) in "
                                        r"the file, \(128, 3, 2, 2\) in the model"):
        checkpoint.load_model_for_sampling(wrong)
    published = tmp_path / "wrong.safetensors"
    checkpoint.save_safetensors(create_model(TINY).state_dict(), replace(TINY, fixed_point_pre_depth=2), published)
    with pytest.raises(UserError, match=r"wrong\.safetensors.*key\(s\) missing, first 'blocks_pre\.1\."):
        checkpoint.load_model_for_sampling(published)


#################################################################################
#                                  A full disk                                  #
#################################################################################

def test_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "0000002.pt"
    checkpoint.save_checkpoint({"step": 1}, path)
    real_save = torch.save

    def save_to_full_disk(obj, f, *args, **kwargs):
        with open("/dev/full", "wb") as full:  # every write fails with ENOSPC
            real_save(obj, full)

    monkeypatch.setattr(torch, "save", save_to_full_disk)
    with pytest.raises(OSError) as caught:
        checkpoint.save_checkpoint({"step": 2, "w": torch.zeros(10_000)}, path)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["0000002.pt"]  # no temporary left behind


#################################################################################
#                          latest.pt and old checkpoints                        #
#################################################################################

def test_latest_is_a_hard_link_to_the_newest_or_a_copy_where_links_fail(tmp_path, monkeypatch):
    numbered = tmp_path / "0000001.pt"
    checkpoint.save_checkpoint({"step": 1}, numbered)
    latest = tmp_path / "latest.pt"
    checkpoint.link_latest(numbered, latest)
    assert os.path.samefile(numbered, latest) and checkpoint.load_checkpoint(latest)["step"] == 1
    second = tmp_path / "0000002.pt"
    checkpoint.save_checkpoint({"step": 2}, second)

    def no_links(*args):
        raise OSError(errno.EPERM, "links not supported")

    monkeypatch.setattr(os, "link", no_links)
    checkpoint.link_latest(second, latest)
    assert not os.path.samefile(second, latest) and checkpoint.load_checkpoint(latest)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000001.pt", "0000002.pt", "latest.pt"]


def test_prune_keeps_the_newest_k_milestones_and_later_steps(tmp_path):
    for step in (10, 20, 30, 40, 50, 60):
        (tmp_path / f"{step:07d}.pt").write_bytes(b"x")
    (tmp_path / "latest.pt").write_bytes(b"x")
    removed = checkpoint.prune_checkpoints(tmp_path, step=50, keep_last=2, milestone_every=20)
    # The newest two up to step 50 (40, 50) and the milestone 20 stay; 60 (after the step the run is at, left by an
    # earlier run) is not judged.
    assert [p.name for p in removed] == ["0000010.pt", "0000030.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000020.pt", "0000040.pt", "0000050.pt", "0000060.pt",
                                                          "latest.pt"]
    assert checkpoint.prune_checkpoints(tmp_path, step=60, keep_last=0) == []


def test_remove_stale_temporaries(tmp_path):
    (tmp_path / ".latest.pt.abc123.tmp").write_bytes(b"partial")
    (tmp_path / "0000001.pt").write_bytes(b"x")
    assert [p.name for p in checkpoint.remove_stale_temporaries(tmp_path)] == [".latest.pt.abc123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["0000001.pt"]
