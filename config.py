"""Typed configuration: the single source for command-line flags, model constructors and checkpoints.

Each dataclass field is one flag (``--field_name``, also spelled ``--field-name``); its type decides parsing and its
``help`` metadata is the flag's help text. ``ModelConfig`` is stored in every checkpoint and is all that
``sample.py --ckpt`` needs to rebuild the network and its diffusion process.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence


def _flag(default: Any, help: str) -> Any:
    """A dataclass field carrying its command-line help text."""
    return field(default=default, metadata={"help": help})


#################################################################################
#                                 Configurations                                #
#################################################################################

@dataclass
class ModelConfig:
    """Architecture and diffusion process: everything needed to rebuild a trained model."""
    model: str = _flag("DiT-Ti/2", "Registry name (DiT-XL/2, ..., DiT-Ti/2); FPDM is the same name with --fixed_point True.")
    image_size: int = _flag(8, "Image resolution in pixels (latent models work at image_size // 8).")
    in_channels: int = _flag(1, "Channels of the model input (1 for digits, 3 for RGB pixels, 4 for VAE latents).")
    latent: bool = _flag(False, "Whether the model denoises VAE latents (decoded with --vae when sampling).")
    num_classes: int = _flag(10, "Number of classes; 0 trains an unconditional model.")
    class_dropout_prob: float = _flag(0.1, "Label dropout for classifier-free guidance.")
    learn_sigma: bool = _flag(True, "Learn the variance (learned-range, improved DDPM / DiT).")
    fixed_point: bool = _flag(True, "FPDM (pre blocks, one implicit fixed-point block, post blocks; Sec. 3.2); False: a DiT.")
    fixed_point_pre_depth: int = _flag(1, "Explicit blocks before the fixed-point block (alias --deq_pre_depth).")
    fixed_point_post_depth: int = _flag(1, "Explicit blocks after the fixed-point block (alias --deq_post_depth).")
    fixed_point_no_grad_min_iters: int = _flag(0, "S-JFB: lower bound of n, the iterations run without gradient.")
    fixed_point_no_grad_max_iters: int = _flag(12, "S-JFB: upper bound N of the iterations run without gradient.")
    fixed_point_with_grad_min_iters: int = _flag(1, "S-JFB: lower bound of m, the iterations backpropagated through.")
    fixed_point_with_grad_max_iters: int = _flag(12, "S-JFB: upper bound M of the iterations backpropagated through.")
    fixed_point_pre_post_timestep_conditioning: bool = _flag(
        False, "Condition the pre/post blocks on the timestep too (the paper keeps them timestep-independent).")
    predict_v: bool = _flag(False, "Predict velocity v instead of noise (Salimans & Ho).")
    predict_xstart: bool = _flag(False, "Predict x0 instead of noise.")
    use_zero_terminal_snr: bool = _flag(False, "Rescale the schedule to zero terminal SNR (Lin et al. 2023).")
    noise_schedule: str = _flag("linear", "Beta schedule: linear or cosine.")
    diffusion_steps: int = _flag(1000, "Number of diffusion timesteps T.")
    v_loss_weighting: str = _flag("v_mse", "v-prediction loss: v_mse (plain MSE on v) or authors (their released loss).")

    @property
    def input_size(self) -> int:
        """Spatial size of the model input: pixels, or latents at 1/8 resolution."""
        return self.image_size // 8 if self.latent else self.image_size

    def create_diffusion(self, timestep_respacing: str | None = ""):
        """Build the Gaussian diffusion this config describes, with the given timestep respacing."""
        from diffusion import create_diffusion
        return create_diffusion(
            timestep_respacing, noise_schedule=self.noise_schedule, predict_xstart=self.predict_xstart,
            learn_sigma=self.learn_sigma, diffusion_steps=self.diffusion_steps, predict_v=self.predict_v,
            use_zero_terminal_snr=self.use_zero_terminal_snr, v_loss_weighting=self.v_loss_weighting)


@dataclass
class TrainConfig:
    """Training run: data, optimisation, logging and checkpointing."""
    dataset: str = _flag("digits", "digits (built-in), latents (from extract_features.py) or imagefolder.")
    feature_path: str = _flag("", "Folder written by extract_features.py (--dataset latents).")
    data_path: str = _flag("", "Folder of class sub-folders of images (--dataset imagefolder).")
    vae: str = _flag("", "AutoencoderKL path or hub name for --dataset imagefolder in latent space ('' = pixel space).")
    global_batch_size: int = _flag(64, "Batch size summed over all processes.")
    lr: float = _flag(1e-4, "AdamW learning rate (paper: 1e-4, no weight decay).")
    weight_decay: float = _flag(0.0, "AdamW weight decay.")
    epochs: int = _flag(1400, "Epochs over the dataset (training also stops at --max_steps).")
    max_steps: int = _flag(1000, "Stop after this many optimizer steps (0: no cap; the default keeps a CPU run to minutes).")
    ema_decay: float = _flag(0.9999, "EMA decay of the weights (paper: 0.9999).")
    ema_warmup: bool = _flag(True, "Use decay min(ema_decay, (1+step)/(10+step)) so short runs get a useful EMA.")
    global_seed: int = _flag(0, "Seed; each process uses global_seed * world_size + rank.")
    ckpt_every: int = _flag(1000, "Write a checkpoint every this many steps (and at the end).")
    log_every: int = _flag(100, "Log metrics every this many steps.")
    log_with: str = _flag("none", "Tracker: none, wandb or tensorboard.")
    output_dir: str = _flag("results", "Folder holding the run folders.")
    output_subdir: str = _flag("", "Run folder name inside --output_dir (default: derived from the model and a counter).")
    resume: str = _flag("", "Checkpoint to resume from (a .pt file, or a run folder: its checkpoints/latest.pt).")
    compile: bool = _flag(False, "torch.compile each transformer block (the fixed-point loop reuses one graph).")
    grad_checkpointing: bool = _flag(False, "Non-reentrant gradient checkpointing of the explicit blocks.")
    num_workers: int = _flag(0, "DataLoader worker processes.")
    sample_grid: bool = _flag(True, "Write a grid of EMA samples to the run folder at the end of training.")


@dataclass
class SampleConfig:
    """Sampling: checkpoint, sampler, compute allocation across timesteps (Sec. 3.3) and outputs."""
    ckpt: str = _flag("", "Checkpoint (.pt from train.py, or .safetensors); default: the bundled digits FPDM.")
    use_ema: bool = _flag(True, "Use the EMA weights of a training checkpoint.")
    vae: str = _flag("ema", "AutoencoderKL for latent models: a local path or hub name (ema/mse: stabilityai/sd-vae-ft-*).")
    cfg_scale: float = _flag(4.0, "Classifier-free guidance scale (1.0: no guidance).")
    cfg_channels: str = _flag("3", "Guide the first k mean channels as DiT/FPDM do (3), or 'all' for the standard form.")
    num_sampling_steps: int = _flag(250, "Denoising steps (timesteps visited).")
    ddim: bool = _flag(False, "Sample with DDIM instead of DDPM.")
    ddim_eta: float = _flag(0.0, "DDIM eta (0: deterministic).")
    timestep_spacing: str = _flag("default", "default (DiT's even spacing) or trailing (always visits t = T-1).")
    seed: int = _flag(0, "Global seed: image i uses seed + i, whatever the batch size or number of processes.")
    num_samples: int = _flag(16, "Number of images to draw (sample.py).")
    class_labels: str = _flag("", "Comma-separated class labels, cycled over images (default: image i gets class i mod num_classes).")
    output_dir: str = _flag("samples", "Folder for individual PNGs and the grid (sample.py).")
    batch_size: int = _flag(32, "Images per forward batch (sample.py).")
    fixed_point_iters: int = _flag(0, "Fixed-point iterations per timestep (0: the model's training maximum n+m).")
    fixed_point_reuse_solution: bool = _flag(False, "Start each timestep's iteration from the previous solution (Sec. 3.3).")
    budget: int = _flag(0, "Total transformer-block forward passes per image (0: derived from steps and iterations).")
    iteration_schedule: str = _flag("fixed", "Iterations across timesteps: fixed, increasing, decreasing or adaptive.")
    fixed_point_tol: float = _flag(1e-3, "adaptive schedule: stop a timestep when the relative residual is below this.")
    fixed_point_solver: str = _flag("iteration", "iteration (plain fixed-point iteration) or anderson.")
    anderson_memory: int = _flag(5, "Anderson acceleration: number of past iterates mixed.")
    diagnostics: str = _flag("", "Write per-timestep residuals (the paper's delta_t, Fig. 6) to this JSON file.")
    device: str = _flag("auto", "auto, cpu or cuda.")


@dataclass
class SampleDDPConfig(SampleConfig):
    """Many-sample generation for FID: per-image seeds across processes, resumable, packed to an ADM .npz."""
    num_fid_samples: int = _flag(50_000, "Number of images to generate across all processes.")
    sample_dir: str = _flag("samples", "Folder holding the run's PNGs and the packed .npz.")
    per_proc_batch_size: int = _flag(32, "Images per forward batch on each process.")
    global_seed: int = _flag(0, "Global seed: image i uses global_seed + i.")


#################################################################################
#                                Flag parsing                                   #
#################################################################################

FLAG_ALIASES = {
    "fixed_point_pre_depth": ["--deq_pre_depth"],
    "fixed_point_post_depth": ["--deq_post_depth"],
}


def parse_bool(value: str | bool) -> bool:
    """Parse True/False spellings used on command lines (True, false, 1, 0, yes, no)."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def _field_type(cls: type, f: dataclasses.Field) -> type:
    """Resolve a field's annotation (string annotations under `from __future__ import annotations`)."""
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_config_args(parser: argparse.ArgumentParser, cls: type, *, defaults_from_config: bool = True,
                    skip: Sequence[str] = ()) -> None:
    """Add one flag per field of dataclass `cls`; defaults_from_config=False makes every default None ('not given')."""
    group = parser.add_argument_group(cls.__name__)
    for f in fields(cls):
        if f.name in skip:
            continue
        names = [f"--{f.name}"]
        if "_" in f.name:
            names.append(f"--{f.name.replace('_', '-')}")
        names += FLAG_ALIASES.get(f.name, [])
        kind = _field_type(cls, f)
        default = f.default if defaults_from_config else None
        kwargs: dict[str, Any] = dict(dest=f.name, default=default, help=f.metadata.get("help", "").replace("%", "%%"))
        if kind is bool:
            kwargs.update(type=parse_bool, nargs="?", const=True, metavar="True|False")
        else:
            kwargs.update(type=kind)
        group.add_argument(*names, **kwargs)


