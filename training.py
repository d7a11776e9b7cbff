"""The training loop of train.py, with setup kept apart from the loop (in the manner of NVlabs/edm's training_loop).

    run_dir = training_loop(model_config, train_config, resume_payload=None, explicit_model_fields=None)

Setup (processes, data, model/EMA/optimizer, resume, run folder) finishes before the first step, so a mistake ends
the run before anything is written. The run folder holds config.json, log.txt, metrics.jsonl (one row per logged
step), checkpoints/ (the newest --keep_last_ckpts numbered files, milestones, and latest.pt: a hard link to the
newest), and at the end ema.safetensors, summary.json and samples.png.

Randomness: timesteps, noise and label dropout come from torch's default RNG, seeded per process
(global_seed * world_size + rank), so each replica sees different draws. The S-JFB iteration counts (n, m) come
from one generator seeded with global_seed alone, advanced once per step on every process: all replicas run the same
number of fixed-point iterations in a step (Algorithm 1 draws one (n, m) per step), and a resumed run continues the
same sequence because the generator's state is saved in every checkpoint.

Speed: the step never waits for the device. Batches come from a DataLoader (--num_workers) over the same index
batches, pinned and copied asynchronously on CUDA; the loss is checked for finiteness on the device and the flag is
read only when logging and before each checkpoint (a non-finite checkpoint is never written; the run stops at the
next such point and names the first bad step); the solver computes no residuals; the EMA is two foreach kernels.
On CUDA, fp32 matmuls use TF32 (--tf32), AdamW is fused, and --mixed_precision picks autocast for any launcher.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import resource
import sys
import time
from copy import deepcopy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Collection, Iterator, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, gather_object
from torch.utils.data import DataLoader
from tqdm import tqdm

import cli
from cost import training_macs_per_image
from checkpoint import (atomic_write, capture_rng_state, link_latest, load_state_dict_checked, prune_checkpoints,
                        remove_stale_temporaries, restore_rng_state, save_checkpoint, save_safetensors)
from config import ModelConfig, TrainConfig, UserError
from data import create_dataset
from models import create_model, draw_training_iters
from records import append_jsonl, write_json
from vae import encode_images, load_vae

RANK0_PRINT_GRACE_S = 2.0  # other ranks wait this long on a user error so rank 0's one line is printed first


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss stops being finite; the last good checkpoint is kept."""


#################################################################################
#                                 Entry point                                   #
#################################################################################

def training_loop(model_config: ModelConfig, train_config: TrainConfig,
                  resume_payload: Optional[dict[str, Any]] = None,
                  explicit_model_fields: Optional[Collection[str]] = None) -> Path:
    """Train and return the run folder. `resume_payload` is a loaded checkpoint to continue (its config already
    merged into the configs by train.py); `explicit_model_fields` names the ModelConfig fields the user gave, which
    must agree with what the data implies."""
    with user_errors_reported_by_rank_0():
        accelerator = setup_processes(train_config)
        data, implied = setup_data(train_config, model_config, accelerator, explicit_model_fields)
        model_config = replace(model_config, **implied)  # the data decides channels, size, classes, pixel/latent
        seed_processes(train_config, accelerator.process_index, accelerator.num_processes)
        state = setup_state(model_config, train_config, accelerator, resume_payload)
        vae = setup_vae(train_config, model_config, accelerator.device)
        run_dir = claim_run_dir(train_config, model_config, accelerator, state.step)
        logger = RunLogger(run_dir, accelerator, train_config, model_config)
        try:
            train(state, data, model_config, train_config, accelerator, vae, run_dir, logger)
            finish(state, data, model_config, train_config, accelerator, vae, run_dir, logger)
        finally:
            logger.close()
        return run_dir


@contextlib.contextmanager
def user_errors_reported_by_rank_0() -> Iterator[None]:
    """On a user error, ranks other than 0 pause before exiting: the launcher stops every process as soon as one
    exits, which could otherwise cut rank 0 off before it prints the one error line (cli.run)."""
    try:
        yield
    except Exception as error:
        if cli.is_user_error(error) and cli.process_rank() != 0:
            time.sleep(RANK0_PRINT_GRACE_S)
        raise


#################################################################################
#                                    Setup                                      #
#################################################################################

