"""Redraw summary.png of every protocol summary folder here from the files committed in it
(``<setting>_summary.npz`` and ``protocol.json``), in the package's plotting style: no
training.

    python figures/paper/redraw_summary_figures.py                   # every folder, PNG only
    python figures/paper/redraw_summary_figures.py --formats png,pdf zhang2021-geomnist

`lesde reproduce ... --summary-only --summary DIR` draws the same figure when it summarises a
run directory.
"""
import argparse
import glob
import json
import os

import numpy as np

from lesde.figures import plot_protocol_summary

HERE = os.path.dirname(os.path.abspath(__file__))


def redraw(folder: str, formats) -> str:
    with open(os.path.join(folder, "protocol.json")) as f:
        proto = json.load(f)
    summary = {}
    for npz in sorted(glob.glob(os.path.join(folder, "p*_summary.npz"))):
        setting = os.path.basename(npz)[:-len("_summary.npz")]
        summary[setting] = dict(np.load(npz))
    name = proto.get("name") or os.path.basename(os.path.normpath(folder))
    return plot_protocol_summary(summary, os.path.join(folder, "summary.png"), title=name,
                                 lr=proto["config"]["lr"], formats=formats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="*", help="summary folders (default: every one here)")
    p.add_argument("--formats", default="png", help="comma list of formats (default png)")
    args = p.parse_args(argv)
    folders = [f if os.path.isdir(f) else os.path.join(HERE, f) for f in args.folders] or sorted(
        os.path.dirname(p) for p in glob.glob(os.path.join(HERE, "*", "protocol.json")))
    for folder in folders:
        print(f"wrote {os.path.relpath(redraw(folder, [f for f in args.formats.split(',') if f]))}")


if __name__ == "__main__":
    main()
