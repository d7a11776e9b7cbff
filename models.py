"""
DiT and Fixed Point Diffusion Models (FPDM) in one model file.

- `DiT` is the Diffusion Transformer (Peebles & Xie, 2023): patch embedding, fixed 2-D sin-cos position embedding,
  timestep and class embedders, adaLN-Zero transformer blocks, final adaLN layer, unpatchify.
- `FPDM(DiT)` is the Fixed Point Diffusion Model (Bai & Melas-Kyriazi, CVPR 2024, Sec. 3.2): explicit pre blocks,
  one implicit fixed-point block solved by iteration, explicit post blocks. Called in train mode with gradients
  and no iteration counts it runs Stochastic Jacobian-Free Backpropagation (S-JFB, Sec. 3.4 / Algorithm 1), or,
  with fixed_point_grad, phantom or implicit-function-theorem gradients (beyond the paper).
- `DiT_models[name](fixed_point=True, ...)` builds the FPDM of a registry name; `create_model(config)` builds either
  from a ModelConfig.

Both return a Tensor when called; `forward_with_stats` also returns a `FixedPointStats` (what the fixed-point stage
did), so samplers treat DiT and FPDM alike. State-dict keys equal those of the official DiT and of the authors' FPDM
code, so their checkpoints load strict. The model keeps no state between calls: iteration counts, initial solutions
(solution reuse, Sec. 3.3) and solver statistics are arguments and return values.
"""

import functools
from functools import partial
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from cost import ARCHITECTURES, Architecture, fpdm_default_iters, fpdm_step_blocks
from solvers import SolverStats, get_solver, implicit_gradient, relative_residual

from config import GRADIENT_METHODS, UserError


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation: x (N, T, D) scaled by (1 + scale) and shifted by shift, both (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                 Transformer Layers: Patch Embed, Attention, MLP               #
#################################################################################
# Parameter names follow timm's PatchEmbed / Attention / Mlp so that DiT checkpoints load unchanged.

class PatchEmbed(nn.Module):
    """Splits an image into non-overlapping patches and embeds each one linearly (a strided convolution)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)                      # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)   # (N, T, D), tokens in row-major order


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, via F.scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden_size ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                      # 3 x (N, H, T, Dh)
        x = F.scaled_dot_product_attention(q, k, v)                         # (N, H, T, Dh)
        x = x.transpose(1, 2).reshape(N, T, D)                              # (N, T, D)
        return self.proj(x)


class Mlp(nn.Module):
    """Two-layer feed-forward network with a tanh-approximated GELU (as in DiT)."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds scalar (possibly fractional) timesteps: sinusoidal features followed by a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """Sinusoidal features (N, dim) of timesteps t (N,): [cos(t * w_i), sin(t * w_i)], w_i = max_period^(-i/half)."""
        half = dim // 2
        exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half
        freqs = torch.exp(-math.log(max_period) * exponents)    # (half,)
        args = t.float()[:, None] * freqs[None, :]              # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
        if dim % 2 == 1:
            embedding = F.pad(embedding, (0, 1))                # (N, dim)
        return embedding

    def forward(self, t: Tensor) -> Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))              # (N, D)


class LabelEmbedder(nn.Module):
    """Embeds class labels; with dropout_prob > 0 it has an extra null-class row (index num_classes) for CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.has_null_class = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null_class), hidden_size)

    def token_drop(
        self, labels: Tensor, force_drop_ids: Optional[Tensor] = None, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """Replace labels by the null class: randomly with prob. dropout_prob, or where force_drop_ids == 1."""
        if not self.has_null_class:
            raise ValueError("label dropout needs a null class: class_dropout_prob must be > 0")
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device, generator=generator) < self.dropout_prob
        else:
            drop = force_drop_ids.to(labels.device) == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(
        self,
        labels: Tensor,
        train: bool,
        force_drop_ids: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids, generator)
        return self.embedding_table(labels)  # (N, D)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (shift, scale and gate for attention and MLP)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        # x: (N, T, D) tokens, c: (N, D) conditioning
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (N, T, D)


