"""Engine benchmark: the cost of one step (or one save) of every scheme, side by side in one run.

For K = 10 classes, N = 10^3 ... 10^6 samples, p = 10 (cross-entropy on logits) and p = 128
(cross-entropy through a fixed read-out), float32 and float64, additive noise sigma = 0.1, one
parameter point (B = 1):

  native      lesde's native Euler-Maruyama step (Gaussian increments drawn in float32)
  two-point   the same step with two-point increments (increments="rademacher")
  torchsde    torchsde.sdeint(method="euler") with its default Brownian object, on lesde's LESDE
  torchsde+dt the same with a BrownianInterval built with dt=
  plain       torchsde (default Brownian) on the model written straightforwardly without lesde
  dense       an Euler step with the dense N x N drift (reference; only where N^2 fits)
  draw floor  torch drawing the step's N p Gaussians alone (float32, as the native step does)
  sign floor  drawing the step's N p two-point signs alone (lesde's bulk generator)
and on the I-model (identity drift) of the same size:
  I native / I two-point   Euler steps of the I-model
  exact       the exact sampler, per save time (record="summary", so each save includes the
              within-class covariances, O(N p^2))
with the peak memory of one run of each (resident-set high-water mark above the memory in use
before the call; torch's peak allocation on CUDA).

Per-step times are differences of runs of two lengths (set-up and recording cancel) divided by
the difference in steps, from medians over --repeats repetitions, the variants interleaved so
that a change in the machine's load hits them alike; the load average is recorded per row. With
one thread on the CPU the clock is the process's CPU time (time.process_time), which other
processes on a shared machine inflate far less than the wall clock; otherwise the wall clock.

Also: a batched 16 x 16 (alpha, beta) grid against a loop of single runs (--grid); the I-model
phase sweep of figures/phase_imodel_K3.png stepped and sampled exactly (--sweep); the memory per
sample at N up to 10^6 and the largest N that fits in 24 GiB for each record mode (--scale).

    python benchmarks/bench_engine.py --threads 1 [--quick] [--out benchmarks/results_engine.json]
    python benchmarks/bench_engine.py --table benchmarks/results_engine.json   # print the tables
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings

import numpy as np
import torch
import torchsde

from _machine import cpu_name, load, peak_memory
from lesde import LESDE, CrossEntropy, CrossEntropyReadout, Impacts, initial_state, simulate
from lesde.solvers import _TwoPoint

MiB = 2 ** 20
GiB = 2 ** 30


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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _clock(cpu: bool):
    """CPU time of this process (with one torch thread: the cost of the work itself, which
    other processes on a shared machine inflate far less than the wall clock) or wall time."""
    return time.process_time if cpu else time.perf_counter


def _timed(variants: dict, repeats: int, cpu: bool) -> dict:
    """variants: name -> (run(S), s1, s2). Returns name -> ms per unit, from
    (median time of s2 units - median time of s1 units) / (s2 - s1); the variants are
    interleaved within each repetition."""
    clock = _clock(cpu)
    times = {name: {s1: [], s2: []} for name, (_, s1, s2) in variants.items()}
    for name, (run, s1, _) in variants.items():
        run(s1)                                                        # warm-up
    for _ in range(repeats):
        for name, (run, s1, s2) in variants.items():
            for S in (s1, s2):
                t0 = clock()
                run(S)
                times[name][S].append(clock() - t0)
    out = {}
    for name, (_, s1, s2) in variants.items():
        d = float(np.median(times[name][s2]) - np.median(times[name][s1]))
        out[name] = max(d, 1e-9) / (s2 - s1) * 1e3
        d = float(np.min(times[name][s2]) - np.min(times[name][s1]))   # as timeit: the least disturbed
        out[name + "_min"] = max(d, 1e-9) / (s2 - s1) * 1e3
    return out


def _models(K, n, p):
    y = np.repeat(np.arange(K), n)
    field = CrossEntropy() if p == K else CrossEntropyReadout(
        np.random.default_rng(0).standard_normal((K, p)) / np.sqrt(p))
    ce = LESDE(y, Impacts.intra_inter(1.0, 0.2, K), field, sigma=0.1, dim=p)
    im = LESDE(y, Impacts.intra_inter(1.0, 0.2, K), "identity", sigma=0.1, dim=p)
    return ce, im


def _child_memory(spec: dict) -> dict:
    """In a fresh interpreter: the peak memory of one run (see --child)."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    N, p, kind, S = spec["N"], spec["p"], spec["kind"], spec["units"]
    ce, im = _models(10, N // 10, p)
    make_x0 = lambda: initial_state(1, N, p, std=0.5, seed=0, dtype=dtype, device=device)
    x0 = None if spec["include_x0"] else make_x0()
    dt = 0.01

    def run():
        x = make_x0() if x0 is None else x0
        t0, c0 = time.perf_counter(), time.process_time()
        if kind in ("native", "two_point"):
            simulate(ce, x, np.linspace(0.0, S * dt, spec["saves"]), dt, seed=1, record=spec["record"],
                     increments="rademacher" if kind == "two_point" else "gaussian")
        elif kind in ("i_native", "i_two_point"):
            simulate(im, x, np.linspace(0.0, S * dt, spec["saves"]), dt, seed=1, record=spec["record"],
                     increments="rademacher" if kind == "i_two_point" else "gaussian")
        elif kind == "exact":
            simulate(im, x, np.linspace(0.0, 0.1 * S, S + 1), method="exact", seed=1, record=spec["record"])
        elif kind == "torchsde":
            with torch.no_grad():
                torchsde.sdeint(ce, x.reshape(1, -1), torch.tensor([0.0, S * dt], dtype=dtype, device=device),
                                method="euler", dt=dt)
        _sync(device)
        return time.perf_counter() - t0, time.process_time() - c0

    seconds = []
    peak = peak_memory(lambda: seconds.append(run()), device)
    return {"peak_bytes": peak, "seconds": seconds[0][0], "cpu_seconds": seconds[0][1]}


def _peak_mib(**spec):
    """Peak memory (MiB above the memory in use before the run) of one run in a fresh process,
    so that memory freed by earlier runs of this process cannot hide it."""
    spec = dict(dict(threads=torch.get_num_threads(), include_x0=False, record="summary", saves=2), **spec)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"peak_mib": None, "error": proc.stderr.strip().splitlines()[-1:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"peak_mib": None if out["peak_bytes"] is None else out["peak_bytes"] / MiB,
            "seconds": out["seconds"], "cpu_seconds": out.get("cpu_seconds")}


def bench_long_run(device, N=1_000_000, p=10, steps=200, check_N=None):
    """One run at N = 10^6, p = 10 (cross-entropy drift, additive noise, float32, 11 saves,
    record="summary"), initial state included: its peak memory and time per step, for both
    increments; and the exact sampler on the I-model of the same size over the same 11 saves."""
    out = {"N": N, "p": p, "steps": steps, "saves": 11, "load_before": load()}
    for kind, units in (("native", steps), ("two_point", steps), ("exact", 10)):
        res = _peak_mib(N=N, p=p, dtype="float32", device=str(device), kind=kind, units=units, saves=11,
                        record="summary", include_x0=True)
        res["ms_per_unit_wall"] = 1e3 * res["seconds"] / units
        if res.get("cpu_seconds") is not None:
            res["ms_per_unit_cpu"] = 1e3 * res["cpu_seconds"] / units
        out[kind] = res
    if check_N:
        # one point nearer the 24 GiB limit, as far as the per-process budget of a shared
        # machine allows: measured against the per-sample memory of the scale fit
        res = _peak_mib(N=check_N, p=p, dtype="float32", device=str(device), kind="native", units=2,
                        saves=3, record="summary", include_x0=True)
        out["check"] = {"N": check_N, **res}
    out["load_after"] = load()
    return out


def bench_config(N, p, dtype, device, repeats, torchsde_max=2e7, extras_max=6e6):
    K = 10
    n = N // K
    ce, im = _models(K, n, p)
    x0 = initial_state(1, N, p, std=0.5, seed=0, dtype=dtype, device=device)
    dt = 0.01
    big = N * p >= 5_000_000
    s1, s2 = (2, 6) if big else (5, 25)
    row = {"K": K, "n": n, "N": N, "p": p, "dtype": str(dtype).replace("torch.", ""),
           "device": str(device), "load_before": load()}

    def euler(sde, increments="gaussian"):
        def run(S):
            simulate(sde, x0, [0.0, S * dt], dt, seed=1, record="summary", increments=increments)
            _sync(device)
        return run

    def exact(S):
        simulate(im, x0, np.linspace(0.0, 0.1 * S, S + 1), method="exact", seed=1, record="summary")
        _sync(device)

    y0 = x0.reshape(1, -1)

    def ts_default(S):
        with torch.no_grad():
            torchsde.sdeint(ce, y0, torch.tensor([0.0, S * dt], dtype=dtype, device=device),
                            method="euler", dt=dt)
        _sync(device)

    def ts_dt(S):
        bm = torchsde.BrownianInterval(0.0, S * dt, size=(1, N * p), dtype=dtype, device=device,
                                       dt=dt, entropy=1)
        with torch.no_grad():
            torchsde.sdeint(ce, y0, torch.tensor([0.0, S * dt], dtype=dtype, device=device),
                            method="euler", dt=dt, bm=bm)
        _sync(device)

    plain = _StraightforwardSDE(ce)

    def ts_plain(S):
        with torch.no_grad():
            torchsde.sdeint(plain, y0, torch.tensor([0.0, S * dt], dtype=dtype, device=device),
                            method="euler", dt=dt)

    gen = torch.Generator(device=device).manual_seed(0)
    buf = torch.empty(1, p, N, dtype=torch.float32, device=device)

    def draw(S):
        for _ in range(S):
            torch.randn(1, p, N, generator=gen, dtype=torch.float32, device=device, out=buf)
        _sync(device)

    signs = _TwoPoint((1, p, N), dtype, device, gen)

    def sign_draw(S):
        for _ in range(S):
            signs.draw()
        _sync(device)

    variants = {"native": (euler(ce), s1, s2), "two_point": (euler(ce, "rademacher"), s1, s2),
                "draw": (draw, s1, s2), "signs": (sign_draw, s1, s2),
                "i_native": (euler(im), s1, s2), "i_two_point": (euler(im, "rademacher"), s1, s2),
                "exact": (exact, s1, s2)}
    with_torchsde = N * p <= torchsde_max
    t1, t2 = (1, 3) if big else (s1, s2)
    if with_torchsde:
        variants["torchsde"] = (ts_default, t1, t2)
    if N * p <= extras_max:
        variants["torchsde_dt"] = (ts_dt, t1, t2)
        if device.type == "cpu":
            variants["torchsde_plain"] = (ts_plain, t1, t2)
    if N * N * (4 if dtype == torch.float32 else 8) <= 2e9:
        x = x0.clone()

        def dense(S):
            nonlocal x
            for _ in range(S):
                x = x + dt * ce.dense_drift(x) + 0.1 * dt ** 0.5 * torch.randn(
                    x.shape, generator=gen, dtype=dtype, device=device)
            _sync(device)

        variants["dense"] = (dense, 1, 3) if N > 2000 else (dense, s1, s2)
    ms = _timed(variants, repeats, cpu=torch.get_num_threads() == 1 and device.type == "cpu")
    for name in ("native", "two_point", "torchsde", "torchsde_dt", "torchsde_plain", "dense", "draw",
                 "signs", "i_native", "i_two_point", "exact"):
        row[f"{name}_ms"] = ms.get(name)
        row[f"{name}_min_ms"] = ms.get(name + "_min")
    # peak memory of one run of each (s1 steps / saves), each in a fresh process
    kinds = ["native", "two_point", "exact"] + (["torchsde"] if with_torchsde else [])
    for name in kinds:
        row[f"{name}_peak_mib"] = _peak_mib(N=N, p=p, dtype=row["dtype"], device=str(device), kind=name,
                                            units=s1)["peak_mib"]
    row["state_mib"] = N * p * (4 if dtype == torch.float32 else 8) / MiB
    r = lambda a, b: None if row.get(a) is None or row.get(b) is None else row[a] / row[b]
    row["two_point_vs_native"] = r("native_ms", "two_point_ms")
    row["two_point_vs_torchsde"] = r("torchsde_ms", "two_point_ms")
    row["native_vs_torchsde"] = r("torchsde_ms", "native_ms")
    row["native_vs_torchsde_plain"] = r("torchsde_plain_ms", "native_ms")
    row["native_over_draw"] = r("native_ms", "draw_ms")
    row["two_point_over_signs"] = r("two_point_ms", "signs_ms")
    row["i_two_point_vs_native"] = r("i_native_ms", "i_two_point_ms")
    row["two_point_vs_native_min"] = r("native_min_ms", "two_point_min_ms")
    row["two_point_vs_torchsde_min"] = r("torchsde_min_ms", "two_point_min_ms")
    row["i_two_point_vs_native_min"] = r("i_native_min_ms", "i_two_point_min_ms")
    row["load_after"] = load()
    return row


def bench_grid(device, steps=200):
    """16 x 16 (alpha, beta) grid, K = 3, n = 50, CE drift, SGD noise: one batched run vs a loop."""
    clock = _clock(torch.get_num_threads() == 1 and device.type == "cpu")
    K, n = 3, 50
    y = np.repeat(np.arange(K), n)
    a, b = np.meshgrid(np.linspace(0.2, 2.0, 16), np.linspace(0.2, 2.0, 16), indexing="ij")
    a, b = a.ravel(), b.ravel()
    x0 = initial_state(a.size, K * n, K, std=0.5, seed=0, device=device)
    ts = [0.0, steps * 0.5]
    out = {"grid": "16x16", "K": K, "n": n, "steps": steps, "load_before": load()}
    for inc in ("gaussian", "rademacher"):
        t0 = clock()
        sde = LESDE(y, Impacts.intra_inter(a, b, K), "cross_entropy", noise="sgd", lr=1.0)
        simulate(sde, x0, ts, 0.5, seed=1, record="summary", increments=inc)
        out[f"batched_{inc}_s"] = clock() - t0
    t0 = clock()
    for i in range(a.size):
        sde_i = LESDE(y, Impacts.intra_inter(a[i], b[i], K), "cross_entropy", noise="sgd", lr=1.0)
        simulate(sde_i, x0[i:i + 1], ts, 0.5, seed=1, record="summary")
    out["loop_s"] = clock() - t0
    out["speedup"] = out["loop_s"] / out["batched_gaussian_s"]
    out["load_after"] = load()
    return out


def _figure_spec(**kw):
    """The committed I-model phase figure's settings (figures/README.md: phase_imodel_K3)."""
    from lesde.phase import PhaseSpec

    grid = list(np.linspace(0.05, 1.0, 20))
    base = dict(grid={"alpha": grid, "beta": grid}, drift="identity", noise="additive", sigma=0.1,
                comoving=True, times=(25.0, 100.0, 400.0), replicates=8, chunk_size=400, seed=0)
    base.update(kw)
    return PhaseSpec(**base)


def _simulate_chunks(spec, clock=time.perf_counter):
    """The simulations of a sweep alone (the set-up of lesde.phase._run_chunk, no scoring)."""
    from lesde.phase import _chunk_seeds, _impacts

    rows = spec._point_rows()
    total = 0.0
    for index, chunk in enumerate(spec.chunks()):
        pts = np.array([pt for pt, _ in chunk["runs"]])
        col = lambda name: np.array([rows[pt][name] for pt in pts], dtype=float)
        s = chunk["structure"]
        K, n = int(s["K"]), int(s["n"])
        y = np.repeat(np.arange(K), n)
        sde = LESDE(y, _impacts(spec, K, float(s["t0"]), col("alpha"), col("beta"), col("r_alpha"),
                                col("r_beta")), s["drift"], sigma=col("sigma"), noise=s["noise"], dim=K)
        seed_x0, seed_sim = _chunk_seeds(spec.seed, index)
        x0 = initial_state(len(pts), K * n, K, std=1.0, seed=seed_x0) * torch.as_tensor(col("init_std"))[:, None, None]
        t0 = clock()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            simulate(sde, x0, spec.save_times(), spec.dt, seed=seed_sim, record="full",
                     method=spec.method, increments=spec.increments)
        total += clock() - t0
    return total


def _boundary(table):
    """Gap alpha - beta at which P(sep), averaged over the cells of equal gap, crosses 1/2, per T."""
    out = {}
    for T, g in table.groupby("T"):
        gap = (g["alpha"] - g["beta"]).round(6)
        curve = g.groupby(gap)["p_sep"].mean()
        x, v = curve.index.to_numpy(), curve.to_numpy()
        above = np.flatnonzero((v[:-1] < 0.5) & (v[1:] >= 0.5))
        if above.size:
            i = above[0]
            out[str(T)] = float(x[i] + (0.5 - v[i]) * (x[i + 1] - x[i]) / (v[i + 1] - v[i]))
    return out


def bench_sweep():
    """The I-model phase sweep of figures/phase_imodel_K3 (20 x 20 grid x 8 replicates, 3,200 runs,
    chunks of 400, K = 3, n = 50, T = 25, 100, 400, 41 save times, dt = 0.5): stepping against
    the exact sampler, simulations alone and the whole sweep (with its scoring and LP)."""
    from lesde.phase import run_sweep

    clock = _clock(torch.get_num_threads() == 1)
    out = {"settings": "figures/phase_imodel_K3 (20x20 grid x 8 replicates, saves 41, dt 0.5)",
           "load_before": load()}
    specs = {"euler": _figure_spec(), "exact": _figure_spec(method="exact"),
             "exact_scoring_times": _figure_spec(method="exact", saves=2),
             "euler_two_point": _figure_spec(increments="rademacher")}
    for name, spec in specs.items():
        out[f"simulate_{name}_s"] = _simulate_chunks(spec, clock)
    tables = {}
    for name in ("euler", "exact", "exact_scoring_times"):
        t0 = clock()
        tables[name] = run_sweep(specs[name])
        out[f"sweep_{name}_s"] = clock() - t0
    for name in ("exact", "exact_scoring_times", "euler_two_point"):
        out[f"simulate_speedup_{name}"] = out["simulate_euler_s"] / out[f"simulate_{name}_s"]
    for name in ("exact", "exact_scoring_times"):
        out[f"sweep_speedup_{name}"] = out["sweep_euler_s"] / out[f"sweep_{name}_s"]
    a, b = tables["euler"], tables["exact"]
    out["mean_abs_diff_p_sep"] = float(np.abs(a["p_sep"] - b["p_sep"]).mean())
    out["boundary_gap_euler"] = _boundary(a)
    out["boundary_gap_exact"] = _boundary(b)
    out["load_after"] = load()
    return out


def bench_scale(device, sizes=(100_000, 300_000, 1_000_000), saves_full=11):
    """Peak memory of whole runs (initial state included) at N = sizes, p = 10, K = 10, for each
    record mode; the memory per sample by least squares, and the largest N in 24 GiB."""
    out = {"sizes": list(sizes), "saves_full": saves_full, "load_before": load(), "rows": []}
    p = 10
    for dtype in ("float32", "float64"):
        for N in sizes:
            for what in ("euler", "exact"):
                for record, T in (("summary", 3), ("full", saves_full)):
                    # Euler: T - 1 steps between T saves; exact: T - 1 save intervals
                    kind = "native" if what == "euler" else "exact"
                    res = _peak_mib(N=N, p=p, dtype=dtype, device=str(device), kind=kind, units=T - 1,
                                    saves=T, record=record, include_x0=True)
                    out["rows"].append({"dtype": dtype, "N": N, "p": p, "scheme": what, "record": record,
                                        "saves": T, **res})
    fits = {}
    for dtype in ("float32", "float64"):
        for what in ("euler", "exact"):
            for record in ("summary", "full"):
                rows = [r for r in out["rows"] if (r["dtype"], r["scheme"], r["record"]) == (dtype, what, record)
                        and r["peak_mib"] is not None]
                if len(rows) < 2:
                    continue
                Ns = np.array([r["N"] for r in rows], dtype=float)
                mem = np.array([r["peak_mib"] for r in rows]) * MiB
                slope, icpt = np.polyfit(Ns, mem, 1)
                entry = {"bytes_per_sample": float(slope), "intercept_mib": float(icpt / MiB)}
                if record == "summary":
                    entry["max_N_24GiB"] = float((24 * GiB - max(icpt, 0)) / slope)
                else:
                    # full: the recorded states are T N p float64; the rest is the summary run's
                    work = slope - 8 * p * saves_full
                    entry["working_bytes_per_sample"] = float(work)
                    for T in (11, 41, 201):
                        entry[f"max_N_24GiB_saves{T}"] = float((24 * GiB - max(icpt, 0)) / (work + 8 * p * T))
                fits[f"{dtype}/{what}/{record}"] = entry
    out["fits"] = fits
    out["load_after"] = load()
    return out


def _f(v, d=2):
    return "-" if v is None else f"{v:.{d}f}"


def _x(v, d=1):
    return "-" if v is None else f"{v:.{d}f}x"


def _markdown_v1(results: dict) -> str:
    """Tables of a results file of the first format (native, torchsde, dense, draw floor)."""
    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['threads']} torch threads, torch {m['torch']}, "
             f"torchsde {m['torchsde']}, Python {m['python']}.", "",
             "| K | N | p | native ms | torchsde ms | torchsde (dt=) ms | torchsde, plain drift ms | dense ms "
             "| draw floor ms | torchsde / native | plain / native | native / floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["steps"]:
        lines.append(f"| {r['K']} | {r['N']:,} | {r['p']} | {_f(r['native_ms'])} | {_f(r['torchsde_ms'])} | "
                     f"{_f(r['torchsde_dt_ms'])} | {_f(r.get('torchsde_plain_ms'))} | {_f(r['dense_ms'], 1)} | "
                     f"{_f(r['draw_ms'])} | {_x(r['native_vs_torchsde'])} | "
                     f"{_x(r.get('native_vs_torchsde_plain'))} | {_x(r['native_over_draw'], 2)} |")
    g = results["grid"]
    lines += ["", f"Batched {g['grid']} (alpha, beta) grid, K = {g['K']}, n = {g['n']}, {g['steps']} steps: "
              f"one batched run {g['batched_s']:.2f} s, a Python loop of single runs {g['loop_s']:.1f} s: "
              f"{g['speedup']:.0f}x."]
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The results of one run as the markdown tables of benchmarks/README.md."""
    if results.get("format", 1) == 1:
        return _markdown_v1(results)
    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['threads']} torch thread(s), torch {m['torch']}, "
             f"torchsde {m['torchsde']}, Python {m['python']}" + (f", GPU {m['gpu']}" if m.get("gpu") else "")
             + f"; load average at start {m.get('load_start')}, at end {m.get('load_end')}; "
             f"medians of {m.get('repeats')} repeats; times are "
             + ("CPU time of the benchmark process (one thread)" if m.get("clock") == "cpu" else "wall-clock")
             + ".", ""]
    if results.get("steps"):
        lines += ["Cross-entropy drift, ms per step:", "",
                  "| dtype | N | p | native | two-point | torchsde | torchsde (dt=) | plain drift | dense "
                  "| draw floor | sign floor | two-point vs native | two-point vs torchsde | native vs torchsde | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["steps"]:
            lines.append(
                f"| {r['dtype']} | {r['N']:,} | {r['p']} | {_f(r['native_ms'])} | {_f(r['two_point_ms'])} | "
                f"{_f(r['torchsde_ms'])} | {_f(r['torchsde_dt_ms'])} | {_f(r['torchsde_plain_ms'])} | "
                f"{_f(r['dense_ms'], 1)} | {_f(r['draw_ms'])} | {_f(r['signs_ms'])} | "
                f"{_x(r['two_point_vs_native'], 2)} | {_x(r['two_point_vs_torchsde'])} | "
                f"{_x(r['native_vs_torchsde'])} | {r['load_before'][0] if r['load_before'] else '-'} |")
        lines += ["", "I-model (identity drift) of the same size: ms per Euler step, ms per save of the exact "
                  "sampler; peak memory (MiB above the memory in use before the call) of one run:", "",
                  "| dtype | N | p | I native | I two-point | exact per save | state MiB | peak native | "
                  "peak two-point | peak exact | peak torchsde |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["steps"]:
            lines.append(
                f"| {r['dtype']} | {r['N']:,} | {r['p']} | {_f(r['i_native_ms'])} | {_f(r['i_two_point_ms'])} | "
                f"{_f(r['exact_ms'])} | {_f(r['state_mib'], 1)} | {_f(r.get('native_peak_mib'), 0)} | "
                f"{_f(r.get('two_point_peak_mib'), 0)} | {_f(r.get('exact_peak_mib'), 0)} | "
                f"{_f(r.get('torchsde_peak_mib'), 0)} |")
    g = results.get("grid")
    if g:
        lines += ["", f"Batched {g['grid']} (alpha, beta) grid, K = {g['K']}, n = {g['n']}, {g['steps']} steps, "
                  f"CE drift, SGD noise: one batched run {g['batched_gaussian_s']:.2f} s (two-point "
                  f"{g['batched_rademacher_s']:.2f} s), a Python loop of single runs {g['loop_s']:.1f} s: "
                  f"{g['speedup']:.0f}x."]
    s = results.get("sweep")
    if s:
        lines += ["", f"I-model phase sweep, {s['settings']}, seconds:", "",
                  "| | Euler (Gaussian) | Euler two-point | exact, 41 saves | exact, scoring times only |",
                  "|---|---|---|---|---|",
                  f"| simulations alone | {s['simulate_euler_s']:.2f} | {s['simulate_euler_two_point_s']:.2f} | "
                  f"{s['simulate_exact_s']:.3f} ({s['simulate_speedup_exact']:.0f}x) | "
                  f"{s['simulate_exact_scoring_times_s']:.3f} ({s['simulate_speedup_exact_scoring_times']:.0f}x) |",
                  f"| whole sweep (scoring, LP) | {s['sweep_euler_s']:.1f} | - | {s['sweep_exact_s']:.1f} "
                  f"({s['sweep_speedup_exact']:.1f}x) | {s['sweep_exact_scoring_times_s']:.1f} "
                  f"({s['sweep_speedup_exact_scoring_times']:.1f}x) |",
                  "", f"P(sep) exact vs Euler: mean |difference| over the 1,200 cells "
                  f"{s['mean_abs_diff_p_sep']:.3f}; gap at P = 1/2 (T: Euler / exact): "
                  + ", ".join(f"{T}: {s['boundary_gap_euler'].get(T, float('nan')):.3f} / "
                              f"{s['boundary_gap_exact'].get(T, float('nan')):.3f}" for T in s["boundary_gap_euler"])
                  + "."]
    sc = results.get("scale")
    if sc:
        lines += ["", f"Peak memory of whole runs (initial state included), K = 10, p = 10, MiB "
                  f"(summary: 3 saves; full: {sc['saves_full']} saves):", "",
                  "| dtype | scheme | record | " + " | ".join(f"N = {N:,}" for N in sc["sizes"]) + " |",
                  "|---|---|---|" + "---|" * len(sc["sizes"])]
        keys = sorted({(r["dtype"], r["scheme"], r["record"]) for r in sc["rows"]})
        for k in keys:
            vals = {r["N"]: r["peak_mib"] for r in sc["rows"] if (r["dtype"], r["scheme"], r["record"]) == k}
            lines.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(_f(vals.get(N), 0) for N in sc["sizes"]) + " |")
        lines += ["", "| dtype / scheme / record | bytes per sample | largest N in 24 GiB |", "|---|---|---|"]
        for k, e in sc["fits"].items():
            if "max_N_24GiB" in e:
                lines.append(f"| {k} | {e['bytes_per_sample']:.0f} | {e['max_N_24GiB']:.3g} |")
            else:
                lines.append(f"| {k} | {e['bytes_per_sample']:.0f} (of which {e['working_bytes_per_sample']:.0f} "
                             f"working) | {e['max_N_24GiB_saves11']:.3g} (11 saves), {e['max_N_24GiB_saves41']:.3g} "
                             f"(41), {e['max_N_24GiB_saves201']:.3g} (201) |")
    lr = results.get("long_run")
    if lr:
        lines += ["", f"One run at N = {lr['N']:,}, p = {lr['p']} (float32, record=\"summary\", {lr['saves']} saves, "
                  f"initial state included):", "",
                  "| scheme | wall s | ms per step / save (wall) | ms per step / save (CPU) | peak MiB |",
                  "|---|---|---|---|---|"]
        for kind, label in (("native", f"Euler, Gaussian, {lr['steps']} steps (CE drift)"),
                            ("two_point", f"Euler, two-point, {lr['steps']} steps (CE drift)"),
                            ("exact", "exact, 10 save intervals (I-model)")):
            r = lr[kind]
            lines.append(f"| {label} | {r['seconds']:.1f} | {r['ms_per_unit_wall']:.1f} | "
                         f"{_f(r.get('ms_per_unit_cpu'), 1)} | {_f(r['peak_mib'], 0)} |")
        c = lr.get("check")
        fit = (results.get("scale") or {}).get("fits", {}).get("float32/euler/summary")
        if c and c.get("peak_mib") is not None:
            pred = "" if not fit else (f"; the per-sample fit predicts "
                                       f"{(fit['intercept_mib'] + fit['bytes_per_sample'] * c['N'] / MiB):.0f} MiB")
            lines += ["", f"Check at N = {c['N']:,} (float32, CE drift, Euler, record=\"summary\"): peak "
                      f"{c['peak_mib']:.0f} MiB{pred}."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="only N = 50,000, p = 10 (the goals' row), and the grid")
    ap.add_argument("--sizes", default="1000,10000,50000,100000,1000000", help="N values (comma list)")
    ap.add_argument("--dims", default="10,128", help="p values (comma list)")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--max-elements-f64", type=float, default=6e7,
                    help="skip float64 configurations with more than this many N p elements "
                         "(N = 10^6, p = 128 in float64 needs about 6 GB)")
    ap.add_argument("--no-steps", action="store_true")
    ap.add_argument("--no-grid", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-scale", action="store_true")
    ap.add_argument("--no-long-run", action="store_true", help="skip the one run at N = 10^6")
    ap.add_argument("--check-n", type=int, default=None,
                    help="also measure the peak memory of one summary run at this N (float32, p = 10)")
    ap.add_argument("--out", default="benchmarks/results_engine.json")
    ap.add_argument("--table", default=None, metavar="JSON", help="print the markdown tables of a results file and exit")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child_memory(json.loads(args.child))))
        return
    if args.table:
        with open(args.table) as f:
            print(markdown(json.load(f)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "torchsde": torchsde.__version__, "python": platform.python_version(),
               "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
               "repeats": args.repeats, "load_start": load(),
               "clock": "cpu" if torch.get_num_threads() == 1 and device.type == "cpu" else "wall"}
    print(json.dumps(machine), flush=True)
    results = {"format": 2, "machine": machine, "steps": [], "skipped": []}

    def save():
        results["machine"]["load_end"] = load()
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    if not args.no_steps:
        if args.quick:
            configs = [(50_000, 10, getattr(torch, d)) for d in args.dtypes.split(",")]
        else:
            configs = [(N, p, getattr(torch, d)) for d in args.dtypes.split(",") for p in map(int, args.dims.split(","))
                       for N in map(int, args.sizes.split(","))]
        for N, p, dtype in configs:
            if dtype == torch.float64 and N * p > args.max_elements_f64:
                results["skipped"].append({"N": N, "p": p, "dtype": "float64",
                                           "why": "above --max-elements-f64 (per-process memory budget)"})
                continue
            row = bench_config(N, p, dtype, device, args.repeats if N * p < 5e7 else max(3, args.repeats // 2))
            results["steps"].append(row)
            print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
            save()
    if not args.no_grid:
        results["grid"] = bench_grid(device)
        print(json.dumps(results["grid"]), flush=True)
        save()
    if not args.no_sweep and not args.quick:
        results["sweep"] = bench_sweep()
        print(json.dumps(results["sweep"]), flush=True)
        save()
    if not args.no_scale and not args.quick:
        results["scale"] = bench_scale(device)
        print(json.dumps(results["scale"]["fits"]), flush=True)
        save()
    if not args.no_long_run and (not args.quick or args.check_n):
        results["long_run"] = bench_long_run(device, check_N=args.check_n)
        print(json.dumps(results["long_run"]), flush=True)
        save()
    save()
    print(f"wrote {args.out}")
    print(markdown(results))


if __name__ == "__main__":
    main()
