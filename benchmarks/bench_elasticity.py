"""Elasticity benchmark: the batched NTK path against the explicit one-step loop.

1. Pairwise similarity matrices over M examples (default 1,000 of scikit-learn's 8x8 digits,
   a one-hidden-layer ReLU MLP with scalar output, float64, trained briefly as in He & Su's
   clustering): S_ker and S_rel through ``method="ntk"`` (the exact eta -> 0 limit, batched
   torch.func) against ``method="step"`` (M explicit SGD steps, each followed by a forward pass
   over all M probes). Reports the wall time of each and the largest disagreement, absolute
   and relative to max |S|, at two step sizes (the disagreement is O(eta)).
2. The direct measurement of the impacts (``measure_impacts``) per logged step on a CIFAR-size
   ResNet-18 (width 1/4, no BatchNorm, float32, random 32x32 inputs, K = 3), for m tracked
   samples per class, logits and features.
3. Two-layer networks: the exact empirical NTK of a one-hidden-layer MLP through ``mlp_ntk``
   (no Jacobians) against the generic ``empirical_ntk`` (per-example Jacobians), on M inputs of
   3,072 entries (CIFAR-10 size), float64, and the closed-form wide limit ``two_layer_ntk``
   (any width) on 2,000 inputs, the size of one He & Su clustering problem.
4. One record of Dan et al.'s protocol (``class_elasticity``: 20 probes per class, K = 3, one
   fresh Adam step per probe, all five measures) on ResNet-18 in the ImageNet layout without
   BatchNorm at width 1, and one training minibatch of 256, float32: what a 49-record, 7-epoch
   run costs.

    python benchmarks/bench_elasticity.py [--threads 2] [--m 1000] [--quick] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from _machine import cpu_name
from lesde import elasticity as el


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_similarity(m: int, hidden: int, etas, seed: int = 0) -> dict:
    from sklearn.datasets import load_digits

    from lesde.nets import MLP

    X, Y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(X), m, replace=False)
    x = torch.as_tensor(X[idx] / 16.0, dtype=torch.float64)
    y = torch.as_tensor((Y[idx] < 5).astype(np.int64))
    torch.manual_seed(seed)
    net = MLP(64, hidden=(hidden,), num_classes=1).double()
    el.train_classifier(net, x, y, epochs=3, lr=0.05, seed=seed)
    params = sum(p.numel() for p in net.parameters())
    ntk, t_ntk = _timed(lambda: el.one_step_changes(net, x, y, loss="bce"))
    s_ker, s_rel = ntk.kernelized(), ntk.relative()
    out = {"examples": m, "params": params, "dtype": "float64", "ntk_seconds": t_ntk,
           "step": []}
    for eta in etas:
        st, t_step = _timed(lambda: el.one_step_changes(net, x, y, lr=eta, method="step",
                                                        loss="bce"))
        dk = float((st.kernelized() - s_ker).abs().max())
        dr = float((st.relative() - s_rel).abs().max())
        out["step"].append({
            "eta": eta, "seconds": t_step,
            "max_abs_diff_ker": dk, "max_rel_diff_ker": dk / float(s_ker.abs().max()),
            "max_abs_diff_rel": dr, "max_rel_diff_rel": dr / float(s_rel.abs().max()),
        })
    return out


def bench_impacts(per_class: int, width: float, seed: int = 0) -> dict:
    from lesde.nets import ResNet18

    torch.manual_seed(seed)
    net = ResNet18(num_classes=3, width=width, batchnorm=False)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * per_class, 3, 32, 32, generator=g)
    y = torch.arange(3).repeat_interleave(per_class)
    out = {"net": f"ResNet18(width={width}, batchnorm=False)",
           "params": sum(p.numel() for p in net.parameters()), "tracked": 3 * per_class}
    for output in ("logits", "features"):
        _, sec = _timed(lambda: el.measure_impacts(net, x, y, lr=0.01, output=output,
                                                   keep_delta=False))
        out[f"{output}_seconds"] = sec
    return out


def bench_two_layer(m: int, hidden: int, seed: int = 0) -> dict:
    from lesde.nets import MLP

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(m, 3072, generator=g, dtype=torch.float64) * 2 - 1
    torch.manual_seed(seed)
    net = MLP(3072, hidden=(hidden,), num_classes=1).double()
    fast, t_fast = _timed(lambda: el.mlp_ntk(net, x))
    m_gen = min(m, 200)
    gen, t_gen = _timed(lambda: el.empirical_ntk(net, x[:m_gen])[:, :, 0, 0])
    diff = float((fast[:m_gen, :m_gen] - gen).abs().max() / gen.abs().max())
    x2 = torch.rand(2000, 3072, generator=g, dtype=torch.float64) * 2 - 1
    _, t_closed = _timed(lambda: el.two_layer_ntk(x2, width=40960))
    return {"examples": m, "hidden": hidden, "mlp_ntk_seconds": t_fast,
            "empirical_ntk_examples": m_gen, "empirical_ntk_seconds": t_gen,
            "max_rel_diff": diff, "two_layer_ntk_2000_seconds": t_closed}


def bench_dan_record(seed: int = 0) -> dict:
    import torch.nn.functional as F

    from lesde.nets import ResNet18ImageNet

    torch.manual_seed(seed)
    net = ResNet18ImageNet(3)
    g = torch.Generator().manual_seed(seed)
    xp = torch.randn(60, 3, 32, 32, generator=g)
    yp = torch.arange(3).repeat_interleave(20)
    _, t_rec = _timed(lambda: el.class_elasticity(net, xp, yp, lr=1e-4))
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, weight_decay=1e-4)
    xb = torch.randn(256, 3, 32, 32, generator=g)
    yb = torch.randint(0, 3, (256,), generator=g)

    def step():
        opt.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        opt.step()

    step()
    _, t_step = _timed(step)
    run = 49 * t_rec + 7 * 58 * t_step
    return {"params": sum(p.numel() for p in net.parameters()), "record_seconds": t_rec,
            "train_step_seconds": t_step, "run_minutes": run / 60}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--m", type=int, default=1000, help="examples for the similarity matrices")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--per-class", type=int, default=10, help="tracked samples per class")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--quick", action="store_true", help="M = 200, 4 tracked per class")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    m, per_class = (200, 4) if args.quick else (args.m, args.per_class)
    res = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__}
    res["similarity"] = sim = bench_similarity(m, args.hidden, etas=(1e-3, 1e-5))
    print(f"similarity matrices, M = {m}, MLP 64-{args.hidden}-1 ({sim['params']} params), "
          f"float64, {args.threads} threads")
    print(f"  ntk path (batched torch.func): {sim['ntk_seconds']:8.2f} s")
    for s in sim["step"]:
        print(f"  explicit loop, eta = {s['eta']:.0e}:  {s['seconds']:8.2f} s   "
              f"max |dS_ker| = {s['max_abs_diff_ker']:.2e} ({s['max_rel_diff_ker']:.1e} of max), "
              f"max |dS_rel| = {s['max_abs_diff_rel']:.2e} ({s['max_rel_diff_rel']:.1e} of max)")
    res["impacts"] = imp = bench_impacts(per_class, args.width)
    print(f"measure_impacts per logged step, {imp['net']} ({imp['params']} params), "
          f"{imp['tracked']} tracked samples, float32:")
    print(f"  logits: {imp['logits_seconds']:.2f} s   features: {imp['features_seconds']:.2f} s")
    res["two_layer"] = tl = bench_two_layer(200 if args.quick else args.m, 512)
    print(f"two-layer NTK, M = {tl['examples']}, 3072-{tl['hidden']}-1 MLP, float64: mlp_ntk "
          f"{tl['mlp_ntk_seconds']:.2f} s; empirical_ntk on {tl['empirical_ntk_examples']}: "
          f"{tl['empirical_ntk_seconds']:.2f} s (max rel. difference {tl['max_rel_diff']:.1e}); "
          f"two_layer_ntk (width 40,960) on 2,000: {tl['two_layer_ntk_2000_seconds']:.2f} s")
    if not args.quick:
        res["dan_record"] = dr = bench_dan_record()
        print(f"Dan et al. record, ResNet-18 ImageNet layout without BatchNorm ({dr['params']} "
              f"params): {dr['record_seconds']:.1f} s per record, {dr['train_step_seconds']:.2f} s "
              f"per minibatch of 256; a 49-record 7-epoch run: {dr['run_minutes']:.0f} min")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
