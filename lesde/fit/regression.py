r"""The windowed regression estimator: E(t) per window by least squares on logged increments.

A linear and fast estimator of the whole K x K E(t), kept beside the trajectory-matching
:class:`~lesde.fit.ShootingEstimator` (the default method): it approximates the integral of the
drift over each logged interval by a quadrature rule on the logged G, which is biased when G
changes within an interval (coarse logs), see "Discretisation" below.
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np

from ._base import Estimator
from ._fields import field_values
from .trajectory import Trajectory, as_trajectory, class_means
from .uncertainty import bootstrap_draws, percentile_band, resampled_means, resolve_mode

__all__ = ["RegressionEstimator"]

_REG_BOOT = ("auto", "samples", "trials", "both", "none")


def _window_edges(n_inc: int, window: int) -> np.ndarray:
    """Increment-index edges of consecutive windows of ``window`` increments; a remainder
    shorter than half a window joins the last window."""
    edges = list(range(0, n_inc, window)) + [n_inc]
    if len(edges) > 2 and edges[-1] - edges[-2] < window / 2:
        edges.pop(-2)
    return np.asarray(edges)


class RegressionEstimator(Estimator):
    r"""The whole K x K impact matrix E(t) per time window, by least squares on increments.

    Model (canonical drift with class shares w_k = n_k/N)::

        Xbar_c(t_{i+1}) - Xbar_c(t_i) = sum_k E[c, k] w_k Gbar_k(t_i) dt_i + noise,

    ``dt_i = t_{i+1} - t_i`` and ``Gbar_k(t_i)`` the mean of G over the *tracked* samples of
    class k, used as the estimate of its mean over the whole training set (exact when every
    training sample is tracked, as in a simulation; with a tracked subset the difference is a
    sampling error that the sample bootstrap reproduces). For each window of consecutive
    increments and each class c, row c of E is the least-squares solution over all increments
    of the window, all p coordinates and all trials, each row scaled by ``1/sqrt(dt_i)`` so that
    the noise variance is per unit time. Its covariance is ``s_c^2 (D^T D)^{-1}`` (``s_c^2`` the
    residual variance, D the design); ``E_ci_`` uses Student-t quantiles.

    The intra/inter fit constrains ``E = (alpha - beta) I + beta 11^T``: pooling all classes,
    ``dXbar_c = alpha w_c Gbar_c dt + beta sum_{k != c} w_k Gbar_k dt``.

    sigma: from the per-sample residuals ``X_j(t_{i+1}) - X_j(t_i) - drift_{y_j} dt_i``,
    ``sigma^2 = mean(residual^2 / dt_i)`` per window (the additive-noise level; for SGD
    sampling noise it is the average fluctuation, not a model parameter).

    Discretisation (``quadrature``): the increment over [t_i, t_{i+1}] is
    ``int E(s) w Gbar(s) ds``. The trapezoid rule ``"trapezoid"`` (default) averages the two
    endpoints: second order, O(dt_i^2), on smooth paths, but still biased when G changes by a
    large fraction within an interval (there use :class:`~lesde.fit.ShootingEstimator`), and its
    right endpoint shares the noise of the increment, a bias of order sigma^2 / (n |Xbar|^2) in
    noisy data. The left-point rule ``"left"`` uses ``drift(t_i) dt_i``: exact for an Euler step
    of size dt_i (the simulator with step = save interval, or one SGD step per log entry),
    unbiased under additive noise (Ito), and first order, O(dt_i) relative, on a
    continuous-time path (6% on alpha and 14% on beta at log interval 2 with power-law impacts).
    With ``degree=0`` the window average is weighted by |G|^2, not uniform in time; ``degree=1``
    (default) fits E linear in time inside a window, which removes that first-order bias.

    Identifiability: the regressors ``w_k Gbar_k`` must be linearly independent over the
    window. For the cross-entropy field, every ``Gbar_k`` sums to zero over the K logits, so at
    one time the K regressors span at most K - 1 dimensions; in one trial E is identified only
    through their change over the window, and the direction "add the same number to a row of E"
    is poorly determined while the mean softmax is near uniform. The label-projection field is
    worse: ``Gbar_k = d_k y_k`` with fixed directions d_k summing to zero, so at every time the
    K regressors are exactly dependent and one trial identifies the full E only through the
    drift of the ratios y_k / y_l. When E also varies inside a window, such near-dependence turns
    the misfit into large errors of the individual entries. Several trials (R > 1) from
    different initial states cure this: the regressors of different trials are independent at
    every time, and the full E is recovered (tested within 5% on near-continuous paths with
    constant, power-law, rise-then-decay and general asymmetric impacts). The two-parameter
    intra/inter fit (alpha_, beta_) stays well determined in all cases. ``condition_`` is the
    condition number of each window's design with unit-norm columns; above
    ``CONDITION_WARN`` (1e3) :meth:`fit` warns.

    Hyper-parameters
    ----------------
    field : the drift field G: "identity", "label_projection", "cross_entropy", a
        :class:`~lesde.model.DriftField` (e.g. ``CrossEntropyReadout(W)``) or a callable.
    window : increments per window (default: ``max(5, (T - 1) // 20)``, about 20 windows).
    degree : each entry of E varies inside a window as a polynomial of this degree in time
        (0: constant per window, the window average; 1: local linear, which removes the
        first-order bias of a time-varying E; the reported E_ is the value at window_times_).
    quadrature : "trapezoid" (default) or "left", see "Discretisation".
    n_bootstrap, bootstrap, level, seed : bootstrap (default 200 resamples; "auto": trials when
        R > 1, else tracked samples within class) as in :class:`~lesde.fit.IEstimator`;
        percentile bands for E, alpha and beta. The sample bootstrap misses the class-mean noise
        that the drift feeds back and any bias; the coverage study in ``benchmarks/`` measures it.

    Attributes after fit
    --------------------
    ts_ (T,), window_edges_ (W + 1,) increment indices, window_times_ (W,) mean left-endpoint
    time of each window (where the fitted drift is evaluated), window_bounds_ (W, 2) times,
    E_ (W, K, K), E_se_ (W, K, K), E_ci_ (2, W, K, K), alpha_, beta_, alpha_se_, beta_se_ (W,),
    alpha_ci_, beta_ci_ (2, W), sigma_ (W,), A_, B_ (W + 1,) cumulative sums of alpha, beta
    times window durations at the window edges' times ``edge_times_``, bands_ (dict E, alpha,
    beta of bootstrap percentile bands), dof_ (W,) residual degrees of freedom per class row,
    condition_ (W,) condition number of each window's design with unit-norm columns (large: E
    poorly identified, see "Identifiability").
    """

    _params = ("field", "window", "degree", "quadrature", "n_bootstrap", "bootstrap", "level",
               "seed")

    #: normalised condition number above which :meth:`fit` warns that E is poorly identified
    CONDITION_WARN = 1e3

    def __init__(self, field="identity", window: Optional[int] = None, degree: int = 1,
                 quadrature: str = "trapezoid", n_bootstrap: int = 200, bootstrap: str = "auto",
                 level: float = 0.95, seed: int = 0):
        self.field = field
        self.window = window
        self.degree = degree
        self.quadrature = quadrature
        self.n_bootstrap = n_bootstrap
        self.bootstrap = bootstrap
        self.level = level
        self.seed = seed

    # -- the least-squares core on class means -------------------------------------------
    def _window_design(self, gw, ts, a, b, tc):
        """Scaled regressors (R, n, p, K (d+1)) of increments a..b-1 of window centre tc.

        Column (k, q) of increment i is ``int_{t_i}^{t_{i+1}} (s - tc)^q w_k Gbar_k(s) ds``
        divided by sqrt(dt_i), by the left-point rule (``quadrature="left"``) or the trapezoid
        rule (``"trapezoid"``)."""
        d = int(self.degree)
        sq = np.sqrt(np.diff(ts[a:b + 1]))
        q = np.arange(d + 1)
        left = gw[:, a:b, :, :, None] * ((ts[a:b] - tc)[:, None] ** q)[None, :, None, None, :]
        if self.quadrature == "trapezoid":
            right = gw[:, a + 1:b + 1, :, :, None] \
                * ((ts[a + 1:b + 1] - tc)[:, None] ** q)[None, :, None, None, :]
            left = 0.5 * (left + right)
        X = left * sq[None, :, None, None, None]                        # (R, n, K, p, d+1)
        return np.swapaxes(X, 2, 3)                                    # (R, n, p, K, d+1)

    def _solve(self, xbar, gbar, w, ts, edges, with_se: bool):
        """Full and constrained least squares per window from class means (R, T, K, p).

        With ``degree`` d, each entry of E is ``sum_{q<=d} E_q (t - t_w)^q`` inside window w
        (t_w its mean left-endpoint time); E_ reports E_0, the value at t_w."""
        R, T, K, p = xbar.shape
        d = int(self.degree)
        gw = gbar * w[None, None, :, None]                             # (R, T, K, p)
        sq = np.sqrt(np.diff(ts))
        Y = np.diff(xbar, axis=1) / sq[None, :, None, None]           # (R, T-1, K, p)
        left = ts[:-1]
        Wn = len(edges) - 1
        E = np.empty((Wn, K, K))
        se = np.empty((Wn, K, K))
        ab = np.empty((Wn, 2))
        ab_se = np.empty((Wn, 2))
        dof = np.empty(Wn)
        cond = np.empty(Wn)
        fitted = np.empty((R, T - 1, K, p)) if with_se else None
        for w_i in range(Wn):
            a, b = edges[w_i], edges[w_i + 1]
            tc = left[a:b].mean()
            Xw = self._window_design(gw, ts, a, b, tc)                 # (R, n, p, K, d+1)
            X = Xw.reshape(-1, K * (d + 1))
            Yw = np.swapaxes(Y[:, a:b], 2, 3).reshape(-1, K)          # columns: class c
            coef, *_ = np.linalg.lstsq(X, Yw, rcond=None)             # (K (d+1), K classes)
            E[w_i] = coef.reshape(K, d + 1, K)[:, 0, :].T
            # constrained: rows (r, i, coord, c), columns (alpha_q, beta_q)
            own = np.moveaxis(Xw, 3, 2)                                # (R, n, K=c, p, d+1)
            other = Xw.sum(axis=3)[:, :, None] - own
            Xc = np.stack([own, other], -2)                            # (R, n, c, p, 2, d+1)
            Xc = np.swapaxes(Xc, 2, 3).reshape(-1, 2 * (d + 1))       # rows (r, i, p, c)
            yc = np.swapaxes(Y[:, a:b], 2, 3).reshape(-1)
            cab, *_ = np.linalg.lstsq(Xc, yc, rcond=None)
            ab[w_i] = cab.reshape(2, d + 1)[:, 0]
            if with_se:
                n_rows, n_cols = X.shape
                dof[w_i] = n_rows - n_cols
                norms = np.linalg.norm(X, axis=0)
                cond[w_i] = np.linalg.cond(X / np.where(norms > 0, norms, 1.0))
                pred = X @ coef
                fitted[:, a:b] = np.swapaxes(pred.reshape(R, b - a, p, K), 2, 3) \
                    * sq[None, a:b, None, None]
                res = Yw - pred
                s2 = (res ** 2).sum(axis=0) / max(n_rows - n_cols, 1)  # (K,) per class
                diag = np.diag(np.linalg.pinv(X.T @ X)).reshape(K, d + 1)[:, 0]
                se[w_i] = np.sqrt(np.maximum(s2[:, None] * diag[None, :], 0.0))
                rc = yc - Xc @ cab
                s2c = float(rc @ rc) / max(Xc.shape[0] - Xc.shape[1], 1)
                diag_c = np.diag(np.linalg.pinv(Xc.T @ Xc)).reshape(2, d + 1)[:, 0]
                ab_se[w_i] = np.sqrt(np.maximum(s2c * diag_c, 0.0))
        self._cond = cond
        return E, se, ab, ab_se, dof, fitted

    def fit(self, trajectory, **kwargs) -> "RegressionEstimator":
        """Fit E(t) per window, alpha, beta, sigma (and bootstrap bands) on ``trajectory``
        (anything :func:`as_trajectory` accepts; keyword arguments go to it)."""
        from scipy.stats import t as student_t

        self._check_level_and_boot()
        if self.window is not None and (int(self.window) != self.window or self.window < 1):
            raise ValueError(f"window must be a positive integer (increments per window), got "
                             f"{self.window}")
        if int(self.degree) != self.degree or self.degree < 0:
            raise ValueError(f"degree must be a non-negative integer, got {self.degree}")
        if self.quadrature not in ("left", "trapezoid"):
            raise ValueError(f"quadrature must be 'left' or 'trapezoid', got {self.quadrature!r}")
        traj = as_trajectory(trajectory, **kwargs)
        K, p = traj.K, traj.p
        n_inc = traj.T - 1
        window = int(self.window) if self.window is not None else max(5, n_inc // 20)
        window = min(window, n_inc)
        edges = _window_edges(n_inc, window)
        n_cols = K * (int(self.degree) + 1)
        if min(np.diff(edges)) * p * traj.R <= n_cols:
            raise ValueError(f"window = {window} increments x p = {p} x R = {traj.R} trials give "
                             f"too few rows to estimate {n_cols} coefficients per class; use a "
                             "longer window or a lower degree")
        G = field_values(self.field, traj.features, traj.labels, traj.ts, traj.K)                           # (R, T, N, p)
        xbar = traj.class_means()
        gbar = class_means(G, traj.labels, K)
        w = traj.class_weights
        E, se, ab, ab_se, dof, fitted = self._solve(xbar, gbar, w, traj.ts, edges, True)
        q = student_t.ppf(0.5 + self.level / 2, np.maximum(dof, 1))
        self.ts_ = traj.ts
        self.K_ = K
        self.window_ = window
        self.window_edges_ = edges
        left = traj.ts[:-1]
        self.window_times_ = np.array([left[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])
        self.window_bounds_ = np.stack([traj.ts[edges[:-1]], traj.ts[edges[1:]]], 1)
        self.edge_times_ = traj.ts[edges]
        self.E_, self.E_se_ = E, se
        self.E_ci_ = np.stack([E - q[:, None, None] * se, E + q[:, None, None] * se])
        self.alpha_, self.beta_ = ab[:, 0], ab[:, 1]
        self.alpha_se_, self.beta_se_ = ab_se[:, 0], ab_se[:, 1]
        self.alpha_ci_ = np.stack([self.alpha_ - q * self.alpha_se_,
                                   self.alpha_ + q * self.alpha_se_])
        self.beta_ci_ = np.stack([self.beta_ - q * self.beta_se_, self.beta_ + q * self.beta_se_])
        self.dof_ = dof
        self.condition_ = self._cond.copy()
        bad = np.flatnonzero(self.condition_ > self.CONDITION_WARN)
        if bad.size:
            warnings.warn(
                f"RegressionEstimator: in {bad.size} of {len(self.condition_)} windows the "
                f"regressors are nearly collinear (condition number up to "
                f"{self.condition_.max():.1e} > {self.CONDITION_WARN:.0e}), so the full E_ is "
                "poorly identified there (see E_se_); alpha_ and beta_ are not affected. "
                "Several trials from different initial states identify E.", UserWarning,
                stacklevel=2)
        dur = np.diff(self.window_bounds_, axis=1)[:, 0]
        self.A_ = np.concatenate([[0.0], np.cumsum(self.alpha_ * dur)])
        self.B_ = np.concatenate([[0.0], np.cumsum(self.beta_ * dur)])
        # sigma from per-sample residuals around the fitted class-mean increments f_k:
        # sum_j |dX_j - f_{y_j}|^2 = sum_j |dX_j|^2 - 2 sum_k n_k f_k . dXbar_k + sum_k n_k |f_k|^2
        dt = np.diff(traj.ts)
        n_k = traj.counts.astype(float)
        sq_inc = np.array([((traj.features[:, i + 1] - traj.features[:, i]) ** 2).sum()
                           for i in range(n_inc)])
        dxbar = np.diff(xbar, axis=1)                                   # (R, T-1, K, p)
        rss = (sq_inc - 2 * np.einsum("rtkp,rtkp,k->t", fitted, dxbar, n_k)
               + np.einsum("rtkp,rtkp,k->t", fitted, fitted, n_k))
        per_t = np.maximum(rss, 0.0) / (traj.R * traj.N * p) / dt       # (T-1,)
        self.sigma_ = np.sqrt(np.array([per_t[a:b].mean() for a, b in zip(edges[:-1], edges[1:])]))
        self.bands_ = {}
        self.bootstrap_mode_ = None
        if self.n_bootstrap > 0:
            mode = resolve_mode(self.bootstrap, traj.R, _REG_BOOT)
            self.bootstrap_mode_ = mode
            if mode != "none":
                self._bootstrap(traj, G, mode, edges)
        return self

    def _bootstrap(self, traj, G, mode, edges):
        rng = np.random.default_rng(self.seed)
        n = int(self.n_bootstrap)
        trials, weights = bootstrap_draws(traj, mode, n, rng)
        both = np.concatenate([traj.features, G], axis=3)             # (R, T, N, 2p)
        p = traj.p
        E_b = np.empty((n, len(edges) - 1, traj.K, traj.K))
        ab_b = np.empty((n, len(edges) - 1, 2))
        chunk = max(1, int(2e7 // max(1, traj.R * traj.T * traj.K * 2 * p)))
        for s in range(0, n, chunk):
            sl = slice(s, min(n, s + chunk))
            wts = None if weights is None else [wk[sl] for wk in weights]
            m = resampled_means(both, traj.labels, traj.K, trials[sl], wts)
            for j in range(m.shape[0]):
                E, _, ab, _, _, _ = self._solve(m[j, ..., :p], m[j, ..., p:], traj.class_weights,
                                             traj.ts, edges, False)
                E_b[s + j], ab_b[s + j] = E, ab
        self.bootstrap_E_ = E_b
        self.bands_ = {"E": percentile_band(E_b, self.level),
                       "alpha": percentile_band(ab_b[..., 0], self.level),
                       "beta": percentile_band(ab_b[..., 1], self.level)}
        self.se_ = {"E": E_b.std(axis=0, ddof=1), "alpha": ab_b[..., 0].std(axis=0, ddof=1),
                    "beta": ab_b[..., 1].std(axis=0, ddof=1)}

    def impacts(self, matrix: str = "auto"):
        """The fitted E(t) as a piecewise-constant :class:`~lesde.model.Impacts` (window w
        applies on ``[window_bounds_[w, 0], window_bounds_[w, 1])``; constant beyond the ends).

        ``matrix``: "full" (the K x K E_), "intra_inter" (alpha_, beta_), or "auto" (default):
        the full E where every window's design is well conditioned (``condition_`` at most 100),
        else the intra/inter fit. A full E from one trial of the cross-entropy field has
        condition numbers of several hundred and entries off by their own size (each row is
        free along the direction the class means of G nearly cancel), which a simulation
        amplifies; the intra/inter fit stays identified."""
        from ..model import Impacts

        self._check_fitted()
        if matrix not in ("auto", "full", "intra_inter"):
            raise ValueError(f"matrix must be 'auto', 'full' or 'intra_inter', got {matrix!r}")
        if matrix == "auto":
            matrix = "full" if np.all(self.condition_ <= 100.0) else "intra_inter"
        starts = self.window_bounds_[:, 0].copy()
        K = self.K_
        if matrix == "full":
            E = self.E_.copy()
        else:
            E = np.stack([(a - b) * np.eye(K) + b for a, b in zip(self.alpha_, self.beta_)])

        def E_of_t(t):
            w = int(np.clip(np.searchsorted(starts, t, side="right") - 1, 0, len(starts) - 1))
            return E[w]

        return Impacts(E_of_t)

    def results(self) -> dict:
        """Per-window results as a dict of (W,) arrays (E entries as ``E_c_k``)."""
        self._check_fitted()
        out = {"t": self.window_times_, "t_start": self.window_bounds_[:, 0],
               "t_end": self.window_bounds_[:, 1], "alpha": self.alpha_, "beta": self.beta_,
               "alpha_se": self.alpha_se_, "beta_se": self.beta_se_, "sigma": self.sigma_}
        K = self.K_
        for c in range(K):
            for k in range(K):
                out[f"E_{c}_{k}"] = self.E_[:, c, k]
                out[f"E_{c}_{k}_se"] = self.E_se_[:, c, k]
        for name in ("alpha", "beta"):
            if name in self.bands_:
                out[f"{name}_lo"], out[f"{name}_hi"] = self.bands_[name]
        return out

