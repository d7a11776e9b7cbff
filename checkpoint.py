"""Checkpoints: atomic writes, safe loading (weights_only), RNG state, and safetensors weights for publishing.

A training checkpoint is a dict saved with torch.save::

    {"format": CHECKPOINT_FORMAT, "model": state_dict, "ema": state_dict, "opt": optimizer state, "step": int,
     "config": {"model": asdict(ModelConfig), "train": asdict(TrainConfig)}, "rng": {...}}

Published weights are the EMA state dict as safetensors, with the ModelConfig as JSON in the file's metadata.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from config import ModelConfig, model_config_from_dict
from models import create_model

CHECKPOINT_FORMAT = "fpdm-checkpoint-v1"
BUNDLED_CHECKPOINT = Path(__file__).resolve().parent / "pretrained" / "fpdm-digits.safetensors"


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
        write_fn(tmp)
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
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


#################################################################################
#                                   Loading                                     #
#################################################################################

def load_checkpoint(path: str | os.PathLike, flag: str = "--ckpt") -> dict[str, Any]:
    """Load a training checkpoint safely, with clear errors for missing, truncated or foreign files."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "latest.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickle with disallowed globals, not a torch file at all
        raise ValueError(f"{flag}: {str(path)!r} is not a readable checkpoint ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{flag}: {str(path)!r} is not a checkpoint written by train.py "
                         f"(expected format {CHECKPOINT_FORMAT!r})")
    return payload


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
        raise FileNotFoundError(f"{flag}: weights file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state_dict = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as error:
        raise ValueError(f"{flag}: {str(path)!r} is not a readable safetensors file ({error})") from error
    if "config" not in metadata:
        raise ValueError(f"{flag}: {str(path)!r} has no model config in its metadata")
    return state_dict, model_config_from_dict(json.loads(metadata["config"]))


def load_model_for_sampling(path: str | os.PathLike, device: str | torch.device = "cpu", use_ema: bool = True,
                            flag: str = "--ckpt") -> tuple[torch.nn.Module, ModelConfig]:
    """Rebuild the model from a training checkpoint (.pt) or published weights (.safetensors), in eval mode."""
    if str(path).endswith(".safetensors"):
        state_dict, config = load_safetensors(path, flag)
    else:
        payload = load_checkpoint(path, flag)
        config = model_config_from_dict(payload["config"]["model"])
        state_dict = payload["ema" if use_ema else "model"]
    model = create_model(config)
    model.load_state_dict(state_dict, strict=True)
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
