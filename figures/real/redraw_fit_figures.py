"""Redraw the figures of every fit folder here (fit_<run>/fit.png, goodness_of_fit*.png) from
the files committed beside them, in the package's plotting style: no training, no fitting.

    python figures/real/redraw_fit_figures.py            # every fit_* folder, PNG only
    python figures/real/redraw_fit_figures.py --formats png,pdf,svg fit_cifar10_resnet18

Reads ``i_estimator.csv``, ``l_estimator.csv``, ``regression.csv`` (the estimators' results),
``measured_impacts.csv``, ``gof_<estimator>.npz`` and ``summary.json`` (the goodness-of-fit
numbers and which estimator is the primary one); the class names come from the run's summary
``<run>_summary.npz`` beside this script. `lesde fit` draws the same figures when it fits.
"""
import argparse
import glob
import json
import os

import numpy as np
import pandas as pd

from lesde.figures import plot_fit, plot_goodness_of_fit

HERE = os.path.dirname(os.path.abspath(__file__))
ESTIMATORS = (("i", "i_estimator.csv"), ("l", "l_estimator.csv"), ("regression", "regression.csv"),
              ("shooting", "shooting.csv"))


def redraw(folder: str, formats) -> list:
    run = os.path.basename(folder)[len("fit_"):]
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    fitted = {}
    for name, csv in ESTIMATORS:
        path = os.path.join(folder, csv)
        if name in summary.get("estimators", {}) and os.path.exists(path):
            fitted[name] = {k: v.to_numpy() for k, v in pd.read_csv(path).items()}
    measured = None
    if os.path.exists(os.path.join(folder, "measured_impacts.csv")):
        m = pd.read_csv(os.path.join(folder, "measured_impacts.csv"))
        measured = {"time": m["t"].to_numpy(), "alpha": m["alpha"].to_numpy(),
                    "beta": m["beta"].to_numpy()}
    run_summary = os.path.join(HERE, f"{run}_summary.npz")
    names = None
    if os.path.exists(run_summary):
        names = [str(c) for c in np.load(run_summary)["class_names"]]
    what, split = summary.get("what", "logits"), summary.get("split", "train")
    wrote = []
    if fitted:
        ts = np.asarray(fitted[next(iter(fitted))]["t"], dtype=float)
        wrote += [plot_fit(ts, fitted, measured, os.path.join(folder, "fit.png"), formats=formats,
                           title=f"{run}: {what} of the tracked {split} samples")]
    gofs = summary.get("goodness_of_fit", {})
    primary = next((n for n in ("shooting", "regression", "i", "l") if n in gofs), None)
    for name, numbers in gofs.items():
        npz = os.path.join(folder, f"gof_{name}.npz")
        if not os.path.exists(npz):
            continue
        gof = dict(np.load(npz))
        gof.update({k: np.asarray(v) for k, v in numbers.items() if k != "level"})
        png = "goodness_of_fit.png" if name == primary else f"goodness_of_fit_{name}.png"
        label = {"i": "I-estimator (identity drift)", "l": "L-estimator (label-projection drift)",
                 "regression": f"regression ({summary.get('field', 'cross_entropy')} drift)",
                 "shooting": "trajectory matching"}.get(name, name)
        wrote.append(plot_goodness_of_fit(gof, os.path.join(folder, png), class_names=names,
                                          formats=formats, title=f"{run}: {label}"))
    return wrote


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="*", help="fit folders (default: every fit_* here)")
    p.add_argument("--formats", default="png", help="comma list of formats (default png)")
    args = p.parse_args(argv)
    folders = [f if os.path.isdir(f) else os.path.join(HERE, f) for f in args.folders] or \
        sorted(os.path.dirname(p) for p in glob.glob(os.path.join(HERE, "fit_*", "summary.json")))
    formats = [f for f in args.formats.split(",") if f]
    for folder in folders:
        for path in redraw(folder, formats):
            print(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
