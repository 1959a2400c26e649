"""First look at the paper-protocol runs: the numbers the paper's figures show, from the
committed summaries (``lesde reproduce ... --summary``), with the package's existing
estimators only -- the trajectory-matching fits come later.

For each protocol summary directory given (default: the GeoMNIST and CIFAR-10 ones beside
this file) and each setting in it, per trial and pooled over trials:

- validation accuracy and loss at the last logged step (mean, sd over trials, range);
- A(T), B(T) of the I-estimator (``lesde.fit.IEstimator``) on the tracked training logits, per
  trial, and on the class means averaged over the trials ("pooled", as the authors average
  their 100 trials before estimating);
- the peak of alpha = dA/dt (Savitzky-Golay, order 2, a window of about 500 iterations -- the
  authors smooth over 151 (GeoMNIST) and 551 (CIFAR-10) iterations of their per-iteration
  series -- at least 5 logged times; the half-window at either end left out) in units of one
  SGD iteration, and the iteration where it is reached;
- the tail index in the authors' definition (their ``estimate_tail_idx``: 1 - the mean over
  the last 1,000 iterations of log A(t) / log t, t in iterations, A replaced by -A when it is
  mostly negative there), for A and for B: the quantity of the paper's Fig. 4c.

Usage (from the repository root)::

    python figures/paper/first_look.py [DIR ...]

Writes ``first_look.csv`` and ``first_look.md`` beside this file.
"""
from __future__ import annotations

import csv
import glob
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = ("zhang2021-geomnist", "zhang2021-cifar10")


def paper_tail_index(values, iterations, tail_iterations: int = 1000) -> float:
    """The authors' tail index of A (or B) logged at ``iterations``: 1 - mean of
    log|A(t)| / log t over the last ``tail_iterations`` iterations (sign flipped when A is
    negative at more than half of those times)."""
    v = np.asarray(values, dtype=float)
    t = np.asarray(iterations, dtype=float)
    tail = t > t[-1] - tail_iterations
    if np.sum(v[tail] < 0) > tail.sum() / 2:
        v = -v
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.log(v[tail]) / np.log(t[tail])
    return float(1 - np.nanmean(r))


def alpha_peak(A, iterations, span: float = 500.0):
    from lesde.fit import smooth_derivative

    a = np.asarray(A, dtype=float)
    it = np.asarray(iterations, dtype=float)
    ok = np.isfinite(a)
    if ok.sum() < 5:
        return np.nan, np.nan
    # the window is a width in the units of the times (iterations here), not a point count
    d = smooth_derivative(it[ok], a[ok], window=span, order=2)
    inner = np.flatnonzero((it[ok] >= it[ok][0] + span / 2) & (it[ok] <= it[ok][-1] - span / 2))
    if inner.size == 0:
        return np.nan, np.nan
    i = inner[int(np.argmax(d[inner]))]
    return float(d[i]), float(it[ok][i])


def summarise(directory: str) -> list:
    rows = []
    for path in sorted(glob.glob(os.path.join(directory, "p*_summary.npz"))):
        setting = os.path.basename(path).split("_")[0]
        z = np.load(path)
        it = z["step"].astype(float)
        R = len(z["trials"])
        row = {"protocol": os.path.basename(os.path.normpath(directory)), "setting": setting,
               "trials": R, "iterations": int(it[-1])}
        for name in ("test_acc", "test_loss"):
            v = z[name][:, -1].astype(float)
            row.update({f"{name}_mean": v.mean(), f"{name}_sd": v.std(ddof=1) if R > 1 else np.nan,
                        f"{name}_min": v.min(), f"{name}_max": v.max()})
        for name in ("A", "B"):
            v = z[name][:, -1].astype(float)
            row.update({f"{name}_T_mean": np.nanmean(v),
                        f"{name}_T_sd": np.nanstd(v, ddof=1) if R > 1 else np.nan,
                        f"{name}_T_pooled": float(z[f"{name}_pooled"][-1])})
            tails = [paper_tail_index(a, it) for a in z[name]]
            row.update({f"tail_{name}_mean": np.nanmean(tails),
                        f"tail_{name}_sd": np.nanstd(tails, ddof=1) if R > 1 else np.nan,
                        f"tail_{name}_pooled": paper_tail_index(z[f"{name}_pooled"], it)})
        peaks = [alpha_peak(a, it) for a in z["A"]]
        row.update(alpha_peak_mean=np.nanmean([p[0] for p in peaks]),
                   alpha_peak_sd=np.nanstd([p[0] for p in peaks], ddof=1) if R > 1 else np.nan,
                   alpha_peak_iteration_median=np.nanmedian([p[1] for p in peaks]))
        pk, pit = alpha_peak(z["A_pooled"], it)
        row.update(alpha_peak_pooled=pk, alpha_peak_pooled_iteration=pit)
        rows.append(row)
    return rows


def _pm(m, s, d=3):
    return f"{m:.{d}f}" if not np.isfinite(s) else f"{m:.{d}f} +- {s:.{d}f}"


def main(argv=None) -> None:
    dirs = (argv if argv else sys.argv[1:]) or [os.path.join(HERE, d) for d in DEFAULT]
    rows = []
    for d in dirs:
        if os.path.isdir(d):
            rows += summarise(d)
    if not rows:
        raise SystemExit("no summaries found")
    keys = list(rows[0])
    with open(os.path.join(HERE, "first_look.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    lines = ["| protocol | setting | trials | validation accuracy (range) | validation loss | "
             "A(T) per trial | A(T) pooled | B(T) per trial | B(T) pooled | alpha peak per "
             "iteration, pooled (at iteration) | tail index of A (authors' formula), per trial "
             "/ pooled | of B |", "|---|---|---:|---|---|---|---:|---|---:|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['protocol']} | {r['setting']} | {r['trials']} | "
            f"{_pm(r['test_acc_mean'], r['test_acc_sd'])} ({r['test_acc_min']:.3f}-"
            f"{r['test_acc_max']:.3f}) | {_pm(r['test_loss_mean'], r['test_loss_sd'])} | "
            f"{_pm(r['A_T_mean'], r['A_T_sd'], 2)} | {r['A_T_pooled']:.2f} | "
            f"{_pm(r['B_T_mean'], r['B_T_sd'], 2)} | {r['B_T_pooled']:.2f} | "
            f"{r['alpha_peak_pooled']:.4f} ({r['alpha_peak_pooled_iteration']:.0f}) | "
            f"{_pm(r['tail_A_mean'], r['tail_A_sd'], 2)} / {r['tail_A_pooled']:.2f} | "
            f"{_pm(r['tail_B_mean'], r['tail_B_sd'], 2)} / {r['tail_B_pooled']:.2f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, "first_look.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
