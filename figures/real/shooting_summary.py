"""The numbers the README quotes from the committed trajectory-matching fits of the real runs
(``figures/real/shooting/*/``), read from their ``summary.json`` and ``shooting.csv``; nothing is
refitted.

    python figures/real/shooting_summary.py

Per fit: whether E is identified (condition number of the scaled Hessian), the gap
alpha - beta at the knots with the knots where its 95% band excludes 0, the share of logged
times where it does, alpha + 2 beta at the knots, and A(T), B(T).
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pandas as pd

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shooting")


def summarise(folder: str) -> dict:
    with open(os.path.join(folder, "summary.json")) as fh:
        est = json.load(fh)["estimators"]["shooting"]
    tab = pd.read_csv(os.path.join(folder, "shooting.csv"))
    knots = np.asarray(est["form"].get("knots") or [tab["t"].iloc[0]])
    at = [int(np.argmin(np.abs(tab["t"].to_numpy() - k))) for k in knots]
    excl = (tab["gap_lo"] > 0) | (tab["gap_hi"] < 0)
    k = tab.iloc[at]
    return {"fit": os.path.basename(folder), "knots": len(knots),
            "condition": est["condition"], "identified": est["identified"],
            "gap_at_knots": dict(zip(k["t"].round(2), k["gap"].round(3))),
            "gap_band_excludes_0_at_knots": [float(t) for t, e in zip(k["t"], excl.iloc[at])
                                             if e],
            "gap_band_excludes_0_share": float(excl.mean()),
            "gap_positive_at_knots": int((k["gap"] > 0).sum()),
            "alpha_plus_2beta_at_knots": (k["alpha"] + 2 * k["beta"]).round(2).tolist(),
            "alpha_beta_band_half_width_median": float(np.median(
                (tab["alpha_hi"] - tab["alpha_lo"]) / 2)),
            "A_T": float(tab["A"].iloc[-1]), "B_T": float(tab["B"].iloc[-1])}


def main() -> None:
    for folder in sorted(glob.glob(os.path.join(HERE, "*"))):
        if os.path.exists(os.path.join(folder, "summary.json")):
            s = summarise(folder)
            print(f"== {s.pop('fit')}")
            for key, val in s.items():
                print(f"  {key}: {val}")


if __name__ == "__main__":
    main()
