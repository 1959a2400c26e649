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
        g_tr = _data.make_geomnist(args.per_class, seed=args.data_seed, p_err=args.p_err)
        g_te = _data.make_geomnist(args.test_per_class or 500, seed=args.data_seed + 1)
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
            class_names=tuple(str(n) for n in names),
        )
    store = train_and_track(config, train, test, args.store, progress=not args.no_progress)
    m = store.metrics()
    print(f"{store.path}: T={len(store)} logged times, step {int(m['step'][-1])}, "
          f"train_acc {m['train_acc'][-1]:.4f}, test_acc {m['test_acc'][-1]:.4f}")
    return 0


# --------------------------------------------------------------------------------------------
# subcommands (fitting the SDE to logged training)
# --------------------------------------------------------------------------------------------
_FIT_ESTIMATORS = ("shooting", "i", "l", "regression")


@_subcommand
def _add_fit(sub):
    p = sub.add_parser(
        "fit",
        help="fit the LE-SDE to a log: a trajectory store, a lesde simulate file or an .npz",
        description="Fit the impacts E(t) of the LE-SDE to logged per-sample trajectories by "
        "trajectory matching (multiple shooting, the default), with the noise (additive sigma(t) "
        "and the SGD noise's learning rate) and bands; optionally the closed-form I/L "
        "estimators and the windowed regression beside it; a held-out model comparison (I, L, "
        "cross-entropy, cross-entropy + additive noise); both tail indices of A(t). Prints "
        "alpha, beta with bands and the model table; writes CSV, JSON and figures to --out.",
    )
    p.add_argument("log", nargs="+",
                   help="a trajectory store directory, a `lesde simulate` solution (.npz), or an "
                   ".npz with features (T, N, p) or (R, T, N, p), labels (N,) and ts (T,); "
                   "several logs (same times and tracked labels) are fitted as independent trials")
    p.add_argument("--out", default="fit_out", help="output directory")
    d = p.add_argument_group("data")
    d.add_argument("--what", choices=("logits", "features"), default="logits",
                   help="which logged array is X (stores; .npz: the array of this name, else "
                   "'features'; default logits)")
    d.add_argument("--split", choices=("train", "test", "all"), default="train",
                   help="which tracked samples (default train)")
    d.add_argument("--lr", type=float, default=None,
                   help="the run's learning rate, to count time in SGD iterations for the "
                   "paper's tail index (default: a store's config; .npz: the lr-scaled time is "
                   "read as is)")
    m = p.add_argument_group("model (trajectory matching)")
    m.add_argument("--field", default=None,
                   help="drift field: identity, label_projection, cross_entropy (default: "
                   "cross_entropy when p = K, else identity)")
    m.add_argument("--matrix", choices=("intra_inter", "full"), default="intra_inter",
                   help="E = (alpha - beta) I + beta 11^T (default) or a full K x K matrix")
    m.add_argument("--time", choices=("piecewise_linear", "constant", "power_law"),
                   default="piecewise_linear", help="how E depends on t (default piecewise_linear)")
    m.add_argument("--knots", default=None,
                   help="piecewise-linear knots: a number (equally spaced, default 11) or a "
                   "comma list of times")
    m.add_argument("--t0", type=float, default=1.0, help="time scale of the power law (1.0)")
    m.add_argument("--noise", choices=("both", "additive", "sgd", "none"), default="both",
                   help="noise model of the weights and the parametric bootstrap (default both)")
    b = p.add_argument_group("bands")
    b.add_argument("--bootstrap", default="auto",
                   choices=("auto", "sandwich", "parametric", "samples", "trials", "both", "none"),
                   help="band method (default auto: parametric bootstrap when --n-bootstrap > 0)")
    b.add_argument("--n-bootstrap", type=int, default=200, help="bootstrap resamples (200)")
    b.add_argument("--interval", choices=("basic", "percentile", "normal"), default="basic")
    b.add_argument("--level", type=float, default=0.95, help="level of the bands (0.95)")
    b.add_argument("--jobs", type=int, default=1, help="processes for the bootstrap refits")
    b.add_argument("--dask-scheduler", default=None, metavar="ADDRESS",
                   help="run the bootstrap refits on this Dask scheduler")
    o = p.add_argument_group("other estimators and checks")
    o.add_argument("--estimators", default="shooting",
                   help="comma-separated subset of shooting, i, l, regression (default shooting)")
    o.add_argument("--sg-window", type=float, default=None,
                   help="I/L estimators: width in time units of the local quadratic for "
                   "alpha = dA/dt (default 4 median log intervals)")
    o.add_argument("--reg-window", type=int, default=None,
                   help="regression: increments per window (default max(5, (T-1)//20))")
    o.add_argument("--degree", type=int, default=1, help="regression: degree of E in a window")
    o.add_argument("--quadrature", choices=("trapezoid", "left"), default="trapezoid",
                   help="regression: quadrature rule over a log interval")
    o.add_argument("--on-reversed", choices=("abs", "nan", "raise"), default="abs",
                   help="I/L estimators: a mode turned against its start (default: magnitude)")
    o.add_argument("--tail", type=float, default=0.5,
                   help="log-log tail index: fraction (0, 1] of the log-time range (0.5)")
    o.add_argument("--tail-iterations", type=float, default=1000.0,
                   help="the paper's tail index: the last this-many SGD iterations (1000)")
    o.add_argument("--compare", type=float, default=0.5, metavar="FRACTION",
                   help="held-out model comparison: fit on this fraction of the run, score the "
                   "rest (0: skip; default 0.5)")
    o.add_argument("--compare-paths", type=int, default=50,
                   help="simulated paths per model of the comparison (50)")
    o.add_argument("--gof-paths", type=int, default=0,
                   help="simulate this many paths of each fitted SDE over the whole log (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.set_defaults(func=_run_fit)


def _check_fit_args(args) -> list:
    """Every bad argument of ``lesde fit`` is a ValueError before any work starts."""
    names = [s.strip().lower() for s in args.estimators.split(",") if s.strip()]
    unknown = sorted(set(names) - set(_FIT_ESTIMATORS))
    if unknown or not names:
        raise ValueError(f"--estimators: unknown {unknown or 'empty'}; use "
                         f"{', '.join(_FIT_ESTIMATORS)}")
    checks = [
        (0 < args.tail <= 1, f"--tail must be a fraction in (0, 1], got {args.tail}"),
        (args.tail_iterations > 0,
         f"--tail-iterations must be positive, got {args.tail_iterations}"),
        (args.n_bootstrap >= 0, f"--n-bootstrap must be >= 0, got {args.n_bootstrap}"),
        (0 < args.level < 1, f"--level must be in (0, 1), got {args.level}"),
        (args.jobs >= 1, f"--jobs must be >= 1, got {args.jobs}"),
        (args.gof_paths == 0 or args.gof_paths >= 2,
         f"--gof-paths must be 0 or >= 2, got {args.gof_paths}"),
        (args.compare == 0 or 0 < args.compare < 1,
         f"--compare must be 0 or a fraction in (0, 1), got {args.compare}"),
        (args.compare_paths >= 2, f"--compare-paths must be >= 2, got {args.compare_paths}"),
        (args.t0 > 0, f"--t0 must be positive, got {args.t0}"),
        (args.sg_window is None or args.sg_window > 0,
         f"--sg-window must be a positive width in time units, got {args.sg_window}"),
        (args.reg_window is None or args.reg_window >= 1,
         f"--reg-window must be >= 1, got {args.reg_window}"),
        (args.degree >= 0, f"--degree must be >= 0, got {args.degree}"),
        (args.lr is None or args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (not (args.bootstrap in ("samples", "trials", "both", "parametric")
              and args.n_bootstrap < 2),
         f"--bootstrap {args.bootstrap} needs --n-bootstrap >= 2"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    if args.knots is not None:
        try:
            vals = [float(v) for v in str(args.knots).split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--knots must be a number or a comma list of times, got "
                             f"{args.knots!r}") from None
        if not vals or (len(vals) == 1 and (vals[0] < 1 or vals[0] != int(vals[0]))):
            raise ValueError(f"--knots must be a positive integer or a list of times, got "
                             f"{args.knots!r}")
        args.knots = int(vals[0]) if len(vals) == 1 else vals
    return names


def _run_fit(args):
    import csv
    import json
    import os
    import warnings

    import numpy as np

    from . import fit as lf

    names = _check_fit_args(args)

    def write_csv(name, columns):
        keys = list(columns)
        rows = np.column_stack([np.asarray(columns[k], dtype=float) for k in keys])
        path = os.path.join(args.out, name)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(keys)
            w.writerows(rows.tolist())
        written.append(path)

    def clean(v):  # strict JSON: NaN / inf -> null
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, np.ndarray):
            return clean(v.tolist())
        if isinstance(v, (float, np.floating)):
            return float(v) if np.isfinite(v) else None
        if isinstance(v, np.integer):
            return int(v)
        return v

    from .tracking import load_store

    stores = [load_store(p) if os.path.isdir(p) else None for p in args.log]
    srcs = [s if s is not None else p for s, p in zip(stores, args.log)]
    traj = lf.as_trajectory(srcs if len(srcs) > 1 else srcs[0], what=args.what, split=args.split)
    store = stores[0]
    client = None
    if args.dask_scheduler:
        from distributed import Client

        client = Client(args.dask_scheduler)
    field = args.field or ("cross_entropy" if traj.p == traj.K else "identity")
    os.makedirs(args.out, exist_ok=True)
    written = []
    run_name = "+".join(os.path.splitext(os.path.basename(os.path.normpath(p)))[0]
                        for p in args.log)
    lr_run = args.lr if args.lr is not None else (store.config.lr if store is not None else None)
    summary = {"log": run_name, "store": run_name, "trials": traj.R, "what": args.what,
               "split": args.split, "T": traj.T, "N": traj.N, "p": traj.p, "K": traj.K,
               "field": field, "n_bootstrap": args.n_bootstrap, "seed": args.seed,
               "level": args.level, "estimators": {}}
    print(f"lesde fit: {run_name}: {traj!r}, {field} drift")
    fitted = {}
    for name in names:
        if name == "l" and traj.p != traj.K:
            print(f"lesde fit: skipping the L-estimator (p = {traj.p} != K = {traj.K})")
            continue
        if name == "shooting":
            est = lf.ShootingEstimator(
                field, matrix=args.matrix, time=args.time, knots=args.knots, t0=args.t0,
                noise=args.noise, bootstrap=args.bootstrap, n_bootstrap=args.n_bootstrap,
                interval=args.interval, level=args.level, seed=args.seed, n_jobs=args.jobs,
                client=client).fit(traj)
            write_csv("shooting.csv", est.results())
            info = est.summary()
            info["alpha"], info["beta"] = est.alpha_, est.beta_
            for k in ("alpha", "beta", "A", "B"):
                if k in est.bands_:
                    info[f"{k}_band"] = est.bands_[k]
            info["A_final"], info["B_final"] = float(est.A_[-1]), float(est.B_[-1])
            info["sigma"], info["lr_fitted"] = est.sigma_, est.lr_
        elif name in ("i", "l"):
            Est = lf.IEstimator if name == "i" else lf.LEstimator
            est = Est(window=args.sg_window, on_reversed=args.on_reversed,
                      n_bootstrap=args.n_bootstrap, level=args.level, seed=args.seed).fit(traj)
            write_csv(f"{name}_estimator.csv", est.results())
            info = {"A_final": float(est.A_[-1]), "B_final": float(est.B_[-1]),
                    "window": float(est.window_), "reversed_times": int(est.n_reversed_),
                    "fraction_alpha_gt_beta": float(np.mean(est.alpha_ > est.beta_))}
            if est.bands_:
                info["A_final_band"] = est.bands_["A"][:, -1].tolist()
                info["B_final_band"] = est.bands_["B"][:, -1].tolist()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                est = lf.RegressionEstimator(field, window=args.reg_window, degree=args.degree,
                                             quadrature=args.quadrature,
                                             n_bootstrap=args.n_bootstrap, level=args.level,
                                             seed=args.seed).fit(traj)
            write_csv("regression.csv", est.results())
            info = {"window": int(est.window_), "alpha": est.alpha_, "beta": est.beta_,
                    "sigma": est.sigma_, "condition_max": float(np.max(est.condition_)),
                    "fraction_alpha_gt_beta": float(np.mean(est.alpha_ > est.beta_))}
        if name in ("shooting", "i", "l"):
            info["tail_index"] = _tail_indices(est, args, lr_run)
        fitted[name] = est
        summary["estimators"][name] = info
    if "shooting" in fitted:
        _print_headline(fitted["shooting"], args.level)
    for name, est in fitted.items():
        if name in ("i", "l"):
            band = est.bands_.get("A")
            txt = f" [{band[0, -1]:.4g}, {band[1, -1]:.4g}]" if band is not None else ""
            print(f"{type(est).__name__}: A(T) = {est.A_[-1]:.4g}{txt}, B(T) = {est.B_[-1]:.4g}")
        if "tail_index" in summary["estimators"].get(name, {}):
            ti = summary["estimators"][name]["tail_index"]
            print(f"{type(est).__name__} tail index of A: " + ", ".join(
                f"{k} {v['r']:.3f}" if isinstance(v, dict) else f"{k}: {v}"
                for k, v in ti.items()))
    measured = None
    if store is not None:
        try:
            measured = store.impacts()
            write_csv("measured_impacts.csv", {"t": measured["time"], "alpha": measured["alpha"],
                                               "beta": measured["beta"]})
            summary["measured_impacts"] = "measured_impacts.csv"
        except ValueError:
            pass
    if args.compare > 0:
        cmp_ = lf.compare_models(traj, fit_fraction=args.compare, n_paths=args.compare_paths,
                                 seed=args.seed,
                                 estimator_kwargs={"matrix": args.matrix, "time": args.time,
                                                   "knots": args.knots, "t0": args.t0})
        summary["model_comparison"] = {"t_split": cmp_.t_split, "rows": cmp_.rows}
        path = os.path.join(args.out, "model_table.md")
        with open(path, "w") as fh:
            fh.write(str(cmp_) + "\n")
        written.append(path)
        print(str(cmp_))
    from .figures import plot_fit, plot_goodness_of_fit

    class_names = store.class_names if store is not None else None
    if fitted:
        path = plot_fit(traj.ts, fitted, measured, os.path.join(args.out, "fit.png"),
                        title=f"{run_name}: {args.what} of the tracked {args.split} samples")
        written.append(path)
        summary["figures"] = ["fit.png"]
    if args.gof_paths > 0:
        summary["goodness_of_fit"] = {}
        primary = next(n for n in ("shooting", "regression", "i", "l") if n in fitted)
        for name, est in fitted.items():
            if name in ("i", "l") and not np.isfinite(est.alpha_).any():
                continue
            gof = lf.goodness_of_fit(traj, est, n_paths=args.gof_paths, seed=args.seed,
                                     level=args.level)
            summary["goodness_of_fit"][name] = gof.summary()
            npz = os.path.join(args.out, f"gof_{name}.npz")
            np.savez_compressed(npz, ts=gof.ts, logged_means=gof.logged_means,
                                sim_means=gof.sim_means, sim_lo=gof.sim_lo, sim_hi=gof.sim_hi,
                                logged_spread=gof.logged_spread, sim_spread=gof.sim_spread,
                                logged_accuracy=gof.logged_accuracy,
                                sim_accuracy=gof.sim_accuracy)
            written.append(npz)
            png = "goodness_of_fit.png" if name == primary else f"goodness_of_fit_{name}.png"
            written.append(plot_goodness_of_fit(
                gof, os.path.join(args.out, png), class_names=class_names,
                title=f"{run_name}: {type(est).__name__} ({gof.model['field']} drift, "
                f"{gof.model['noise']} noise)"))
            summary.setdefault("figures", []).append(png)
    path = os.path.join(args.out, "summary.json")
    with open(path, "w") as f:
        json.dump(clean(summary), f, indent=2)
    written.append(path)
    if client is not None:
        client.close()
    print("lesde fit: wrote")
    for pth in written:
        print(f"  {pth}")
    return 0


def _tail_indices(est, args, lr_run) -> dict:
    """Both tail indices of A(t): the paper's (time in SGD iterations) and the log-log slope."""
    out = {}
    try:
        out["loglog_slope"] = est.tail_index(tail=args.tail, kind="integral")
    except ValueError as exc:
        out["loglog_slope"] = str(exc)
    if lr_run:
        try:
            out["paper"] = est.tail_index(tail=args.tail_iterations, kind="paper",
                                          time_scale=1.0 / lr_run, time_offset=1.0)
        except ValueError as exc:
            out["paper"] = str(exc)
    else:
        out["paper"] = "needs the run's learning rate (--lr) to count SGD iterations"
    return out


def _print_headline(est, level):
    """alpha, beta with bands at the knots (or the logged times of a constant fit)."""
    import numpy as np

    ts = est.ts_
    if est.form_.time == "piecewise_linear":
        idx = np.unique(np.clip(np.searchsorted(ts, est.form_.knots - 1e-12), 0, len(ts) - 1))
    elif est.form_.time == "constant":
        idx = np.array([0])
    else:
        idx = np.unique(np.linspace(0, len(ts) - 1, 6).astype(int))
    band = est.bands_
    method = est.band_method_
    print(f"ShootingEstimator ({est.form_.matrix}, {est.form_.time}, noise {est.noise_kind_}"
          + (f", SGD lr {est.lr_:.3g}" if est.lr_ > 0 else "")
          + (f", median sigma {np.median(est.sigma_):.3g}" if np.any(est.sigma_ > 0) else "")
          + f"); {level:.0%} bands: {method}")
    if not est.identified_:
        print(f"  warning: not identified (condition {est.condition_:.1e}); bands are wide")
    print(f"  {'t':>9s}  {'alpha':>10s} {'[band]':>23s}  {'beta':>10s} {'[band]':>23s}")
    for i in idx:
        a = f"[{band['alpha'][0, i]:.4g}, {band['alpha'][1, i]:.4g}]" if "alpha" in band else ""
        b = f"[{band['beta'][0, i]:.4g}, {band['beta'][1, i]:.4g}]" if "beta" in band else ""
        print(f"  {ts[i]:9.4g}  {est.alpha_[i]:10.4g} {a:>23s}  {est.beta_[i]:10.4g} {b:>23s}")
    print(f"  A(T) = {est.A_[-1]:.4g}, B(T) = {est.B_[-1]:.4g}")


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
