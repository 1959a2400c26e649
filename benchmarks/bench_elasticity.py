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
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
