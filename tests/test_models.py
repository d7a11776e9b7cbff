"""DiT / FPDM model tests: parameter counts, reference state-dict keys, S-JFB gradients and memory, solution reuse,
classifier-free guidance, stability at initialisation and input validation. Tiny models, CPU, a few seconds."""
from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import cost
from benchmarks.bench_common import PeakTensorBytes
from config import ModelConfig
from models import (FPDM, DiT, DiT_models, FixedPointStats, classifier_free_guidance, create_model, draw_sjfb_iters,
                    get_2d_sincos_pos_embed, get_model_class)


# A tiny class-conditional FPDM: 8x8 latents, patch 2 -> T = 16 tokens, D = 32.
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, num_heads=4, num_classes=10,
            class_dropout_prob=0.1, learn_sigma=True)


def tiny_fpdm(seed: int = 0, randomize: bool = True, **overrides) -> FPDM:
    torch.manual_seed(seed)
    model = FPDM(**{**TINY, **overrides})
    if randomize:
        randomize_zero_inits(model, seed)
    return model


def randomize_zero_inits(model: DiT, seed: int, std: float = 0.05) -> None:
    """Give the zero-initialised (adaLN-Zero, output) weights small random values so every path carries signal."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (p == 0).all():
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def tiny_inputs(n: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return x, t, y


#################################################################################
#                          Parameter counts (meta device)                       #
#################################################################################

def test_parameter_counts_match_paper():
    with torch.device("meta"):
        dit = DiT_models["DiT-XL/2"]()
        fpdm = DiT_models["DiT-XL/2"](fixed_point=True, fixed_point_pre_depth=1, fixed_point_post_depth=1)
    n_dit = sum(p.numel() for p in dit.parameters())
    n_fpdm = sum(p.numel() for p in fpdm.parameters())
    assert abs(n_dit - 675e6) / 675e6 < 0.01, n_dit      # DiT paper: 675M
    assert abs(n_fpdm - 86e6) / 86e6 < 0.03, n_fpdm      # FPDM paper Sec. 4.1: 86M
    assert not hasattr(fpdm, "blocks")
    assert len(dit.blocks) == 28
    assert type(dit) is DiT and isinstance(fpdm, FPDM) and fpdm.depth == 28


#################################################################################
#                        State dicts: reference key names                       #
#################################################################################

def _linear(prefix: str, n_in: int, n_out: int) -> dict:
    return {f"{prefix}.weight": (n_out, n_in), f"{prefix}.bias": (n_out,)}


def _reference_block(prefix: str, D: int, mlp_hidden: int) -> dict:
    keys = {}
    keys.update(_linear(f"{prefix}.attn.qkv", D, 3 * D))
    keys.update(_linear(f"{prefix}.attn.proj", D, D))
    keys.update(_linear(f"{prefix}.mlp.fc1", D, mlp_hidden))
    keys.update(_linear(f"{prefix}.mlp.fc2", mlp_hidden, D))
    keys.update(_linear(f"{prefix}.adaLN_modulation.1", D, 6 * D))
    return keys


def reference_key_shapes(fixed_point: bool, depth=2, pre=2, post=1, D=32, p=2, C=4, classes=10, T=16) -> dict:
    """The official DiT / authors' FPDM state-dict layout, written out from the naming scheme."""
    keys = {
        "pos_embed": (1, T, D),
        "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
        "y_embedder.embedding_table.weight": (classes + 1, D),
    }
    keys.update(_linear("t_embedder.mlp.0", 256, D))
    keys.update(_linear("t_embedder.mlp.2", D, D))
    if fixed_point:
        for i in range(pre):
            keys.update(_reference_block(f"blocks_pre.{i}", D, 4 * D))
        keys.update(_linear("block_pre_projection", D, D))
        keys.update(_linear("block_fixed_point_projection_fc1", 2 * D, 2 * D))
        keys.update(_linear("block_fixed_point_projection_fc2", 2 * D, D))
        keys.update(_reference_block("block_fixed_point", D, 4 * D))
        for i in range(post):
            keys.update(_reference_block(f"blocks_post.{i}", D, 4 * D))
    else:
        for i in range(depth):
            keys.update(_reference_block(f"blocks.{i}", D, 4 * D))
    keys.update(_linear("final_layer.linear", D, p * p * 2 * C))
    keys.update(_linear("final_layer.adaLN_modulation.1", D, 2 * D))
    return keys


