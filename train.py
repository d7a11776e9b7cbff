"""Train DiT or FPDM: `accelerate launch train.py [flags]` (or `python train.py` for one process).

`--config configs/digits.yaml` trains the small class-conditional FPDM of the README on scikit-learn's bundled
handwritten digits on CPU; with no flags at all it trains the DiT-Ti/2 baseline there with the dataclass defaults
(config.py). Flags given override the preset. The paper's ImageNet recipes are configs/imagenet256_*.yaml (after
extract_features.py).
"""
from __future__ import annotations

import importlib.util
import math
import os
import resource
import shutil
import sys
import time
from copy import deepcopy
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm import tqdm

from checkpoint import (atomic_write, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint,
                        save_safetensors)
import cli
from config import (ModelConfig, TrainConfig, UserError, build_config, config_diff, given_fields, load_preset,
                    model_config_from_dict, parse_flags)
from data import create_dataset
from models import create_model
from records import append_jsonl, write_json
from vae import encode_images, load_vae

# TrainConfig fields that may change when resuming: they set how long and how loudly a run goes, not what it learns.
RESUMABLE_CHANGES = {"max_steps", "epochs", "ckpt_every", "log_every", "log_with", "resume", "num_workers",
                     "sample_grid", "compile", "output_dir", "output_subdir", "config"}


#################################################################################
#                                  Helpers                                      #
#################################################################################

class NonFiniteLossError(RuntimeError):
    """Raised when the training loss stops being finite; the last good checkpoint is kept."""


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers are copied)."""
    ema_params = dict(ema_model.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.detach().float(), alpha=1 - decay)


def ema_decay_at(step: int, config: TrainConfig) -> float:
    """EMA decay for this step; with warm-up, short runs still average recent weights rather than the init."""
    if not config.ema_warmup:
        return config.ema_decay
    return min(config.ema_decay, (1 + step) / (10 + step))


def epoch_batches(num_items: int, batch_size: int, epoch: int, seed: int, rank: int, world_size: int
                  ) -> list[list[int]]:
    """This rank's batches of indices for one epoch: a seeded permutation, split across ranks, last partial dropped."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_items, generator=generator)[rank::world_size].tolist()
    return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile every transformer block in place (state-dict keys unchanged).

    S-JFB draws new iteration counts (n, m) every step, so compiling the whole forward would trace and recompile
    for each pair; a block's graph is the same on every call, so the fixed-point loop reuses one compiled graph.
    """
    for block in model.all_blocks():
        block.compile()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def weights_checksum(model: torch.nn.Module) -> float:
    """A float64 checksum of all parameters, to compare replicas across processes."""
    return float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(model.parameters())))


def resolve_run_dir(config: TrainConfig, model_config: ModelConfig, resume_dir: Path | None) -> Path:
    """The run folder: the resumed run's, --output_subdir, or a fresh numbered one."""
    if config.output_subdir:
        return Path(config.output_dir) / config.output_subdir
    if resume_dir is not None:
        return resume_dir
    root = Path(config.output_dir)
    index = len(list(root.glob("*"))) if root.exists() else 0
    kind = "FPDM" if model_config.fixed_point else "DiT"
    return root / f"{index:03d}-{kind}-{model_config.model.replace('/', '-')}"


#################################################################################
#                           Configuration and resume                            #
#################################################################################

