"""The committed GeoMNIST run summaries as logs that ``lesde fit`` reads.

``figures/real/geomnist_p*_summary.npz`` hold, per logged step, the class means of the logits of
the 100 tracked train samples per class (not the per-sample logits). This writes each as an
``.npz`` log with ``features`` (T, K, K) = the class means, one "sample" per class
(``labels = 0..K-1``) and ``ts`` = lr-scaled time, so that the trajectory-matching fit runs on
them:

- with the identity drift (the I-model) a class-mean log is all the fit needs: the drift of a
  class mean depends on the class means only, so the fit is the I-model's exactly;
- with the cross-entropy drift the fit evaluates G at each class mean, softmax of the mean
  logit, where the model averages the softmax over the class's samples: a mean-field
  approximation, biased wherever the within-class spread of the logits is large (it grows to
  about 2 on these runs). Those numbers are labelled as such.

With one "sample" per class there is no within-class spread to estimate additive noise from, so
the fits use ``--noise none`` and the quasi-likelihood (sandwich) band.

Usage (from the repository root)::

    python figures/real/geomnist_means_log.py --out-dir runs
"""
from __future__ import annotations

import argparse
import glob
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default="runs")
    args = ap.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    for path in sorted(glob.glob(os.path.join(HERE, "geomnist_p*_summary.npz"))):
        name = os.path.basename(path)[: -len("_summary.npz")]
        with np.load(path, allow_pickle=False) as d:
            means = d["class_mean_logits_train"].astype(float)          # (T, K, K)
            ts = d["time"].astype(float)
        out = os.path.join(args.out_dir, f"{name}_means.npz")
        np.savez(out, features=means, labels=np.arange(means.shape[1]), ts=ts)
        print(f"wrote {out}: T = {ts.size}, t = {ts[0]:g}..{ts[-1]:g}")


if __name__ == "__main__":
    main()
