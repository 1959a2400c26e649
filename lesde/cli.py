"""The ``lesde`` command line: one subcommand per main job.

Each subcommand is a pair ``_add_<name>(sub)`` (its argparse parser) and ``_run_<name>(args)``
(its work). Heavy modules are imported inside the ``_run_`` functions so that ``lesde --help``
stays fast. Nothing in the package imports this module.
"""
from __future__ import annotations

import argparse
import sys


_SUBCOMMANDS = []  # (name, add-function) in the order shown by --help


def _subcommand(add):
    """Register ``_add_<name>`` as a subcommand parser builder."""
    _SUBCOMMANDS.append((add.__name__[len("_add_"):], add))
    return add


def _threads(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(int(args.threads))


# --------------------------------------------------------------------------------------------
# subcommands (engine)
# --------------------------------------------------------------------------------------------
# [engine subcommands are added here]

def _floats(text: str):
    """'0.5' -> 0.5; '0.2,0.5,1' -> array (batched parameter)."""
    import numpy as np

    vals = [float(v) for v in str(text).split(",") if v.strip()]
    if not vals:
        raise argparse.ArgumentTypeError(f"expected a number or a comma-separated list, got {text!r}")
    return vals[0] if len(vals) == 1 else np.array(vals)


def _add_model_args(p, K=3, n=50, T=400.0, dt=0.5, noise="sgd", lr=1.0, sigma=0.0):
    g = p.add_argument_group("model")
    g.add_argument("--K", type=int, default=K, help="number of classes (default %(default)s)")
    g.add_argument("--n", type=int, default=n, help="samples per class (default %(default)s)")
    g.add_argument("--p", type=int, default=None, help="feature dimension (default K)")
    g.add_argument("--alpha", type=_floats, default=1.0, help="intra-class impact; a comma list runs a batch")
    g.add_argument("--beta", type=_floats, default=0.2, help="inter-class impact; a comma list runs a batch")
    g.add_argument("--drift", default="cross_entropy", choices=["identity", "label_projection", "cross_entropy"])
    g.add_argument("--noise", default=noise, choices=["additive", "sgd", "both", "none"],
                   help="diffusion: additive sigma dW, SGD sampling noise with learning rate --lr, or both")
    g.add_argument("--lr", type=float, default=lr, help="learning rate h of the SGD noise (default %(default)s)")
    g.add_argument("--sigma", type=_floats, default=sigma, help="additive noise level (default %(default)s)")
    g.add_argument("--init-std", type=float, default=0.5, help="X(0) ~ N(0, init_std^2 I) (default %(default)s)")
    s = p.add_argument_group("solver")
    s.add_argument("--T", type=float, default=T, help="final time (default %(default)s)")
    s.add_argument("--dt", type=float, default=dt, help="step size (default %(default)s)")
    s.add_argument("--saves", type=int, default=41, help="number of save times (default %(default)s)")
    s.add_argument("--runs", type=int, default=1, help="independent runs per parameter point")
    s.add_argument("--backend", default="native", choices=["native", "torchsde"])
    s.add_argument("--method", default="euler", help="torchsde method (backend torchsde)")
    s.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    s.add_argument("--device", default="cpu")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _build_sde(args):
    import numpy as np

    from .model import LESDE, Impacts

    y = np.repeat(np.arange(args.K), args.n)
    return LESDE(y, Impacts.intra_inter(args.alpha, args.beta, args.K), args.drift, sigma=args.sigma,
                 noise=args.noise, lr=args.lr if args.noise in ("sgd", "both") else None, dim=args.p)


def _simulate_from_args(args, record="full"):
    import numpy as np
    import torch

    from .solvers import initial_state, simulate

    sde = _build_sde(args)
    B = (sde.param_batch or 1) * args.runs
    dtype = getattr(torch, args.dtype)
    x0 = initial_state(B, sde.N, sde.p, std=args.init_std, seed=args.seed + 1, dtype=dtype, device=args.device)
    if sde.param_batch and sde.param_batch > 1 and args.runs > 1:
        raise ValueError("batched alpha/beta/sigma with --runs > 1: give one or the other")
    ts = np.linspace(0.0, args.T, max(2, args.saves))
    return sde, simulate(sde, x0, ts, args.dt, backend=args.backend, method=args.method, seed=args.seed,
                         record=record, progress=not args.no_progress)


def _summary_lines(sde, sol):
    import numpy as np

    from . import metrics

    X = sol.states[-1]
    y = sol.labels
    lines = []
    ok = ~sol.overflowed
    if sde.p == sde.K and ok.any():
        loss = np.asarray(metrics.cross_entropy(X[ok], y))
        acc = np.asarray(metrics.argmax_accuracy(X[ok], y))
        lines.append(f"final training cross-entropy of the logits: {np.array2string(loss, precision=4)}")
        lines.append(f"final argmax accuracy of the logits:         {np.array2string(acc, precision=3)}")
    if ok.any():
        ncc = np.asarray(metrics.ncc_accuracy(X[ok], y))
        lines.append(f"final nearest-class-centre accuracy:         {np.array2string(ncc, precision=3)}")
    if sol.overflowed.any():
        lines.append(f"overflowed runs (stopped): {np.flatnonzero(sol.overflowed).tolist()} at t = "
                     f"{np.array2string(sol.overflow_time[sol.overflowed], precision=4)}")
    return lines


@_subcommand
def _add_simulate(sub):
    p = sub.add_parser("simulate", help="simulate the LE-SDE and write a solution file (.npz)",
                       description="Simulate dX_j = (1/N) sum_j' E[y_j, y_j'] G(X_j') dt + noise with "
                       "E = (alpha - beta) I + beta 11^T, balanced classes, X(0) Gaussian.")
    _add_model_args(p)
    p.add_argument("--record", default="full", choices=["full", "summary"])
    p.add_argument("-o", "--output", default="lesde_solution.npz", help="solution file (default %(default)s)")
    p.set_defaults(func=_run_simulate)


def _run_simulate(args):
    sde, sol = _simulate_from_args(args, record=args.record)
    sol.save(args.output)
    print(f"simulated {sol.num_runs} run(s): N = {sde.N}, K = {sde.K}, p = {sde.p}, {args.drift} drift, "
          f"{args.noise} noise, T = {args.T:g}, dt = {args.dt:g} ({sol.params['wall_seconds']:.2f} s)")
    if sol.states is not None:
        for line in _summary_lines(sde, sol):
            print(line)
    print(f"wrote {args.output}")


@_subcommand
def _add_demo(sub):
    p = sub.add_parser("demo", help="locally elastic vs non-elastic cross-entropy LE-SDE, one figure",
                       description="Simulates the cross-entropy LE-SDE with SGD sampling noise (K = 3, "
                       "n = 50, lr = 1) for a locally elastic case (alpha = 1, beta = 0.2) and a "
                       "non-elastic one (alpha = beta = 1) and draws both side by side.")
    p.add_argument("--out", default="figures/demo_trajectories.png")
    p.add_argument("--T", type=float, default=400.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_run_demo)


def _run_demo(args):
    import numpy as np

    from . import figures
    from .model import LESDE, Impacts
    from .solvers import initial_state, simulate

    K, n = 3, 50
    y = np.repeat(np.arange(K), n)
    sde = LESDE(y, Impacts.intra_inter(np.array([1.0, 1.0]), np.array([0.2, 1.0]), K), "cross_entropy",
                noise="sgd", lr=1.0)
    x0 = initial_state(2, K * n, K, std=0.5, seed=args.seed + 1)
    sol = simulate(sde, x0, np.linspace(0, args.T, 201), 0.5, seed=args.seed, progress=True)
    from .solvers import Solution

    cases = {}
    for b, title in enumerate(["locally elastic: alpha = 1, beta = 0.2", "not elastic: alpha = beta = 1"]):
        cases[title] = Solution(ts=sol.ts, labels=sol.labels, class_means=sol.class_means[:, b:b + 1],
                                within_cov=sol.within_cov[:, b:b + 1], states=sol.states[:, b:b + 1],
                                overflow_time=sol.overflow_time[b:b + 1], params=sol.params)
    print(f"cross-entropy LE-SDE, SGD sampling noise (lr = 1), K = {K}, n = {n}, T = {args.T:g} "
          f"({sol.params['wall_seconds']:.1f} s)")
    for line in _summary_lines(sde, sol):
        print("  " + line + "   [elastic, non-elastic]")
    out = figures.plot_demo(cases, args.out)
    print(f"wrote {out}")


@_subcommand
def _add_figures(sub):
    p = sub.add_parser("figures", help="draw (and where cheap, compute) the package's figures")
    fs = p.add_subparsers(dest="figure", metavar="FIGURE")
    fs.required = True
    q = fs.add_parser("sgd-vs-sde", help="discrete feature SGD vs its SDE for several learning rates")
    q.add_argument("--out", default="figures/sgd_vs_sde.png")
    q.add_argument("--runs", type=int, default=64)
    q.add_argument("--T", type=float, default=100.0)
    q.add_argument("--lrs", type=_floats, default="2,1,0.5")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=None)
    q.set_defaults(func=_run_fig_sgd_vs_sde)
    q = fs.add_parser("phase", help="draw a phase sweep directory (heat maps or curves per T)")
    q.add_argument("sweep_dir", help="directory written by `lesde phase`")
    q.add_argument("--out", default=None, help="PNG (default SWEEP_DIR/phase.png)")
    q.add_argument("--value", default="p_sep", help="table column to draw (default %(default)s)")
    q.add_argument("--csv", default=None, help="also copy the table to this CSV file")
    q.add_argument("--title", default=None)
    q.add_argument("--theory-c", type=float, default=None,
                   help="decay sweeps of the I-model: draw the heuristic boundary A(T;r)/K = "
                   "log(c w(T)/s0) with this c")
    q.set_defaults(func=_run_fig_phase)
    q = fs.add_parser("nc", help="NC1..NC4 and the training loss against time, CE drift, several (alpha, beta)")
    q.add_argument("--out", default="figures/nc_ce_K4.png")
    q.add_argument("--cases", default="1,0.2;1,1;0.5,1", help="alpha,beta pairs separated by ';'")
    q.add_argument("--K", type=int, default=4)
    q.add_argument("--n", type=int, default=50)
    q.add_argument("--T", type=float, default=2000.0)
    q.add_argument("--dt", type=float, default=0.5)
    q.add_argument("--runs", type=int, default=8)
    q.add_argument("--noise", default="sgd", choices=["sgd", "both", "additive"])
    q.add_argument("--lr", type=float, default=1.0)
    q.add_argument("--sigma", type=float, default=0.0)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=None)
    q.set_defaults(func=_run_fig_nc)
    q = fs.add_parser("clouds", help="feature clouds of elastic and non-elastic LE-SDEs at a few times")
    q.add_argument("--out", default="figures/clouds_ce_K3.png")
    q.add_argument("--cases", default="1,0.2;1,1;0.5,1", help="alpha,beta pairs separated by ';'")
    q.add_argument("--times", type=_grid_values, default=[0.0, 25.0, 100.0, 400.0])
    q.add_argument("--K", type=int, default=3)
    q.add_argument("--n", type=int, default=50)
    q.add_argument("--drift", default="cross_entropy", choices=["identity", "cross_entropy"])
    q.add_argument("--noise", default="sgd", choices=["sgd", "both", "additive"])
    q.add_argument("--lr", type=float, default=1.0)
    q.add_argument("--sigma", type=float, default=0.0)
    q.add_argument("--dt", type=float, default=0.5)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=None)
    q.set_defaults(func=_run_fig_clouds)
    # [further figures are added here]


