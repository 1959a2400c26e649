"""The paper's Fig. 5 (the LE-ODE simulated from random starts with the fitted impacts, rescaled
to the data, against the logged class means) and, beside it, the held-out prediction.

Panels, for one protocol run and setting (class means of the tracked training logits of class
``--class`` (default 0), averaged over the trials):

(a) the authors' recipe (their ``simluate_leode`` / ``fwd_euler`` and ``viz_leode``): the
    LE-ODE of the class means with the label-projection field, driven by the I-estimator's
    alpha(t), beta(t) (derivatives of the pooled A(t), B(t)), from random starts (each class
    mean drawn from N(0, |X_c(0)|^2 / K I)), averaged over ``--paths`` starts and then
    multiplied by one number so that the mean of one coordinate over the last 1,000
    iterations matches the logged one (their rescaling); the band is +- one sd over starts;
(b) the same with the trajectory-matching fit (``figures/paper/fits.py``: the cross-entropy
    LE-SDE's alpha(t), beta(t), piecewise linear, noise left out), from random starts (class
    means as in (a), the samples of a class spread around it by the logged initial
    within-class spread), rescaled the same way (solid) and as simulated (dashed);
(c) the held-out prediction: the cross-entropy LE-SDE fitted (ShootingEstimator) to the first
    half of the log, simulated with its fitted noise from the logged state at the half-way time
    over the second half (``lesde.fit.goodness_of_fit``, trial 0), against the log, with R^2
    and the coverage of the band.

Usage (from the repository root, one torch thread)::

    OMP_NUM_THREADS=1 python figures/paper/fig5.py zhang2021-geomnist --setting p000
        [--per-class 10] [--every 4] [--paths 200] [--no-held-out]

Reads the committed summary ``figures/paper/<protocol>/<setting>_summary.npz`` (or, for a run
with no finished trial, the same quantities from its stores, with ``--partial``), the fit
``figures/paper/fits/<protocol>_<setting>_shooting.csv`` and (for (b)'s starts and (c)) the
trajectory stores in ``runs/<protocol>``; writes ``figures/paper/fig5/<protocol>_<setting>.png``
and ``.json`` (the numbers of the panels).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def read_csv(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def interp_schedule(t_knots, values):
    """A callable t -> value, linear between the given times, constant outside."""
    t_knots = np.asarray(t_knots, dtype=float)
    values = np.asarray(values, dtype=float)
    return lambda t: float(np.interp(t, t_knots, values))


def simulate_class_means(alpha, beta, ts, x0_means, field, *, per_class=1, spread0=None,
                         paths=200, seed=0, dt=None):
    """Class means (paths, T, K, p) of the LE-ODE from random starts (see the module doc)."""
    import torch

    from lesde.model import LESDE, FunctionSchedule, Impacts
    from lesde.solvers import simulate

    K, p = x0_means.shape
    rng = np.random.default_rng(seed)
    scale = np.linalg.norm(x0_means, axis=1) / np.sqrt(K)                  # (K,)
    centres = rng.normal(size=(paths, K, p)) * scale[None, :, None]
    labels = np.repeat(np.arange(K), per_class)
    x0 = centres[:, labels]
    if per_class > 1 and spread0 is not None:
        x0 = x0 + rng.normal(size=x0.shape) * (np.asarray(spread0)[labels] / np.sqrt(p))[None, :, None]
    imp = Impacts.intra_inter(FunctionSchedule(alpha, "alpha"), FunctionSchedule(beta, "beta"), K)
    sde = LESDE(labels, imp, field, sigma=0.0, noise="none", dim=p)
    if dt is None:
        dt = float(np.min(np.diff(ts))) / 4
    sol = simulate(sde, torch.as_tensor(x0, dtype=torch.float64), ts, dt=dt, seed=seed,
                   record="summary")
    return np.transpose(sol.class_means, (1, 0, 2, 3))                    # (B, T, K, p)


def summary_from_stores(run, setting, partial):
    """What the panels need from a committed summary, from the stores (an unfinished run)."""
    sys.path.insert(0, HERE)
    from fits import load_trials

    from lesde.fit import IEstimator

    _, traj = load_trials(run, setting, partial)
    cm = traj.class_means()                                                # (R, T, K, p)
    dev = traj.features - cm[:, :, traj.labels]
    spread = np.stack([np.sqrt((dev[:, :, traj.labels == k] ** 2).sum(-1).mean(-1))
                       for k in range(traj.K)], axis=-1)                   # (R, T, K)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = IEstimator(on_reversed="nan", n_bootstrap=0).fit(
            (traj.ts, cm.mean(axis=0), np.arange(traj.K)))
    return {"time": traj.ts, "class_mean_logits_train": cm, "spread_logits_train": spread,
            "A_pooled": est.A_, "B_pooled": est.B_}


def rescale(sim_mean, logged, it, c, coord, n_tail=1000):
    """The authors' rescaling: one factor so that the mean of coordinate ``coord`` of class
    ``c`` over the last ``n_tail`` iterations matches the log."""
    tail = it > it[-1] - n_tail
    return float(np.mean(logged[tail, c, coord]) / np.mean(sim_mean[tail, c, coord]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("protocol", nargs="?", default="zhang2021-geomnist")
    ap.add_argument("--setting", default="p000")
    ap.add_argument("--run", help="run directory (default runs/<protocol>)")
    ap.add_argument("--summary", help="summary npz (default figures/paper/<protocol>/...)")
    ap.add_argument("--fit", help="shooting fit csv (default figures/paper/fits/...)")
    ap.add_argument("--class", dest="cls", type=int, default=0)
    ap.add_argument("--align", type=int, default=None,
                    help="coordinate matched by the rescaling (default: the class's own)")
    ap.add_argument("--paths", type=int, default=200)
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--knots", type=int, default=11)
    ap.add_argument("--no-held-out", action="store_true")
    ap.add_argument("--partial", action="store_true", help="unfinished trials too")
    ap.add_argument("--out", default=os.path.join(HERE, "fig5"))
    args = ap.parse_args(argv)
    from lesde.plotting import style

    with style():
        return _run(args)


def _run(args):
    import torch

    torch.set_num_threads(1)
    from lesde.fit import smooth_derivative
    from lesde.plotting import band, color, legend_outside, new_figure, save_figure
    from lesde.protocols import load_protocol

    name = f"{args.protocol}_{args.setting}"
    run = args.run or os.path.join("runs", args.protocol)
    summ = args.summary or os.path.join(HERE, args.protocol, f"{args.setting}_summary.npz")
    fitp = args.fit or os.path.join(HERE, "fits", f"{name}_shooting.csv")
    lr = load_protocol(run).config.lr
    c = args.cls
    coord = c if args.align is None else args.align
    out = {"protocol": args.protocol, "setting": args.setting, "class": c, "align": coord,
           "paths": args.paths}
    fig = new_figure(11.0, 3.6)
    axes = fig.subplots(1, 3)
    colors = [color(k) for k in range(10)]

    # (a) the authors' recipe
    z = np.load(summ) if os.path.exists(summ) else summary_from_stores(run, args.setting,
                                                                         args.partial)
    ts = z["time"].astype(float)
    it = ts / lr
    logged = z["class_mean_logits_train"].astype(float).mean(axis=0)      # (T, K, K)
    K = logged.shape[1]
    w = 500 * lr                        # a window of 500 iterations, in lr-scaled time
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a_I = smooth_derivative(ts, np.nan_to_num(z["A_pooled"].astype(float)), window=w, order=2)
        b_I = smooth_derivative(ts, np.nan_to_num(z["B_pooled"].astype(float)), window=w, order=2)
    simA = simulate_class_means(interp_schedule(ts, a_I), interp_schedule(ts, b_I), ts,
                                logged[0], "label_projection", paths=args.paths)
    mA = simA.mean(0)
    fA = rescale(mA, logged, it, c, coord)
    out["a"] = {"estimator": "I (pooled class means)", "rescale_factor": fA,
                "r2_rescaled": _r2(logged[:, c], fA * mA[:, c])}
    ax = axes[0]
    for k in range(K):
        ax.scatter(it, logged[:, c, k], s=5, alpha=0.35, color=colors[k],
                   label=f"logged class-{c} mean, coordinate {k}")
        ax.plot(it, fA * mA[:, c, k], color=colors[k], lw=1.6,
                label=f"LE-ODE, coordinate {k} (rescaled)")
        band(ax, it, fA * (mA[:, c, k] - simA[:, :, c, k].std(0)),
             fA * (mA[:, c, k] + simA[:, :, c, k].std(0)), color=colors[k], alpha=0.08)
    lo, hi = float(np.min(logged[:, c])), float(np.max(logged[:, c]))
    ylim = (lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo))
    ax.set_ylim(ylim)
    ax.set_title(f"(a) the authors' recipe: label-projection LE-ODE,\n"
                 f"I-estimator, random starts, rescaled by {fA:.3g}")
    ax.set_xlabel("SGD iteration")
    ax.set_ylabel(f"mean logit of class {c}")

    # (b) the trajectory-matching fit
    if os.path.exists(fitp):
        f = read_csv(fitp)
        spread0 = z["spread_logits_train"].astype(float).mean(axis=0)[0]
        simB = simulate_class_means(interp_schedule(f["t"], f["alpha"]),
                                    interp_schedule(f["t"], f["beta"]), ts, logged[0],
                                    "cross_entropy", per_class=args.per_class, spread0=spread0,
                                    paths=args.paths, seed=1)
        mB = simB.mean(0)
        fB = rescale(mB, logged, it, c, coord)
        out["b"] = {"estimator": "ShootingEstimator (cross-entropy field)", "rescale_factor": fB,
                    "r2_rescaled": _r2(logged[:, c], fB * mB[:, c]),
                    "r2_as_simulated": _r2(logged[:, c], mB[:, c])}
        ax = axes[1]
        for k in range(K):
            ax.scatter(it, logged[:, c, k], s=5, alpha=0.35, color=colors[k])
            ax.plot(it, fB * mB[:, c, k], color=colors[k], lw=1.6)
            ax.plot(it, mB[:, c, k], color=colors[k], lw=0.9, ls="--",
                    label="as simulated (not rescaled)" if k == 0 else None)
        ax.set_ylim(ylim)
        ax.set_title(f"(b) the fitted cross-entropy LE-ODE (trajectory\n"
                     f"matching), random starts, rescaled by {fB:.3g}")
        ax.set_xlabel("SGD iteration")
    else:
        axes[1].set_title(f"(b) no fit at {os.path.basename(fitp)}")

    # (c) held-out prediction
    if not args.no_held_out:
        sys.path.insert(0, HERE)
        from fits import load_trials, reduce

        from lesde.fit import ShootingEstimator, goodness_of_fit

        _, traj = load_trials(run, args.setting, args.partial)
        small = reduce(traj, args.per_class, args.every)
        half = int(np.searchsorted(small.ts, small.ts[0] + 0.5 * (small.ts[-1] - small.ts[0]),
                                   side="right")) - 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = ShootingEstimator(knots=min(args.knots, half + 1), bootstrap="sandwich",
                                    max_iter=100).fit(small.subset(times=slice(0, half + 1)))
            gof = goodness_of_fit(small, est, start=half, n_paths=100, seed=0)
        out["c"] = {"fit_until_iteration": float(small.ts[half] / lr), "r2": float(gof.r2),
                    "coverage": float(gof.coverage), "accuracy_mae": float(gof.accuracy_mae),
                    "spread_rel_error": float(gof.spread_rel_error),
                    "trials": small.R, "per_class": args.per_class}
        ax = axes[2]
        itc = gof.ts / lr
        lm = small.class_means()[0]
        for k in range(K):
            ax.plot(small.ts / lr, lm[:, c, k], ".", ms=3, color=colors[k], alpha=0.6)
            ax.plot(itc, gof.sim_means[:, c, k], color=colors[k], lw=1.6)
            band(ax, itc, gof.sim_lo[:, c, k], gof.sim_hi[:, c, k], color=colors[k],
                 label="fitted LE-SDE, 95% of simulated paths" if k == 0 else None)
        ax.axvline(small.ts[half] / lr, color="0.3", lw=0.8, ls=":",
                   label="end of the fitted part")
        ax.set_title(f"(c) held out: fitted to the first half, simulated\n"
                     f"from there: $R^2$ {gof.r2:.3g}, band covers {gof.coverage:.0%} (trial 0)")
        ax.set_xlabel("SGD iteration")
    else:
        axes[2].set_visible(False)
    fig.suptitle(f"{TITLES.get(args.protocol, args.protocol)}"
                 f"{PERR.get(args.setting, '')}: logged class means (dots) and the LE-ODE")
    legend_outside(fig, where="bottom", ncol=4)
    os.makedirs(args.out, exist_ok=True)
    save_figure(fig, os.path.join(args.out, f"{name}.png"))
    with open(os.path.join(args.out, f"{name}.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    print(json.dumps(out, indent=1))


TITLES = {"zhang2021-geomnist": "GeoMNIST, LeNet, batch 1",
          "zhang2021-cifar10": "CIFAR-10 (three classes), LeNet, batch 1"}
PERR = {"p000": ", p_err = 0", "p030": ", p_err = 0.3", "p067": ", p_err = 2/3"}


def _r2(logged, sim):
    """1 - SSE / SS about the time average, over times after the first and coordinates."""
    logged, sim = np.asarray(logged)[1:], np.asarray(sim)[1:]
    ss = np.sum((logged - logged.mean(0)) ** 2)
    return float(1 - np.sum((logged - sim) ** 2) / ss) if ss > 0 else float("nan")


if __name__ == "__main__":
    sys.exit(main())
