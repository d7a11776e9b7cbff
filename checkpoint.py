"""Checkpoints: atomic writes, safe loading (weights_only), RNG state, and safetensors weights for publishing.

A training checkpoint is a dict saved with torch.save::

    {"format": CHECKPOINT_FORMAT, "model": state_dict, "ema": state_dict, "opt": optimizer state, "step": int,
     "config": {"model": asdict(ModelConfig), "train": asdict(TrainConfig)}, "rng": {...}}

Published weights are the EMA state dict as safetensors, with the ModelConfig as JSON in the file's metadata.
A training run keeps numbered checkpoints (checkpoints/0000100.pt, ...); latest.pt is a hard link to the newest.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from config import ModelConfig, UserError, model_config_from_dict
from models import create_model

CHECKPOINT_FORMAT = "fpdm-checkpoint-v1"
BUNDLED_CHECKPOINT = Path(__file__).resolve().parent / "pretrained" / "fpdm-digits.safetensors"
TRAINING_KEYS = ("model", "ema", "opt", "step", "config", "rng")  # what --resume needs in a checkpoint
NUMBERED_CHECKPOINT = re.compile(r"^(\d{7})\.pt$")                 # checkpoints/0000100.pt: the step
TMP_PATTERN = ".*.tmp"                                             # atomic_write's temporary files


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """A --ckpt / --resume path that does not exist: a user mistake (UserError) and a missing file."""


#################################################################################
#                               Writing atomically                              #
#################################################################################

def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], Any]) -> None:
    """Call write_fn(tmp_path), then rename onto `path`: a crash never leaves a half-written file at `path`.

    The one way this project writes files that others read (checkpoints, chunks, PNGs, statistics, manifests).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            write_fn(tmp)
        except OSError as error:
            if error.filename is None and error.strerror:  # e.g. ENOSPC from a file handle: name the file
                raise OSError(error.errno, error.strerror, str(path)) from error
            raise
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates files readable by their owner only
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Atomically save a training checkpoint dict."""
    payload = {"format": CHECKPOINT_FORMAT, **payload}

    def write(tmp: str) -> None:
        # Through a Python file object, a full disk raises OSError(ENOSPC) (torch.save(path) raises RuntimeError).
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
    atomic_write(path, write)


def link_latest(numbered: Path, latest: Path) -> None:
    """Point `latest` at `numbered` atomically: a hard link renamed into place (a copy where links fail)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{latest.name}.", suffix=".tmp", dir=latest.parent)
    os.close(fd)
    os.remove(tmp)  # os.link needs a free name; mkstemp only reserved a unique one
    try:
        os.link(numbered, tmp)
        os.replace(tmp, latest)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        atomic_write(latest, lambda path: shutil.copyfile(numbered, path))


def numbered_checkpoints(ckpt_dir: Path) -> dict[int, Path]:
    """{step: path} of the numbered checkpoints in a run's checkpoints/ folder."""
    found = {}
    for path in ckpt_dir.glob("*.pt"):
        match = NUMBERED_CHECKPOINT.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def prune_checkpoints(ckpt_dir: Path, step: int, keep_last: int, milestone_every: int = 0) -> list[Path]:
    """Keep the `keep_last` newest numbered checkpoints up to `step` (0: keep all) and every milestone (a step
    divisible by milestone_every > 0); delete the rest and return them.

    Checkpoints after `step` (left by a run resumed from an earlier one) are not this save's to judge and stay.
    """
    if keep_last == 0:
        return []
    older = sorted((s, path) for s, path in numbered_checkpoints(ckpt_dir).items() if s <= step)[:-keep_last]
    stale = [path for s, path in older if not (milestone_every and s % milestone_every == 0)]
    for path in stale:
        path.unlink()
    return stale


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete atomic_write temporaries left by a killed process (`.NAME.XXXX.tmp`); returns those deleted."""
    stale = sorted(folder.glob(TMP_PATTERN))
    for path in stale:
        path.unlink()
    return stale


#################################################################################
#                                   Loading                                     #
#################################################################################

def load_checkpoint(path: str | os.PathLike, flag: str = "--ckpt", require: Sequence[str] = ()) -> dict[str, Any]:
    """Load a training checkpoint safely, with clear errors for missing, truncated or foreign files and for a
    payload lacking any of the `require`d entries (e.g. TRAINING_KEYS to resume)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "latest.pt"
    if not path.is_file():
        raise CheckpointNotFoundError(f"{flag}: checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickle with disallowed globals, not a torch file at all
        raise UserError(f"{flag}: {str(path)!r} is not a readable checkpoint ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''})") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{flag}: {str(path)!r} is not a checkpoint written by train.py "
                        f"(expected format {CHECKPOINT_FORMAT!r})")
    missing = [key for key in require if key not in payload]
    if missing:
        raise UserError(f"{flag}: {str(path)!r} lacks {', '.join(missing)}; not a complete train.py checkpoint")
    return payload


def load_state_dict_checked(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                            flag: str) -> None:
    """load_state_dict(strict=True), with a mismatch summarised in one line naming the file and the first key."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    problems = []
    if wrong_shape:
        key = wrong_shape[0]
        problems.append(f"{len(wrong_shape)} tensor(s) of the wrong shape, first {key!r}: "
                        f"{tuple(state_dict[key].shape)} in the file, {tuple(expected[key].shape)} in the model")
    if missing:
        problems.append(f"{len(missing)} key(s) missing, first {missing[0]!r}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]!r}")
    if problems:
        raise UserError(f"{flag}: {source!r} does not match the model its config describes: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def save_safetensors(state_dict: dict[str, torch.Tensor], config: ModelConfig, path: str | os.PathLike) -> None:
    """Publish weights as safetensors with the ModelConfig in the metadata."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    metadata = {"format": CHECKPOINT_FORMAT, "config": json.dumps(asdict(config))}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_safetensors(path: str | os.PathLike, flag: str = "--ckpt") -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Read published weights and their ModelConfig."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{flag}: weights file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state_dict = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as error:
        raise UserError(f"{flag}: {str(path)!r} is not a readable safetensors file ({error})") from error
    if "config" not in metadata:
        raise UserError(f"{flag}: {str(path)!r} has no model config in its metadata")
    return state_dict, model_config_from_dict(json.loads(metadata["config"]))


def load_model_for_sampling(path: str | os.PathLike, device: str | torch.device = "cpu", use_ema: bool = True,
                            flag: str = "--ckpt") -> tuple[torch.nn.Module, ModelConfig]:
    """Rebuild the model from a training checkpoint (.pt) or published weights (.safetensors), in eval mode."""
    if str(path).endswith(".safetensors"):
        state_dict, config = load_safetensors(path, flag)
    else:
        payload = load_checkpoint(path, flag, require=("config", "ema" if use_ema else "model"))
        config = model_config_from_dict(payload["config"]["model"])
        state_dict = payload["ema" if use_ema else "model"]
    model = create_model(config)
    load_state_dict_checked(model, state_dict, str(path), flag)
    return model.to(device).eval(), config


#################################################################################
#                                  RNG state                                    #
#################################################################################

def capture_rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Torch (CPU and CUDA), numpy and named generators' states, as tensors (loadable with weights_only)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "numpy": _numpy_state_to_tensors(np.random.get_state()),
                             "generators": {name: g.get_state() for name, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Inverse of capture_rng_state."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_tensors(state: tuple) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = state
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_state_from_tensors(state: dict[str, Any]) -> tuple:
    return (state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
            state["cached_gaussian"])
