"""Tail index of the intra-class impact alpha against the label noise p_err on GeoMNIST.

Reads the fits that ``lesde fit`` wrote for the GeoMNIST runs (``figures/real/fit_geomnist_p*``)
and the runs' metrics (``figures/real/geomnist_p*_metrics.csv``), and writes

- ``geomnist_tail_index.csv``: per run, p_err, steps, the tail index r of alpha with its
  least-squares standard error from the I-estimator's A(t) (the paper's definition,
  A(t) ~ t^(1 - r), :func:`lesde.fit.tail_index` with ``kind="integral"``) and from the
  regression's cumulative A(t) (cross-entropy drift), the fitted A(T), B(T), and the final
  train / test loss and accuracy (test: clean labels);
- ``geomnist_tail_index.png``: r, the final losses and the final accuracies against p_err, with
  the values the paper reports (r about 0.68 at p_err = 0, about 1.0 at p_err 0.6-0.67).

The tail is the last half of the log-time range (``--tail``), as in ``lesde fit``.

Usage (from the repository root, after ``figures/real/geomnist.py`` and ``lesde fit``)::

    python figures/real/geomnist_tail_index.py [--tail 0.5]
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _read_csv(path: str) -> dict:
    with open(path) as fh:
        rows = list(csv.reader(fh))
    a = np.array(rows[1:], dtype=float)
    return {k: a[:, i] for i, k in enumerate(rows[0])}


def collect(tail: float) -> list:
    from lesde.fit import tail_index

    out = []
    for d in sorted(glob.glob(os.path.join(HERE, "fit_geomnist_p*"))):
        name = os.path.basename(d)[len("fit_"):]
        m = re.match(r"geomnist_p(\d{3})(?:_(\d+)steps)?$", name)
        if not m:
            continue
        p_err = int(m.group(1)) / 100.0
        p_err = 2.0 / 3.0 if m.group(1) == "067" else p_err
        with open(os.path.join(d, "summary.json")) as fh:
            summ = json.load(fh)
        i_est = _read_csv(os.path.join(d, "i_estimator.csv"))
        reg = _read_csv(os.path.join(d, "regression.csv"))
        row = {"run": name, "p_err": p_err}
        try:
            ti = tail_index(i_est["t"], i_est["A"], tail=tail)
            row.update(r_I=ti["r"], r_I_se=ti["r_se"], tail_t_min=ti["t_min"],
                       tail_t_max=ti["t_max"])
        except ValueError:
            row.update(r_I=np.nan, r_I_se=np.nan, tail_t_min=np.nan, tail_t_max=np.nan)
        A_reg = np.cumsum(reg["alpha"] * (reg["t_end"] - reg["t_start"]))
        try:
            tr = tail_index(reg["t_end"], A_reg, tail=tail)
            row.update(r_reg=tr["r"], r_reg_se=tr["r_se"])
        except ValueError:
            row.update(r_reg=np.nan, r_reg_se=np.nan)
        e = summ["estimators"]["i"]
        row.update(A_T_I=e["A_final"], B_T_I=e["B_final"], A_T_reg=float(A_reg[-1]),
                   B_T_reg=float(np.sum(reg["beta"] * (reg["t_end"] - reg["t_start"]))))
        met = _read_csv(os.path.join(HERE, f"{name}_metrics.csv"))
        row["steps"] = int(met["step"][-1])
        for k in ("train_loss", "train_acc", "test_loss", "test_acc"):
            row[f"final_{k}"] = float(met[k][-1])
        out.append(row)
    return out


def plot(rows: list, path: str) -> str:
    from lesde.figures import _plt, _save

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.2))
    groups = sorted({r["steps"] for r in rows})
    for g, steps in enumerate(groups):
        sel = sorted((r for r in rows if r["steps"] == steps), key=lambda r: r["p_err"])
        p = np.array([r["p_err"] for r in sel]) + 0.008 * g
        ls, mfc = ("-", None) if g == 0 else ("--", "none")
        tag = f"{steps:,} steps"
        ax = axes[0]
        ax.errorbar(p, [r["r_I"] for r in sel], yerr=[2 * r["r_I_se"] for r in sel], marker="o",
                    ls=ls, mfc=mfc, color="C0", capsize=3, label=f"I-estimator A(t), {tag}")
        ax.errorbar(p + 0.004, [r["r_reg"] for r in sel], yerr=[2 * r["r_reg_se"] for r in sel],
                    marker="s", ls=ls, mfc=mfc, color="C1", capsize=3,
                    label=f"regression A(t) (cross-entropy drift), {tag}")
        axes[1].plot(p, [r["final_test_loss"] for r in sel], marker="o", ls=ls, mfc=mfc,
                     color="C0", label=f"test loss (clean labels), {tag}")
        axes[1].plot(p, [r["final_train_loss"] for r in sel], marker="s", ls=ls, mfc=mfc,
                     color="C1", label=f"train loss (noisy labels), {tag}")
        axes[2].plot(p, [r["final_test_acc"] for r in sel], marker="o", ls=ls, mfc=mfc,
                     color="C0", label=f"test accuracy (clean labels), {tag}")
        axes[2].plot(p, [r["final_train_acc"] for r in sel], marker="s", ls=ls, mfc=mfc,
                     color="C1", label=f"train accuracy (noisy labels), {tag}")
    ax = axes[0]
    ax.plot([0.0, 0.6, 2 / 3], [0.68, 1.0, 1.0], "k*", ms=10, label="paper (reported)")
    ax.axhline(0, color="0.5", lw=0.6)
    ax.set_ylabel("tail index r of alpha  (A(t) ~ t^(1-r); bars: 2 s.e.)")
    axes[1].set_ylabel("cross-entropy at the last step")
    axes[2].set_ylabel("accuracy at the last step")
    axes[2].set_ylim(0, 1.02)
    for ax in axes:
        ax.set_xlabel("label noise p_err")
        ax.legend(fontsize=6.5)
    fig.suptitle("GeoMNIST, LeNet, SGD batch 1, lr 0.005: tail index of the intra-class impact "
                 "(last half of the log-time range) and final loss / accuracy against label noise",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tail", type=float, default=0.5)
    args = ap.parse_args(argv)
    rows = collect(args.tail)
    keys = ["run", "p_err", "steps", "r_I", "r_I_se", "r_reg", "r_reg_se", "tail_t_min",
            "tail_t_max", "A_T_I", "B_T_I", "A_T_reg", "B_T_reg", "final_train_loss",
            "final_train_acc", "final_test_loss", "final_test_acc"]
    with open(os.path.join(HERE, "geomnist_tail_index.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(keys)
        for r in rows:
            w.writerow([r[k] if isinstance(r[k], str) else f"{r[k]:.6g}" for k in keys])
    plot(rows, os.path.join(HERE, "geomnist_tail_index.png"))
    for r in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})


if __name__ == "__main__":
    main()