@pytest.mark.parametrize("fixed_point", [False, True])
def test_reference_state_dict_loads_strict(fixed_point):
    expected = reference_key_shapes(fixed_point)
    gen = torch.Generator().manual_seed(0)
    reference = {k: torch.randn(shape, generator=gen) for k, shape in expected.items()}
    if fixed_point:
        model = FPDM(**TINY, depth=2, fixed_point_pre_depth=2, fixed_point_post_depth=1)
    else:
        model = DiT(**TINY, depth=2)
    model.load_state_dict(reference, strict=True)
    loaded = model.state_dict()
    assert set(loaded) == set(expected)
    for k, v in reference.items():
        assert torch.equal(loaded[k], v), k


def test_state_dict_round_trip_strict():
    source = tiny_fpdm(seed=0)
    target = tiny_fpdm(seed=1)
    target.load_state_dict(source.state_dict(), strict=True)
    x, t, y = tiny_inputs()
    source.eval(), target.eval()
    with torch.no_grad():
        assert torch.equal(source(x, t, y, num_iters=3), target(x, t, y, num_iters=3))


#################################################################################
#                      Layers: position embedding, unpatchify                   #
#################################################################################

def test_pos_embed_layout_and_frozen():
    G, D = 4, 16
    emb = get_2d_sincos_pos_embed(D, G)  # (G*G, D)
    quarter = D // 4
    omega = [1.0 / 10000 ** (k / quarter) for k in range(quarter)]
    for row in range(G):
        for col in range(G):
            token = emb[row * G + col]
            expected = ([math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
                        + [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega])
            assert torch.allclose(token, torch.tensor(expected), atol=1e-6)
    model = DiT(**TINY, depth=1)
    assert not model.pos_embed.requires_grad
    assert torch.allclose(model.pos_embed[0], get_2d_sincos_pos_embed(32, 4))


def test_unpatchify_inverts_patch_order():
    model = DiT(**TINY, depth=1)
    img = torch.randn(2, 8, 8, 8)  # (N, C_out, H, W)
    p, h = 2, 4
    # Patchify by hand: token (row, col) holds its p x p x C patch in (p, p, C) order.
    tokens = img.reshape(2, 8, h, p, h, p).permute(0, 2, 4, 3, 5, 1).reshape(2, h * h, p * p * 8)
    assert torch.equal(model.unpatchify(tokens), img)


#################################################################################
#                        S-JFB: gradients and memory (Sec. 3.4)                 #
#################################################################################

def manual_fpdm_forward(model: FPDM, x, t, y, n: int, m: int) -> torch.Tensor:
    """FPDM written out by hand: the first n iterations are cut from the graph, the last m are unrolled."""
    tokens = model.x_embedder(x) + model.pos_embed
    y_emb = model.y_embedder.embedding_table(y)
    c_fixed_point = model.t_embedder(t) + y_emb
    for block in model.blocks_pre:
        tokens = block(tokens, y_emb)
    injection = model.block_pre_projection(tokens)

    def f(z):
        h = model.block_fixed_point_projection_fc1(torch.cat([z, injection], dim=-1))
        h = model.block_fixed_point_projection_fc2(F.gelu(h, approximate="tanh"))
        return model.block_fixed_point(h, c_fixed_point)

    z = tokens.detach()
    for _ in range(n):
        z = f(z).detach()
    for _ in range(m):
        z = f(z)
    for block in model.blocks_post:
        z = block(z, y_emb)
    return model.unpatchify(model.final_layer(z, y_emb))


def _grads(model: DiT, loss: torch.Tensor) -> dict:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("n, m", [(3, 2), (0, 2)])
def test_sjfb_gradients_flow_only_through_last_m_iterations(n, m):
    model = tiny_fpdm().eval()
    x, t, y = tiny_inputs()
    weights = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(3))

    grads_model = _grads(model, (model(x, t, y, num_no_grad_iters=n, num_iters=m) * weights).sum())
    grads_manual = _grads(model, (manual_fpdm_forward(model, x, t, y, n, m) * weights).sum())
    grads_full = _grads(model, (manual_fpdm_forward(model, x, t, y, 0, n + m) * weights).sum())

    assert set(grads_model) == set(grads_manual)
    assert "block_fixed_point.attn.qkv.weight" in grads_model and "blocks_pre.0.mlp.fc1.weight" in grads_model
    for k in grads_manual:
        assert torch.allclose(grads_model[k], grads_manual[k], rtol=1e-4, atol=1e-7), k
    if n == 0:
        return
    # Backpropagating through all n + m iterations gives different fixed-point-block gradients.
    k = "block_fixed_point.mlp.fc1.weight"
    rel_diff = (grads_full[k] - grads_model[k]).norm() / grads_full[k].norm()
    assert rel_diff > 1e-3, rel_diff


