"""Benchmark of the training logger (``lesde.tracking``).

Measures, on synthetic CIFAR-shaped data (K classes of 3 x 32 x 32 Gaussian images; the speed
does not depend on the pixel values):

1. training throughput (images/s) of :func:`lesde.tracking.train_and_track` without logging
   (``log_every`` larger than the run), with logging every 10 steps of m = 100 tracked train
   samples per class, and of m = 100 train + 100 test samples per class (metrics on the tracked
   samples). Steps are timed one by one (from the callback of the step before), from step 2 to
   the step before the last. Two numbers per setting: the wall-clock throughput over that
   window, and, robust to other processes on a shared machine, the cost of logging from medians:
   (median logged-step time - median unlogged-step time) / (log_every x median unlogged-step
   time);
2. the time of one direct measurement of the impact matrix
   (:func:`lesde.elasticity.measure_impacts`) on the tracked train set, per logged step.

Usage::

    python benchmarks/bench_tracking.py [--net resnet18 --width 0.25] [--steps 41]
        [--batch 128] [--threads 1] [--impact-per-class 10 30 100]

Results are in benchmarks/README.md; they vary with the load of a shared machine.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import numpy as np
import torch


def _data(k: int, n_per_class: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k * n_per_class, 3, 32, 32, generator=g)
    y = torch.arange(k).repeat_interleave(n_per_class)
    return x, y


def _step_times(cfg, train, test) -> dict:
    """Per-step wall times of a run: ``{step: seconds}`` for steps 2..last (from the callbacks;
    a step's time includes its logging when the step is logged)."""
    from lesde.tracking import train_and_track

    stamps = {}

    def clock(step, model, optimizer):
        stamps[step] = time.perf_counter()

    tmp = tempfile.mkdtemp(prefix="bench_tracking_")
    try:
        train_and_track(cfg, train, test, f"{tmp}/store", progress=False, callback=clock)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {s: stamps[s] - stamps[s - 1] for s in sorted(stamps) if s - 1 in stamps}


def _summary(times: dict, log_every: int, batch: int, last: int) -> tuple:
    """(wall-clock images/s over the window, median images/s of unlogged steps, median extra
    seconds of a logged step, logging cost as a fraction of training time by medians)."""
    window = {s: t for s, t in times.items() if s < last}  # the last step is always logged
    total = sum(window.values())
    plain = [t for s, t in window.items() if s % log_every]
    logged = [t for s, t in window.items() if s % log_every == 0]
    med = float(np.median(plain))
    extra = float(np.median(logged)) - med if logged else 0.0
    return len(window) * batch / total, batch / med, extra, extra / (log_every * med)


def main(argv=None) -> None:
    from lesde.tracking import TrainConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", default="resnet18")
    p.add_argument("--width", type=float, default=0.25, help="ResNet width factor")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--per-class", type=int, default=100, help="tracked samples per class (m)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=41)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--impact-per-class", type=int, nargs="*", default=[10, 30])
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
    print(f"net={args.net} width={args.width} K={k} batch={args.batch} m={m}/class, "
          f"dtype={args.dtype}, threads={args.threads}, {args.steps} steps per run")
    runs = [("no logging", dict(log_every=10**9, track_test_per_class=0)),
            (f"log_every={args.log_every}, m={m}/class train",
             dict(log_every=args.log_every, track_test_per_class=0)),
            (f"log_every={args.log_every}, m={m}/class train + {m}/class test",
             dict(log_every=args.log_every))]
    plain_rate = None
    for name, kw in runs:
        cfg = TrainConfig(**{**base, **kw})
        rate, med_rate, extra, cost = _summary(_step_times(cfg, train, test), cfg.log_every,
                                               args.batch, args.steps)
        if plain_rate is None:
            plain_rate = rate
            print(f"{name:45s}: {rate:7.1f} images/s (median step: {med_rate:7.1f} images/s)")
        else:
            print(f"{name:45s}: {rate:7.1f} images/s (wall clock: {100 * (plain_rate / rate - 1):5.1f}%"
                  f" slower); one log {extra:5.2f} s = {100 * cost:4.1f}% of the training time "
                  f"(medians)")

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
