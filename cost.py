"""The cost formulas, written once: transformer-block passes (paper Sec. 4.2), default sampling iterations, training
units per step and analytic multiply-accumulates (MACs).

Block accounting (Sec. 4.2, footnote 4): one denoising step of an FPDM costs pre + iters + post block passes per
image, a DiT costs depth. The injection projection is not counted in blocks (as in the paper) but is counted in MACs.

MACs are per image and count matrix products only (nn.Linear, the patch convolution, attention's two batched
products); norms, activations, modulation and softmax are elementwise and left out. With T tokens of width D and
MLP ratio r, one DiT block costs

    qkv 3 T D^2 + attention (Q K^T and A V) 2 T^2 D + output projection T D^2 + MLP 2 r T D^2 + adaLN 6 D^2,

and one FPDM iteration adds the fixed-point projection, Linear 2D->2D + Linear 2D->D = 6 T D^2; the injection
(pre-projection, Linear D->D) costs T D^2 once per step. Classifier-free guidance runs 2 rows per image: twice the
MACs, the same block count per image.

The registry's architectures (depth, width, patch size, heads) are the table ARCHITECTURES below: models.py builds
its constructors from it, so the formulas and the networks share one source and cost.py needs no network.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

from config import UserError

FREQUENCY_EMBEDDING_SIZE = 256  # sinusoidal timestep features fed to the timestep MLP (models.TimestepEmbedder)


#################################################################################
#                                 Block passes                                  #
#################################################################################

def fpdm_step_blocks(pre_depth: int, num_iters: int, post_depth: int) -> int:
    """Block passes per image for one FPDM step: pre + fixed-point iterations + post (Sec. 4.2)."""
    return pre_depth + num_iters + post_depth


def fpdm_default_iters(depth: int, pre_depth: int, post_depth: int) -> int:
    """Iterations of an FPDM step costing what the same-named DiT step costs: depth - pre - post (at least 1)."""
    return max(1, depth - pre_depth - post_depth)


@dataclass(frozen=True)
class Architecture:
    """Shape of a registry model: what the cost formulas and models.py's constructors need."""
    depth: int              # blocks of the explicit DiT
    hidden_size: int        # D
    patch_size: int         # p
    num_heads: int
    mlp_ratio: float = 4.0  # r (every preset uses DiT's 4)


def _family(depth: int, hidden_size: int, num_heads: int, name: str, patches: tuple[int, ...]) -> dict:
    return {f"{name}/{p}": Architecture(depth, hidden_size, p, num_heads) for p in patches}


ARCHITECTURES: dict[str, Architecture] = {
    **_family(28, 1152, 16, "DiT-XL", (2, 4, 8)),
    **_family(24, 1024, 16, "DiT-L", (2, 4, 8)),
    **_family(12, 768, 12, "DiT-B", (2, 4, 8)),
    **_family(12, 384, 6, "DiT-S", (2, 4, 8)),
    **_family(8, 128, 4, "DiT-Ti", (1, 2, 4)),  # CPU-scale presets (the built-in digits dataset)
}
"""The model registry's presets by name (models.DiT_models is built from this table)."""


