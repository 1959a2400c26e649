r"""Derivatives of logged curves in time units, and the tail index of a decaying impact.

* :func:`smooth_derivative`: ``d values / dt`` by a local polynomial (Savitzky-Golay) fit whose
  window is a width in *time*, so that it means the same thing however densely a run is logged
  (on a uniform log with interval h, a width of ``(w - 1) h`` is the classical w-point filter).
* :func:`tail_index`: the two tail indices of an integrated impact A(t):

  - ``kind="paper"``: the definition in the code of Zhang, Wang & Su (NeurIPS 2021;
    ``estimate_tail_idx`` in ``src/data_analyzer.py`` of github.com/zjiayao/le_sde),
    ``r = 1 - mean over the tail of log A(t) / log t`` with t counted in SGD iterations;
  - ``kind="integral"`` / ``"rate"``: the slope of a log-log fit of A(t) (or of alpha(t)) on
    the tail, ``A ~ t^(1 - r)`` / ``alpha ~ t^(-r)``.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

__all__ = ["smooth_derivative", "default_window", "tail_index"]


def default_window(ts, order: int = 2) -> float:
    """The default smoothing width in time units: ``(order + 2)`` median log intervals, the
    narrowest window of a local polynomial of degree ``order`` with one degree of freedom to
    spare (5 points for order 2 on a uniform log). It has the least smoothing bias; on noisy logs
    the derivative is noisy, which the bootstrap bands show; widen it there."""
    ts = np.asarray(ts, dtype=float)
    if ts.ndim != 1 or ts.size < 2:
        raise ValueError("ts must have at least two times")
    return float((order + 2) * np.median(np.diff(ts)))


def _local_windows(ts: np.ndarray, width: float, order: int) -> list:
    """Index arrays of the points each local fit uses: the points within a window of ``width``
    centred on t_i, shifted inward at the ends (as Savitzky-Golay's "interp" mode), and widened
    to the nearest ``order + 2`` points where a sparse log leaves fewer."""
    T = ts.size
    need = min(order + 2, T)
    out = []
    for i in range(T):
        lo = min(max(ts[i] - width / 2, ts[0]), max(ts[-1] - width, ts[0]))
        idx = np.flatnonzero((ts >= lo - 1e-12 * abs(width)) & (ts <= lo + width + 1e-12 * abs(width)))
        if idx.size < need:
            idx = np.sort(np.argsort(np.abs(ts - ts[i]), kind="stable")[:need])
        out.append(idx)
    return out


def smooth_derivative(ts, values, window: Optional[float] = None, order: int = 2,
                      axis: int = -1) -> np.ndarray:
    r"""``d values / dt`` by a local polynomial fit of degree ``order`` in time.

    At each logged time t_i the values within a window of width ``window`` (time units)
    around t_i are fitted by least squares with a polynomial of degree ``order`` in ``t - t_i``;
    its linear coefficient is the derivative. Near the ends the window is shifted inward (the
    Savitzky-Golay "interp" rule). The times need not be uniform. On a uniform log with interval
    h, ``window = (w - 1) h`` reproduces :func:`scipy.signal.savgol_filter` with w points.

    Bias: a local polynomial of degree 2 over a half-width a has a derivative error of about
    ``a^2 f'''(t) / 10`` in the interior; a wide window on a curve that bends (alpha rising then
    decaying) is biased, a narrow one is noisy. Default: :func:`default_window`.

    Missing values (NaN) are left out of each local fit; a time whose window has fewer than
    ``order + 1`` finite values gets NaN.
    """
    ts = np.asarray(ts, dtype=float)
    y = np.moveaxis(np.asarray(values, dtype=float), axis, -1)
    T = ts.shape[0]
    if y.shape[-1] != T:
        raise ValueError(f"values has {y.shape[-1]} times along axis {axis}, ts has {T}")
    if int(order) != order or order < 1:
        raise ValueError(f"order must be a positive integer, got {order}")
    if T < order + 2:
        raise ValueError(f"need at least order + 2 = {order + 2} times to differentiate, got {T}")
    width = default_window(ts, order) if window is None else float(window)
    if not (np.isfinite(width) and width > 0):
        raise ValueError(f"window must be a positive width in time units, got {window}")
    flat = y.reshape(-1, T)
    out = np.full_like(flat, np.nan)
    finite = np.isfinite(flat)
    for i, idx in enumerate(_local_windows(ts, width, order)):
        X = np.vander(ts[idx] - ts[i], order + 1, increasing=True)
        coef = np.linalg.pinv(X)[1]                                   # derivative weights
        rows_ok = finite[:, idx].all(axis=1)
        out[rows_ok, i] = flat[rows_ok][:, idx] @ coef
        for r in np.flatnonzero(~rows_ok):
            keep = finite[r, idx]
            if keep.sum() >= order + 1:
                Xk = X[keep]
                out[r, i] = np.linalg.lstsq(Xk, flat[r, idx][keep], rcond=None)[0][1]
    return np.moveaxis(out.reshape(y.shape), -1, axis)


def tail_index(ts, values, tail: Optional[float] = None, kind: str = "integral",
               time_scale: float = 1.0, time_offset: float = 0.0) -> dict:
    r"""Tail index r of a decaying impact, by the paper's definition or by a log-log slope.

    ``kind="paper"`` (Zhang, Wang & Su 2021, Fig. 4c; ``estimate_tail_idx`` in their code):
    ``values`` is A(t) and ::

        r = 1 - mean_{t in tail} log A(t) / log t,

    t counted in SGD iterations (their logs have one entry per iteration, indexed 1, 2, ...),
    the tail being the last ``tail`` iterations (their default 1000). If more than half of the
    tail is negative, A is negated first; non-positive values are left out. Pass the times in
    iterations: ``time_scale`` converts the given ``ts`` (``t_iter = ts * time_scale +
    time_offset``; for lr-scaled time t = step x lr use ``time_scale = 1 / lr`` and
    ``time_offset = 1``, as their index counts from 1). This is a statement about the *size* of
    A at the end of the run, not about its decay: for A = c t^(1-r),
    ``log A / log t = (1 - r) + log c / log t`` approaches 1 - r only logarithmically slowly, and
    the value depends on the time unit (A is unit-free, log t is not): GeoMNIST's A(T) = 19.85
    after 10,000 iterations gives 1 - log 19.85 / log 10,000 = 0.676 in iterations but
    1 - log 19.85 / log 50 = 0.236 in lr-scaled time (lr 0.005).

    ``kind="integral"`` (the asymptotic definition): ``values`` is A(t) ~ c t^(1-r) and
    ``r = 1 - d log A / d log t``, the least-squares slope over the times in the last ``tail``
    fraction (default 0.5) of the log-time range. Valid for r < 1 (A diverges); for r > 1, A
    converges and the slope tends to 0, so this returns values near 1. The local slope converges
    slowly when r is near 1 (0.85 for r = 0.9 at t = 1e5 in units of the decay's onset time);
    compare with ``kind="rate"``: ``values`` is alpha(t) ~ c t^(-r), ``r = -d log alpha / d log
    t``; valid for any r but noisier (a derivative). The slope does not depend on the time unit.

    Returns a dict with ``r``, ``kind``, ``n_points``, ``t_min``, ``t_max`` (in the units used
    for the fit) and, for the slopes, ``r_se`` (least-squares standard error) and ``slope``.
    """
    if kind not in ("integral", "rate", "paper"):
        raise ValueError(f"kind must be 'paper', 'integral' or 'rate', got {kind!r}")
    ts = np.asarray(ts, dtype=float) * float(time_scale) + float(time_offset)
    v = np.asarray(values, dtype=float)
    if v.shape != ts.shape:
        raise ValueError(f"values must have the shape of ts {ts.shape}, got {v.shape}")
    if kind == "paper":
        tail = 1000.0 if tail is None else float(tail)
        if not (np.isfinite(tail) and tail > 0):
            raise ValueError(f"tail must be a positive number of iterations, got {tail}")
        sel = (ts > ts[-1] - tail) & np.isfinite(v) & (ts > 1)
        if sel.sum() < 1:
            raise ValueError("no logged time with t > 1 iteration in the tail")
        tv = v[sel]
        if np.sum(tv < 0) > sel.sum() / 2:
            tv = -tv
        ok = tv > 0
        if not ok.any():
            raise ValueError("A(t) is not positive anywhere in the tail; the paper's tail index "
                             "is undefined")
        vals = np.log(tv[ok]) / np.log(ts[sel][ok])
        return {"r": float(1.0 - vals.mean()), "kind": kind, "n_points": int(ok.sum()),
                "t_min": float(ts[sel][ok].min()), "t_max": float(ts[sel][ok].max()),
                "negated": bool(np.sum(v[sel] < 0) > sel.sum() / 2)}
    tail = 0.5 if tail is None else float(tail)
    if not 0 < tail <= 1:
        raise ValueError(f"tail must be a fraction in (0, 1] of the log-time range, got {tail}")
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
    return {"r": r, "kind": kind, "r_se": float(math.sqrt(max(cov[1, 1], 0.0))), "slope": slope,
            "n_points": int(x.size), "t_min": float(math.exp(x[0])),
            "t_max": float(math.exp(x[-1]))}
