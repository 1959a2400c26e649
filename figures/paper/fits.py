"""Fits of the paper-protocol runs with the package's estimators: the trajectory-matching
``lesde.fit.ShootingEstimator`` (the default, with bands) and the I-estimator, the tail indices
of A and B against p_err (``lesde.fit.tail_index``: the paper's definition and the log-log
slope), and the held-out model table (``lesde.fit.compare_models``).

Reads the trajectory stores of ``lesde reproduce`` (default ``runs/<protocol>``) and writes
small files to ``figures/paper/fits/``:

- ``<protocol>_<setting>_shooting.csv`` / ``.json``: the shooting fit of all finished trials of
  the setting as trials of one fit (alpha, beta, A, B with their bands at the logged times, the
  scalar summary, tail indices, the wall time);
- ``<protocol>_<setting>_iestimator.json``: per trial, the I-estimator's A(T), B(T), alpha peak
  and tail indices (mean and sd over trials: the band over trials);
- ``<protocol>_<setting>_models.md`` / ``.json`` (with ``--models``): the held-out model table;
- ``tail_index.md``: both tail indices of A and B against p_err, from both estimators.

The shooting fit integrates the model over every logged interval of every trial; on a 2-core
machine that is the expensive part, so by default it uses the first ``--per-class`` tracked
training samples of each class and every ``--every``-th logged time (the class means it matches
are then means over fewer samples: the bands widen accordingly). The I-estimator uses all
tracked samples at every logged time.

Usage (from the repository root, one torch thread)::

    OMP_NUM_THREADS=1 python figures/paper/fits.py zhang2021-geomnist [--settings p000 ...]
        [--per-class 20] [--every 4] [--knots 11] [--bands sandwich|trials] [--models]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import sys
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def load_trials(run: str, setting: str, partial: bool = False):
    """The finished trial stores of a setting (with ``partial`` also unfinished ones, cut to the
    shortest) and their stacked Trajectory (all samples)."""
    from lesde.fit import as_trajectory
    from lesde.protocols import protocol_trials
    from lesde.tracking import load_store

    stores = [s for s in protocol_trials(run).get(setting, [])
              if partial or load_store(s).complete]
    if not stores:
        raise ValueError(f"{run}: no finished trial of {setting}")
    if partial:
        from lesde.fit import Trajectory

        trajs = [as_trajectory(s) for s in stores]
        T = min(t.T for t in trajs)
        if T < 2:
            raise ValueError(f"{run}: {setting} has fewer than 2 logged times")
        return stores, Trajectory(trajs[0].ts[:T], np.concatenate([t.features[:, :T] for t in trajs]),
                                  trajs[0].labels, num_classes=trajs[0].K)
    return stores, as_trajectory(stores)


def reduce(traj, per_class: int, every: int):
    """The first ``per_class`` tracked samples of each class at every ``every``-th time (the
    last logged time always kept)."""
    from lesde.fit import Trajectory

    lab = traj.labels
    sel = np.concatenate([np.flatnonzero(lab == c)[:per_class] for c in range(traj.K)])
    tsel = np.arange(0, traj.T, every)
    if tsel[-1] != traj.T - 1:
        tsel = np.append(tsel, traj.T - 1)
    return Trajectory(traj.ts[tsel], traj.features[:, tsel][:, :, sel], lab[sel],
                      num_classes=traj.K, class_weights=traj.class_weights)


def tails(ts, A, B, lr: float) -> dict:
    """Both tail indices of A and B: the paper's (t in iterations, counted from 1) and the
    log-log slope of the second half of the log-time range (of -A or -B where it is mostly
    negative in the second half of the log, as the paper's index negates a negative tail)."""
    from lesde.fit import tail_index

    out = {}
    for name, v in (("A", A), ("B", B)):
        v = np.asarray(v, dtype=float)
        half = v[len(v) // 2:]
        if np.sum(half < 0) > np.sum(np.isfinite(half)) / 2:
            v = -v                       # a negative B: its size, as the paper's index reads it
        for kind in ("paper", "integral"):
            kw = {"time_scale": 1.0 / lr, "time_offset": 1.0} if kind == "paper" else {}
            try:
                r = tail_index(ts, v, kind=kind, **kw)["r"]
            except ValueError:
                r = float("nan")
            out[f"tail_{name}_{'paper' if kind == 'paper' else 'slope'}"] = float(r)
    return out


def alpha_peak(ts, A, lr: float, span_iterations: float = 500.0):
    """Peak of alpha = dA/dt per SGD iteration (Savitzky-Golay derivative over about
    ``span_iterations``; the half-window at either end left out) and its iteration."""
    from lesde.fit import smooth_derivative

    it = np.asarray(ts, dtype=float) / lr
    a = np.asarray(A, dtype=float)
    ok = np.isfinite(a)
    if ok.sum() < 5:
        return float("nan"), float("nan")
    d = smooth_derivative(it[ok], a[ok], window=span_iterations, order=2)
    inner = np.flatnonzero((it[ok] >= it[ok][0] + span_iterations / 2)
                           & (it[ok] <= it[ok][-1] - span_iterations / 2))
    if inner.size == 0:
        return float("nan"), float("nan")
    i = inner[int(np.argmax(d[inner]))]
    return float(d[i]), float(it[ok][i])


class _Timeout(Exception):
    pass


def _alarm(seconds):
    def handler(signum, frame):
        raise _Timeout(f"stopped after {seconds} s")

    signal.signal(signal.SIGALRM, handler)
    signal.alarm(int(seconds))


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def fit_setting(run, setting, lr, args, dest) -> dict:
    from lesde.fit import IEstimator, ShootingEstimator, compare_models, smooth_derivative

    name = f"{os.path.basename(os.path.normpath(run))}_{setting}"
    stores, traj = load_trials(run, setting, args.partial)
    info = {"run": os.path.basename(os.path.normpath(run)), "setting": setting,
            "trials": traj.R, "last_iteration": float(traj.ts[-1] / lr), "tracked_per_class": int(np.bincount(traj.labels).min()),
            "logged_times": traj.T, "lr": lr}
    # the I-estimator, per trial (the band is the spread over trials) and on the class means
    # pooled over the trials (as the authors pool their 100 trials); coordinates combined as the
    # authors' code does (mean log |ratio|, "log_abs") and by the package's default projection
    per = []
    variants = {"": {"combine": "log_abs"}, "_projection": {"combine": "projection"}}
    pooled_traj = (traj.ts, traj.class_means().mean(axis=0), np.arange(traj.K))
    pooled = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(traj.R):
            row = {"trial": r}
            for tag, kw in variants.items():
                est = IEstimator(n_bootstrap=0, **kw).fit(traj.subset(trials=[r]))
                row[f"A_T{tag}"], row[f"B_T{tag}"] = float(est.A_[-1]), float(est.B_[-1])
                row[f"alpha_peak{tag}"], row[f"alpha_peak_iteration{tag}"] = alpha_peak(
                    traj.ts, est.A_, lr)
                row.update({k + tag: v for k, v in tails(traj.ts, est.A_, est.B_, lr).items()})
            per.append(row)
        for tag, kw in variants.items():
            est = IEstimator(n_bootstrap=0, **kw).fit(pooled_traj)
            pooled[f"A_T{tag}"], pooled[f"B_T{tag}"] = float(est.A_[-1]), float(est.B_[-1])
            pooled[f"alpha_peak{tag}"], pooled[f"alpha_peak_iteration{tag}"] = alpha_peak(
                traj.ts, est.A_, lr)
            it = traj.ts / lr
            late = it >= 5000
            if np.any(late):
                a_it = smooth_derivative(it, est.A_, window=500.0, order=2)
                pooled[f"alpha_mean_after_5000{tag}"] = float(np.nanmean(a_it[late]))
            pooled.update({k + tag: v for k, v in tails(traj.ts, est.A_, est.B_, lr).items()})
    agg = {}
    for k in per[0]:
        if k == "trial":
            continue
        v = np.array([p[k] for p in per], dtype=float)
        agg[k] = {"mean": float(np.nanmean(v)) if np.any(np.isfinite(v)) else float("nan"),
                  "sd": float(np.nanstd(v, ddof=1)) if np.sum(np.isfinite(v)) > 1 else float("nan"),
                  "min": float(np.nanmin(v)) if np.any(np.isfinite(v)) else float("nan"),
                  "max": float(np.nanmax(v)) if np.any(np.isfinite(v)) else float("nan"),
                  "n": int(np.sum(np.isfinite(v)))}
    # validation accuracy at the last logged step, per trial
    from lesde.tracking import load_store

    acc = np.array([float(load_store(s).metrics()["test_acc"][:traj.T][-1]) for s in stores])
    agg["val_acc"] = {"mean": float(acc.mean()), "sd": float(acc.std(ddof=1)) if len(acc) > 1
                      else float("nan"), "min": float(acc.min()), "max": float(acc.max()),
                      "n": int(len(acc))}
    with open(os.path.join(dest, f"{name}_iestimator.json"), "w") as f:
        json.dump({**info, "per_trial": per, "over_trials": agg, "pooled": pooled}, f, indent=1)
    out = {"info": info, "iestimator": agg}
    if args.skip_shooting:
        return out
    # the trajectory-matching fit, all trials as trials of one fit
    small = reduce(traj, args.per_class, args.every)
    sinfo = dict(info, shoot_per_class=args.per_class, shoot_every=args.every,
                 shoot_logged_times=small.T, knots=args.knots, bands=args.bands,
                 matrix=args.matrix,
                 n_bootstrap=args.n_bootstrap if args.bands != "sandwich" else 0)
    t0 = time.time()
    try:
        _alarm(args.timeout)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est = ShootingEstimator(matrix=args.matrix, knots=args.knots, bootstrap=args.bands,
                                    n_bootstrap=args.n_bootstrap if args.bands != "sandwich" else 0,
                                    max_iter=args.max_iter).fit(small)
        signal.alarm(0)
        sinfo["wall_seconds"] = time.time() - t0
        sinfo["warnings"] = sorted({str(w.message)[:200] for w in caught})
        sinfo["summary"] = est.summary()
        sinfo.update(tails(est.ts_, est.A_, est.B_, lr))
        sinfo["A_T"], sinfo["B_T"] = float(est.A_[-1]), float(est.B_[-1])
        for q in ("A", "B"):
            if q in est.bands_:
                sinfo[f"{q}_T_band"] = [float(x) for x in est.bands_[q][:, -1]]
        i = int(np.argmax(est.alpha_))
        sinfo["alpha_peak_per_iteration"] = float(est.alpha_[i] * lr)
        sinfo["alpha_peak_iteration"] = float(est.ts_[i] / lr)
        res = est.results()
        with open(os.path.join(dest, f"{name}_shooting.csv"), "w", newline="") as f:
            w = csv.writer(f)
            keys = list(res)
            w.writerow(keys)
            for j in range(len(res["t"])):
                w.writerow([f"{res[k][j]:.6g}" for k in keys])
        out["shooting"] = sinfo
    except Exception as e:                                    # noqa: BLE001 - reported
        signal.alarm(0)
        sinfo["error"] = f"{type(e).__name__}: {e}"
        sinfo["wall_seconds"] = time.time() - t0
        out["shooting"] = sinfo
    with open(os.path.join(dest, f"{name}_shooting.json"), "w") as f:
        json.dump(sinfo, f, indent=1, default=float)
    print(f"{name}: shooting {sinfo.get('error', 'ok')} in {sinfo['wall_seconds']:.0f} s",
          flush=True)
    if args.models:
        t0 = time.time()
        try:
            _alarm(args.timeout)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mc = compare_models(small, n_paths=50, estimator_kwargs={
                    "knots": args.knots, "max_iter": args.max_iter, "matrix": args.matrix})
            signal.alarm(0)
            text = (f"Held-out model table, {name}: fitted to t <= {mc.t_split:.3g} "
                    f"({mc.n_fit} logged times), predicted over the remaining {mc.n_held_out}; "
                    f"{small.R} trials, {args.per_class} tracked samples per class; "
                    f"{time.time() - t0:.0f} s.\n\n" + mc.table() + "\n")
            with open(os.path.join(dest, f"{name}_models.md"), "w") as f:
                f.write(text)
            with open(os.path.join(dest, f"{name}_models.json"), "w") as f:
                json.dump({"t_split": mc.t_split, "rows": mc.rows}, f, indent=1, default=float)
            print(text, flush=True)
        except Exception as e:                                # noqa: BLE001 - reported
            signal.alarm(0)
            print(f"{name}: model table failed: {type(e).__name__}: {e}", flush=True)
    return out


def tail_table(dest: str) -> str:
    """Markdown table of both tail indices against the setting, from the JSON files in dest."""
    import glob

    lines = ["| run | setting | trials | estimator | tail A (paper) | tail B (paper) | "
             "tail A (slope) | tail B (slope) |", "|---|---|---:|---|---|---|---|---|"]
    for path in sorted(glob.glob(os.path.join(dest, "*_iestimator.json"))):
        with open(path) as f:
            d = json.load(f)
        o = d["over_trials"]

        def pm(k):
            m, s = o[k]["mean"], o[k]["sd"]
            return "-" if not np.isfinite(m) else (f"{m:.2f}" if not np.isfinite(s)
                                                   else f"{m:.2f} +- {s:.2f}")

        lines.append(f"| {d['run']} | {d['setting']} | {d['trials']} | I-estimator per trial "
                     f"(mean +- sd) | {pm('tail_A_paper')} | {pm('tail_B_paper')} | "
                     f"{pm('tail_A_slope')} | {pm('tail_B_slope')} |")
        spath = path.replace("_iestimator.json", "_shooting.json")
        if os.path.exists(spath):
            with open(spath) as f:
                s = json.load(f)
            if "error" not in s:
                lines.append(f"| {d['run']} | {d['setting']} | {s['trials']} | shooting, trials "
                             f"pooled | {s['tail_A_paper']:.2f} | {s['tail_B_paper']:.2f} | "
                             f"{s['tail_A_slope']:.2f} | {s['tail_B_slope']:.2f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(dest, "tail_index.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("protocol", nargs="?", default="zhang2021-geomnist")
    ap.add_argument("--run", help="run directory (default runs/<protocol>)")
    ap.add_argument("--settings", nargs="*", help="settings (default: all in the run)")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--knots", type=int, default=11)
    ap.add_argument("--matrix", default="intra_inter", choices=("intra_inter", "full"),
                    help="E's form: alpha, beta or all K x K entries")
    ap.add_argument("--bands", default="sandwich", choices=("sandwich", "trials", "parametric"))
    ap.add_argument("--n-bootstrap", type=int, default=50)
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per fit")
    ap.add_argument("--models", action="store_true", help="also the held-out model table")
    ap.add_argument("--out", default=os.path.join(HERE, "fits"))
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--skip-shooting", action="store_true",
                    help="only the I-estimator files (keeps the shooting files there)")
    ap.add_argument("--partial", action="store_true",
                    help="also fit unfinished trials (cut to the shortest logged one)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    if not args.table_only:
        from lesde.protocols import load_protocol, protocol_trials

        run = args.run or os.path.join("runs", args.protocol)
        lr = load_protocol(run).config.lr
        for setting in args.settings or sorted(protocol_trials(run)):
            fit_setting(run, setting, lr, args, args.out)
    print(tail_table(args.out))


if __name__ == "__main__":
    sys.exit(main())
