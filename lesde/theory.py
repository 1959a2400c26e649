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
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from scipy.integrate import quad, solve_ivp

from .model import Impacts, LabelProjection, Identity, make_field, as_schedule, _as_numpy

__all__ = ["drift_matrix", "class_mean_moments", "within_class_moments", "imodel_modes",
           "lmodel_modes", "mode_integral", "euler_rates"]


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
