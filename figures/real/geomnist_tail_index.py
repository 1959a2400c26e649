"""Both tail indices of the intra-class impact against the label noise p_err on GeoMNIST.

Reads the committed run summaries (``figures/real/geomnist_p*_summary.npz``: the class means of
the logits of the tracked train samples at every logged step, and the runs' metrics), computes
A(t), B(t) with the I-estimator (the authors' way of combining coordinates, the mean of
log|ratio| over classes and coordinates, ``combine="log_abs"``, and the package's default,
``combine="projection"``), and from them

- the paper's tail index (Zhang, Wang & Su 2021, Fig. 4c; ``estimate_tail_idx`` in their code):
  ``r = 1 - mean over the last 1,000 SGD iterations of log A(t) / log t``, t in iterations
  counted from 1 (t = step + 1; A negated first if mostly negative in that tail);
- the log-log slope: ``r = 1 - d log A / d log t`` over the last half of the log-time range.

The paper's index depends on the time unit (A is unit-free, log t is not): the CSV also gives it
with t in lr-scaled time (t = step x lr). Writes ``geomnist_tail_index.csv`` and
``geomnist_tail_index.png``. The class means allow nothing else: the cross-entropy fits need the
per-sample logits, which these summaries do not hold.

Usage (from the repository root)::

    python figures/real/geomnist_tail_index.py
    python figures/real/geomnist_tail_index.py --figure-only   # redraw from the committed CSV
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import re
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
LR = 0.005          # the runs' learning rate (figures/real/geomnist_config.json)
PAPER = {0.0: 0.68, 0.3: 0.73, 2.0 / 3.0: 1.01}     # Fig. 4c, as reported


def collect(tail_iterations: float, tail_fraction: float) -> list:
    from lesde.fit import IEstimator, Trajectory, tail_index

    out = []
    for path in sorted(glob.glob(os.path.join(HERE, "geomnist_p*_summary.npz"))):
        name = os.path.basename(path)[: -len("_summary.npz")]
        mt = re.match(r"geomnist_p(\d{3})(?:_(\d+)steps)?$", name)
        if not mt:
            continue
        p_err = 2.0 / 3.0 if mt.group(1) == "067" else int(mt.group(1)) / 100.0
        with np.load(path, allow_pickle=False) as d:
            means = d["class_mean_logits_train"].astype(float)       # (T, K, K)
            ts, step = d["time"], d["step"]
            final = {k: float(d[k][-1]) for k in ("train_loss", "train_acc", "test_loss",
                                                  "test_acc")}
        traj = Trajectory(ts, means, np.arange(means.shape[1]))
        row = {"run": name, "p_err": p_err, "steps": int(step[-1]), **final}
        for combine in ("log_abs", "projection"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                est = IEstimator(combine=combine, n_bootstrap=0).fit(traj)
            tag = "authors" if combine == "log_abs" else "projection"
            row[f"A_T_{tag}"], row[f"B_T_{tag}"] = float(est.A_[-1]), float(est.B_[-1])
            for which, v in (("A", est.A_), ("B", est.B_)):
                row[f"r_paper_{which}_{tag}"] = tail_index(
                    ts, v, tail=tail_iterations, kind="paper", time_scale=1.0 / LR,
                    time_offset=1.0)["r"]
            row[f"r_paper_lrtime_A_{tag}"] = tail_index(ts, est.A_, tail=tail_iterations * LR,
                                                        kind="paper")["r"]
            try:
                sl = tail_index(ts, est.A_, tail=tail_fraction, kind="integral")
                row[f"r_slope_A_{tag}"], row[f"r_slope_A_se_{tag}"] = sl["r"], sl["r_se"]
            except ValueError:
                row[f"r_slope_A_{tag}"] = row[f"r_slope_A_se_{tag}"] = float("nan")
        out.append(row)
    return out


#: a run whose test accuracy stays below this has not learned (chance is 1/3): its A(t) is noise
#: about 0 and its tail index is not meaningful (figures/real/fit_results.md); drawn hollow
LEARNED = 0.5


def plot(rows: list, path: str, formats=("png", "pdf", "svg")) -> str:
    """Both tail indices against p_err in the package's style; runs that did not learn are
    drawn hollow and grey and are not joined to the others."""
    from matplotlib.lines import Line2D

    from lesde.plotting import color, legend_outside, new_figure, save_figure, style

    with style():
        fig = new_figure(7.2, 3.3)
        axes = fig.subplots(1, 2)
        handles = []
        for g, steps in enumerate(sorted({int(r["steps"]) for r in rows})):
            sel = sorted((r for r in rows if int(r["steps"]) == steps), key=lambda r: r["p_err"])
            ls = "-" if g == 0 else "--"
            mk = ("o", "s")[g]
            tag = f"{steps:,} steps"
            for ax, key, c, err in ((axes[0], "r_paper_A_authors", color(0), None),
                                    (axes[0], "r_paper_B_authors", color(1), None),
                                    (axes[1], "r_slope_A_authors", color(2), "r_slope_A_se_authors")):
                ok = [r for r in sel if r["test_acc"] >= LEARNED]
                bad = [r for r in sel if r["test_acc"] < LEARNED]
                for part, fill in ((ok, c), (bad, "none")):
                    if not part:
                        continue
                    x = np.array([r["p_err"] for r in part]) + 0.008 * g
                    y = [r[key] for r in part]
                    yerr = [2 * r[err] for r in part] if err else None
                    ax.errorbar(x, y, yerr=yerr, marker=mk, ms=4.5, ls=ls if fill != "none" else "none",
                                color=c if fill != "none" else "0.55", mfc=fill,
                                mec=c if fill != "none" else "0.55", lw=1.2, capsize=2)
            handles.append(Line2D([], [], color="0.3", ls=ls, marker=mk, ms=4.5, label=tag))
        pe = sorted(PAPER)
        axes[0].plot(pe, [PAPER[k] for k in pe], "k*", ms=9)
        handles += [Line2D([], [], color=color(0), lw=1.2, label=r"paper's definition on $A$ ($\alpha$)"),
                    Line2D([], [], color=color(1), lw=1.2, label=r"paper's definition on $B$ ($\beta$)"),
                    Line2D([], [], color=color(2), lw=1.2, label=r"log-log slope of $A(t)$ ($\pm 2$ SE)"),
                    Line2D([], [], color="k", marker="*", ms=9, ls="none", label="paper, Fig. 4c (reported)"),
                    Line2D([], [], color="0.55", marker="o", mfc="none", ms=4.5, ls="none",
                           label=f"network did not learn (test accuracy < {LEARNED}): not meaningful")]
        axes[0].set_ylabel(r"$r = 1 - \langle \log A(t) / \log t \rangle$" "\n(last 1,000 iterations, "
                           r"$t$ in iterations)")
        axes[1].set_ylabel(r"$r = 1 - d \log A / d \log t$" "\n(last half of the log-time range)")
        axes[0].set_title("the paper's tail index")
        axes[1].set_title("log-log slope")
        for ax in axes:
            ax.axhline(1.0, color="0.5", lw=0.6, ls=":")
            ax.set_xlabel(r"label noise $p_{err}$")
        legend_outside(fig, handles, where="bottom", ncol=3)
        fig.suptitle("GeoMNIST, LeNet, SGD batch 1, lr 0.005: tail index of the intra-class impact\n"
                     "(I-estimator $A(t)$, the authors' combination of coordinates)")
        return save_figure(fig, path, formats)[0]


def read_rows(path: str) -> list:
    """The rows of a committed ``geomnist_tail_index.csv`` (numbers as floats)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: (v if k == "run" else float(v)) for k, v in r.items()} for r in rows]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tail-iterations", type=float, default=1000.0)
    ap.add_argument("--tail", type=float, default=0.5)
    ap.add_argument("--figure-only", action="store_true",
                    help="redraw geomnist_tail_index.png from the committed CSV (nothing recomputed)")
    args = ap.parse_args(argv)
    if args.figure_only:
        path = plot(read_rows(os.path.join(HERE, "geomnist_tail_index.csv")),
                    os.path.join(HERE, "geomnist_tail_index.png"))
        print(f"wrote {os.path.relpath(path)} (and the .pdf, .svg beside it)")
        return
    rows = collect(args.tail_iterations, args.tail)
    keys = list(rows[0])
    with open(os.path.join(HERE, "geomnist_tail_index.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(keys)
        for r in rows:
            w.writerow([r[k] if isinstance(r[k], str) else f"{r[k]:.6g}" for k in keys])
    plot(rows, os.path.join(HERE, "geomnist_tail_index.png"))
    for r in rows:
        print(f"{r['run']:28s} A(T) {r['A_T_authors']:6.2f}  r_paper {r['r_paper_A_authors']:.3f}"
              f" (beta {r['r_paper_B_authors']:.3f}; lr-scaled time {r['r_paper_lrtime_A_authors']:.3f})"
              f"  r_slope {r['r_slope_A_authors']:.3f} +- {r['r_slope_A_se_authors']:.3f}")


if __name__ == "__main__":
    main()
