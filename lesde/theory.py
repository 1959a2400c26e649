r"""Exact theory of the linear locally elastic SDEs (I-model and L-model), additive noise.

For a linear drift field the class means obey a linear SDE and the within-class deviations are
Brownian motions (Zhang, Wang & Su, NeurIPS 2021, arXiv 2110.05960; background.md section 2).
With m = vec(Xbar_0, ..., Xbar_{K-1}) in R^{K p} and n_k samples in class k::

    dm = C(t) m dt + sigma(t) Q^{1/2} dW,     C(t)[c, k] = E(t)[c, k] (n_k / N) F_k,
    Q = diag(1/n_0, ..., 1/n_{K-1}) (x) I_p,

with F_k = I_p (I-model) or P_k (L-model: projector on d_k = e_k - 1/K). Its mean and
covariance solve the moment ODEs  m' = C m,  P' = C P + P C^T + sigma^2 Q  (:func:`class_mean_moments`,
any impacts, any class sizes). Within-class deviations X_j - Xbar_{y_j} get the same drift as
their class mean, so they are sigma (W_j - Wbar_{y_j}): per coordinate variance
(1 - 1/n_k) int_0^t sigma^2 (:func:`within_class_moments`).

Closed forms for balanced classes and E = (alpha - beta) I + beta 11^T, A = int alpha,
B = int beta (:func:`imodel_modes`, :func:`lmodel_modes`):

* I-model: the grand mean scales by exp((A + (K-1) B)/K), centred class means by exp((A - B)/K);
  Cov(Xbar_k, Xbar_l) = (sigma^2/n) int_0^t [ (1/K) e^{2(L1(t)-L1(s))} + (delta_kl - 1/K) e^{2(L2(t)-L2(s))} ] ds
  per coordinate, L1 = (A + (K-1) B)/K, L2 = (A - B)/K.
* L-model: the label coordinate y_k = d_k . Xbar_k / |d_k|^2 has a symmetric mode (mean over k)
  scaling by exp((A - B)/K) and antisymmetric modes by exp((A + B/(K-1))/K).

Exact transitions (:func:`mean_transition`, used by ``simulate(..., method="exact")``): over
[t0, t1] the class means move as ``m(t1) = Phi m(t0) + xi``, ``xi ~ N(0, V)``, with
``Phi' = C Phi`` and ``V = int_{t0}^{t1} Phi(t1, s) sigma(s)^2 Q Phi(t1, s)^T ds``; the
within-class deviations gain independent ``N(0, int sigma^2)`` increments projected to zero
class mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy.integrate import quad, quad_vec, solve_ivp
from scipy.linalg import expm

from .model import (Constant, Impacts, LabelProjection, Identity, PowerLaw, make_field, as_schedule,
                    _as_numpy)

__all__ = ["drift_matrix", "class_mean_moments", "within_class_moments", "imodel_modes",
           "lmodel_modes", "mode_integral", "euler_rates", "mean_transition", "MeanTransition"]


def _counts(labels, K) -> np.ndarray:
    y = np.asarray(_as_numpy(labels)).astype(int)
    if y.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {y.shape}")
    if y.min() < 0 or y.max() >= K:
        raise ValueError(f"labels must lie in 0..{K - 1}")
    counts = np.bincount(y, minlength=K)
    if np.any(counts == 0):
        raise ValueError(f"classes {np.flatnonzero(counts == 0).tolist()} have no samples")
    return counts


def _field_blocks(field, K: int, p: int) -> np.ndarray:
    """(K, p, p): F_k with G(x, k) = F_k x."""
    field = make_field(field)
    if isinstance(field, Identity):
        return np.broadcast_to(np.eye(p), (K, p, p)).copy()
    if isinstance(field, LabelProjection):
        if p != K:
            raise ValueError(f"the L-model needs p = K, got p={p}, K={K}")
        d = np.eye(K) - 1.0 / K
        return np.stack([np.outer(d[k], d[k]) / (1.0 - 1.0 / K) for k in range(K)])
    raise ValueError(f"exact theory exists for the linear fields identity and label_projection, "
                     f"not {field.name!r}")


def drift_matrix(impacts: Impacts, counts, field, p: int, t: float, batch_index: int = 0) -> np.ndarray:
    """C(t) of shape (K p, K p): d vec(Xbar)/dt = C vec(Xbar) for a linear field."""
    K = impacts.K
    counts = np.asarray(counts, dtype=float)
    E = impacts.matrix(t)
    E = E[batch_index] if E.ndim == 3 else E
    F = _field_blocks(field, K, p)
    w = E * (counts / counts.sum())[None, :]
    C = np.einsum("ck,kab->cakb", w, F).reshape(K * p, K * p)
    return C


def class_mean_moments(impacts: Impacts, labels, field, ts, m0, sigma=0.0, batch_index: int = 0,
                       rtol: float = 1e-10, atol: float = 1e-12):
    """Exact mean and covariance of the class means over time, by the moment ODEs.

    Parameters
    ----------
    impacts : Impacts (any K x K, time-varying allowed; ``batch_index`` picks a batch entry).
    labels : (N,) labels (class sizes n_k).
    field : "identity" or "label_projection" (or the DriftField).
    ts : (T,) times, ts[0] the start.
    m0 : (K, p) class means at ts[0].
    sigma : additive noise level (float, callable of t, or Schedule; scalar).

    Returns
    -------
    mean : (T, K, p);  cov : (T, K p, K p), the covariance of vec(Xbar) (class-major order).
    """
    K = impacts.K
    counts = _counts(labels, K)
    m0 = np.asarray(_as_numpy(m0), dtype=float)
    if m0.ndim != 2 or m0.shape[0] != K:
        raise ValueError(f"m0 must have shape (K, p) = ({K}, p), got {m0.shape}")
    p = m0.shape[1]
    ts = np.asarray(ts, dtype=float)
    sig = as_schedule(sigma, "sigma", nonneg=True)
    Q = np.kron(np.diag(1.0 / counts), np.eye(p))
    D = K * p

    def rhs(t, z):
        C = drift_matrix(impacts, counts, field, p, t, batch_index)
        m = z[:D]
        P = z[D:].reshape(D, D)
        s = float(np.atleast_1d(sig(t))[min(batch_index, np.size(sig(t)) - 1)])
        dP = C @ P + P @ C.T + s * s * Q
        return np.concatenate([C @ m, dP.ravel()])

    z0 = np.concatenate([m0.ravel(), np.zeros(D * D)])
    if ts.shape[0] == 1:
        return m0[None], np.zeros((1, D, D))
    sol = solve_ivp(rhs, (ts[0], ts[-1]), z0, t_eval=ts, method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"moment ODE failed: {sol.message}")
    z = sol.y.T
    mean = z[:, :D].reshape(-1, K, p)
    cov = z[:, D:].reshape(-1, D, D)
    return mean, 0.5 * (cov + cov.transpose(0, 2, 1))


def within_class_moments(labels, ts, sigma=0.0, within0=None, K: Optional[int] = None):
    """Expected within-class second moment ``(1/n_k) sum_{y_j=k} (X_j - Xbar_k)(X_j - Xbar_k)^T``
    for a linear field with additive noise: ``within0 + (1 - 1/n_k) int_{ts[0]}^t sigma^2 ds I``.

    ``within0``: (K, p, p) at ts[0] (default zero, i.e. only the noise part with p = 1).
    Returns (T, K, p, p) (or (T, K) when within0 is None). Each diagonal entry, started from zero
    spread, is ``sigma^2 t chi^2_{n_k - 1} / n_k`` for constant sigma.
    """
    ts = np.asarray(ts, dtype=float)
    K = K if K is not None else int(np.max(_as_numpy(labels))) + 1
    counts = _counts(labels, K)
    sig = as_schedule(sigma, "sigma", nonneg=True)
    if sig.constant:
        s2 = float(np.atleast_1d(sig(0.0))[0]) ** 2 * (ts - ts[0])
    else:
        s2 = np.array([quad(lambda s: float(np.atleast_1d(sig(s))[0]) ** 2, ts[0], t)[0] for t in ts])
    v = s2[:, None] * (1.0 - 1.0 / counts)[None, :]                # (T, K)
    if within0 is None:
        return v
    within0 = np.asarray(within0, dtype=float)
    p = within0.shape[-1]
    return within0[None] + v[:, :, None, None] * np.eye(p)


def mode_integral(L, t: float, t0: float = 0.0) -> float:
    r"""``int_{t0}^t exp(2 (L(t) - L(s))) ds`` for a scalar function L (by quadrature)."""
    Lt = L(t)
    val, _ = quad(lambda s: np.exp(2.0 * (Lt - L(s))), t0, t, epsabs=1e-13, epsrel=1e-11, limit=200)
    return val


def _intra_inter_AB(impacts: Impacts, batch_index: int):
    if not impacts.is_intra_inter:
        raise ValueError("closed forms need intra/inter impacts (Impacts.intra_inter)")

    def pick(v):
        v = np.atleast_1d(v)
        return float(v[min(batch_index, v.size - 1)])

    return (lambda t: pick(impacts.alpha.integral(t))), (lambda t: pick(impacts.beta.integral(t)))


def imodel_modes(impacts: Impacts, n: int, ts, sigma: float = 0.0, batch_index: int = 0):
    """Closed form for the balanced I-model (n samples per class, additive constant sigma).

    Returns a dict with ``grand_growth`` (T,) = exp((A + (K-1)B)/K), ``centred_growth`` (T,) =
    exp((A - B)/K), and ``cov`` (T, K, K), the covariance of (Xbar_0, ..., Xbar_{K-1}) per
    coordinate (starting from deterministic means). Mean of Xbar_k(t) =
    grand_growth * xbar(0) + centred_growth * (Xbar_k(0) - xbar(0)).
    """
    K = impacts.K
    A, B = _intra_inter_AB(impacts, batch_index)
    ts = np.asarray(ts, dtype=float)
    L1 = lambda t: (A(t) + (K - 1) * B(t)) / K
    L2 = lambda t: (A(t) - B(t)) / K
    g1 = np.exp([L1(t) for t in ts])
    g2 = np.exp([L2(t) for t in ts])
    J = np.ones((K, K)) / K
    cov = np.stack([(sigma ** 2 / n) * (mode_integral(L1, t) * J + mode_integral(L2, t) * (np.eye(K) - J))
                    if t > 0 else np.zeros((K, K)) for t in ts])
    return {"grand_growth": g1, "centred_growth": g2, "cov": cov}


def lmodel_modes(impacts: Impacts, ts, batch_index: int = 0):
    """Closed form for the balanced L-model: growth factors of the label coordinates
    y_k = d_k . Xbar_k / |d_k|^2: ``symmetric`` = exp((A - B)/K) for the mean over k, and
    ``antisymmetric`` = exp((A + B/(K-1))/K) for y_k - mean(y)."""
    K = impacts.K
    if K < 2:
        raise ValueError("the L-model needs K >= 2")
    A, B = _intra_inter_AB(impacts, batch_index)
    ts = np.asarray(ts, dtype=float)
    return {"symmetric": np.exp([(A(t) - B(t)) / K for t in ts]),
            "antisymmetric": np.exp([(A(t) + B(t) / (K - 1)) / K for t in ts])}


def euler_rates(alpha: float, beta: float, K: int, dt: float, field: str = "identity"):
    """Effective constant impacts ``(alpha_eff, beta_eff)`` seen in the Euler recursion of step dt.

    The mean modes of the balanced linear models are multiplied by ``(1 + dt lam)`` per step
    instead of ``exp(dt lam)``; an estimator applied to Euler paths recovers the rates
    ``log(1 + dt lam)/dt``. I-model: lam = (alpha + (K-1) beta)/K (grand mean) and
    (alpha - beta)/K (centred means); L-model ("label_projection"): (alpha - beta)/K (symmetric)
    and (alpha + beta/(K-1))/K (antisymmetric). Inverting these gives alpha_eff, beta_eff.
    """
    if field == "identity":
        r1 = np.log1p(dt * (alpha + (K - 1) * beta) / K) / dt
        r2 = np.log1p(dt * (alpha - beta) / K) / dt
        return r1 + (K - 1) * r2, r1 - r2
    if field == "label_projection":
        u = K * np.log1p(dt * (alpha - beta) / K) / dt
        v = K * np.log1p(dt * (alpha + beta / (K - 1)) / K) / dt
        b = (K - 1) * (v - u) / K
        return u + b, b
    raise ValueError(f"euler_rates is defined for identity and label_projection, not {field!r}")


# ============================================================================================
# exact transitions of the class means between two times (the exact sampler)
# ============================================================================================
@dataclass
class MeanTransition:
    r"""The exact Gaussian transition of the class means over ``[t0, t1]``.

    ``m(t1) = phi @ m(t0) + chol @ z`` with ``z ~ N(0, I)``, i.e. covariance
    ``V = chol chol^T``, for every batch entry (leading axis of length 1 or B).

    ``per_coordinate`` True (identity field): D = K and the matrices act on the K class means of
    each feature coordinate separately (the full transition is ``kron(phi, I_p)``); False
    (label projection): D = K p on ``vec(Xbar)`` in class-major order. ``within_var`` (B or 1,)
    is ``int_{t0}^{t1} sigma^2``, the variance per coordinate that every sample's Brownian
    motion gains (its projection to zero class mean is the within-class increment).
    """

    phi: np.ndarray
    chol: np.ndarray
    within_var: np.ndarray
    per_coordinate: bool

    @property
    def cov(self) -> np.ndarray:
        return self.chol @ np.swapaxes(self.chol, -1, -2)


def _reduced_system(impacts: Impacts, counts: np.ndarray, field, p: int, t: float):
    """C(t) as (B|1, D, D): D = K (identity, per coordinate) or K p (label projection)."""
    E = impacts.matrix(t)
    E = E[None] if E.ndim == 2 else E
    w = E * (counts / counts.sum())[None, None, :]
    if isinstance(field, Identity):
        return w
    F = _field_blocks(field, impacts.K, p)
    K = impacts.K
    return np.einsum("bck,kxy->bcxky", w, F).reshape(E.shape[0], K * p, K * p)


def _noise_matrix(field, counts: np.ndarray, p: int) -> np.ndarray:
    q = np.diag(1.0 / counts)
    return q if isinstance(field, Identity) else np.kron(q, np.eye(p))


def _psd_sqrt(V: np.ndarray) -> np.ndarray:
    """A square root L (L L^T = V) of each symmetric PSD matrix of a (b, D, D) stack: the
    Cholesky factor where V is positive definite, else from the eigen-decomposition (sigma = 0
    gives V = 0). Non-finite matrices give NaN."""
    out = np.full(V.shape, np.nan)
    ok = np.isfinite(V).reshape(V.shape[0], -1).all(1)
    sym = 0.5 * (V[ok] + np.swapaxes(V[ok], 1, 2))
    try:
        out[ok] = np.linalg.cholesky(sym)
    except np.linalg.LinAlgError:
        for b, v in zip(np.flatnonzero(ok), sym):
            try:
                out[b] = np.linalg.cholesky(v)
            except np.linalg.LinAlgError:
                lam, U = np.linalg.eigh(v)
                out[b] = U * np.sqrt(np.clip(lam, 0.0, None))
    return out


def _sqrt_sum(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """L with L L^T = A A^T + B B^T (stacks (b, D, D)), from the QR factorisation of [A B]^T:
    the covariance is never formed, so modes growing at very different rates keep their
    relative precision."""
    out = np.full(A.shape, np.nan)
    ok = (np.isfinite(A).reshape(A.shape[0], -1).all(1) & np.isfinite(B).reshape(B.shape[0], -1).all(1))
    if ok.any():
        stacked = np.concatenate([A[ok], B[ok]], axis=2).transpose(0, 2, 1)
        out[ok] = np.swapaxes(np.linalg.qr(stacked, mode="r"), -1, -2)
    return out


def _row_keys(impacts: Impacts, sig, B: int) -> Optional[np.ndarray]:
    """Per-batch-row keys such that equal keys mean equal E(t) and sigma(t) for all t (rows of a
    sweep that differ only by replicate), or None when that cannot be told (user callables)."""
    cols = []
    schedules = [sig]
    if impacts.is_intra_inter:
        schedules += [impacts.alpha, impacts.beta]
    elif impacts.constant:
        m = impacts.matrix(0.0)
        cols.append(np.broadcast_to(m.reshape(-1, impacts.K ** 2) if m.ndim == 3 else m.reshape(1, -1),
                                    (B, impacts.K ** 2)))
    else:
        return None
    for s in schedules:
        if isinstance(s, Constant):
            parts = [s.value]
        elif isinstance(s, PowerLaw):
            parts = [s.a0, s.r, np.array(s.t0)]
        else:
            return None
        for v in parts:
            cols.append(np.broadcast_to(np.atleast_1d(v).astype(float).reshape(-1, 1), (B, 1)))
    return np.concatenate(cols, axis=1)


def _sigma2(sig, t: float, B: int) -> np.ndarray:
    return np.broadcast_to(np.atleast_1d(np.asarray(sig(t), dtype=float)) ** 2, (B,)).copy()


def mean_transition(impacts: Impacts, labels, field, p: int, t0: float, t1: float, sigma=0.0,
                    rtol: float = 1e-10) -> MeanTransition:
    r"""The exact transition of the class means of a linear LE-SDE over ``[t0, t1]``.

    For G(x, k) = F_k x the class means obey ``dm = C(t) m dt + sigma(t) Q^{1/2} dW``
    (module docstring), so ``m(t1) = Phi m(t0) + xi`` with ``Phi`` the fundamental matrix
    (``Phi' = C Phi``) and ``xi ~ N(0, V)``, ``V = int Phi(t1, s) sigma^2 Q Phi(t1, s)^T ds``.

    * Constant E and sigma: ``(Phi, V)`` over a short step ``delta = (t1 - t0)/2^k`` with
      ``|C delta| <= 1/2`` from one matrix exponential of the block matrix
      ``[[-C, sigma^2 Q], [0, C^T]] delta`` (Van Loan, IEEE TAC 1978), then k doublings
      ``Phi <- Phi Phi``, ``L <- sqrt(Phi L L^T Phi^T + L L^T)`` carried out on the square
      root L of V by QR factorisations. V itself is never formed, so it cannot overflow while
      the state is still finite (V ~ exp(2 lambda t) would overflow float64 at half the growth
      the state survives: the non-co-moving I-model with alpha = beta = 1 at t = 400).
    * Time-varying E or sigma: the matrix ODEs ``Phi' = C Phi``,
      ``V' = C V + V C^T + sigma^2 Q`` integrated by DOP853 (relative tolerance ``rtol``);
      here V is formed, so a mode whose variance exceeds 1.8e308 is reported as overflow.

    Precision: in class-mean coordinates a slow mode riding on a fast one (the I-model's centred
    means on its grand mean) is resolved to about 1e-16 times the fast mode's size, as in the
    state itself; the co-moving frame of :mod:`lesde.phase` removes the fast mode.

    Batched impacts / sigma give one transition per batch entry (rows that share their
    parameters, e.g. the replicates of a sweep, are computed once). Entries that overflow float64
    come back as NaN.

    Parameters
    ----------
    impacts : Impacts (any K x K, possibly batched and time-varying).
    labels : (N,) labels (class sizes n_k; any sizes).
    field : "identity" or "label_projection" (or the DriftField).
    p : feature dimension.
    t0, t1 : the interval (t1 > t0).
    sigma : additive noise level (float, (B,), callable of t, Schedule).

    Returns
    -------
    :class:`MeanTransition`.
    """
    K = impacts.K
    counts = _counts(labels, K).astype(float)
    field = make_field(field)
    _field_blocks(field, K, p)  # validates the field (linear, p = K for the L-model)
    t0, t1 = float(t0), float(t1)
    if not t1 > t0:
        raise ValueError(f"the interval must have t1 > t0, got [{t0}, {t1}]")
    sig = as_schedule(sigma, "sigma", nonneg=True)
    Bi = impacts.batch_size or 1
    Bs = sig.batch_size or 1
    if Bi != Bs and 1 not in (Bi, Bs):
        raise ValueError(f"impacts batch {Bi} and sigma batch {Bs} differ")
    B = max(Bi, Bs)
    Q = _noise_matrix(field, counts, p)
    D = Q.shape[0]
    keys = _row_keys(impacts, sig, B)
    if keys is not None:
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
    else:
        first, inverse = np.arange(B), np.arange(B)
    dt = t1 - t0

    def pick(a):  # (1|B, ...) -> rows `first`
        a = np.broadcast_to(a, (B,) + a.shape[1:])
        return a[first]

    with np.errstate(all="ignore"):
        if impacts.constant and sig.constant:
            C = pick(_reduced_system(impacts, counts, field, p, t0))
            s2 = pick(_sigma2(sig, t0, B))
            norm = np.abs(C).sum(1).max() * dt if C.size else 0.0
            k = int(max(0, math.ceil(math.log2(norm / 0.5)))) if norm > 0.5 else 0
            delta = dt / 2.0 ** k
            u = C.shape[0]
            M = np.zeros((u, 2 * D, 2 * D))
            M[:, :D, :D] = -C * delta
            M[:, :D, D:] = s2[:, None, None] * Q * delta
            M[:, D:, D:] = np.swapaxes(C, 1, 2) * delta
            Fm = expm(M)
            phi = np.swapaxes(Fm[:, D:, D:], 1, 2)
            L = _psd_sqrt(phi @ Fm[:, :D, D:])
            for _ in range(k):
                L = _sqrt_sum(phi @ L, L)
                phi = phi @ phi
            within = s2 * dt
        else:
            phi, V = _integrate_moments(impacts, sig, counts, field, p, Q, t0, t1, B, first, rtol)
            L = _psd_sqrt(V)
            if sig.constant:
                within = pick(_sigma2(sig, t0, B)) * dt
            else:
                within = np.atleast_1d(quad_vec(lambda s: _sigma2(sig, s, B)[first], t0, t1,
                                                epsabs=0.0, epsrel=1e-10)[0])
    bad = ~(np.isfinite(phi).reshape(len(first), -1).all(1) & np.isfinite(L).reshape(len(first), -1).all(1))
    phi[bad] = np.nan
    L[bad] = np.nan
    return MeanTransition(phi=phi[inverse], chol=L[inverse], within_var=within[inverse],
                          per_coordinate=isinstance(field, Identity))


def _integrate_moments(impacts, sig, counts, field, p, Q, t0, t1, B, rows, rtol):
    """(Phi, V) over [t0, t1] for the batch rows ``rows`` by the matrix ODEs (DOP853)."""
    u, D = len(rows), Q.shape[0]
    # V is integrated in units of a typical sigma^2 per row so that the absolute tolerance is
    # meaningful whatever the noise level
    probe = np.stack([_sigma2(sig, t, B)[rows] for t in (t0, 0.5 * (t0 + t1), t1)])
    scale = probe.max(0)
    scale[~(scale > 0)] = 1.0

    def system(t):
        C = _reduced_system(impacts, counts, field, p, t)
        return np.broadcast_to(C, (B, D, D))[rows]

    def rhs(t, z):
        z = z.reshape(u, 2, D, D)
        C = system(t)
        s2 = _sigma2(sig, t, B)[rows] / scale
        dphi = C @ z[:, 0]
        CV = C @ z[:, 1]
        dV = CV + np.swapaxes(CV, 1, 2) + s2[:, None, None] * Q
        return np.stack([dphi, dV], 1).ravel()

    z0 = np.zeros((u, 2, D, D))
    z0[:, 0] = np.eye(D)
    sol = solve_ivp(rhs, (t0, t1), z0.ravel(), method="DOP853", rtol=rtol, atol=1e-12 * rtol / 1e-10)
    if sol.success and np.all(np.isfinite(sol.y[:, -1])):
        z = sol.y[:, -1].reshape(u, 2, D, D)
        return z[:, 0], z[:, 1] * scale[:, None, None]
    if u == 1:  # overflow (or a failing schedule): NaN, reported as overflow by the sampler
        return np.full((1, D, D), np.nan), np.full((1, D, D), np.nan)
    parts = [_integrate_moments(impacts, sig, counts, field, p, Q, t0, t1, B, rows[i:i + 1], rtol)
             for i in range(u)]
    return np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])
