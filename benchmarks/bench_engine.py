"""Engine benchmark: ms per Euler-Maruyama step of the LE-SDE, in one run on one machine.

Compares, for the cross-entropy drift (on logits when p = K, through a fixed read-out when
p > K), float32, additive noise:
  native      lesde's native solver
  torchsde    torchsde.sdeint(method="euler") with its default Brownian object, on lesde's
              LESDE (whose drift is already the O(N p) per-class-sum drift)
  torchsde+dt torchsde.sdeint with a BrownianInterval built with dt=
  plain       torchsde (default Brownian) on a straightforward torch drift: (B, N, p) layout,
              torch.softmax, per-class sums by index_add -- the model written without lesde
  dense       an Euler step with the dense N x N drift (reference; only where it fits)
  draw        torch drawing the step's N p Gaussians alone (the floor of any EM step)
Per-step times are differences of two runs of S1 < S2 steps divided by S2 - S1, so set-up
and recording costs cancel; each is the best of --repeats runs.
Also: one batched 16 x 16 (alpha, beta) grid against a Python loop of single runs.

    python benchmarks/bench_engine.py [--threads 2] [--quick] [--out benchmarks/results_engine.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
import torchsde

from _machine import cpu_name
from lesde import LESDE, CrossEntropy, CrossEntropyReadout, Impacts, initial_state, simulate


class _StraightforwardSDE(torch.nn.Module):
    """The same LE-SDE as one would write it for torchsde without lesde: (B, N, p) layout,
    torch.softmax over the feature axis, per-class sums by index_add (still O(N p))."""

    noise_type, sde_type = "diagonal", "ito"

    def __init__(self, sde):
        super().__init__()
        self.y, self.N, self.p, self.K = sde.labels, sde.N, sde.p, sde.K
        self.E = torch.as_tensor(sde.impacts.matrix(0.0))
        self.W = getattr(sde.field, "W", None)
        self.sigma = 0.1

    def f(self, t, y):
        B = y.shape[0]
        x = y.view(B, self.N, self.p)
        onehot = torch.nn.functional.one_hot(self.y, self.K).to(x.dtype)
        if self.W is None:
            G = onehot - torch.softmax(x, -1)
        else:
            W = self.W.to(x.dtype)
            G = (onehot - torch.softmax(x @ W.T, -1)) @ W
        S = torch.zeros(B, self.K, self.p, dtype=x.dtype).index_add_(1, self.y, G)
        d = torch.matmul(self.E.to(x.dtype), S)[:, self.y] / self.N
        return d.reshape(B, -1)

    def g(self, t, y):
        return torch.full_like(y, self.sigma)


def _per_step(run, s1, s2, repeats):
    """(min time of s2 steps - min time of s1 steps) / (s2 - s1), in ms, minima over repeats
    (as timeit does: other processes on the machine only ever add time)."""
    run(s1)  # warm-up
    best = {s1: float("inf"), s2: float("inf")}
    for _ in range(repeats):
        for S in (s1, s2):
            t0 = time.perf_counter()
            run(S)
            best[S] = min(best[S], time.perf_counter() - t0)
    return max(best[s2] - best[s1], 1e-9) / (s2 - s1) * 1e3


def _model(K, n, p, device):
    y = np.repeat(np.arange(K), n)
    field = CrossEntropy() if p == K else CrossEntropyReadout(
        np.random.default_rng(0).standard_normal((K, p)) / np.sqrt(p))
    return LESDE(y, Impacts.intra_inter(1.0, 0.2, K), field, sigma=0.1, dim=p)


def bench_config(K, n, p, dtype, device, repeats, quick):
    sde = _model(K, n, p, device)
    N = K * n
    x0 = initial_state(1, N, p, std=0.5, seed=0, dtype=dtype, device=device)
    dt = 0.01
    big = N * p >= 5_000_000
    s1, s2 = (2, 6) if big else (5, 25)
    if quick:
        s1, s2 = 2, 5
    row = {"K": K, "n": n, "N": N, "p": p, "dtype": str(dtype).replace("torch.", ""), "device": str(device)}

    def native(S):
        simulate(sde, x0, [0.0, S * dt], dt, seed=1, record="summary")
        if device.type == "cuda":
            torch.cuda.synchronize()

    row["native_ms"] = _per_step(native, s1, s2, repeats)

    y0 = x0.reshape(1, -1)

    def ts_default(S):
        with torch.no_grad():
            torchsde.sdeint(sde, y0, torch.tensor([0.0, S * dt], dtype=dtype, device=device), method="euler", dt=dt)

    def ts_dt(S):
        bm = torchsde.BrownianInterval(0.0, S * dt, size=(1, N * p), dtype=dtype, device=device, dt=dt, entropy=1)
        with torch.no_grad():
            torchsde.sdeint(sde, y0, torch.tensor([0.0, S * dt], dtype=dtype, device=device), method="euler",
                            dt=dt, bm=bm)

    t_s1, t_s2 = (1, 3) if big else (s1, s2)
    row["torchsde_ms"] = _per_step(ts_default, t_s1, t_s2, repeats)
    plain = _StraightforwardSDE(sde)

    def ts_plain(S):
        with torch.no_grad():
            torchsde.sdeint(plain, y0, torch.tensor([0.0, S * dt], dtype=dtype, device=device), method="euler", dt=dt)

    if device.type == "cpu":
        row["torchsde_plain_ms"] = _per_step(ts_plain, t_s1, t_s2, repeats)
    row["torchsde_dt_ms"] = _per_step(ts_dt, t_s1, t_s2, repeats)

    gen = torch.Generator(device=device).manual_seed(0)
    buf = torch.empty(1, p, N, dtype=dtype, device=device)

    def draw(S):
        for _ in range(S):
            torch.randn(1, p, N, generator=gen, dtype=dtype, device=device, out=buf)
        if device.type == "cuda":
            torch.cuda.synchronize()

    row["draw_ms"] = _per_step(draw, s1, s2, repeats)

    dense_bytes = N * N * (4 if dtype == torch.float32 else 8)
    if dense_bytes <= 2e9:
        x = x0.clone()

        def dense(S):
            nonlocal x
            for _ in range(S):
                x = x + dt * sde.dense_drift(x) + 0.1 * dt ** 0.5 * torch.randn(x.shape, generator=gen, dtype=dtype, device=device)

        row["dense_ms"] = _per_step(dense, 1, 3, repeats) if N > 2000 else _per_step(dense, s1, s2, repeats)
    else:
        row["dense_ms"] = None
    row["native_vs_torchsde"] = row["torchsde_ms"] / row["native_ms"]
    row["native_vs_torchsde_dt"] = row["torchsde_dt_ms"] / row["native_ms"]
    if "torchsde_plain_ms" in row:
        row["native_vs_torchsde_plain"] = row["torchsde_plain_ms"] / row["native_ms"]
    row["native_over_draw"] = row["native_ms"] / row["draw_ms"]
    row["dense_vs_native"] = None if row["dense_ms"] is None else row["dense_ms"] / row["native_ms"]
    return row


def bench_grid(device, steps=200):
    """16 x 16 (alpha, beta) grid, K = 3, n = 50, CE drift, SGD noise: one batched run vs a loop."""
    K, n = 3, 50
    y = np.repeat(np.arange(K), n)
    a, b = np.meshgrid(np.linspace(0.2, 2.0, 16), np.linspace(0.2, 2.0, 16), indexing="ij")
    a, b = a.ravel(), b.ravel()
    x0 = initial_state(a.size, K * n, K, std=0.5, seed=0, device=device)
    ts = [0.0, steps * 0.5]
    t0 = time.perf_counter()
    sde = LESDE(y, Impacts.intra_inter(a, b, K), "cross_entropy", noise="sgd", lr=1.0)
    simulate(sde, x0, ts, 0.5, seed=1, record="summary")
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(a.size):
        sde_i = LESDE(y, Impacts.intra_inter(a[i], b[i], K), "cross_entropy", noise="sgd", lr=1.0)
        simulate(sde_i, x0[i:i + 1], ts, 0.5, seed=1, record="summary")
    loop = time.perf_counter() - t0
    return {"grid": "16x16", "K": K, "n": n, "steps": steps, "batched_s": batched, "loop_s": loop,
            "speedup": loop / batched}


def markdown(results: dict) -> str:
    """The results of one run as the markdown tables of benchmarks/README.md."""
    m = results["machine"]
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"
    lines = [f"Machine: {m['cpu']}, {m['threads']} torch threads, torch {m['torch']}, "
             f"torchsde {m['torchsde']}, Python {m['python']}" + (f", GPU {m['gpu']}" if m.get("gpu") else "") + ".",
             "",
             "| K | N | p | native ms | torchsde ms | torchsde (dt=) ms | torchsde, plain drift ms | dense ms "
             "| draw floor ms | torchsde / native | plain / native | native / floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["steps"]:
        lines.append(f"| {r['K']} | {r['N']:,} | {r['p']} | {f(r['native_ms'])} | {f(r['torchsde_ms'])} | "
                     f"{f(r['torchsde_dt_ms'])} | {f(r.get('torchsde_plain_ms'))} | {f(r['dense_ms'], 1)} | "
                     f"{f(r['draw_ms'])} | {f(r['native_vs_torchsde'], 1)}x | "
                     f"{f(r.get('native_vs_torchsde_plain'), 1)}x | {f(r['native_over_draw'])}x |")
    g = results["grid"]
    lines += ["", f"Batched {g['grid']} (alpha, beta) grid, K = {g['K']}, n = {g['n']}, {g['steps']} steps: "
              f"one batched run {g['batched_s']:.2f} s, a Python loop of single runs {g['loop_s']:.1f} s: "
              f"{g['speedup']:.0f}x."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="only the N = 50,000, p = 10 row and the grid")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--out", default="benchmarks/results_engine.json")
    ap.add_argument("--table", default=None, metavar="JSON", help="print the markdown table of a results file and exit")
    args = ap.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(markdown(json.load(f)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "torchsde": torchsde.__version__, "python": platform.python_version(),
               "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None}
    print(json.dumps(machine))
    configs = [(10, 5000, 10)] if args.quick else [(10, n, p) for p in (10, 128) for n in (100, 1000, 5000)]
    rows = []
    for K, n, p in configs:
        row = bench_config(K, n, p, dtype, device, args.repeats, args.quick)
        rows.append(row)
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    grid = bench_grid(device)
    print(json.dumps(grid))
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "steps": rows, "grid": grid}, f, indent=1)
    print(f"wrote {args.out}")
    print(markdown({"machine": machine, "steps": rows, "grid": grid}))


if __name__ == "__main__":
    main()
