"""
DiT and Fixed Point Diffusion Models (FPDM) in one model file.

- `DiT(...)` is the Diffusion Transformer (Peebles & Xie, 2023): patch embedding, fixed 2-D sin-cos position
  embedding, timestep and class embedders, adaLN-Zero transformer blocks, final adaLN layer, unpatchify.
- `DiT(..., fixed_point=True)` is FPDM (Bai & Melas-Kyriazi, CVPR 2024, Sec. 3.2): explicit pre blocks, one implicit
  fixed-point block solved by iteration, explicit post blocks. It is trained with Stochastic Jacobian-Free
  Backpropagation (S-JFB, Sec. 3.4 / Algorithm 1): `forward(..., num_no_grad_iters=n, num_fixed_point_iters=m)`,
  with (n, m) drawn by `draw_sjfb_iters`.

State-dict keys equal those of the official DiT and of the authors' FPDM code, so their checkpoints load strict.
The model keeps no state between calls: iteration counts, initial solutions (solution reuse, Sec. 3.3) and
solver statistics are arguments and return values.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from solvers import SOLVERS, SolverStats


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
class FixedPointState:
    """What the fixed-point stage of one forward call did (returned with return_fixed_point_state=True).

    solution:  final iterate of the fixed-point block (N, T, D), detached; pass it as `fixed_point_init` at the next
               timestep for solution reuse (Sec. 3.3). None for a plain DiT.
    num_iters: fixed-point block evaluations in this call (no-grad + ambient-mode iterations).
    residuals: batch-mean relative residual ||f(z) - z|| / ||f(z)|| after each evaluation; residuals[-1] is the
               paper's delta_t (Fig. 6).
    blocks:    transformer-block forward passes per image: pre + num_iters + post for FPDM, depth for DiT.
    """

    solution: Optional[Tensor]
    num_iters: int
    residuals: list[float] = field(default_factory=list)
    blocks: int = 0


def validate_sjfb_bounds(
    no_grad_min_iters: int, no_grad_max_iters: int, with_grad_min_iters: int, with_grad_max_iters: int
) -> None:
    """Raise ValueError (naming the flag) unless 0 <= no-grad min <= max and 1 <= with-grad min <= max."""
    if no_grad_min_iters < 0:
        raise ValueError(f"fixed_point_no_grad_min_iters must be >= 0 (got {no_grad_min_iters})")
    if no_grad_max_iters < no_grad_min_iters:
        raise ValueError(
            f"fixed_point_no_grad_max_iters ({no_grad_max_iters}) must be >= "
            f"fixed_point_no_grad_min_iters ({no_grad_min_iters})"
        )
    if with_grad_min_iters < 1:
        raise ValueError(f"fixed_point_with_grad_min_iters must be >= 1 (got {with_grad_min_iters})")
    if with_grad_max_iters < with_grad_min_iters:
        raise ValueError(
            f"fixed_point_with_grad_max_iters ({with_grad_max_iters}) must be >= "
            f"fixed_point_with_grad_min_iters ({with_grad_min_iters})"
        )


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone; `fixed_point=True` turns it into an FPDM (Sec. 3.2).

    DiT:  x -> patch embed + pos embed -> `depth` blocks (conditioned on t + y) -> final layer -> unpatchify.
    FPDM: x -> patch embed + pos embed -> blocks_pre -> injection = block_pre_projection(x_pre)
             -> z* = f(z*) with f(z) = block_fixed_point(fc2(GELU(fc1(concat(z, injection)))), t + y)
             -> blocks_post -> final layer -> unpatchify.
          `depth` is ignored. Pre/post blocks and the final layer are conditioned on the class only (they are
          timestep-independent, Sec. 3.2), unless fixed_point_pre_post_timestep_conditioning=True (then t + y);
          unconditional + timestep-independent means a zero conditioning vector.
    The fixed_point_* S-JFB bounds are used by `draw_sjfb_iters` and to default `num_fixed_point_iters`.
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
        fixed_point: bool = False,
        fixed_point_pre_depth: int = 1,
        fixed_point_post_depth: int = 1,
        fixed_point_no_grad_min_iters: int = 0,
        fixed_point_no_grad_max_iters: int = 12,
        fixed_point_with_grad_min_iters: int = 1,
        fixed_point_with_grad_max_iters: int = 12,
        fixed_point_pre_post_timestep_conditioning: bool = False,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if patch_size < 1 or input_size % patch_size != 0:
            raise ValueError(
                f"input_size (image_size / 8 for latents; got {input_size}) must be divisible by "
                f"patch_size (got {patch_size})"
            )
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if hidden_size % 4 != 0:
            raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos embedding (got {hidden_size})")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional; got {num_classes})")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1) (got {class_dropout_prob})")
        if depth < 0:
            raise ValueError(f"depth must be >= 0 (got {depth})")
        for flag, value in (("fixed_point_pre_depth", fixed_point_pre_depth),
                            ("fixed_point_post_depth", fixed_point_post_depth)):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0 (got {value})")
        validate_sjfb_bounds(fixed_point_no_grad_min_iters, fixed_point_no_grad_max_iters,
                             fixed_point_with_grad_min_iters, fixed_point_with_grad_max_iters)

        # Configuration, stored under the constructor's (= the command-line flags') names.
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.learn_sigma = learn_sigma
        self.fixed_point = fixed_point
        self.depth = depth
        self.fixed_point_pre_depth = fixed_point_pre_depth
        self.fixed_point_post_depth = fixed_point_post_depth
        self.fixed_point_no_grad_min_iters = fixed_point_no_grad_min_iters
        self.fixed_point_no_grad_max_iters = fixed_point_no_grad_max_iters
        self.fixed_point_with_grad_min_iters = fixed_point_with_grad_min_iters
        self.fixed_point_with_grad_max_iters = fixed_point_with_grad_max_iters
        self.fixed_point_pre_post_timestep_conditioning = fixed_point_pre_post_timestep_conditioning
        self.grad_checkpointing = grad_checkpointing

        # Embedders.
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if num_classes > 0:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        else:
            self.y_embedder = None
        num_patches = self.x_embedder.num_patches
        # Fixed (non-trainable) 2-D sin-cos position embedding, a Parameter as in the official DiT.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)

        # Transformer blocks.
        if fixed_point:
            self.blocks_pre = nn.ModuleList(
                [DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(fixed_point_pre_depth)]
            )
            # Input injection (Sec. 3.2, Eq. 2): a linear projection of the pre-block output.
            self.block_pre_projection = nn.Linear(hidden_size, hidden_size)
            # Fixed-point map: concat(z, injection) (2D) -> Linear 2D->2D -> GELU -> Linear 2D->D -> DiT block.
            self.block_fixed_point_projection_fc1 = nn.Linear(2 * hidden_size, 2 * hidden_size)
            self.block_fixed_point_projection_act = nn.GELU(approximate="tanh")
            self.block_fixed_point_projection_fc2 = nn.Linear(2 * hidden_size, hidden_size)
            self.block_fixed_point = DiTBlock(hidden_size, num_heads, mlp_ratio)
            self.blocks_post = nn.ModuleList(
                [DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(fixed_point_post_depth)]
            )
        else:
            self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    # ------------------------------------------------------------------------- #
    #                               Initialisation                              #
    # ------------------------------------------------------------------------- #

    def all_blocks(self) -> list[DiTBlock]:
        """Every DiTBlock in execution order (for FPDM: pre blocks, the fixed-point block, post blocks)."""
        if self.fixed_point:
            return [*self.blocks_pre, self.block_fixed_point, *self.blocks_post]
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

        grid_size = self.x_embedder.grid_size[0]
        pos_embed = get_2d_sincos_pos_embed(self.hidden_size, grid_size)  # (T, D)
        self.pos_embed.data.copy_(pos_embed.unsqueeze(0))

        # Patch embedding: initialise like a linear layer on the flattened patch.
        proj_weight = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(proj_weight.view(proj_weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: zero the last modulation layer of every block (including the fixed-point block).
        for block in self.all_blocks():
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

        # Stability of the fixed-point map at initialisation (Sec. 3.2). adaLN-Zero makes the fixed-point block the
        # identity, so the initial map is the random two-layer MLP f(z) = fc2(GELU(fc1(concat(z, injection)))), with
        # Jacobian J = W2 diag(GELU') W1[:, :D]. With Xavier weights a typical direction is shrunk by ~0.5 (W1's
        # z-columns keep the norm, GELU' averages ~0.6, W2 scales by sqrt(2/3)). Measured on fresh FPDMs with
        # D = 128 / 384 / 1152: spectral radius of J ~0.66 / 0.55 / 0.50, ||J||_2 ~1.46 / 1.34 / 1.29, and the
        # relative residual falls by a factor ~0.5-0.6 per iteration (1.6 -> 1e-7 within 30 iterations) while the
        # iterate norm stays bounded. The initial map is therefore already a contraction in practice, so the Xavier
        # initialisation of the projection is kept unchanged (a fresh FPDM matches the authors' initialisation);
        # tests/test_models.py checks that many iterations of a fresh FPDM stay bounded and converge.

    # ------------------------------------------------------------------------- #
    #                                  Helpers                                  #
    # ------------------------------------------------------------------------- #

    def unpatchify(self, x: Tensor) -> Tensor:
        """(N, T, p * p * C_out) tokens -> (N, C_out, H, W) images."""
        p = self.patch_size
        h = w = self.x_embedder.grid_size[0]
        N = x.shape[0]
        x = x.reshape(N, h, w, p, p, self.out_channels)  # (N, h, w, p, p, C)
        x = x.permute(0, 5, 1, 3, 2, 4)                  # (N, C, h, p, w, p)
        return x.reshape(N, self.out_channels, h * p, w * p)

    @property
    def null_class(self) -> int:
        """Label index of the unconditional (null) class used for classifier-free guidance."""
        return self.num_classes

    def _run_explicit_block(self, block: DiTBlock, x: Tensor, c: Tensor) -> Tensor:
        """Run an explicit (pre/post/DiT) block, with gradient checkpointing when enabled and grads are on."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, c, use_reentrant=False)
        return block(x, c)

    def _embed_inputs(
        self, x: Tensor, t: Tensor, y: Optional[Tensor], label_dropout_generator: Optional[torch.Generator]
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Validate inputs; return tokens (N, T, D), timestep embedding (N, D), label embedding (N, D) or None."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] != self.input_size \
                or x.shape[3] != self.input_size:
            raise ValueError(
                f"x must have shape (N, in_channels={self.in_channels}, input_size={self.input_size}, "
                f"input_size={self.input_size}) (got {tuple(x.shape)})"
            )
        N = x.shape[0]
        if t.ndim == 0:
            t = t.expand(N)
        if t.shape != (N,):
            raise ValueError(f"t must have shape (N,) = ({N},) (got {tuple(t.shape)})")
        tokens = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = (H / p) * (W / p)
        t_emb = self.t_embedder(t)                    # (N, D)
        if self.y_embedder is None:
            return tokens, t_emb, None
        if y is None:
            raise ValueError(f"y (class labels) is required when num_classes > 0 (num_classes={self.num_classes})")
        y_emb = self.y_embedder(y, self.training, generator=label_dropout_generator)  # (N, D)
        return tokens, t_emb, y_emb

    # ------------------------------------------------------------------------- #
    #                                  Forward                                  #
    # ------------------------------------------------------------------------- #

    def fixed_point_map(self, z: Tensor, injection: Tensor, c: Tensor) -> Tensor:
        """One evaluation of the implicit layer f(z) = block(fc2(GELU(fc1(concat(z, injection)))), c) (Sec. 3.2)."""
        h = torch.cat([z, injection], dim=-1)            # (N, T, 2D)
        h = self.block_fixed_point_projection_fc1(h)      # (N, T, 2D)
        h = self.block_fixed_point_projection_act(h)      # (N, T, 2D)
        h = self.block_fixed_point_projection_fc2(h)      # (N, T, D)
        return self.block_fixed_point(h, c)               # (N, T, D)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Optional[Tensor] = None,
        *,
        num_fixed_point_iters: Optional[int] = None,
        num_no_grad_iters: int = 0,
        fixed_point_init: Optional[Tensor] = None,
        fixed_point_tol: Optional[float] = None,
        fixed_point_solver: str = "iteration",
        anderson_memory: int = 5,
        return_fixed_point_state: bool = False,
        label_dropout_generator: Optional[torch.Generator] = None,
    ) -> Union[Tensor, tuple[Tensor, FixedPointState]]:
        """Predict (N, C_out, H, W) from x (N, C, H, W), timesteps t (N,) and labels y (N,) (None if unconditional).

        Fixed-point keywords (FPDM only; accepted and ignored by a plain DiT so samplers can treat both alike):
          num_no_grad_iters:     iterations run first under torch.no_grad() (S-JFB's n; stores nothing).
          num_fixed_point_iters: iterations run next in the ambient grad mode (S-JFB's m when training, all iterations
                                 when sampling). None -> fixed_point_with_grad_max_iters + fixed_point_no_grad_max_iters.
          fixed_point_init:      starting iterate (N, T, D) (solution reuse, Sec. 3.3); None -> the pre-block output.
                                 The starting iterate is always detached: gradients reach the implicit layer only
                                 through the ambient-mode iterations (and reach the pre blocks via the injection).
          fixed_point_tol:       stop a stage early once max over the batch of the relative residual <= tol.
          fixed_point_solver:    "iteration" or "anderson" (each f evaluation = one block pass); "anderson" has no
                                 backward, so its ambient-mode iterations require torch.no_grad() (ValueError else).
          anderson_memory:       number of past residual differences Anderson mixes (ignored by "iteration").
          return_fixed_point_state: also return a FixedPointState.
        label_dropout_generator: RNG for training-time label dropout (None -> torch's default generator).
        """
        tokens, t_emb, y_emb = self._embed_inputs(x, t, y, label_dropout_generator)
        cond = t_emb if y_emb is None else t_emb + y_emb  # (N, D)

        if not self.fixed_point:
            for block in self.blocks:
                tokens = self._run_explicit_block(block, tokens, cond)  # (N, T, D)
            out = self.unpatchify(self.final_layer(tokens, cond))     # (N, C_out, H, W)
            if return_fixed_point_state:
                return out, FixedPointState(solution=None, num_iters=0, residuals=[], blocks=self.depth)
            return out

        # FPDM: pre/post blocks and final layer are timestep-independent by default (Sec. 3.2).
        if self.fixed_point_pre_post_timestep_conditioning:
            cond_pre_post = cond
        elif y_emb is not None:
            cond_pre_post = y_emb
        else:
            cond_pre_post = torch.zeros_like(t_emb)

        for block in self.blocks_pre:
            tokens = self._run_explicit_block(block, tokens, cond_pre_post)  # (N, T, D)
        injection = self.block_pre_projection(tokens)                          # (N, T, D), Eq. 2
        z0 = tokens if fixed_point_init is None else self._check_fixed_point_init(fixed_point_init, tokens)

        z, stats = self.solve_fixed_point(
            z0, injection, cond,
            num_fixed_point_iters=num_fixed_point_iters,
            num_no_grad_iters=num_no_grad_iters,
            fixed_point_tol=fixed_point_tol,
            fixed_point_solver=fixed_point_solver,
            anderson_memory=anderson_memory,
        )                                                                      # (N, T, D), Eq. 3

        h = z
        for block in self.blocks_post:
            h = self._run_explicit_block(block, h, cond_pre_post)             # (N, T, D), Eq. 4
        out = self.unpatchify(self.final_layer(h, cond_pre_post))              # (N, C_out, H, W)
        if not return_fixed_point_state:
            return out
        state = FixedPointState(
            solution=z.detach(),
            num_iters=stats.num_iters,
            residuals=stats.residuals,
            blocks=self.fixed_point_pre_depth + stats.num_iters + self.fixed_point_post_depth,
        )
        return out, state

    def _check_fixed_point_init(self, fixed_point_init: Tensor, tokens: Tensor) -> Tensor:
        if fixed_point_init.shape != tokens.shape:
            raise ValueError(
                f"fixed_point_init must have shape (N, T, D) = {tuple(tokens.shape)} (got {tuple(fixed_point_init.shape)})"
            )
        return fixed_point_init.to(device=tokens.device, dtype=tokens.dtype)

    def solve_fixed_point(
        self,
        z0: Tensor,
        injection: Tensor,
        c: Tensor,
        *,
        num_fixed_point_iters: Optional[int] = None,
        num_no_grad_iters: int = 0,
        fixed_point_tol: Optional[float] = None,
        fixed_point_solver: str = "iteration",
        anderson_memory: int = 5,
    ) -> tuple[Tensor, SolverStats]:
        """S-JFB fixed-point stage (Algorithm 1): n iterations under torch.no_grad(), then m in the ambient mode."""
        if fixed_point_solver not in SOLVERS:
            raise ValueError(f"fixed_point_solver must be one of {sorted(SOLVERS)} (got {fixed_point_solver!r})")
        if num_fixed_point_iters is None:
            num_fixed_point_iters = self.fixed_point_with_grad_max_iters + self.fixed_point_no_grad_max_iters
        if num_fixed_point_iters < 0:
            raise ValueError(f"num_fixed_point_iters must be >= 0 (got {num_fixed_point_iters})")
        if num_no_grad_iters < 0:
            raise ValueError(f"num_no_grad_iters must be >= 0 (got {num_no_grad_iters})")
        if fixed_point_tol is not None and not fixed_point_tol > 0:
            raise ValueError(f"fixed_point_tol must be > 0 or None (got {fixed_point_tol})")
        if fixed_point_solver == "anderson" and torch.is_grad_enabled() and num_fixed_point_iters > 0:
            raise ValueError(
                "fixed_point_solver='anderson' cannot be backpropagated through: call the model under "
                "torch.no_grad() (sampling) or use fixed_point_solver='iteration' (training)"
            )
        if anderson_memory < 1:
            raise ValueError(f"anderson_memory must be >= 1 (got {anderson_memory})")
        solver_options = {"memory": anderson_memory} if fixed_point_solver == "anderson" else {}

        def solve(f, z, max_iters):
            return SOLVERS[fixed_point_solver](f, z, max_iters, tol=fixed_point_tol, **solver_options)

        def f(z: Tensor) -> Tensor:
            return self.fixed_point_map(z, injection, c)

        # The starting point carries no gradient (JFB: gradients flow only through the ambient-mode iterations).
        z = z0.detach()
        with torch.no_grad():
            z, no_grad_stats = solve(f, z, num_no_grad_iters)   # (N, T, D), stores nothing
        z, ambient_stats = solve(f, z, num_fixed_point_iters)       # (N, T, D), unrolled when grads are on
        return z, SolverStats(
            num_iters=no_grad_stats.num_iters + ambient_stats.num_iters,
            residuals=no_grad_stats.residuals + ambient_stats.residuals,
        )

    def forward_with_cfg(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        cfg_scale: float,
        cfg_channels: Union[int, str] = 3,
        **fixed_point_kwargs: Any,
    ) -> Union[Tensor, tuple[Tensor, FixedPointState]]:
        """Classifier-free guidance: x has 2N rows (conditional half, then unconditional half with null labels).

        Both halves are run on the same noisy input (the first half of x). Guidance out = uncond + s * (cond - uncond)
        is applied to the first min(cfg_channels, in_channels) output channels (3 by default, as the official DiT and
        the authors' FPDM, needed to reproduce their numbers; "all" guides every mean channel). Learned-sigma channels
        are never guided.
        """
        if self.y_embedder is None:
            raise ValueError("forward_with_cfg needs a class-conditional model (num_classes > 0, got 0)")
        if not self.y_embedder.has_null_class:
            raise ValueError("forward_with_cfg needs a null class: build the model with class_dropout_prob > 0")
        if x.shape[0] % 2 != 0:
            raise ValueError(f"forward_with_cfg expects x with an even number of rows (got {x.shape[0]})")
        if isinstance(cfg_channels, str) and cfg_channels.isdigit():
            cfg_channels = int(cfg_channels)  # e.g. from a command-line flag
        if cfg_channels == "all":
            num_guided = self.in_channels
        elif isinstance(cfg_channels, int) and not isinstance(cfg_channels, bool) and cfg_channels >= 1:
            num_guided = min(cfg_channels, self.in_channels)
        else:
            raise ValueError(f"cfg_channels must be a positive int or 'all' (got {cfg_channels!r})")

        half = x[: x.shape[0] // 2]
        combined = torch.cat([half, half], dim=0)  # (2N, C, H, W): shared noise for both halves
        result = self.forward(combined, t, y, **fixed_point_kwargs)
        model_out, state = result if isinstance(result, tuple) else (result, None)

        guided, rest = model_out[:, :num_guided], model_out[:, num_guided:]
        cond_out, uncond_out = guided.chunk(2, dim=0)
        mixed = uncond_out + cfg_scale * (cond_out - uncond_out)       # (N, num_guided, H, W)
        out = torch.cat([torch.cat([mixed, mixed], dim=0), rest], dim=1)  # (2N, C_out, H, W)
        return (out, state) if state is not None else out


#################################################################################
#                        Stochastic Jacobian-Free Backprop                      #
#################################################################################

def draw_sjfb_iters(model_or_config: Any, generator: torch.Generator) -> tuple[int, int]:
    """Draw S-JFB iteration counts (n, m): n ~ U{no_grad_min..no_grad_max}, m ~ U{with_grad_min..with_grad_max}.

    `model_or_config` is a DiT or anything with the fixed_point_{no,with}_grad_{min,max}_iters attributes (e.g. a
    ModelConfig). Bounds are inclusive (Algorithm 1); all randomness comes from `generator`.
    """
    n_lo = model_or_config.fixed_point_no_grad_min_iters
    n_hi = model_or_config.fixed_point_no_grad_max_iters
    m_lo = model_or_config.fixed_point_with_grad_min_iters
    m_hi = model_or_config.fixed_point_with_grad_max_iters
    validate_sjfb_bounds(n_lo, n_hi, m_lo, m_hi)
    n = int(torch.randint(n_lo, n_hi + 1, (1,), generator=generator, device=generator.device).item())
    m = int(torch.randint(m_lo, m_hi + 1, (1,), generator=generator, device=generator.device).item())
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

def DiT_XL_2(**kwargs): return DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)
def DiT_XL_4(**kwargs): return DiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs)
def DiT_XL_8(**kwargs): return DiT(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kwargs)
def DiT_L_2(**kwargs): return DiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs)
def DiT_L_4(**kwargs): return DiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs)
def DiT_L_8(**kwargs): return DiT(depth=24, hidden_size=1024, patch_size=8, num_heads=16, **kwargs)
def DiT_B_2(**kwargs): return DiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)
def DiT_B_4(**kwargs): return DiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs)
def DiT_B_8(**kwargs): return DiT(depth=12, hidden_size=768, patch_size=8, num_heads=12, **kwargs)
def DiT_S_2(**kwargs): return DiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs)
def DiT_S_4(**kwargs): return DiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs)
def DiT_S_8(**kwargs): return DiT(depth=12, hidden_size=384, patch_size=8, num_heads=6, **kwargs)
# CPU-scale presets (the built-in small dataset of the training issue).
def DiT_Ti_1(**kwargs): return DiT(depth=8, hidden_size=128, patch_size=1, num_heads=4, **kwargs)
def DiT_Ti_2(**kwargs): return DiT(depth=8, hidden_size=128, patch_size=2, num_heads=4, **kwargs)
def DiT_Ti_4(**kwargs): return DiT(depth=8, hidden_size=128, patch_size=4, num_heads=4, **kwargs)


class ModelRegistry(dict):
    """A dict of model constructors whose failed lookups raise a ValueError listing the valid names."""

    def __missing__(self, name: str):
        raise ValueError(f"unknown model {name!r} (--model); valid names: {', '.join(self)}")


DiT_models = ModelRegistry({
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
    "DiT-Ti/1": DiT_Ti_1, "DiT-Ti/2": DiT_Ti_2, "DiT-Ti/4": DiT_Ti_4,
})


def get_model_class(name: str):
    """Return the registry constructor `(**kwargs) -> DiT` for a model name; ValueError listing valid names."""
    return DiT_models[name]
