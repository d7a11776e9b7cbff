"""The FPDM / DiT sampling pipeline shared by sample.py, sample_ddp.py, train.py's end-of-training grid and experiments.

``generate`` is the one generation loop: it splits image indices into batches, runs one denoising trajectory per
batch (``sample_batch``), decodes each batch to uint8 pixels and hands it to an optional ``on_batch`` callback (so
sample_ddp.py writes files as it goes). ``sample_batch`` runs one ``Stepper`` per step (diffusion's ``p_sample`` /
``ddim_sample``, or a diffusers scheduler from schedulers.py: one model call per step either way) over the
timesteps of an ``allocation.IterationPlan`` and, per step, tells the model how many fixed-point iterations
to run (the plan, or the adaptive cap plus ``--fixed_point_tol``), which solver to use, and where to start: with
solution reuse (Sec. 3.3) the previous step's fixed-point solution, carried per sample as a local variable (never
stored on the model). Under classifier-free guidance ``denoise`` duplicates the N rows into the conditional and
unconditional halves, so the carried solution has 2N rows and each half reuses its own.

Randomness is per image (``ImageRandom``): image i draws its class label, its initial noise and every step's noise
from a generator seeded with ``seed + i``, in that order, so image i is the same whatever the batch size or the
number of processes (except under the adaptive schedule, whose stopping rule looks at the whole batch).

Precision (``--precision``): bf16 autocasts the network call only; the fixed-point iterate, its residuals and the
diffusion arithmetic stay fp32. tf32 lets CUDA matmuls use TF32 for the duration of a batch.
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from allocation import IterationPlan, budget_for_macs, plan_for_model, planned_macs
from checkpoint import BUNDLED_CHECKPOINT, load_model_for_sampling
from config import DEFAULT_CFG_SCALE, ModelConfig, SampleConfig, UserError, config_diff
import cost
import schedulers
from images import decode_to_uint8, make_grid, save_png
from models import FixedPointStats, classifier_free_guidance
from records import TrajectoryStats, summarize_stats
from solvers import get_solver
from vae import load_vae_for

TIMESTEP_SPACINGS = ("default", "trailing")


#################################################################################
#                     Checkpoints and command-line checks                       #
#################################################################################

def resolve_device(device: str) -> torch.device:
    """Map --device (auto, cpu, cuda, cuda:1) to a torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise UserError(f"--device {device!r} is not a device (auto, cpu or cuda)") from error


def resolve_checkpoint(ckpt: str) -> Path:
    """--ckpt as a path; empty -> the bundled digits FPDM if it exists, else an error saying to pass --ckpt."""
    if ckpt:
        return Path(ckpt)
    if Path(BUNDLED_CHECKPOINT).is_file():
        return Path(BUNDLED_CHECKPOINT)
    raise FileNotFoundError(f"--ckpt: no checkpoint given and the bundled checkpoint {BUNDLED_CHECKPOINT} does not "
                            "exist; pass --ckpt PATH (a .pt written by train.py, a run folder, or a .safetensors file)")


def check_model_flags(given: dict[str, Any], model_config: ModelConfig, ckpt: str | Path = "") -> None:
    """Architecture flags on the command line must agree with the checkpoint (which alone defines the model)."""
    stored = asdict(model_config)
    differences = config_diff(dict(given), {k: stored[k] for k in given})
    if differences:
        raise UserError(
            f"model flags given on the command line disagree with the checkpoint {str(ckpt)!r} "
            f"(command line != checkpoint): {'; '.join('--' + d for d in differences)}. The architecture comes from "
            "--ckpt: drop these flags or pass the matching checkpoint")


def load_sampling_model(ckpt: str, device: torch.device, use_ema: bool = True,
                        given_model_flags: Optional[dict[str, Any]] = None
                        ) -> tuple[torch.nn.Module, ModelConfig, Path]:
    """Resolve --ckpt, load the model in eval mode and check command-line model flags against its config."""
    path = resolve_checkpoint(ckpt)
    if str(path).endswith(".safetensors") and not use_ema:
        raise UserError(f"--use_ema False: {str(path)!r} holds published EMA weights only (no raw weights)")
    model, model_config = load_model_for_sampling(path, device=device, use_ema=use_ema, flag="--ckpt")
    check_model_flags(given_model_flags or {}, model_config, path)
    return model, model_config, path


