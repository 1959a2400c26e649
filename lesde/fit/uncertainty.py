r"""Uncertainty of the fits: bootstrap resampling, the parametric bootstrap, bands, parallel refits.

Three kinds of resampling, each answering a different question:

* ``"samples"``: resample the tracked samples within each class (and trial). Carries the error
  of using the tracked samples' class means (of X and of G) for the whole class, and nothing
  else: it keeps each sample's whole path, so it misses the noise of the class means that the
  drift feeds back into the class means themselves, and it cannot see a bias.
* ``"trials"``: resample whole trials (independent runs). Valid with many trials.
* ``"parametric"``: simulate the fitted SDE with its fitted noise from the logged X(t_0) of every
  trial, at the logged times, and refit each simulated log. It carries the class-mean noise and
  the estimator's bias (smoothing, discretisation, finite-sample), so that the "basic" interval
  ``[2 theta_hat - q_hi, 2 theta_hat - q_lo]`` moves against the bias. The simulator's own Euler
  discretisation bias is removed by refitting one noise-free simulated log with the same step
  and subtracting its offset from every replicate.

Bands (``interval``): "basic" (default), "percentile" ``[q_lo, q_hi]``, or "normal" (theta_hat
minus the bootstrap bias, +- z_{1-(1-level)/2} times the bootstrap standard deviation).

Refits run in chunks, in this process, over ``n_jobs`` processes (joblib), or on a Dask client.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Callable, Optional, Sequence

import numpy as np

__all__ = ["percentile_band", "band_from_replicates", "parallel_map"]

MODES = ("auto", "samples", "trials", "both", "parametric", "none")


# ============================================================================================
# resampling of tracked samples and trials
# ============================================================================================
def resolve_mode(mode: str, R: int, allowed: Sequence[str] = MODES, auto: str = None) -> str:
    if mode not in allowed:
        raise ValueError(f"bootstrap must be one of {', '.join(allowed)}, got {mode!r}")
    if mode == "auto":
        return auto if auto is not None else ("trials" if R > 1 else "samples")
    if mode in ("trials", "both") and R < 2:
        raise ValueError(f"bootstrap={mode!r} needs several independent trials, got R = {R}")
    return mode


def bootstrap_draws(traj, mode: str, n_boot: int, rng) -> tuple:
    """(trial index (n_boot, R), per-class weights list of (n_boot, R, n_k) or None)."""
    R = traj.R
    if mode in ("samples", "both"):
        traj.require_per_class(2, "the sample bootstrap (resampling one sample gives a band of "
                               "width zero, whatever the error)")
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


def resampled_means(x: np.ndarray, labels: np.ndarray, K: int, trials, weights) -> np.ndarray:
    """Class means (n_boot, R, T, K, q) of x (R, T, N, q) under the bootstrap draws."""
    n_boot, R = trials.shape
    T, q = x.shape[1], x.shape[3]
    out = np.empty((n_boot, R, T, K, q))
    for k in range(K):
        idx = np.flatnonzero(labels == k)
        xk = x[:, :, idx, :]                                       # (R, T, nk, q)
        if weights is None:
            out[:, :, :, k, :] = xk.mean(2)[trials]
            continue
        wk = weights[k]                                            # (n_boot, R, nk)
        for r in range(x.shape[0]):
            b_idx, s_idx = np.nonzero(trials == r)
            if b_idx.size == 0:
                continue
            flat = xk[r].transpose(1, 0, 2).reshape(idx.size, T * q)   # (nk, T q)
            out[b_idx, s_idx, :, k, :] = (wk[b_idx, s_idx] @ flat).reshape(-1, T, q)
    return out


def resample_indices(labels: np.ndarray, R: int, mode: str, n: int, rng) -> tuple:
    """Index draws for resampling whole logs: trials (n, R) and samples (n, R, N) (class sizes
    and the order of labels kept)."""
    N = labels.size
    trials = (rng.integers(0, R, size=(n, R)) if mode in ("trials", "both")
              else np.broadcast_to(np.arange(R), (n, R)).copy())
    samples = np.broadcast_to(np.arange(N), (n, R, N)).copy()
    if mode in ("samples", "both"):
        for k in np.unique(labels):
            pos = np.flatnonzero(labels == k)
            samples[:, :, pos] = pos[rng.integers(0, pos.size, size=(n, R, pos.size))]
    return trials, samples


# ============================================================================================
# bands
# ============================================================================================
#: the sample-quantile rule of every band from replicates: Hyndman & Fan's type 6 ("weibull",
#: the order statistic X_(k) at probability k / (B + 1)). For B replicates of a continuous
#: quantity E[F(X_(k))] = k / (B + 1) exactly, so a band between the type-6 quantiles at
#: (1 - level) / 2 and (1 + level) / 2 holds the next draw with probability ``level`` at every
#: B. NumPy's default (type 7, X_(k) at (k - 1) / (B - 1)) pulls both ends inwards: at B = 40
#: and level 0.95 such a band holds 0.904 of the mass in expectation, at B = 200 0.940
#: (Hyndman & Fan 1996, "Sample quantiles in statistical packages", Am. Stat. 50(4)).
QUANTILE_METHOD = "weibull"


def percentile_band(samples: np.ndarray, level: float) -> np.ndarray:
    """(2, ...) lower and upper percentile band over axis 0, ignoring NaN replicates, by the
    type-6 sample quantiles (:data:`QUANTILE_METHOD`): the band from B replicates holds a new
    draw of the same distribution with probability ``level`` whatever B is."""
    lo = 100 * (1 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.stack([np.nanpercentile(samples, lo, axis=0, method=QUANTILE_METHOD),
                         np.nanpercentile(samples, 100 - lo, axis=0, method=QUANTILE_METHOD)])


def band_from_replicates(estimate, replicates: np.ndarray, level: float,
                         interval: str = "basic") -> np.ndarray:
    """(2, ...) band from bootstrap replicates (n, ...) around ``estimate`` (...)."""
    from scipy.stats import norm

    est = np.asarray(estimate, dtype=float)
    reps = np.asarray(replicates, dtype=float)
    if interval == "percentile":
        return percentile_band(reps, level)
    if interval == "basic":
        q = percentile_band(reps, level)
        return np.stack([2 * est - q[1], 2 * est - q[0]])
    if interval == "normal":
        z = float(norm.ppf(0.5 + level / 2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            bias = np.nanmean(reps, axis=0) - est
            sd = np.nanstd(reps, axis=0, ddof=1)
        return np.stack([est - bias - z * sd, est - bias + z * sd])
    raise ValueError(f"interval must be 'basic', 'percentile' or 'normal', got {interval!r}")


# ============================================================================================
# parallel map
# ============================================================================================
def parallel_map(fn: Callable, items: list, n_jobs: int = 1, client=None) -> list:
    """[fn(item) for item in items], in this process (n_jobs = 1), over n_jobs processes
    (joblib, one torch thread each), or on a Dask ``distributed.Client``."""
    if client is not None:
        futures = client.map(fn, items, pure=False)
        return client.gather(futures)
    if n_jobs == 1 or len(items) <= 1:
        return [fn(it) for it in items]
    from joblib import Parallel, delayed

    return Parallel(n_jobs=int(n_jobs), backend="loky")(delayed(_one_thread(fn))(it)
                                                        for it in items)


class _one_thread:
    """A picklable wrapper that runs fn with one torch thread (workers share the cores)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, item):
        import torch

        torch.set_num_threads(1)
        return self.fn(item)