class FinalLayer(nn.Module):
    """Final adaLN-modulated LayerNorm and linear map from tokens to patches of output channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)  # (N, T, D)
        return self.linear(x)                           # (N, T, p * p * C_out)



@dataclass
class FixedPointStats:
    """What the fixed-point stage of one forward call did (returned by `forward_with_stats`).

    solution:  final iterate of the fixed-point block (N, T, D), detached; pass it as `init` at the next timestep for
               solution reuse (Sec. 3.3). None for a DiT.
    num_iters: fixed-point block evaluations in this call (no-grad + gradient-carrying); 0 for a DiT.
    residuals: batch-mean relative residual ||f(z) - z|| / ||f(z)|| after each evaluation; residuals[-1] is the
               paper's delta_t (Fig. 6).
    blocks:    transformer-block forward passes per image: pre + num_iters + post for FPDM, depth for DiT.
    """

    solution: Optional[Tensor]
    num_iters: int
    residuals: list[float] = field(default_factory=list)
    blocks: int = 0


def classifier_free_guidance(model_out: Tensor, cfg_scale: float, cfg_channels: Optional[int],
                             in_channels: int) -> Tensor:
    """Mix the conditional (first half) and unconditional (second half) rows of a (2N, C_out, H, W) prediction.

    out = uncond + s * (cond - uncond) on the first min(cfg_channels, in_channels) channels (None: all in_channels
    mean channels), written to both halves. DiT and the authors' FPDM guide 3 channels, needed to reproduce their
    numbers. Learned-sigma channels (>= in_channels) and unguided channels keep each half's own prediction.
    """
    if cfg_channels is not None and cfg_channels < 1:
        raise ValueError(f"cfg_channels must be a positive int or None (all) (got {cfg_channels!r})")
    num_guided = in_channels if cfg_channels is None else min(cfg_channels, in_channels)
    guided, rest = model_out[:, :num_guided], model_out[:, num_guided:]
    cond, uncond = guided.chunk(2, dim=0)                              # (N, num_guided, H, W) each
    mixed = uncond + cfg_scale * (cond - uncond)                       # (N, num_guided, H, W)
    return torch.cat([torch.cat([mixed, mixed], dim=0), rest], dim=1)  # (2N, C_out, H, W)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone (official constructor arguments).

    x -> patch embed + pos embed -> `depth` blocks conditioned on c = t_emb + y_emb -> final layer -> unpatchify.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if patch_size < 1 or input_size % patch_size != 0:
            raise ValueError(f"input_size (got {input_size}) must be divisible by patch_size (got {patch_size})")
        if hidden_size % num_heads != 0 or hidden_size % 4 != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}) and by 4 "
                             "(2-D sin-cos embedding)")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.learn_sigma = learn_sigma
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        # Fixed (non-trainable) 2-D sin-cos position embedding, a Parameter as in the official DiT.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self._build_blocks()
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def _build_blocks(self) -> None:
        """The transformer blocks (registered between the embedders and the final layer: state-dict key order)."""
        self.blocks = nn.ModuleList([self._new_block() for _ in range(self.depth)])

    def _new_block(self) -> DiTBlock:
        return DiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio)

    def all_blocks(self) -> list[DiTBlock]:
        """Every DiTBlock in execution order."""
        return list(self.blocks)

    def initialize_weights(self) -> None:
        """DiT initialisation (adaLN-Zero: every block starts as the identity, the output starts at zero)."""
        if self.pos_embed.is_meta:
            return  # built on the meta device (shapes only, e.g. to count parameters): there are no values to set

        def init_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(init_linear)
        pos_embed = get_2d_sincos_pos_embed(self.hidden_size, self.x_embedder.grid_size[0])  # (T, D)
        self.pos_embed.data.copy_(pos_embed.unsqueeze(0))
        # Patch embedding: initialise like a linear layer on the flattened patch.
        proj_weight = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(proj_weight.view(proj_weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: zero the last modulation layer of every block and the output layer. For FPDM this makes the
        # fixed-point block the identity, and the remaining map (the Xavier projection MLP) already contracts
        # (tests/test_models.py::test_fresh_fpdm_iteration_is_bounded_and_converges), so it keeps the same init.
        for block in self.all_blocks():
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(N, T, p * p * C_out) tokens -> (N, C_out, H, W) images."""
        p, h, N = self.patch_size, self.x_embedder.grid_size[0], x.shape[0]
        x = x.reshape(N, h, h, p, p, self.out_channels)  # (N, h, w, p, p, C)
        x = x.permute(0, 5, 1, 3, 2, 4)                  # (N, C, h, p, w, p)
        return x.reshape(N, self.out_channels, h * p, h * p)

    @property
    def null_class(self) -> int:
        """Label index of the unconditional (null) class used for classifier-free guidance."""
        return self.num_classes

    def compile_parts(self, **compile_kwargs: Any) -> None:
        """torch.compile every transformer block in place (state-dict keys unchanged); kwargs go to torch.compile.

        Compiling the whole forward of an FPDM would trace the fixed-point loop, whose length S-JFB draws anew
        every step (one graph per (n, m)); the parts compiled here have the same graph on every call.
        """
        for block in self.all_blocks():
            block.compile(**compile_kwargs)

    def _run_block(self, block: nn.Module, x: Tensor, c: Tensor) -> Tensor:
        """Run a block, with (non-reentrant) gradient checkpointing when enabled and gradients are on."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, c, use_reentrant=False)
        return block(x, c)

    def _embed(self, x: Tensor, t: Tensor, y: Optional[Tensor],
               label_dropout_generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Tokens (N, T, D), timestep embedding (N, D) and label embedding (N, D) or None (unconditional)."""
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (N, in_channels, input_size, input_size) = (N, {expected[0]}, "
                             f"{expected[1]}, {expected[2]}) (got {tuple(x.shape)})")
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape (N,) = ({x.shape[0]},) (got {tuple(t.shape)})")
        tokens = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = (H / p) * (W / p)
        t_emb = self.t_embedder(t)                    # (N, D)
        if self.y_embedder is None:
            return tokens, t_emb, None
        if y is None:
            raise ValueError(f"y (class labels) is required when num_classes > 0 (num_classes={self.num_classes})")
        return tokens, t_emb, self.y_embedder(y, self.training, generator=label_dropout_generator)  # y_emb (N, D)

    def forward(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None, *,
                label_dropout_generator: Optional[torch.Generator] = None) -> Tensor:
        """Predict (N, C_out, H, W) from x (N, C, H, W), timesteps t (N,) and labels y (N,) (None if unconditional).

        label_dropout_generator: RNG for training-time label dropout (None: torch's default generator).
        """
        tokens, t_emb, y_emb = self._embed(x, t, y, label_dropout_generator)
        c = t_emb if y_emb is None else t_emb + y_emb          # (N, D)
        for block in self.blocks:
            tokens = self._run_block(block, tokens, c)         # (N, T, D)
        return self.unpatchify(self.final_layer(tokens, c))    # (N, C_out, H, W)

    def forward_with_stats(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None, *, num_iters: Optional[int] = None,
                           init: Optional[Tensor] = None, tol: Optional[float] = None, solver: str = "iteration",
                           solver_options: Optional[dict[str, Any]] = None,
                           label_dropout_generator: Optional[torch.Generator] = None,
                           track_residuals: Optional[bool] = None) -> tuple[Tensor, FixedPointStats]:
        """forward() plus FixedPointStats; the fixed-point options are accepted (so samplers treat DiT and FPDM
        alike) and ignored: a DiT runs no iterations and costs `depth` blocks."""
        out = self.forward(x, t, y, label_dropout_generator=label_dropout_generator)
        return out, FixedPointStats(solution=None, num_iters=0, residuals=[], blocks=self.depth)

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float, cfg_channels: Optional[int] = 3,
                         **forward_kwargs: Any) -> Tensor:
        """Classifier-free guidance: x has 2N rows (conditional half, then unconditional half with null labels).

        Both halves run on the same noisy input (the first half of x); see `classifier_free_guidance` for the mix
        (cfg_channels None guides every mean channel). forward_kwargs go to forward().
        """
        if self.y_embedder is None or not self.y_embedder.has_null_class:
            raise ValueError("forward_with_cfg needs a class-conditional model (num_classes > 0) trained with a "
                             f"null class (class_dropout_prob > 0); got num_classes={self.num_classes}")
        if x.shape[0] % 2 != 0:
            raise ValueError(f"forward_with_cfg expects x with an even number of rows (got {x.shape[0]})")
        half = x[: x.shape[0] // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y, **forward_kwargs)  # (2N, C_out, H, W)
        return classifier_free_guidance(out, cfg_scale, cfg_channels, self.in_channels)


class FPDM(DiT):
    """Fixed Point Diffusion Model (Sec. 3.2); the DiT arguments plus the fixed-point ones.

    x -> patch embed + pos embed -> blocks_pre -> injection = block_pre_projection(x_pre)            (Eq. 2)
      -> z* = f(z*), f(z) = block_fixed_point(fc2(GELU(fc1(concat(z, injection)))), t + y)        (Eq. 3)
      -> blocks_post -> final layer -> unpatchify                                                  (Eq. 4)
    Pre/post blocks and the final layer are conditioned on the class only (timestep-independent, Sec. 3.2) unless
    fixed_point_pre_post_timestep_conditioning=True; unconditional + timestep-independent means a zero vector.
    `depth` is that of the same-named DiT: outside S-JFB training an FPDM runs depth - pre - post iterations by
    default (the DiT's block cost). The fixed_point_{no,with}_grad_{min,max}_iters bound S-JFB's n and m;
    fixed_point_grad picks what the gradient-carrying iterations backpropagate (sjfb, phantom or ift; see
    gradient_stage); it changes nothing without gradients (sampling).
    """

    def __init__(
        self,
        *,
        fixed_point_pre_depth: int = 1,
        fixed_point_post_depth: int = 1,
        fixed_point_no_grad_min_iters: int = 0,
        fixed_point_no_grad_max_iters: int = 12,
        fixed_point_with_grad_min_iters: int = 1,
        fixed_point_with_grad_max_iters: int = 12,
        fixed_point_pre_post_timestep_conditioning: bool = False,
        fixed_point_grad: str = "sjfb",
        fixed_point_phantom_steps: int = 5,
        fixed_point_phantom_damping: float = 0.5,
        fixed_point_ift_iters: int = 12,
        **dit_kwargs: Any,
    ):
        if fixed_point_pre_depth < 0 or fixed_point_post_depth < 0:  # the module layout depends on them
            raise ValueError(f"fixed_point_pre_depth and fixed_point_post_depth must be >= 0 "
                             f"(got {fixed_point_pre_depth}, {fixed_point_post_depth})")
        # Plain values may be set before nn.Module.__init__; DiT.__init__ calls _build_blocks, which reads them.
        self.fixed_point_pre_depth = fixed_point_pre_depth
        self.fixed_point_post_depth = fixed_point_post_depth
        self.fixed_point_no_grad_min_iters = fixed_point_no_grad_min_iters
        self.fixed_point_no_grad_max_iters = fixed_point_no_grad_max_iters
        self.fixed_point_with_grad_min_iters = fixed_point_with_grad_min_iters
        self.fixed_point_with_grad_max_iters = fixed_point_with_grad_max_iters
        self.fixed_point_pre_post_timestep_conditioning = fixed_point_pre_post_timestep_conditioning
        if fixed_point_grad not in GRADIENT_METHODS:
            raise ValueError(f"fixed_point_grad must be one of {', '.join(GRADIENT_METHODS)} (got {fixed_point_grad!r})")
        self.fixed_point_grad = fixed_point_grad
        self.fixed_point_phantom_steps = fixed_point_phantom_steps
        self.fixed_point_phantom_damping = fixed_point_phantom_damping
        self.fixed_point_ift_iters = fixed_point_ift_iters
        super().__init__(**dit_kwargs)

    def _build_blocks(self) -> None:
        D = self.hidden_size
        self.blocks_pre = nn.ModuleList([self._new_block() for _ in range(self.fixed_point_pre_depth)])
        self.block_pre_projection = nn.Linear(D, D)  # input injection (Eq. 2)
        # Fixed-point map: concat(z, injection) (2D) -> Linear 2D->2D -> GELU -> Linear 2D->D -> DiT block.
        self.block_fixed_point_projection_fc1 = nn.Linear(2 * D, 2 * D)
        self.block_fixed_point_projection_act = nn.GELU(approximate="tanh")
        self.block_fixed_point_projection_fc2 = nn.Linear(2 * D, D)
        self.block_fixed_point = self._new_block()
        self.blocks_post = nn.ModuleList([self._new_block() for _ in range(self.fixed_point_post_depth)])

    def all_blocks(self) -> list[DiTBlock]:
        """Every DiTBlock in execution order: pre blocks, the fixed-point block, post blocks."""
        return [*self.blocks_pre, self.block_fixed_point, *self.blocks_post]

    @property
    def default_num_iters(self) -> int:
        """Iterations when none are given outside S-JFB training: the same-named DiT's block cost (cost.py)."""
        return fpdm_default_iters(self.depth, self.fixed_point_pre_depth, self.fixed_point_post_depth)

    def iteration_counts(self, num_iters: Optional[int], num_no_grad_iters: Optional[int],
                         sjfb_generator: Optional[torch.Generator] = None) -> tuple[int, int]:
        """(n, m): iterations without gradient, then in the ambient grad mode.

        In train mode with gradients and no count given: the training draw (draw_training_iters). Otherwise n
        defaults to 0 and m to default_num_iters.
        """
        if num_iters is None and num_no_grad_iters is None and self.training and torch.is_grad_enabled():
            return draw_training_iters(self, sjfb_generator)
        return (num_no_grad_iters or 0), (self.default_num_iters if num_iters is None else num_iters)

    def compile_parts(self, **compile_kwargs: Any) -> None:
        """torch.compile the explicit blocks and the whole fixed-point map (projection + block) as one callable.

        The map is compiled once and reused by every iteration: its graph does not depend on (n, m), so a run
        compiles it at most twice (the no-grad and the gradient-carrying iterations; see solve_fixed_point). The
        compiled callable is the unbound method, called with the model as an argument, so a deep copy of the model
        never runs with the original's weights; no module is added (state-dict keys unchanged).
        """
        for block in [*self.blocks_pre, *self.blocks_post]:
            block.compile(**compile_kwargs)
        self._compiled_fixed_point_map = torch.compile(FPDM.fixed_point_map, **compile_kwargs)

    def fixed_point_map(self, z: Tensor, injection: Tensor, c: Tensor) -> Tensor:
        """One evaluation of the implicit layer f(z) = block(fc2(GELU(fc1(concat(z, injection)))), c) (Sec. 3.2)."""
        h = torch.cat([z, injection], dim=-1)            # (N, T, 2D)
        h = self.block_fixed_point_projection_fc1(h)      # (N, T, 2D)
        h = self.block_fixed_point_projection_act(h)      # (N, T, 2D)
        h = self.block_fixed_point_projection_fc2(h)      # (N, T, D)
        return self.block_fixed_point(h, c)               # (N, T, D)

    def solve_fixed_point(self, z0: Tensor, injection: Tensor, c: Tensor, num_no_grad_iters: int, num_iters: int,
                          tol: Optional[float] = None, solver: str = "iteration",
                          solver_options: Optional[dict[str, Any]] = None,
                          track_residuals: bool = True) -> tuple[Tensor, SolverStats]:
        """The fixed-point stage (Algorithm 1): n iterations under torch.no_grad(), then m in the ambient mode
        (gradient_stage).

        The start z0 is detached: gradients reach the implicit layer only through the last m iterations (and the
        pre blocks via the injection). With grad_checkpointing each gradient-carrying iteration is checkpointed.
        track_residuals=False (training) computes no residuals unless `tol` needs them.
        """
        solve, options = get_solver(solver), solver_options or {}
        compiled = self.__dict__.get("_compiled_fixed_point_map")  # set by compile_parts
        fixed_point_map = self.fixed_point_map if compiled is None else functools.partial(compiled, self)

        def f(z: Tensor) -> Tensor:
            if self.grad_checkpointing and torch.is_grad_enabled():
                fz = checkpoint(fixed_point_map, z, injection, c, use_reentrant=False)
            else:
                fz = fixed_point_map(z, injection, c)
            return fz.to(z.dtype)  # the iterate keeps z0's dtype: fp32 under bf16 autocast (residuals, reuse)

        z0 = z0.detach()
        if compiled is not None:
            # The compiled map guards on its input's strides: the pre blocks' output keeps the patch embedding's
            # transposed layout while the map returns contiguous tokens, so the first call would get a graph of its own.
            z0 = z0.contiguous()
        with torch.no_grad():
            z, no_grad_stats = solve(f, z0, num_no_grad_iters, tol, track_residuals=track_residuals,
                                     **options)                                          # (N, T, D), stores nothing
        if compiled is not None and torch.is_grad_enabled() and num_iters > 0:
            # It also guards on whether its input requires grad: the first gradient-carrying iteration would
            # otherwise get a graph of its own. A leaf that requires grad changes no parameter gradient.
            z = z.detach().requires_grad_(True)
        z, stats = self.gradient_stage(f, solve, z, num_iters, tol, track_residuals, options)  # (N, T, D)
        return z, SolverStats(num_iters=no_grad_stats.num_iters + stats.num_iters,
                              residuals=no_grad_stats.residuals + stats.residuals)

    def gradient_stage(self, f: Callable[[Tensor], Tensor], solve: Callable[..., tuple[Tensor, SolverStats]],
                       z: Tensor, num_iters: int, tol: Optional[float], track_residuals: bool,
                       options: dict[str, Any]) -> tuple[Tensor, SolverStats]:
        """The m evaluations of f after the no-grad ones. With gradients on, fixed_point_grad decides what they
        backpropagate:
          sjfb     all m, unrolled (S-JFB, Algorithm 1);
          phantom  m plain iterations whose gradient is that of damped steps z <- z + lambda (f(z) - z) (the
                   unrolled phantom gradient of Geng et al. 2021, evaluated along the plain iterates);
          ift      the first m - 1 without gradient, the last with the implicit function theorem's gradient
                   (solvers.implicit_gradient: the backward fixed point solved in fixed_point_ift_iters iterations).
        Without gradients (sampling, evaluation) every method runs m plain iterations.
        """
        method = self.fixed_point_grad if torch.is_grad_enabled() and num_iters > 0 else "sjfb"
        if method == "phantom":
            # Each step has a plain iteration's value f(z) and a damped step's gradient, (1 - lambda) z + lambda f(z):
            # the loss sees what sampling's plain iterations compute. Keeping the damped output taught an output
            # plain iterations never produce (digits, 67k units: FID 86 against S-JFB's 14 at 140 blocks); keeping
            # only the no-grad solution made the loss blind to the steps whose gradient it took (NaN by step 100).
            damping = self.fixed_point_phantom_damping

            def plain_value_damped_gradient(z: Tensor) -> Tensor:
                fz = f(z)                                      # (N, T, D)
                damped = z + damping * (fz - z)                # (N, T, D)
                return damped + (fz - damped).detach()         # value fz, gradient of the damped step

            return solve(plain_value_damped_gradient, z, num_iters, tol, track_residuals=track_residuals, **options)
        if method == "ift":
            with torch.no_grad():
                z, head = solve(f, z, num_iters - 1, tol, track_residuals=track_residuals, **options)
            z = z.detach().requires_grad_(True)
            fz = f(z)                                                   # (N, T, D), the one graph IFT keeps
            residuals = [relative_residual(fz, z).mean().item()] if track_residuals or tol is not None else []
            return implicit_gradient(fz, z, self.fixed_point_ift_iters), SolverStats(
                num_iters=head.num_iters + 1, residuals=head.residuals + residuals)
        return solve(f, z, num_iters, tol, track_residuals=track_residuals, **options)  # unrolled

    def forward(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None, **options: Any) -> Tensor:
        """Predict (N, C_out, H, W); the keyword options are those of forward_with_stats."""
        return self.forward_with_stats(x, t, y, **options)[0]

    def forward_with_stats(
        self,
        x: Tensor,
        t: Tensor,
        y: Optional[Tensor] = None,
        *,
        num_iters: Optional[int] = None,
        num_no_grad_iters: Optional[int] = None,
        init: Optional[Tensor] = None,
        tol: Optional[float] = None,
        solver: str = "iteration",
        solver_options: Optional[dict[str, Any]] = None,
        label_dropout_generator: Optional[torch.Generator] = None,
        sjfb_generator: Optional[torch.Generator] = None,
        track_residuals: Optional[bool] = None,
    ) -> tuple[Tensor, FixedPointStats]:
        """Predict (N, C_out, H, W) and report the fixed-point stage.

        num_iters:         m, iterations in the ambient grad mode (all iterations when sampling).
        num_no_grad_iters: n, iterations run first under torch.no_grad() (S-JFB; stores nothing).
                           Neither given, train mode, grads on: (n, m) drawn by S-JFB from `sjfb_generator` (None:
                           torch's default RNG). Otherwise n = 0 and m = default_num_iters by default.
        init:              starting iterate (N, T, D) (solution reuse, Sec. 3.3); None: the pre-block output.
        tol:               stop a stage once the largest relative residual in the batch is <= tol.
        solver:            a solvers.SOLVER_NAMES entry ("iteration"; "anderson" is no-grad only);
                           solver_options go to it (e.g. {"memory": 5} for Anderson).
        label_dropout_generator: RNG for training-time label dropout (None: torch's default generator).
        track_residuals:   record the residual after each iteration (FixedPointStats.residuals). None: in eval mode
                           only; training reads none, and skipping them saves a pass over the iterate per iteration
                           and a device sync per stage. A tolerance computes them whatever this says.
        """
        n, m = self.iteration_counts(num_iters, num_no_grad_iters, sjfb_generator)
        if track_residuals is None:
            track_residuals = not self.training
        tokens, t_emb, y_emb = self._embed(x, t, y, label_dropout_generator)
        c = t_emb if y_emb is None else t_emb + y_emb                  # (N, D): fixed-point block
        c_outer = self._pre_post_conditioning(t_emb, y_emb)             # (N, D): pre/post blocks, final layer
        for block in self.blocks_pre:
            tokens = self._run_block(block, tokens, c_outer)            # (N, T, D)
        injection = self.block_pre_projection(tokens)                   # (N, T, D), Eq. 2
        z0 = tokens if init is None else self._check_init(init, tokens)
        z, solver_stats = self.solve_fixed_point(z0, injection, c, n, m, tol, solver, solver_options,
                                                 track_residuals)                   # Eq. 3
        h = z
        for block in self.blocks_post:
            h = self._run_block(block, h, c_outer)                      # (N, T, D), Eq. 4
        out = self.unpatchify(self.final_layer(h, c_outer))             # (N, C_out, H, W)
        blocks = fpdm_step_blocks(self.fixed_point_pre_depth, solver_stats.num_iters, self.fixed_point_post_depth)
        return out, FixedPointStats(z.detach(), solver_stats.num_iters, solver_stats.residuals, blocks)

    def _pre_post_conditioning(self, t_emb: Tensor, y_emb: Optional[Tensor]) -> Tensor:
        """Conditioning (N, D) of the pre/post blocks and the final layer (timestep-independent by default)."""
        if self.fixed_point_pre_post_timestep_conditioning:
            return t_emb if y_emb is None else t_emb + y_emb
        return torch.zeros_like(t_emb) if y_emb is None else y_emb

    @staticmethod
    def _check_init(init: Tensor, tokens: Tensor) -> Tensor:
        if init.shape != tokens.shape:
            raise ValueError(f"init must have shape (N, T, D) = {tuple(tokens.shape)} (got {tuple(init.shape)})")
        return init.to(device=tokens.device, dtype=tokens.dtype)


FPDM_OPTIONS = tuple(name for name in inspect.signature(FPDM.__init__).parameters if name.startswith("fixed_point_"))
"""FPDM's constructor arguments beyond DiT's (the fixed_point_* fields of a ModelConfig)."""


#################################################################################
#                        Stochastic Jacobian-Free Backprop                      #
#################################################################################

def draw_training_iters(config: Any, generator: Optional[torch.Generator] = None) -> tuple[int, int]:
    """(n, m) of one training step: S-JFB's draw (draw_sjfb_iters); for fixed_point_grad phantom m is then
    fixed_point_phantom_steps, for ift 1 (the evaluation that carries the implicit gradient). Both counts are drawn
    whatever the method, so every method sees the same n at the same seed. `config`: an FPDM or a ModelConfig."""
    n, m = draw_sjfb_iters(config, generator)
    return n, {"sjfb": m, "phantom": config.fixed_point_phantom_steps, "ift": 1}[config.fixed_point_grad]


def draw_sjfb_iters(bounds: Any, generator: Optional[torch.Generator] = None) -> tuple[int, int]:
    """Draw S-JFB iteration counts (n, m): n ~ U{no_grad_min..no_grad_max}, m ~ U{with_grad_min..with_grad_max}.

    `bounds` is an FPDM or anything with the fixed_point_{no,with}_grad_{min,max}_iters attributes (e.g. a
    ModelConfig, which validates them). Bounds are inclusive (Algorithm 1); n is drawn first, then m, from
    `generator` (None: torch's default CPU generator).
    """
    device = generator.device if generator is not None else "cpu"

    def uniform(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=generator, device=device).item())

    n = uniform(bounds.fixed_point_no_grad_min_iters, bounds.fixed_point_no_grad_max_iters)
    m = uniform(bounds.fixed_point_with_grad_min_iters, bounds.fixed_point_with_grad_max_iters)
    return n, m


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_1d_sincos_pos_embed(embed_dim: int, positions: Tensor) -> Tensor:
    """(M,) positions -> (M, embed_dim) features [sin(pos * w_i), cos(pos * w_i)], w_i = 10000^(-i / (embed_dim/2))."""
    if embed_dim % 2 != 0:
        raise ValueError(f"embed_dim must be even (got {embed_dim})")
    half = embed_dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)  # (D/2,)
    angles = positions.reshape(-1).double()[:, None] * omega[None, :]       # (M, D/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)          # (M, D)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sin-cos embedding (grid_size**2, embed_dim) for row-major tokens.

    The first half of the channels encodes the column (x) coordinate, the second half the row (y) coordinate,
    matching the layout of the official DiT / MAE tables.
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")   # (G, G) each; token index = row * G + col
    emb_cols = get_1d_sincos_pos_embed(embed_dim // 2, cols)      # (G*G, D/2)
    emb_rows = get_1d_sincos_pos_embed(embed_dim // 2, rows)      # (G*G, D/2)
    return torch.cat([emb_cols, emb_rows], dim=1).float()         # (G*G, D)




#################################################################################
#                                   DiT Configs                                 #
#################################################################################

def _dit_or_fpdm(fixed_point: bool = False, **kwargs: Any) -> DiT:
    """A registry entry's DiT, or with fixed_point=True its FPDM (fixed_point_* keywords go to FPDM)."""
    return FPDM(**kwargs) if fixed_point else DiT(**kwargs)


def _registry_entry(arch: Architecture) -> partial:
    # Keywords of a partial are defaults: a caller's depth=... (ModelConfig.depth, --depth) overrides the preset's.
    return partial(_dit_or_fpdm, depth=arch.depth, hidden_size=arch.hidden_size, patch_size=arch.patch_size,
                   num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio)


class ModelRegistry(dict):
    """A dict of model constructors whose failed lookups raise a UserError listing the valid names."""

    def __missing__(self, name: str):
        raise UserError(f"--model: unknown model {name!r}; valid names: {', '.join(self)}")


DiT_models = ModelRegistry({name: _registry_entry(arch) for name, arch in ARCHITECTURES.items()})


def get_model_class(name: str):
    """Return the registry constructor `(**kwargs) -> DiT | FPDM` for a model name; UserError listing valid names."""
    return DiT_models[name]


def create_model(config: Any, grad_checkpointing: bool = False) -> DiT:
    """Build the network a ModelConfig describes: its registry DiT, or with config.fixed_point that name's FPDM."""
    kwargs = dict(input_size=config.input_size, in_channels=config.in_channels, num_classes=config.num_classes,
                  class_dropout_prob=config.class_dropout_prob, learn_sigma=config.learn_sigma,
                  grad_checkpointing=grad_checkpointing)
    if config.fixed_point:
        kwargs.update({name: getattr(config, name) for name in FPDM_OPTIONS})
    if config.depth is not None:
        kwargs["depth"] = config.depth
    return DiT_models[config.model](fixed_point=config.fixed_point, **kwargs)