def parse_class_labels(text: str, num_classes: int) -> Optional[list[int]]:
    """Parse --class_labels ("3,1,4"), each in [0, num_classes); None when empty."""
    if not text.strip():
        return None
    if num_classes == 0:
        raise UserError(f"--class_labels {text!r}: the checkpoint is unconditional (num_classes 0)")
    labels = []
    for piece in text.split(","):
        try:
            labels.append(int(piece.strip()))
        except ValueError:
            raise UserError(f"--class_labels: {piece.strip()!r} is not an integer (expected e.g. 3,1,4)") from None
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise UserError(f"--class_labels: {bad} out of range for a model with {num_classes} classes "
                         f"(valid: 0..{num_classes - 1})")
    return labels


def parse_cfg_channels(value: str | int | None) -> int | None:
    """--cfg_channels: a positive number of guided channels, or 'all' (None: every mean channel)."""
    if value is None or value == "all":
        return None
    try:
        channels = int(value)
    except (TypeError, ValueError):
        raise UserError(f"--cfg_channels must be a positive integer or 'all' (got {value!r})") from None
    if channels < 1:
        raise UserError(f"--cfg_channels must be a positive integer or 'all' (got {value!r})")
    return channels


def validate_sample_config(model_config: ModelConfig, config: SampleConfig,
                           model: Any = None) -> tuple[SampleConfig, list[str]]:
    """Check sampling flags against the model; returns the effective config and notes for the record.

    A --cfg_scale left None becomes 4.0 for class-conditional models and 1.0 for unconditional ones; a --cfg_scale
    other than 1 given to an unconditional model is an error.
    """
    config.validate()
    notes: list[str] = []
    if config.cfg_scale is None:
        config = replace(config, cfg_scale=DEFAULT_CFG_SCALE if model_config.num_classes else 1.0)
        if not model_config.num_classes:
            notes.append("unconditional checkpoint: --cfg_scale defaulted to 1.0 (no guidance)")
    if config.cfg_scale != 1.0:
        if model_config.num_classes == 0:
            raise UserError(f"--cfg_scale {config.cfg_scale}: classifier-free guidance needs a class-conditional "
                            "model and this checkpoint is unconditional (num_classes 0); pass --cfg_scale 1")
        if model_config.class_dropout_prob <= 0:
            raise UserError(f"--cfg_scale {config.cfg_scale}: the checkpoint was trained without label dropout "
                            "(class_dropout_prob 0), so it has no null class to guide with; pass --cfg_scale 1")
    parse_cfg_channels(config.cfg_channels)
    parse_class_labels(config.class_labels, model_config.num_classes)
    get_solver(config.fixed_point_solver)  # an unknown name fails there, listing the valid ones
    schedulers.parse_options(config.sampler_options, config.resolved_sampler)  # a bad key fails naming the flag
    if config.timestep_spacing not in TIMESTEP_SPACINGS:
        raise UserError(f"--timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)} "
                         f"(got {config.timestep_spacing!r})")
    if not model_config.fixed_point:
        if config.fixed_point_reuse_solution:
            raise UserError("--fixed_point_reuse_solution True applies to FPDM checkpoints only (this one is a DiT)")
        if config.fixed_point_solver != "iteration":
            raise UserError(f"--fixed_point_solver {config.fixed_point_solver} applies to FPDM checkpoints only "
                             "(this one is a DiT)")
    elif config.fixed_point_tol is not None and config.iteration_schedule != "adaptive":
        notes.append("--fixed_point_tol is used by --iteration_schedule adaptive only; ignored")
    return config, notes



def check_finite_weights(model: torch.nn.Module, ckpt: str | Path) -> None:
    """Refuse a checkpoint whose weights hold NaN or inf: every sample would be non-finite."""
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise UserError(f"--ckpt {str(ckpt)!r}: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]}); "
                        "nothing was written. Use another checkpoint (e.g. an earlier one of the run)")


#################################################################################
#                                   Precision                                   #
#################################################################################

PRECISIONS = ("auto", "fp32", "tf32", "bf16")


