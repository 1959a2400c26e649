"""Metrics benchmark: time of one exact separability LP, and of the batched cheap proxies.

1. ``linear_separability`` per call (one HiGHS LP) at N = 150 (K = 3, p = 3) and N = 5,000
   (K = 10, p = 10), for Gaussian class clouds that are well separated (the LP finds a positive
   margin) and overlapping (margin 0), median of ``--repeats`` calls.
2. The per-time proxies and neural-collapse measures on a ``(T, B, N, p)`` array (default
   T = 50 recorded times, B = 8 runs, N = 150, K = p = 3), one call each for all T * B items.

    python benchmarks/bench_metrics.py [--threads 1] [--repeats 5] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from lesde import metrics as lm


def _clouds(n, k, p, gap, seed):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    X = rng.normal(size=(n, p)) + gap * np.eye(k, p)[y]
    return X, y


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch / BLAS threads (set OMP_NUM_THREADS too)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = platform.processor() or platform.machine()
    results = {"machine": machine, "threads": args.threads, "lp": [], "proxies": {}}

    for n, k, p in [(150, 3, 3), (5000, 10, 10)]:
        for label, gap in [("separated", 8.0), ("overlapping", 0.5)]:
            X, y = _clouds(n, k, p, gap, seed=n + k)
            t, res = _median_time(lambda: lm.linear_separability(X, y), args.repeats)
            row = {"N": n, "K": k, "p": p, "data": label, "seconds": t,
                   "separable": bool(res.separable), "margin": float(res.margin)}
            results["lp"].append(row)
            print(f"linear_separability N={n:5d} K={k:2d} p={p:2d} {label:11s}: {t * 1e3:9.1f} ms "
                  f"(separable={res.separable}, margin={res.margin:.3g})")

    T, B, n, k = 50, 8, 150, 3
    rng = np.random.default_rng(0)
    y = np.arange(n) % k
    X = rng.normal(size=(T, B, n, k)) + np.linspace(0, 4, T)[:, None, None, None] * np.eye(k)[y]
    calls = {
        "ncc_accuracy": lambda: lm.ncc_accuracy(X, y),
        "argmax_accuracy": lambda: lm.argmax_accuracy(X, y),
        "cross_entropy": lambda: lm.cross_entropy(X, y),
        "linear_probe_loss": lambda: lm.linear_probe_loss(X, y),
        "neural_collapse": lambda: lm.neural_collapse(X, y, W=np.eye(k), center_W=True),
    }
    for name, fn in calls.items():
        t, _ = _median_time(fn, args.repeats)
        results["proxies"][name] = t
        print(f"{name:18s} on (T, B, N, p) = {(T, B, n, k)}: {t * 1e3:8.1f} ms for {T * B} items")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
