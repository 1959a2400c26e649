r"""Fit the locally elastic SDE to feature trajectories: estimators of the impacts with uncertainty.

The locally elastic SDE (Zhang, Wang & Su, NeurIPS 2021, arXiv 2110.05960; background.md
sections 2 and 4) in the package's canonical form::

    dX_j = (1/N) sum_{j'} E(t)[y_j, y_j'] G(X_j', y_j'; t) dt + sigma(t) dW_j
         = sum_k E(t)[y_j, k] (n_k/N) Gbar_k(t) dt + sigma(t) dW_j,

with ``Gbar_k`` the mean of the drift field G over class k, ``E = (alpha - beta) I + beta 11^T``
in the paper's case, ``A(t) = int_0^t alpha`` and ``B(t) = int_0^t beta``. Time is the
lr-scaled training time ``t = step * lr`` (one SGD step of learning rate h advances t by h), so
alpha and beta are impacts per unit of lr-scaled time.

This module estimates A, B, alpha, beta, the whole K x K matrix E and sigma from a trajectory
(a simulated :class:`~lesde.solvers.Solution`, a logged
:class:`~lesde.tracking.TrajectoryStore`, or plain arrays), with bootstrap confidence bands, and
checks how well the fitted SDE imitates the trajectory:

* :class:`Trajectory` / :func:`as_trajectory`: the input adapter, features ``(R, T, N, p)`` of
  R independent trials, labels ``(N,)``, times ``(T,)``.
* :class:`IEstimator`: A(t), B(t) exact for the I-model (G(x, k) = x), any K.
* :class:`LEstimator`: A(t), B(t) exact for the L-model (G(x, k) = P_k x, p = K), any K.
* :class:`RegressionEstimator`: windowed least squares of feature increments on the per-class
  mean drift terms: E(t) per window, alpha, beta under the intra/inter constraint, sigma; any
  drift field (identity, label projection, cross-entropy, cross-entropy through a read-out, a
  callable).
* :func:`smooth_derivative`, :func:`default_window`, :func:`tail_index`: alpha = dA/dt by a
  Savitzky-Golay filter and the tail index r of a decaying impact.
* :func:`goodness_of_fit`: simulate the fitted SDE from the logged X(0) and compare.

Estimators follow scikit-learn's convention: hyper-parameters in ``__init__``, ``fit(trajectory)``
returns the estimator, results are attributes ending in ``_``.

Balanced classes. The I- and L-estimators use the unweighted mean of the K class means as the
grand mean; the modes ``exp((A + (K-1)B)/K)`` / ``exp((A - B)/K)`` (I-model) and
``exp((A - B)/K)`` / ``exp((A + B/(K-1))/K)`` (L-model) are eigen-modes of the class-mean
dynamics only when every class has the same share n_k/N of the training set. With unbalanced
classes the modes mix and the two estimators are approximations (a warning says so); the
regression estimator has no such restriction (it uses the class shares ``n_k/N`` explicitly).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field as dc_field
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "Trajectory",
    "as_trajectory",
    "IEstimator",
    "LEstimator",
    "RegressionEstimator",
    "smooth_derivative",
    "default_window",
    "tail_index",
    "GoodnessOfFit",
    "goodness_of_fit",
]

_BOOTSTRAP_MODES = ("auto", "samples", "trials", "both", "none")


# ============================================================================================
# Input adapter
# ============================================================================================
@dataclass(frozen=True, eq=False)
class Trajectory:
    r"""Feature trajectories of N tracked samples over T times, in R independent trials.

    Parameters
    ----------
    ts : (T,) strictly increasing times (lr-scaled training time ``step * lr``), T >= 2.
    features : (T, N, p) for one trial or (R, T, N, p) for R independent trials (same labels and
        times, e.g. repeated training runs or ``simulate(..., num_runs=R)``).
    labels : (N,) integer labels in 0..K-1, every class non-empty.
    num_classes : K (default ``labels.max() + 1``).
    class_weights : (K,) the shares n_k/N of the classes in the *whole training set* that enter
        the drift ``sum_k E[c, k] (n_k/N) Gbar_k``; default: the shares among the tracked samples.

    After construction ``features`` is always a float64 array of shape (R, T, N, p).
    """

    ts: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    num_classes: Optional[int] = None
    class_weights: Optional[np.ndarray] = None

    def __post_init__(self):
        ts = np.asarray(self.ts, dtype=float)
        if ts.ndim != 1 or ts.shape[0] < 2:
            raise ValueError(f"ts must have shape (T,) with T >= 2, got shape {ts.shape}")
        if not np.all(np.isfinite(ts)) or np.any(np.diff(ts) <= 0):
            raise ValueError("ts must be finite and strictly increasing")
        x = np.asarray(self.features, dtype=float)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"features must have shape (T, N, p) or (R, T, N, p), got {x.shape}")
        if x.shape[1] != ts.shape[0]:
            raise ValueError(f"features has {x.shape[1]} times but ts has {ts.shape[0]}: "
                             f"expected features of shape (R, T={ts.shape[0]}, N, p)")
        if not np.all(np.isfinite(x)):
            raise ValueError("features contain non-finite values (an overflowed run?)")
        y = np.asarray(self.labels)
        if y.ndim != 1 or y.shape[0] != x.shape[2]:
            raise ValueError(f"labels must have shape (N,) = ({x.shape[2]},), got {y.shape}")
        yf = np.asarray(y, dtype=float)
        if y.size and not np.all(yf == np.round(yf)):
            raise ValueError("labels must be integers")
        y = y.astype(np.int64)
        K = int(self.num_classes) if self.num_classes is not None else int(y.max()) + 1
        if K < 2:
            raise ValueError(f"need at least K = 2 classes, got K = {K}")
        if y.min() < 0 or y.max() >= K:
            raise ValueError(f"labels must lie in 0..K-1 = 0..{K - 1}, got {y.min()}..{y.max()}")
        counts = np.bincount(y, minlength=K)
        if np.any(counts == 0):
            raise ValueError(f"class(es) {np.flatnonzero(counts == 0).tolist()} have no tracked "
                             f"samples; every class 0..{K - 1} needs at least one")
        if self.class_weights is None:
            w = counts / counts.sum()
        else:
            w = np.asarray(self.class_weights, dtype=float)
            if w.shape != (K,) or np.any(w <= 0) or not np.all(np.isfinite(w)):
                raise ValueError(f"class_weights must be K = {K} positive shares n_k/N, got {w}")
            w = w / w.sum()
        object.__setattr__(self, "ts", ts)
        object.__setattr__(self, "features", x)
        object.__setattr__(self, "labels", y)
        object.__setattr__(self, "num_classes", K)
        object.__setattr__(self, "class_weights", w)

    @property
    def R(self) -> int:
        """Number of independent trials."""
        return self.features.shape[0]

    @property
    def T(self) -> int:
        return self.features.shape[1]

    @property
    def N(self) -> int:
        return self.features.shape[2]

    @property
    def p(self) -> int:
        return self.features.shape[3]

    @property
    def K(self) -> int:
        return int(self.num_classes)

    @property
    def counts(self) -> np.ndarray:
        """(K,) tracked samples per class."""
        return np.bincount(self.labels, minlength=self.K)

    @property
    def balanced(self) -> bool:
        return bool(np.allclose(self.class_weights, 1.0 / self.K, rtol=1e-9, atol=0))

    def class_means(self) -> np.ndarray:
        """(R, T, K, p) class means of the tracked samples."""
        return _class_means(self.features, self.labels, self.K)


def _class_means(x: np.ndarray, labels: np.ndarray, K: int) -> np.ndarray:
    weights = (np.eye(K)[labels] / np.bincount(labels, minlength=K)).T     # (K, N)
    return np.matmul(weights, x)                                           # (R, T, K, p)


def _is_store(obj) -> bool:
    return hasattr(obj, "group") and hasattr(obj, "split") and hasattr(obj, "array")


def as_trajectory(source, *, what: str = "logits", split: str = "train",
                  labels=None, ts=None, class_weights=None) -> Trajectory:
    """Turn a simulation, a training log or arrays into a :class:`Trajectory`.

    Parameters
    ----------
    source :
        * a :class:`Trajectory` (returned as is);
        * a :class:`~lesde.solvers.Solution` recorded with ``record="full"``: its B runs become
          R = B independent trials (same labels, same times);
        * a :class:`~lesde.tracking.TrajectoryStore` or the path of one: the ``what`` array
          ("logits", default, or "features") of the tracked samples of ``split`` ("train",
          default, "test" or "all") at the logged lr-scaled times ``store.time``;
        * an array of features (T, N, p) or (R, T, N, p), with ``labels`` and ``ts`` given;
        * a tuple ``(ts, features, labels)``;
        * a list of stores (or their paths): independent training runs (e.g. other seeds) with
          the same logged times and the same tracked labels, stacked as R trials. Several runs
          identify the full E of the cross-entropy field, which one run does not (see
          :class:`RegressionEstimator`, "Identifiability").
    class_weights : (K,) shares of the classes in the training set (see :class:`Trajectory`).
    """
    if isinstance(source, Trajectory):
        return source
    if isinstance(source, list):
        return _stack_runs(source, what=what, split=split, class_weights=class_weights)
    from .solvers import Solution

    if isinstance(source, Solution):
        if source.states is None:
            raise ValueError("source Solution has no states: simulate with record='full' to fit "
                             "per-sample trajectories")
        if np.any(source.overflowed):
            raise ValueError(f"source Solution has overflowed runs "
                             f"{np.flatnonzero(source.overflowed).tolist()}: drop them first")
        return Trajectory(source.ts, np.transpose(source.states, (1, 0, 2, 3)), source.labels,
                          num_classes=source.K, class_weights=class_weights)
    if isinstance(source, (str, os.PathLike)):
        from .tracking import load_store

        source = load_store(source)
    if _is_store(source):
        if what not in ("logits", "features"):
            raise ValueError(f"what must be 'logits' or 'features', got {what!r}")
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        s = source.split
        sel = {"train": s == 0, "test": s == 1, "all": np.ones_like(s, dtype=bool)}[split]
        if not np.any(sel):
            raise ValueError(f"the store has no tracked {split} samples")
        x = source.array(what)[:, sel]
        return Trajectory(source.time, x, source.labels[sel],
                          num_classes=source.config.num_classes, class_weights=class_weights)
    if isinstance(source, tuple) and len(source) == 3:
        return Trajectory(source[0], source[1], source[2], class_weights=class_weights)
    if labels is None or ts is None:
        raise ValueError("an array source needs labels (N,) and ts (T,); or pass a Trajectory, "
                         "a Solution, a TrajectoryStore or a tuple (ts, features, labels)")
    return Trajectory(ts, source, labels, class_weights=class_weights)


def _stack_runs(sources: list, **kwargs) -> Trajectory:
    """Several logged runs as the trials of one Trajectory (same times, same tracked labels)."""
    if not sources:
        raise ValueError("an empty list of runs was given")
    trajs = []
    for i, src in enumerate(sources):
        if not (isinstance(src, (str, os.PathLike)) or _is_store(src)):
            raise ValueError(f"a list source must hold trajectory stores or their paths; item {i} "
                             f"is a {type(src).__name__}")
        trajs.append(as_trajectory(src, **kwargs))
    first = trajs[0]
    for i, tr in enumerate(trajs[1:], start=1):
        if tr.ts.shape != first.ts.shape or not np.allclose(tr.ts, first.ts):
            raise ValueError(f"run {i} is logged at other times than run 0 (T = {tr.T} vs "
                             f"{first.T}); runs stacked as trials need the same log times")
        if not np.array_equal(tr.labels, first.labels):
            raise ValueError(f"run {i} tracks samples with other labels (or in another order) "
                             "than run 0; runs stacked as trials need the same tracked labels")
        if tr.p != first.p:
            raise ValueError(f"run {i} has p = {tr.p}, run 0 has p = {first.p}")
    return Trajectory(first.ts, np.concatenate([tr.features for tr in trajs], axis=0),
                      first.labels, num_classes=first.K, class_weights=kwargs.get("class_weights"))


# ============================================================================================
# Savitzky-Golay derivative and tail index
# ============================================================================================
def default_window(T: int, order: int = 2) -> int:
    """The default Savitzky-Golay window: the odd number nearest to T/10, at least
    ``order + 3`` (5 for order 2) and at most the largest odd number <= T."""
    w = int(round(T / 10.0))
    w = w if w % 2 == 1 else w + 1
    w = max(w, order + 3 if (order + 3) % 2 == 1 else order + 4)
    top = T if T % 2 == 1 else T - 1
    return max(min(w, top), 1)


def smooth_derivative(ts, values, window: Optional[int] = None, order: int = 2,
                      axis: int = -1) -> np.ndarray:
    r"""``d values / dt`` by a Savitzky-Golay filter (local polynomial of degree ``order``).

    ``values`` has the time axis ``axis`` of length T = len(ts). ``window`` (odd, > order) is
    the number of points of each local fit; default :func:`default_window`. The filter needs
    equally spaced times: if ``ts`` is not uniform (e.g. a last logged step off the grid), the
    values are interpolated linearly to T equally spaced times, differentiated, and
    interpolated back. Non-finite values propagate (NaN out wherever a window touches them).
    """
    from scipy.signal import savgol_filter

    ts = np.asarray(ts, dtype=float)
    y = np.moveaxis(np.asarray(values, dtype=float), axis, -1)
    T = ts.shape[0]
    if y.shape[-1] != T:
        raise ValueError(f"values has {y.shape[-1]} times along axis {axis}, ts has {T}")
    if T < order + 2:
        raise ValueError(f"need at least order + 2 = {order + 2} times to differentiate, got {T}")
    if window is None:
        window = default_window(T, order)
    window = int(window)
    if window % 2 == 0 or window <= order or window > T:
        raise ValueError(f"window must be odd, > order = {order} and <= T = {T}, got {window}")
    dts = np.diff(ts)
    uniform = np.allclose(dts, dts.mean(), rtol=1e-6, atol=0)
    if uniform:
        return np.moveaxis(savgol_filter(y, window, order, deriv=1, delta=float(dts.mean()),
                                         axis=-1, mode="interp"), -1, axis)
    grid = np.linspace(ts[0], ts[-1], T)
    flat = y.reshape(-1, T)
    yg = np.stack([np.interp(grid, ts, row) for row in flat])
    dg = savgol_filter(yg, window, order, deriv=1, delta=float(grid[1] - grid[0]), axis=-1,
                       mode="interp")
    back = np.stack([np.interp(ts, grid, row) for row in dg]).reshape(y.shape)
    return np.moveaxis(back, -1, axis)


def tail_index(ts, values, tail: float = 0.5, kind: str = "integral") -> dict:
    r"""Tail index r of a decaying impact from a log-log fit on the tail.

    ``kind="integral"`` (the paper's definition): ``values`` is A(t); if A(t) ~ c t^(1-r) then
    ``r = 1 - d log A / d log t``. Valid for r < 1 (A diverges); for r > 1, A converges and the
    slope tends to 0, so this returns values near 1 (it cannot tell r = 1.2 from r = 1).
    The local slope converges slowly when r is near 1: for ``A = (t^(1-r) - 1)/(1-r)`` it is
    ``(1-r) t^(1-r) / (t^(1-r) - 1)``, so r is under-estimated (0.85 for r = 0.9 at t = 1e5
    in units of the decay's onset time); compare with ``kind="rate"`` there.
    ``kind="rate"``: ``values`` is alpha(t) ~ c t^(-r), ``r = -d log alpha / d log t``; valid for
    any r but noisier (a derivative).

    The slope is the least-squares slope of log(values) on log(t) over the times in the last
    ``tail`` fraction of the log-time range, keeping t > 0 and values > 0.

    Returns a dict with ``r``, ``r_se`` (the least-squares standard error), ``slope``,
    ``n_points``, ``t_min`` and ``t_max``.
    """
    if kind not in ("integral", "rate"):
        raise ValueError(f"kind must be 'integral' or 'rate', got {kind!r}")
    if not 0 < tail <= 1:
        raise ValueError(f"tail must be in (0, 1], got {tail}")
    ts = np.asarray(ts, dtype=float)
    v = np.asarray(values, dtype=float)
    if v.shape != ts.shape:
        raise ValueError(f"values must have the shape of ts {ts.shape}, got {v.shape}")
    ok = (ts > 0) & (v > 0) & np.isfinite(v)
    if ok.sum() < 3:
        raise ValueError("need at least 3 times with t > 0 and a positive value for a tail fit")
    lt = np.log(ts[ok])
    lo = lt[-1] - tail * (lt[-1] - lt[0])
    sel = lt >= lo
    x, yv = lt[sel], np.log(v[ok][sel])
    if x.size < 3:
        raise ValueError(f"only {x.size} points in the tail; increase tail or log more times")
    X = np.stack([np.ones_like(x), x], 1)
    coef, *_ = np.linalg.lstsq(X, yv, rcond=None)
    resid = yv - X @ coef
    s2 = float(resid @ resid) / max(x.size - 2, 1)
    cov = s2 * np.linalg.inv(X.T @ X)
    slope = float(coef[1])
    r = 1.0 - slope if kind == "integral" else -slope
    return {"r": r, "r_se": float(math.sqrt(max(cov[1, 1], 0.0))), "slope": slope,
            "n_points": int(x.size), "t_min": float(math.exp(x[0])),
            "t_max": float(math.exp(x[-1]))}


# ============================================================================================
# Bootstrap: resampled class means
# ============================================================================================
def _resolve_mode(mode: str, R: int) -> str:
    if mode not in _BOOTSTRAP_MODES:
        raise ValueError(f"bootstrap must be one of {', '.join(_BOOTSTRAP_MODES)}, got {mode!r}")
    if mode == "auto":
        return "trials" if R > 1 else "samples"
    if mode in ("trials", "both") and R < 2:
        raise ValueError(f"bootstrap={mode!r} needs several independent trials, got R = {R}")
    return mode


def _bootstrap_draws(traj: Trajectory, mode: str, n_boot: int, rng) -> tuple:
    """(trial index (n_boot, R), per-class weights list of (n_boot, R, n_k) or None)."""
    R = traj.R
    if mode in ("trials", "both"):
        trials = rng.integers(0, R, size=(n_boot, R))
    else:
        trials = np.broadcast_to(np.arange(R), (n_boot, R)).copy()
    weights = None
    if mode in ("samples", "both"):
        weights = []
        for k in range(traj.K):
            nk = int(traj.counts[k])
            idx = rng.integers(0, nk, size=(n_boot, R, nk))
            w = np.zeros((n_boot, R, nk))
            np.add.at(w, (np.arange(n_boot)[:, None, None], np.arange(R)[None, :, None], idx), 1.0)
            weights.append(w / nk)
    return trials, weights


def _resampled_means(x: np.ndarray, labels: np.ndarray, K: int, trials, weights) -> np.ndarray:
    """Class means (n_boot, R, T, K, q) of x (R, T, N, q) under the bootstrap draws."""
    n_boot, R = trials.shape
    T, q = x.shape[1], x.shape[3]
    out = np.empty((n_boot, R, T, K, q))
    for k in range(K):
        idx = np.flatnonzero(labels == k)
        xk = x[:, :, idx, :]                                       # (R, T, nk, q)
        if weights is None:
            m = xk.mean(2)                                         # (R, T, q)
            out[:, :, :, k, :] = m[trials]
            continue
        wk = weights[k]                                            # (n_boot, R, nk)
        for r in range(x.shape[0]):
            b_idx, s_idx = np.nonzero(trials == r)
            if b_idx.size == 0:
                continue
            flat = xk[r].transpose(1, 0, 2).reshape(idx.size, T * q)   # (nk, T q)
            out[b_idx, s_idx, :, k, :] = (wk[b_idx, s_idx] @ flat).reshape(-1, T, q)
    return out


def _percentile_band(samples: np.ndarray, level: float) -> np.ndarray:
    """(2, ...) lower and upper percentile band over axis 0, ignoring NaN replicates."""
    lo = 100 * (1 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.stack([np.nanpercentile(samples, lo, axis=0),
                         np.nanpercentile(samples, 100 - lo, axis=0)])


# ============================================================================================
# Estimators
# ============================================================================================
class _Estimator:
    """Shared scikit-learn-like plumbing: get_params / repr / parameter checks."""

    _params: Sequence[str] = ()

    def get_params(self) -> dict:
        return {k: getattr(self, k) for k in self._params}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def _check_common(self):
        if int(self.n_bootstrap) != self.n_bootstrap or self.n_bootstrap < 0:
            raise ValueError(f"n_bootstrap must be a non-negative integer, got {self.n_bootstrap}")
        if not 0 < self.level < 1:
            raise ValueError(f"level must be in (0, 1), got {self.level}")
        if self.on_empty not in ("raise", "nan"):
            raise ValueError(f"on_empty must be 'raise' or 'nan', got {self.on_empty!r}")

    def _check_fitted(self):
        if not hasattr(self, "ts_"):
            raise ValueError(f"this {type(self).__name__} is not fitted yet: call fit(trajectory)")


class _ModeEstimator(_Estimator):
    """Common part of the I- and L-estimators: per-trial A, B from class means, averaged over
    trials; alpha, beta by Savitzky-Golay; bootstrap bands."""

    _params = ("window", "order", "n_bootstrap", "bootstrap", "level", "seed", "rel_tol",
               "on_empty")

    def __init__(self, window: Optional[int] = None, order: int = 2, n_bootstrap: int = 0,
                 bootstrap: str = "auto", level: float = 0.95, seed: int = 0,
                 rel_tol: float = 1e-8, on_empty: str = "raise"):
        self.window = window
        self.order = order
        self.n_bootstrap = n_bootstrap
        self.bootstrap = bootstrap
        self.level = level
        self.seed = seed
        self.rel_tol = rel_tol
        self.on_empty = on_empty

    def _core(self, means: np.ndarray, K: int):  # pragma: no cover - abstract
        """means (S, T, K, p) -> A, B, valid-term counts, each (S, T)."""
        raise NotImplementedError

    def _prepare(self, traj: Trajectory) -> None:
        """Model-specific input checks."""

    def fit(self, trajectory, **kwargs) -> "_ModeEstimator":
        """Estimate A(t), B(t), alpha(t), beta(t) (and bands) from ``trajectory`` (anything
        :func:`as_trajectory` accepts; keyword arguments go to it)."""
        self._check_common()
        traj = as_trajectory(trajectory, **kwargs)
        self._prepare(traj)
        if not traj.balanced:
            warnings.warn(f"{type(self).__name__}: the classes are unbalanced (shares "
                          f"{np.round(traj.class_weights, 4).tolist()}); the estimator is exact "
                          "only for balanced classes and is an approximation here",
                          UserWarning, stacklevel=2)
        K = traj.K
        means = traj.class_means()                                # (R, T, K, p)
        A_r, B_r, n_terms = self._core(means, K)
        empty = np.all(n_terms == 0, axis=0)
        if np.any(empty) and self.on_empty == "raise":
            i = int(np.flatnonzero(empty)[0])
            raise ValueError(f"{type(self).__name__}: at t = {traj.ts[i]:g} (index {i}) no term "
                             "is usable (every ratio is non-positive, non-finite or has a zero "
                             "denominator), so A, B are undefined there; pass on_empty='nan' to "
                             "get NaN at such times")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            A = np.nanmean(A_r, axis=0)
            B = np.nanmean(B_r, axis=0)
        self.ts_ = traj.ts
        self.K_ = K
        self.n_trials_ = traj.R
        self.A_trials_, self.B_trials_ = A_r, B_r
        self.n_terms_ = n_terms
        self.A_, self.B_ = A, B
        self.window_ = (self.window if self.window is not None
                        else default_window(traj.T, self.order))
        self.alpha_ = _nan_safe_derivative(traj.ts, A, self.window_, self.order)
        self.beta_ = _nan_safe_derivative(traj.ts, B, self.window_, self.order)
        self.bands_ = {}
        self.bootstrap_mode_ = None
        if self.n_bootstrap > 0:
            mode = _resolve_mode(self.bootstrap, traj.R)
            self.bootstrap_mode_ = mode
            if mode != "none":
                self._bootstrap(traj, mode)
        return self

    def _bootstrap(self, traj: Trajectory, mode: str) -> None:
        rng = np.random.default_rng(self.seed)
        n = int(self.n_bootstrap)
        if mode == "trials":
            # resampling whole trials: the per-trial estimates are resampled directly
            trials = rng.integers(0, traj.R, size=(n, traj.R))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                A_b = np.nanmean(self.A_trials_[trials], axis=1)
                B_b = np.nanmean(self.B_trials_[trials], axis=1)
        else:
            trials, weights = _bootstrap_draws(traj, mode, n, rng)
            A_b = np.empty((n, traj.T))
            B_b = np.empty((n, traj.T))
            chunk = max(1, int(2e7 // max(1, traj.R * traj.T * traj.K * traj.p)))
            for s in range(0, n, chunk):
                sl = slice(s, min(n, s + chunk))
                w = None if weights is None else [wk[sl] for wk in weights]
                m = _resampled_means(traj.features, traj.labels, traj.K, trials[sl], w)
                nb = m.shape[0]
                a, b, _ = self._core(m.reshape(nb * traj.R, *m.shape[2:]), traj.K)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    A_b[sl] = np.nanmean(a.reshape(nb, traj.R, -1), axis=1)
                    B_b[sl] = np.nanmean(b.reshape(nb, traj.R, -1), axis=1)
        alpha_b = _nan_safe_derivative(traj.ts, A_b, self.window_, self.order)
        beta_b = _nan_safe_derivative(traj.ts, B_b, self.window_, self.order)
        self.bootstrap_A_, self.bootstrap_B_ = A_b, B_b
        self.bands_ = {"A": _percentile_band(A_b, self.level),
                       "B": _percentile_band(B_b, self.level),
                       "alpha": _percentile_band(alpha_b, self.level),
                       "beta": _percentile_band(beta_b, self.level)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)     # all-NaN times stay NaN
            self.se_ = {name: np.nanstd(v, axis=0, ddof=1) for name, v in
                        (("A", A_b), ("B", B_b), ("alpha", alpha_b), ("beta", beta_b))}

    def tail_index(self, tail: float = 0.5, which: str = "A") -> dict:
        """Tail index r of the fitted intra- (``which="A"``) or inter-class (``"B"``) impact,
        by :func:`tail_index` with ``kind="integral"`` on A(t) (or B(t))."""
        self._check_fitted()
        if which not in ("A", "B"):
            raise ValueError(f"which must be 'A' or 'B', got {which!r}")
        return tail_index(self.ts_, self.A_ if which == "A" else self.B_, tail=tail)

    def results(self) -> dict:
        """The fitted curves as a dict of (T,) arrays (bands as ``<name>_lo`` / ``<name>_hi``)."""
        self._check_fitted()
        out = {"t": self.ts_, "A": self.A_, "B": self.B_, "alpha": self.alpha_, "beta": self.beta_}
        for name, band in self.bands_.items():
            out[f"{name}_lo"], out[f"{name}_hi"] = band[0], band[1]
        return out


def _nan_safe_derivative(ts, values, window, order):
    """Row-wise derivative; rows with NaN give NaN where their windows touch them."""
    out = smooth_derivative(ts, np.nan_to_num(values, nan=0.0), window, order)
    bad = ~np.isfinite(values)
    if np.any(bad):
        from scipy.ndimage import maximum_filter1d

        spread = maximum_filter1d(bad.astype(np.uint8), size=window, axis=-1).astype(bool)
        out[spread] = np.nan
    return out


class IEstimator(_ModeEstimator):
    r"""Integrated impacts A(t), B(t) for the I-model (G(x, k) = x), exact for any K.

    With the class means ``Xbar_k(t)`` (over the tracked samples), the grand mean
    ``xbar(t) = (1/K) sum_k Xbar_k(t)``, ``c_0 = xbar(0)`` and ``c_k = Xbar_k(0) - xbar(0)``,
    the noise-free balanced I-model gives ``xbar(t) = exp((A + (K-1)B)/K) c_0`` and
    ``Xbar_k(t) - xbar(t) = exp((A - B)/K) c_k``, so per class k and coordinate j::

        g_j(t)  = xbar_j(t) / c_0j                          = exp((A + (K-1) B)/K)
        h_kj(t) = (Xbar_kj(t) - xbar_j(t)) / c_kj          = exp((A - B)/K)
        B = log g_j - log h_kj,     A = log g_j + (K-1) log h_kj,

    averaged over all usable (k, j). Rule for unusable terms: a term (k, j) is dropped at time t
    when g_j(t) or h_kj(t) is not positive (a sign change of a coordinate, e.g. by noise: the log
    of a negative ratio is undefined) or not finite, or when its denominator is zero (|c_0j| or
    |c_kj| <= ``rel_tol`` times the largest |c|). ``n_terms_`` (R, T) counts the terms used. A
    time without any usable term raises ValueError (``on_empty="raise"``) or gives NaN
    (``on_empty="nan"``).

    Several trials (R > 1): A, B are estimated per trial (``A_trials_`` (R, T)) and averaged.

    Hyper-parameters
    ----------------
    window, order : Savitzky-Golay window (odd; default :func:`default_window`) and order for
        alpha = dA/dt, beta = dB/dt.
    n_bootstrap : bootstrap replicates (0: none).
    bootstrap : "auto" (trials when R > 1, else samples), "samples" (resample tracked samples
        within each class, in every trial), "trials" (resample whole trials), "both", "none".
    level : confidence level of the percentile bands (0.95).
    seed : seed of the bootstrap's numpy Generator.
    rel_tol, on_empty : see the rule above. On noisy logs, a term whose denominator is small
        has a large, heavy-tailed error; raising rel_tol (e.g. to 0.05) drops such terms.

    Attributes after fit
    --------------------
    ts_ (T,), A_, B_, alpha_, beta_ (T,), A_trials_, B_trials_, n_terms_ (R, T), window_,
    bands_ (dict name -> (2, T) lower/upper percentile band, names A, B, alpha, beta; empty
    without bootstrap), se_ (bootstrap standard errors), bootstrap_A_, bootstrap_B_ (n_boot, T).

    Reference: Zhang, Wang & Su, "Imitating deep learning dynamics via locally elastic
    stochastic differential equations", NeurIPS 2021 (arXiv 2110.05960).
    """

    def _core(self, means, K):
        grand = means.mean(axis=2)                                   # (S, T, p)
        c0 = grand[:, 0]                                             # (S, p)
        ck = means[:, 0] - grand[:, 0][:, None, :]                  # (S, K, p)
        scale = np.maximum(np.abs(c0).max(axis=1), np.abs(ck).max(axis=(1, 2)))[:, None]
        ok0 = np.abs(c0) > self.rel_tol * scale                      # (S, p)
        okk = np.abs(ck) > self.rel_tol * scale[:, :, None]          # (S, K, p)
        with np.errstate(divide="ignore", invalid="ignore"):
            g = grand / np.where(ok0, c0, 1.0)[:, None, :]            # (S, T, p)
            h = (means - grand[:, :, None, :]) / np.where(okk, ck, 1.0)[:, None]   # (S, T, K, p)
            valid = (ok0[:, None, None, :] & okk[:, None] & (g[:, :, None, :] > 0) & (h > 0)
                     & np.isfinite(g)[:, :, None, :] & np.isfinite(h))
            lg = np.log(np.where(g > 0, g, 1.0))[:, :, None, :]
            lh = np.log(np.where(h > 0, h, 1.0))
        n = valid.sum(axis=(2, 3))
        with np.errstate(divide="ignore", invalid="ignore"):
            B = np.where(valid, lg - lh, 0.0).sum(axis=(2, 3)) / n
            A = np.where(valid, lg + (K - 1) * lh, 0.0).sum(axis=(2, 3)) / n
        A = np.where(n > 0, A, np.nan)
        B = np.where(n > 0, B, np.nan)
        return A, B, n


class LEstimator(_ModeEstimator):
    r"""Integrated impacts A(t), B(t) for the L-model (G(x, k) = P_k x, p = K), exact for any K.

    With ``d_k = e_k - 1/K`` (``|d_k|^2 = 1 - 1/K``) the label coordinates are
    ``y_k(t) = d_k . Xbar_k(t) / |d_k|^2`` and ``ybar = (1/K) sum_k y_k``. In the noise-free
    balanced L-model ``dy_c/dt = (1/K) [alpha y_c - beta/(K-1) sum_{k != c} y_k]``, so ybar
    scales by ``exp((A - B)/K)`` and ``y_k - ybar`` by ``exp((A + B/(K-1))/K)``::

        u = K log(ybar(t) / ybar(0))                              = A - B
        v = K mean_k log|(y_k - ybar)(t) / (y_k - ybar)(0)|       = A + B/(K-1)
        B = (K-1)(v - u)/K,     A = u + B.

    This is the exact general-K inversion (the original code's K = 3 shortcut is not used).
    Rule for unusable terms: in v, a class k is dropped at time t when the ratio
    ``(y_k - ybar)(t)/(y_k - ybar)(0)`` is not positive (a sign change) or not finite, or when
    ``|(y_k - ybar)(0)|`` <= ``rel_tol`` times the largest |y(0)|; u has a single term, unusable
    when ``ybar(t)/ybar(0)`` is not positive or ``|ybar(0)|`` is that small (then A - B is not
    identifiable from the symmetric mode). ``n_terms_`` counts the usable v terms (0 when u is
    unusable). Times without usable terms: ``on_empty`` as in :class:`IEstimator`.

    Hyper-parameters and attributes as :class:`IEstimator`. Needs p = K features (logits).
    """

    def _prepare(self, traj):
        if traj.p != traj.K:
            raise ValueError(f"the L-estimator needs features of dimension p = K = {traj.K} "
                             f"(logits), got p = {traj.p}")

    def _core(self, means, K):
        S = means.shape[0]
        # y_k = d_k . Xbar_k / |d_k|^2 = (Xbar_kk - mean_j Xbar_kj) / (1 - 1/K), shape (S, T, K)
        y = (np.diagonal(means, axis1=2, axis2=3) - means.mean(axis=3)) / (1.0 - 1.0 / K)
        ybar = y.mean(axis=2)                                       # (S, T)
        dev = y - ybar[:, :, None]                                  # (S, T, K)
        scale = np.maximum(np.abs(y[:, 0]).max(axis=1), 1e-300)     # (S,)
        ok_u0 = np.abs(ybar[:, 0]) > self.rel_tol * scale           # (S,)
        ok_v0 = np.abs(dev[:, 0]) > self.rel_tol * scale[:, None]   # (S, K)
        with np.errstate(divide="ignore", invalid="ignore"):
            ru = ybar / np.where(ok_u0, ybar[:, 0], 1.0)[:, None]
            rv = dev / np.where(ok_v0, dev[:, 0], 1.0)[:, None, :]
            ok_u = ok_u0[:, None] & (ru > 0) & np.isfinite(ru)
            ok_v = ok_v0[:, None, :] & (rv > 0) & np.isfinite(rv)
            u = K * np.log(np.where(ok_u, ru, 1.0))
            nv = ok_v.sum(axis=2)
            v = K * np.where(ok_v, np.log(np.where(ok_v, rv, 1.0)), 0.0).sum(axis=2) / nv
        n = np.where(ok_u, nv, 0)
        B = (K - 1) * (v - u) / K
        A = u + B
        A = np.where(n > 0, A, np.nan)
        B = np.where(n > 0, B, np.nan)
        return A, B, n


# ============================================================================================
# Regression estimator
# ============================================================================================
def _field_values(field, traj: Trajectory) -> np.ndarray:
    """G(X_j(t), y_j; t) for every trial, time and sample: (R, T, N, p)."""
    import torch

    from .model import make_field

    from .model import Identity

    fld = make_field(field)
    fld.check(traj.p, traj.K)
    if type(fld) is Identity:
        return traj.features                                           # G(x, k) = x
    out = np.empty_like(traj.features)
    y = torch.as_tensor(traj.labels)
    with torch.no_grad():
        for i, t in enumerate(traj.ts):
            x = torch.from_numpy(traj.features[:, i])                 # (R, N, p)
            out[:, i] = fld(x, y, float(t), num_classes=traj.K).numpy()
    return out


def _window_edges(n_inc: int, window: int) -> np.ndarray:
    """Increment-index edges of consecutive windows of ``window`` increments; a remainder
    shorter than half a window joins the last window."""
    edges = list(range(0, n_inc, window)) + [n_inc]
    if len(edges) > 2 and edges[-1] - edges[-2] < window / 2:
        edges.pop(-2)
    return np.asarray(edges)


class RegressionEstimator(_Estimator):
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
    ``int E(s) w Gbar(s) ds``. The left-point rule ``"left"`` (default) uses
    ``drift(t_i) dt_i``: exact for an Euler step of size dt_i (the simulator with step = save
    interval, or one SGD step per log entry), unbiased under additive noise (Ito), and O(dt_i)
    relative on a continuous-time path. The trapezoid rule ``"trapezoid"`` averages the two
    endpoints: O(dt_i^2) on smooth paths (coarsely logged, little noise), but its right endpoint
    shares the noise of the increment, a bias of order sigma^2 / (n |Xbar|^2) in noisy data.

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
    quadrature : "left" (default) or "trapezoid", see "Discretisation".
    n_bootstrap, bootstrap, level, seed : bootstrap as in :class:`IEstimator`; bands for E,
        alpha and beta.

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

    def __init__(self, field="identity", window: Optional[int] = None, degree: int = 0,
                 quadrature: str = "left", n_bootstrap: int = 0, bootstrap: str = "auto",
                 level: float = 0.95, seed: int = 0):
        self.field = field
        self.window = window
        self.degree = degree
        self.quadrature = quadrature
        self.n_bootstrap = n_bootstrap
        self.bootstrap = bootstrap
        self.level = level
        self.seed = seed
        self.on_empty = "raise"

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

        self._check_common()
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
        G = _field_values(self.field, traj)                           # (R, T, N, p)
        xbar = traj.class_means()
        gbar = _class_means(G, traj.labels, K)
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
            mode = _resolve_mode(self.bootstrap, traj.R)
            self.bootstrap_mode_ = mode
            if mode != "none":
                self._bootstrap(traj, G, mode, edges)
        return self

    def _bootstrap(self, traj, G, mode, edges):
        rng = np.random.default_rng(self.seed)
        n = int(self.n_bootstrap)
        trials, weights = _bootstrap_draws(traj, mode, n, rng)
        both = np.concatenate([traj.features, G], axis=3)             # (R, T, N, 2p)
        p = traj.p
        E_b = np.empty((n, len(edges) - 1, traj.K, traj.K))
        ab_b = np.empty((n, len(edges) - 1, 2))
        chunk = max(1, int(2e7 // max(1, traj.R * traj.T * traj.K * 2 * p)))
        for s in range(0, n, chunk):
            sl = slice(s, min(n, s + chunk))
            wts = None if weights is None else [wk[sl] for wk in weights]
            m = _resampled_means(both, traj.labels, traj.K, trials[sl], wts)
            for j in range(m.shape[0]):
                E, _, ab, _, _, _ = self._solve(m[j, ..., :p], m[j, ..., p:], traj.class_weights,
                                             traj.ts, edges, False)
                E_b[s + j], ab_b[s + j] = E, ab
        self.bootstrap_E_ = E_b
        self.bands_ = {"E": _percentile_band(E_b, self.level),
                       "alpha": _percentile_band(ab_b[..., 0], self.level),
                       "beta": _percentile_band(ab_b[..., 1], self.level)}
        self.se_ = {"E": E_b.std(axis=0, ddof=1), "alpha": ab_b[..., 0].std(axis=0, ddof=1),
                    "beta": ab_b[..., 1].std(axis=0, ddof=1)}

    def impacts(self):
        """The fitted E(t) as a piecewise-constant :class:`~lesde.model.Impacts` (window w
        applies on ``[window_bounds_[w, 0], window_bounds_[w, 1])``; constant beyond the ends)."""
        from .model import Impacts

        self._check_fitted()
        starts = self.window_bounds_[:, 0].copy()
        E = self.E_.copy()

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


# ============================================================================================
# Goodness of fit
# ============================================================================================
@dataclass(eq=False)
class GoodnessOfFit:
    """How well a fitted SDE imitates a logged trajectory (arrays a figure needs included).

    Attributes
    ----------
    ts : (T,) times.
    logged_means : (T, K, p) logged class means (trial 0).
    sim_means : (T, K, p) mean over simulated paths; sim_lo, sim_hi : (T, K, p) the pointwise
        ``level`` band of the simulated class means (percentiles over paths).
    r2 : 1 - sum (logged - sim mean)^2 / sum (logged - its time average)^2 over t, k, coordinates.
    r2_per_class : (K,).
    coverage : fraction of (t > ts[0], k, coordinate) with the logged mean inside the band.
    logged_spread, sim_spread : (T, K) within-class spread, the mean over coordinates of the
        within-class variance (sim: mean over paths).
    spread_rel_error : mean over t > ts[0] and k of |sim - logged| / logged spread.
    logged_accuracy, sim_accuracy : (T,) argmax accuracy (features read as logits; NaN arrays
        when p != K); sim_accuracy_lo/hi : (T,) its band over paths; accuracy_mae : mean |sim -
        logged| over time (NaN when p != K).
    n_paths, level, sigma : the simulation's settings (sigma (T,) as used).
    """

    ts: np.ndarray
    logged_means: np.ndarray
    sim_means: np.ndarray
    sim_lo: np.ndarray
    sim_hi: np.ndarray
    r2: float
    r2_per_class: np.ndarray
    coverage: float
    logged_spread: np.ndarray
    sim_spread: np.ndarray
    spread_rel_error: float
    logged_accuracy: np.ndarray
    sim_accuracy: np.ndarray
    sim_accuracy_lo: np.ndarray
    sim_accuracy_hi: np.ndarray
    accuracy_mae: float
    n_paths: int
    level: float
    sigma: np.ndarray = dc_field(default_factory=lambda: np.zeros(0))

    def summary(self) -> dict:
        """The scalar numbers as a JSON-able dict."""
        return {"r2": float(self.r2), "r2_per_class": [float(v) for v in self.r2_per_class],
                "coverage": float(self.coverage), "spread_rel_error": float(self.spread_rel_error),
                "accuracy_mae": float(self.accuracy_mae), "n_paths": int(self.n_paths),
                "level": float(self.level)}


def _impacts_from_fitted(fitted, K: int):
    from .model import FunctionSchedule, Impacts

    if isinstance(fitted, Impacts):
        return fitted
    if isinstance(fitted, RegressionEstimator):
        return fitted.impacts()
    if isinstance(fitted, _ModeEstimator):
        fitted._check_fitted()
        ts, a, b = fitted.ts_, np.nan_to_num(fitted.alpha_), np.nan_to_num(fitted.beta_)
        return Impacts.intra_inter(FunctionSchedule(lambda t: np.interp(t, ts, a), "alpha"),
                                   FunctionSchedule(lambda t: np.interp(t, ts, b), "beta"), K)
    raise ValueError("fitted must be a fitted IEstimator, LEstimator, RegressionEstimator or an "
                     "Impacts object")


def _sigma_for(fitted, traj: Trajectory, sigma):
    """sigma as a callable of t: given, from the regression fit, or from within-class spread."""
    if sigma is not None:
        if callable(sigma):
            return sigma
        return float(sigma)
    if isinstance(fitted, RegressionEstimator):
        starts, s = fitted.window_bounds_[:, 0], fitted.sigma_.copy()
        return lambda t: float(s[int(np.clip(np.searchsorted(starts, t, side="right") - 1, 0,
                                                len(s) - 1))])
    # linear models: the within-class variance per coordinate grows like sigma^2 (1 - 1/n) t
    spread = _spread(traj.features[0], traj.labels, traj.K)           # (T, K)
    n = traj.counts
    slope = np.polyfit(traj.ts - traj.ts[0], (spread / (1 - 1 / n)).mean(axis=1), 1)[0]
    return float(math.sqrt(max(slope, 0.0)))


def _spread(x: np.ndarray, labels: np.ndarray, K: int) -> np.ndarray:
    """Within-class variance averaged over coordinates: x (..., T, N, p) -> (..., T, K)."""
    out = []
    for k in range(K):
        xk = x[..., labels == k, :]
        out.append(xk.var(axis=-2).mean(axis=-1))
    return np.stack(out, -1)


def goodness_of_fit(trajectory, fitted, field="identity", *, n_paths: int = 200,
                    seed: int = 0, sigma=None, noise: str = "additive", lr: Optional[float] = None,
                    dt: Optional[float] = None, level: float = 0.95, **kwargs) -> GoodnessOfFit:
    r"""Simulate the fitted SDE from the logged X(0) and compare it with the log.

    The fitted impacts (alpha(t), beta(t) of an :class:`IEstimator` / :class:`LEstimator`
    interpolated linearly as :class:`~lesde.model.FunctionSchedule`; the piecewise-constant
    E(t) of a :class:`RegressionEstimator`; or an :class:`~lesde.model.Impacts` given directly)
    drive ``n_paths`` Euler-Maruyama paths of the tracked samples with drift field ``field``
    from the logged features at ``ts[0]`` (trial 0), recorded at the logged times.

    Parameters
    ----------
    trajectory : anything :func:`as_trajectory` accepts (keyword arguments go to it).
    fitted : a fitted estimator or an Impacts.
    field : the drift field of the simulated SDE.
    n_paths, seed : number of simulated paths and the simulator's seed.
    sigma : additive noise level (float or callable of t). Default: the regression fit's
        ``sigma_`` (piecewise constant); for the I/L estimators, the growth rate of the
        logged within-class variance, ``d/dt [spread / (1 - 1/n_k)]`` by a straight-line fit
        (exact for the linear models with constant sigma).
    noise, lr : the simulator's noise model ("additive", "sgd", "both", "none") and the SGD
        noise's learning rate.
    dt : the Euler step (default: the smallest logged interval / 4).
    level : level of the simulated bands.

    Returns a :class:`GoodnessOfFit`.
    """
    import torch

    from .model import LESDE
    from .solvers import simulate

    traj = as_trajectory(trajectory, **kwargs)
    if int(n_paths) != n_paths or n_paths < 2:
        raise ValueError(f"n_paths must be an integer >= 2, got {n_paths}")
    K, p, T = traj.K, traj.p, traj.T
    impacts = _impacts_from_fitted(fitted, K)
    if impacts.K != K:
        raise ValueError(f"the fitted impacts have K = {impacts.K}, the trajectory K = {K}")
    sig = _sigma_for(fitted, traj, sigma)
    if noise in ("sgd", "none"):
        sig_used = 0.0
    else:
        sig_used = sig
    sde = LESDE(traj.labels, impacts, field, sigma=sig_used, noise=noise, lr=lr, dim=p)
    dt = float(dt) if dt is not None else float(np.diff(traj.ts).min()) / 4.0
    x0 = torch.as_tensor(traj.features[0, 0])
    logged = traj.class_means()[0]                                     # (T, K, p)
    logits = p == K
    # chunks of paths so that recorded states stay within ~2e7 numbers
    chunk = max(1, int(2e7 // max(1, T * traj.N * p))) if logits else n_paths
    means, spreads, accs = [], [], []
    done = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        while done < n_paths:
            b = min(chunk, n_paths - done)
            sol = simulate(sde, x0, traj.ts, dt, seed=int(seed) + done, num_runs=b,
                           record="full" if logits else "summary")
            means.append(np.transpose(sol.class_means, (1, 0, 2, 3)))    # (b, T, K, p)
            spreads.append(np.transpose(np.trace(sol.within_cov, axis1=3, axis2=4) / p, (1, 0, 2)))
            if logits:
                st = np.transpose(sol.states, (1, 0, 2, 3))                # (b, T, N, p)
                accs.append((st.argmax(-1) == traj.labels).mean(-1))       # (b, T)
            done += b
    sims = np.concatenate(means)                                        # (P, T, K, p)
    band = _percentile_band(sims, level)
    sim_mean = np.nanmean(sims, axis=0)
    resid = ((logged - sim_mean) ** 2)
    cent = (logged - logged.mean(axis=0, keepdims=True)) ** 2
    r2 = 1.0 - resid.sum() / cent.sum()
    r2k = 1.0 - resid.sum(axis=(0, 2)) / cent.sum(axis=(0, 2))
    inside = (logged >= band[0]) & (logged <= band[1])
    coverage = float(inside[1:].mean())
    logged_spread = _spread(traj.features[0], traj.labels, K)
    sim_spread = np.nanmean(np.concatenate(spreads), axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(sim_spread[1:] - logged_spread[1:]) / logged_spread[1:]
    spread_err = float(np.nanmean(rel)) if np.any(np.isfinite(rel)) else float("nan")
    if logits:
        acc_sims = np.concatenate(accs)
        logged_acc = (traj.features[0].argmax(-1) == traj.labels).mean(-1)
        sim_acc = acc_sims.mean(0)
        acc_band = _percentile_band(acc_sims, level)
        acc_mae = float(np.abs(sim_acc - logged_acc).mean())
    else:
        logged_acc = sim_acc = np.full(T, np.nan)
        acc_band = np.full((2, T), np.nan)
        acc_mae = float("nan")
    sig_arr = np.array([float(sig_used(t)) if callable(sig_used) else float(sig_used)
                        for t in traj.ts])
    return GoodnessOfFit(ts=traj.ts, logged_means=logged, sim_means=sim_mean, sim_lo=band[0],
                         sim_hi=band[1], r2=float(r2), r2_per_class=r2k, coverage=coverage,
                         logged_spread=logged_spread, sim_spread=sim_spread,
                         spread_rel_error=spread_err, logged_accuracy=logged_acc,
                         sim_accuracy=sim_acc, sim_accuracy_lo=acc_band[0],
                         sim_accuracy_hi=acc_band[1], accuracy_mae=acc_mae, n_paths=int(n_paths),
                         level=float(level), sigma=sig_arr)
