"""
Fixed-point solvers for the implicit layer of a Fixed Point Diffusion Model (FPDM).

Both solvers look for z* with f(z*) = z* (paper Sec. 3.1, Eq. 3) and share one accounting rule: every call of
`f` is one iteration, i.e. one transformer-block forward pass of the fixed-point block (paper Sec. 4.2 measures
sampling cost in block forward passes). After each evaluation the per-sample relative residual

    r = ||f(z) - z|| / (||f(z)|| + 1e-8)        (norms over all non-batch dimensions)

is computed; its batch mean is recorded in `SolverStats.residuals`, and with a tolerance `tol` the solver stops
as soon as the *largest* residual in the batch is <= tol (so every sample meets the tolerance). With
`track_residuals=False` and no tolerance the residual is never computed (training reads none of them: this saves an
fp32 pass over the iterate and a device-to-host copy per stage) and `SolverStats.residuals` stays empty.

- `fixed_point_iteration` works in any grad mode: with gradients enabled the iterations are simply unrolled
  (that is how S-JFB backpropagates through its last m iterations, Sec. 3.4).
- `anderson` (Anderson acceleration, type II) is a no-grad solver: call it under `torch.no_grad()`.
- `implicit_gradient` is the backward solve of implicit-function-theorem training (models.FPDM.gradient_stage):
  u = g + J^T u by fixed-point iteration, one vector-Jacobian product through f per iteration.

Every solver has the signature `solver(f, z0, max_iters, tol=None, *, track_residuals=True, **options)
-> (z, SolverStats)`; look one up with `get_solver(name)` (the one place an unknown name fails). SOLVER_NAMES lists
the valid names.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch
from torch import Tensor

from config import UserError

FixedPointMap = Callable[[Tensor], Tensor]

RESIDUAL_EPS = 1e-8


@dataclass
class SolverStats:
    """What a solver did.

    num_iters: evaluations of f (= fixed-point block passes).
    residuals: batch-mean relative residual ||f(z) - z|| / ||f(z)|| after each evaluation (len == num_iters), or
               empty when residuals were not tracked (track_residuals=False and no tolerance).
    """

    num_iters: int = 0
    residuals: list[float] = field(default_factory=list)


class Solver(Protocol):
    """solver(f, z0, max_iters, tol=None, track_residuals=True, **options) -> (z, stats): at most max_iters
    evaluations of f."""

    def __call__(self, f: FixedPointMap, z0: Tensor, max_iters: int, tol: Optional[float] = None,
                 *, track_residuals: bool = True, **options: Any) -> tuple[Tensor, SolverStats]: ...


#################################################################################
#                                   Helpers                                     #
#################################################################################

def relative_residual(fz: Tensor, z: Tensor) -> Tensor:
    """Per-sample relative residual ||f(z) - z|| / (||f(z)|| + 1e-8), computed without gradient; shape (N,)."""
    with torch.no_grad():
        fz_flat = fz.detach().flatten(1).float()  # (N, d)
        z_flat = z.detach().flatten(1).float()    # (N, d)
        return (fz_flat - z_flat).norm(dim=1) / (fz_flat.norm(dim=1) + RESIDUAL_EPS)  # (N,)


def _check_solver_args(max_iters: int, tol: Optional[float]) -> None:
    if max_iters < 0:
        raise ValueError(f"max_iters must be >= 0 (got {max_iters})")
    if tol is not None and not tol > 0:
        raise UserError(f"--fixed_point_tol: must be > 0 or None (got {tol})")


class _ResidualLog:
    """Counts evaluations and, when asked, their residuals; synchronises with the device only to check a tolerance.

    Residuals are computed when `track` is True or a tolerance must be checked; otherwise `needed` is False and the
    solver skips relative_residual altogether.
    """

    def __init__(self, tol: Optional[float], track: bool = True):
        self.tol = tol
        self.needed = track or tol is not None
        self.num_iters = 0
        self.batch_means: list[Tensor] = []  # 0-d tensors, converted to floats once at the end

    def record(self, fz: Tensor, z: Tensor) -> bool:
        """Count one evaluation fz = f(z); store the batch-mean residual when needed. True when the tolerance is
        met for every sample (never without a tolerance)."""
        self.num_iters += 1
        if not self.needed:
            return False
        residual = relative_residual(fz, z)  # (N,)
        self.batch_means.append(residual.mean())
        return self.tol is not None and residual.max().item() <= self.tol

    def stats(self) -> SolverStats:
        values = torch.stack(self.batch_means).tolist() if self.batch_means else []
        return SolverStats(num_iters=self.num_iters, residuals=values)


#################################################################################
#                            Plain Fixed-Point Iteration                        #
#################################################################################

def fixed_point_iteration(
    f: FixedPointMap, z0: Tensor, max_iters: int, tol: Optional[float] = None, *, track_residuals: bool = True
) -> tuple[Tensor, SolverStats]:
    """Iterate z <- f(z) from z0 for at most max_iters evaluations (early stop at tol); returns (z, stats)."""
    _check_solver_args(max_iters, tol)
    log = _ResidualLog(tol, track_residuals)
    z = z0
    for _ in range(max_iters):
        fz = f(z)
        converged = log.record(fz, z)
        z = fz
        if converged:
            break
    return z, log.stats()


#################################################################################
#                              Anderson Acceleration                            #
#################################################################################

def anderson(
    f: FixedPointMap,
    z0: Tensor,
    max_iters: int,
    tol: Optional[float] = None,
    memory: int = 5,
    beta: float = 1.0,
    lam: float = 1e-4,
    *,
    track_residuals: bool = True,
) -> tuple[Tensor, SolverStats]:
    """Anderson acceleration (type II, no-grad only) for z = f(z), batched per sample; returns (z, stats).

    With iterates x_k, residuals g_k = f(x_k) - x_k and the differences of the last `memory` pairs stacked as
    columns dX = [x_{i+1} - x_i], dG = [g_{i+1} - g_i], each step solves the per-sample ridge least-squares problem

        gamma = argmin_gamma ||g_k - dG gamma||^2 + lam * s * ||gamma||^2,   s = mean(diag(dG^T dG))

    (the Tikhonov weight is relative to the scale of dG, so `lam` is unit-free), and moves to

        x_{k+1} = x_k + beta * g_k - (dX + beta * dG) gamma.

    With an empty history (the first step) this is a damped plain step x_1 = x_0 + beta * g_0 (= f(x_0) for
    beta = 1). The returned z is the next Anderson iterate after the last evaluation (a combination of evaluated
    f values, no extra block pass).
    """
    _check_solver_args(max_iters, tol)
    if memory < 1:
        raise UserError(f"--anderson_memory: must be >= 1 (got {memory})")
    if torch.is_grad_enabled():
        raise ValueError(
            "anderson() runs without gradients: call it under torch.no_grad() "
            "(use fixed_point_iteration for iterations that must be backpropagated through)"
        )
    log = _ResidualLog(tol, track_residuals)
    batch_size = z0.shape[0]
    work_dtype = torch.promote_types(z0.dtype, torch.float32)  # mixing in >= float32, the small solve in float64
    x = z0.flatten(1)                          # (N, d)
    dx_history: list[Tensor] = []              # each (N, d)
    dg_history: list[Tensor] = []              # each (N, d)
    x_prev: Optional[Tensor] = None
    g_prev: Optional[Tensor] = None

    for _ in range(max_iters):
        fx = f(x.reshape(z0.shape)).flatten(1)  # (N, d)
        g = fx - x                             # (N, d)
        converged = log.record(fx, x)

        if x_prev is not None:
            dx_history.append(x - x_prev)
            dg_history.append(g - g_prev)
            if len(dx_history) > memory:
                dx_history.pop(0)
                dg_history.pop(0)
        x_prev, g_prev = x, g

        if dg_history:
            dX = torch.stack(dx_history, dim=-1).to(work_dtype)                  # (N, d, m)
            dG = torch.stack(dg_history, dim=-1).to(work_dtype)                  # (N, d, m)
            gram = (dG.transpose(1, 2) @ dG).double()                           # (N, m, m)
            rhs = (dG.transpose(1, 2) @ g.to(work_dtype).unsqueeze(-1)).double()  # (N, m, 1)
            scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)  # (N,)
            eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
            gamma = torch.linalg.solve(gram + lam * scale.view(batch_size, 1, 1) * eye, rhs)  # (N, m, 1)
            correction = ((dX + beta * dG) @ gamma.to(work_dtype)).squeeze(-1)  # (N, d)
            x = (x.to(work_dtype) + beta * g.to(work_dtype) - correction).to(z0.dtype)
        else:
            x = x + beta * g
        if converged:
            break
    return x.reshape(z0.shape), log.stats()


#################################################################################
#                       Implicit gradient (backward solve)                      #
#################################################################################

class _AdjointSolve(torch.autograd.Function):
    """Identity on fz = f(z*) in the forward; in the backward, the incoming gradient g becomes the solution u of
    u = g + J^T u, J = df/dz at z* (the implicit function theorem: dL/dtheta = (df/dtheta)^T (I - J^T)^{-1} g),
    by `iters` fixed-point iterations from u = g, each one vector-Jacobian product through f's graph. The graph
    of f(z*) flows on from u, so the parameters and the injection receive (df/dtheta)^T u."""

    @staticmethod
    def forward(ctx: Any, fz: Tensor, z: Tensor, iters: int) -> Tensor:
        ctx.save_for_backward(fz, z)  # inputs keep their graph when saved: the backward takes VJPs through it
        ctx.iters = iters
        return fz.view_as(fz)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        fz, z = ctx.saved_tensors
        u = g
        with torch.enable_grad():
            for _ in range(ctx.iters):
                u = g + torch.autograd.grad(fz, z, u, retain_graph=True)[0]  # (N, T, D): g + J^T u
        return u, None, None


def implicit_gradient(fz: Tensor, z: Tensor, iters: int) -> Tensor:
    """fz = f(z) (z: a leaf that requires grad, the no-grad solution z*), returned unchanged but backpropagated with
    the implicit function theorem's gradient, its backward fixed point solved in `iters` iterations (0: u = g, the
    1-step JFB gradient). Only the graph of this one evaluation is stored, whatever `iters`."""
    if iters < 0:
        raise UserError(f"--fixed_point_ift_iters: must be >= 0 (got {iters})")
    return _AdjointSolve.apply(fz, z, iters)


#################################################################################
#                                   Registry                                    #
#################################################################################

_SOLVERS: dict[str, Solver] = {"iteration": fixed_point_iteration, "anderson": anderson}
SOLVER_NAMES: tuple[str, ...] = tuple(_SOLVERS)


def get_solver(name: str) -> Solver:
    """The solver registered as `name`; UserError naming --fixed_point_solver and the valid names otherwise."""
    if name not in _SOLVERS:
        raise UserError(f"--fixed_point_solver: must be one of {', '.join(SOLVER_NAMES)} (got {name!r})")
    return _SOLVERS[name]