def effective_precision(precision: str, device: torch.device | str) -> str:
    """--precision on `device`: auto is tf32 on CUDA and fp32 elsewhere; tf32 means fp32 off CUDA."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        return "tf32" if cuda else "fp32"
    return "fp32" if precision == "tf32" and not cuda else precision


def resolve_precision(config: SampleConfig, device: torch.device | str) -> tuple[SampleConfig, list[str]]:
    """The config with its precision resolved for `device` (what is recorded), and notes.

    sample_ddp.py's DiT flag --tf32 True/False is an alias of --precision tf32/fp32.
    """
    notes: list[str] = []
    precision, tf32 = config.precision, getattr(config, "tf32", None)
    if tf32 is not None:
        alias = "tf32" if tf32 else "fp32"
        if precision not in ("auto", alias):
            raise UserError(f"--tf32 {tf32} (= --precision {alias}) disagrees with --precision {precision}: give one")
        precision = alias
    resolved = effective_precision(precision, device)
    if precision == "tf32" and resolved != "tf32":
        notes.append(f"--precision tf32 applies to CUDA only: {torch.device(device)} runs fp32")
    return replace(config, precision=resolved), notes


@contextlib.contextmanager
def matmul_precision(precision: str, device: torch.device | str) -> Iterator[None]:
    """Allow TF32 in CUDA matmuls and convolutions for `precision` tf32 only (restored afterwards)."""
    if torch.device(device).type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    allow = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


#################################################################################
#                              Per-image randomness                             #
#################################################################################

class ImageRandom:
    """Per-image random streams (one CPU generator per image, seeded seed + i, as EDM's StackedRandomGenerator).

    Each stream draws, in this order: the image's class label (class-conditional models; drawn even when labels are
    given, so the noise never depends on how labels were chosen), x_T, then one noise per step. Image i is therefore
    the same whatever batch or process it lands in.
    """

    def __init__(self, seed: int, indices: Sequence[int], num_classes: int):
        self.generators = [torch.Generator().manual_seed(seed + int(i)) for i in indices]
        self._labels: Optional[Tensor] = None
        if num_classes > 0:
            self._labels = torch.cat([torch.randint(num_classes, (1,), generator=g) for g in self.generators])

    def labels(self) -> Optional[Tensor]:
        """Each image's random class label, (N,) int64; None for an unconditional model."""
        return None if self._labels is None else self._labels.clone()

    def normal(self, shape: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
        """One standard-normal draw of `shape` per image: (N, *shape) on `device`."""
        return torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators]).to(device)


def image_labels(indices: Sequence[int], seed: int, num_classes: int, class_labels: Optional[Sequence[int]] = None,
                 label_mode: str = "cycle") -> Optional[Tensor]:
    """Class label of each image: --class_labels cycled over image indices, else by `label_mode`.

    label_mode "cycle": image i gets class i % num_classes (sample.py: a grid shows every class);
    "random": the image's own stream (ImageRandom, seed + i), as FID sampling does. None if unconditional.
    """
    if num_classes == 0:
        return None
    if class_labels:
        return torch.tensor([class_labels[int(i) % len(class_labels)] for i in indices], dtype=torch.long)
    if label_mode == "cycle":
        return torch.tensor([int(i) % num_classes for i in indices], dtype=torch.long)
    if label_mode != "random":
        raise ValueError(f"label_mode must be cycle or random (got {label_mode!r})")
    return ImageRandom(seed, indices, num_classes).labels()


@dataclass
class SampleBatch:
    """A finished batch: image indices, labels (None if unconditional), samples in model space and statistics."""
    indices: list[int]
    labels: Optional[Tensor]   # (N,)
    samples: Tensor            # (N, C, H, W) latents or pixels in [-1, 1], on the CPU
    stats: TrajectoryStats


class NonFiniteError(UserError):
    """The model produced NaN or inf: the run stops before writing the batch (scripts name the checkpoint)."""


def make_sampling_diffusion(model_config: ModelConfig, num_steps: int, timestep_spacing: str = "default"):
    """The checkpoint's diffusion respaced to `num_steps` (DiT's even spacing, or trailing)."""
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise UserError(f"--timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)} (got {timestep_spacing!r})")
    respacing = str(num_steps) if timestep_spacing == "default" else f"trailing{num_steps}"
    return model_config.create_diffusion(respacing)


