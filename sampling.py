"""The FPDM / DiT sampling pipeline shared by sample.py, sample_ddp.py, train.py's end-of-training grid and experiments.

One denoising trajectory (``sample_batch``) runs diffusion's single-step ``p_sample`` / ``ddim_sample`` over the
timesteps of an ``allocation.IterationPlan`` and, per step, tells the model how many fixed-point iterations to run
(the plan, or the adaptive cap plus ``--fixed_point_tol``), which solver to use, and where to start: with solution
reuse (Sec. 3.3) the previous step's fixed-point solution, carried per sample as a local variable of this function
(never stored on the model). Under classifier-free guidance the diffusion runs on N rows and the model function
duplicates them into the conditional and unconditional halves, so the carried solution has 2N rows and each half
reuses its own.

Randomness is per image: image i draws its class label (when not given), its initial noise and every step's noise
from a generator seeded with ``seed + i``, in that order, so image i is the same whatever the batch size or the
number of processes (except under the adaptive schedule, whose stopping rule looks at the whole batch).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from allocation import IterationPlan, plan_for_model
from checkpoint import BUNDLED_CHECKPOINT, load_model_for_sampling
from config import DEFAULT_CFG_SCALE, ModelConfig, SampleConfig, UserError, config_diff
from images import decode_to_uint8, make_grid, save_png
from models import classifier_free_guidance
from solvers import get_solver

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


#################################################################################
#                              Per-image randomness                             #
#################################################################################

def image_generators(seed: int, indices: Sequence[int], num_classes: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded seed + i, positioned after the image's label draw."""
    generators = []
    for index in indices:
        generator = torch.Generator().manual_seed(seed + int(index))
        if num_classes > 0:
            torch.randint(num_classes, (1,), generator=generator)  # the label draw comes first in every stream
        generators.append(generator)
    return generators


def image_labels(indices: Sequence[int], seed: int, num_classes: int, class_labels: Optional[Sequence[int]] = None,
                 label_mode: str = "cycle") -> Optional[Tensor]:
    """Class label of each image: --class_labels cycled over image indices, else by `label_mode`.

    label_mode "cycle": image i gets class i % num_classes (sample.py: a grid shows every class);
    "random": drawn from the image's own generator (seed + i), as FID sampling does. None if unconditional.
    """
    if num_classes == 0:
        return None
    if class_labels:
        return torch.tensor([class_labels[int(i) % len(class_labels)] for i in indices], dtype=torch.long)
    if label_mode == "cycle":
        return torch.tensor([int(i) % num_classes for i in indices], dtype=torch.long)
    if label_mode != "random":
        raise ValueError(f"label_mode must be cycle or random (got {label_mode!r})")
    labels = [torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(seed + int(i))).item()
              for i in indices]
    return torch.tensor(labels, dtype=torch.long)


def _draw(generators: list[torch.Generator], shape: Sequence[int], device: torch.device) -> Tensor:
    """Stack one standard-normal draw of `shape` per image; (N, *shape) on `device`."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)


#################################################################################
#                               One trajectory                                  #
#################################################################################

@dataclass
class TrajectoryStats:
    """What one batch's trajectory spent, per step in sampling order (t = T-1 first). Per image: every image of a
    batch runs the same number of iterations."""
    timesteps: list[int] = field(default_factory=list)          # original diffusion timesteps visited
    iteration_caps: list[int] = field(default_factory=list)     # iterations allowed (plan or adaptive cap)
    iters_per_step: list[int] = field(default_factory=list)     # fixed-point iterations actually run
    blocks_per_step: list[int] = field(default_factory=list)    # block passes per image actually run
    residuals_per_step: list[list[float]] = field(default_factory=list)  # relative residual after each iteration
    reused_solution: list[bool] = field(default_factory=list)   # whether the step started from the previous solution

    @property
    def blocks_per_image(self) -> int:
        """Total transformer-block forward passes per image for this trajectory."""
        return sum(self.blocks_per_step)

    @property
    def delta_per_step(self) -> list[Optional[float]]:
        """The paper's delta_t (Fig. 6b/c): the residual of the last iteration at each step."""
        return [r[-1] if r else None for r in self.residuals_per_step]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "blocks_per_image": self.blocks_per_image, "delta_per_step": self.delta_per_step}


