"""Benchmark of the training logger (``lesde.tracking``).

Measures, on synthetic CIFAR-shaped data (K classes of 3 x 32 x 32 Gaussian images; the speed
does not depend on the pixel values):

1. training throughput (images/s) of :func:`lesde.tracking.train_and_track` without logging
   (``log_every`` larger than the run) and with logging every 10 steps of m = 100 tracked train
   and 100 tracked test samples per class (metrics on the tracked samples), and the relative cost
   of logging; the throughput is timed between the callbacks of step 1 and of the last step, so
   that it includes the logs at steps 10, 20, ... but not set-up;
2. the time of one direct measurement of the impact matrix
   (:func:`lesde.elasticity.measure_impacts`) on the tracked train set, per logged step.

Usage::

    python benchmarks/bench_tracking.py [--net resnet18 --width 0.25] [--steps 31]
        [--batch 128] [--threads 1] [--impact-per-class 10 30 100]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import torch


def _data(k: int, n_per_class: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k * n_per_class, 3, 32, 32, generator=g)
    y = torch.arange(k).repeat_interleave(n_per_class)
    return x, y


def _throughput(cfg, train, test) -> float:
    """Images per second between the callbacks of step 1 and of the last step."""
    from lesde.tracking import train_and_track

    stamps = {}

    def clock(step, model, optimizer):
        stamps[step] = time.perf_counter()

    tmp = tempfile.mkdtemp(prefix="bench_tracking_")
    try:
        train_and_track(cfg, train, test, f"{tmp}/store", progress=False, callback=clock)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    last = max(stamps)
    # the last step is always logged; stop at the step before it when it is not a log_every step
    end = last if last % cfg.log_every == 0 else last - 1
    return (end - 1) * cfg.batch_size / (stamps[end] - stamps[1])


def main(argv=None) -> None:
    from lesde.tracking import TrainConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", default="resnet18")
    p.add_argument("--width", type=float, default=0.25, help="ResNet width factor")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--per-class", type=int, default=100, help="tracked samples per class (m)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=31)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--impact-per-class", type=int, nargs="*", default=[10, 30, 100])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    k, m = args.classes, args.per_class
    train = _data(k, max(2 * m, 500), 0)
    test = _data(k, m, 1)
    net_kwargs = {"width": args.width} if args.net.startswith("resnet") else {}
    base = dict(net=args.net, num_classes=k, net_kwargs=net_kwargs, lr=0.01, momentum=0.9,
                batch_size=args.batch, steps=args.steps, track_per_class=m,
                track_test_per_class=m, eval_train_size=0, eval_test_size=0, seed=0,
                dtype=args.dtype)
    print(f"net={args.net} width={args.width} K={k} batch={args.batch} m={m}/class train + "
          f"{m}/class test, dtype={args.dtype}, threads={args.threads}")
    plain = _throughput(TrainConfig(**base, log_every=10**9), train, test)
    logged = _throughput(TrainConfig(**base, log_every=args.log_every), train, test)
    print(f"throughput without logging: {plain:8.1f} images/s")
    print(f"throughput, log_every={args.log_every}: {logged:8.1f} images/s  "
          f"(logging costs {100 * (plain / logged - 1):.1f}% of the training time)")

    if args.impact_per_class:
        from lesde.elasticity import measure_impacts
        from lesde.nets import build_net

        torch.manual_seed(0)
        model = build_net(args.net, k, **net_kwargs).to(getattr(torch, args.dtype))
        x, y = train
        for per in args.impact_per_class:
            rows = torch.cat([torch.nonzero(y == c).flatten()[:per] for c in range(k)])
            xs, ys = x[rows].to(getattr(torch, args.dtype)), y[rows]
            t0 = time.perf_counter()
            res = measure_impacts(model, xs, ys, 0.01, num_classes=k, keep_delta=False)
            dt = time.perf_counter() - t0
            print(f"measure_impacts, {per}/class ({len(rows)} samples, logits): {dt:8.2f} s per "
                  f"logged step  (alpha_hat={float(res.alpha):.3g}, beta_hat={float(res.beta):.3g})")


if __name__ == "__main__":
    main()
