"""Why the measured impacts exceed the fitted ones: the drift of SGD at one instant against its
average over a log interval, on the GeoMNIST runs' final checkpoints.

From the network at the run's last checkpoint (float64):

1. the first-order expected drift of the tracked train logits, per unit of lr-scaled time,
   ``D(x) = -J_f(x) grad_w L`` with L the mean loss over the whole training set (the SDE's drift
   (1/N) sum_j' K(x, x_j') G_j'), and its class means;
2. the intra/inter impacts (alpha*, beta*) that fit those class means best by least squares on
   ``w_k Gbar_k`` (Gbar over the whole training set), with the relative residual (how far the
   class-pair form is from the network's drift);
3. the expected class-mean velocity of real SGD (batch 1, the run's lr, samples drawn uniformly)
   over n = 1 ... 100 steps from the same state, ``E[X(n) - X(0)] / (n h)``, averaged over
   independent replicas (the +- is one standard error);
4. beside them: the run's measured alpha_hat, beta_hat at its last impact measurement and the
   regression's alpha, beta in its last window (``figures/real/fit_<run>/regression.csv``).

Usage (from the repository root, after the runs of ``geomnist.py`` and their fits)::

    OMP_NUM_THREADS=1 python figures/real/drift_timescales.py --store-dir runs \
        --runs geomnist_p000 geomnist_p030_30000steps --replicas 60

Writes ``drift_timescales.csv`` (one row per run and n) and ``drift_timescales.md`` beside
this file.
"""
from __future__ import annotations

import argparse
import csv
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = (1, 2, 5, 10, 20, 50, 100)


def _p_err(run: str) -> float:
    return {"p000": 0.0, "p030": 0.3, "p067": 2.0 / 3.0}[run.split("_")[1]]


def analyse(store_dir: str, run: str, replicas: int, seed: int = 1) -> dict:
    import torch
    from torch.func import functional_call, jvp

    import geomnist
    from lesde.tracking import load_store

    st = load_store(os.path.join(store_dir, run))
    model, step = st.load_model()
    model = model.double().eval()
    h = float(st.config.lr)
    (x_all, y_all), _ = geomnist.data(_p_err(run))
    x_all = x_all.double()
    N, K = len(y_all), int(st.config.num_classes)
    train = st.split == 0
    idx, y = st.index[train], st.labels[train]
    if not np.array_equal(y_all.numpy()[idx], y):
        raise ValueError(f"{run}: the tracked labels do not match the rebuilt data set")
    x = x_all[idx]

    params = {k: v.detach().requires_grad_(True) for k, v in model.named_parameters()}
    loss = torch.nn.functional.cross_entropy(functional_call(model, params, (x_all,)), y_all)
    grads = torch.autograd.grad(loss, list(params.values()))
    frozen = {k: v.detach() for k, v in params.items()}
    tangent = {k: -g for k, g in zip(params, grads)}
    x0, drift = jvp(lambda p: functional_call(model, p, (x,)), (frozen,), (tangent,))
    x0, drift = x0.detach().numpy(), drift.detach().numpy()
    D = np.stack([drift[y == c].mean(0) for c in range(K)])

    with torch.no_grad():
        logits = model(x_all)
    G = (torch.eye(K, dtype=torch.float64)[y_all] - torch.softmax(logits, 1)).numpy()
    labels_all = y_all.numpy()
    w = np.bincount(labels_all, minlength=K) / N
    wG = np.stack([w[k] * G[labels_all == k].mean(0) for k in range(K)])
    design = np.stack([wG.ravel(), (wG.sum(0)[None] - wG).ravel()], 1)
    (a_star, b_star), *_ = np.linalg.lstsq(design, D.ravel(), rcond=None)
    resid = np.linalg.norm(design @ [a_star, b_star] - D.ravel()) / np.linalg.norm(D)

    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=h)
    rng = np.random.default_rng(seed)
    vel = {n: [] for n in STEPS}
    for _ in range(replicas):
        model.load_state_dict(state0)
        for s in range(1, STEPS[-1] + 1):
            j = int(rng.integers(N))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x_all[j:j + 1]), y_all[j:j + 1]).backward()
            opt.step()
            if s in vel:
                with torch.no_grad():
                    dx = (model(x).numpy() - x0) / (s * h)
                vel[s].append(np.stack([dx[y == c].mean(0) for c in range(K)]))

    imp = st.impacts()
    reg = list(csv.DictReader(open(os.path.join(HERE, f"fit_{run}", "regression.csv"))))
    rows = []
    for n in STEPS:
        v = np.asarray(vel[n])
        mean, se = v.mean(0), v.std(0, ddof=1) / np.sqrt(len(v))
        rows.append({"run": run, "step": step, "n_steps": n, "t_interval": n * h,
                     "velocity_norm": float(np.linalg.norm(mean)),
                     "velocity_norm_se": float(np.linalg.norm(se)),
                     "cos_to_drift": float((mean * D).sum() / np.linalg.norm(mean)
                                           / np.linalg.norm(D))})
    return {"rows": rows, "run": run, "step": step, "log_every": int(st.config.log_every),
            "drift_norm": float(np.linalg.norm(D)), "alpha_star": float(a_star),
            "beta_star": float(b_star), "residual": float(resid),
            "alpha_hat": float(np.asarray(imp["alpha"])[-1]),
            "beta_hat": float(np.asarray(imp["beta"])[-1]),
            "alpha_fit": float(reg[-1]["alpha"]), "beta_fit": float(reg[-1]["beta"]),
            "train_acc": float((logits.argmax(1) == y_all).double().mean())}


def main(argv=None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store-dir", default="runs")
    parser.add_argument("--runs", nargs="+", default=["geomnist_p000", "geomnist_p030_30000steps"])
    parser.add_argument("--replicas", type=int, default=60)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = [analyse(args.store_dir, r, args.replicas) for r in args.runs]
    with open(os.path.join(HERE, "drift_timescales.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(results[0]["rows"][0]))
        wr.writeheader()
        for res in results:
            wr.writerows(res["rows"])
    lines = ["| run (step) | train acc | first-order drift norm | best intra/inter fit of it "
             "alpha*, beta* (residual) | measured alpha_hat, beta_hat | regression alpha, beta "
             "(last window) | SGD velocity norm over n steps: "
             + ", ".join(f"n={n}" for n in STEPS) + " |", "|---|---:|---:|---|---|---|---|"]
    for res in results:
        vel = ", ".join(f"{r['velocity_norm']:.1f} +- {r['velocity_norm_se']:.1f}"
                        for r in res["rows"])
        lines.append(f"| {res['run']} ({res['step']}) | {res['train_acc']:.3f} | "
                     f"{res['drift_norm']:.1f} | {res['alpha_star']:.0f}, {res['beta_star']:.0f} "
                     f"({res['residual']:.2f}) | {res['alpha_hat']:.0f}, {res['beta_hat']:.0f} | "
                     f"{res['alpha_fit']:.0f}, {res['beta_fit']:.0f} | {vel} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, "drift_timescales.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