def _saved_tensor_bytes(model: FPDM, n: int, m: int) -> int:
    x, t, y = tiny_inputs()
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x, t, y, num_no_grad_iters=n, num_iters=m)
    out.sum().backward()
    return sum(saved)


def test_no_grad_iterations_store_nothing():
    model = tiny_fpdm().eval()
    bytes_n0 = _saved_tensor_bytes(model, n=0, m=2)
    bytes_n8 = _saved_tensor_bytes(model, n=8, m=2)
    assert bytes_n0 == bytes_n8
    # The measurement is sensitive: one more iteration with gradient stores more.
    assert _saved_tensor_bytes(model, n=0, m=3) > bytes_n0


def _training_step_tensor_bytes(model: FPDM, n: int, m: int) -> tuple[int, int, int]:
    """Live tensor bytes of one forward/backward (parameters excluded): the peak, after the forward, and what is
    left once the output and gradients are dropped."""
    x, t, y = tiny_inputs()
    with PeakTensorBytes(model.parameters()) as tracker:
        out = model(x, t, y, num_no_grad_iters=n, num_iters=m)
        after_forward = tracker.live_bytes
        out.square().mean().backward()
        del out
        model.zero_grad(set_to_none=True)
        left = tracker.live_bytes
    return tracker.peak_bytes, after_forward, left


def test_no_grad_iterations_keep_no_tensor_alive():
    """Issue 31's RSS check (772 -> 857 MB from n = 0 to 10) in a measure free of allocator noise: if the no-grad
    phase kept an iterate, a residual or its graph alive (on the model, in the stats, in a list), the bytes live
    after the forward and the peak would grow with n."""
    model = tiny_fpdm().eval()
    bytes_n0 = _training_step_tensor_bytes(model, n=0, m=2)
    assert _training_step_tensor_bytes(model, n=10, m=2) == bytes_n0
    assert bytes_n0[2] == 0
    # The measurement is sensitive: one more iteration with gradient keeps more alive.
    assert _training_step_tensor_bytes(model, n=0, m=3)[1] > bytes_n0[1]


def test_draw_sjfb_iters_uniform_inclusive_and_seeded():
    cfg = SimpleNamespace(fixed_point_no_grad_min_iters=0, fixed_point_no_grad_max_iters=3,
                          fixed_point_with_grad_min_iters=1, fixed_point_with_grad_max_iters=2)
    draws = [draw_sjfb_iters(cfg, torch.Generator().manual_seed(s)) for s in range(200)]
    assert {n for n, _ in draws} == {0, 1, 2, 3}
    assert {m for _, m in draws} == {1, 2}
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert [draw_sjfb_iters(cfg, gen_a) for _ in range(5)] == [draw_sjfb_iters(cfg, gen_b) for _ in range(5)]
    # Plain JFB (m = 1, no no-grad phase) is just another set of bounds.
    jfb = FPDM(**TINY, fixed_point_no_grad_max_iters=0, fixed_point_with_grad_max_iters=1)
    assert draw_sjfb_iters(jfb, torch.Generator().manual_seed(0)) == (0, 1)


def test_grad_checkpointing_gives_same_gradients():
    x, t, y = tiny_inputs()
    plain = tiny_fpdm(seed=0).eval()
    ckpt = tiny_fpdm(seed=0, grad_checkpointing=True).eval()
    g_plain = _grads(plain, plain(x, t, y, num_no_grad_iters=1, num_iters=2).square().sum())
    g_ckpt = _grads(ckpt, ckpt(x, t, y, num_no_grad_iters=1, num_iters=2).square().sum())
    for k in g_plain:
        assert torch.allclose(g_plain[k], g_ckpt[k], rtol=1e-5, atol=1e-7), k