def _run_fig_sgd_vs_sde(args):
    import numpy as np

    from . import figures
    from .model import LESDE, Impacts
    from .solvers import initial_state, simulate, simulate_feature_sgd

    K, n = 3, 50
    y = np.repeat(np.arange(K), n)
    x0 = initial_state(args.runs, K * n, K, std=0.5, seed=args.seed + 1)
    d0 = np.eye(K)[0] - 1.0 / K
    results = []
    for i, h in enumerate(np.atleast_1d(args.lrs)):
        sde = LESDE(y, Impacts.intra_inter(1.0, 0.2, K), "cross_entropy", noise="sgd", lr=float(h))
        ts = np.arange(0.0, args.T + 1e-9, max(float(h), args.T / 100))
        ts = ts[np.abs(np.round(ts / h) * h - ts) < 1e-9]
        disc = simulate_feature_sgd(sde, x0, ts, seed=args.seed + 10 + i, progress=True)
        sde_sol = simulate(sde, x0, ts, min(0.1, float(h) / 4), seed=args.seed + 20 + i, progress=True)
        r = {"h": float(h), "ts": ts}
        for key, sol in (("disc", disc), ("sde", sde_sol)):
            r[f"{key}_coord"] = sol.class_means[:, :, 0] @ d0 / (d0 @ d0)
            r[f"{key}_loss"] = figures.training_loss_curve(sol.states, sol.labels)[0]
        results.append(r)
        print(f"h = {h:g}: final loss feature-SGD {np.mean(r['disc_loss'][-1]):.4f}, "
              f"SDE {np.mean(r['sde_loss'][-1]):.4f}; label coordinate {np.mean(r['disc_coord'][-1]):.3f} "
              f"vs {np.mean(r['sde_coord'][-1]):.3f}")
    print(f"wrote {figures.plot_sgd_vs_sde(results, args.out)}")


# --------------------------------------------------------------------------------------------
# phase sweeps (lesde.phase) and their figures
# --------------------------------------------------------------------------------------------
def _grid_values(text: str):
    """'0.1:1:10' -> 10 values from 0.1 to 1 (numpy.linspace); '0.2,0.5,1' -> a list;
    words (noise kinds, drift names) stay strings."""
    import numpy as np

    text = str(text).strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"a range is START:STOP:COUNT, got {text!r}")
        return [float(v) for v in np.linspace(float(parts[0]), float(parts[1]), int(parts[2]))]
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if not vals:
        raise argparse.ArgumentTypeError(f"expected values, got {text!r}")
    try:
        return [float(v) for v in vals]
    except ValueError:
        return vals


_PHASE_GRID_ARGS = (("alpha", "intra-class impact alpha0"), ("beta", "inter-class impact beta0"),
                    ("gap", "alpha - beta (sets alpha = beta + gap)"),
                    ("r", "decay exponent of both alpha(t) and beta(t)"),
                    ("r_alpha", "decay exponent of alpha(t) = alpha0 (1 + t/t0)^(-r)"),
                    ("r_beta", "decay exponent of beta(t)"), ("sigma", "additive noise level"),
                    ("init_std", "X(0) ~ N(0, init_std^2 I)"), ("K", "number of classes"),
                    ("n", "samples per class"), ("noise", "additive, sgd or both"),
                    ("lr", "learning rate h of the SGD noise"), ("t0", "time scale of the decay"))


