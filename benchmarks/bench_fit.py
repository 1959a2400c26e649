"""Fit benchmark: noise-free exactness on coarse logs, fit times at real-log size, and the
coverage matrix of the bands.

1. ``exact``: noise-free logs at coarse spacing (the class means of G change by a third to a half
   within one log interval), solved to 1e-11 by scipy's DOP853; the error of E(t) at the knots
   (max over entries and times, relative to the largest |E|) of the trajectory-matching
   ``ShootingEstimator`` beside the previous estimators on the same data: the windowed regression
   with its previous default (left rule, degree 0) and with the trapezoid rule and degree 1, and
   for the linear models the I-/L-estimator's alpha = dA/dt by a 5-point local quadratic.
2. ``timing``: one shooting fit at the size of the committed real log (T = 132, 100 tracked
   samples per class, K = 3 and K = 10, cross-entropy field, the default form and noise), and
   200 parametric-bootstrap refits over 2 processes.
3. ``coverage``: the coverage matrix. A base regime (cross-entropy field, additive noise
   sigma = 0.05, fine logging, 20 samples per class, 1 trial, constant impacts) and every level
   of every factor varied one at a time (noise high, coarse logging, 200 samples per class, 4
   trials, power-law and rise-then-decay impacts, SGD noise, the I and L fields), plus the
   interactions most likely to break coverage (coarse x high noise for each field, SGD noise
   high, the default piecewise-linear form on constant impacts, the full E of the cross-entropy
   field from 1 and from 4 trials). Each replicate simulates the LE-SDE from its own initial
   state (exact sampling for the I and L fields with additive noise, else Euler-Maruyama with
   step 0.002) and fits it. Bands: the quasi-likelihood sandwich (every
   cell) and the parametric bootstrap, the default band, with 40 resamples (basic, normal
   and percentile intervals from the same resamples; type-6 sample quantiles, which hold their
   level at any number of resamples, see ``lesde.fit.uncertainty.QUANTILE_METHOD``).
   Coverage of alpha(t) and beta(t) at a quarter, half and three quarters of the run (for the full E: every entry at half time).
   Results are written after every cell (``--out``); with ``--chunk`` every cell grows by that
   many replicates per pass, and a rerun continues where a stopped run left off.
4. ``gap``: the coverage of the gap alpha - beta's band on the cross-entropy cells where the
   fit flags alpha + (K-1) beta as not identified (the gap is what it then reports).
5. ``shift``: the sandwich coverage of alpha and beta without a flagged fit's widening, against
   the fit's shift signal: the calibration of ``ShootingEstimator.SHIFT_MIN``.
6. ``knots``: how often AIC and BIC prefer 21 knots to 11 on logs where 11 are biased.

    python benchmarks/bench_fit.py exact
    python benchmarks/bench_fit.py timing [--out FILE.json]
    nice -n 10 python benchmarks/bench_fit.py coverage --replicates 120 --chunk 5 \\
        --out benchmarks/results_fit_coverage.json
    python benchmarks/bench_fit.py gap --replicates 100 --out benchmarks/results_fit_gap.json
    python benchmarks/bench_fit.py shift --replicates 100 --out benchmarks/results_fit_shift.json
    python benchmarks/bench_fit.py knots --replicates 30 --out benchmarks/results_fit_knots.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
import warnings
import zlib

import numpy as np
import torch

from lesde import model as m
from lesde.fit import (IEstimator, LEstimator, RegressionEstimator, ShootingEstimator,
                       Trajectory)
from lesde.fit.uncertainty import band_from_replicates, shooting_bands
from lesde.solvers import simulate

K = 3


# ============================================================================================
# set-ups
# ============================================================================================
def _mu0(field, rng=None):
    """Initial class means: an unequal logit bias for the cross-entropy field (so that the mean
    softmax is not uniform and alpha, beta are both identified), separated means otherwise."""
    if field == "cross_entropy":
        return np.broadcast_to(np.array([1.5, 0.0, -1.0]), (K, K)).copy()
    if field == "label_projection":
        s = 1.0 + np.arange(K) + 0.5 * np.arange(K) ** 2
        return 0.5 + s[:, None] * (np.eye(K) - 1.0 / K)
    return 2.0 + 3.0 * (np.eye(K) - 1.0 / K)


def _rise(a0, tp):
    return lambda t: a0 * (t / tp) * np.exp(1.0 - t / tp)


#: per field: alpha, beta scale, run length, fine and coarse log intervals
SETUP = {"cross_entropy": dict(alpha=5.0, beta=1.25, D=12.0, fine=0.3, coarse=1.5),
         "identity": dict(alpha=1.0, beta=0.3, D=8.0, fine=0.2, coarse=1.0),
         "label_projection": dict(alpha=1.5, beta=0.45, D=8.0, fine=0.2, coarse=1.0)}


def _impacts(field, profile):
    s = SETUP[field]
    a, b, D = s["alpha"], s["beta"], s["D"]
    if profile == "constant":
        return m.Impacts.intra_inter(a, b, K), "constant"
    if profile == "power_law":     # a (1 + t)^-0.6: about a third of the start at the end
        return m.Impacts.intra_inter(m.PowerLaw(a, 0.6), m.PowerLaw(b, 0.6), K), "power_law"
    return m.Impacts.intra_inter(_rise(a, D / 4), _rise(b, D / 4), K), "piecewise_linear"


BASE = dict(field="cross_entropy", noise="additive", level="low", logging="fine", n=20, R=1,
            profile="constant", matrix="intra_inter", form=None, knots=None, parametric=True)
SIGMA = {"low": 0.05, "high": 0.5}
LR = {"low": 0.05, "high": 0.5}


def _cells() -> dict:
    def cell(**kw):
        c = dict(BASE)
        c.update(kw)
        return c

    return {
        "base": cell(),
        "noise high": cell(level="high"),
        "coarse": cell(logging="coarse"),
        "200 per class": cell(n=200),
        "4 trials": cell(R=4),
        "power-law impacts": cell(profile="power_law"),
        "rise-then-decay impacts": cell(profile="rise"),
        # the former default form (11 knots) on the same logs: its bias at the peak
        "rise-then-decay impacts, 11 knots": cell(profile="rise", knots=11,
                                                  key="rise-then-decay impacts"),
        "SGD noise": cell(noise="sgd"),
        "I field": cell(field="identity"),
        "L field": cell(field="label_projection"),
        "coarse x noise high": cell(logging="coarse", level="high"),
        "SGD noise high": cell(noise="sgd", level="high"),
        "SGD noise high x coarse": cell(noise="sgd", level="high", logging="coarse"),
        "I field x coarse x noise high": cell(field="identity", logging="coarse", level="high"),
        "L field x coarse x noise high": cell(field="label_projection", logging="coarse",
                                              level="high"),
        "I field x power-law": cell(field="identity", profile="power_law"),
        "L field x rise-then-decay": cell(field="label_projection", profile="rise",
                                          key="L field x rise-then-decay, 21 knots"),
        "L field x rise-then-decay, 11 knots": cell(field="label_projection", profile="rise",
                                                    knots=11, key="L field x rise-then-decay"),
        "200 per class x 4 trials x noise high": cell(n=200, R=4, level="high"),
        "default form (piecewise linear) on constant impacts": cell(form="piecewise_linear"),
        "default form on constant impacts, 11 knots": cell(
            form="piecewise_linear", knots=11,
            key="default form (piecewise linear) on constant impacts"),
        "full E, 4 trials": cell(matrix="full", R=4),
        "full E, 1 trial": cell(matrix="full"),
    }


def _log_times(c):
    s = SETUP[c["field"]]
    return np.round(np.arange(0.0, s["D"] + 1e-9, s[c["logging"]]), 10)


def simulate_logs(c: dict, reps: int, seed: int) -> list:
    """``reps`` independent logs of cell c (each R trials of n samples per class)."""
    field = c["field"]
    imp, _ = _impacts(field, c["profile"])
    y = np.tile(np.arange(K), c["n"])
    rng = np.random.default_rng(seed)
    R = c["R"]
    mu = _mu0(field)
    spread = 0.5
    x0 = mu[y][None] + spread * rng.standard_normal((reps * R, y.size, K))
    if R > 1:      # trials from different initial class means
        x0 = x0 + 0.5 * rng.standard_normal((reps * R, 1, K))
    if c["noise"] == "additive":
        sde = m.LESDE(y, imp, field, sigma=SIGMA[c["level"]], dim=K)
    else:
        sde = m.LESDE(y, imp, field, noise="sgd", lr=LR[c["level"]], dim=K)
    ts = _log_times(c)
    # the linear fields with additive noise are sampled exactly at the log times: Euler's
    # O(dt) bias of an exponential growth rate (lambda dt / 2 relative, 5e-4 at dt = 0.002)
    # exceeds these cells' band widths and would be scored against the estimator
    exact = field in ("identity", "label_projection") and c["noise"] == "additive"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = simulate(sde, x0, ts, None if exact else 0.002, seed=seed,
                       method="exact" if exact else "euler")
    if np.any(sol.overflowed):
        raise RuntimeError(f"cell {c}: a simulation overflowed")
    st = np.transpose(sol.states, (1, 0, 2, 3)).reshape(reps, R, len(ts), y.size, K)
    return [Trajectory(ts, st[r], y) for r in range(reps)]


def _targets(c: dict):
    """(times, truth dict name -> values at those times) of the quantities whose coverage
    is measured."""
    field = c["field"]
    imp, _ = _impacts(field, c["profile"])
    D = SETUP[field]["D"]
    tq = np.array([D / 4, D / 2, 3 * D / 4])
    if c["matrix"] == "full":
        return tq[1:2], {"E": np.stack([imp.matrix(t) for t in tq[1:2]])}
    Es = [imp.matrix(t) for t in tq]
    return tq, {"alpha": np.array([E[0, 0] for E in Es]), "beta": np.array([E[0, 1] for E in Es])}


def _estimator(c: dict, **kw) -> ShootingEstimator:
    _, time_form = _impacts(c["field"], c["profile"])
    if c["form"] is not None:
        time_form = c["form"]
    if c.get("knots") is not None:
        kw["knots"] = c["knots"]
    return ShootingEstimator(c["field"], matrix=c["matrix"], time=time_form, **kw)


def _cover(est, band, tq, truth, idx):
    out = {}
    for name, v in truth.items():
        b = band[name][:, idx]
        out[name] = ((b[0] <= v) & (v <= b[1])).reshape(-1)
    return out


def run_cell(c: dict, reps: int, seed: int, n_boot: int = 40, prev: dict = None) -> dict:
    """``reps`` more replicates of cell c (drawn with ``seed``), merged into ``prev`` (the
    cell's earlier result, whose raw per-replicate records are kept) when given."""
    t0 = time.perf_counter()
    tq, truth = _targets(c)
    logs = simulate_logs(c, reps, seed)
    idx = np.searchsorted(logs[0].ts, tq - 1e-9)
    methods = ["sandwich"] + (["parametric basic", "parametric normal", "parametric percentile"]
                              if c["parametric"] else [])
    raw = copy.deepcopy(prev["raw"]) if prev else {
        "hits": {mth: {name: [] for name in truth} for mth in methods},
        "width": {mth: {name: [] for name in truth} for mth in methods},
        "err": {name: [] for name in truth}, "fit_s": [], "boot_s": [], "warned": 0,
        "seeds": [], "seconds": 0.0}
    raw["seeds"].append([seed, reps])
    for r, tr in enumerate(logs):
        rs = seed * 1000 + r
        t1 = time.perf_counter()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            est = _estimator(c, bootstrap="sandwich", seed=rs).fit(tr)
        raw["warned"] += any("not identified" in str(x.message) for x in w)
        raw["fit_s"].append(time.perf_counter() - t1)
        q = est.quantities(est.theta_)
        for name, v in truth.items():
            raw["err"][name].append((q[name][idx] - v).reshape(-1).tolist())
        for name, hit in _cover(est, est.bands_, tq, truth, idx).items():
            raw["hits"]["sandwich"][name].append(hit.astype(int).tolist())
            raw["width"]["sandwich"][name].append(
                np.diff(est.bands_[name][:, idx], axis=0).ravel().tolist())
        if c["parametric"]:
            t1 = time.perf_counter()
            pb = copy.copy(est)
            pb.n_bootstrap, pb.bands_, pb.se_ = n_boot, {}, {}
            pb.seed = 10_000 + rs
            shooting_bands(pb, tr, "parametric")
            reps_q = pb.quantities(pb.bootstrap_theta_)
            raw["boot_s"].append(time.perf_counter() - t1)
            for interval in ("basic", "normal", "percentile"):
                band = {name: band_from_replicates(q[name], reps_q[name], 0.95, interval)
                        for name in truth}
                for name, hit in _cover(pb, band, tq, truth, idx).items():
                    raw["hits"][f"parametric {interval}"][name].append(hit.astype(int).tolist())
                    raw["width"][f"parametric {interval}"][name].append(
                        np.diff(band[name][:, idx], axis=0).ravel().tolist())
    raw["seconds"] += time.perf_counter() - t0
    n = len(raw["fit_s"])
    hits = {mth: {name: np.asarray(h, float) for name, h in hv.items()}
            for mth, hv in raw["hits"].items()}
    cov = {mth: {name: h.mean(0) for name, h in hv.items()} for mth, hv in hits.items()}
    return {"cell": c, "replicates": n, "times": tq.tolist(),
            "truth": {k: v.tolist() for k, v in truth.items()},
            "coverage": {mth: {name: v.tolist() for name, v in cv.items()}
                         for mth, cv in cov.items()},
            "coverage_min": {mth: float(min(np.min(v) for v in cv.values()))
                             for mth, cv in cov.items()},
            "coverage_mean": {mth: float(np.mean(np.concatenate(list(cv.values()))))
                              for mth, cv in cov.items()},
            "mean_width": {mth: {name: np.mean(np.asarray(w), axis=0).tolist()
                                 for name, w in wd.items()} for mth, wd in raw["width"].items()},
            "bias": {name: np.mean(np.asarray(e), axis=0).tolist()
                     for name, e in raw["err"].items()},
            "sd": {name: (np.std(np.asarray(e), axis=0, ddof=1).tolist() if n > 1 else None)
                   for name, e in raw["err"].items()},
            "not_identified_warnings": int(raw["warned"]),
            "fit_seconds_median": float(np.median(raw["fit_s"])),
            "bootstrap_seconds_median": float(np.median(raw["boot_s"])) if raw["boot_s"]
            else None,
            "cell_seconds": raw["seconds"], "raw": raw}


def coverage(args) -> dict:
    """Every cell (or those of --cells, in that order) in passes of --chunk replicates, until
    each has --replicates: a run stopped at any time leaves every cell with about the same
    count, and a rerun of the same command continues where it stopped."""
    cells = _cells()
    names = list(cells) if not args.cells else [n.strip() for n in args.cells.split(";")]
    unknown = [n for n in names if n not in cells]
    if unknown:
        raise SystemExit(f"unknown cells {unknown}; the cells are {list(cells)}")
    results = {}
    if args.out and os.path.exists(args.out):
        with open(args.out) as fh:
            results = json.load(fh)
    results.setdefault("cells", {})
    results.update({"machine": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads()})
    chunk = args.chunk or args.replicates
    while True:
        todo = [n for n in names if results["cells"].get(n, {}).get("replicates", 0)
                < args.replicates]
        if not todo:
            break
        for name in todo:
            prev = results["cells"].get(name)
            done = prev["replicates"] if prev else 0
            k = min(chunk, args.replicates - done)
            key = cells[name].get("key") or name       # a cell's seeds follow its key
            seed = (zlib.crc32(key.encode()) + 7919 * done) % 10 ** 6
            res = run_cell(cells[name], k, seed=seed, prev=prev)
            results["cells"][name] = res
            print(f"{name:55s} n={res['replicates']:4d}  " + "  ".join(
                f"{mth}: min {res['coverage_min'][mth]:.3f} mean {res['coverage_mean'][mth]:.3f}"
                for mth in res["coverage_min"]) + f"  ({res['cell_seconds']:.0f} s)", flush=True)
            if args.out:
                tmp = args.out + ".tmp"
                with open(tmp, "w") as fh:
                    json.dump(results, fh, indent=1)
                os.replace(tmp, args.out)
    return results


def coverage_table(path: str) -> str:
    """The coverage matrix of a results file as a markdown table: per cell its regime, replicate
    count n, the binomial standard error of a calibrated 95% band at that n, sqrt(0.95 x 0.05 /
    n), and per band method the coverage of alpha and beta (averaged over the three times; for
    the full E: over the 9 entries at half time); the share of replicates the fit flagged as not
    identified; and a verdict on the default band (parametric basic where measured, else the
    sandwich): "in" 0.90-0.99, "consistent" within 2 SE of that range, or "misses"."""
    with open(path) as fh:
        res = json.load(fh)["cells"]
    methods = ["sandwich", "parametric basic", "parametric normal", "parametric percentile"]
    head = ("| cell | field | noise | log | n/class | trials | impacts | reps | SE at 0.95 | "
            + " | ".join(f"{m_}: alpha / beta" for m_ in methods)
            + " | flagged not identified | default band |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in res.items():
        c, n = r["cell"], r["replicates"]
        se = math.sqrt(0.95 * 0.05 / n)
        lvl = SIGMA[c["level"]] if c["noise"] == "additive" else LR[c["level"]]
        noise = f"{'sigma' if c['noise'] == 'additive' else 'SGD lr'} {lvl:g}"
        cols, means = [], {}
        for mth in methods:
            cv = r["coverage"].get(mth)
            if cv is None:
                cols.append("-")
                continue
            means[mth] = [float(np.mean(v)) for v in cv.values()]
            cols.append(" / ".join(f"{v:.2f}" for v in means[mth]))
        default = means.get("parametric basic", means["sandwich"])
        lo = min(default)
        verdict = ("in" if 0.90 <= lo and max(default) <= 0.99 else
                   "consistent" if 0.90 - 2 * se <= lo and max(default) <= 0.99 + 2 * se
                   else "misses")
        form = c["form"] or {"constant": "constant", "power_law": "power law",
                             "rise": "rise-decay"}[c["profile"]]
        if c.get("knots") is not None:
            form += f", {c['knots']} knots"
        if c["matrix"] == "full":
            form += ", full E"
        field = {"cross_entropy": "CE", "identity": "I", "label_projection": "L"}[c["field"]]
        lines.append(f"| {name} | {field} | {noise} | {c['logging']} | {c['n']} | {c['R']} | "
                     f"{form} | {n} | {se:.3f} | " + " | ".join(cols)
                     + f" | {r['not_identified_warnings'] / n:.2f} | {verdict} |")
    return "\n".join(lines)


# ============================================================================================
# noise-free exactness at coarse logging, beside the previous estimators
# ============================================================================================
def exact_log(field, profile, T, D, R=1, n=5, seed=0):
    """A noise-free log (R, T, N, p) of the LE-SDE by scipy DOP853 (rtol 1e-11)."""
    from scipy.integrate import solve_ivp

    if profile == "pwl":
        kn = np.linspace(0, D, 5)
        av, bv = (np.array([4.0, 6.0, 3.0, 2.5, 2.0]), np.array([1.0, 2.0, 0.5, 1.0, 0.4]))
        if field != "cross_entropy":
            av, bv = av / 4, bv / 4
        imp = m.Impacts.intra_inter(lambda t: float(np.interp(t, kn, av)),
                                    lambda t: float(np.interp(t, kn, bv)), K)
    elif profile == "full":
        E0 = np.array([[1.0, 0.3, -0.2], [0.1, 0.8, 0.4], [0.5, -0.3, 1.2]])
        imp = m.Impacts(E0 * (4.0 if field == "cross_entropy" else 0.8))
    else:
        imp, _ = _impacts(field, profile)
    y = np.tile(np.arange(K), n)
    rng = np.random.default_rng(seed)
    x0 = _mu0(field)[y][None] + 0.5 * rng.standard_normal((R, y.size, K))
    if R > 1:
        x0 = x0 + rng.standard_normal((R, 1, K))
    sde = m.LESDE(y, imp, field, dim=K)
    ts = np.linspace(0, D, T)
    out = []
    for r in range(R):
        sol = solve_ivp(lambda t, z: sde.drift(z.reshape(1, -1, K), t).reshape(-1), (0, D),
                        x0[r].ravel(), t_eval=ts, method="DOP853", rtol=1e-11, atol=1e-12)
        out.append(sol.y.T.reshape(T, -1, K))
    return Trajectory(ts, np.stack(out), y), imp


def exactness_table(verbose=True) -> list:
    """Relative error of E at the knots: shooting vs the previous estimators, coarse logs."""
    rows = []
    cases = []
    for field in ("identity", "label_projection", "cross_entropy"):
        D = SETUP[field]["D"]
        T = 9
        for form, profile, matrix, R in (("constant", "constant", "intra_inter", 1),
                                         ("power_law", "power_law", "intra_inter", 1),
                                         ("piecewise_linear", "pwl", "intra_inter", 1),
                                         ("constant", "full", "full", 4)):
            cases.append((field, form, profile, matrix, R, D, T))
    for field, form, profile, matrix, R, D, T in cases:
        tr, imp = exact_log(field, profile, T, D, R=R)
        knots = np.linspace(0, D, 5) if form == "piecewise_linear" else None
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = ShootingEstimator(field, matrix=matrix, time=form, knots=knots, noise="none",
                                    bootstrap="none").fit(tr)
        sec = time.perf_counter() - t0
        tt = tr.ts[:-1]
        truth = np.stack([imp.matrix(t) for t in tt])
        scale = np.abs(truth).max()
        e_shoot = float(np.abs(est.quantities(est.theta_)["E"][:-1] - truth).max() / scale)
        row = {"field": field, "form": form, "matrix": matrix, "trials": R, "T": T,
               "shooting": e_shoot, "seconds": sec}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, kw in (("regression (left, degree 0)", dict(quadrature="left", degree=0)),
                             ("regression (trapezoid, degree 1)", {})):
                reg = RegressionEstimator(field, window=4, n_bootstrap=0, **kw).fit(tr)
                tw = reg.window_times_
                tru = np.stack([imp.matrix(t) for t in tw])
                got = reg.E_ if matrix == "full" else np.stack(
                    [(a - b) * np.eye(K) + b for a, b in zip(reg.alpha_, reg.beta_)])
                row[name] = float(np.abs(got - tru).max() / scale)
            if matrix == "intra_inter" and field != "cross_entropy":
                Est = IEstimator if field == "identity" else LEstimator
                me = Est(n_bootstrap=0).fit(tr)
                tru = np.stack([imp.matrix(t) for t in tr.ts])
                got = np.stack([(a - b) * np.eye(K) + b for a, b in zip(me.alpha_, me.beta_)])
                row["I/L-estimator alpha = dA/dt"] = float(np.abs(got - tru).max() / scale)
        rows.append(row)
        if verbose:
            print(f"{field:17s} {form:17s} {matrix:11s} R={R}: shooting {e_shoot:.1e}  "
                  + "  ".join(f"{k} {v:.1e}" for k, v in row.items()
                              if k.startswith(("regression", "I/L"))) + f"  ({sec:.1f} s)")
    return rows


# ============================================================================================
# timing at real-log size
# ============================================================================================
def _save(out: dict, path) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(out, fh, indent=1)


def timing(args) -> dict:
    """Fit times at real-log size; rows already in --out are kept unless measured again."""
    out = {}
    if args.out and os.path.exists(args.out):
        with open(args.out) as fh:
            out = json.load(fh)
    for Kc in (int(v) for v in args.kk.split(",") if v.strip()):
        y = np.tile(np.arange(Kc), 100)
        rng = np.random.default_rng(0)
        x0 = 0.5 * rng.standard_normal((y.size, Kc)) + np.linspace(1.0, -1.0, Kc)
        ts = np.linspace(0.0, 20.9, 132)
        sde = m.LESDE(y, m.Impacts.intra_inter(2.0, 0.5, Kc), "cross_entropy", sigma=0.3)
        sol = simulate(sde, x0, ts, 0.02, seed=0)
        tr = Trajectory(ts, sol.states[:, 0], y)
        row = {}
        for band, nb, jobs in (("sandwich", 0, 1), ("parametric", args.boot, 2)):
            t0, c0 = time.perf_counter(), time.process_time()
            est = ShootingEstimator("cross_entropy", bootstrap=band, n_bootstrap=nb,
                                    n_jobs=jobs).fit(tr)
            row[band] = time.perf_counter() - t0
            row[f"{band}_cpu_main_process"] = time.process_time() - c0
            row["load_average_1min"] = os.getloadavg()[0]
            if nb:
                row["parametric_refits"] = nb
                row["parametric_seconds_per_refit"] = (row[band] - row["sandwich"]) / nb
            row[f"{band}_steps"] = f"{est.n_substeps_} {est.integrator_}"
            print(f"K = {Kc:2d}, T = 132, 100 per class: shooting fit with {band} band"
                  + (f" ({nb} refits over {jobs} processes)" if nb else "")
                  + f": {row[band]:.1f} s ({est.n_evals_} evaluations, "
                  f"{est.n_substeps_} {est.integrator_} steps)", flush=True)
            out[f"K={Kc}"] = row
            _save(out, args.out)                          # partial results survive a stop
    real = "figures/real/cifar10_resnet18_summary.npz"
    if os.path.exists(real):
        # the committed real log (ResNet-18 logits, K = 3, T = 132, 100 per class): stiff, and
        # its fit presses against the stiffness bound
        from lesde.fit import as_trajectory

        tr = as_trajectory(real)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est = ShootingEstimator("cross_entropy", bootstrap="sandwich").fit(tr)
        sec = time.perf_counter() - t0
        out["CIFAR-10 log, K=3"] = {
            "sandwich": sec, "sandwich_steps": f"{est.n_substeps_} {est.integrator_}",
            "n_evals": int(est.n_evals_), "stiffness_bound_active": bool(est.stiff_bound_active_),
            "identified": bool(est.identified_), "warnings": len(caught),
            "load_average_1min": os.getloadavg()[0]}
        print(f"committed CIFAR-10 log (K = 3, T = {tr.T}, {tr.N // tr.K} per class): shooting "
              f"fit with sandwich band: {sec:.1f} s ({est.n_evals_} evaluations, "
              f"{est.n_substeps_} {est.integrator_} steps, stiffness bound "
              f"{'active' if est.stiff_bound_active_ else 'inactive'})", flush=True)
        _save(out, args.out)
        if args.real_boot:
            # the default band on the stiff fit: every refit simulates the fitted SDE by
            # Euler-Maruyama at a step of 0.05 / rate and refits against the stiffness bound
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pb = ShootingEstimator("cross_entropy", bootstrap="parametric",
                                       n_bootstrap=args.real_boot, n_jobs=2).fit(tr)
            secb = time.perf_counter() - t0
            row = out["CIFAR-10 log, K=3"]
            row.update({"parametric": secb, "parametric_refits": args.real_boot,
                        "parametric_seconds_per_refit": (secb - sec) / args.real_boot,
                        "parametric_failed_refits": int(np.sum(~np.all(np.isfinite(
                            pb.bootstrap_theta_.reshape(args.real_boot, -1)), axis=1))),
                        "load_average_1min_parametric": os.getloadavg()[0]})
            print(f"  with the parametric band ({args.real_boot} refits over 2 processes): "
                  f"{secb:.1f} s, {row['parametric_seconds_per_refit']:.1f} s per refit",
                  flush=True)
            _save(out, args.out)
    return out


# ============================================================================================
# the gap alpha - beta: its band where alpha + (K-1) beta is flagged
# ============================================================================================
def gap_coverage(args) -> dict:
    """Coverage of the sandwich band of the gap alpha - beta (the quantity the fit reports as
    identified when it flags alpha + (K-1) beta) at a quarter, half and three quarters of the
    run, averaged over the three times; bias, spread and band width at half time. On the
    --cells cells (default: the cross-entropy cells where most fits are flagged), --replicates
    logs each, fixed seeds."""
    names = (args.cells.split(";") if args.cells else
             ["base", "coarse", "200 per class", "noise high"])
    cells = _cells()
    out = {}
    for name in names:
        c = cells[name]
        tq, truth = _targets(c)
        gap = truth["alpha"] - truth["beta"]
        logs = simulate_logs(c, args.replicates, 4242)
        idx = np.searchsorted(logs[0].ts, tq - 1e-9)
        hits, err, wid, flag = [], [], [], 0
        t0 = time.perf_counter()
        for tr in logs:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                est = _estimator(c, bootstrap="sandwich").fit(tr)
            flag += any("not identified" in str(x.message) for x in w)
            b = est.bands_["gap"][:, idx]
            hits.append(float(((b[0] <= gap) & (gap <= b[1])).mean()))
            err.append(float(est.gap_[idx][1] - gap[1]))
            wid.append(float(b[1, 1] - b[0, 1]))
        n = len(hits)
        out[name] = {"replicates": n, "flagged": flag, "coverage": float(np.mean(hits)),
                     "se_at_095": math.sqrt(0.95 * 0.05 / n), "bias": float(np.mean(err)),
                     "sd": float(np.std(err, ddof=1)), "median_width": float(np.median(wid)),
                     "seconds": time.perf_counter() - t0}
        r = out[name]
        print(f"{name}: {n} replicates, {flag} flagged; gap coverage {r['coverage']:.3f} (SE at "
              f"0.95 {r['se_at_095']:.3f}); bias {r['bias']:+.4f}, SD {r['sd']:.4f}, median band "
              f"width {r['median_width']:.4f} (2 x 1.96 SD = {3.92 * r['sd']:.4f})", flush=True)
        _save(out, args.out)
    return out


def shift_calibration(args) -> dict:
    """How the sandwich band of alpha and beta covers, without the widening of a flagged fit,
    against the fit's shift signal (``shift_signal_``, compared with
    ``ShootingEstimator.SHIFT_MIN``), on the --cells cells (default: four cross-entropy cells),
    --replicates logs each, fixed seeds; coverage averaged over a quarter, half and three
    quarters of the run."""
    names = (args.cells.split(";") if args.cells else
             ["base", "coarse", "noise high", "200 per class"])
    cells = _cells()
    saved = ShootingEstimator.SHIFT_MIN
    ShootingEstimator.SHIFT_MIN = 0.0
    rows = []
    try:
        for name in names:
            c = cells[name]
            tq, truth = _targets(c)
            logs = simulate_logs(c, args.replicates, 9191)
            idx = np.searchsorted(logs[0].ts, tq - 1e-9)
            for tr in logs:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    est = _estimator(c, bootstrap="sandwich").fit(tr)
                hit = [float(((est.bands_[k][0, idx] <= v) & (v <= est.bands_[k][1, idx])).mean())
                       for k, v in truth.items()]
                rows.append([float(est.shift_signal_)] + hit)
            print(f"{name}: {args.replicates} fits", flush=True)
    finally:
        ShootingEstimator.SHIFT_MIN = saved
    rows = np.array(rows)
    out = {"cells": names, "replicates_per_cell": args.replicates, "bins": []}
    for lo, hi in [(0, 0.05), (0.05, 0.1), (0.1, 0.15), (0.15, 0.25), (0.25, 1.0)]:
        m = (rows[:, 0] >= lo) & (rows[:, 0] < hi)
        if m.sum():
            b = {"shift_signal": [lo, hi], "fits": int(m.sum()),
                 "coverage_alpha": float(rows[m, 1].mean()),
                 "coverage_beta": float(rows[m, 2].mean())}
            out["bins"].append(b)
            print(f"shift signal [{lo}, {hi}): {b['fits']:3d} fits, unwidened sandwich coverage "
                  f"alpha {b['coverage_alpha']:.3f}, beta {b['coverage_beta']:.3f}", flush=True)
    _save(out, args.out)
    return out


# ============================================================================================
# the default knot count: would an information criterion have chosen the finer form?
# ============================================================================================
def knots_choice(args) -> dict:
    """On --replicates logs of the cell "L field x rise-then-decay" (seed 4242), fit 11 and 21
    knots and count how often AIC and BIC from the quasi-likelihood prefer 21: whether the
    form's bias at the peak (which 11 knots show in the coverage matrix) is visible in the
    log."""
    c = _cells()["L field x rise-then-decay"]
    logs = simulate_logs(c, args.replicates, seed=4242)
    crit = np.zeros((len(logs), 2, 2))
    for r, tr in enumerate(logs):
        for j, m_ in enumerate((11, 21)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est = ShootingEstimator("label_projection", knots=m_,
                                        bootstrap="sandwich").fit(tr)
            crit[r, j] = est.aic_, est.bic_
    out = {"replicates": len(logs),
           "aic_prefers_21": int((crit[:, 1, 0] < crit[:, 0, 0]).sum()),
           "bic_prefers_21": int((crit[:, 1, 1] < crit[:, 0, 1]).sum()),
           "median_aic_11_minus_21": float(np.median(crit[:, 0, 0] - crit[:, 1, 0]))}
    print(f"L field, rise-then-decay impacts, {len(logs)} logs: AIC prefers 21 knots to 11 on "
          f"{out['aic_prefers_21']}, BIC on {out['bic_prefers_21']} (median AIC(11) - AIC(21) "
          f"{out['median_aic_11_minus_21']:.1f})", flush=True)
    _save(out, args.out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", choices=("exact", "timing", "coverage", "table", "gap",
                                                "shift", "knots"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--replicates", type=int, default=120)
    parser.add_argument("--boot", type=int, default=200,
                        help="timing: parametric-bootstrap refits (default 200)")
    parser.add_argument("--kk", default="3,10",
                        help="timing: numbers of classes (3,10; empty: the real log only)")
    parser.add_argument("--real-boot", type=int, default=0,
                        help="timing: parametric-bootstrap refits on the committed CIFAR-10 "
                             "log (default 0: its sandwich fit only)")
    parser.add_argument("--chunk", type=int, default=None,
                        help="coverage: replicates added to every cell per pass (default: all)")
    parser.add_argument("--cells", default=None, help="semicolon-separated cell names")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.job == "table":
        print(coverage_table(args.out or "benchmarks/results_fit_coverage.json"))
        return
    if args.job == "exact":
        res = exactness_table()
    elif args.job == "timing":
        res = timing(args)
    elif args.job == "gap":
        res = gap_coverage(args)
    elif args.job == "shift":
        res = shift_calibration(args)
    elif args.job == "knots":
        res = knots_choice(args)
    else:
        res = coverage(args)
    if args.out and args.job not in ("coverage", "gap", "shift"):
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