def test_grad_checkpointing_covers_fixed_point_iterations():
    """Saved activations grow with m without checkpointing; with it each iteration is recomputed in backward."""
    plain = tiny_fpdm(seed=0).eval()
    ckpt = tiny_fpdm(seed=0, grad_checkpointing=True).eval()
    growth_plain = _saved_tensor_bytes(plain, n=0, m=12) - _saved_tensor_bytes(plain, n=0, m=0)
    growth_ckpt = _saved_tensor_bytes(ckpt, n=0, m=12) - _saved_tensor_bytes(ckpt, n=0, m=0)
    assert growth_plain > 0
    assert growth_ckpt <= 0.35 * growth_plain, (growth_ckpt, growth_plain)


def test_train_mode_call_runs_sjfb_with_drawn_counts():
    """Called like a DiT in train mode with gradients, an FPDM runs Algorithm 1 with (n, m) from sjfb_generator."""
    model = tiny_fpdm(fixed_point_no_grad_max_iters=3, fixed_point_with_grad_max_iters=4).train()
    x, t, y = tiny_inputs()
    seen = set()
    for seed in range(6):
        n, m = draw_sjfb_iters(model, torch.Generator().manual_seed(seed))
        out, stats = model.forward_with_stats(x, t, y, sjfb_generator=torch.Generator().manual_seed(seed),
                                              label_dropout_generator=torch.Generator().manual_seed(0))
        explicit, explicit_stats = model.forward_with_stats(
            x, t, y, num_no_grad_iters=n, num_iters=m, label_dropout_generator=torch.Generator().manual_seed(0))
        assert 0 <= n <= 3 and 1 <= m <= 4
        assert stats.num_iters == explicit_stats.num_iters == n + m and stats.blocks == 1 + n + m + 1
        assert torch.equal(out, explicit)
        seen.add((n, m))
    assert len(seen) > 1
    # Same generator state -> same draw -> same gradients as the explicit (n, m) call (nothing stored for n).
    gen_seed = 3
    n, m = draw_sjfb_iters(model, torch.Generator().manual_seed(gen_seed))
    weights = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    drop = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    g_sjfb = _grads(model, (model(x, t, y, sjfb_generator=torch.Generator().manual_seed(gen_seed),
                                  label_dropout_generator=drop()) * weights).sum())
    g_explicit = _grads(model, (model(x, t, y, num_no_grad_iters=n, num_iters=m,
                                      label_dropout_generator=drop()) * weights).sum())
    assert set(g_sjfb) == set(g_explicit)
    for k in g_sjfb:
        assert torch.equal(g_sjfb[k], g_explicit[k]), k
    # The torch default RNG is used without a generator.
    torch.manual_seed(11)
    _, default_stats = model.forward_with_stats(x, t, y, label_dropout_generator=drop())
    torch.manual_seed(11)
    assert default_stats.num_iters == sum(draw_sjfb_iters(model))


def test_default_iterations_match_the_dit_block_cost():
    """No counts outside S-JFB training: depth of the same-named DiT - pre - post iterations (cost.py)."""
    config = ModelConfig(model="DiT-Ti/2", image_size=8, in_channels=1, num_classes=10, fixed_point=True)
    model = create_model(config)
    x = torch.randn(2, 1, 8, 8)
    t, y = torch.tensor([3, 500]), torch.tensor([1, 2])
    with torch.no_grad():  # train mode without gradients: no S-JFB draw
        _, no_grad_stats = model.forward_with_stats(x, t, y)
    model.eval()
    _, eval_stats = model.forward_with_stats(x, t, y)  # eval mode with gradients: no S-JFB draw either
    assert no_grad_stats.num_iters == eval_stats.num_iters == 6 == model.default_num_iters
    assert eval_stats.blocks == 8 == cost.blocks_per_step(replace(config, fixed_point=False), 0)
    assert cost.default_sampling_iters(config) == 6
    with torch.device("meta"):
        xl = DiT_models["DiT-XL/2"](fixed_point=True, fixed_point_pre_depth=1, fixed_point_post_depth=1)
    assert xl.default_num_iters == 26