@_subcommand
def _add_phase(sub):
    p = sub.add_parser(
        "phase", help="phase sweep: P(separable at T) over a parameter grid (resumable, Dask)",
        description="Sweep the LE-SDE over the Cartesian product of the grid arguments (each a "
        "value, a comma list, or START:STOP:COUNT), R replicates per point, batched and chunked. "
        "Chunks are written to OUT as they finish; rerunning the same command resumes. The order "
        "parameter is the training accuracy (= 1) of the model's own read-out for the "
        "cross-entropy drift and the nearest-class-centre accuracy otherwise; LP separability "
        "(any affine classifier, a weaker notion) is reported beside it.")
    g = p.add_argument_group("grid (a single value is a fixed parameter)")
    for name, text in _PHASE_GRID_ARGS:
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=_grid_values, default=None, help=text)
    m = p.add_argument_group("model and scoring")
    m.add_argument("--drift", default="cross_entropy", choices=["identity", "label_projection", "cross_entropy"])
    m.add_argument("--p", type=int, default=None, help="feature dimension (default K)")
    m.add_argument("--times", type=_grid_values, default=[400.0], help="times T at which to score (comma list)")
    m.add_argument("--dt", type=float, default=0.5)
    m.add_argument("--saves", type=int, default=41, help="save times on [0, max T] (time-to-separation resolution)")
    m.add_argument("--replicates", type=int, default=8)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--chunk-size", type=int, default=256, help="runs per chunk (bounds memory)")
    m.add_argument("--loss-threshold", type=float, default=0.1)
    m.add_argument("--no-lp", action="store_true", help="skip the LP separability test")
    m.add_argument("--comoving", action="store_true",
                   help="identity drift, additive noise: simulate in the frame of the grand mean")
    m.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    r = p.add_argument_group("running")
    r.add_argument("-o", "--out", required=True, help="sweep directory (config.json, chunks/, table.csv)")
    r.add_argument("--dask-scheduler", default=None, metavar="ADDRESS", help="run the chunks on this Dask scheduler")
    r.add_argument("--workers", type=int, default=None, help="start a local Dask cluster of N worker processes")
    r.add_argument("--max-chunks", type=int, default=None, help="stop after this many new chunks")
    r.add_argument("--threads", type=int, default=None, help="torch threads per chunk")
    r.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_phase)


def _phase_spec_from_args(args):
    from .phase import PhaseSpec

    grid, fixed = [], {}
    for name, _ in _PHASE_GRID_ARGS:
        vals = getattr(args, name)
        if vals is None:
            continue
        if len(vals) > 1:
            grid.append((name, vals))
        elif name in ("gap", "r"):
            grid.append((name, vals))
        else:
            fixed[name] = vals[0]
    return PhaseSpec(grid=grid, drift=args.drift, p=args.p, times=tuple(args.times), dt=args.dt,
                     saves=args.saves, replicates=args.replicates, seed=args.seed,
                     chunk_size=args.chunk_size, loss_threshold=args.loss_threshold,
                     lp=not args.no_lp, comoving=args.comoving, dtype=args.dtype, **fixed)


def _run_phase(args):
    import time

    from .phase import run_sweep

    spec = _phase_spec_from_args(args)
    client = cluster = None
    if args.dask_scheduler and args.workers:
        raise ValueError("give --dask-scheduler or --workers, not both")
    if args.dask_scheduler or args.workers:
        from distributed import Client, LocalCluster

        if args.workers:
            cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                   dashboard_address=":0")
            client = Client(cluster)
        else:
            client = Client(args.dask_scheduler)
    n_chunks = len(spec.chunks())
    print(f"phase sweep {spec.digest()}: {spec.num_points} points x {spec.replicates} replicates, "
          f"{n_chunks} chunks, times {list(spec.times)}, {spec.drift} drift -> {args.out}"
          + (f" on Dask scheduler {client.scheduler.address}" if client is not None else ""))
    t0 = time.perf_counter()
    try:
        table = run_sweep(spec, args.out, client=client, max_chunks=args.max_chunks, threads=args.threads,
                          progress=not args.no_progress)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    done = table.attrs.get("complete", False)
    print(f"{'finished' if done else 'stopped (resume with the same command)'} in "
          f"{time.perf_counter() - t0:.1f} s; order parameter: {table['notion'].iloc[0]}")
    for T, g in table.groupby("T"):
        print(f"  T = {T:g}: mean P(separable) {g['p_sep'].mean():.3f} (order parameter), "
              f"{g['p_lp'].mean():.3f} (LP, any affine classifier)")
    if done:
        print(f"wrote {args.out}/table.csv")


def _run_fig_phase(args):
    import os

    from . import figures
    from .phase import load_sweep

    spec, table = load_sweep(args.sweep_dir)
    if not table.attrs.get("complete", False):
        print("warning: the sweep is not finished; drawing the finished chunks")
    if args.value not in table.columns:
        raise ValueError(f"--value {args.value!r} is not a table column; e.g. p_sep, p_lp, p_loss, "
                         f"loss_mean, nc1_mean, t_sep_mean")
    out = args.out or os.path.join(args.sweep_dir, "phase.png")
    if args.csv:
        table.to_csv(args.csv, index=False, float_format="%.6g")
        print(f"wrote {args.csv}")
    print(f"wrote {figures.plot_phase(table, out, value=args.value, title=args.title, theory_c=args.theory_c)}")


def _cases(text):
    pairs = []
    for item in str(text).split(";"):
        a, b = (float(v) for v in item.split(","))
        pairs.append((a, b))
    if not pairs:
        raise ValueError("--cases needs at least one alpha,beta pair")
    return pairs


def _run_fig_nc(args):
    import os

    import numpy as np

    from . import figures
    from .model import LESDE, Impacts
    from .phase import collapse_over_time
    from .solvers import initial_state, simulate

    cases = _cases(args.cases)
    K, R = args.K, args.runs
    y = np.repeat(np.arange(K), args.n)
    a = np.repeat([c[0] for c in cases], R)
    b = np.repeat([c[1] for c in cases], R)
    sgd = args.noise in ("sgd", "both")
    sde = LESDE(y, Impacts.intra_inter(a, b, K), "cross_entropy", sigma=args.sigma, noise=args.noise,
                lr=args.lr if sgd else None)
    x0 = initial_state(len(a), K * args.n, K, std=0.5, seed=args.seed + 1)
    ts = np.concatenate([[0.0], np.geomspace(1.0, args.T, 60)])
    sol = simulate(sde, x0, ts, args.dt, seed=args.seed, record="full", progress=True)
    names = [f"alpha = {c[0]:g}, beta = {c[1]:g}" for c in cases for _ in range(R)]
    frame = collapse_over_time(sol.states, y, readout="identity", runs=names)
    frame.insert(0, "t", sol.ts[frame["time_index"].to_numpy()])
    summary = frame.drop(columns="time_index").groupby(["run", "t"], sort=False).median().reset_index()
    summary = summary.rename(columns={"run": "case"})
    csv = os.path.splitext(args.out)[0] + ".csv"
    summary.to_csv(csv, index=False, float_format="%.6g")
    noise = (f"SGD sampling noise, lr = {args.lr:g}" if args.noise == "sgd" else
             f"additive sigma = {args.sigma:g}" if args.noise == "additive" else
             f"SGD noise (lr = {args.lr:g}) + additive sigma = {args.sigma:g}")
    title = f"cross-entropy LE-SDE, K = {K}, n = {args.n}, {noise}; medians over {R} runs"
    for case, g in summary.groupby("case", sort=False):
        last = g.iloc[-1]
        print(f"{case}: at t = {last['t']:g} NC1 {last['nc1']:.3g}, ETF angle {last['etf_angle']:.3g}, "
              f"equinorm {last['equinorm']:.3g}, NC3 {last['nc3']:.3g}, NC4 {last['nc4']:.3g}, "
              f"loss {last['loss']:.3g}, accuracy {last['accuracy']:.3g}")
    print(f"wrote {csv}")
    print(f"wrote {figures.plot_neural_collapse(summary, args.out, title=title)}")


