r"""Trajectory matching by multiple shooting: E(t) fitted by integrating the model's own drift.

For each logged interval [t_i, t_{i+1}] of each trial, the deterministic LE-SDE flow

    d/dt X_j = sum_k E(t; theta)[y_j, k] w_k Gbar_k(t),      X(t_i) = the logged state,

is integrated to t_{i+1} and its class means are compared with the logged ones. Every sample of
a class has the same drift, so the flow moves each class rigidly by a displacement
``delta_c(t)`` and only ``(K, p)`` numbers per interval evolve; the class means of G are taken
over the tracked samples moved by it (for a tracked subset, the tracked samples' class means of
G stand in for the whole training set's). All intervals start from logged states, so they are
integrated at once as one batch (multiple shooting), by a fixed-step classical Runge-Kutta (RK4)
scheme whose number of sub-steps is doubled until doubling changes the prediction by less than
``rtol_integration`` of the logged increments. The step is kept below the inverse of the drift's
fastest rate in its interval (``|E(t) diag(w)|_2`` times the field's derivative at the logged
states, which for the cross-entropy falls far below its bound 1/2 once the logits saturate).
Where that would need more than ``RK4_MAX_STEPS`` steps the drift is stiff (fitted to real
logs, a weakly identified shift of E's rows can be large: a fast restoring force on the average
prediction), and the linearly implicit, L-stable ROS2 scheme integrates it instead, with as many
steps as the same doubling test asks. Gradients come from torch autograd through the
integrator; the optimiser is L-BFGS (strong Wolfe line search); nothing differentiates the log.

The objective is a Gaussian quasi-likelihood: the residual ``r_i`` of the class-mean increments
(K p numbers per interval and trial) is weighted by the inverse of its covariance under the noise
model, ``Sigma_i = dt_i (sigma_i^2 diag(1/n_c) (x) I_p + h Q_i)``:

* additive noise sigma(t): the class mean of n_c tracked samples moves by sigma^2 dt / n_c per
  coordinate; sigma_i is estimated from the within-class deviations, which in the LE-SDE are pure
  noise (every sample of a class has the same drift): ``sigma_i^2 = sum |increment of X_j -
  Xbar_c|^2 / (dt_i p sum_c (n_c - 1))``, exact in distribution for the model;
* SGD sampling noise of learning rate h: ``Q_i = sum_k w_k (E_k E_k^T) (x) S_k - d d^T`` with
  ``E_k`` column k of E, ``S_k`` the class-k mean of ``G G^T`` and d the class drifts
  (background.md, "Noise"); h is the maximiser of the quasi-likelihood given sigma. SGD noise is
  the same for every sample of a class, so it moves class means and never the within-class spread.

Stages: (1) weights from sigma_i alone, (2) noise estimated from the stage-1 residuals, (3) the
quasi-likelihood fit with the full weights. The covariance of theta is the sandwich
``H^-1 (sum_i s_i s_i^T) H^-1`` (H the Gauss-Newton Hessian of the weighted objective, s_i the
score of interval i), valid when the weights are misspecified.

What it assumes, and where it is biased: the drift of the LE-SDE with the chosen field and a
parametrised E(t) (:class:`~lesde.fit.forms.ImpactForm`); if the true E(t) is outside the form,
the fit is the form's best approximation (e.g. a piecewise-linear E between knots). It has no
smoothing bias and no quadrature (left-point) bias, so coarse logs are fine. The deterministic
prediction ignores the noise's effect on the drift inside an interval: for a nonlinear G that is
a bias of order sigma^2 dt G'' per interval, small unless noise is large against the interval's
drift; the parametric bootstrap measures and corrects it.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import numpy as np
import torch

from ._base import Estimator, ImpactTailIndex
from ._fields import ClassMeanField, field_values
from .forms import ImpactForm
from .trajectory import Trajectory, as_trajectory, class_means

__all__ = ["ShootingEstimator"]

_NOISE = ("additive", "sgd", "both", "none")
_BANDS = ("auto", "sandwich", "parametric", "samples", "trials", "both", "none")
_INTERVALS = ("basic", "percentile", "normal")


# ============================================================================================
# the batched shooting problem
# ============================================================================================
class _Problem:
    """Class-mean increments of Bp replicate logs (same times, labels and weights), the start
    states of every interval, and the whitening of the residuals.

    ``x`` (Bp, R, T, N, p): the logs. Intervals are flattened to M = R (T - 1) per replicate.
    """

    def __init__(self, x: np.ndarray, ts: np.ndarray, labels: np.ndarray, K: int,
                 weights: np.ndarray, field, form: ImpactForm, dtype=torch.float64):
        Bp, R, T, N, p = x.shape
        self.Bp, self.R, self.T, self.N, self.p, self.K = Bp, R, T, N, p, K
        self.M = R * (T - 1)
        self.form = form
        self.cmf = ClassMeanField(field, labels, K, p, dtype)
        xt = torch.as_tensor(x, dtype=dtype)
        starts = xt[:, :, :-1].reshape(Bp * self.M, N, p)
        self.pre = self.cmf.prepare(starts)
        means = torch.as_tensor(class_means(x, labels, K), dtype=dtype)     # (Bp, R, T, K, p)
        self.target = (means[:, :, 1:] - means[:, :, :-1]).reshape(Bp, self.M, K, p)
        ts_t = torch.as_tensor(ts, dtype=dtype)
        self.t0 = ts_t[:-1].repeat(R)                                        # (M,)
        self.dt = torch.diff(ts_t).repeat(R)
        self.t0_np = np.tile(np.asarray(ts, dtype=float)[:-1], R)
        self.dt_np = np.tile(np.diff(np.asarray(ts, dtype=float)), R)
        self.w = torch.as_tensor(weights, dtype=dtype)
        self.whiten = None                                                   # (M, Kp, Kp)
        self.dtype = dtype
        self._stage_forms = {}
        self._ends = None

    def set_whitening(self, L: np.ndarray) -> None:
        self.whiten = torch.as_tensor(L, dtype=self.dtype)

    def predict(self, theta: torch.Tensor, S) -> torch.Tensor:
        """Predicted class-mean increments (Bp, M, K, p) by S steps per interval: S an int
        (classical RK4) or ``("ros2", n)`` (n steps of the linearly implicit, L-stable
        second-order Rosenbrock scheme ROS2, for stiff drifts)."""
        method, S = ("rk4", int(S)) if not isinstance(S, tuple) else (S[0], int(S[1]))
        Bp, M, K, p = self.Bp, self.M, self.K, self.p
        h = self.dt / S
        # E at the 2S + 1 stage times of every interval: (Bp, M, 2S + 1, K, K)
        if S not in self._stage_forms:
            frac = np.arange(2 * S + 1) / (2 * S)
            times = (self.t0_np[:, None] + self.dt_np[:, None] * frac[None, :]).reshape(-1)
            self._stage_forms[S] = self.form.at(times)
        E = self._stage_forms[S].E(theta).reshape(Bp * M, 2 * S + 1, K, K)
        wcol = self.w[None, :, None]
        hh = h.repeat(Bp)[:, None, None]

        def f(delta, j):
            g = self.cmf.gbar(self.pre, delta) * wcol
            return torch.matmul(E[:, j], g)

        delta = torch.zeros(Bp * M, K, p, dtype=self.dtype)
        if method == "ros2":
            return self._ros2(E, f, delta, hh, S).reshape(Bp, M, K, p)
        for s in range(S):
            k1 = f(delta, 2 * s)
            k2 = f(delta + 0.5 * hh * k1, 2 * s + 1)
            k3 = f(delta + 0.5 * hh * k2, 2 * s + 1)
            k4 = f(delta + hh * k3, 2 * s + 2)
            delta = delta + hh / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        return delta.reshape(Bp, M, K, p)

    def _ros2(self, E, f, delta, hh, S):
        """ROS2 (Verwer, Spee, Blom and Hundsdorfer 1999, SIAM J. Sci. Comput. 20):
        ``W k1 = f(t_n, y_n)``, ``W k2 = f(t_n + h, y_n + h k1) - 2 k1``,
        ``y_{n+1} = y_n + h (3 k1 + k2) / 2`` with ``W = I - gamma h J``, gamma = 1 + 1/sqrt 2.
        It is second order for any matrix J (a W-method): J is the drift's Jacobian at the step's
        start, ``J[c, k] = E(t_n)[c, k] w_k dGbar_k/ddelta_k``, with the field's derivative
        taken as a constant of theta (the gradient then differs from the scheme's by a term of
        the scheme's own order, h^2)."""
        B, K, p = delta.shape
        n = K * p
        gamma = 1.0 + 1.0 / math.sqrt(2.0)
        eye = torch.eye(n, dtype=self.dtype)
        for s in range(S):
            jg = self.cmf.jacobian(self.pre, delta)
            J = torch.einsum("bck,k,bkxy->bcxky", E[:, 2 * s], self.w, jg).reshape(B, n, n)
            LU = torch.linalg.lu_factor(eye - gamma * hh * J)
            k1 = f(delta, 2 * s)
            k1 = torch.linalg.lu_solve(*LU, k1.reshape(B, n, 1)).reshape(B, K, p)
            k2 = f(delta + hh * k1, 2 * s + 2) - 2.0 * k1
            k2 = torch.linalg.lu_solve(*LU, k2.reshape(B, n, 1)).reshape(B, K, p)
            delta = delta + hh * (1.5 * k1 + 0.5 * k2)
        return delta

    def residual(self, theta: torch.Tensor, S: int) -> torch.Tensor:
        """Whitened residuals (Bp, M, K p)."""
        r = (self.target - self.predict(theta, S)).reshape(self.Bp, self.M, -1)
        return torch.einsum("mij,bmj->bmi", self.whiten, r)

    def trapezoid_residual(self, theta: torch.Tensor, G_start: torch.Tensor,
                           G_end: torch.Tensor) -> torch.Tensor:
        """Whitened residuals (M K p,) of the first replicate under the trapezoid rule
        ``dt/2 (E(t_i) w Gbar(t_i) + E(t_{i+1}) w Gbar(t_{i+1}))`` with the *logged* Gbar at both
        ends (G_* (M, K, p)): a cheap surrogate of the shooting prediction, used to start and to
        precondition the optimisation."""
        w = self.w[None, :, None]
        if self._ends is None or self._ends[0].form is not self.form:
            self._ends = (self.form.at(self.t0_np), self.form.at(self.t0_np + self.dt_np))
        Ea, Eb = self._ends[0].E(theta), self._ends[1].E(theta)
        pred = 0.5 * self.dt[:, None, None] * (torch.matmul(Ea, G_start * w)
                                               + torch.matmul(Eb, G_end * w))
        r = (self.target[0] - pred).reshape(self.M, -1)
        return torch.einsum("mij,mj->mi", self.whiten, r).reshape(-1)


def _lbfgs(fun, theta0: torch.Tensor, max_iter: int, tol: float,
           C: Optional[torch.Tensor] = None, change: Optional[float] = None) -> tuple:
    """Minimise fun(theta) (a scalar) by L-BFGS from theta0 in the coordinates u of
    ``theta = theta0 + u C^T`` (C a preconditioner, e.g. the inverse square root of an
    approximate Hessian; theta0 may carry leading replicate dimensions); returns
    (theta, n_evals, loss). It stops when the gradient (of the loss scaled to 1 at the start)
    is below ``tol``, or when an iteration lowers the loss by less than ``change`` in absolute
    terms (for a quasi-likelihood, 1e-6 is far below any statistical difference) or, without
    ``change``, by less than 1e-15 relative."""
    ref = theta0.detach().clone()
    Ct = None if C is None else C.T.contiguous()

    def theta_of(u):
        return ref + (u if Ct is None else torch.matmul(u, Ct))

    u = torch.zeros_like(ref, requires_grad=True)
    with torch.no_grad():
        scale = float(fun(ref)) + 1e-300
    n = [0]
    tchange = 1e-15 if change is None else max(change / scale, 1e-15)

    def make():
        return torch.optim.LBFGS([u], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25),
                                 history_size=30, tolerance_grad=tol, tolerance_change=tchange,
                                 line_search_fn="strong_wolfe")

    opt = make()

    def closure():
        opt.zero_grad()
        loss = fun(theta_of(u)) / scale
        loss.backward()
        n[0] += 1
        return loss

    last = None
    for _ in range(4):          # LBFGS may stop on a line-search failure; restart its memory
        opt.step(closure)
        with torch.no_grad():
            cur = float(fun(theta_of(u))) / scale
        if (last is not None and (cur >= last * (1 - 1e-10) or (last - cur) * scale < (
                change or 0.0))) or n[0] >= max_iter:
            last = cur
            break
        last = cur
        opt = make()
    with torch.no_grad():
        return theta_of(u).detach(), n[0], last * scale


