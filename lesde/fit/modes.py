r"""The mode estimators: A(t), B(t) in closed form from class means, for the linear models.

For the I-model (G(x, k) = x) and the L-model (G(x, k) = P_k x) with balanced classes and
``E = (alpha - beta) I + beta 11^T``, the class means move along fixed modes whose amplitudes are
exponentials of A(t) = int alpha and B(t) = int beta (background.md, section 4), so A and B follow
from ratios of mode amplitudes at t and at t_0, at every logged time, however coarsely logged.
alpha and beta are their time derivatives (:func:`~lesde.fit.smooth_derivative`).

Two ways to combine the coordinates (``combine``):

* ``"projection"`` (default): each mode's amplitude is the least-squares scale of its vector
  (e.g. the grand mean) onto its value at t_0, ``<m(t), m(0)> / |m(0)|^2``, over all coordinates
  and classes at once. Exact for the model; a single coordinate near zero or changing sign does
  not matter, so no time is lost to a sign change. A whole mode that has turned against its
  start (amplitude <= 0, which the model cannot do; on real runs the grand mean of the logits
  often starts near zero and wanders) is read by the magnitude of its amplitude, as the authors'
  code reads every coordinate (``on_reversed="abs"``, default; counted in ``n_reversed_`` with
  a warning), or gives NaN (``"nan"``) or an error (``"raise"``).
* ``"log_abs"``: the mean over classes and coordinates of the logs of the per-coordinate ratios'
  absolute values, as the authors' code computes it (``estimate_AB_I`` / the general-K form of
  ``estimate_AB_L`` in github.com/zjiayao/le_sde). Exact for the model too, but a coordinate near
  zero gives a log near -infinity (a term whose starting value is below ``rel_tol`` times the
  largest is left out).
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np

from ._base import Estimator, ImpactTailIndex
from .derivatives import default_window, smooth_derivative
from .trajectory import Trajectory, as_trajectory
from .uncertainty import (band_from_replicates, bootstrap_draws, parallel_map, percentile_band,
                          resampled_means, resolve_mode)

__all__ = ["IEstimator", "LEstimator"]

_MODE_BOOT = ("auto", "samples", "trials", "both", "parametric", "none")


class _ModeEstimator(ImpactTailIndex, Estimator):
    """Common part of the I- and L-estimators: per-trial A, B from class means, averaged over
    trials; alpha, beta by a local polynomial in time; bootstrap bands."""

    _params = ("window", "order", "combine", "n_bootstrap", "bootstrap", "level", "seed",
               "rel_tol", "on_reversed")
    field_name = "identity"

    def __init__(self, window: Optional[float] = None, order: int = 2,
                 combine: str = "projection", n_bootstrap: int = 200, bootstrap: str = "auto",
                 level: float = 0.95, seed: int = 0, rel_tol: float = 1e-8,
                 on_reversed: str = "abs"):
        self.window = window
        self.order = order
        self.combine = combine
        self.n_bootstrap = n_bootstrap
        self.bootstrap = bootstrap
        self.level = level
        self.seed = seed
        self.rel_tol = rel_tol
        self.on_reversed = on_reversed

    def _core(self, means: np.ndarray, K: int):  # pragma: no cover - abstract
        """means (S, T, K, p) -> A, B (S, T), reversed-mode mask (S, T)."""
        raise NotImplementedError

    def _prepare(self, traj: Trajectory) -> None:
        """Model-specific input checks."""

    def _check(self):
        self._check_level_and_boot()
        if self.on_reversed not in ("abs", "raise", "nan"):
            raise ValueError(f"on_reversed must be 'abs', 'nan' or 'raise', got "
                             f"{self.on_reversed!r}")
        if self.combine not in ("projection", "log_abs"):
            raise ValueError(f"combine must be 'projection' or 'log_abs', got {self.combine!r}")
        if self.window is not None and not (np.isfinite(self.window) and self.window > 0):
            raise ValueError(f"window must be a positive width in time units, got {self.window}")

    def fit(self, trajectory, **kwargs) -> "_ModeEstimator":
        """Estimate A(t), B(t), alpha(t), beta(t) (and bands) from ``trajectory`` (anything
        :func:`~lesde.fit.as_trajectory` accepts; keyword arguments go to it)."""
        self._check()
        traj = as_trajectory(trajectory, **kwargs)
        self._prepare(traj)
        if not traj.balanced:
            warnings.warn(f"{type(self).__name__}: the classes are unbalanced (shares "
                          f"{np.round(traj.class_weights, 4).tolist()}); the estimator is exact "
                          "only for balanced classes and is an approximation here",
                          UserWarning, stacklevel=2)
        K = traj.K
        A_r, B_r, rev = self._core(traj.class_means(), K)
        empty = np.any(rev, axis=0)
        if np.any(empty) and self.on_reversed == "raise":
            i = int(np.flatnonzero(empty)[0])
            raise ValueError(f"{type(self).__name__}: at t = {traj.ts[i]:g} (index {i}) a mode "
                             "has turned against its start (amplitude <= 0), so A, B are "
                             "undefined in the model; pass on_reversed='abs' or 'nan'")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            A = np.nanmean(A_r, axis=0)
            B = np.nanmean(B_r, axis=0)
        self.ts_ = traj.ts
        self.K_ = K
        self.n_trials_ = traj.R
        self.A_trials_, self.B_trials_ = A_r, B_r
        self.n_reversed_ = int(np.sum(empty))
        if self.n_reversed_:
            how = ("read by the magnitude of its amplitude" if self.on_reversed == "abs"
                   else "NaN there")
            warnings.warn(f"{type(self).__name__}: at {self.n_reversed_} of {traj.T} logged "
                          f"times a mode has turned against its start (which the model cannot "
                          f"do): {how}", UserWarning, stacklevel=2)
        self.A_, self.B_ = A, B
        self.window_ = float(self.window) if self.window is not None else default_window(
            traj.ts, self.order)
        self.alpha_ = smooth_derivative(traj.ts, A, self.window_, self.order)
        self.beta_ = smooth_derivative(traj.ts, B, self.window_, self.order)
        self._sigma_spread(traj)
        self.bands_, self.se_ = {}, {}
        self.bootstrap_mode_ = None
        if self.n_bootstrap > 0:
            mode = resolve_mode(self.bootstrap, traj.R, _MODE_BOOT)
            self.bootstrap_mode_ = mode
            if mode != "none":
                self._bootstrap(traj, mode)
        return self

    def _log_amp(self, a: np.ndarray) -> tuple:
        """log of mode amplitudes a; reversed (a <= 0) by ``on_reversed``: (log, reversed mask)."""
        rev = ~(a > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.on_reversed == "abs":
                out = np.log(np.abs(a))
            else:
                out = np.where(rev, np.nan, np.log(np.where(rev, 1.0, a)))
        return np.where(np.isfinite(out), out, np.nan), rev & np.isfinite(a)

    def _sigma_spread(self, traj: Trajectory) -> None:
        """Additive noise from the within-class spread (exact in distribution for the model)."""
        from .shooting import within_class_sigma2

        s2, _ = within_class_sigma2(traj.features, traj.labels, traj.K, traj.ts)
        self.sigma_ = np.sqrt(s2) if s2 is not None else np.zeros(traj.T - 1)

    def _replicates(self, traj: Trajectory, mode: str, n: int, rng) -> tuple:
        """A, B (n, T) of n bootstrap replicates."""
        if mode == "parametric":
            return self._parametric(traj, n, rng)
        if mode == "trials":
            trials = rng.integers(0, traj.R, size=(n, traj.R))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return (np.nanmean(self.A_trials_[trials], axis=1),
                        np.nanmean(self.B_trials_[trials], axis=1))
        trials, weights = bootstrap_draws(traj, mode, n, rng)
        A_b = np.empty((n, traj.T))
        B_b = np.empty((n, traj.T))
        chunk = max(1, int(2e7 // max(1, traj.R * traj.T * traj.K * traj.p)))
        for s in range(0, n, chunk):
            sl = slice(s, min(n, s + chunk))
            w = None if weights is None else [wk[sl] for wk in weights]
            m = resampled_means(traj.features, traj.labels, traj.K, trials[sl], w)
            nb = m.shape[0]
            a, b, _ = self._core(m.reshape(nb * traj.R, *m.shape[2:]), traj.K)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                A_b[sl] = np.nanmean(a.reshape(nb, traj.R, -1), axis=1)
                B_b[sl] = np.nanmean(b.reshape(nb, traj.R, -1), axis=1)
        return A_b, B_b

    def _parametric(self, traj: Trajectory, n: int, rng) -> tuple:
        """Simulate the fitted linear SDE (alpha(t), beta(t) interpolated, additive sigma(t) from
        the within-class spread) from the logged X(t_0) and re-estimate; the simulator's Euler
        bias is removed with a noise-free control path."""
        from ..model import FunctionSchedule, Impacts, LESDE
        from ..solvers import simulate

        if not (np.all(np.isfinite(self.alpha_)) and np.all(np.isfinite(self.beta_))):
            raise ValueError("the parametric bootstrap needs alpha(t), beta(t) at every logged "
                             "time; use bootstrap='samples'")
        ts, a, b, sig = self.ts_, self.alpha_.copy(), self.beta_.copy(), self.sigma_.copy()
        imp = Impacts.intra_inter(FunctionSchedule(lambda t: np.interp(t, ts, a), "alpha"),
                                  FunctionSchedule(lambda t: np.interp(t, ts, b), "beta"), traj.K)

        def sigma_of_t(t):
            return float(sig[int(np.clip(np.searchsorted(ts, t, side="right") - 1, 0,
                                         len(sig) - 1))])

        rate = float(np.nanmax(np.abs(a)) + (traj.K - 1) * np.nanmax(np.abs(b))) / traj.K
        step = float(min(np.diff(ts).min() / 4, 0.05 / max(rate, 1e-300)))
        x0 = traj.features[:, 0]
        R = traj.R
        out_A, out_B = [], []
        for noise, count, seed in (("additive", n, int(rng.integers(0, 2 ** 62))),
                                   ("none", 1, 0)):
            sde = LESDE(traj.labels, imp, self.field_name,
                        sigma=FunctionSchedule(sigma_of_t, "sigma", nonneg=True)
                        if noise == "additive" else 0.0, noise=noise, dim=traj.p)
            x0b = np.broadcast_to(x0[None], (count,) + x0.shape).reshape(count * R,
                                                                          *x0.shape[1:])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sol = simulate(sde, np.ascontiguousarray(x0b), ts, step, seed=seed,
                               record="summary")
            means = np.transpose(sol.class_means, (1, 0, 2, 3))       # (count R, T, K, p)
            a_s, b_s, _ = self._core(means, traj.K)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out_A.append(np.nanmean(a_s.reshape(count, R, -1), axis=1))
                out_B.append(np.nanmean(b_s.reshape(count, R, -1), axis=1))
        offA, offB = out_A[1][0] - self.A_, out_B[1][0] - self.B_
        return out_A[0] - offA, out_B[0] - offB

    def _bootstrap(self, traj: Trajectory, mode: str) -> None:
        rng = np.random.default_rng(self.seed)
        n = int(self.n_bootstrap)
        A_b, B_b = self._replicates(traj, mode, n, rng)
        alpha_b = smooth_derivative(traj.ts, A_b, self.window_, self.order)
        beta_b = smooth_derivative(traj.ts, B_b, self.window_, self.order)
        self.bootstrap_A_, self.bootstrap_B_ = A_b, B_b
        interval = "basic" if mode == "parametric" else "percentile"
        self.band_method_ = f"{mode} bootstrap, {interval} interval"
        for name, est, reps in (("A", self.A_, A_b), ("B", self.B_, B_b),
                                ("alpha", self.alpha_, alpha_b), ("beta", self.beta_, beta_b)):
            self.bands_[name] = band_from_replicates(est, reps, self.level, interval)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)     # all-NaN times stay NaN
                self.se_[name] = np.nanstd(reps, axis=0, ddof=1)

    def impacts(self):
        """alpha(t), beta(t) (linear between logged times; NaN read as 0) as an Impacts."""
        from ..model import FunctionSchedule, Impacts

        self._check_fitted()
        ts, a, b = self.ts_, np.nan_to_num(self.alpha_), np.nan_to_num(self.beta_)
        return Impacts.intra_inter(FunctionSchedule(lambda t: np.interp(t, ts, a), "alpha"),
                                   FunctionSchedule(lambda t: np.interp(t, ts, b), "beta"),
                                   self.K_)

    def results(self) -> dict:
        """The fitted curves as a dict of (T,) arrays (bands as ``<name>_lo`` / ``<name>_hi``)."""
        self._check_fitted()
        out = {"t": self.ts_, "A": self.A_, "B": self.B_, "alpha": self.alpha_,
               "beta": self.beta_}
        for name, band in self.bands_.items():
            out[f"{name}_lo"], out[f"{name}_hi"] = band[0], band[1]
        return out


class IEstimator(_ModeEstimator):
    r"""Integrated impacts A(t), B(t) for the I-model (G(x, k) = x), exact for any K.

    With the class means ``Xbar_k(t)`` (over the tracked samples) and the grand mean
    ``xbar(t) = (1/K) sum_k Xbar_k(t)``, the noise-free balanced I-model gives
    ``xbar(t) = exp(L1) xbar(0)`` and ``Xbar_k(t) - xbar(t) = exp(L2) (Xbar_k(0) - xbar(0))``
    with ``L1 = (A + (K-1) B)/K`` and ``L2 = (A - B)/K``, so ::

        A = L1 + (K - 1) L2,      B = L1 - L2.

    ``combine="projection"``: ``exp(L1) = <xbar(t), xbar(0)> / |xbar(0)|^2`` and
    ``exp(L2) = sum_k <c_k(t), c_k(0)> / sum_k |c_k(0)|^2`` with ``c_k = Xbar_k - xbar``.
    ``combine="log_abs"``: per class k and coordinate j, ``log|xbar_j(t)/xbar_j(0)|`` and
    ``log|c_kj(t)/c_kj(0)|`` averaged over (k, j) (the authors' code).

    Noise: with additive noise the class means are noisy; log-ratios of noisy amplitudes are
    biased by about -var/2 (relative), small when the modes are well above the noise. Several
    trials (R > 1): A, B are estimated per trial (``A_trials_`` (R, T)) and averaged.

    Hyper-parameters
    ----------------
    window, order : width in time units (default :func:`~lesde.fit.default_window`, 4 median
        log intervals) and degree of the local polynomial for alpha = dA/dt, beta = dB/dt.
    combine : "projection" (default) or "log_abs" (see above).
    n_bootstrap : bootstrap replicates (default 200; 0: no bands).
    bootstrap : "auto" (trials when R > 1, else samples), "samples" (resample tracked samples
        within each class), "trials", "both", "parametric" (simulate the fitted I-model with the
        additive noise of the within-class spread from the logged X(t_0), re-estimate; basic
        interval), "none".
    level, seed : level of the bands and seed of the bootstrap.
    rel_tol : ``log_abs`` leaves out terms whose starting value is below rel_tol times the
        largest.
    on_reversed : a mode turned against its start: "abs" (default: the magnitude of its
        amplitude, with a warning), "nan" or "raise".

    Attributes after fit
    --------------------
    ts_ (T,), A_, B_, alpha_, beta_ (T,), A_trials_, B_trials_ (R, T), n_reversed_, window_
    (time units), sigma_ (T - 1,) additive noise from the within-class spread, bands_ (dict name
    -> (2, T) lower/upper band: A, B, alpha, beta), se_ (bootstrap standard errors),
    bootstrap_A_, bootstrap_B_ (n_boot, T), band_method_.

    Reference: Zhang, Wang & Su, "Imitating deep learning dynamics via locally elastic
    stochastic differential equations", NeurIPS 2021 (arXiv 2110.05960).
    """

    field_name = "identity"

    def _core(self, means, K):
        grand = means.mean(axis=2)                                   # (S, T, p)
        cen = means - grand[:, :, None, :]                           # (S, T, K, p)
        if self.combine == "projection":
            g = np.einsum("stp,sp->st", grand, grand[:, 0]) / np.maximum(
                (grand[:, 0] ** 2).sum(-1), 1e-300)[:, None]
            h = np.einsum("stkp,skp->st", cen, cen[:, 0]) / np.maximum(
                (cen[:, 0] ** 2).sum((-1, -2)), 1e-300)[:, None]
            L1, r1 = self._log_amp(g)
            L2, r2 = self._log_amp(h)
            rev = r1 | r2
        else:
            c0, ck = grand[:, 0], cen[:, 0]
            scale = np.maximum(np.abs(c0).max(axis=1), np.abs(ck).max(axis=(1, 2)))
            ok0 = np.abs(c0) > self.rel_tol * scale[:, None]
            okk = np.abs(ck) > self.rel_tol * scale[:, None, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                lg = np.log(np.abs(grand / np.where(ok0, c0, 1.0)[:, None]))
                lh = np.log(np.abs(cen / np.where(okk, ck, 1.0)[:, None]))
            lg = np.where(ok0[:, None] & np.isfinite(lg), lg, np.nan)
            lh = np.where(okk[:, None] & np.isfinite(lh), lh, np.nan)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                L1 = np.nanmean(lg, axis=-1)
                L2 = np.nanmean(lh, axis=(-1, -2))
            rev = np.zeros(L1.shape, dtype=bool)
        A = L1 + (K - 1) * L2
        B = L1 - L2
        return A, B, rev


class LEstimator(_ModeEstimator):
    r"""Integrated impacts A(t), B(t) for the L-model (G(x, k) = P_k x, p = K), exact for any K.

    With ``d_k = e_k - 1/K`` (``|d_k|^2 = 1 - 1/K``) the label coordinates are
    ``y_k(t) = d_k . Xbar_k(t) / |d_k|^2`` and ``ybar = (1/K) sum_k y_k``. In the noise-free
    balanced L-model ``dy_c/dt = (1/K) [alpha y_c - beta/(K-1) sum_{k != c} y_k]``, so ybar
    scales by ``exp((A - B)/K)`` and ``dev = y - ybar`` by ``exp((A + B/(K-1))/K)``::

        u = K log(ybar(t) / ybar(0))                                   = A - B
        v = K log(<dev(t), dev(0)> / |dev(0)|^2)     (projection)       = A + B/(K-1)
        B = (K-1)(v - u)/K,     A = u + B.

    ``combine="log_abs"`` uses ``u = K log|ybar(t)/ybar(0)|`` and
    ``v = K mean_k log|dev_k(t)/dev_k(0)|`` (the general-K form of the authors' code; their
    K = 3 shortcut is approximate and not used). The symmetric mode ybar is a single number:
    where it changes sign the mode is reversed (``on_reversed``).

    Hyper-parameters and attributes as :class:`IEstimator`. Needs p = K features (logits).
    """

    field_name = "label_projection"

    def _prepare(self, traj):
        if traj.p != traj.K:
            raise ValueError(f"the L-estimator needs features of dimension p = K = {traj.K} "
                             f"(logits), got p = {traj.p}")

    def _core(self, means, K):
        y = (np.diagonal(means, axis1=2, axis2=3) - means.mean(axis=3)) / (1.0 - 1.0 / K)
        ybar = y.mean(axis=2)                                       # (S, T)
        dev = y - ybar[:, :, None]                                  # (S, T, K)
        if self.combine == "projection":
            lu, r1 = self._log_amp(ybar / np.where(ybar[:, :1] != 0, ybar[:, :1], 1e-300))
            amp = np.einsum("stk,sk->st", dev, dev[:, 0]) / np.maximum(
                (dev[:, 0] ** 2).sum(-1), 1e-300)[:, None]
            lv, r2 = self._log_amp(amp)
            u, v, rev = K * lu, K * lv, r1 | r2
        else:
            scale = np.maximum(np.abs(y[:, 0]).max(axis=1), 1e-300)
            ok_u = np.abs(ybar[:, 0]) > self.rel_tol * scale
            ok_v = np.abs(dev[:, 0]) > self.rel_tol * scale[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                u = K * np.log(np.abs(ybar / np.where(ok_u, ybar[:, 0], 1.0)[:, None]))
                lv = np.log(np.abs(dev / np.where(ok_v, dev[:, 0], 1.0)[:, None, :]))
            u = np.where(ok_u[:, None] & np.isfinite(u), u, np.nan)
            lv = np.where(ok_v[:, None, :] & np.isfinite(lv), lv, np.nan)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                v = K * np.nanmean(lv, axis=-1)
            rev = np.zeros(u.shape, dtype=bool)
        B = (K - 1) * (v - u) / K
        A = u + B
        return A, B, rev