class Stepper(Protocol):
    """One denoising step as sample_batch calls it: exactly one model evaluation, then the sampler's update."""
    timesteps: list[int]       # original diffusion timesteps, in sampling order (one per step)
    init_noise_sigma: float    # x_T = standard normal noise times this

    def __call__(self, model_fn: Callable[..., Any], x: Tensor, step: int, *, model_kwargs: dict[str, Any],
                 noise: Tensor) -> tuple[Tensor, Any]:
        """x at step `step` -> (x after it, the model's extra: FPDM statistics)."""


class DiffusionStepper:
    """One DDPM (p_sample) or DDIM step of the project's respaced ADM diffusion, as sample_batch calls a step."""

    init_noise_sigma = 1.0

    def __init__(self, diffusion: Any, ddim: bool, eta: float, clip_denoised: bool):
        self.diffusion, self.ddim, self.eta, self.clip_denoised = diffusion, ddim, eta, clip_denoised
        self.timesteps = [int(t) for t in reversed(diffusion.timestep_map)]   # original timesteps, sampling order

    def __call__(self, model_fn: Callable[..., Any], x: Tensor, step: int, *, model_kwargs: dict[str, Any],
                 noise: Tensor) -> tuple[Tensor, Any]:
        """x at step `step` (0 = first, t = T-1) -> (x at the next step, the model's extra: FPDM statistics)."""
        t = torch.full((x.shape[0],), self.diffusion.num_timesteps - 1 - step, device=x.device, dtype=torch.long)
        if self.ddim:
            out = self.diffusion.ddim_sample(model_fn, x, t, clip_denoised=self.clip_denoised,
                                             model_kwargs=model_kwargs, eta=self.eta, noise=noise)
        else:
            out = self.diffusion.p_sample(model_fn, x, t, clip_denoised=self.clip_denoised,
                                          model_kwargs=model_kwargs, noise=noise)
        return out["sample"], out["model_extra"]


def make_stepper(model_config: ModelConfig, config: SampleConfig, diffusion: Any) -> Stepper:
    """The step of config's sampler: the project's DDPM/DDIM on `diffusion`, or a fresh diffusers scheduler."""
    clip_denoised = not model_config.latent  # pixels live in [-1, 1]; latents are unbounded
    sampler = config.resolved_sampler
    if sampler in ("ddpm", "ddim"):
        return DiffusionStepper(diffusion, sampler == "ddim", config.ddim_eta, clip_denoised)
    return schedulers.make_stepper(sampler, model_config, diffusion.num_timesteps, config.timestep_spacing,
                                   clip_denoised, schedulers.parse_options(config.sampler_options, sampler),
                                   project_timesteps=list(diffusion.timestep_map))


def denoise(model: Any, x: Tensor, t: Tensor, y: Optional[Tensor] = None, *, cfg_scale: float,
            cfg_channels: Optional[int], null_class: int, in_channels: int, bf16: bool = False,
            **fixed_point_kwargs: Any) -> tuple[Tensor, FixedPointStats]:
    """The model function diffusion calls: (x (N, ...), t, y, fixed-point kwargs) -> ((N, C_out, H, W) fp32, stats).

    With guidance it runs the model on 2N rows (conditional half, unconditional half) and returns the guided
    conditional half; the stats' solution then has 2N rows. bf16 autocasts the network call only; its output is
    cast to fp32 before guidance and the diffusion step. A non-finite output raises NonFiniteError.
    """
    num_rows = x.shape[0]
    if cfg_scale != 1.0:
        x = torch.cat([x, x], dim=0)                                 # (2N, C, H, W)
        t = torch.cat([t, t], dim=0)                                 # (2N,)
        y = torch.cat([y, torch.full_like(y, null_class)], dim=0)    # (2N,)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out, stats = model.forward_with_stats(x, t, y, **fixed_point_kwargs)  # (N or 2N, C_out, H, W)
    out = out.float()
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError(f"the model output is not finite (NaN or inf) at timestep {int(t[0])}")
    if cfg_scale != 1.0:
        out = classifier_free_guidance(out, cfg_scale, cfg_channels, in_channels)
    return out[:num_rows], stats                                     # (N, C_out, H, W)


