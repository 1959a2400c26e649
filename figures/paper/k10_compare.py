"""The ten-class ResNet-18 run: fitted impacts against the impacts measured on the network, on
the same axes, and neural collapse of the logged logits against that of the fitted LE-SDE.

Panels:

(a) alpha(t), beta(t) of the trajectory-matching fit (``lesde.fit.ShootingEstimator``, the
    cross-entropy field, piecewise linear on 6 knots, 10 tracked training samples per class at
    every 2nd logged time, 95% sandwich bands: the settings of ``figures/paper/fits.py``) and
    alpha_hat, beta_hat measured on the network (``lesde.elasticity.measure_impacts`` during
    training, in the run's summary), both per unit t = SGD step x lr;
(b) the gap alpha - beta, fitted with its band and measured;
(c) NC1 of the tracked training logits (Papyan, Han & Donoho 2020), logged, against the fitted
    LE-SDE simulated with its fitted noise from the logged logits at t = 0 (median and 5-95% over
    ``--paths`` paths), on the same 10 samples per class;
(d) NC2 (the ETF-angle term), NC3 and NC4 of the same logits (read-out: the identity, centred
    for NC3), logged against the fitted LE-SDE's median.

Usage (from the repository root, one torch thread; needs the run's stores)::

    OMP_NUM_THREADS=1 python figures/paper/k10_compare.py [--run runs/cifar10-resnet18-k10]
        [--paths 20] [--out figures/paper/cifar10-resnet18-k10]

Writes ``k10_compare.{png,pdf,svg}`` and ``k10_compare.json`` (the numbers of the panels).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=os.path.join("runs", "cifar10-resnet18-k10"))
    ap.add_argument("--summary", default=os.path.join(HERE, "cifar10-resnet18-k10",
                                                      "p000_summary.npz"))
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--knots", type=int, default=6)
    ap.add_argument("--paths", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "cifar10-resnet18-k10"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from fits import load_trials, reduce

    from lesde.fit import ShootingEstimator
    from lesde.metrics import nc1, neural_collapse
    from lesde.plotting import band, color, legend_outside, new_figure, save_figure, styled
    from lesde.solvers import simulate

    _, traj = load_trials(args.run, "p000")
    small = reduce(traj, args.per_class, args.every)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = ShootingEstimator(knots=args.knots, bootstrap="sandwich").fit(small)
    notes = sorted({str(w.message)[:160] for w in caught if "jit" not in str(w.message)})
    summ = np.load(args.summary)
    t_imp = summ["impact_time"]
    a_hat, b_hat = summ["alpha_hat"].mean(0), summ["beta_hat"].mean(0)

    # the fitted SDE from the logged logits at t = 0, with its fitted noise
    sde = est.sde()
    x0 = small.features[0, 0]
    x0b = np.broadcast_to(x0, (args.paths,) + x0.shape).copy()
    step = min(float(np.diff(small.ts).min()) / 4, 0.05 / max(est.drift_rate_, 1e-12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = simulate(sde, torch.as_tensor(x0b), small.ts, step, seed=args.seed, record="full")
    sim = np.asarray(sol.states)                                            # (T, paths, N, K)
    K = small.K
    nc_log = np.array([nc1(small.features[0, i], small.labels, K) for i in range(small.T)])
    nc_sim = np.array([[nc1(sim[i, r], small.labels, K) for r in range(args.paths)]
                       for i in range(small.T)])
    nc_all = np.array([nc1(traj.features[0, i], traj.labels, K) for i in range(traj.T)])
    eye = np.eye(K)
    ncl = neural_collapse(small.features[0], small.labels, W=eye, center_W=True)  # over (T,)
    ncs = neural_collapse(np.transpose(sim, (1, 0, 2, 3)), small.labels, W=eye, center_W=True)
    others = {"NC2 (ETF angle)": ("etf_angle", 0), "NC3": ("nc3", 1), "NC4": ("nc4", 2)}

    @styled
    def draw():
        fig = new_figure(13.5, 3.4)
        ax = fig.subplots(1, 4)
        ts = est.ts_
        for name, q, mk, hat in (("alpha", est.alpha_, "o", a_hat), ("beta", est.beta_, "x", b_hat)):
            c = color(0 if name == "alpha" else 1)
            sym = r"\alpha" if name == "alpha" else r"\beta"
            band(ax[0], ts, est.bands_[name][0], est.bands_[name][1], color=c)
            ax[0].plot(ts, q, color=c, label=f"fitted ${sym}(t)$, 95% band")
            ax[0].plot(t_imp, hat, mk, color=c, label=f"measured $\\hat{{{sym}}}$")
        ax[0].set_yscale("symlog", linthresh=10.0)
        ax[0].set_xlabel("t = SGD step x lr")
        ax[0].set_ylabel("impact per unit t")
        ax[0].set_title("intra- and inter-class impact")
        g = est.gap_
        band(ax[1], ts, est.bands_["gap"][0], est.bands_["gap"][1], color=color(2))
        ax[1].plot(ts, g, color=color(2), label=r"fitted $\alpha-\beta$, 95% band")
        ax[1].plot(t_imp, a_hat - b_hat, "s", color=color(3),
                   label=r"measured $\hat\alpha-\hat\beta$")
        ax[1].axhline(0.0, color="0.5", lw=0.6, ls=":")
        ax[1].set_yscale("symlog", linthresh=10.0)
        ax[1].set_xlabel("t = SGD step x lr")
        ax[1].set_ylabel("gap per unit t")
        ax[1].set_title("the gap (identified where E is not)")
        lo, med, hi = np.percentile(nc_sim, [5, 50, 95], axis=1)
        band(ax[2], ts, lo, hi, color=color(4))
        ax[2].plot(ts, med, color=color(4), label="fitted LE-SDE, median and 5-95%")
        ax[2].plot(ts, nc_log, "o", ms=3, color=color(5), label="logged (the same samples)")
        ax[2].plot(traj.ts, nc_all, color="0.4", lw=0.8, label=f"logged, all {traj.N // K} per class")
        ax[2].set_yscale("log")
        ax[2].set_xlabel("t = SGD step x lr")
        ax[2].set_ylabel(r"NC1 of the logits, $\mathrm{Tr}(\Sigma_W\Sigma_B^{+})/K$")
        ax[2].set_title("neural collapse (NC1)")
        for lab, (attr, j) in others.items():
            c = color(6 + j)
            v_sim = np.median(np.asarray(getattr(ncs, attr)), axis=0)
            ax[3].plot(ts, v_sim, color=c, label=f"{lab}, fitted LE-SDE (median)")
            ax[3].plot(ts, np.asarray(getattr(ncl, attr)), "o", ms=3, color=c,
                       label=f"{lab}, logged")
        ax[3].set_xlabel("t = SGD step x lr")
        ax[3].set_ylabel("measure (0: collapsed)")
        ax[3].set_title("NC2-NC4 of the logits")
        legend_outside(fig, where="bottom", ncol=3)
        fig.suptitle("CIFAR-10, ten classes, ResNet-18 (width 1/4): fitted against measured")
        return fig

    os.makedirs(args.out, exist_ok=True)
    paths = save_figure(draw(), os.path.join(args.out, "k10_compare.png"))
    res = {"fit": {"knots": args.knots, "per_class": args.per_class, "every": args.every,
                   "identified": bool(est.identified_), "warnings": notes,
                   "noise": est.noise_kind_, "lr": float(est.lr_),
                   "t": est.ts_.tolist(), "alpha": est.alpha_.tolist(),
                   "beta": est.beta_.tolist(), "gap": est.gap_.tolist(),
                   "gap_band": est.bands_["gap"].tolist()},
           "measured": {"t": t_imp.tolist(), "alpha_hat": a_hat.tolist(),
                        "beta_hat": b_hat.tolist()},
           "nc1": {"t": est.ts_.tolist(), "logged": nc_log.tolist(),
                   "fitted_sde_median": med_of(nc_sim), "paths": args.paths},
           "nc2_4": {lab: {"logged": np.asarray(getattr(ncl, attr)).tolist(),
                           "fitted_sde_median": np.median(np.asarray(getattr(ncs, attr)),
                                                          axis=0).tolist()}
                     for lab, (attr, _) in others.items()}}
    with open(os.path.join(args.out, "k10_compare.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", *paths, os.path.join(args.out, "k10_compare.json"))
    ratio = np.array(a_hat[1:]) / np.interp(t_imp[1:], est.ts_, est.alpha_)
    print(f"measured alpha_hat / fitted alpha at the measurements after t = 0: "
          f"{np.round(ratio, 1).tolist()}")
    print(f"NC1 of the logits at the end: logged {nc_log[-1]:.3g}, fitted SDE median "
          f"{np.median(nc_sim[-1]):.3g} [5-95%: {np.percentile(nc_sim[-1], 5):.3g}, "
          f"{np.percentile(nc_sim[-1], 95):.3g}]")
    for lab, (attr, _) in others.items():
        print(f"{lab} of the logits, start -> end: logged "
              f"{np.asarray(getattr(ncl, attr))[0]:.3g} -> {np.asarray(getattr(ncl, attr))[-1]:.3g}, "
              f"fitted SDE median {np.median(np.asarray(getattr(ncs, attr))[:, 0]):.3g} -> "
              f"{np.median(np.asarray(getattr(ncs, attr))[:, -1]):.3g}")
    return 0


def med_of(x):
    return np.median(x, axis=1).tolist()


if __name__ == "__main__":
    sys.exit(main())
