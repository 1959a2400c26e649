"""Phase-sweep benchmark: one batched pass over a 21 x 21 (alpha, beta) grid against a loop of
single-run torchsde calls, and the cost of the exact LP separability test.

    python benchmarks/bench_phase.py [--threads 1] [--loop-points 3] [--json out.json]

Model: cross-entropy drift on logits, SGD sampling noise (lr = 1), K = 3, n = 50 (N = 150),
p = 3, X(0) ~ N(0, 0.25), dt = 0.5, 2,000 steps (T = 1,000), 8 replicates per grid point
(B = 21 * 21 * 8 = 3,528 runs in one batch). The loop times ``--loop-points`` single runs with
the torchsde backend (Euler, its BrownianInterval; SGD noise there is "general" noise with an
N p x N diffusion matrix) and with the native backend, and extrapolates to the 3,528 runs.
The LP (scipy HiGHS, :func:`lesde.metrics.linear_separability`) is timed on three Gaussian
classes in p = 3, overlapping (not separable) and well apart (separable), at N = 150 and 5,000.
Wall-clock times on a shared machine: compare numbers from the same run only.
"""
import argparse
import json
import time

import numpy as np
import torch

from lesde import metrics
from lesde.model import LESDE, Impacts
from lesde.solvers import initial_state, simulate


def _sde(alpha, beta, K, n):
    y = np.repeat(np.arange(K), n)
    return LESDE(y, Impacts.intra_inter(alpha, beta, K), "cross_entropy", noise="sgd", lr=1.0)


def bench_batched(K=3, n=50, grid=21, reps=8, steps=2000, dt=0.5):
    a, b = np.meshgrid(np.linspace(0.05, 1.0, grid), np.linspace(0.05, 1.0, grid), indexing="ij")
    alpha = np.repeat(a.ravel(), reps)
    beta = np.repeat(b.ravel(), reps)
    sde = _sde(alpha, beta, K, n)
    x0 = initial_state(alpha.size, K * n, K, std=0.5, seed=1)
    t = time.perf_counter()
    sol = simulate(sde, x0, [0.0, steps * dt], dt, seed=2, record="summary")
    wall = time.perf_counter() - t
    return {"runs": int(alpha.size), "steps": steps, "seconds": wall,
            "ms_per_step": 1e3 * wall / steps, "us_per_run_step": 1e6 * wall / steps / alpha.size,
            "finite": bool(np.isfinite(sol.class_means[-1]).all())}


def bench_loop(backend, points, total_runs, K=3, n=50, steps=2000, dt=0.5):
    rng = np.random.default_rng(0)
    times = []
    for i in range(points):
        sde = _sde(float(rng.uniform(0.05, 1)), float(rng.uniform(0.05, 1)), K, n)
        x0 = initial_state(1, K * n, K, std=0.5, seed=10 + i)
        t = time.perf_counter()
        simulate(sde, x0, [0.0, steps * dt], dt, backend=backend, seed=20 + i, record="summary")
        times.append(time.perf_counter() - t)
    per_run = float(np.median(times))
    return {"backend": backend, "timed_runs": points, "steps": steps, "seconds_per_run": per_run,
            "extrapolated_seconds": per_run * total_runs}


def bench_lp(N, K=3, p=3, repeat=5):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(K), N // K)
    centres = np.eye(K, p) * 6.0
    out = {}
    for name, spread in (("not_separable", 3.0), ("separable", 0.5)):
        X = centres[y] + spread * rng.standard_normal((y.size, p))
        ts = []
        for _ in range(repeat):
            t = time.perf_counter()
            res = metrics.linear_separability(X, y)
            ts.append(time.perf_counter() - t)
        out[name] = {"ms_per_call": 1e3 * float(np.median(ts)), "separable": bool(res.separable)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--loop-points", type=int, default=3)
    ap.add_argument("--torchsde-steps", type=int, default=2000,
                    help="steps per timed torchsde run (fewer: the per-run time is scaled up)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {"threads": args.threads, "torch": torch.__version__}
    res["batched"] = bench_batched()
    print(f"batched pass: {res['batched']['runs']} runs x 2000 steps in {res['batched']['seconds']:.1f} s "
          f"({res['batched']['ms_per_step']:.1f} ms/step, {res['batched']['us_per_run_step']:.2f} us per run-step)")
    total = res["batched"]["runs"]
    nat = bench_loop("native", args.loop_points, total)
    res["loop_native"] = nat
    print(f"loop of native single runs: {nat['seconds_per_run']:.2f} s/run -> {nat['extrapolated_seconds']:.0f} s "
          f"for {total} runs")
    tsd = bench_loop("torchsde", args.loop_points, total, steps=args.torchsde_steps)
    scale = 2000 / args.torchsde_steps
    tsd["seconds_per_run"] *= scale
    tsd["extrapolated_seconds"] *= scale
    res["loop_torchsde"] = tsd
    print(f"loop of torchsde single runs: {tsd['seconds_per_run']:.2f} s/run -> {tsd['extrapolated_seconds']:.0f} s "
          f"({tsd['extrapolated_seconds'] / 3600:.2f} h) for {total} runs; "
          f"{tsd['extrapolated_seconds'] / res['batched']['seconds']:.0f}x the batched pass")
    res["lp"] = {str(N): bench_lp(N) for N in (150, 5000)}
    for N, r in res["lp"].items():
        print(f"LP separability, N = {N}: " + ", ".join(f"{k} {v['ms_per_call']:.1f} ms/call" for k, v in r.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