@torch.no_grad()
def sample_batch(model: Any, model_config: ModelConfig, plan: IterationPlan, config: SampleConfig,
                 indices: Sequence[int], labels: Optional[Tensor] = None, *, seed: int,
                 device: torch.device | str = "cpu", diffusion: Any = None,
                 stepper: Optional[Stepper] = None) -> SampleBatch:
    """Denoise one batch of images (image i from seed + i) following `plan`; nothing is stored on the model.

    config supplies the sampler (sampler, ddim_eta, timestep_spacing, sampler_options; `stepper` overrides it),
    guidance (cfg_scale, cfg_channels), precision and the fixed-point options (fixed_point_reuse_solution,
    fixed_point_solver, anderson_memory); steps and iterations come from the plan. labels None on a
    class-conditional model: each image's random label.
    """
    device = torch.device(device)
    indices = [int(i) for i in indices]
    if diffusion is None:
        diffusion = make_sampling_diffusion(model_config, plan.num_steps, config.timestep_spacing)
    if diffusion.num_timesteps != plan.num_steps:
        raise ValueError(f"the diffusion has {diffusion.num_timesteps} steps but the plan {plan.num_steps}")
    rng = ImageRandom(seed, indices, model_config.num_classes)
    labels = rng.labels() if labels is None else labels
    if model_config.num_classes > 0 and labels.shape != (len(indices),):
        raise ValueError(f"a class-conditional model needs one label per image ({len(indices)})")
    precision = effective_precision(config.precision, device)
    guided = config.cfg_scale != 1.0
    model_fn = functools.partial(denoise, model, cfg_scale=config.cfg_scale,
                                 cfg_channels=parse_cfg_channels(config.cfg_channels),
                                 null_class=model_config.num_classes, in_channels=model_config.in_channels,
                                 bf16=precision == "bf16")
    y = labels.to(device) if labels is not None else None
    solver_kwargs: dict[str, Any] = {}
    if model_config.fixed_point:
        solver_kwargs["solver"] = config.fixed_point_solver
        if config.fixed_point_solver == "anderson":
            solver_kwargs["solver_options"] = {"memory": config.anderson_memory}

    if stepper is None:
        stepper = make_stepper(model_config, config, diffusion)
    if len(stepper.timesteps) != plan.num_steps:
        raise ValueError(f"the sampler visits {len(stepper.timesteps)} timesteps but the plan has {plan.num_steps}")
    shape = (model_config.in_channels, model_config.input_size, model_config.input_size)
    x = rng.normal(shape, device) * stepper.init_noise_sigma   # (N, C, H, W): x_T (Euler: in sigma space)
    stats = TrajectoryStats()
    previous_solution: Optional[Tensor] = None           # (N or 2N, T, D): reset for every batch
    with matmul_precision(precision, device):
        for step in range(plan.num_steps):
            num_iters = plan.iteration_cap(step, stats.blocks_per_image)   # the plan's (or adaptive) iterations
            model_kwargs: dict[str, Any] = {"y": y}
            reuse = model_config.fixed_point and config.fixed_point_reuse_solution and previous_solution is not None
            if model_config.fixed_point:
                model_kwargs.update(solver_kwargs, num_iters=num_iters, init=previous_solution if reuse else None,
                                    tol=plan.fixed_point_tol if plan.adaptive else None)
            noise = rng.normal(shape, device)            # (N, C, H, W): this step's noise, per image
            x, state = stepper(model_fn, x, step, model_kwargs=model_kwargs, noise=noise)  # state: FixedPointStats
            stats.timesteps.append(stepper.timesteps[step])
            stats.iteration_caps.append(num_iters)
            stats.iters_per_step.append(state.num_iters)
            stats.blocks_per_step.append(state.blocks)
            stats.macs_per_step.append(cost.macs_per_step(model_config, state.num_iters, cfg=guided))
            stats.residuals_per_step.append([float(r) for r in state.residuals])
            stats.reused_solution.append(bool(reuse))
            if model_config.fixed_point and config.fixed_point_reuse_solution:
                previous_solution = state.solution
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError("the samples are not finite (NaN or inf) after the last step")
    return SampleBatch(indices, labels, x.float().cpu(), stats)