def parse_configs(argv: Sequence[str] | None
                  ) -> tuple[ModelConfig, TrainConfig, dict[str, Any] | None, set[str]]:
    """Parse flags over the --config preset; with --resume, fields not given come from the checkpoint and given
    ones must agree with it.

    Returns the validated configs, the resumed checkpoint (or None) and the names of the ModelConfig fields given
    (by flag or preset).
    """
    flags = parse_flags(__doc__.splitlines()[0], [TrainConfig, ModelConfig], argv)
    given = {**(load_preset(flags["config"], ModelConfig, TrainConfig) if flags.get("config") else {}), **flags}
    given_model, given_train = given_fields(ModelConfig, given), given_fields(TrainConfig, given)
    if not given_train.get("resume"):
        return (build_config(ModelConfig, given).validate(), build_config(TrainConfig, given).validate(), None,
                set(given_model))
    payload = load_checkpoint(given_train["resume"], flag="--resume")
    saved_model = asdict(model_config_from_dict(payload["config"]["model"]))
    saved_train = payload["config"]["train"]
    if saved_train.get("max_steps") == 0:  # checkpoints of earlier versions wrote 0 for 'no cap'
        saved_train = {**saved_train, "max_steps": None}
    differences = config_diff({k: saved_model[k] for k in given_model}, given_model)
    differences += config_diff({k: saved_train.get(k) for k in given_train if k not in RESUMABLE_CHANGES},
                               {k: v for k, v in given_train.items() if k not in RESUMABLE_CHANGES})
    if differences:
        raise UserError("--resume: the checkpoint was trained with a different configuration "
                         "(checkpoint != flags):\n  " + "\n  ".join(differences))
    model_config = ModelConfig(**saved_model).validate()
    train_config = TrainConfig(**{**{f.name: saved_train.get(f.name, f.default) for f in fields(TrainConfig)},
                                  **given_train}).validate()
    return model_config, train_config, payload, set(given_model)


def validate(config: TrainConfig, world_size: int) -> None:
    """Refuse bad settings before any work is done: the flags themselves, then against the process count."""
    config.validate()
    if config.global_batch_size % world_size:
        raise UserError(f"--global_batch_size: must be a multiple of the number of processes {world_size} "
                        f"(got {config.global_batch_size})")


#################################################################################
#                                 Training                                      #
#################################################################################