def test_create_model_builds_dit_or_fpdm_from_a_config():
    config = ModelConfig(model="DiT-Ti/4", image_size=8, in_channels=1, num_classes=10, fixed_point=True,
                         fixed_point_pre_depth=2, fixed_point_post_depth=0, fixed_point_no_grad_max_iters=5)
    fpdm = create_model(config, grad_checkpointing=True)
    dit = create_model(replace(config, fixed_point=False))
    assert isinstance(fpdm, FPDM) and type(dit) is DiT and fpdm.grad_checkpointing and not dit.grad_checkpointing
    assert len(fpdm.blocks_pre) == 2 and len(fpdm.blocks_post) == 0 and fpdm.fixed_point_no_grad_max_iters == 5
    assert len(dit.blocks) == 8 and dit.patch_size == 4 and dit.in_channels == 1


#################################################################################
#                       Fixed-point stage: stability, reuse, tol                #
#################################################################################

def test_fresh_fpdm_iteration_is_bounded_and_converges():
    """Stability of the fixed-point map at initialisation (Sec. 3.2), the reason FPDM keeps DiT's initialisation.

    adaLN-Zero makes the fixed-point block the identity, so the initial map is the random two-layer MLP
    f(z) = fc2(GELU(fc1(concat(z, injection)))), with Jacobian J = W2 diag(GELU') W1[:, :D]. With Xavier weights a
    typical direction is shrunk by ~0.5 (W1's z-columns keep the norm, GELU' averages ~0.6, W2 scales by
    sqrt(2/3)). Measured on fresh FPDMs with D = 128 / 384 / 1152: spectral radius of J ~0.66 / 0.55 / 0.50,
    ||J||_2 ~1.46 / 1.34 / 1.29, and the relative residual falls by a factor ~0.5-0.6 per iteration (1.6 -> 1e-7
    within 30 iterations) while the iterate norm stays bounded. The initial map is therefore already a contraction
    in practice and the Xavier initialisation of the projection is kept (a fresh FPDM matches the authors').
    """
    torch.manual_seed(0)
    model = FPDM(**{**TINY, "hidden_size": 64}).eval()  # DiT init, no randomisation
    x, t, y = tiny_inputs()
    with torch.no_grad():
        out, state = model.forward_with_stats(x, t, y, num_iters=60)
        start = model.x_embedder(x) + model.pos_embed  # the pre blocks are the identity at init
    assert torch.isfinite(out).all() and torch.isfinite(state.solution).all()
    assert state.num_iters == 60 and len(state.residuals) == 60 and state.blocks == 62
    assert state.solution.norm() < 2 * start.norm()
    assert state.residuals[-1] < 1e-4
    assert state.residuals[20] < 0.1 * state.residuals[0]  # geometric decrease: the initial map contracts


def _module_attributes(model: DiT) -> dict:
    snapshot = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if isinstance(value, (int, float, str, bool, type(None), tuple)):
                snapshot[(name, key)] = value
            elif isinstance(value, dict):
                snapshot[(name, key)] = (id(value), tuple(value))
            else:
                snapshot[(name, key)] = id(value)
    return snapshot


def test_fixed_point_init_reuse_and_no_hidden_state():
    model = tiny_fpdm().eval()
    x, t, y = tiny_inputs()
    attributes_before = _module_attributes(model)
    tensors_before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out_default, state = model.forward_with_stats(x, t, y, num_iters=2)
        init = torch.randn(state.solution.shape, generator=torch.Generator().manual_seed(5))
        out_init_a = model(x, t, y, num_iters=2, init=init)
        out_init_b = model(x, t, y, num_iters=2, init=init.clone())
        out_default_again = model(x, t, y, num_iters=2)
        # Reusing a converged solution starts the iteration close to the fixed point (Sec. 3.3).
        _, converged = model.forward_with_stats(x, t, y, num_iters=30)
        _, reused = model.forward_with_stats(x, t, y, num_iters=1, init=converged.solution)
    assert not torch.allclose(out_default, out_init_a)
    assert torch.equal(out_init_a, out_init_b)
    assert torch.equal(out_default, out_default_again)
    assert reused.residuals[0] < 0.01 * state.residuals[0]
    assert _module_attributes(model) == attributes_before
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in tensors_before.items())