#################################################################################
#                            The generation loop                                #
#################################################################################

@dataclass
class Generated:
    """What generate() drew, in the order of the indices it was given."""
    images: Optional[np.ndarray]         # (N, H, W, C) uint8 (None with keep_images=False)
    labels: Optional[Tensor]             # (N,) class labels used (None if unconditional)
    trajectories: list[TrajectoryStats]  # one per batch
    counts: list[int]                    # images per batch
    seconds: float                       # wall-clock of the whole loop

    def summary(self, plan: IterationPlan, model_config: ModelConfig, config: SampleConfig) -> dict[str, Any]:
        """summarize() of these trajectories, plus the seconds."""
        return {**summarize(plan, model_config, config, self.trajectories, self.counts), "seconds": self.seconds}


def summarize(plan: IterationPlan, model_config: ModelConfig, config: SampleConfig,
              trajectories: Sequence[TrajectoryStats], counts: Sequence[int]) -> dict[str, Any]:
    """records.summarize_stats (blocks spent against the plan) plus GMACs per image, spent and planned."""
    stats = summarize_stats(plan, trajectories, counts)
    if trajectories:
        total = sum(s.macs_per_image * c for s, c in zip(trajectories, counts))
        stats["gmacs_per_image"] = total / sum(counts) / 1e9
        stats["gmacs_per_image_max"] = max(s.macs_per_image for s in trajectories) / 1e9
    stats["planned_gmacs_per_image"] = planned_macs(model_config, plan, config.cfg_scale != 1.0) / 1e9
    return stats