def architecture(model_name: str, depth: Optional[int] = None) -> Architecture:
    """Depth, width, patch size, heads and MLP ratio of a registry name; `depth` (ModelConfig.depth) replaces the
    name's depth when given."""
    if model_name not in ARCHITECTURES:
        raise UserError(f"--model: unknown model {model_name!r}; valid names: {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[model_name]
    return replace(arch, depth=depth) if depth else arch


def model_architecture(model_config: Any) -> Architecture:
    """The Architecture of a ModelConfig: its registry name at its --depth."""
    return architecture(model_config.model, model_config.depth)


def blocks_per_step(model_config: Any, num_iters: int) -> int:
    """Block passes per image for one denoising step: pre + num_iters + post (FPDM) or depth (DiT)."""
    if not model_config.fixed_point:
        return model_architecture(model_config).depth
    return fpdm_step_blocks(model_config.fixed_point_pre_depth, num_iters, model_config.fixed_point_post_depth)


def default_sampling_iters(model_config: Any) -> int:
    """Fixed-point iterations per step when none are given: the same-named DiT's depth - pre - post (0 for a DiT)."""
    if not model_config.fixed_point:
        return 0
    return fpdm_default_iters(model_architecture(model_config).depth, model_config.fixed_point_pre_depth,
                              model_config.fixed_point_post_depth)


# A vector-Jacobian product through the fixed-point map for the input gradient only (an IFT backward iteration):
# each matrix product once more, as in the forward (a full backward, 2 units, also computes the weight gradients).
VJP_UNITS = 1.0


def mean_training_iters(model_config: Any) -> tuple[float, float]:
    """E[n] and E[m] of models.draw_training_iters: n ~ U{n_min..N}; m ~ U{m_min..M} (sjfb), the phantom steps
    (phantom) or 1 (ift)."""
    mean_n = (model_config.fixed_point_no_grad_min_iters + model_config.fixed_point_no_grad_max_iters) / 2
    mean_m = (model_config.fixed_point_with_grad_min_iters + model_config.fixed_point_with_grad_max_iters) / 2
    return mean_n, {"sjfb": mean_m, "phantom": model_config.fixed_point_phantom_steps, "ift": 1}[
        model_config.fixed_point_grad]


def backward_solve_iters(model_config: Any) -> int:
    """VJPs per training step of the IFT backward solve (fixed_point_ift_iters; 0 for sjfb, phantom and a DiT)."""
    if not model_config.fixed_point or model_config.fixed_point_grad != "ift":
        return 0
    return model_config.fixed_point_ift_iters


def training_units_per_step(model_config: Any) -> float:
    """Expected block-pass units per training step per image: a forward pass = 1, a backward pass = 2.

    DiT: 3 * depth. FPDM: 3 * (pre + post) + E[n] (no-grad forwards) + 3 * E[m] (gradient-carrying iterations)
    + VJP_UNITS * the IFT backward solve's iterations.
    """
    if not model_config.fixed_point:
        return 3.0 * blocks_per_step(model_config, 0)
    mean_n, mean_m = mean_training_iters(model_config)
    return (3.0 * (model_config.fixed_point_pre_depth + model_config.fixed_point_post_depth) + mean_n
            + 3.0 * mean_m + VJP_UNITS * backward_solve_iters(model_config))


#################################################################################
#                              Multiply-accumulates                             #
#################################################################################

def macs_per_block(hidden_size: int, num_tokens: int, mlp_ratio: float = 4.0) -> int:
    """MACs per image of one DiT block: 3TD^2 + 2T^2D + TD^2 + 2rTD^2 + 6D^2 (adaLN once per image)."""
    T, D = num_tokens, hidden_size
    mlp_hidden = int(D * mlp_ratio)
    return 3 * T * D * D + 2 * T * T * D + T * D * D + 2 * T * D * mlp_hidden + 6 * D * D


def macs_injection(hidden_size: int, num_tokens: int) -> int:
    """MACs per image of the fixed-point projection in one iteration: Linear 2D->2D + Linear 2D->D = 6TD^2."""
    return 6 * num_tokens * hidden_size * hidden_size


def macs_pre_projection(hidden_size: int, num_tokens: int) -> int:
    """MACs per image of the input injection Linear D->D (once per FPDM step): TD^2."""
    return num_tokens * hidden_size * hidden_size


def macs_embed_and_final(hidden_size: int, num_tokens: int, patch_size: int, in_channels: int,
                         out_channels: int) -> int:
    """MACs per image outside the blocks: patch embedding, timestep MLP and the final adaLN layer."""
    D, T, pp = hidden_size, num_tokens, patch_size * patch_size
    patch_embed = T * in_channels * pp * D
    timestep_mlp = FREQUENCY_EMBEDDING_SIZE * D + D * D
    final_layer = D * 2 * D + T * D * pp * out_channels
    return patch_embed + timestep_mlp + final_layer


def macs_per_step(model_config: Any, num_iters: int = 0, cfg: bool = False) -> int:
    """MACs per image of one denoising step (num_iters fixed-point iterations for an FPDM; cfg doubles the rows)."""
    arch = model_architecture(model_config)
    D, p = arch.hidden_size, arch.patch_size
    T = (model_config.input_size // p) ** 2
    out_channels = 2 * model_config.in_channels if model_config.learn_sigma else model_config.in_channels
    total = macs_embed_and_final(D, T, p, model_config.in_channels, out_channels)
    total += blocks_per_step(model_config, num_iters) * macs_per_block(D, T, arch.mlp_ratio)
    if model_config.fixed_point:
        total += num_iters * macs_injection(D, T) + macs_pre_projection(D, T)
    return 2 * total if cfg else total


def macs_fixed_point_vjp(model_config: Any) -> int:
    """MACs per image of one vector-Jacobian product through the fixed-point map for the gradient of its input z
    only (an IFT backward iteration): every Linear's input gradient costs its forward (the projection 6TD^2, the
    block's 3TD^2 + TD^2 + 2rTD^2), attention's two products give four (dA, dV, dQ, dK: 4T^2D), and adaLN, which
    depends on the conditioning alone, none."""
    arch = model_architecture(model_config)
    D, T = arch.hidden_size, (model_config.input_size // arch.patch_size) ** 2
    block_without_adaln = macs_per_block(D, T, arch.mlp_ratio) - 6 * D * D
    return macs_injection(D, T) + block_without_adaln + 2 * T * T * D


def training_macs_per_image(model_config: Any, sjfb_iters: Optional[tuple[int, int]]) -> int:
    """Analytic MACs per image of one training step (cost.macs_per_step): forward 1x and backward 2x for what
    carries gradient; an FPDM's n no-grad iterations (Algorithm 1) run forward only, and the IFT backward solve adds
    its VJPs (macs_fixed_point_vjp). The forward recomputed by --grad_checkpointing is not counted (the arithmetic
    the model needs, not the memory trade)."""
    if sjfb_iters is None:
        return 3 * macs_per_step(model_config)
    n, m = sjfb_iters
    carrying = min(m, 1) if model_config.fixed_point_grad == "ift" else m  # ift: only the last evaluation has a graph
    with_grad = macs_per_step(model_config, num_iters=carrying)       # embed, pre, those iterations, post, final
    no_grad = macs_per_step(model_config, num_iters=n + m) - with_grad  # the other iterations (block + projection)
    return 3 * with_grad + no_grad + backward_solve_iters(model_config) * macs_fixed_point_vjp(model_config)


def mean_training_macs_per_image(model_config: Any) -> float:
    """E[training_macs_per_image] over models.draw_training_iters' uniform draws of (n, m): the MAC counterpart of
    training_units_per_step."""
    if not model_config.fixed_point:
        return float(training_macs_per_image(model_config, None))
    ns = range(model_config.fixed_point_no_grad_min_iters, model_config.fixed_point_no_grad_max_iters + 1)
    ms = {"sjfb": range(model_config.fixed_point_with_grad_min_iters, model_config.fixed_point_with_grad_max_iters + 1),
          "phantom": [model_config.fixed_point_phantom_steps], "ift": [1]}[model_config.fixed_point_grad]
    return sum(training_macs_per_image(model_config, (n, m)) for n in ns for m in ms) / (len(ns) * len(ms))