@dataclass
class TrainingData:
    """This process's view of the data: which slice of each epoch's permutation it draws its batches from."""
    dataset: Any
    batch_rank: int        # this process's slice of each epoch's index permutation
    batch_world_size: int  # number of slices (1 for a dataset already sharded per process)
    local_batch: int

    def epoch(self, epoch: int, seed: int) -> list[list[int]]:
        """This process's batches of indices for one epoch (steps_per_epoch of them on every process)."""
        return epoch_batches(len(self.dataset), self.local_batch, epoch, seed, self.batch_rank,
                             self.batch_world_size)[:self.steps_per_epoch]

    @property
    def steps_per_epoch(self) -> int:
        """Full batches in an epoch on the process with the fewest items, so that all processes step together."""
        return (len(self.dataset) // self.batch_world_size) // self.local_batch


@dataclass
class TrainState:
    """Everything a step changes and a checkpoint saves."""
    model: torch.nn.Module          # prepared by accelerate (DDP-wrapped with several processes)
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    diffusion: Any
    sjfb_generator: torch.Generator  # seeded with global_seed on every process: the same (n, m) everywhere
    step: int = 0
    num_params: int = 0


def use_cpu_processes_without_cuda() -> None:
    """Let a torchrun-style launch (several processes, no CUDA) run as multi-CPU gloo instead of N lone processes."""
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def check_process_count(config: TrainConfig, world_size: int) -> None:
    """Refuse bad settings before any work is done: the flags themselves, then against the process count."""
    config.validate()
    if config.global_batch_size % world_size:
        raise UserError(f"--global_batch_size: must be a multiple of the number of processes {world_size} "
                        f"(got {config.global_batch_size})")


def setup_processes(config: TrainConfig) -> Accelerator:
    """Check the flags against the process count, join the process group and set the arithmetic (TF32, autocast)."""
    use_cpu_processes_without_cuda()
    check_process_count(config, int(os.environ.get("WORLD_SIZE", "1")))
    # accelerate keeps the first Accelerator's mixed precision for the whole process (a later one asking for another
    # is refused, one asking for none silently inherits it): each run in a process chooses its own. The process
    # group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              log_with=None if config.log_with == "none" else config.log_with)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        # accelerate would silently run fp32: fp16 autocast with loss scaling is a CUDA feature.
        raise UserError(f"--mixed_precision: fp16 needs a CUDA device (this run is on {accelerator.device}); use "
                        f"bf16 or no")
    set_tf32(config.tf32, accelerator.device)
    return accelerator


def set_tf32(allow: bool, device: torch.device) -> None:
    """Let CUDA fp32 matmuls and convolutions use TF32 (set once, for the whole run); nothing off CUDA."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow


def setup_data(config: TrainConfig, model_config: ModelConfig, accelerator: Accelerator,
               explicit_model_fields: Optional[Collection[str]]) -> tuple[TrainingData, dict[str, Any]]:
    """The dataset, how batches are split across processes, and the ModelConfig fields the data implies."""
    rank, world_size = accelerator.process_index, accelerator.num_processes
    dataset, implied = create_dataset(config, model_config, rank, world_size, explicit=explicit_model_fields)
    # A sharded dataset holds only this process's part: it draws from all of it. Otherwise ranks split indices.
    batch_rank, batch_world_size = (0, 1) if dataset.is_sharded else (rank, world_size)
    data = TrainingData(dataset, batch_rank, batch_world_size, config.global_batch_size // world_size)
    if data.steps_per_epoch < 1:
        raise UserError(f"--global_batch_size {config.global_batch_size} is larger than the dataset "
                        f"({len(dataset)} items)")
    return data, implied


def setup_vae(config: TrainConfig, model_config: ModelConfig, device: torch.device) -> Any:
    """The VAE that encodes image-folder batches for a latent model (None otherwise: the data is already encoded)."""
    if config.dataset == "imagefolder" and model_config.latent:
        return load_vae(config.vae, device)
    return None


def seed_processes(config: TrainConfig, rank: int, world_size: int) -> None:
    """Per-process seeds for timesteps, noise and label dropout (each replica sees different draws)."""
    seed = config.global_seed * world_size + rank
    torch.manual_seed(seed)
    np.random.seed(seed)


def setup_state(model_config: ModelConfig, config: TrainConfig, accelerator: Accelerator,
                resume_payload: Optional[dict[str, Any]]) -> TrainState:
    """Model, EMA (a copy of the initial weights), AdamW and the S-JFB generator; restored from a checkpoint if
    given."""
    # On the device before the optimizer is built: fused AdamW needs to see where the parameters live.
    model = create_model(model_config, grad_checkpointing=config.grad_checkpointing).to(accelerator.device)
    state = TrainState(model=model, ema=deepcopy(model).float().requires_grad_(False),
                       optimizer=create_optimizer(model, config),
                       diffusion=model_config.create_diffusion(""),
                       sjfb_generator=torch.Generator().manual_seed(config.global_seed),
                       num_params=sum(p.numel() for p in model.parameters()))
    if resume_payload is not None:
        restore_state(state, resume_payload, accelerator.process_index, config.resume)
    state.ema.to(accelerator.device)
    if config.compile:
        state.model.compile_parts()  # explicit blocks and the whole fixed-point map; state-dict keys unchanged
    state.model, state.optimizer = accelerator.prepare(state.model, state.optimizer)
    return state


def create_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW (no weight decay by default, paper Sec. 4.1); fused into one kernel when every parameter is on CUDA."""
    params = list(model.parameters())
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                             fused=True if use_fused_adamw(params) else None)