def batches(indices: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Consecutive chunks of `indices` (the last one may be smaller)."""
    indices = [int(i) for i in indices]
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]


def generate(model: Any, model_config: ModelConfig, config: SampleConfig, plan: IterationPlan,
             indices: Sequence[int], labels: Optional[Tensor] = None, *, seed: int, batch_size: int,
             device: torch.device | str = "cpu", vae: Any = None,
             on_batch: Optional[Callable[[SampleBatch, np.ndarray], None]] = None,
             keep_images: bool = True) -> Generated:
    """Draw images `indices` (image i from seed + i) in batches of `batch_size`: the one generation loop.

    labels: (len(indices),) aligned with indices, or None (class-conditional models: each image's random label).
    on_batch(batch, pixels) is called after each batch with its uint8 (n, H, W, C) pixels, e.g. to write files;
    keep_images=False drops the pixels afterwards (50K-image runs). A non-finite batch raises NonFiniteError
    before on_batch sees it.
    """
    diffusion = make_sampling_diffusion(model_config, plan.num_steps, config.timestep_spacing)
    indices = [int(i) for i in indices]
    position = {i: k for k, i in enumerate(indices)}
    images, used_labels, trajectories, counts = [], [], [], []
    start = time.time()
    for chunk in batches(indices, batch_size):
        chunk_labels = None if labels is None else labels[[position[i] for i in chunk]]
        batch = sample_batch(model, model_config, plan, config, chunk, chunk_labels, seed=seed, device=device,
                             diffusion=diffusion)
        pixels = decode_to_uint8(batch.samples, model_config, vae)      # (n, H, W, C) uint8
        if on_batch is not None:
            on_batch(batch, pixels)
        if keep_images:
            images.append(pixels)
        if batch.labels is not None:
            used_labels.append(batch.labels)
        trajectories.append(batch.stats)
        counts.append(len(chunk))
    return Generated(images=np.concatenate(images) if keep_images and images else None,
                     labels=torch.cat(used_labels) if used_labels else None,
                     trajectories=trajectories, counts=counts, seconds=time.time() - start)


#################################################################################
#                          Convenience for other scripts                        #
#################################################################################

def prepare_sampling(model_config: ModelConfig, config: SampleConfig, model: Any = None,
                     device: torch.device | str = "cpu") -> tuple[SampleConfig, IterationPlan, list[str]]:
    """Validate flags against the model, resolve --precision for `device`, turn --budget_gmacs into a block
    budget and plan the compute: (effective config, plan, notes)."""
    config, notes = validate_sample_config(model_config, config, model=model)
    config, precision_notes = resolve_precision(config, device)
    notes += precision_notes
    if config.budget_gmacs is not None:
        budget = budget_for_macs(model_config, config, config.budget_gmacs * 1e9, cfg=config.cfg_scale != 1.0)
        if config.budget is not None and config.budget != budget:
            raise UserError(f"--budget {config.budget} and --budget_gmacs {config.budget_gmacs} (= {budget} blocks) "
                            "disagree: give one of them")
        config = replace(config, budget=budget)
        notes.append(f"--budget_gmacs {config.budget_gmacs}: the largest block budget that fits is {budget} blocks "
                     "per image")
    plan = plan_for_model(model_config, config)
    # Build the step once now, so settings a diffusers scheduler refuses stop the run before anything is written.
    make_stepper(model_config, config, make_sampling_diffusion(model_config, plan.num_steps, config.timestep_spacing))
    if config.budget_gmacs is not None:
        assert planned_macs(model_config, plan, config.cfg_scale != 1.0) <= config.budget_gmacs * 1e9
    return config, plan, notes


@dataclass
class Loaded:
    """A checkpoint ready to sample from (sample.py's and sample_ddp.py's step "load")."""
    model: Any
    model_config: ModelConfig
    ckpt: Path
    device: torch.device
    vae: Any  # the AutoencoderKL of a latent model, else None


def load(config: SampleConfig, model_flags: dict[str, Any], device: Optional[torch.device] = None) -> Loaded:
    """--ckpt on `device` (None: --device) with the model flags checked against it and finite weights, and, for a
    latent model, its --vae."""
    device = device or resolve_device(config.device)
    model, model_config, ckpt = load_sampling_model(config.ckpt, device, config.use_ema, model_flags)
    check_finite_weights(model, ckpt)
    return Loaded(model, model_config, ckpt, device, load_vae_for(model_config, config.vae, device))


@dataclass
class Request:
    """What to draw (the step "plan"): the effective flags, the compute plan with its notes, --class_labels."""
    config: SampleConfig
    plan: IterationPlan
    notes: list[str]
    class_labels: Optional[list[int]]

    def labels(self, indices: Sequence[int], num_classes: int, label_mode: str) -> Optional[Tensor]:
        """The class labels of images `indices` (image_labels)."""
        return image_labels(indices, self.config.seed, num_classes, self.class_labels, label_mode=label_mode)


def plan_request(loaded: Loaded, config: SampleConfig) -> Request:
    """Check the flags against the loaded model and plan the compute (prepare_sampling)."""
    config, plan, notes = prepare_sampling(loaded.model_config, config, model=loaded.model, device=loaded.device)
    return Request(config, plan, notes, parse_class_labels(config.class_labels, loaded.model_config.num_classes))


def draw(loaded: Loaded, request: Request, indices: Sequence[int], labels: Optional[Tensor],
         **options: Any) -> Generated:
    """generate() images `indices` of a request (the step "generate"); `options`: on_batch, keep_images."""
    return generate(loaded.model, loaded.model_config, request.config, request.plan, indices, labels,
                    seed=request.config.seed, batch_size=request.config.batch_size, device=loaded.device,
                    vae=loaded.vae, **options)


def sample_grid_png(model: Any, model_config: ModelConfig, path: str | Path, *,
                    device: torch.device | str = "cpu", num_images: int = 16, num_sampling_steps: int = 50,
                    sampler: str = "ddim", cfg_scale: float = 1.0, seed: int = 0, vae: Any = None) -> Path:
    """Draw a small grid (train.py's end-of-training preview): `sampler`, no guidance, class i % num_classes.

    A latent model without `vae` (a loaded AutoencoderKL) gets a latent-channel preview.
    """
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    config = SampleConfig(num_sampling_steps=num_sampling_steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed,
                          num_samples=num_images)
    config, plan, _ = prepare_sampling(model_config, config, device=device)
    indices = list(range(num_images))
    labels = image_labels(indices, seed, model_config.num_classes)
    drawn = generate(model, model_config, config, plan, indices, labels, seed=seed, batch_size=num_images,
                     device=device, vae=vae)
    if was_training and hasattr(model, "train"):
        model.train()
    path = Path(path)
    save_png(make_grid(drawn.images), path)
    return path
