"""Collect the ``lesde reconcile`` outputs beside this file into one table.

Reads ``reconcile/*.json`` and ``reconcile/*.csv`` (written by ``lesde reconcile``), rebuilds
each comparison (``lesde.reconcile.IntervalComparison.from_rows``) and writes
``reconcile/table.md`` (and refreshes each state's ``.md`` and the ``decomposition`` of its
``.json`` with the current formula): for every state, SGD variant, interval and quantity (alpha and the
contrast alpha - beta) the measured impact, the first-order drift (probe set / whole training
set), the kernel flow, the class-pair LE-SDE with the measured E, real SGD with its 95% band,
and the factors of the gap: form x time scale x rest (see ``lesde.reconcile``).

Usage (from the repository root)::

    python figures/paper/reconcile_table.py
"""
from __future__ import annotations

import csv
import glob
import json
import os

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reconcile")


def main() -> None:
    from lesde.reconcile import IntervalComparison

    lines = ["| state | SGD | steps (t) | quantity | measured | first-order drift: probe / whole "
             "set | kernel flow | class-pair LE-SDE | SGD [95%] | gap measured / SGD [95%] | "
             "form | time scale | rest [95%] |",
             "|---|---|---|---|---:|---|---:|---:|---|---|---:|---:|---|"]
    for path in sorted(glob.glob(os.path.join(HERE, "*.json"))):
        meta = json.load(open(path))
        rows = list(csv.DictReader(open(path[:-5] + ".csv")))
        res = IntervalComparison.from_rows(rows, lr=meta["lr"], alpha_hat=meta["alpha_hat"],
                                           beta_hat=meta["beta_hat"], E_hat=meta["E_hat"])
        state = f"{meta['run']} {meta['setting']} trial {meta['trial']} step {meta['step']}"
        first = len(lines)
        decs = []
        for variant in res.sgd_bands:
            for n in res.steps:
                for q in ("alpha", "contrast"):
                    d = res.decomposition(int(n), variant, q)
                    decs.append(d)
                    lines.append(
                        f"| {state} | {variant} | {d['steps']} ({d['t']:g}) | "
                        f"{'alpha' if q == 'alpha' else 'alpha - beta'} | {d['measured']:.4g} | "
                        f"{d['kernel@0']:.4g} / {d['full_set@0']:.4g} | {d['kernel_flow']:.4g} | "
                        f"{d['class_pair_flow']:.4g} | {d['sgd']:.4g} [{d['sgd_lo']:.3g}, "
                        f"{d['sgd_hi']:.3g}] | {d['total']:.3g} [{d['total_band'][0]:.3g}, "
                        f"{d['total_band'][1]:.3g}] | {d['form']:.3g} | {d['time_scale']:.3g} | "
                        f"{d['rest']:.3g} [{d['rest_band'][0]:.3g}, {d['rest_band'][1]:.3g}] |")
        meta["decomposition"] = decs
        with open(path, "w") as f:
            json.dump(meta, f, indent=1)
        with open(path[:-5] + ".md", "w") as f:
            f.write(f"state: {state}; alpha_hat {meta['alpha_hat']:.4g}, beta_hat "
                    f"{meta['beta_hat']:.4g}\n\n" + "\n".join(lines[:2] + lines[first:]) + "\n")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, "table.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
