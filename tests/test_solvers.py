"""Fixed-point solvers: plain iteration and Anderson acceleration on contractive linear maps."""
from __future__ import annotations

import pytest
import torch

from solvers import SOLVER_NAMES, SolverStats, anderson, fixed_point_iteration, get_solver, relative_residual


def linear_contraction(batch: int = 3, dim: int = 40, max_eig: float = 0.95, seed: int = 0):
    """f(z) = A z + b per sample, A symmetric with eigenvalues in [-max_eig, max_eig]; returns f, z0, z*."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    eigs = torch.linspace(-max_eig, max_eig, dim, dtype=torch.float64)
    A = q @ torch.diag(eigs) @ q.T
    b = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - A, b.T).T  # (N, d)

    def f(z):
        return z @ A.T + b

    return f, torch.zeros(batch, dim, dtype=torch.float64), z_star


def test_iteration_counts_each_evaluation_and_converges():
    f, z0, z_star = linear_contraction(max_eig=0.5)
    calls = []
    z, stats = fixed_point_iteration(lambda z: calls.append(1) or f(z), z0, max_iters=60)
    assert isinstance(stats, SolverStats)
    assert stats.num_iters == len(stats.residuals) == len(calls) == 60
    assert torch.allclose(z, z_star, atol=1e-10)
    # residuals are batch means of ||f(z) - z|| / ||f(z)|| per evaluation
    assert stats.residuals[0] == pytest.approx(relative_residual(f(z0), z0).mean().item())
    z_none, none = fixed_point_iteration(f, z0, max_iters=0)
    assert z_none is z0 and none == SolverStats(0, [])


@pytest.mark.parametrize("solver", [fixed_point_iteration, anderson])
def test_tolerance_uses_the_worst_sample(solver):
    f, z0, _ = linear_contraction(max_eig=0.5)
    rate = torch.tensor([[1.0], [1.0], [0.3]], dtype=torch.float64)  # damped: sample 2 contracts slowest

    def g(z):
        return rate * f(z) + (1 - rate) * z

    tol = 1e-6
    with torch.no_grad():
        _, stats = solver(g, z0, max_iters=300, tol=tol)
        num = stats.num_iters
        # The iterate returned after j evaluations is the input of evaluation j + 1.
        z_last, _ = solver(g, z0, max_iters=num - 1)
        z_before, _ = solver(g, z0, max_iters=num - 2)
        r_last, r_before = relative_residual(g(z_last), z_last), relative_residual(g(z_before), z_before)
    assert 2 < num < 300
    assert r_last.max() <= tol < r_before.max()
    assert r_before[:2].max() <= tol  # the fast samples had converged already: the slowest one decides
    assert stats.residuals[-1] == pytest.approx(r_last.mean().item())


def test_anderson_beats_iteration_at_equal_evaluations():
    f, z0, z_star = linear_contraction(max_eig=0.95)
    with torch.no_grad():
        z_it, it = fixed_point_iteration(f, z0, max_iters=25)
        z_aa, aa = anderson(f, z0, max_iters=25, memory=5)
    assert it.num_iters == aa.num_iters == 25
    assert aa.residuals[-1] < 0.1 * it.residuals[-1], (aa.residuals[-1], it.residuals[-1])
    assert (z_aa - z_star).norm() < (z_it - z_star).norm()


def test_anderson_is_per_sample():
    f, z0, _ = linear_contraction(batch=3, max_eig=0.9)
    z0 = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1), dtype=z0.dtype)
    with torch.no_grad():
        z_batch, _ = anderson(f, z0, max_iters=10)
        z_single = torch.cat([anderson(lambda z, i=i: f(z.expand(3, -1))[i:i + 1], z0[i:i + 1], max_iters=10)[0]
                              for i in range(3)])
    assert torch.allclose(z_batch, z_single, atol=1e-10)


def test_iteration_unrolls_under_grad_and_anderson_refuses_grad():
    f, z0, _ = linear_contraction(dim=8)
    weight = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    z, _ = fixed_point_iteration(lambda z: weight * f(z), z0, max_iters=3)
    z.sum().backward()
    assert weight.grad is not None and weight.grad != 0
    with pytest.raises(ValueError, match="no_grad"):
        anderson(f, z0, max_iters=3)
    with pytest.raises(ValueError, match="max_iters"):
        fixed_point_iteration(f, z0, max_iters=-1)


def test_get_solver_registry_fails_in_one_place():
    assert SOLVER_NAMES == ("iteration", "anderson")
    assert get_solver("iteration") is fixed_point_iteration and get_solver("anderson") is anderson
    with pytest.raises(ValueError, match=r"--fixed_point_solver.*iteration, anderson.*'newton'"):
        get_solver("newton")
    f, z0, _ = linear_contraction(dim=8)
    with torch.no_grad(), pytest.raises(ValueError, match="--anderson_memory"):
        get_solver("anderson")(f, z0, 3, None, memory=0)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_every_solver_has_the_same_signature_and_stats(name):
    f, z0, _ = linear_contraction(max_eig=0.5)
    with torch.no_grad():
        z, stats = get_solver(name)(f, z0, 5, 1e-12)
        z_none, none = get_solver(name)(f, z0, 0)
    assert z.shape == z0.shape and isinstance(stats, SolverStats)
    assert stats.num_iters == len(stats.residuals) == 5 and none == SolverStats(0, [])


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_residuals_are_computed_only_when_tracked_or_needed_for_a_tolerance(name, monkeypatch):
    import solvers
    f, z0, _ = linear_contraction(max_eig=0.5)
    calls = []
    real = solvers.relative_residual
    monkeypatch.setattr(solvers, "relative_residual", lambda fz, z: calls.append(1) or real(fz, z))
    with torch.no_grad():
        z_tracked, tracked = get_solver(name)(f, z0, 6)
        assert len(calls) == 6 and len(tracked.residuals) == 6
        calls.clear()
        z_plain, plain = get_solver(name)(f, z0, 6, track_residuals=False)
        assert calls == [] and plain == SolverStats(6, [])  # training: no residual, no device-to-host copy
        assert torch.equal(z_plain, z_tracked)
        _, with_tol = get_solver(name)(f, z0, 300, 1e-6, track_residuals=False)  # a tolerance needs them
    assert len(calls) == with_tol.num_iters == len(with_tol.residuals) and with_tol.residuals[-1] <= 1e-6