@dataclass
class SampleBatch:
    """A finished batch: image indices, labels (None if unconditional), samples in model space and statistics."""
    indices: list[int]
    labels: Optional[Tensor]   # (N,)
    samples: Tensor            # (N, C, H, W) latents or pixels in [-1, 1], on the CPU
    stats: TrajectoryStats


def make_sampling_diffusion(model_config: ModelConfig, num_steps: int, timestep_spacing: str = "default"):
    """The checkpoint's diffusion respaced to `num_steps` (DiT's even spacing, or trailing)."""
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"--timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)} (got {timestep_spacing!r})")
    respacing = str(num_steps) if timestep_spacing == "default" else f"trailing{num_steps}"
    return model_config.create_diffusion(respacing)


def make_denoiser(model: Callable, num_rows: int, cfg_scale: float, cfg_channels: Optional[int],
                  null_class: int, in_channels: int) -> Callable:
    """Model function for diffusion: (x (N,...), t, y, **fixed-point kwargs) -> ((N, C_out, H, W), FixedPointStats).

    With guidance it runs the model on 2N rows (conditional half, unconditional half) and returns the guided
    conditional half; the stats' solution then has 2N rows.
    """
    guided = cfg_scale != 1.0

    def denoise(x: Tensor, t: Tensor, y: Optional[Tensor] = None, **fixed_point_kwargs: Any):
        if guided:
            x = torch.cat([x, x], dim=0)                                 # (2N, C, H, W)
            t = torch.cat([t, t], dim=0)                                 # (2N,)
            y = torch.cat([y, torch.full_like(y, null_class)], dim=0)    # (2N,)
        out, stats = model.forward_with_stats(x, t, y, **fixed_point_kwargs)  # (N or 2N, C_out, H, W)
        if guided:
            out = classifier_free_guidance(out, cfg_scale, cfg_channels, in_channels)
        return out[:num_rows], stats                                     # (N, C_out, H, W)

    return denoise


@torch.no_grad()
def sample_batch(model: Callable, model_config: ModelConfig, plan: IterationPlan, config: SampleConfig,
                 indices: Sequence[int], labels: Optional[Tensor], *, seed: int, device: torch.device | str = "cpu",
                 diffusion: Any = None) -> SampleBatch:
    """Denoise one batch of images (image i from seed + i) following `plan`; nothing is stored on the model.

    config supplies the sampler (ddim, ddim_eta, timestep_spacing), guidance (cfg_scale, cfg_channels) and the
    fixed-point options (fixed_point_reuse_solution, fixed_point_solver, anderson_memory); steps and iterations
    come from the plan.
    """
    device = torch.device(device)
    indices = [int(i) for i in indices]
    num_rows = len(indices)
    if diffusion is None:
        diffusion = make_sampling_diffusion(model_config, plan.num_steps, config.timestep_spacing)
    if diffusion.num_timesteps != plan.num_steps:
        raise ValueError(f"the diffusion has {diffusion.num_timesteps} steps but the plan {plan.num_steps}")
    if model_config.num_classes > 0 and (labels is None or labels.shape != (num_rows,)):
        raise ValueError(f"a class-conditional model needs one label per image ({num_rows})")
    shape = (model_config.in_channels, model_config.input_size, model_config.input_size)
    generators = image_generators(seed, indices, model_config.num_classes)
    denoise = make_denoiser(model, num_rows, config.cfg_scale, parse_cfg_channels(config.cfg_channels),
                            null_class=model_config.num_classes, in_channels=model_config.in_channels)
    y = labels.to(device) if labels is not None else None
    clip_denoised = not model_config.latent  # pixels live in [-1, 1]; latents are unbounded
    solver_kwargs: dict[str, Any] = {}
    if model_config.fixed_point:
        solver_kwargs["solver"] = config.fixed_point_solver
        if config.fixed_point_solver == "anderson":
            solver_kwargs["solver_options"] = {"memory": config.anderson_memory}

    x = _draw(generators, shape, device)                 # (N, C, H, W): x_T
    stats = TrajectoryStats()
    previous_solution: Optional[Tensor] = None           # (N or 2N, T, D): reset for every batch
    for step, index in enumerate(range(plan.num_steps - 1, -1, -1)):
        t = torch.full((num_rows,), index, device=device, dtype=torch.long)
        cap = plan.iteration_cap(step, stats.blocks_per_image)
        model_kwargs: dict[str, Any] = {"y": y}
        reuse = model_config.fixed_point and config.fixed_point_reuse_solution and previous_solution is not None
        if model_config.fixed_point:
            model_kwargs.update(solver_kwargs, num_iters=cap, tol=plan.fixed_point_tol if plan.adaptive else None,
                                init=previous_solution if reuse else None)
        noise = _draw(generators, shape, device)         # (N, C, H, W): this step's noise, per image
        if config.ddim:
            out = diffusion.ddim_sample(denoise, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
                                        eta=config.ddim_eta, noise=noise)
        else:
            out = diffusion.p_sample(denoise, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
                                     noise=noise)
        state = out.get("model_extra")
        iters = state.num_iters if state is not None else cap
        stats.timesteps.append(int(diffusion.timestep_map[index]))
        stats.iteration_caps.append(cap)
        stats.iters_per_step.append(iters)
        stats.blocks_per_step.append(state.blocks if state is not None else plan.step_blocks(iters))
        stats.residuals_per_step.append([float(r) for r in state.residuals] if state is not None else [])
        stats.reused_solution.append(bool(reuse))
        if model_config.fixed_point and config.fixed_point_reuse_solution and state is not None:
            previous_solution = state.solution
        x = out["sample"]
    return SampleBatch(indices, labels, x.float().cpu(), stats)