def use_fused_adamw(params: list[torch.Tensor]) -> bool:
    """Fused AdamW when all parameters are on CUDA; elsewhere the default (the CPU stays bit-exact with earlier
    runs)."""
    return bool(params) and all(p.device.type == "cuda" for p in params)


def restore_state(state: TrainState, payload: dict[str, Any], rank: int, source: str) -> None:
    """Load weights, the saved EMA (never re-synced to the model), optimizer, step and this rank's RNG states."""
    load_state_dict_checked(state.model, payload["model"], source, "--resume")
    load_state_dict_checked(state.ema, payload["ema"], source, "--resume")
    try:
        state.optimizer.load_state_dict(payload["opt"])
    except (ValueError, KeyError) as error:
        raise UserError(f"--resume: {source!r}: the optimizer state does not fit the model ({error})") from error
    state.step = int(payload["step"])
    rng = payload["rng"]
    if isinstance(rng, list):  # one state per process; a run resumed on more processes reuses rank 0's
        rng = rng[rank] if rank < len(rng) else rng[0]
    restore_rng_state(rng, {"sjfb": state.sjfb_generator})


#################################################################################
#                                  Run folder                                   #
#################################################################################

def resumed_run_dir(resume: str) -> Optional[Path]:
    """The run folder a --resume path belongs to (a run folder itself, or RUN/checkpoints/FILE.pt)."""
    if not resume:
        return None
    path = Path(resume)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else None


def resolve_run_dir(config: TrainConfig, model_config: ModelConfig, resume_dir: Optional[Path]) -> Path:
    """The run folder: --output_subdir, the resumed run's, or a fresh numbered one."""
    if config.output_subdir:
        return Path(config.output_dir) / config.output_subdir
    if resume_dir is not None:
        return resume_dir
    root = Path(config.output_dir)
    kind = "FPDM" if model_config.fixed_point else "DiT"
    index = len(list(root.glob("*"))) if root.is_dir() else 0
    while True:  # a deleted earlier run must not make the count land on an existing folder
        run_dir = root / f"{index:03d}-{kind}-{model_config.model.replace('/', '-')}"
        if not run_dir.exists():
            return run_dir
        index += 1


def claim_run_dir(config: TrainConfig, model_config: ModelConfig, accelerator: Accelerator, step: int) -> Path:
    """The run folder, chosen and prepared by the main process and shared, so every rank uses (or refuses) the same."""
    outcome: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            run_dir = resolve_run_dir(config, model_config, resumed_run_dir(config.resume))
            prepare_run_dir(run_dir, config, model_config, step)
            outcome = [("ok", str(run_dir))]
        except UserError as error:
            outcome = [("error", str(error))]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    kind, value = outcome[0]
    if kind == "error":
        raise UserError(value)
    return Path(value)


def prepare_run_dir(run_dir: Path, config: TrainConfig, model_config: ModelConfig, step: int) -> None:
    """Refuse to write into another run's folder; on --resume forget what came after the resumed step."""
    resume_dir = resumed_run_dir(config.resume)
    is_resumed_run = resume_dir is not None and run_dir.exists() and run_dir.resolve() == resume_dir.resolve()
    if run_dir.is_dir() and any(run_dir.iterdir()) and not is_resumed_run:
        raise UserError(f"--output_subdir: the run folder {str(run_dir)!r} already holds a run; pass --resume "
                        f"{run_dir} to continue it, or choose another --output_subdir")
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--output_dir: cannot create the run folder {str(run_dir)!r} "
                        f"({error.strerror or error})") from error
    if config.resume:
        drop_metrics_after(run_dir / "metrics.jsonl", step)
        remove_stale_temporaries(run_dir / "checkpoints")
    write_json(run_dir / "config.json", {"model": asdict(model_config), "train": asdict(config)})