def _preconditioner(H: np.ndarray, floor: float = 1e-10) -> torch.Tensor:
    """C = H^(-1/2) (symmetric), eigenvalues below floor x the largest raised to it."""
    vals, vecs = np.linalg.eigh(0.5 * (H + H.T))
    top = max(float(vals.max()), 1e-300)
    vals = np.maximum(vals, floor * top)
    return torch.as_tensor((vecs / np.sqrt(vals)) @ vecs.T)


def _jacobian(fun, theta: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Jacobian (n_out, P) of the vector function fun at theta (P,), by forward mode in chunks
    of tangent directions."""
    from torch.func import jvp, vmap

    P = theta.shape[0]
    eye = torch.eye(P, dtype=theta.dtype)
    cols = []
    for a in range(0, P, chunk):
        V = eye[a:a + chunk]
        cols.append(vmap(lambda v: jvp(fun, (theta,), (v,))[1])(V))
    return torch.cat(cols, 0).reshape(P, -1).T


# ============================================================================================
# noise
# ============================================================================================
def within_class_sigma2(x: np.ndarray, labels: np.ndarray, K: int, ts: np.ndarray):
    """Per-interval additive-noise variance from within-class deviation increments, pooled over
    trials: (T - 1,) values and their degrees of freedom. x (R, T, N, p)."""
    R, T, N, p = x.shape
    counts = np.bincount(labels, minlength=K)
    dof = R * p * int(np.sum(counts - 1))
    if dof == 0:
        return None, 0
    dev = x - class_means(x, labels, K)[:, :, labels]                    # (R, T, N, p)
    inc = np.diff(dev, axis=1)
    ss = (inc ** 2).sum(axis=(0, 2, 3))                                   # (T - 1,)
    return ss / (np.diff(ts) * dof), dof


def sgd_covariance(G: np.ndarray, labels: np.ndarray, K: int, w: np.ndarray,
                   E: np.ndarray) -> np.ndarray:
    """Q (M, K p, K p) of the SGD noise per unit time and unit learning rate of the class means.

    G (M, N, p) the drift field at the start states, E (M, K, K). With ``v_j = (E[c, y_j] G_j -
    d_c)_c`` the noise of one step's draw, ``Q = sum_k w_k mean_{j in k} v_j v_j^T =
    sum_k w_k (E_k E_k^T) (x) S_k - d d^T``, S_k the class-k mean of G G^T."""
    M, N, p = G.shape
    onehot = np.eye(K)[labels] / np.bincount(labels, minlength=K)           # (N, K)
    S = np.einsum("nk,mna,mnb->mkab", onehot, G, G)                        # (M, K, p, p)
    gbar = np.einsum("nk,mna->mka", onehot, G)                             # (M, K, p)
    d = np.einsum("mck,k,mka->mca", E, w, gbar).reshape(M, K * p)          # (M, K p)
    EE = np.einsum("mck,mdk,k->mkcd", E, E, w)                             # (M, K, K, K)
    Q = np.einsum("mkcd,mkab->mcadb", EE, S).reshape(M, K * p, K * p)
    return Q - d[:, :, None] * d[:, None, :]


#: the whitening's eigenvalue floor, relative to the largest eigenvalue of each interval's
#: residual covariance. SGD noise alone leaves some directions of the class means (nearly)
#: without noise; there the residual is model error (the deterministic prediction ignores the
#: noise's effect on the drift inside an interval), coherent across intervals, and a weight
#: 1,000 times that of the noisiest direction (floor 1e-6) let it drive the estimate while the
#: sandwich, which assumes independent intervals, missed it: on the coverage matrix's SGD-noise
#: cells (40 replicates each) the bands covered 0.82-0.85 (lr 0.05) and 0.82 for beta (lr 0.5,
#: coarse). At 1e-2 (weights at most 10 times) they cover 0.93-0.97 with a smaller spread of
#: the estimates; 1e-3 was still 0.85-0.90 and 1e-1 calibrated but wider and more biased.
WHITEN_FLOOR = 1e-2


def _inv_sqrt(S: np.ndarray, floor: float = WHITEN_FLOOR) -> np.ndarray:
    """Symmetric S^(-1/2) of each (n, n) matrix, eigenvalues raised to at least floor x the
    largest (a direction the noise model says is nearly noise-free gets a large, finite weight;
    see :data:`WHITEN_FLOOR`)."""
    vals, vecs = np.linalg.eigh(S)
    top = np.maximum(vals.max(axis=-1, keepdims=True), 1e-300)
    inv = 1.0 / np.sqrt(np.maximum(vals, floor * top))
    return np.einsum("mij,mj,mkj->mik", vecs, inv, vecs)


def _fit_lr(res: np.ndarray, dt: np.ndarray, D: np.ndarray, Q: np.ndarray) -> float:
    """Maximum quasi-likelihood h >= 0 for residual covariances dt (D + h Q); res (M, n),
    D (M, n) diagonal, Q (M, n, n)."""
    from scipy.optimize import minimize_scalar

    if np.all(D <= 0):                              # SGD noise alone: closed form
        Qi = np.linalg.pinv(Q, hermitian=True, rcond=1e-10)
        rank = np.linalg.matrix_rank(Q, hermitian=True, rtol=1e-10)
        quad = np.einsum("mi,mij,mj->m", res, Qi, res) / dt
        return float(quad.sum() / max(rank.sum(), 1))
    Dm = 1.0 / np.sqrt(D)
    A = Q * Dm[:, :, None] * Dm[:, None, :]
    lam, U = np.linalg.eigh(A)
    lam = np.maximum(lam, 0.0)
    z2 = np.einsum("mij,mi->mj", U, res * Dm) ** 2 / dt[:, None]

    def nll(logh):
        hv = math.exp(logh)
        s = 1.0 + hv * lam
        return 0.5 * float(np.sum(np.log(s) + z2 / s))

    base = 0.5 * float(np.sum(z2))
    scale = float(np.sum(z2) / max(np.sum(lam), 1e-300))
    lo, hi = math.log(max(scale, 1e-300) * 1e-8), math.log(max(scale, 1e-300) * 1e3)
    best = minimize_scalar(nll, bounds=(lo, hi), method="bounded",
                           options={"xatol": 1e-6})
    return float(math.exp(best.x)) if best.fun < base else 0.0


# ============================================================================================
# the estimator
# ============================================================================================
class ShootingEstimator(ImpactTailIndex, Estimator):
    r"""E(t) of the LE-SDE fitted by trajectory matching (multiple shooting); see the module
    docstring for the method, its assumptions and its biases.

    Hyper-parameters
    ----------------
    field : the drift field G ("identity", "label_projection", "cross_entropy", a
        :class:`~lesde.model.DriftField` such as ``CrossEntropyReadout(W)``, or a callable, which
        must not depend on t).
    matrix : "intra_inter" (alpha, beta; default) or "full" (all K^2 entries).
    time : "piecewise_linear" (default), "constant" or "power_law".
    knots : knot times of the piecewise-linear form, or their number (default:
        ``DEFAULT_KNOTS`` = 21 equally spaced times from the first to the last logged time,
        fewer on logs of under 41 logged times: at least two logged intervals per segment; a
        number given is capped at one knot per logged time). The number sets the form's bias
        against its variance: a smooth E(t) with curvature E'' is missed by about
        h^2 |E''| / 8 at knot spacing h, which no band of the fit can see (the parametric
        bootstrap refits the form it fitted). On the coverage matrix (``benchmarks/``) 11 knots
        were biased by 2.4 standard errors at the peak of rise-then-decay impacts at low noise
        (coverage of alpha 0.46 there); 21 knots cover there. The price is variance: bands
        1.4-1.6 times wider at times that are knots of both forms, up to 2.5 times at the
        midpoint of a coarse segment (where the coarse form averages two knots); pass
        ``knots=11`` for impacts known to change slowly.
    t0 : time scale of the power law ``a (1 + t/t0)^(-r)`` (default 1.0).
    noise : the noise model of the weights and of the parametric bootstrap: "both" (default:
        additive sigma(t) and SGD noise with a fitted learning rate), "additive", "sgd", or
        "none" (unit weights per sample; no noise fitted, no parametric bootstrap).
    bootstrap : how the bands are made: "auto" (the default: "parametric" when
        ``n_bootstrap > 0``, else "sandwich"), "sandwich" (the quasi-likelihood sandwich, no
        resampling), "parametric" (simulate the fitted SDE with its fitted noise from the logged
        X(t_0) of each trial, at the logged times, and refit), "samples" (resample the tracked
        samples within each class), "trials" (resample trials), "both", or "none".
    n_bootstrap : resamples for the bootstrap bands (default 200).
    interval : "basic" (default: ``2 theta_hat - quantiles``, which moves the band against
        the estimator's bias as the bootstrap measures it), "percentile" or "normal" (theta_hat
        minus the bootstrap bias, +- z times the bootstrap standard deviation).
    level : level of the bands (0.95).
    seed : seed of the bootstrap.
    n_jobs, client : bootstrap refits run in chunks over ``n_jobs`` processes (joblib), or on a
        Dask ``client`` (``distributed.Client``); default one process.
    substeps : initial RK4 sub-steps per logged interval (doubled until converged).
    rtol_integration : convergence of the integration: doubling the sub-steps changes the
        predicted increments by less than this times the largest logged class-mean increment,
        or (with a fitted noise) by less than 0.01 of the residuals' noise standard deviation.
    max_iter : L-BFGS iterations per stage.
    max_stiffness : bound on the fitted flow's stiffness, ``rate_i dt_i <= max_stiffness`` in
        every logged interval (rate_i: ``|E(t) diag(w)|_2`` times the field's derivative at
        the logged states), held by a quadratic barrier (default 32; None: no bound). A flow
        that stiff relaxes completely within an interval, so the log cannot tell it from a
        stiffer one; when the fit presses against the bound it warns and marks E as not
        identified. On synthetic logs of the model the bound is far from active.

    Attributes after fit
    --------------------
    ts_ (T,), form_ (:class:`~lesde.fit.forms.ImpactForm`), theta_ (P,), theta_cov_ (P, P)
    (sandwich), theta_se_ (P,), E_ (T, K, K) at the logged times, alpha_, beta_ (T,) (for the
    intra/inter form: the diagonal and off-diagonal of E; for the full form, the means of E's
    diagonal and off-diagonal), A_, B_ (T,) their integrals from ts[0], sigma_ (T - 1,) the
    additive noise per interval, lr_ (the SGD noise's learning rate; 0 when not fitted),
    noise_ (the noise model used), bands_ (dict name -> (2, ...) lower/upper: "alpha", "beta",
    "A", "B", "E", "theta"), se_ (the same names: standard errors), band_method_,
    steps_ (the integration: RK4 steps per interval, or ("ros2", steps)), n_substeps_,
    integrator_ ("rk4" or "ros2"), integration_error_, condition_ (condition number of the
    Gauss-Newton Hessian
    with unit-diagonal scaling), identified_ (False when it exceeds ``CONDITION_WARN``),
    loss_ (the weighted residual sum of squares), n_residuals_, aic_, bic_, n_evals_.
    """

    _params = ("field", "matrix", "time", "knots", "t0", "noise", "bootstrap", "n_bootstrap",
               "interval", "level", "seed", "n_jobs", "client", "substeps",
               "rtol_integration", "max_iter", "max_stiffness")

    #: condition number of the scaled Gauss-Newton Hessian above which E is reported as not
    #: identified (with a warning; its bands are then wide)
    CONDITION_WARN = 1e6
    #: for fields whose class means of G sum to zero over the coordinates (cross-entropy on
    #: logits, label projection): below this size of sum_k w_k Gbar_k relative to the drift's
    #: regressors (median over the log) a shift of a row of E is reported as not identified
    SHIFT_MIN = 0.15
    #: knots of the default piecewise-linear form (see ``knots``)
    DEFAULT_KNOTS = 21

    def __init__(self, field="cross_entropy", matrix: str = "intra_inter",
                 time: str = "piecewise_linear", knots=None, t0: float = 1.0,
                 noise: str = "both", bootstrap: str = "auto", n_bootstrap: int = 200,
                 interval: str = "basic", level: float = 0.95, seed: int = 0,
                 n_jobs: int = 1, client=None, substeps: int = 2,
                 rtol_integration: float = 1e-6, max_iter: int = 300,
                 max_stiffness: Optional[float] = 32.0):
        self.field = field
        self.matrix = matrix
        self.time = time
        self.knots = knots
        self.t0 = t0
        self.noise = noise
        self.bootstrap = bootstrap
        self.n_bootstrap = n_bootstrap
        self.interval = interval
        self.level = level
        self.seed = seed
        self.n_jobs = n_jobs
        self.client = client
        self.substeps = substeps
        self.rtol_integration = rtol_integration
        self.max_iter = max_iter
        self.max_stiffness = max_stiffness

    # ----------------------------------------------------------------------------------------
    def _check(self):
        self._check_level_and_boot()
        if self.noise not in _NOISE:
            raise ValueError(f"noise must be one of {', '.join(_NOISE)}, got {self.noise!r}")
        if self.bootstrap not in _BANDS:
            raise ValueError(f"bootstrap must be one of {', '.join(_BANDS)}, got "
                             f"{self.bootstrap!r}")
        if self.interval not in _INTERVALS:
            raise ValueError(f"interval must be one of {', '.join(_INTERVALS)}, got "
                             f"{self.interval!r}")
        if int(self.substeps) != self.substeps or self.substeps < 1:
            raise ValueError(f"substeps must be a positive integer, got {self.substeps}")
        if int(self.n_jobs) != self.n_jobs or self.n_jobs < 1:
            raise ValueError(f"n_jobs must be a positive integer, got {self.n_jobs}")

    def _make_form(self, traj: Trajectory) -> ImpactForm:
        knots = None
        if self.time == "piecewise_linear":
            if self.knots is None or np.isscalar(self.knots):
                if self.knots is None:      # at least two logged intervals per segment
                    m = min(self.DEFAULT_KNOTS, (traj.T - 1) // 2 + 1)
                else:
                    m = int(self.knots)
                if m < 1:
                    raise ValueError(f"knots must be a positive number or a list of times, "
                                     f"got {self.knots}")
                m = min(m, traj.T)
                knots = np.linspace(traj.ts[0], traj.ts[-1], m)
            else:
                knots = np.asarray(self.knots, dtype=float)
        return ImpactForm(traj.K, self.matrix, self.time, knots, self.t0)

    def _resolved_band(self) -> str:
        if self.bootstrap != "auto":
            return self.bootstrap
        if self.noise == "none":
            return "sandwich"
        return "parametric" if self.n_bootstrap > 0 else "sandwich"

    # ----------------------------------------------------------------------------------------
    def fit(self, trajectory, **kwargs) -> "ShootingEstimator":
        """Fit E(t), the noise and the bands to ``trajectory`` (anything
        :func:`~lesde.fit.as_trajectory` accepts; keyword arguments go to it)."""
        self._check()
        traj = as_trajectory(trajectory, **kwargs)
        band = self._resolved_band()
        if self.noise in ("additive", "both"):
            traj.require_per_class(2, f"estimating additive noise (noise={self.noise!r}) from "
                                   "the within-class spread")
        if band in ("samples", "both"):
            traj.require_per_class(2, "the sample bootstrap")
        if band in ("trials", "both") and traj.R < 2:
            raise ValueError(f"bootstrap={band!r} needs several independent trials, got R = 1")
        if band == "parametric" and self.noise == "none":
            raise ValueError("the parametric bootstrap simulates the fitted noise; noise='none' "
                             "has none (use bootstrap='samples' or 'sandwich')")
        form = self._make_form(traj)
        core = _fit_core(traj, self.field, form, self.noise, int(self.substeps),
                         float(self.rtol_integration), int(self.max_iter),
                         exact_jacobian=band == "sandwich",
                         max_stiffness=self.max_stiffness)
        for k, v in core.items():
            setattr(self, k, v)
        self.ts_ = traj.ts
        self.K_ = traj.K
        self.form_ = form
        self.n_trials_ = traj.R
        self.labels_ = traj.labels
        self.class_weights_ = traj.class_weights
        self.x0_ = traj.features[:, 0].copy()
        self._summaries(traj)
        weak_shift = np.isfinite(self.shift_signal_) and self.shift_signal_ < self.SHIFT_MIN
        self.identified_ = bool(self.condition_ <= self.CONDITION_WARN and not weak_shift)
        self.row_shift_identified_ = not weak_shift
        if weak_shift:
            warnings.warn(
                f"ShootingEstimator: "
                f"{'the rows of E are' if form.matrix == 'full' else 'alpha + (K-1) beta is'} "
                f"not identified from this log: each class's mean G sums to zero over the "
                f"coordinates, so adding a number to a row of E moves the drift only through "
                f"sum_k w_k Gbar_k, here {self.shift_signal_:.3f} of the drift's own size "
                f"(< {self.SHIFT_MIN}). Their bands are made wide; differences within a row "
                f"(alpha - beta, reported as gap_) are identified. Logs from several initial "
                f"states with unequal logit biases identify them.", UserWarning, stacklevel=2)
        elif self.stiff_bound_active_:
            self.identified_ = False
            warnings.warn(
                f"ShootingEstimator: the fit presses against the stiffness bound (rate x "
                f"interval = {self.stiffness_:.1f} = max_stiffness): the log asks for a flow "
                f"that relaxes faster than its logging interval resolves, so the size of E in "
                f"the fastest direction (for the cross-entropy usually alpha + (K-1) beta, a "
                f"common restoring force on the average prediction) is a lower bound, not "
                f"identified. Differences such as alpha - beta (gap_) are less affected; log "
                f"more often, or raise max_stiffness to see how the fit moves.",
                UserWarning, stacklevel=2)
        elif not self.identified_:
            warnings.warn(
                f"ShootingEstimator: E is not identified from this log (condition number "
                f"{self.condition_:.1e} of the scaled Hessian > {self.CONDITION_WARN:.0e}). The "
                "bands in the weak directions are wide; fit a simpler form (intra/inter, fewer "
                "knots), or several trials from different initial states.",
                UserWarning, stacklevel=2)
        self.band_method_ = band
        self.bands_, self.se_ = {}, {}
        if band != "none":
            from .uncertainty import shooting_bands

            shooting_bands(self, traj, band)
        return self

    # ----------------------------------------------------------------------------------------
    def _summaries(self, traj: Trajectory) -> None:
        qs = self.quantities(self.theta_)
        for k, v in qs.items():
            setattr(self, f"{k}_", v)

    def quantities(self, theta) -> dict:
        """alpha, beta, A, B (..., T) and E (..., T, K, K) at the logged times for parameters
        theta (..., P)."""
        with torch.no_grad():
            q = _quantities_t(self.form_, torch.as_tensor(np.asarray(theta, dtype=float)),
                              self.ts_)
        return {k: v.numpy() for k, v in q.items()}

    def impacts(self):
        """The fitted E(t) as a :class:`~lesde.model.Impacts`."""
        self._check_fitted()
        return self.form_.impacts(self.theta_)

    def sde(self, labels=None, noise: Optional[str] = None):
        """The fitted SDE (:class:`~lesde.model.LESDE`) with its fitted noise."""
        from ..model import LESDE, FunctionSchedule

        self._check_fitted()
        kind = self.noise_kind_ if noise is None else noise
        ts, sig = self.ts_, self.sigma_.copy()

        def sigma_of_t(t):
            i = int(np.clip(np.searchsorted(ts, t, side="right") - 1, 0, len(sig) - 1))
            return float(sig[i])

        sigma = FunctionSchedule(sigma_of_t, "sigma", nonneg=True) if kind in (
            "additive", "both") else 0.0
        lr = self.lr_ if kind in ("sgd", "both") else None
        return LESDE(self.labels_ if labels is None else labels, self.impacts(), self.field,
                     sigma=sigma, noise=kind, lr=lr, dim=self.x0_.shape[-1])

    def results(self) -> dict:
        """The fitted curves at the logged times as a dict of (T,) arrays (bands as
        ``<name>_lo`` / ``<name>_hi``); sigma is per interval, given at the interval's start."""
        self._check_fitted()
        out = {"t": self.ts_, "alpha": self.alpha_, "beta": self.beta_, "gap": self.gap_,
               "A": self.A_, "B": self.B_, "sigma": np.append(self.sigma_, np.nan)}
        for name in ("alpha", "beta", "gap", "A", "B"):
            if name in self.bands_:
                out[f"{name}_lo"], out[f"{name}_hi"] = self.bands_[name]
        K = self.K_
        for c in range(K):
            for k in range(K):
                out[f"E_{c}_{k}"] = self.E_[:, c, k]
        return out

    def summary(self) -> dict:
        """Scalar results as a JSON-able dict."""
        self._check_fitted()
        d = {"form": self.form_.describe(), "field": getattr(self.field, "name", self.field)
             if not isinstance(self.field, str) else self.field,
             "noise": self.noise_kind_, "lr": float(self.lr_),
             "sigma_median": float(np.median(self.sigma_)), "loss": float(self.loss_),
             "n_residuals": int(self.n_residuals_), "aic": float(self.aic_),
             "bic": float(self.bic_), "condition": float(self.condition_),
             "identified": bool(self.identified_), "band_method": self.band_method_,
             "n_substeps": int(self.n_substeps_), "integrator": self.integrator_,
             "theta": dict(zip(self.form_.param_names, map(float, self.theta_))),
             "theta_se": dict(zip(self.form_.param_names, map(float, self.theta_se_)))}
        if "theta" in self.bands_:
            d["theta_band"] = dict(zip(self.form_.param_names,
                                       self.bands_["theta"].T.tolist()))
        return d


def _quantities_t(form: ImpactForm, theta: torch.Tensor, ts: np.ndarray) -> dict:
    """E (..., T, K, K), alpha, beta (..., T): the means of E's diagonal and off-diagonal (for the
    intra/inter form exactly alpha and beta), gap = alpha - beta, and A, B (..., T) their
    integrals from ts[0]
    (trapezoid rule on a grid 20 times finer than the log)."""
    K = form.K
    fine = np.linspace(ts[0], ts[-1], 20 * (len(ts) - 1) + 1)

    def diag_off(E):
        d = torch.diagonal(E, dim1=-2, dim2=-1)
        return d.mean(-1), (E.sum((-1, -2)) - d.sum(-1)) / (K * (K - 1))

    E = form.at(ts).E(theta)
    a, b = diag_off(E)
    af, bf = diag_off(form.at(fine).E(theta))
    dx = torch.as_tensor(np.diff(fine), dtype=theta.dtype)
    idx = torch.arange(0, fine.shape[0], 20)

    def cum(y):
        inc = 0.5 * (y[..., 1:] + y[..., :-1]) * dx
        c = torch.cat([torch.zeros_like(y[..., :1]), torch.cumsum(inc, -1)], -1)
        return c[..., idx]

    return {"E": E, "alpha": a, "beta": b, "gap": a - b, "A": cum(af), "B": cum(bf)}


def quantities_jacobian(form: ImpactForm, theta: np.ndarray, ts: np.ndarray) -> dict:
    """d quantity / d theta for every quantity of :func:`_quantities_t`: (..., P) arrays."""
    from torch.func import jacfwd

    jac = jacfwd(lambda th: _quantities_t(form, th, ts))(
        torch.as_tensor(theta, dtype=torch.float64))
    return {k: v.numpy() for k, v in jac.items()}


def refit_batch(xb: np.ndarray, ts, labels, weights, field, form: ImpactForm,
                whitening: np.ndarray, substeps: int, theta0: np.ndarray,
                max_iter: int, hessian: Optional[np.ndarray] = None,
                gain: Optional[np.ndarray] = None,
                max_stiffness: Optional[float] = None) -> np.ndarray:
    """Refit a batch of replicate logs xb (n, R, T, N, p) with fixed weights, from theta0, as
    one optimisation (the replicates' parameters are separate; their objectives add), with the
    fit's stiffness bound (``gain`` per interval and ``max_stiffness``) when given."""
    n = xb.shape[0]
    prob = _Problem(xb, ts, labels, form.K, weights, field, form)
    prob.set_whitening(whitening)
    S = substeps if isinstance(substeps, tuple) else int(substeps)
    bound = None
    if max_stiffness is not None and gain is not None:
        with torch.no_grad():
            th0 = torch.as_tensor(np.broadcast_to(theta0, (n, theta0.shape[0])).copy())
            L0 = float((prob.residual(th0, S) ** 2).sum()) / n
        bound = _StiffnessBound(form, ts, weights, gain, float(max_stiffness),
                                1e3 * max(L0, prob.M * form.K * prob.p))

    def loss_fn(th):
        loss = 0.5 * (prob.residual(th, S) ** 2).sum()
        return loss if bound is None else loss + bound.penalty(th)

    start = torch.as_tensor(np.broadcast_to(theta0, (n, theta0.shape[0])).copy())
    C = None if hessian is None else _preconditioner(hessian)
    theta, _, _ = _lbfgs(loss_fn, start, max_iter, 1e-12, C, 1e-6 * n)
    return theta.numpy()


# ============================================================================================
# the fit itself (also used by the bootstrap workers)
# ============================================================================================
def _noise_kind(noise: str, sigma2: Optional[np.ndarray], lr: float) -> str:
    add = noise in ("additive", "both") and sigma2 is not None and np.any(sigma2 > 0)
    sgd = noise in ("sgd", "both") and lr > 0
    return "both" if add and sgd else "additive" if add else "sgd" if sgd else "none"


def _covariance(dt: np.ndarray, n_c: np.ndarray, p: int, sigma2: np.ndarray, lr: float,
                Q: Optional[np.ndarray]) -> np.ndarray:
    """Sigma_i (M, K p, K p) = dt_i (sigma_i^2 diag(1/n_c) (x) I + lr Q_i)."""
    M = dt.shape[0]
    Dg = np.repeat(1.0 / n_c, p)[None, :] * sigma2[:, None]                 # (M, K p)
    S = np.zeros((M, Dg.shape[1], Dg.shape[1]))
    S[:, np.arange(Dg.shape[1]), np.arange(Dg.shape[1])] = Dg
    if Q is not None and lr > 0:
        S = S + lr * Q
    return S * dt[:, None, None]


def _whitening(dt, n_c, p, sigma2, lr, Q) -> np.ndarray:
    """Sigma_i^(-1/2) (M, K p, K p) of :func:`_covariance`."""
    return _inv_sqrt(_covariance(dt, n_c, p, sigma2, lr, Q))


def _quasi_nll(res: np.ndarray, S: np.ndarray, floor: float = 1e-8) -> float:
    """Gaussian negative log-likelihood of residuals res (M, n) with covariances S (M, n, n),
    eigenvalues floored at floor x the largest of each interval."""
    vals, vecs = np.linalg.eigh(S)
    vals = np.maximum(vals, floor * np.maximum(vals.max(axis=-1, keepdims=True), 1e-300))
    z = np.einsum("mij,mi->mj", vecs, res)
    return 0.5 * float(np.sum(np.log(vals)) + np.sum(z ** 2 / vals)
                       + res.size * math.log(2 * math.pi))


def _fit_core(traj: Trajectory, field, form: ImpactForm, noise: str, substeps: int,
              rtol_int: float, max_iter: int, exact_jacobian: bool = True,
              max_stiffness: Optional[float] = None) -> dict:
    """Stages 1-3 of the fit and the sandwich covariance; returns the fitted attributes."""
    K, p, R, T = traj.K, traj.p, traj.R, traj.T
    prob = _Problem(traj.features[None], traj.ts, traj.labels, K, traj.class_weights, field,
                    form)
    M = prob.M
    dt = prob.dt.numpy()
    n_c = traj.counts.astype(float)
    sig2, dof = (within_class_sigma2(traj.features, traj.labels, K, traj.ts)
                 if noise in ("additive", "both") else (None, 0))
    if sig2 is not None:
        # a within-class spread that does not move (SGD noise alone, or none) is no additive
        # noise: below 1e-20 of the class-mean increments' scale it is rounding
        inc2 = float(np.mean(np.diff(traj.class_means(), axis=1) ** 2)) + 1e-300
        if np.all(sig2 * np.diff(traj.ts) <= 1e-20 * inc2):
            sig2 = np.zeros_like(sig2)
    sig2_m = np.ones(M) if sig2 is None else np.tile(np.maximum(sig2, 1e-300), R)
    if sig2 is not None and np.all(sig2 <= 0):
        sig2_m = np.ones(M)
    # stage 0: a linear start (trapezoid rule) for forms linear in theta
    G = field_values(field, traj.features, traj.labels, traj.ts, K)
    gbar = torch.as_tensor(class_means(G, traj.labels, K))                 # (R, T, K, p)
    shift_signal = _shift_signal(gbar.numpy(), traj.class_weights)
    L1 = _whitening(dt, n_c, p, sig2_m, 0.0, None)
    prob.set_whitening(L1)
    theta0, H0 = _surrogate_start(prob, form, gbar)
    # stage 1, with enough sub-steps that RK4 is stable and accurate at the starting impacts
    # (step x the drift's fastest rate in its interval <= RK4_STEP_RATE; doubling below
    # refines it)
    gain = field_gain(prob.cmf, traj.features, traj.labels, K)
    dts = np.diff(traj.ts)[None, :]

    def need(th) -> float:
        return float(np.max(_interval_rates(form, th, traj.ts, traj.class_weights, gain) * dts))

    base = int(substeps)
    tol = 1e-12

    def steps_for(th):
        """Integration for parameters th: ``base`` RK4 steps, raised so that RK4 stays stable
        (step x the drift's fastest rate <= RK4_STEP_RATE) wherever the optimiser goes; where
        that needs more than RK4_MAX_STEPS, the drift is stiff and the L-stable ROS2 takes over
        with ``max(base, 8)`` steps (the refinement below doubles them until converged)."""
        n = int(math.ceil(need(th.detach().numpy()) / RK4_STEP_RATE))
        if n <= RK4_MAX_STEPS:
            return max(base, n)
        return ("ros2", max(base, 8))

    gain_iv = np.maximum(gain[:, :-1], gain[:, 1:]).max(axis=0)               # (T - 1,)
    bound = None
    if max_stiffness is not None:
        with torch.no_grad():
            L0 = float((prob.residual(torch.as_tensor(theta0)[None], steps_for(
                torch.as_tensor(theta0))) ** 2).sum())
        bound = _StiffnessBound(form, traj.ts, traj.class_weights, gain_iv,
                                float(max_stiffness), 1e3 * max(L0, M * K * p))

    def loss_fn(th):
        loss = 0.5 * (prob.residual(th[None], steps_for(th)) ** 2).sum()
        return loss if bound is None else loss + bound.penalty(th)

    chg1 = CHANGE_TOL if (sig2 is not None and np.any(sig2 > 0)) else None
    theta, n1, _ = _lbfgs(loss_fn, torch.as_tensor(theta0), max_iter, tol, _preconditioner(H0),
                          chg1)
    # stage 2: noise from the stage-1 residuals
    lr = 0.0
    Q = None
    if noise in ("sgd", "both"):
        Et = form.E_numpy(theta.numpy(), traj.ts[:-1])                   # (T - 1, K, K)
        Q = sgd_covariance(G[:, :-1].reshape(M, traj.N, p), traj.labels, K,
                           traj.class_weights, np.tile(Et, (R, 1, 1)))
        with torch.no_grad():
            res = (prob.target - prob.predict(theta[None], steps_for(theta)))[0]
            res = res.reshape(M, -1).numpy()
        Dg = (np.repeat(1.0 / n_c, p)[None, :] * np.tile(sig2, R)[:, None]
              if (sig2 is not None and noise == "both") else np.zeros((M, K * p)))
        lr = _fit_lr(res, dt, Dg, Q)
    kind = _noise_kind(noise, sig2, lr)
    sig2_w = sig2_m if kind in ("additive", "both") else np.zeros(M)
    if kind == "none":
        sig2_w = np.ones(M)
    S2 = _covariance(dt, n_c, p, sig2_w, lr if kind in ("sgd", "both") else 0.0, Q)
    L2 = _inv_sqrt(S2)
    prob.set_whitening(L2)
    from torch.func import jacfwd

    g_s, g_e = gbar[:, :-1].reshape(M, K, p), gbar[:, 1:].reshape(M, K, p)
    P = form.n_params

    def hessian_at(th, S):
        """Gauss-Newton Hessian of the shooting residuals (P forward passes), or of the trapezoid
        surrogate when P > 200 (cheap, no integration)."""
        if P <= 200:
            Jx = _jacobian(lambda t_: prob.residual(t_[None], S).reshape(-1), th).numpy()
        else:
            Jx = jacfwd(lambda t_: prob.trapezoid_residual(t_, g_s, g_e))(th).numpy()
        return Jx.T @ Jx

    # stage 3: L-BFGS preconditioned by the Gauss-Newton Hessian, refreshed at the current
    # point while the fit still moves (on stiff, misspecified logs the curvature changes along
    # the way). Before each optimisation the integration is refined at the current parameters
    # (cheap: predictions only) until doubling the steps changes the prediction by less than
    # rtol_int of the largest logged increment, or (with a fitted noise) by less than a
    # hundredth of the residuals' noise level; after it, the test is repeated at the new
    # parameters, and the fit stops when it passes or when the parameters moved by less than a
    # hundredth of their standard errors
    n_evals = n1
    scale = float(prob.target.abs().max()) + 1e-300
    Lw = torch.as_tensor(L2)
    previous = None
    change = None if kind == "none" else CHANGE_TOL

    def integration_error(th):
        st = steps_for(th)
        with torch.no_grad():
            diff = (prob.predict(th[None], st) - prob.predict(th[None], _doubled(st)))[0]
        err = float(diff.abs().max()) / scale
        err_w = float(torch.einsum("mij,mj->mi", Lw, diff.reshape(M, -1)).abs().max())
        return st, err, err <= rtol_int or (kind != "none" and err_w <= 0.01)

    for _ in range(6):
        for _double in range(8):
            st, err, ok = integration_error(theta)
            n_evals += 2
            if ok:
                break
            base = 2 * _n_steps(st)
        for _refresh in range(6):
            st = steps_for(theta)
            H1 = hessian_at(theta, st)
            n_evals += P
            theta, n3, _ = _lbfgs(loss_fn, theta, 60, tol, _preconditioner(H1), change)
            n_evals += n3
            if n3 < 60:
                break
        se1 = np.sqrt(np.maximum(np.diag(np.linalg.pinv(H1, rcond=1e-13, hermitian=True)),
                                 0.0))
        st, err, ok = integration_error(theta)
        n_evals += 2
        if ok:
            break
        if (previous is not None and kind != "none"
                and np.all(np.abs(theta.numpy() - previous) <= 0.01 * se1)):
            break
        previous = theta.numpy().copy()
    S = steps_for(theta)
    with torch.no_grad():
        rho = prob.residual(theta[None], S)[0]                            # (M, K p)
    loss = float((rho ** 2).sum())
    rho_np = rho.numpy()
    if exact_jacobian:
        # sandwich covariance from the Jacobian of the whitened residuals (P forward passes)
        J = _jacobian(lambda th: prob.residual(th[None], S).reshape(-1), theta)
        J = J.reshape(M, K * p, -1).numpy()
    else:
        # the trapezoid surrogate's Jacobian: for preconditioning the bootstrap refits and for
        # the identifiability check (the bootstrap gives the covariance)
        J = jacfwd(lambda th: prob.trapezoid_residual(th, g_s, g_e))(theta)
        J = J.reshape(M, K * p, -1).numpy()
    H = np.einsum("mip,miq->pq", J, J)
    scores = np.einsum("mip,mi->mp", J, rho_np)
    meat = scores.T @ scores
    d = np.sqrt(np.maximum(np.diag(H), 1e-300))
    Hs = H / d[:, None] / d[None, :]
    ev = np.linalg.eigvalsh(Hs)
    cond = float(ev.max() / max(ev.min(), 1e-300))
    Hinv = np.linalg.pinv(H, rcond=1e-13, hermitian=True)
    small = M / max(M - P, 1)                     # finite-sample factor of the sandwich
    cov = small * Hinv @ meat @ Hinv
    # information criteria from the Gaussian quasi-likelihood with the fitted noise
    with torch.no_grad():
        raw = (prob.target - prob.predict(theta[None], S))[0].reshape(M, -1).numpy()
    n_obs = raw.size
    nll = _quasi_nll(raw, S2)
    k_par = P + (1 if kind in ("sgd", "both") else 0) + (T - 1 if kind in ("additive", "both")
                                                          else 0)
    with torch.no_grad():
        stiffness = 0.0 if bound is None else float(bound.ratio(theta).max())
    rate = float(np.max(_interval_rates(form, theta.numpy(), traj.ts, traj.class_weights,
                                        gain)))
    return {"theta_": theta.numpy(), "theta_cov_": cov, "drift_rate_": rate,
            "theta_se_": np.sqrt(np.maximum(np.diag(cov), 0.0)),
            "hessian_": H, "sigma_": np.sqrt(np.maximum(sig2 if sig2 is not None else
                                                        np.zeros(T - 1), 0.0))
            if kind in ("additive", "both") else np.zeros(T - 1),
            "sigma_dof_": dof, "lr_": float(lr) if kind in ("sgd", "both") else 0.0,
            "noise_kind_": kind, "loss_": loss, "n_residuals_": n_obs,
            "nll_": nll, "aic_": 2 * nll + 2 * k_par, "bic_": 2 * nll + k_par * math.log(n_obs),
            "steps_": S, "n_substeps_": _n_steps(S), "gain_": gain_iv,
            "stiffness_": stiffness * (np.nan if bound is None else float(max_stiffness)),
            "stiff_bound_active_": bool(bound is not None and stiffness > 0.99),
            "integrator_": "ros2" if isinstance(S, tuple) else "rk4",
            "integration_error_": err, "condition_": cond,
            "identified_": bool(cond <= ShootingEstimator.CONDITION_WARN),
            "shift_signal_": shift_signal,
            "n_evals_": n_evals, "whitening_": L2}


#: with a fitted noise the loss is a negative quasi-log-likelihood; L-BFGS stops when an
#: iteration lowers it by less than this (differences below 1 are not statistically
#: meaningful; on a weakly identified ridge, waiting for 1e-6 took hundreds of iterations)
CHANGE_TOL = 1e-3

#: most RK4 steps per logged interval; a drift that needs more is integrated by ROS2
RK4_MAX_STEPS = 32
#: RK4 step times the drift's fastest rate: at most this (RK4 is stable to 2.78 on the negative
#: real axis and 2.83 on the imaginary one; accuracy is checked by doubling the steps)
RK4_STEP_RATE = 2.0


def _n_steps(steps) -> int:
    return int(steps[1]) if isinstance(steps, tuple) else int(steps)


def _doubled(steps):
    return (steps[0], 2 * int(steps[1])) if isinstance(steps, tuple) else 2 * int(steps)


def _shift_signal(gbar: np.ndarray, w: np.ndarray) -> float:
    """How well a shift of a row of E is identified: for fields whose class means of G sum to
    zero over the coordinates, the median over trials and times of
    ``|sum_k w_k Gbar_k| / sqrt(sum_k |w_k Gbar_k|^2)``; NaN for other fields (no such
    direction)."""
    scale = np.abs(gbar).max() + 1e-300
    if np.abs(gbar.sum(axis=-1)).max() > 1e-8 * scale:
        return float("nan")
    wg = gbar * w[None, None, :, None]                                     # (R, T, K, p)
    num = np.linalg.norm(wg.sum(axis=2), axis=-1)
    den = np.sqrt((wg ** 2).sum(axis=(2, 3))) + 1e-300
    return float(np.median(num / den))


def row_shift_directions(form: ImpactForm) -> np.ndarray:
    """Unit directions (n, P) in parameter space that add a number to one row of E at one
    knot (intra/inter: alpha and beta together); for forms linear in theta."""
    K, F = form.K, form.n_free
    rows = ([np.ones(2)] if form.matrix == "intra_inter" else
            [np.kron(np.eye(K)[c], np.ones(K)) for c in range(K)])     # row c, row-major E
    if form.time == "constant":
        return np.stack([r / np.linalg.norm(r) for r in rows])
    if form.time == "piecewise_linear":
        m = form.knots.size
        out = []
        for j in range(m):
            for r in rows:
                v = np.zeros(m * F)
                v[j * F:(j + 1) * F] = r
                out.append(v / np.linalg.norm(v))
        return np.stack(out)
    out = []                                                  # power law: the amplitudes
    for r in rows:
        v = np.zeros(2 * F)
        v[:F] = r
        out.append(v / np.linalg.norm(v))
    return np.stack(out)


def field_gain(cmf: ClassMeanField, features: np.ndarray, labels: np.ndarray,
               K: int) -> np.ndarray:
    """How fast the class means of G change with a class's displacement, at the logged states:
    (R, T), the largest over classes k of the spectral norm of ``d Gbar_k / d delta_k``.

    For the cross-entropy on logits it is ``|mean_{j in k} (diag(s_j) - s_j s_j^T)|_2`` with
    ``s_j = softmax(X_j)``: 1/2 at worst, and far below it once the logits saturate (late in
    training, where a large E moves the logits slowly). Through a read-out W it is that of
    ``W^T (...) W``; the linear fields have gain 1; a generic field is taken as 1."""
    R, T = features.shape[:2]
    if cmf.kind not in ("cross_entropy", "readout"):
        return np.ones((R, T))
    x = features
    if cmf.kind == "readout":
        W = cmf.W.numpy()
        x = x @ W.T + (0.0 if cmf.b is None else cmf.b.numpy())
    z = x - x.max(-1, keepdims=True)
    s = np.exp(z)
    s /= s.sum(-1, keepdims=True)                                          # (R, T, N, q)
    q = s.shape[-1]
    onehot = np.eye(K)[labels] / np.bincount(labels, minlength=K)[:, None].T   # (N, K)
    gain = np.zeros((R, T))
    for k in range(K):
        sel = onehot[:, k] > 0
        sk = s[:, :, sel]                                                  # (R, T, n_k, q)
        diag = sk.mean(2)                                                  # (R, T, q)
        outer = np.einsum("rtna,rtnb->rtab", sk, sk) / sel.sum()
        J = -outer
        J[..., np.arange(q), np.arange(q)] += diag
        if cmf.kind == "readout":
            J = np.einsum("ap,rtab,bq->rtpq", W, J, W)
        gain = np.maximum(gain, np.linalg.norm(J, ord=2, axis=(-2, -1)))
    return gain


def _interval_rates(form: ImpactForm, theta, ts, weights, gain: np.ndarray) -> np.ndarray:
    """The drift's fastest rate of change in each logged interval, (R, T - 1): the largest
    ``|E(t) diag(w)|_2`` over the interval (4 sub-intervals) times the field's gain
    (:func:`field_gain`) at the interval's two logged ends. RK4 with a step h is stable where
    h times this rate is below 2.78; the fit keeps it at most ``RK4_STEP_RATE`` and checks the
    accuracy by doubling the steps."""
    n = len(ts) - 1
    grid = (np.asarray(ts[:-1])[:, None] + np.diff(ts)[:, None] * np.linspace(0, 1, 5)[None])
    Eg = form.E_numpy(np.asarray(theta, dtype=float), grid.reshape(-1))
    En = np.linalg.norm(Eg * np.asarray(weights)[None, None, :], ord=2, axis=(1, 2))
    En = En.reshape(n, 5).max(axis=1)                                      # (T - 1,)
    g = np.maximum(gain[:, :-1], gain[:, 1:])                              # (R, T - 1)
    return En[None, :] * g


class _StiffnessBound:
    """A quadratic barrier on the drift's stiffness: ``rate_i dt_i <= cap`` in every logged
    interval, rate_i as in :func:`_interval_rates` (differentiable in theta, the field's gain
    held at its logged values). Past ``rate dt`` of a few tens the flow relaxes completely
    within an interval and the log cannot tell a faster relaxation from a fast one; on real
    logs a weakly identified shift of E's rows otherwise runs away to ever stiffer flows."""

    def __init__(self, form: ImpactForm, ts, weights, gain_iv: np.ndarray, cap: float,
                 weight: float):
        ts = np.asarray(ts, dtype=float)
        self.n = len(ts) - 1
        grid = ts[:-1, None] + np.diff(ts)[:, None] * np.linspace(0, 1, 5)[None]
        self.at = form.at(grid.reshape(-1))
        self.w = torch.as_tensor(np.asarray(weights, dtype=float))
        self.scale = torch.as_tensor(gain_iv * np.diff(ts) / cap)             # (T - 1,)
        self.weight = float(weight)          # about 1e3 times the loss: held within a few %

    def ratio(self, theta: torch.Tensor) -> torch.Tensor:
        """rate_i dt_i / cap, (..., T - 1)."""
        E = self.at.E(theta) * self.w
        nrm = torch.linalg.matrix_norm(E, ord=2)
        return nrm.reshape(*nrm.shape[:-1], self.n, 5).amax(-1) * self.scale

    def penalty(self, theta: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.weight * (torch.relu(self.ratio(theta) - 1.0) ** 2).sum()


def _surrogate_start(prob: _Problem, form: ImpactForm, gbar: torch.Tensor) -> tuple:
    """Start and preconditioner: least squares of the trapezoid-rule surrogate (Gauss-Newton
    from the constant fit; exact in one step for forms linear in theta). Returns (theta0,
    H0 = J^T J of the surrogate at theta0)."""
    from torch.func import jacfwd

    Gs = gbar[:, :-1].reshape(-1, *gbar.shape[2:])
    Ge = gbar[:, 1:].reshape(-1, *gbar.shape[2:])
    const = ImpactForm(form.K, form.matrix, "constant")
    sub = _Problem.__new__(_Problem)
    sub.__dict__.update(prob.__dict__)
    sub.form = const
    sub._ends = None
    z = torch.zeros(const.n_params, dtype=torch.float64)
    sub.trapezoid_residual(z, Gs, Ge)                  # builds the forms at the interval ends
    prob.trapezoid_residual(torch.as_tensor(form.from_constant(np.zeros(const.n_params))), Gs, Ge)
    J = jacfwd(lambda th: sub.trapezoid_residual(th, Gs, Ge))(z)
    r0 = sub.trapezoid_residual(z, Gs, Ge)
    v = torch.linalg.lstsq(J, -r0[:, None], driver="gelsd").solution[:, 0]
    theta = torch.as_tensor(form.from_constant(v.numpy()))

    def res(th):
        return prob.trapezoid_residual(th, Gs, Ge)

    # a time-varying form starts from the constant fit (on coarse or noisy logs the surrogate's
    # own least squares can be far off, and a wild start makes the flow stiff); the power law is
    # moved to the surrogate's optimum by damped Gauss-Newton (its exponents enter nonlinearly)
    for _ in range(0 if form.time != "power_law" else 20):
        J = jacfwd(res)(theta)
        r = res(theta)
        step = torch.linalg.lstsq(J, -r[:, None], driver="gelsd").solution[:, 0]
        if form.time == "power_law":        # damped: the exponents enter nonlinearly
            base = float((r ** 2).sum())
            lam = 1.0
            while lam > 1e-4 and float((res(theta + lam * step) ** 2).sum()) > base:
                lam *= 0.5
            step = lam * step
        theta = theta + step
        if float(step.abs().max()) < 1e-12 * (1 + float(theta.abs().max())):
            break
    J = jacfwd(res)(theta)
    return theta.numpy(), (J.T @ J).numpy()