def compute_loss(diffusion, model, x: torch.Tensor, y: torch.Tensor, model_config: ModelConfig,
                 iters_generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One training loss: random timesteps; an FPDM in train mode draws its S-JFB counts from iters_generator."""
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
    model_kwargs: dict[str, Any] = {"y": y}
    if model_config.fixed_point:
        model_kwargs["sjfb_generator"] = iters_generator  # Algorithm 1: (n, m) drawn inside the forward pass
    terms = diffusion.training_losses(model, x, t, model_kwargs)
    return {name: value.mean() for name, value in terms.items()}


def use_cpu_processes_without_cuda() -> None:
    """Let a torchrun-style launch (several processes, no CUDA) run as multi-CPU gloo instead of N lone processes."""
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def train(model_config: ModelConfig, config: TrainConfig, resume_payload: dict[str, Any] | None = None,
          explicit_model_fields: set[str] | None = None) -> Path:
    """Run training and return the run folder (checkpoints/, metrics.jsonl, log.txt, ema.safetensors)."""
    use_cpu_processes_without_cuda()
    validate(config, int(os.environ.get("WORLD_SIZE", "1")))
    accelerator = Accelerator(log_with=None if config.log_with == "none" else config.log_with)
    rank, world_size, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    dataset, model_config = create_dataset(config, model_config, rank, world_size, explicit=explicit_model_fields)
    local_batch = config.global_batch_size // world_size
    if len(dataset) // (1 if getattr(dataset, "is_sharded", False) else world_size) < local_batch:
        raise UserError(f"--global_batch_size {config.global_batch_size} is larger than the dataset "
                         f"({len(dataset)} items)")

    seed = config.global_seed * world_size + rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    iters_generator = torch.Generator().manual_seed(seed)  # S-JFB draws; never Python's global `random`

    model = create_model(model_config, grad_checkpointing=config.grad_checkpointing)
    ema = deepcopy(model).float().requires_grad_(False)  # EMA starts as a copy of the initial weights
    diffusion = model_config.create_diffusion("")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    vae = load_vae(config.vae, device) if (config.dataset == "imagefolder" and model_config.latent) else None

    start_step = 0
    if resume_payload is not None:
        model.load_state_dict(resume_payload["model"])
        ema.load_state_dict(resume_payload["ema"])  # the saved EMA, never re-synced to the model
        optimizer.load_state_dict(resume_payload["opt"])
        start_step = int(resume_payload["step"])
        restore_rng_state(resume_payload["rng"][rank] if isinstance(resume_payload["rng"], list)
                          else resume_payload["rng"], {"sjfb": iters_generator})
    ema.to(device)
    if config.compile:
        compile_blocks(model)
    model, optimizer = accelerator.prepare(model, optimizer)

    resume_dir = None
    if config.resume:
        resume_path = Path(config.resume)
        resume_dir = resume_path if resume_path.is_dir() else resume_path.parent.parent
    run_dir = resolve_run_dir(config, model_config, resume_dir)
    ckpt_dir = run_dir / "checkpoints"
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", {"model": asdict(model_config), "train": asdict(config)})
    logger = RunLogger(run_dir, accelerator, config, model_config)
    steps_per_epoch = len(epoch_batches(len(dataset), local_batch, 0, config.global_seed, 0,
                                        1 if getattr(dataset, "is_sharded", False) else world_size))
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    num_params = sum(p.numel() for p in model.parameters())
    logger.info(f"{'FPDM' if model_config.fixed_point else 'DiT'} {model_config.model}: {num_params:,} parameters; "
                f"{world_size} process(es), batch {config.global_batch_size}, steps {start_step}->{total_steps}, "
                f"run folder {run_dir}")

    def save(step: int) -> None:
        state = {"model": accelerator.unwrap_model(model).state_dict(), "ema": ema.state_dict(),
                 "opt": optimizer.state_dict(), "step": step,
                 "config": {"model": asdict(model_config), "train": asdict(config)}}
        rng_state = capture_rng_state({"sjfb": iters_generator})
        rng_states = gather_object([rng_state]) if world_size > 1 else rng_state  # one state per rank
        if accelerator.is_main_process:
            numbered = ckpt_dir / f"{step:07d}.pt"
            save_checkpoint({**state, "rng": rng_states}, numbered)
            atomic_write(ckpt_dir / "latest.pt", lambda tmp: shutil.copyfile(numbered, tmp))
            logger.info(f"saved checkpoint {numbered}")
        accelerator.wait_for_everyone()

    model.train()
    progress = tqdm(total=total_steps, initial=start_step, disable=not accelerator.is_main_process,
                    desc="train", dynamic_ncols=True)
    step, window_start, window = start_step, time.time(), []
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        batches = epoch_batches(len(dataset), local_batch, epoch, config.global_seed,
                                0 if getattr(dataset, "is_sharded", False) else rank,
                                1 if getattr(dataset, "is_sharded", False) else world_size)
        for indices in batches[offset:]:
            x, y = collate(dataset, indices, device)
            if vae is not None:
                x = encode_images(vae, x)
            terms = compute_loss(diffusion, model, x, y, model_config, iters_generator)
            loss_is_finite = accelerator.reduce(torch.isfinite(terms["loss"]).float().to(device), "min")
            if loss_is_finite.item() < 1:
                logger.info(f"non-finite loss at step {step + 1}; stopping (last good checkpoint kept)")
                raise NonFiniteLossError(f"training loss became non-finite at step {step + 1}; the last good "
                                         f"checkpoint in {ckpt_dir} is kept")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(terms["loss"])
            optimizer.step()
            update_ema(ema, accelerator.unwrap_model(model), ema_decay_at(step, config))
            step += 1
            window.append({k: v.detach() for k, v in terms.items()})
            progress.update(1)
            if step % config.log_every == 0 or step == total_steps:
                steps_per_sec = len(window) / (time.time() - window_start)
                means = {k: accelerator.reduce(torch.stack([w[k] for w in window]).mean(), "mean").item()
                         for k in window[0]}
                logger.metrics(step, {**means, "steps_per_sec": steps_per_sec,
                                      "peak_memory_mb": peak_memory_mb(device)})
                progress.set_postfix(loss=f"{means['loss']:.4f}", steps_per_sec=f"{steps_per_sec:.2f}")
                window, window_start = [], time.time()
            if step % config.ckpt_every == 0 or step == total_steps:
                save(step)
            if step >= total_steps:
                break
    progress.close()

    checksums = gather_object([weights_checksum(accelerator.unwrap_model(model))])
    if accelerator.is_main_process:
        save_safetensors(ema.state_dict(), model_config, run_dir / "ema.safetensors")
        write_json(run_dir / "summary.json",
                   {"step": step, "num_params": num_params, "rank_weight_checksums": checksums})
        if config.sample_grid:
            write_sample_grid(ema, model_config, run_dir / "samples.png", device, vae, dataset, logger)
    logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def collate(dataset, indices: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack dataset items into a batch on `device`."""
    items = [dataset[i] for i in indices]
    x = torch.stack([torch.as_tensor(item[0]) for item in items]).float().to(device)
    y = torch.as_tensor([int(item[1]) for item in items], dtype=torch.long, device=device)
    return x, y


def write_sample_grid(ema: torch.nn.Module, model_config: ModelConfig, path: Path, device: torch.device,
                      vae: Any, dataset: Any, logger: "RunLogger") -> None:
    """Draw a small grid from the EMA model at the end of training (DDIM, 50 steps, no guidance).

    Latent models are decoded with the training VAE, or the one named in the latents' manifest; when that cannot
    be loaded (a hub name without network) the grid previews the latents and the log says so.
    """
    from sampling import sample_grid_png
    if model_config.latent and vae is None and hasattr(dataset, "manifest"):
        try:
            vae = load_vae(dataset.manifest["vae"], device)
        except (OSError, ValueError) as error:
            logger.info(f"samples.png shows raw latents: the VAE could not be loaded ({error})")
    sample_grid_png(ema.eval(), model_config, path, device=device, vae=vae)


#################################################################################
#                                   Logging                                     #
#################################################################################

class RunLogger:
    """Main-process-only logging: log.txt, metrics.jsonl and accelerate trackers (wandb offline without network)."""

    def __init__(self, run_dir: Path, accelerator: Accelerator, config: TrainConfig, model_config: ModelConfig):
        self.accelerator, self.active = accelerator, accelerator.is_main_process
        self.log_file = open(run_dir / "log.txt", "a") if self.active else None
        self.metrics_path = run_dir / "metrics.jsonl"
        self.tracking = False
        if config.log_with == "tensorboard" and importlib.util.find_spec("tensorboard") is None \
                and importlib.util.find_spec("tensorboardX") is None:
            self.info("warning: --log_with tensorboard needs `pip install tensorboard`; logging to files only")
        elif config.log_with != "none":
            if config.log_with == "wandb":
                os.environ.setdefault("WANDB_MODE", "offline")  # no network here: log locally, sync later
                os.environ.setdefault("WANDB_DIR", str(run_dir))
            try:
                accelerator.init_trackers(run_dir.name, config={**asdict(model_config), **asdict(config)},
                                          init_kwargs={"tensorboard": {}} if config.log_with == "tensorboard" else {})
                self.tracking = True
            except Exception as error:  # a missing package or no network must not kill a training run
                self.info(f"warning: --log_with {config.log_with} unavailable ({error}); logging to files only")

    def info(self, message: str) -> None:
        """Print and append a line to log.txt (main process only)."""
        if self.active:
            line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
            tqdm.write(line, file=sys.stderr)
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Append to metrics.jsonl and the tracker (values are already reduced across processes)."""
        if self.tracking:
            self.accelerator.log(values, step=step)
        if self.active:
            append_jsonl(self.metrics_path, {"step": step, **values})
            self.info(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
            if not all(math.isfinite(v) for v in values.values()):
                self.info("warning: non-finite metric")

    def close(self) -> None:
        """Close the log file."""
        if self.log_file is not None:
            self.log_file.close()


def main(argv: Sequence[str] | None = None) -> Path:
    """Command-line entry point."""
    model_config, train_config, payload, given_model = parse_configs(argv)
    return train(model_config, train_config, payload, given_model)


if __name__ == "__main__":
    cli.run(main)