def drop_metrics_after(path: Path, step: int) -> None:
    """Keep the metrics rows up to `step`: rows logged after the checkpoint a run resumes from are rewritten by it."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short when the run was killed
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept)))


#################################################################################
#                                  The loop                                     #
#################################################################################

@dataclass
class LogWindow:
    """What happened since the last logged step."""
    terms: list[dict[str, torch.Tensor]] = field(default_factory=list)
    sjfb_iters: list[tuple[int, int]] = field(default_factory=list)  # (n, m) of each step (FPDM only)
    start: float = field(default_factory=time.time)


class FiniteLossWatch:
    """The first step whose loss was not finite, kept on the device: updating it never waits for the device, and it
    is read (one reduce, one sync) only by check(), when logging and before each checkpoint is written."""

    LATEST = 2**62  # larger than any step

    def __init__(self, device: torch.device):
        self.first_bad_step = torch.zeros((), dtype=torch.long, device=device)  # 0: every loss so far was finite

    def update(self, loss: torch.Tensor, step: int) -> None:
        """Note `step` (1-based) if its loss is not finite and no earlier step was."""
        first = ~torch.isfinite(loss.detach()) & (self.first_bad_step == 0)
        self.first_bad_step = torch.where(first, step, self.first_bad_step)

    def check(self, accelerator: Accelerator, logger: "RunLogger", run_dir: Path, step: int) -> None:
        """Raise NonFiniteLossError on every process when any process saw a non-finite loss."""
        # The earliest bad step over processes with a max-reduce: 0 where all was finite, LATEST - step otherwise.
        key = torch.where(self.first_bad_step > 0, self.LATEST - self.first_bad_step, 0)
        worst = int(accelerator.reduce(key, "max").item())
        if worst == 0:
            return
        first = self.LATEST - worst
        logger.info(f"non-finite loss at step {first}; stopping at step {step} (last good checkpoint kept)")
        raise NonFiniteLossError(f"training loss became non-finite at step {first}; the last good checkpoint in "
                                 f"{run_dir / 'checkpoints'} is kept")


def train(state: TrainState, data: TrainingData, model_config: ModelConfig, config: TrainConfig,
          accelerator: Accelerator, vae: Any, run_dir: Path, logger: "RunLogger") -> None:
    """Run optimizer steps from state.step to the last one, logging and checkpointing on schedule."""
    total_steps = config.epochs * data.steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    logger.info(f"{'FPDM' if model_config.fixed_point else 'DiT'} {model_config.model}: {state.num_params:,} "
                f"parameters; {accelerator.num_processes} process(es), batch {config.global_batch_size}, steps "
                f"{state.step}->{total_steps}, mixed precision {accelerator.mixed_precision}, run folder {run_dir}")
    state.model.train()
    progress = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_main_process, desc="train",
                    dynamic_ncols=True)
    window, watch = LogWindow(), FiniteLossWatch(accelerator.device)
    loader = batch_loader(data, config, state.step, total_steps, accelerator.device)
    try:
        for x, y in loader:
            x, y = x.to(accelerator.device, non_blocking=True), y.to(accelerator.device, non_blocking=True)
            if vae is not None:
                x = encode_images(vae, x)
            terms, iters = train_step(state, x, y, model_config, config, accelerator)
            watch.update(terms["loss"], state.step)
            window.terms.append({k: v.detach() for k, v in terms.items()})
            if iters is not None:
                window.sjfb_iters.append(iters)
            progress.update(1)
            last = state.step == total_steps
            if state.step % config.log_every == 0 or last:
                watch.check(accelerator, logger, run_dir, state.step)
                log_window(window, state.step, model_config, accelerator, logger, progress)
                window = LogWindow()
            if state.step % config.ckpt_every == 0 or last:
                watch.check(accelerator, logger, run_dir, state.step)  # a non-finite checkpoint is never written
                save_training_checkpoint(state, model_config, config, accelerator, run_dir / "checkpoints", logger)
    finally:
        progress.close()  # ends the bar's line, so an error message starts on its own


def train_step(state: TrainState, x: torch.Tensor, y: torch.Tensor, model_config: ModelConfig, config: TrainConfig,
               accelerator: Accelerator) -> tuple[dict[str, torch.Tensor], Optional[tuple[int, int]]]:
    """One optimizer step and EMA update: (loss terms, the S-JFB (n, m) run, or None for a DiT). Nothing here
    waits for the device (the finiteness of the loss is checked later, by FiniteLossWatch)."""
    iters = draw_training_iters(model_config, state.sjfb_generator) if model_config.fixed_point else None
    terms = compute_loss(state.diffusion, state.model, x, y, iters)
    state.optimizer.zero_grad(set_to_none=True)
    accelerator.backward(terms["loss"])
    state.optimizer.step()
    update_ema(state.ema, accelerator.unwrap_model(state.model), ema_decay_at(state.step, config))
    state.step += 1
    return terms, iters


def compute_loss(diffusion: Any, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 sjfb_iters: Optional[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Mean loss terms at random timesteps; an FPDM runs n iterations without and m with gradient (Algorithm 1)."""
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
    model_kwargs: dict[str, Any] = {"y": y}
    if sjfb_iters is not None:
        model_kwargs["num_no_grad_iters"], model_kwargs["num_iters"] = sjfb_iters
    terms = diffusion.training_losses(model, x, t, model_kwargs)
    return {name: value.mean() for name, value in terms.items()}


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for all parameters at once: two foreach kernels instead of two per
    tensor, with the per-tensor arithmetic (mul_ then add_), so the values are those of the per-tensor update."""
    ema_params = dict(ema_model.named_parameters())
    targets, sources = [], []
    for name, param in model.named_parameters():
        targets.append(ema_params[name])
        sources.append(param.detach().float())
    torch._foreach_mul_(targets, decay)
    torch._foreach_add_(targets, sources, alpha=1 - decay)


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


class StepBatches:
    """This process's index batches for steps start+1 .. total, epoch after epoch: the batch sampler of the run's
    one DataLoader. The order is that of epoch_batches, so a resumed run sees the batches it would have seen."""

    def __init__(self, data: TrainingData, seed: int, start: int, total: int):
        self.data, self.seed, self.start, self.total = data, seed, start, total

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while step < self.total:
            epoch, offset = divmod(step, self.data.steps_per_epoch)
            for indices in self.data.epoch(epoch, self.seed)[offset:][:self.total - step]:
                yield indices
                step += 1

    def __len__(self) -> int:
        return max(0, self.total - self.start)


def batch_loader(data: TrainingData, config: TrainConfig, start: int, total: int,
                 device: torch.device) -> DataLoader:
    """The run's DataLoader: --num_workers processes read the items of each index batch ahead of the step (0: the
    main process reads them); batches are pinned for asynchronous copies on CUDA."""
    # Its own generator: a DataLoader iterator otherwise draws its worker seed from torch's default RNG, which
    # drives timesteps and noise (a resumed run would then draw differently from an uninterrupted one).
    return DataLoader(data.dataset, batch_sampler=StepBatches(data, config.global_seed, start, total),
                      num_workers=config.num_workers, collate_fn=stack_items, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(config.global_seed))


def stack_items(items: list[tuple[Any, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack dataset items into a batch: x (B, C, H, W) float32, y (B,) long (on the CPU)."""
    x = torch.stack([torch.as_tensor(item[0]) for item in items]).float()
    y = torch.as_tensor([int(item[1]) for item in items], dtype=torch.long)
    return x, y


