"""Redraw every committed figure of figures/elasticity from the tables committed beside it, in
the package's plotting style: no data, no network, no training and no measurement.

    python figures/elasticity/redraw.py                      # into lesde_figures/elasticity/
    python figures/elasticity/redraw.py --out DIR            # into DIR (same sub-folders)
    python figures/elasticity/redraw.py --in-place           # replace the committed figures
    python figures/elasticity/redraw.py --formats png clustering elephant/torus

What each figure is drawn from (the commands that made the tables are in COMMANDS.md):

- ``*/clustering.png`` from ``clustering_summary.csv`` (``plot_clustering_summary``; the same
  as ``lesde elasticity --out FOLDER cluster --replot``);
- ``elephant/torus/torus_locality.png`` from the per-seed bin means (``bin0`` ...) of
  ``torus_locality.csv`` (``plot_torus_profiles``, six equal bins over [0, pi]);
- ``elephant/track_*/tracking.png`` from the runs' ``run*_tracking.csv`` and
  ``tracking_curves_run0.png`` from ``run0_tracking.csv`` (``plot_tracking_statistics``,
  ``plot_elasticity_tracking``; the class names from ``tracking_summary.json``);
- ``dan_repro*/dan_comparison.png`` from ``dan_comparison.csv`` (``plot_dan_comparison``).
"""
import argparse
import glob
import json
import os
import re

import numpy as np
import pandas as pd

from lesde.figures import (plot_clustering_summary, plot_dan_comparison, plot_elasticity_tracking,
                           plot_torus_profiles, plot_tracking_statistics)

HERE = os.path.dirname(os.path.abspath(__file__))


def _folders(root: str, name: str) -> list:
    """Sub-folders of ``root`` (relative paths) holding a file ``name``."""
    found = glob.glob(os.path.join(root, "**", name), recursive=True)
    return sorted(os.path.relpath(os.path.dirname(p), root) for p in found)


def redraw_clustering(src: str, dst: str, formats) -> str:
    table = pd.read_csv(os.path.join(src, "clustering_summary.csv"), keep_default_na=False,
                        na_values=[""])
    return plot_clustering_summary(table, os.path.join(dst, "clustering.png"), formats=formats)


def redraw_torus(src: str, dst: str, formats) -> str:
    table = pd.read_csv(os.path.join(src, "torus_locality.csv"))
    bins = sorted((c for c in table.columns if re.fullmatch(r"bin\d+", c)), key=lambda c: int(c[3:]))
    profiles = {}
    for row in table.itertuples(index=False):
        r = row._asdict()
        profiles.setdefault((r["network"], int(r["steps"])), []).append(
            np.array([r[b] for b in bins], dtype=float))
    edges = np.linspace(0.0, np.pi, len(bins) + 1)  # lesde.elasticity.locality_profile's bins
    return plot_torus_profiles(profiles, edges, os.path.join(dst, "torus_locality.png"),
                               formats=formats)


def redraw_tracking(src: str, dst: str, formats) -> list:
    with open(os.path.join(src, "tracking_summary.json")) as f:
        classes = [str(c) for c in json.load(f)["protocol"]["classes"]]
    paths = sorted(glob.glob(os.path.join(src, "run*_tracking.csv")),
                   key=lambda p: int(re.search(r"run(\d+)_", os.path.basename(p)).group(1)))
    frames = [pd.read_csv(p) for p in paths]
    return [plot_tracking_statistics(frames, classes, os.path.join(dst, "tracking.png"),
                                     formats=formats),
            plot_elasticity_tracking(frames[0], classes, os.path.join(dst, "tracking_curves_run0.png"),
                                     formats=formats)]


def redraw_comparison(src: str, dst: str, formats) -> str:
    table = pd.read_csv(os.path.join(src, "dan_comparison.csv"), keep_default_na=False,
                        na_values=[""])
    return plot_dan_comparison(table, os.path.join(dst, "dan_comparison.png"), formats=formats)


JOBS = (("clustering_summary.csv", redraw_clustering), ("torus_locality.csv", redraw_torus),
        ("tracking_summary.json", redraw_tracking), ("dan_comparison.csv", redraw_comparison))


def redraw(root: str, out: str, formats, only=None) -> list:
    """Redraw every figure under ``root`` into the same sub-folders of ``out``; ``only``: the
    sub-folders to redraw (default all). Returns the paths written (the first format of each)."""
    wrote = []
    for name, job in JOBS:
        for folder in _folders(root, name):
            if only and not any(folder == o or folder.startswith(o.rstrip("/") + "/") for o in only):
                continue
            dst = os.path.join(out, folder)
            os.makedirs(dst, exist_ok=True)
            got = job(os.path.join(root, folder), dst, formats)
            wrote += got if isinstance(got, list) else [got]
    return wrote


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="*", help="sub-folders to redraw, e.g. clustering elephant/torus "
                   "(default: every one)")
    p.add_argument("--out", default=os.path.join("lesde_figures", "elasticity"),
                   help="output folder (default: lesde_figures/elasticity)")
    p.add_argument("--in-place", action="store_true",
                   help="write beside the tables here, replacing the committed figures")
    p.add_argument("--formats", default="png,pdf,svg", help="comma list of formats (default png,pdf,svg)")
    args = p.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    out = HERE if args.in_place else args.out
    wrote = redraw(HERE, out, formats, only=args.folders)
    if not wrote:
        raise SystemExit(f"nothing to redraw for {args.folders}")
    for path in wrote:
        stem = os.path.splitext(path)[0]
        print("wrote " + ", ".join(os.path.relpath(f"{stem}.{f}") for f in formats))


if __name__ == "__main__":
    main()