def iterate_batches(indices: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Consecutive chunks of `indices` (the last one may be smaller)."""
    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]


#################################################################################
#                          Convenience for other scripts                        #
#################################################################################

def prepare_sampling(model_config: ModelConfig, config: SampleConfig,
                     model: Any = None) -> tuple[SampleConfig, IterationPlan, list[str]]:
    """Validate flags against the model and plan the compute: (effective config, plan, notes)."""
    config, notes = validate_sample_config(model_config, config, model=model)
    plan = plan_for_model(model_config, config)
    return config, plan, notes


def sample_images(model: Callable, model_config: ModelConfig, config: SampleConfig, plan: IterationPlan,
                  indices: Sequence[int], labels: Optional[Tensor], *, seed: int, batch_size: int,
                  device: torch.device | str = "cpu", vae: Any = None) -> Iterator[tuple[SampleBatch, np.ndarray]]:
    """Yield (batch, uint8 images (n, H, W, C)) for `indices` in chunks of `batch_size`; labels align with indices."""
    diffusion = make_sampling_diffusion(model_config, plan.num_steps, config.timestep_spacing)
    position = {int(i): k for k, i in enumerate(indices)}
    for chunk in iterate_batches(indices, batch_size):
        chunk_labels = None if labels is None else labels[[position[i] for i in chunk]]
        batch = sample_batch(model, model_config, plan, config, chunk, chunk_labels, seed=seed, device=device,
                             diffusion=diffusion)
        yield batch, decode_to_uint8(batch.samples, model_config, vae)


def sample_grid_png(model: Callable, model_config: ModelConfig, path: str | Path, *,
                    device: torch.device | str = "cpu", num_images: int = 16, num_sampling_steps: int = 50,
                    ddim: bool = True, cfg_scale: float = 1.0, seed: int = 0, vae: Any = None) -> Path:
    """Draw a small grid (train.py's end-of-training preview): DDIM, no guidance, class i % num_classes.

    A latent model without `vae` (a loaded AutoencoderKL) gets a latent-channel preview.
    """
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    config = SampleConfig(num_sampling_steps=num_sampling_steps, ddim=ddim, cfg_scale=cfg_scale, seed=seed,
                          num_samples=num_images)
    config, plan, _ = prepare_sampling(model_config, config)
    labels = image_labels(range(num_images), seed, model_config.num_classes)
    drawn = [pixels for _, pixels in sample_images(model, model_config, config, plan, list(range(num_images)),
                                                    labels, seed=seed, batch_size=num_images, device=device,
                                                    vae=vae)]
    if was_training and hasattr(model, "train"):
        model.train()
    path = Path(path)
    save_png(make_grid(np.concatenate(drawn)), path)
    return path