#################################################################################
#                                 Checkpoints                                   #
#################################################################################

def save_training_checkpoint(state: TrainState, model_config: ModelConfig, config: TrainConfig,
                             accelerator: Accelerator, ckpt_dir: Path, logger: "RunLogger") -> None:
    """Write checkpoints/STEP.pt (atomically), point latest.pt at it, and drop numbered files beyond the newest K.

    Every rank contributes its RNG states (per-rank timesteps and noise); only the main process writes.
    """
    rng_state = capture_rng_state({"sjfb": state.sjfb_generator})
    rng_states = gather_object([rng_state]) if accelerator.num_processes > 1 else rng_state
    if accelerator.is_main_process:
        payload = {"model": accelerator.unwrap_model(state.model).state_dict(), "ema": state.ema.state_dict(),
                   "opt": state.optimizer.state_dict(), "step": state.step,
                   "config": {"model": asdict(model_config), "train": asdict(config)}, "rng": rng_states}
        numbered = ckpt_dir / f"{state.step:07d}.pt"
        save_checkpoint(payload, numbered)
        link_latest(numbered, ckpt_dir / "latest.pt")
        removed = prune_checkpoints(ckpt_dir, state.step, config.keep_last_ckpts, config.ckpt_milestones_every)
        logger.info(f"saved checkpoint {numbered}" + (f" (removed {', '.join(p.name for p in removed)})"
                                                      if removed else ""))
    accelerator.wait_for_everyone()