def _run_fig_clouds(args):
    import numpy as np

    from . import figures
    from .model import LESDE, Impacts
    from .solvers import Solution, initial_state, simulate

    cases = _cases(args.cases)
    K = args.K
    y = np.repeat(np.arange(K), args.n)
    a = np.array([c[0] for c in cases])
    b = np.array([c[1] for c in cases])
    sgd = args.noise in ("sgd", "both")
    sde = LESDE(y, Impacts.intra_inter(a, b, K), args.drift, sigma=args.sigma, noise=args.noise,
                lr=args.lr if sgd else None, dim=K)
    x0 = initial_state(1, K * args.n, K, std=0.5, seed=args.seed + 1).expand(len(cases), -1, -1)
    ts = np.unique(np.concatenate([[0.0], np.asarray(args.times, dtype=float)]))
    sol = simulate(sde, x0, ts, args.dt, seed=args.seed, record="full", progress=True)
    out = {}
    for i, (ai, bi) in enumerate(cases):
        kind = "locally elastic" if ai > bi else "not elastic"
        out[f"{kind}: alpha = {ai:g}, beta = {bi:g}"] = Solution(
            ts=sol.ts, labels=sol.labels, class_means=sol.class_means[:, i:i + 1],
            within_cov=sol.within_cov[:, i:i + 1], states=sol.states[:, i:i + 1],
            overflow_time=sol.overflow_time[i:i + 1], params=sol.params)
    noise = f"SGD noise lr = {args.lr:g}" if args.noise == "sgd" else f"{args.noise} noise, sigma = {args.sigma:g}"
    print(f"wrote {figures.plot_feature_clouds(out, args.out, subtitle=f'{args.drift} drift, K = {K}, n = {args.n}, {noise}')}")


# Pattern for a new subcommand (keep imports of heavy modules inside _run_<name>):
#
# @_subcommand
# def _add_name(sub):
#     p = sub.add_parser("name", help="...")
#     p.add_argument(...)
#     p.set_defaults(func=_run_name)
#
# def _run_name(args):
#     from . import module
#     ...


# --------------------------------------------------------------------------------------------
# subcommands (local elasticity on networks)
# --------------------------------------------------------------------------------------------
@_subcommand
def _add_elasticity(sub):
    p = sub.add_parser(
        "elasticity",
        help="local elasticity of real networks: torus check, similarity matrix, "
        "He & Su clustering, Dan et al. tracking",
        description="Local elasticity measured on networks (He & Su, ICLR 2020; Dan et al., "
        "arXiv 2111.01166). Results go to --out as CSV plus figures.",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="elasticity_out", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_elasticity)
    jobs = p.add_subparsers(dest="job", metavar="JOB")
    jobs.required = True

    def data_args(q, classes, per_class):
        q.add_argument("--data", default="digits",
                       help="CIFAR-10 (batches dir, image folder or zip), or 'digits' for "
                       "scikit-learn's 8x8 digits (no download)")
        q.add_argument("--classes", nargs="+", default=classes, help="class names or indices")
        q.add_argument("--per-class", type=int, default=per_class)

    t = jobs.add_parser("torus", help="S_rel vs geodesic distance, ReLU vs linear MLP")
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    t.add_argument("--hidden", type=int, default=512)
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--lr-relu", type=float, default=0.01)
    t.add_argument("--lr-linear", type=float, default=0.001)

    m = jobs.add_parser("matrix", help="pairwise S matrix (row = update, column = probe)")
    data_args(m, ["0", "1"], 50)
    m.add_argument("--kind", choices=["relative", "kernelized", "kl"], default="relative")
    m.add_argument("--method", choices=["ntk", "step"], default="ntk")
    m.add_argument("--lr", type=float, default=1e-4, help="probe step size eta")
    m.add_argument("--normalize", action="store_true", help="normalised kernel")
    m.add_argument("--hidden", type=int, default=512)
    m.add_argument("--activation", default="relu", help="relu, tanh or linear")

    c = jobs.add_parser("cluster", help="He & Su's LE clustering of class pairs + baselines")
    c.add_argument("--data", default="digits")
    c.add_argument("--pairs", nargs="+", default=["3-5"],
                   help="class pairs a-b, e.g. automobile-cat deer-dog (or 3-5 for digits)")
    c.add_argument("--per-class", type=int, default=500, help="primary images per class")
    c.add_argument("--aux-per-class", type=int, default=50, help="auxiliary images from each other class")
    c.add_argument("--activations", nargs="+", default=["relu", "linear"])
    c.add_argument("--hidden", type=int, default=512)
    c.add_argument("--epochs", type=int, default=20)
    c.add_argument("--lr", type=float, default=0.01)
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--method", choices=["ntk", "step"], default="ntk")

    k = jobs.add_parser("track", help="Dan et al.: S_rel (KL and norm) during training")
    data_args(k, ["airplane", "automobile", "ship"], 5000)
    k.add_argument("--net", default="resnet18")
    k.add_argument("--width", type=float, default=0.25)
    k.add_argument("--probes", type=int, default=20, help="probe examples per class")
    k.add_argument("--test-per-class", type=int, default=500)
    k.add_argument("--epochs", type=int, default=7)
    k.add_argument("--batch-size", type=int, default=128)
    k.add_argument("--lr", type=float, default=1e-4)
    k.add_argument("--every", type=int, default=9, help="minibatches between records")