# ============================================================================================
# bands of the shooting estimator
# ============================================================================================
def _sim_step(spec: dict) -> float:
    """Euler step of the parametric simulation: small against the fastest drift rate
    (``rate * dt <= 0.05``) and at most a quarter of the shortest logged interval."""
    dts = np.diff(spec["ts"])
    return float(min(dts.min() / 4.0, 0.05 / max(spec["rate"], 1e-300)))


def _simulate_logs(spec: dict, n: int, seed: int, noise: Optional[str] = None) -> np.ndarray:
    """n simulated logs (n, R, T, N, p) of the fitted SDE from the logged X(t_0) of each trial."""
    import torch

    from ..model import LESDE, FunctionSchedule
    from ..solvers import simulate
    from .forms import ImpactForm

    form = ImpactForm(**spec["form"])
    impacts = form.impacts(spec["theta"])
    ts, sig = spec["ts"], spec["sigma"]
    kind = spec["noise"] if noise is None else noise

    def sigma_of_t(t):
        i = int(np.clip(np.searchsorted(ts, t, side="right") - 1, 0, len(sig) - 1))
        return float(sig[i])

    sigma = FunctionSchedule(sigma_of_t, "sigma", nonneg=True) if kind in (
        "additive", "both") else 0.0
    sde = LESDE(spec["labels"], impacts, spec["field"], sigma=sigma, noise=kind,
                lr=spec["lr"] if kind in ("sgd", "both") else None, dim=spec["x0"].shape[-1])
    x0 = spec["x0"]                                                   # (R, N, p)
    R = x0.shape[0]
    x0b = np.broadcast_to(x0[None], (n,) + x0.shape).reshape(n * R, *x0.shape[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = simulate(sde, torch.as_tensor(np.ascontiguousarray(x0b)), ts, _sim_step(spec),
                       seed=int(seed), record="full")
    if np.any(sol.overflowed):
        raise ValueError("a parametric-bootstrap simulation of the fitted SDE overflowed; the "
                         "fitted impacts make the features explode: use bootstrap='samples' or "
                         "'sandwich'")
    st = np.transpose(sol.states, (1, 0, 2, 3))                        # (n R, T, N, p)
    return st.reshape(n, R, *st.shape[1:])


def _boot_chunk(job: dict) -> np.ndarray:
    """Refit one chunk of bootstrap replicates; returns their parameters (n, P)."""
    from .forms import ImpactForm
    from .shooting import refit_batch

    spec = job["spec"]
    rng = np.random.default_rng(job["seed"])
    n = job["n"]
    if job["mode"] == "parametric":
        xb = _simulate_logs(spec, n, int(rng.integers(0, 2 ** 62)))
    elif job["mode"] == "control":
        xb = _simulate_logs(spec, 1, 0, noise="none")
    else:
        x = spec["features"]
        trials, samples = resample_indices(spec["labels"], x.shape[0], job["mode"], n, rng)
        xb = np.stack([np.stack([x[trials[b, r]][:, samples[b, r]] for r in range(x.shape[0])])
                       for b in range(n)])
    form = ImpactForm(**spec["form"])
    return refit_batch(xb, spec["ts"], spec["labels"], spec["weights"], spec["field"], form,
                       spec["whitening"], spec["substeps"], spec["theta"], spec["max_iter"],
                       spec["hessian"], spec.get("gain"), spec.get("max_stiffness"))


def _chunks(n: int, size: int) -> list:
    return [min(size, n - s) for s in range(0, n, size)]


def shooting_bands(est, traj, band: str) -> None:
    """Fill ``est.bands_`` / ``est.se_`` (and ``est.bootstrap_theta_``) of a fitted
    :class:`~lesde.fit.ShootingEstimator`."""
    theta = est.theta_
    q_hat = est.quantities(theta)
    _bands(est, traj, band, theta, q_hat)
    if not est.row_shift_identified_:
        _widen_row_shifts(est, theta, q_hat)


def _widen_row_shifts(est, theta, q_hat) -> None:
    """A row shift of E that the log does not identify: every band is widened by +- 10 times
    the largest |E| along the shift directions (differences within a row, ``gap``, stay)."""
    from scipy.stats import norm

    from .shooting import quantities_jacobian, row_shift_directions

    V = row_shift_directions(est.form_)                               # (n, P)
    big = 10.0 * float(np.abs(q_hat["E"]).max() + 1e-12)
    z = float(norm.ppf(0.5 + est.level / 2))
    jac = quantities_jacobian(est.form_, theta, est.ts_)
    for name, J in jac.items():
        if name not in est.bands_:
            continue
        extra = z * big * np.sqrt(np.sum(np.einsum("...p,np->...n", J, V) ** 2, axis=-1))
        est.bands_[name] = np.stack([est.bands_[name][0] - extra, est.bands_[name][1] + extra])
        est.se_[name] = np.sqrt(est.se_[name] ** 2 + (extra / z) ** 2)
    extra = z * big * np.sqrt(np.sum(V ** 2, axis=0))
    est.bands_["theta"] = np.stack([est.bands_["theta"][0] - extra,
                                    est.bands_["theta"][1] + extra])
    est.theta_se_ = np.sqrt(est.theta_se_ ** 2 + (extra / z) ** 2)


def _bands(est, traj, band, theta, q_hat) -> None:
    from scipy.stats import norm

    from .shooting import quantities_jacobian

    if band == "sandwich":
        z = float(norm.ppf(0.5 + est.level / 2))
        jac = quantities_jacobian(est.form_, theta, est.ts_)
        cov = est.theta_cov_
        for name, J in jac.items():
            var = np.einsum("...p,pq,...q->...", J, cov, J)
            se = np.sqrt(np.maximum(var, 0.0))
            est.se_[name] = se
            est.bands_[name] = np.stack([q_hat[name] - z * se, q_hat[name] + z * se])
        se = est.theta_se_
        est.se_["theta"] = se
        est.bands_["theta"] = np.stack([theta - z * se, theta + z * se])
        return
    n = int(est.n_bootstrap)
    if n < 2:
        raise ValueError(f"bootstrap={band!r} needs n_bootstrap >= 2, got {n}")
    spec = {"form": est.form_.describe_init(), "theta": theta, "ts": traj.ts,
            "labels": traj.labels, "weights": traj.class_weights, "field": est.field,
            "whitening": est.whitening_, "substeps": est.steps_,
            "max_iter": int(est.max_iter), "x0": traj.features[:, 0], "sigma": est.sigma_,
            "lr": est.lr_, "noise": est.noise_kind_, "rate": est.drift_rate_,
            "hessian": est.hessian_, "gain": est.gain_,
            "max_stiffness": est.max_stiffness}
    if band in ("samples", "trials", "both"):
        spec["features"] = traj.features
    per = traj.R * (traj.T - 1) * traj.N * traj.p
    size = int(max(1, min(64, 2e6 // max(per, 1))))
    seeds = np.random.SeedSequence(int(est.seed)).spawn(len(_chunks(n, size)))
    jobs = [{"spec": spec, "mode": band, "n": c, "seed": s}
            for c, s in zip(_chunks(n, size), seeds)]
    if band == "parametric":
        jobs.append({"spec": spec, "mode": "control", "n": 1, "seed": 0})
    out = parallel_map(_boot_chunk, jobs, n_jobs=int(est.n_jobs), client=est.client)
    if band == "parametric":
        control = out.pop()[0]
        est.simulation_offset_ = control - theta
        thetas = np.concatenate(out) - est.simulation_offset_
    else:
        thetas = np.concatenate(out)
    est.bootstrap_theta_ = thetas
    est.theta_cov_ = np.atleast_2d(np.cov(thetas, rowvar=False))
    est.theta_se_ = np.sqrt(np.maximum(np.diag(est.theta_cov_), 0.0))
    reps = est.quantities(thetas)
    for name, v in reps.items():
        est.bands_[name] = band_from_replicates(q_hat[name], v, est.level, est.interval)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            est.se_[name] = np.nanstd(v, axis=0, ddof=1)
    est.bands_["theta"] = band_from_replicates(theta, thetas, est.level, est.interval)
    est.se_["theta"] = np.std(thetas, axis=0, ddof=1)