def test_tolerance_stops_early():
    model = tiny_fpdm().eval()
    x, t, y = tiny_inputs()
    with torch.no_grad():
        _, state = model.forward_with_stats(x, t, y, num_iters=50, tol=1e-2)
    assert state.num_iters < 50
    assert state.residuals[-1] <= 1e-2 and all(r > 1e-2 for r in state.residuals[:-2])
    assert state.blocks == 1 + state.num_iters + 1


def test_pre_post_blocks_are_timestep_independent_by_default():
    x, t, y = tiny_inputs()
    t_other = t + 100
    with torch.no_grad():
        model = tiny_fpdm().eval()
        # With zero fixed-point iterations only pre/post blocks and the final layer act: no timestep dependence.
        assert torch.allclose(model(x, t, y, num_iters=0), model(x, t_other, y, num_iters=0))
        assert not torch.allclose(model(x, t, y, num_iters=2), model(x, t_other, y, num_iters=2))
        conditioned = tiny_fpdm(fixed_point_pre_post_timestep_conditioning=True).eval()
        assert not torch.allclose(conditioned(x, t, y, num_iters=0),
                                  conditioned(x, t_other, y, num_iters=0))


def test_unconditional_fpdm_and_dit_state():
    x, t, _ = tiny_inputs()
    model = tiny_fpdm(num_classes=0).eval()
    assert model.y_embedder is None
    with torch.no_grad():
        out = model(x, t, None, num_iters=2)
        dit = DiT(**TINY, depth=3).eval()
        out_dit, state = dit.forward_with_stats(x, t, torch.tensor([1, 2]), num_iters=7)
        assert torch.equal(out_dit, dit(x, t, torch.tensor([1, 2])))  # one return type: a Tensor when called
    assert out.shape == out_dit.shape == (2, 8, 8, 8)
    assert state == FixedPointStats(solution=None, num_iters=0, residuals=[], blocks=3)