def _run_elasticity(args):
    import csv
    import json
    import os

    import numpy as np
    import torch

    from . import elasticity as el
    from . import figures
    from .nets import MLP, build_net

    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress

    def load(path, classes, per_class, split="train", seed=args.seed):
        """(x float tensor, labels 0..len(classes)-1) from CIFAR-10 or sklearn digits."""
        if path == "digits":
            from sklearn.datasets import load_digits

            X, Y = load_digits(return_X_y=True)
            rng = np.random.default_rng(seed + (split == "test"))
            xs, ys = [], []
            for i, cl in enumerate(classes):
                idx = np.where(Y == int(cl))[0]
                idx = rng.choice(idx, min(per_class, len(idx)), replace=False)
                xs.append(X[idx] / 16.0)
                ys.append(np.full(len(idx), i))
            return (torch.as_tensor(np.concatenate(xs), dtype=torch.float32),
                    torch.as_tensor(np.concatenate(ys)))
        from .data import load_cifar10

        cls = [int(c) if str(c).isdigit() else c for c in classes]
        return load_cifar10(path, split=split, classes=cls, per_class=per_class, seed=seed, as_tensor=True)

    def all_classes(path):
        if path == "digits":
            return [str(i) for i in range(10)]
        from .data import CIFAR10_CLASSES

        return list(CIFAR10_CLASSES)

    def write_csv(name, rows):
        with open(os.path.join(args.out, name), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {os.path.join(args.out, name)}")

    if args.job == "torus":
        rows, results = [], {}
        for act, lr in (("relu", args.lr_relu), (None, args.lr_linear)):
            for seed in args.seeds:
                r = el.torus_locality(act, seed=seed, hidden=args.hidden, steps=args.steps, lr=lr)
                rows.append({"network": act or "linear", "seed": seed, "pearson": r.pearson,
                             "train_accuracy": r.train_accuracy, "final_loss": r.final_loss})
                print(f"{act or 'linear':6s} seed {seed}: Pearson {r.pearson:+.3f}")
                results.setdefault(act or "linear", r)
        figures.plot_torus_locality(results, os.path.join(args.out, "torus_locality.png"))
        write_csv("torus_locality.csv", rows)
        return 0

    if args.job == "matrix":
        x, y = load(args.data, args.classes, args.per_class)
        torch.manual_seed(args.seed)
        net = MLP(x[0].numel(), hidden=(args.hidden,), num_classes=len(args.classes),
                  activation=None if args.activation == "linear" else args.activation)
        el.train_classifier(net, x, y, epochs=10, lr=0.05, loss="cross_entropy", seed=args.seed,
                            progress=progress)
        kw = {"lr": args.lr} if args.kind == "kl" else {"lr": args.lr, "method": args.method}
        s = el.similarity_matrix(net, x, y, kind=args.kind, normalize=args.normalize, **kw)
        np.savetxt(os.path.join(args.out, f"S_{args.kind}.csv"), s.numpy(), delimiter=",")
        means = el.class_pair_means(s, y)
        print("class-pair means (row = update class, column = probe class):")
        print(np.array2string(means.numpy(), precision=4))
        figures.plot_matrix(s.numpy(), f"S_{args.kind} (symmetrised)", os.path.join(args.out, f"S_{args.kind}.png"))
        return 0

    if args.job == "cluster":
        rows = []
        names = all_classes(args.data)
        for pair in args.pairs:
            a, b = pair.split("-")
            others = [c for c in names if c not in (a, b) and str(names.index(c)) not in (a, b)]
            xp, yp = load(args.data, [a, b], args.per_class)
            xa, _ = load(args.data, others, args.aux_per_class)
            for act in args.activations:
                torch.manual_seed(args.seed)
                net = MLP(xp[0].numel(), hidden=(args.hidden,), num_classes=1,
                          activation=None if act == "linear" else act)
                res = el.cluster_pair(net, xp, yp, xa, epochs=args.epochs, lr=args.lr,
                                      batch_size=args.batch_size, method=args.method,
                                      baselines=(act == args.activations[0]), seed=args.seed,
                                      progress=progress)
                for meth, acc in res.accuracy.items():
                    net_name = act if not meth.startswith(("kmeans_raw", "pca")) else "-"
                    rows.append({"pair": pair, "network": net_name, "method": meth, "accuracy": round(acc, 4)})
                    print(f"{pair:18s} {net_name:7s} {meth:18s} {acc:.3f}")
        write_csv("clustering.csv", rows)
        return 0

    # track
    x, y = load(args.data, args.classes, args.per_class)
    xt, yt = load(args.data, args.classes, args.test_per_class, split="test")
    rng = np.random.default_rng(args.seed)
    probe = np.concatenate([rng.choice(np.where(y.numpy() == c)[0], args.probes, replace=False)
                            for c in range(len(args.classes))])
    torch.manual_seed(args.seed)
    if args.net == "mlp":
        net = MLP(x[0].numel(), hidden=(512,), num_classes=len(args.classes))
    else:
        net = build_net(args.net, len(args.classes), width=args.width, batchnorm=False, in_channels=x.shape[1])
    frame = el.track_elasticity(net, x, y, x[probe], y[probe], epochs=args.epochs, batch_size=args.batch_size,
                                lr=args.lr, every=args.every, x_test=xt, y_test=yt, seed=args.seed,
                                progress=progress)
    frame.to_csv(os.path.join(args.out, "tracking.csv"), index=False)
    summary = {m: el.tracking_summary(frame, m) for m in ("kl", "kl_compat", "norm")}
    with open(os.path.join(args.out, "tracking_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    figures.plot_elasticity_tracking(frame, [str(c) for c in args.classes], os.path.join(args.out, "tracking.png"))
    print(f"wrote {args.out}/tracking.csv, tracking_summary.json, tracking.png")
    return 0


# --------------------------------------------------------------------------------------------
# subcommands (training real networks with tracked trajectories)
# --------------------------------------------------------------------------------------------
@_subcommand
def _add_train(sub):
    p = sub.add_parser(
        "train",
        help="train a network and log tracked features/logits to a trajectory store",
        description="Train a network on CIFAR-10 classes or GeoMNIST with SGD or Adam and log, "
        "every --log-every steps, the penultimate features and logits of m tracked samples per "
        "class (train and test), train/test loss and accuracy, and optionally the measured "
        "impact matrix, to a resumable Zarr store. Running the same command again resumes.",
    )
    p.add_argument("store", help="directory of the trajectory store (created, or resumed)")
    p.add_argument("--config", default=None,
                   help="TrainConfig JSON file; when given, the run options below are ignored")
    d = p.add_argument_group("data")
    d.add_argument("--data", choices=("cifar10", "geomnist"), default="cifar10")
    d.add_argument("--data-path", default=None,
                   help="CIFAR-10 zip, image folder or python batches (default: $LESDE_CIFAR10)")
    d.add_argument("--classes", nargs="+", default=["airplane", "automobile", "bird"],
                   help="CIFAR-10 class names or indices")
    d.add_argument("--per-class", type=int, default=2500, help="train images per class")
    d.add_argument("--test-per-class", type=int, default=None,
                   help="test images per class (default: all; GeoMNIST: 500)")
    d.add_argument("--p-err", type=float, default=0.0, help="GeoMNIST label-noise level")
    d.add_argument("--geomnist-variant", choices=("zhang2021", "analytic"), default="zhang2021",
                   help="GeoMNIST generator: the authors' (default; train and test are a random "
                   "split of one sweep, label noise on train only) or the earlier analytic one")
    d.add_argument("--data-seed", type=int, default=0)
    r = p.add_argument_group("run")
    r.add_argument("--net", default="resnet18", choices=("resnet18", "resnet20", "lenet", "mlp"))
    r.add_argument("--width", type=float, default=None, help="ResNet width factor")
    r.add_argument("--net-kwargs", default="{}", help="extra build_net kwargs as JSON")
    r.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    r.add_argument("--lr", type=float, default=0.02)
    r.add_argument("--momentum", type=float, default=0.9)
    r.add_argument("--weight-decay", type=float, default=5e-4)
    r.add_argument("--batch-size", type=int, default=128)
    r.add_argument("--sampling", choices=("reshuffle", "replacement"), default="reshuffle",
                   help="samples per epoch by reshuffling, or drawn uniformly with replacement")
    length = r.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=0)
    length.add_argument("--epochs", type=float, default=0.0)
    r.add_argument("--log-every", type=int, default=10)
    r.add_argument("--track", type=int, default=100, help="tracked train samples per class")
    r.add_argument("--track-test", type=int, default=100, help="tracked test samples per class")
    r.add_argument("--eval-train", type=int, default=0,
                   help="train-metric subset size (0: tracked only, -1: all)")
    r.add_argument("--eval-test", type=int, default=-1,
                   help="test-metric subset size (0: tracked only, -1: all)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    r.add_argument("--device", default="cpu")
    r.add_argument("--checkpoint-every", type=int, default=0)
    r.add_argument("--impacts-every", type=int, default=0)
    r.add_argument("--impacts-per-class", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def _run_train(args):
    import json
    import os

    import torch

    from . import data as _data
    from .tracking import TrainConfig, train_and_track

    if args.data == "cifar10":
        path = args.data_path or os.environ.get("LESDE_CIFAR10", "")
        if not path:
            raise ValueError("no CIFAR-10 location: give --data-path or set LESDE_CIFAR10")
        classes = [int(c) if c.isdigit() else c for c in args.classes]
        names = [_data.CIFAR10_CLASSES[c] if isinstance(c, int) else c for c in classes]
        train = _data.load_cifar10(path, "train", classes=classes, per_class=args.per_class,
                                   seed=args.data_seed, as_tensor=True)
        test = _data.load_cifar10(path, "test", classes=classes, per_class=args.test_per_class,
                                  seed=args.data_seed, as_tensor=True)
        in_channels = 3
    else:
        names = list(_data.GEOMNIST_CLASSES)
        if args.geomnist_variant == "zhang2021":
            g_tr, g_te = _data.geomnist_train_val(args.per_class, args.test_per_class or 500,
                                                  seed=args.data_seed, p_err=args.p_err)
        else:
            g_tr = _data.make_geomnist(args.per_class, seed=args.data_seed, p_err=args.p_err,
                                       variant="analytic")
            g_te = _data.make_geomnist(args.test_per_class or 500, seed=args.data_seed + 1,
                                       variant="analytic")
        train = (torch.from_numpy(g_tr.images), torch.from_numpy(g_tr.labels))
        test = (torch.from_numpy(g_te.images), torch.from_numpy(g_te.clean_labels))
        in_channels = 1
    if args.config:
        with open(args.config) as fh:
            config = TrainConfig.from_json(fh.read())
    else:
        net_kwargs = json.loads(args.net_kwargs)
        if args.net.startswith("resnet"):
            net_kwargs.setdefault("in_channels", in_channels)
            if args.width is not None:
                net_kwargs.setdefault("width", args.width)
        elif args.net == "lenet":
            net_kwargs.setdefault("in_channels", in_channels)
        elif args.net == "mlp":
            net_kwargs.setdefault("in_dim", int(train[0][0].numel()))
        steps, epochs = args.steps, args.epochs
        if steps <= 0 and epochs <= 0:
            epochs = 1.0
        config = TrainConfig(
            net=args.net, num_classes=len(names), net_kwargs=net_kwargs,
            optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
            weight_decay=args.weight_decay, batch_size=args.batch_size, steps=steps,
            epochs=epochs, log_every=args.log_every, track_per_class=args.track,
            track_test_per_class=args.track_test, eval_train_size=args.eval_train,
            eval_test_size=args.eval_test, seed=args.seed, dtype=args.dtype,
            device=args.device, checkpoint_every=args.checkpoint_every,
            impacts_every=args.impacts_every, impacts_per_class=args.impacts_per_class,
            class_names=tuple(str(n) for n in names), sampling=args.sampling,
        )
    store = train_and_track(config, train, test, args.store, progress=not args.no_progress)
    m = store.metrics()
    print(f"{store.path}: T={len(store)} logged times, step {int(m['step'][-1])}, "
          f"train_acc {m['train_acc'][-1]:.4f}, test_acc {m['test_acc'][-1]:.4f}")
    return 0


# --------------------------------------------------------------------------------------------
# subcommands (published protocols: several tracked trials each)
# --------------------------------------------------------------------------------------------
@_subcommand
def _add_reproduce(sub):
    p = sub.add_parser(
        "reproduce",
        help="run a published training protocol (several tracked trials per setting)",
        description="Run or resume the trials of a named protocol (lesde.protocols): e.g. "
        "zhang2021-geomnist (LeNet float64, SGD batch 1, lr 0.005, 10,000 iterations, p_err 0, "
        "0.3, 2/3) or zhang2021-cifar10 (three classes, lr 0.001, 30,000 iterations). Every "
        "trial is a resumable trajectory store OUT/<setting>/trial_<i>; running the same "
        "command again continues the unfinished trials. --list shows the protocols.",
    )
    p.add_argument("protocol", nargs="?", help="protocol name (see --list)")
    p.add_argument("out", nargs="?", help="run directory (created, or resumed)")
    p.add_argument("--list", action="store_true", help="list the protocols and exit")
    p.add_argument("--trials", type=int, default=None,
                   help="trials per setting (default: the protocol's); trial i has seed i")
    p.add_argument("--p-err", type=float, nargs="+", default=None,
                   help="settings to run (GeoMNIST label noise; default: the protocol's)")
    p.add_argument("--workers", type=int, default=1, help="trials run at once (processes)")
    p.add_argument("--scheduler", default=None,
                   help="address of a Dask scheduler to run the trials on instead")
    p.add_argument("--data-path", default=None, help="CIFAR-10 location (default: $LESDE_CIFAR10)")
    p.add_argument("--summary", default=None, metavar="DIR",
                   help="afterwards write the small outputs (per-setting summaries, tables, "
                   "figure) to DIR")
    p.add_argument("--summary-only", action="store_true",
                   help="write the summary of the finished trials without training")
    p.add_argument("--nc", action="store_true",
                   help="summary: NC1-NC4 of the tracked features over training (needs the "
                   "recorded read-out, e.g. cifar10-resnet18-k10)")
    o = p.add_argument_group("overrides (short checks; stored with the run)")
    o.add_argument("--steps", type=int, default=None)
    o.add_argument("--log-every", type=int, default=None)
    o.add_argument("--train-per-class", type=int, default=None)
    o.add_argument("--val-per-class", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_reproduce)


def _run_reproduce(args):
    import os
    import time

    from . import protocols as pr

    if args.list:
        for name, proto in pr.PROTOCOLS.items():
            print(f"{name}: {proto.description}; {proto.trials} trial(s) per setting by default "
                  f"(publication: {proto.paper_trials or '-'})")
        return 0
    if not args.protocol or not args.out:
        raise ValueError("give a protocol name and a run directory (or --list)")
    overrides = {k: v for k, v in (("steps", args.steps), ("log_every", args.log_every),
                                   ("train_per_class", args.train_per_class),
                                   ("val_per_class", args.val_per_class)) if v is not None}
    if not args.summary_only:
        client = None
        if args.scheduler:
            from distributed import Client

            client = Client(args.scheduler)
        t0 = time.perf_counter()
        recs = pr.run_protocol(args.protocol, args.out, trials=args.trials, p_errs=args.p_err,
                               workers=args.workers, client=client, data_path=args.data_path,
                               threads=args.threads, progress=not args.no_progress,
                               **overrides)
        wall = time.perf_counter() - t0
        for r in recs:
            f = r["final"]
            print(f"{r['store']}: test_acc {f['test_acc']:.4f} test_loss {f['test_loss']:.4f} "
                  f"({r['wall_seconds']:.0f} s)")
        print(f"{len(recs)} trials; this session {wall:.0f} s")
    if args.summary or args.summary_only:
        dest = args.summary or os.path.join(args.out, "summary")
        files = pr.write_protocol_summary(args.out, dest, nc=args.nc)
        print(f"wrote {len(files)} files to {dest}")
    return 0


_RECONCILE_VARIANTS = {
    "as-trained": {},
    "no-momentum": {"momentum": False},
    "bn-eval": {"batchnorm_train": False},
    "no-momentum-bn-eval": {"momentum": False, "batchnorm_train": False},
    "lr/10": {"lr_scale": 0.1},
}


@_subcommand
def _add_reconcile(sub):
    p = sub.add_parser(
        "reconcile",
        help="measured vs fitted impacts: SGD's drift over log intervals from a trial's state",
        description="From the state of a protocol trial at a step (a kept snapshot, or the trial "
        "run again to that step), compare over intervals of SGD steps: the impacts measured on "
        "the network, its first-order drift, the kernel flow (NTK frozen), the cross-entropy "
        "LE-SDE with the measured E, and replicas of real SGD (variants without momentum or "
        "with BatchNorm in evaluation mode), each summarised by the intra/inter impacts a "
        "left-rule fit of the increments would give (lesde.reconcile).",
    )
    p.add_argument("run", help="protocol run directory (lesde reproduce)")
    p.add_argument("--setting", default="p000", help="setting, e.g. p000, p030, p067")
    p.add_argument("--trial", type=int, default=0)
    p.add_argument("--step", type=int, required=True, help="optimizer step of the state")
    p.add_argument("--intervals", default="1,5,20,50",
                   help="comma list of interval lengths in SGD steps (default %(default)s)")
    p.add_argument("--replicas", type=int, default=200, help="SGD replicas per variant")
    p.add_argument("--probe-per-class", type=int, default=30,
                   help="tracked training samples per class used as probes")
    p.add_argument("--variants", nargs="+", default=["as-trained"],
                   choices=sorted(_RECONCILE_VARIANTS), help="SGD variants")
    p.add_argument("--data-path", default=None, help="CIFAR-10 location (default: $LESDE_CIFAR10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for the CSV / JSON / markdown")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_reconcile)


def _run_reconcile(args):
    import csv
    import json
    import os
    import time

    import numpy as np
    import torch

    from .protocols import protocol_state
    from .reconcile import compare_interval
    from .tracking import load_store

    intervals = sorted({int(v) for v in str(args.intervals).split(",") if v.strip()})
    if not intervals or intervals[0] < 1:
        raise ValueError(f"--intervals must be positive step counts, got {args.intervals!r}")
    t0 = time.perf_counter()
    model, opt, (train, _), info = protocol_state(args.run, args.setting, args.trial, args.step,
                                                  data_path=args.data_path)
    cfg = info["config"]
    store = os.path.join(args.run, args.setting, f"trial_{args.trial:03d}")
    st = load_store(store)
    sel = np.flatnonzero(st.split == 0)
    lab = st.labels[sel]
    probe = np.concatenate([sel[lab == c][: args.probe_per_class]
                            for c in range(cfg.num_classes)])
    x_tr = train[0].to(cfg.torch_dtype)
    x_probe = x_tr[torch.as_tensor(st.index[probe])]
    y_probe = torch.as_tensor(st.labels[probe])
    variants = {v: _RECONCILE_VARIANTS[v] for v in args.variants}
    res = compare_interval(model, opt, x_tr, train[1], x_probe, y_probe, intervals,
                           replicas=args.replicas, batch_size=cfg.batch_size,
                           replacement=cfg.sampling == "replacement", sgd_variants=variants,
                           seed=args.seed, progress=not args.no_progress)
    wall = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"{os.path.basename(os.path.normpath(args.run))}_"
                                  f"{args.setting}_trial{args.trial}_step{args.step}")
    rows = res.rows()
    with open(base + ".csv", "w", newline="") as f:
        keys = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    dec = [res.decomposition(n, v, q) for v in variants for n in intervals
           for q in ("contrast", "alpha")]
    with open(base + ".json", "w") as f:
        json.dump({"run": os.path.basename(os.path.normpath(args.run)), "setting": args.setting,
                   "trial": args.trial, "step": args.step, "lr": res.lr,
                   "state_source": info["source"], "max_logit_diff": info["max_logit_diff"],
                   "probe_per_class": args.probe_per_class, "replicas": args.replicas,
                   "alpha_hat": res.alpha_hat, "beta_hat": res.beta_hat,
                   "E_hat": np.asarray(res.E_hat).tolist(), "wall_seconds": wall,
                   "decomposition": dec}, f, indent=1)
    lines = [f"state: {args.run} {args.setting} trial {args.trial} step {args.step} "
             f"({info['source']}); alpha_hat {res.alpha_hat:.4g}, beta_hat {res.beta_hat:.4g}",
             "", "| variant | steps | quantity | measured | first-order drift (probe / whole "
             "set) | kernel flow | class-pair flow | SGD [95%] | total gap [95%] | form | time "
             "scale | rest [95%] |",
             "|---|---:|---|---:|---|---:|---:|---|---|---:|---:|---|"]
    for d in dec:
        lines.append(
            f"| {d['variant']} | {d['steps']} | {d['quantity']} | {d['measured']:.4g} | "
            f"{d['kernel@0']:.4g} / {d['full_set@0']:.4g} | {d['kernel_flow']:.4g} | "
            f"{d['class_pair_flow']:.4g} | "
            f"{d['sgd']:.4g} [{d['sgd_lo']:.3g}, {d['sgd_hi']:.3g}] | {d['total']:.3g} "
            f"[{d['total_band'][0]:.3g}, {d['total_band'][1]:.3g}] | {d['form']:.3g} | "
            f"{d['time_scale']:.3g} | {d['rest']:.3g} [{d['rest_band'][0]:.3g}, "
            f"{d['rest_band'][1]:.3g}] |")
    text = "\n".join(lines) + "\n"
    with open(base + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {base}.csv, .json, .md ({wall:.0f} s)")
    return 0


# --------------------------------------------------------------------------------------------
# subcommands (fitting the SDE to logged training)
# --------------------------------------------------------------------------------------------
@_subcommand
def _add_fit(sub):
    p = sub.add_parser(
        "fit",
        help="fit the LE-SDE impacts to a logged training run (a trajectory store)",
        description="Estimate A(t), B(t), alpha(t), beta(t) (I- and L-estimators) and the K x K "
        "impact matrix E(t) (windowed regression) from the tracked samples of a trajectory "
        "store, with bootstrap bands; optionally simulate the fitted SDE and compare "
        "(Zhang, Wang & Su, NeurIPS 2021). Results go to --out as CSV and JSON.",
    )
    p.add_argument("store", nargs="+",
                   help="trajectory store directory written by train_and_track; several stores "
                   "(runs with other seeds, same log times and tracked labels) are fitted as "
                   "independent trials, which identifies the full E of the cross-entropy field")
    p.add_argument("--out", default="fit_out", help="output directory")
    p.add_argument("--what", choices=("logits", "features"), default="logits",
                   help="which logged array is X (default logits)")
    p.add_argument("--split", choices=("train", "test", "all"), default="train",
                   help="which tracked samples (default train)")
    p.add_argument("--estimators", default="i,l,regression",
                   help="comma-separated subset of i, l, regression (l needs p = K)")
    p.add_argument("--field", default=None,
                   help="drift field of the regression and of the simulated SDE: identity, "
                   "label_projection, cross_entropy (default: cross_entropy for logits, identity "
                   "for features)")
    p.add_argument("--sg-window", type=int, default=None,
                   help="Savitzky-Golay window for alpha, beta (odd; default: the odd number "
                   "nearest T/10, at least 5)")
    p.add_argument("--reg-window", type=int, default=None,
                   help="increments per regression window (default max(5, (T-1)//20))")
    p.add_argument("--degree", type=int, default=0,
                   help="polynomial degree in time of E inside a regression window")
    p.add_argument("--quadrature", choices=("left", "trapezoid"), default="left",
                   help="rule for the integral of the drift over a log interval: left point "
                   "(exact for one step per log entry, unbiased with noise) or trapezoid "
                   "(second order on smooth, coarsely logged paths)")
    p.add_argument("--n-bootstrap", type=int, default=200, help="bootstrap resamples (0: none)")
    p.add_argument("--bootstrap", default="auto", choices=("auto", "samples", "trials", "both", "none"))
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the bands")
    p.add_argument("--on-empty", choices=("raise", "nan"), default="nan",
                   help="times where no ratio is usable (sign changes): NaN (default) or error")
    p.add_argument("--tail", type=float, default=0.5,
                   help="fraction of the log-time range used for the tail index of A")
    p.add_argument("--gof-paths", type=int, default=0,
                   help="simulate this many paths of each fitted SDE and compare (0: skip)")
    p.add_argument("--gof-noise", choices=("sgd", "additive", "both", "none"), default="sgd",
                   help="noise of the simulated SDE: SGD sampling noise at the run's lr (default), "
                   "additive at the fitted sigma, both, or none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.set_defaults(func=_run_fit)


def _run_fit(args):
    import csv
    import json
    import os

    import numpy as np

    from . import fit as lf
    from .tracking import load_store

    def write_csv(name, columns):
        keys = list(columns)
        rows = np.column_stack([np.asarray(columns[k], dtype=float) for k in keys])
        with open(os.path.join(args.out, name), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(keys)
            w.writerows(rows.tolist())

    stores = [load_store(path) for path in args.store]
    store = stores[0]
    traj = lf.as_trajectory(stores if len(stores) > 1 else store, what=args.what,
                            split=args.split)
    names = [s.strip().lower() for s in args.estimators.split(",") if s.strip()]
    unknown = sorted(set(names) - {"i", "l", "regression"})
    if unknown:
        raise ValueError(f"--estimators: unknown {unknown}; use i, l, regression")
    field = args.field or ("cross_entropy" if args.what == "logits" else "identity")
    os.makedirs(args.out, exist_ok=True)
    summary = {"store": "+".join(os.path.basename(os.path.normpath(path)) for path in args.store),
               "trials": traj.R, "what": args.what,
               "split": args.split, "T": traj.T, "N": traj.N, "p": traj.p, "K": traj.K,
               "field": field, "n_bootstrap": args.n_bootstrap, "seed": args.seed,
               "level": args.level, "estimators": {}}
    fitted = {}
    common = dict(n_bootstrap=args.n_bootstrap, bootstrap=args.bootstrap, level=args.level, seed=args.seed)
    for name in names:
        if name == "l" and traj.p != traj.K:
            print(f"lesde fit: skipping the L-estimator (p = {traj.p} != K = {traj.K})")
            continue
        if name in ("i", "l"):
            Est = lf.IEstimator if name == "i" else lf.LEstimator
            est = Est(window=args.sg_window, on_empty=args.on_empty, **common).fit(traj)
            write_csv(f"{name}_estimator.csv", est.results())
            ok = np.isfinite(est.alpha_) & np.isfinite(est.beta_)
            info = {"A_final": float(est.A_[-1]), "B_final": float(est.B_[-1]),
                    "window": int(est.window_),
                    "fraction_times_usable": float(np.mean(np.isfinite(est.A_)))}
            if ok.any():
                i_max = int(np.flatnonzero(ok)[np.argmax(est.alpha_[ok])])
                info.update(alpha_max=float(est.alpha_[i_max]), t_alpha_max=float(est.ts_[i_max]),
                            fraction_alpha_gt_beta=float(np.mean(est.alpha_[ok] > est.beta_[ok])))
            try:
                info["tail_index_A"] = est.tail_index(tail=args.tail)
            except ValueError as exc:
                info["tail_index_A"] = str(exc)
            if est.bands_:
                info["A_final_band"] = est.bands_["A"][:, -1].tolist()
                info["B_final_band"] = est.bands_["B"][:, -1].tolist()
        else:
            est = lf.RegressionEstimator(field, window=args.reg_window, degree=args.degree,
                                         quadrature=args.quadrature, **common).fit(traj)
            write_csv("regression.csv", est.results())
            info = {"window": int(est.window_), "alpha": est.alpha_.tolist(), "beta": est.beta_.tolist(),
                    "sigma": est.sigma_.tolist(), "condition_max": float(np.max(est.condition_)),
                    "fraction_alpha_gt_beta": float(np.mean(est.alpha_ > est.beta_))}
        fitted[name] = est
        summary["estimators"][name] = info
        print(f"lesde fit: {type(est).__name__} done")
    measured = None
    try:
        measured = store.impacts()
        write_csv("measured_impacts.csv", {"t": measured["time"], "alpha": measured["alpha"],
                                           "beta": measured["beta"]})
        summary["measured_impacts"] = "measured_impacts.csv"
    except ValueError:
        pass
    from .figures import plot_fit, plot_goodness_of_fit

    run_name = summary["store"]
    if fitted:
        plot_fit(traj.ts, fitted, measured, os.path.join(args.out, "fit.png"),
                 title=f"{run_name}: {args.what} of the tracked {args.split} samples")
        summary["figures"] = ["fit.png"]
    if args.gof_paths > 0:
        gof_field = {"i": "identity", "l": "label_projection", "regression": field}
        summary["goodness_of_fit"] = {}
        for name, est in fitted.items():
            if name in ("i", "l") and not np.isfinite(est.alpha_).any():
                continue  # no usable alpha(t) to simulate
            lr = store.config.lr if args.gof_noise in ("sgd", "both") else None
            gof = lf.goodness_of_fit(traj, est, gof_field[name], n_paths=args.gof_paths, seed=args.seed,
                                     level=args.level, noise=args.gof_noise, lr=lr)
            summary["goodness_of_fit"][name] = gof.summary()
            np.savez_compressed(os.path.join(args.out, f"gof_{name}.npz"), ts=gof.ts,
                                logged_means=gof.logged_means, sim_means=gof.sim_means, sim_lo=gof.sim_lo,
                                sim_hi=gof.sim_hi, logged_spread=gof.logged_spread,
                                sim_spread=gof.sim_spread, logged_accuracy=gof.logged_accuracy,
                                sim_accuracy=gof.sim_accuracy)
            primary = next(n for n in ("regression", "i", "l") if n in fitted)
            png = "goodness_of_fit.png" if name == primary else f"goodness_of_fit_{name}.png"
            plot_goodness_of_fit(gof, os.path.join(args.out, png), class_names=store.class_names,
                                 title=f"{run_name}: {type(est).__name__} ({gof_field[name]} "
                                 f"drift, {args.gof_noise} noise)")
            summary.setdefault("figures", []).append(png)

    def clean(v):  # strict JSON: NaN / inf -> null
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (float, np.floating)):
            return float(v) if np.isfinite(v) else None
        return v

    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(clean(summary), f, indent=2)
    print(f"lesde fit: results in {args.out}")
    return 0


# --------------------------------------------------------------------------------------------
# the parser
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lesde",
        description="Locally elastic stochastic differential equations: simulate, sweep, "
        "train and track real networks, fit, and draw the figures.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for _name, add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _threads(args)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError) as exc:  # user errors: one clear line
        print(f"lesde {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