#################################################################################
#                                End of training                                #
#################################################################################

def finish(state: TrainState, data: TrainingData, model_config: ModelConfig, config: TrainConfig,
           accelerator: Accelerator, vae: Any, run_dir: Path, logger: "RunLogger") -> None:
    """Publish the EMA weights, write summary.json (with a per-rank weight checksum) and the sample grid."""
    checksums = gather_object([weights_checksum(accelerator.unwrap_model(state.model))])
    if accelerator.is_main_process:
        save_safetensors(state.ema.state_dict(), model_config, run_dir / "ema.safetensors")
        write_json(run_dir / "summary.json",
                   {"step": state.step, "num_params": state.num_params, "rank_weight_checksums": checksums})
        if config.sample_grid:
            write_sample_grid(state.ema, model_config, run_dir / "samples.png", accelerator.device, vae,
                              data.dataset, logger, config.sample_grid_sampler)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def weights_checksum(model: torch.nn.Module) -> float:
    """A float64 checksum of all parameters, to compare replicas across processes."""
    return float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(model.parameters())))


def write_sample_grid(ema: torch.nn.Module, model_config: ModelConfig, path: Path, device: torch.device,
                      vae: Any, dataset: Any, logger: "RunLogger", sampler: str) -> None:
    """Draw a small grid from the EMA model at the end of training (`sampler`, 50 steps, no guidance).

    Latent models are decoded with the training VAE, or the one named in the latents' manifest; when that cannot
    be loaded (a hub name without network) the grid previews the latents and the log says so.
    """
    from sampling import sample_grid_png
    if model_config.latent and vae is None and hasattr(dataset, "manifest"):
        try:
            vae = load_vae(dataset.manifest["vae"], device)
        except (OSError, ValueError) as error:
            logger.info(f"samples.png shows raw latents: the VAE could not be loaded ({error})")
    sample_grid_png(ema.eval(), model_config, path, device=device, vae=vae, sampler=sampler)


#################################################################################
#                                   Logging                                     #
#################################################################################

def log_window(window: LogWindow, step: int, model_config: ModelConfig, accelerator: Accelerator,
               logger: "RunLogger", progress: tqdm) -> None:
    """Log the window's loss terms (averaged over steps and processes), speed, memory, the S-JFB draws and the
    logged step's training compute (train_gmacs_per_image)."""
    steps_per_sec = len(window.terms) / (time.time() - window.start)
    names = list(window.terms[0])
    window_means = torch.stack([torch.stack([w[k] for w in window.terms]).mean() for k in names])  # (terms,)
    means = dict(zip(names, accelerator.reduce(window_means.float(), "mean").tolist()))  # one collective, one sync
    values = {**means, "steps_per_sec": steps_per_sec, "peak_memory_mb": peak_memory_mb(accelerator.device)}
    last_iters = None
    if window.sjfb_iters:
        check_same_sjfb_iters(window.sjfb_iters, accelerator)
        n, m = zip(*window.sjfb_iters)
        values.update(sjfb_n=n[-1], sjfb_m=m[-1], sjfb_n_mean=float(np.mean(n)), sjfb_m_mean=float(np.mean(m)))
        last_iters = window.sjfb_iters[-1]
    values["train_gmacs_per_image"] = training_macs_per_image(model_config, last_iters) / 1e9
    logger.metrics(step, values)
    progress.set_postfix(loss=f"{means['loss']:.4f}", steps_per_sec=f"{steps_per_sec:.2f}")


def check_same_sjfb_iters(iters: list[tuple[int, int]], accelerator: Accelerator) -> None:
    """Every process ran the same (n, m) in each step of the window (a bug otherwise: replicas would do unequal work
    and the S-JFB draws would no longer be one per step)."""
    if accelerator.num_processes == 1:
        return
    per_rank = gather_object([list(iters)])
    if any(other != per_rank[0] for other in per_rank[1:]):
        raise RuntimeError(f"S-JFB iteration counts differ across processes: {per_rank}")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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
            self.log_file = None