def test_label_dropout_uses_generator():
    model = tiny_fpdm(class_dropout_prob=0.5).train()
    x, t, y = tiny_inputs(n=32)
    with torch.no_grad():
        runs = [model(x, t, y, num_iters=1, label_dropout_generator=torch.Generator().manual_seed(s))
                for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    dropped = model.y_embedder.token_drop(torch.zeros(1000, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    assert 400 < (dropped == model.null_class).sum() < 600
    drop_all = model.y_embedder(y[:8], train=False, force_drop_ids=torch.ones(8, dtype=torch.long))
    assert torch.equal(drop_all, model.y_embedder.embedding_table.weight[10].expand(8, -1))


#################################################################################
#                          Classifier-free guidance                             #
#################################################################################

def test_forward_with_cfg():
    model = tiny_fpdm().eval()
    x_half, t_half, labels = tiny_inputs()
    null = torch.full_like(labels, model.null_class)
    x = torch.cat([x_half, torch.randn_like(x_half)])  # the second half must be ignored (shared noise)
    t, y = torch.cat([t_half, t_half]), torch.cat([labels, null])
    kw = dict(num_iters=3)
    with torch.no_grad():
        cond = model(x_half, t_half, labels, **kw)
        uncond = model(x_half, t_half, null, **kw)
        scale1 = model.forward_with_cfg(x, t, y, cfg_scale=1.0, **kw)
        scale0 = model.forward_with_cfg(x, t, y, cfg_scale=0.0, **kw)
        scale4_all = model.forward_with_cfg(x, t, y, cfg_scale=4.0, cfg_channels=None, **kw)
        # The sampler's path: forward_with_stats on 2N rows, then the same mixing function.
        out_2n, state = model.forward_with_stats(torch.cat([x_half, x_half]), t, y, **kw)
    assert torch.equal(classifier_free_guidance(out_2n, 4.0, None, in_channels=4), scale4_all)
    close = lambda a, b: torch.allclose(a, b, atol=1e-5)
    # Default: guidance on the first 3 channels, both halves get the guided result.
    assert close(scale1[:2, :3], cond[:, :3]) and close(scale1[2:, :3], cond[:, :3])
    assert close(scale0[:2, :3], uncond[:, :3])
    # Channel 3 (unguided mean) and the learned-sigma channels 4..7 keep each half's own prediction.
    assert close(scale0[:2, 3:], cond[:, 3:]) and close(scale0[2:, 3:], uncond[:, 3:])
    # None ("all"): every mean channel guided, sigma channels never.
    guided = uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4])
    assert close(scale4_all[:2, :4], guided) and close(scale4_all[2:, :4], guided)
    assert close(scale4_all[:2, 4:], cond[:, 4:]) and close(scale4_all[2:, 4:], uncond[:, 4:])
    assert state.solution.shape == (4, 16, 32)

    with pytest.raises(ValueError, match="num_classes"):
        tiny_fpdm(num_classes=0).forward_with_cfg(x, t, None, cfg_scale=4.0)
    with pytest.raises(ValueError, match="cfg_channels"):
        model.forward_with_cfg(x, t, y, cfg_scale=4.0, cfg_channels=0)


#################################################################################
#                               Input validation                                #
#################################################################################

@pytest.mark.parametrize("overrides, flag", [
    (dict(input_size=9), "input_size"),
    (dict(input_size=9), "patch_size"),
    (dict(hidden_size=30), "num_heads"),
    (dict(fixed_point_pre_depth=-1), r"fixed_point_pre_depth.*>= 0.*-1"),   # the module layout depends on them
    (dict(fixed_point_post_depth=-2), r"fixed_point_post_depth.*>= 0.*-2"),
])
def test_bad_constructor_arguments_name_the_flag(overrides, flag):
    with pytest.raises(ValueError, match=flag):
        FPDM(**{**TINY, **overrides})


# Flag values are validated by the config layer (ModelConfig.validate), not by the model constructor.
@pytest.mark.parametrize("overrides, flag", [
    (dict(fixed_point_pre_depth=-1), r"fixed_point_pre_depth.*>= 0.*-1"),
    (dict(fixed_point_post_depth=-2), r"fixed_point_post_depth.*>= 0.*-2"),
    (dict(fixed_point_no_grad_min_iters=-1), "fixed_point_no_grad_min_iters"),
    (dict(fixed_point_no_grad_min_iters=5, fixed_point_no_grad_max_iters=2), "fixed_point_no_grad_max_iters"),
    (dict(fixed_point_with_grad_min_iters=0), "fixed_point_with_grad_min_iters"),
    (dict(fixed_point_with_grad_min_iters=3, fixed_point_with_grad_max_iters=2), "fixed_point_with_grad_max_iters"),
])
def test_bad_model_flags_name_the_flag(overrides, flag):
    with pytest.raises(ValueError, match=flag):
        ModelConfig(**{"fixed_point": True, **overrides}).validate()


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError, match="DiT-XL/2"):
        DiT_models["DiT-Q/3"]
    with pytest.raises(ValueError, match="unknown model 'FPDM'"):
        get_model_class("FPDM")
    assert get_model_class("DiT-Ti/2") is DiT_models["DiT-Ti/2"]


@pytest.mark.parametrize("kwargs, flag", [
    (dict(solver="newton"), "fixed_point_solver"),                   # solvers.get_solver
    (dict(solver="anderson"), "no_grad"),                             # grad enabled: Anderson has no backward
    (dict(num_no_grad_iters=-1), "max_iters"),                        # the solver's check
    (dict(num_iters=-1), "max_iters"),
    (dict(tol=0.0), "fixed_point_tol"),
    (dict(solver="anderson", solver_options={"memory": 0}), "anderson_memory"),
    (dict(init=torch.zeros(2, 15, 32)), "init"),
])
def test_bad_forward_arguments_name_the_flag(kwargs, flag):
    model = tiny_fpdm(randomize=False)
    x, t, y = tiny_inputs()
    with pytest.raises(ValueError, match=flag):
        model(x, t, y, **kwargs)


