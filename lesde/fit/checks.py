r"""Model checks: simulate a fitted SDE against its log, held-out prediction, model comparison.

* :func:`goodness_of_fit`: simulate the fitted SDE (its field, impacts and fitted noise, all
  taken from the fitted estimator) from the logged state at one time and compare the simulated
  paths with the log from there on: R^2 of the class means, coverage by the simulated band,
  within-class spread, argmax accuracy and NC1 over time.
* :func:`compare_models`: fit each candidate model (I, L, cross-entropy with SGD noise,
  cross-entropy with SGD and additive noise) on the early part of a log with the
  trajectory-matching estimator, simulate forward from the end of that part, and score the rest;
  with the in-sample information criteria of the Gaussian quasi-likelihood. One table.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field as dc_field
from typing import Optional, Sequence

import numpy as np

from .trajectory import Trajectory, as_trajectory, class_means

__all__ = ["GoodnessOfFit", "goodness_of_fit", "ModelComparison", "compare_models", "MODELS"]

#: candidate models of :func:`compare_models`: name -> (drift field, noise model)
MODELS = {"I": ("identity", "additive"), "L": ("label_projection", "additive"),
          "CE": ("cross_entropy", "sgd"), "CE+additive": ("cross_entropy", "both")}


@dataclass(eq=False)
class GoodnessOfFit:
    """How well a fitted SDE imitates a logged trajectory (arrays a figure needs included).

    Attributes
    ----------
    ts : (T',) the compared times (from the start time on).
    logged_means : (T', K, p) logged class means (trial 0).
    sim_means : (T', K, p) mean over simulated paths; sim_lo, sim_hi : (T', K, p) the pointwise
        ``level`` band of the simulated class means (percentiles over paths).
    r2 : 1 - sum (logged - sim mean)^2 / sum (logged - its time average)^2 over t > ts[0], k and
        coordinates.
    r2_per_class : (K,).
    coverage : fraction of (t > ts[0], k, coordinate) with the logged mean inside the band.
    logged_spread, sim_spread : (T', K) within-class spread (mean over coordinates of the
        within-class variance; sim: mean over paths).
    spread_rel_error : mean over t > ts[0] and k of |sim - logged| / logged spread.
    logged_accuracy, sim_accuracy : (T',) argmax accuracy (features read as logits; NaN arrays
        when p != K); sim_accuracy_lo/hi : (T',) its band; accuracy_mae : mean |sim - logged|
        over t > ts[0] (NaN when p != K).
    logged_nc1, sim_nc1 : (T',) NC1 (sim: median over paths); nc1_rel_error : mean over
        t > ts[0] of |log(sim / logged)|, a symmetric relative error (NaN where undefined).
    model : field and noise of the simulated SDE; n_paths, level; sigma (T',) as used.
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
    logged_nc1: np.ndarray
    sim_nc1: np.ndarray
    nc1_rel_error: float
    n_paths: int
    level: float
    model: dict = dc_field(default_factory=dict)
    sigma: np.ndarray = dc_field(default_factory=lambda: np.zeros(0))

    def summary(self) -> dict:
        """The scalar numbers as a JSON-able dict."""
        return {"r2": float(self.r2), "r2_per_class": [float(v) for v in self.r2_per_class],
                "coverage": float(self.coverage), "spread_rel_error": float(self.spread_rel_error),
                "accuracy_mae": float(self.accuracy_mae),
                "nc1_rel_error": float(self.nc1_rel_error), "n_paths": int(self.n_paths),
                "level": float(self.level), "t_start": float(self.ts[0]), "model": self.model}

    def __repr__(self) -> str:
        return (f"GoodnessOfFit(R2={self.r2:.3f}, coverage={self.coverage:.2f}, "
                f"spread_rel_error={self.spread_rel_error:.2f}, "
                f"accuracy_mae={self.accuracy_mae:.3f}, n_paths={self.n_paths})")


def spread(x: np.ndarray, labels: np.ndarray, K: int) -> np.ndarray:
    """Within-class variance averaged over coordinates: x (..., T, N, p) -> (..., T, K)."""
    out = []
    for k in range(K):
        xk = x[..., labels == k, :]
        out.append(xk.var(axis=-2).mean(axis=-1))
    return np.stack(out, -1)


def _is_fitted_estimator(obj) -> bool:
    return hasattr(obj, "fit") and hasattr(obj, "ts_")


def _model_of(fitted, K: int, field, noise):
    """(impacts, field, noise kind, sigma per logged interval or None, sigma times, lr)."""
    from ..model import Impacts, make_field
    from .modes import IEstimator, LEstimator
    from .regression import RegressionEstimator
    from .shooting import ShootingEstimator

    def same(a, b):
        return make_field(a).describe() == make_field(b).describe()

    if isinstance(fitted, Impacts):
        if field is None:
            raise ValueError("goodness_of_fit with an Impacts object needs field=... (with a "
                             "fitted estimator the field is the estimator's)")
        return fitted, field, noise or "none", None, None, None
    if not _is_fitted_estimator(fitted):
        raise ValueError("fitted must be a fitted ShootingEstimator, RegressionEstimator, "
                         "IEstimator or LEstimator (call fit first), or an Impacts object")
    if isinstance(fitted, ShootingEstimator):
        own, kind, sig, st, lr = (fitted.field, fitted.noise_kind_, fitted.sigma_, fitted.ts_,
                                  fitted.lr_)
    elif isinstance(fitted, RegressionEstimator):
        own, kind, sig, st, lr = (fitted.field, "additive", fitted.sigma_,
                                  fitted.window_bounds_[:, 0], None)
    elif isinstance(fitted, (IEstimator, LEstimator)):
        own = "identity" if isinstance(fitted, IEstimator) else "label_projection"
        kind, sig, st, lr = "additive", fitted.sigma_, fitted.ts_, None
    else:
        raise ValueError(f"cannot take a model from a {type(fitted).__name__}")
    if field is not None and not same(field, own):
        raise ValueError(f"field={getattr(field, 'name', field)!r} does not match the field the "
                         f"estimator was fitted with ({getattr(own, 'name', own)!r}); the "
                         "simulated model is the fitted one: leave field out")
    return fitted.impacts(), own, noise or kind, sig, st, lr


def _step(impacts, field, ts, w_max: float) -> float:
    """Euler step: a quarter of the shortest logged interval and at most 0.05 / drift rate."""
    from ..model import CrossEntropy, CrossEntropyReadout, make_field

    f = make_field(field)
    lip = 0.5 if isinstance(f, CrossEntropy) else (
        0.5 * float(np.linalg.norm(f.W.numpy(), 2)) ** 2 if isinstance(f, CrossEntropyReadout)
        else 1.0)
    E = np.stack([np.atleast_3d(impacts.matrix(t)).reshape(-1, impacts.K, impacts.K)[0]
                  for t in np.linspace(ts[0], ts[-1], 21)])
    rate = float(np.max(np.linalg.norm(E, 2, axis=(1, 2)))) * w_max * lip
    return float(min(np.diff(ts).min() / 4.0, 0.05 / max(rate, 1e-300)))


def goodness_of_fit(trajectory, fitted, *, field=None, noise: Optional[str] = None,
                    sigma=None, lr: Optional[float] = None, start: int = 0,
                    n_paths: int = 200, seed: int = 0, dt: Optional[float] = None,
                    level: float = 0.95, **kwargs) -> GoodnessOfFit:
    r"""Simulate the fitted SDE from the logged state at ``ts[start]`` and compare with the log.

    The model is the fitted estimator's: its drift field, its E(t), and its fitted noise
    (:class:`~lesde.fit.ShootingEstimator`: additive sigma(t) and/or SGD noise at the fitted
    learning rate; :class:`~lesde.fit.RegressionEstimator`: additive at its fitted sigma per
    window; :class:`~lesde.fit.IEstimator` / :class:`~lesde.fit.LEstimator`: the identity /
    label-projection field with the additive sigma of the within-class spread). ``n_paths``
    Euler-Maruyama paths (step: a quarter of the shortest logged interval, at most 0.05 over the
    drift's rate) of the tracked samples start from the logged features of trial 0 at
    ``ts[start]`` and are recorded at the logged times from there on.

    Parameters (all keyword-only after the two inputs)
    ----------
    trajectory : anything :func:`~lesde.fit.as_trajectory` accepts (keyword arguments go to it).
    fitted : a fitted estimator, or an :class:`~lesde.model.Impacts` (then ``field`` is needed).
    field : only to check: a field other than the estimator's is an error.
    noise : override the noise model ("additive", "sgd", "both", "none").
    sigma, lr : override the additive noise level (float or callable of t) / the SGD noise's
        learning rate.
    start : index of the logged time to start from (held-out prediction: the end of the fitted
        part).
    n_paths, seed, dt, level : number of paths, seed, Euler step, level of the bands.
    """
    import torch

    from .. import metrics
    from ..model import LESDE, FunctionSchedule
    from ..solvers import simulate

    if _is_fitted_estimator(trajectory) and not _is_fitted_estimator(fitted):
        raise ValueError("goodness_of_fit(trajectory, fitted): the arguments are swapped (the "
                         "first is a fitted estimator)")
    traj = as_trajectory(trajectory, **kwargs)
    if isinstance(n_paths, bool) or int(n_paths) != n_paths or n_paths < 2:
        raise ValueError(f"n_paths must be an integer >= 2, got {n_paths}")
    if int(start) != start or not 0 <= start < traj.T - 1:
        raise ValueError(f"start must be a time index in 0..{traj.T - 2}, got {start}")
    K, p = traj.K, traj.p
    impacts, fld, kind, sig, sig_t, lr_fit = _model_of(fitted, K, field, noise)
    if impacts.K != K:
        raise ValueError(f"the fitted impacts have K = {impacts.K}, the trajectory K = {K}")
    if kind not in ("additive", "sgd", "both", "none"):
        raise ValueError(f"noise must be additive, sgd, both or none, got {kind!r}")
    if sigma is None and sig is not None and kind in ("additive", "both"):
        s_arr, s_t = np.asarray(sig, dtype=float).copy(), np.asarray(sig_t, dtype=float)

        def sigma(t):
            return float(s_arr[int(np.clip(np.searchsorted(s_t, t, side="right") - 1, 0,
                                           len(s_arr) - 1))])
    if kind in ("additive", "both") and sigma is None:
        raise ValueError("additive noise needs sigma=...")
    lr_used = lr if lr is not None else lr_fit
    if kind in ("sgd", "both") and not lr_used:
        raise ValueError("SGD noise needs a positive lr (the estimator fitted none)")
    sig_sched = (FunctionSchedule(sigma, "sigma", nonneg=True) if callable(sigma) else
                 float(sigma)) if kind in ("additive", "both") else 0.0
    ts = traj.ts[start:]
    sde = LESDE(traj.labels, impacts, fld, sigma=sig_sched, noise=kind,
                lr=lr_used if kind in ("sgd", "both") else None, dim=p)
    step = float(dt) if dt is not None else _step(impacts, fld, ts,
                                                  float(traj.class_weights.max()))
    x0 = torch.as_tensor(traj.features[0, start])
    logged_x = traj.features[0, start:]
    logged = class_means(logged_x, traj.labels, K)                     # (T', K, p)
    logits = p == K
    Tn = ts.shape[0]
    chunk = max(1, int(2e7 // max(1, Tn * traj.N * p)))
    means, spreads, accs, nc1s = [], [], [], []
    done = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while done < n_paths:
            b = min(chunk, n_paths - done)
            sol = simulate(sde, x0, ts, step, seed=int(seed) + done, num_runs=b, record="full")
            st = np.transpose(sol.states, (1, 0, 2, 3))                # (b, T', N, p)
            means.append(np.transpose(sol.class_means, (1, 0, 2, 3)))
            spreads.append(spread(st, traj.labels, K))
            nc1s.append(metrics.nc1(st, traj.labels, num_classes=K))
            if logits:
                accs.append((st.argmax(-1) == traj.labels).mean(-1))
            done += b
    from .uncertainty import percentile_band

    sims = np.concatenate(means)                                        # (P, T', K, p)
    band = percentile_band(sims, level)
    sim_mean = np.nanmean(sims, axis=0)
    resid = (logged - sim_mean)[1:] ** 2
    cent = (logged[1:] - logged[1:].mean(axis=0, keepdims=True)) ** 2
    r2 = 1.0 - resid.sum() / max(cent.sum(), 1e-300)
    r2k = 1.0 - resid.sum(axis=(0, 2)) / np.maximum(cent.sum(axis=(0, 2)), 1e-300)
    inside = (logged >= band[0]) & (logged <= band[1])
    coverage = float(inside[1:].mean())
    logged_spread = spread(logged_x, traj.labels, K)
    sim_spread = np.nanmean(np.concatenate(spreads), axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(sim_spread[1:] - logged_spread[1:]) / logged_spread[1:]
    spread_err = float(np.nanmean(rel)) if np.any(np.isfinite(rel)) else float("nan")
    logged_nc1 = np.asarray(metrics.nc1(logged_x, traj.labels, num_classes=K), dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sim_nc1 = np.nanmedian(np.concatenate(nc1s), axis=0)
        lr_nc1 = np.abs(np.log(sim_nc1[1:] / logged_nc1[1:]))
    nc1_err = float(np.nanmean(lr_nc1)) if np.any(np.isfinite(lr_nc1)) else float("nan")
    if logits:
        acc_sims = np.concatenate(accs)
        logged_acc = (logged_x.argmax(-1) == traj.labels).mean(-1)
        sim_acc = acc_sims.mean(0)
        acc_band = percentile_band(acc_sims, level)
        acc_mae = float(np.abs(sim_acc - logged_acc)[1:].mean())
    else:
        logged_acc = sim_acc = np.full(Tn, np.nan)
        acc_band = np.full((2, Tn), np.nan)
        acc_mae = float("nan")
    sig_arr = np.array([float(sig_sched(t)) if callable(sig_sched) else float(sig_sched)
                        for t in ts])
    model = {"field": getattr(fld, "name", fld) if not isinstance(fld, str) else fld,
             "noise": kind, "lr": float(lr_used) if kind in ("sgd", "both") else None}
    return GoodnessOfFit(ts=ts, logged_means=logged, sim_means=sim_mean, sim_lo=band[0],
                         sim_hi=band[1], r2=float(r2), r2_per_class=r2k, coverage=coverage,
                         logged_spread=logged_spread, sim_spread=sim_spread,
                         spread_rel_error=spread_err, logged_accuracy=logged_acc,
                         sim_accuracy=sim_acc, sim_accuracy_lo=acc_band[0],
                         sim_accuracy_hi=acc_band[1], accuracy_mae=acc_mae,
                         logged_nc1=logged_nc1, sim_nc1=sim_nc1, nc1_rel_error=nc1_err,
                         n_paths=int(n_paths), level=float(level), model=model, sigma=sig_arr)


# ============================================================================================
# held-out prediction and model comparison
# ============================================================================================
@dataclass(eq=False)
class ModelComparison:
    """The model table of :func:`compare_models`: one row per candidate model (dicts with
    ``model``, ``field``, ``noise``, ``n_params``, ``aic``, ``bic``, ``delta_aic``,
    ``r2_means``, ``spread_rel_error``, ``accuracy_mae``, ``nc1_rel_error``, ``coverage``,
    ``alpha_median``, ``beta_median``, ``lr``, ``sigma_median``, or ``error`` for a model that
    could not be fitted), the split time and the fitted estimators."""

    rows: list
    t_split: float
    n_fit: int
    n_held_out: int
    estimators: dict = dc_field(default_factory=dict)
    held_out: dict = dc_field(default_factory=dict)

    COLUMNS = (("model", "model", "{}"), ("noise", "noise", "{}"), ("n_params", "params", "{}"),
               ("delta_aic", "dAIC", "{:.1f}"), ("r2_means", "R2 means", "{:.3f}"),
               ("spread_rel_error", "spread err", "{:.2f}"),
               ("accuracy_mae", "acc err", "{:.3f}"), ("nc1_rel_error", "NC1 err", "{:.2f}"),
               ("coverage", "band cover", "{:.2f}"))

    def to_frame(self):
        """The table as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def best(self, by: str = "aic") -> str:
        """Name of the model with the lowest ``by`` (aic, bic) or highest r2_means."""
        ok = [r for r in self.rows if "error" not in r and np.isfinite(r.get(by, np.nan))]
        if not ok:
            raise ValueError("no model could be scored")
        pick = max if by == "r2_means" else min
        return pick(ok, key=lambda r: r[by])["model"]

    def table(self) -> str:
        """A plain-text table (markdown) of the held-out scores and the information criterion."""
        head = "| " + " | ".join(h for _, h, _ in self.COLUMNS) + " |"
        lines = [head, "|" + "---|" * len(self.COLUMNS)]
        for r in self.rows:
            if "error" in r:
                lines.append(f"| {r['model']} | " + " | ".join(["-"] * (len(self.COLUMNS) - 2))
                             + f" | not fitted: {r['error']} |")
                continue
            cells = []
            for key, _, fmt in self.COLUMNS:
                v = r.get(key)
                try:
                    cells.append(fmt.format(v) if v is not None and not (
                        isinstance(v, float) and not math.isfinite(v)) else "-")
                except (TypeError, ValueError):
                    cells.append(str(v))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return (f"fitted on t <= {self.t_split:g} ({self.n_fit} logged times), scored on the "
                f"{self.n_held_out} later ones; dAIC: in-sample quasi-likelihood AIC minus the "
                f"best\n" + self.table())

    def __repr__(self) -> str:
        return (f"ModelComparison({len(self.rows)} models, split t = {self.t_split:g}, best by "
                f"AIC: {self.best() if self.rows else None})")


def compare_models(trajectory, *, models: Sequence[str] = ("I", "L", "CE", "CE+additive"),
                   fit_fraction: float = 0.5, n_paths: int = 100, seed: int = 0,
                   estimator_kwargs: Optional[dict] = None, **kwargs) -> ModelComparison:
    r"""Held-out prediction and model comparison.

    Each candidate model (:data:`MODELS`: "I" identity field with additive noise, "L"
    label-projection field with additive noise, "CE" cross-entropy field with SGD noise alone,
    "CE+additive" cross-entropy with SGD and additive noise) is fitted by
    :class:`~lesde.fit.ShootingEstimator` to the logged times ``t <= t_0 + fit_fraction (t_end -
    t_0)``, then simulated (``n_paths`` paths) from the logged state at the last fitted time over
    the remaining logged times (E(t) held at its value at the last knot). Scores on the held-out
    times: R^2 of the class means, relative error of the within-class spread, argmax accuracy
    error, NC1 error (see :class:`GoodnessOfFit`) and the coverage of the logged class means by
    the simulated band; and, in sample, AIC and BIC of the Gaussian quasi-likelihood of the
    class-mean increments under each model's fitted noise (its covariance floored at 1e-8 of its
    largest eigenvalue per interval: a noise model that cannot produce a direction the data
    moves in pays for it).

    ``estimator_kwargs`` go to every :class:`~lesde.fit.ShootingEstimator` (default
    ``bootstrap="sandwich"``: no resampling). Models that need p = K are skipped for features
    (``error`` in their row).
    """
    from .shooting import ShootingEstimator

    traj = as_trajectory(trajectory, **kwargs)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    if not 0 < fit_fraction < 1:
        raise ValueError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
    t_split = traj.ts[0] + fit_fraction * (traj.ts[-1] - traj.ts[0])
    i_split = int(np.searchsorted(traj.ts, t_split, side="right")) - 1
    if i_split < 2 or i_split > traj.T - 2:
        raise ValueError(f"fit_fraction = {fit_fraction} leaves {i_split + 1} logged times to fit "
                         f"and {traj.T - 1 - i_split} to predict; both need at least 2-3")
    early = traj.subset(times=slice(0, i_split + 1))
    opts = {"bootstrap": "sandwich"}
    opts.update(estimator_kwargs or {})
    rows, ests, held = [], {}, {}
    for name in models:
        fld, noise = MODELS[name]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                est = ShootingEstimator(fld, noise=noise, **opts).fit(early)
                gof = goodness_of_fit(traj, est, start=i_split, n_paths=n_paths, seed=seed)
        except ValueError as exc:
            rows.append({"model": name, "field": fld, "noise": noise, "error": str(exc)})
            continue
        ests[name], held[name] = est, gof
        rows.append({"model": name, "field": fld, "noise": est.noise_kind_,
                     "n_params": int(est.form_.n_params), "aic": float(est.aic_),
                     "bic": float(est.bic_), "r2_means": gof.r2,
                     "spread_rel_error": gof.spread_rel_error, "accuracy_mae": gof.accuracy_mae,
                     "nc1_rel_error": gof.nc1_rel_error, "coverage": gof.coverage,
                     "alpha_median": float(np.median(est.alpha_)),
                     "beta_median": float(np.median(est.beta_)), "lr": float(est.lr_),
                     "sigma_median": float(np.median(est.sigma_))})
    aics = [r["aic"] for r in rows if "aic" in r and np.isfinite(r["aic"])]
    for r in rows:
        if "aic" in r:
            r["delta_aic"] = r["aic"] - min(aics) if aics else float("nan")
    return ModelComparison(rows=rows, t_split=float(traj.ts[i_split]), n_fit=i_split + 1,
                           n_held_out=traj.T - 1 - i_split, estimators=ests, held_out=held)