def make_parser(description: str, *configs: type, partial: Sequence[type] = ()) -> argparse.ArgumentParser:
    """A parser with flags for each config class; classes in `partial` default to None so 'given' is detectable."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    seen: set[str] = set()
    for cls in configs:
        add_config_args(parser, cls, skip=seen)
        seen |= {f.name for f in fields(cls)}
    for cls in partial:
        add_config_args(parser, cls, defaults_from_config=False, skip=seen)
        seen |= {f.name for f in fields(cls)}
    return parser


def config_from_args(cls: type, args: argparse.Namespace, base: Any = None) -> Any:
    """Build `cls` from parsed flags; fields left None (not given) keep their value in `base` (or the default)."""
    values = asdict(base) if base is not None else {}
    for f in fields(cls):
        if f.name in vars(args) and getattr(args, f.name) is not None:
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def given_fields(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` that were given on the command line (parsed with defaults_from_config=False)."""
    return {f.name: getattr(args, f.name) for f in fields(cls)
            if f.name in vars(args) and getattr(args, f.name) is not None}


def config_diff(expected: dict[str, Any], actual: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two (possibly nested) config dicts, one 'field: a != b' per field."""
    differences = []
    for key in sorted(set(expected) | set(actual)):
        a, b = expected.get(key, "<absent>"), actual.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            differences += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            differences.append(f"{prefix}{key}: {a!r} != {b!r}")
    return differences


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """Rebuild a ModelConfig from a checkpoint's dict, refusing fields this version does not know."""
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"checkpoint config has fields this code does not know: {unknown}")
    return ModelConfig(**values)