def test_bad_shapes_and_missing_labels():
    model = tiny_fpdm(randomize=False)
    x, t, y = tiny_inputs()
    with pytest.raises(ValueError, match="input_size"):
        model(torch.randn(2, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match="y"):
        model(x, t, None)


#################################################################################
#                           Anderson on a tiny FPDM                             #
#################################################################################

def test_anderson_on_tiny_fpdm_reports_residuals():
    """Reported, not required: Anderson vs plain iteration at equal block evaluations on a tiny FPDM."""
    model = tiny_fpdm().eval()
    x, t, y = tiny_inputs()
    with torch.no_grad():
        _, plain = model.forward_with_stats(x, t, y, num_iters=12)
        _, accel = model.forward_with_stats(x, t, y, num_iters=12, solver="anderson")
        _, accel_m1 = model.forward_with_stats(x, t, y, num_iters=12, solver="anderson", solver_options={"memory": 1})
    print(f"\ntiny FPDM, 12 evaluations: iteration residual {plain.residuals[-1]:.3e}, "
          f"anderson residual {accel.residuals[-1]:.3e}")
    assert accel.num_iters == 12 and all(math.isfinite(r) for r in accel.residuals)
    assert accel_m1.residuals[:2] == accel.residuals[:2] and accel_m1.residuals[-1] != accel.residuals[-1]


#################################################################################
#                  Training reads no residuals; the compiled map                #
#################################################################################

def test_train_mode_computes_no_residuals_and_copies_nothing_to_the_host(monkeypatch):
    """Training never reads the residuals: no relative_residual per iteration, no .tolist() per solver stage."""
    import solvers
    model = tiny_fpdm().train()
    x, t, y = tiny_inputs()
    residual_calls, host_copies = [], []
    real_residual, real_tolist = solvers.relative_residual, torch.Tensor.tolist
    monkeypatch.setattr(solvers, "relative_residual", lambda fz, z: residual_calls.append(1) or real_residual(fz, z))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: host_copies.append(1) or real_tolist(self))
    out, stats = model.forward_with_stats(x, t, y, num_no_grad_iters=3, num_iters=2)
    out.square().mean().backward()
    assert stats.residuals == [] and stats.num_iters == 5 and stats.blocks == 7
    assert residual_calls == [] and host_copies == []
    _, drawn = model.forward_with_stats(x, t, y, sjfb_generator=torch.Generator().manual_seed(0))  # S-JFB draw
    assert drawn.residuals == [] and residual_calls == []
    # Asked for, or in eval mode (sampling, diagnostics), they are there as before.
    _, asked = model.forward_with_stats(x, t, y, num_no_grad_iters=3, num_iters=2, track_residuals=True)
    assert len(asked.residuals) == 5 and len(residual_calls) == 5
    with torch.no_grad():
        _, sampled = model.eval().forward_with_stats(x, t, y, num_iters=4)
        _, stopped = model.train().forward_with_stats(x, t, y, num_iters=50, tol=1e-2)  # a tolerance needs them
    assert len(sampled.residuals) == 4 and stopped.residuals[-1] <= 1e-2 < stopped.residuals[0]


def test_compiled_fixed_point_map_is_one_graph_per_grad_mode():
    """--compile compiles the whole map (projection + block) once; S-JFB's varying (n, m) never recompile it."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module.code)
        return graph_module.forward  # run the captured graph eagerly: this counts compilations only

    torch._dynamo.reset()
    eager = tiny_fpdm(seed=1).train()
    compiled = tiny_fpdm(seed=1).train()
    compiled.compile_parts(backend=counting_backend)
    x, t, y = tiny_inputs()
    for n, m in [(0, 1), (2, 3), (3, 1), (1, 2), (0, 3), (4, 4)]:
        drop = torch.Generator().manual_seed(n * 10 + m)
        out = compiled(x, t, y, num_no_grad_iters=n, num_iters=m, label_dropout_generator=drop)
        drop = torch.Generator().manual_seed(n * 10 + m)
        expected = eager(x, t, y, num_no_grad_iters=n, num_iters=m, label_dropout_generator=drop)
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6), (n, m)
        out.square().mean().backward()
    map_graphs = [code for code in graphs if "projection_fc1" in code]
    assert len(map_graphs) == 2, len(map_graphs)  # no-grad iterations and gradient-carrying ones
    assert all("block_fixed_point" in code for code in map_graphs)  # projection and block in one graph
    assert compiled.block_fixed_point.attn.qkv.weight.grad is not None
    assert set(compiled.state_dict()) == set(eager.state_dict())  # no _orig_mod. prefixes
    torch._dynamo.reset()
