"""Fitted against measured impacts: the drift of real SGD over a log interval, decomposed.

A fit of the LE-SDE to logged training (``lesde.fit``) sees the class means move between two
log times; the direct measurement (:func:`lesde.elasticity.measure_impacts`) sees the
first-order change of one SGD step. On real networks the two disagree by factors of 3-46
during learning. This module runs, from one network state, the pieces that tell the parts of
that gap apart, all on the same probe samples (tracked training samples, logits), per unit of
lr-scaled time t = step x lr:

1. **measured** impacts ``E_hat`` (``alpha_hat``, ``beta_hat``): the |G|^2-weighted pooled
   coefficient of the one-step change at x along h G(x'), by class pair;
2. **first-order drift of the network** ``D_i = (1/N) sum_j w_j K(x_i, x_j) G_j`` on the probe
   set (self pairs excluded, class weights of the training set), K the empirical NTK of the
   logits; optionally also with the gradient of the whole training set;
3. **kernel flow** (:func:`kernel_flow`): the same drift with the kernel frozen at the state,
   integrated over the interval (the logits move, so G relaxes) -- the network to first order
   in the weights, with every pair's own impact;
4. **class-pair flow** (:func:`class_pair_flow`): the cross-entropy LE-SDE with the measured
   E, from the same logits (its noise-free mean, or the mean over runs with SGD sampling
   noise) -- the model the fits use;
5. **real SGD** (:func:`sgd_interval`): replicas of the SGD step sequence from the state (the
   same model and optimizer state, other sample draws); the mean movement of the probe logits
   after n steps. Variants switch off momentum (a fresh optimizer without momentum buffer), run
   BatchNorm in evaluation mode during the steps, or shrink the learning rate (the small-step
   limit, where SGD's mean step is the first-order drift), so that their parts of the movement
   can be told apart.

Every velocity V (the mean class-mean displacement over [0, n h] divided by n h, a (K, q)
array) is summarised by the intra/inter impacts that a left-rule regression of the logged
increments would return for it (:func:`intra_inter_fit`): least squares of
``V_k = alpha w_k Gbar_k(0) + beta sum_{k' != k} w_k' Gbar_k'(0)``, with the relative residual
that the class-pair form leaves. The decomposition of the gap at interval n h::

    alpha_hat / alpha_SGD(n)  =  [alpha_hat / alpha_D(0)]          weighting and class-pair form
                               x [alpha_K(0) / alpha_K(n)]          time scale (G relaxes)
                               x [alpha_D(0) alpha_K(n) /           the kernel moves, finite
                                  (alpha_K(0) alpha_SGD(n))]        steps, noise, momentum,
                                                                    BatchNorm

where alpha_D(0) is the fit of the network's first-order drift with the whole training set's
gradient and alpha_K(0), alpha_K(n) those of the kernel flow's velocity at 0 and over the
interval (on the probe set). The same for the contrast alpha - beta, which a class-pair fit
determines far better than alpha alone. Bands: percentile intervals over the SGD replicas
(bootstrap).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "intra_inter_fit",
    "class_mean_velocity",
    "kernel_flow",
    "class_pair_flow",
    "sgd_interval",
    "first_order_drift",
    "IntervalComparison",
    "compare_interval",
]


def _onehot(y: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k)[np.asarray(y, dtype=np.int64)]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _G(z: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """G = -dl/dz = e_y - softmax(z) of the cross-entropy on logits z (..., M, K)."""
    return _onehot(y, k) - _softmax(z)


def _class_means(v: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """(..., M, q) -> (..., K, q)."""
    return np.stack([v[..., y == c, :].mean(-2) for c in range(k)], axis=-2)


def class_mean_velocity(z_t: np.ndarray, z_0: np.ndarray, y, k: int, dt: float) -> np.ndarray:
    """Mean velocity of the class means over [0, dt]: ``(Zbar(t) - Zbar(0)) / dt``, (..., K, q)."""
    return (_class_means(np.asarray(z_t), np.asarray(y), k)
            - _class_means(np.asarray(z_0), np.asarray(y), k)) / float(dt)


def intra_inter_fit(velocity, z0, y, k: int, weights=None) -> dict:
    """Intra/inter impacts that explain a class-mean velocity from the forces at the start.

    Least squares of ``V_k = alpha w_k Gbar_k + beta sum_{k' != k} w_k' Gbar_k'`` over the
    K x q entries, with ``Gbar_k`` the class means of ``G = e_y - softmax(z0)`` over the probe
    samples and ``w_k`` the training-set class shares (default: the probe's). This is what a
    left-rule regression of the logged class-mean increments returns (the SDE's drift
    ``(1/N) sum_j' E[y, y'] G_j'`` under the intra/inter form).

    Returns ``{"alpha", "beta", "contrast", "residual", "condition"}``: ``contrast`` is
    alpha - beta, residual |V - fit| / |V|, condition the condition number of the two-column
    design (normalised columns). For the cross-entropy field ``sum_k w_k Gbar_k`` -- the mean of
    e_y - softmax over the samples -- is close to zero once the network's mean prediction
    matches the label frequencies, so the design is nearly one column: alpha - beta (the part
    that separates the classes) is well determined, alpha and beta one by one are not
    (``condition`` large). ``velocity`` may carry leading batch axes (..., K, q), the fit is
    then done for each.
    """
    y = np.asarray(y)
    g = _class_means(_G(np.asarray(z0, dtype=np.float64), y, k), y, k)      # (K, q)
    w = np.bincount(y, minlength=k) / len(y) if weights is None else np.asarray(weights, float)
    wg = w[:, None] * g
    design = np.stack([wg.ravel(), (wg.sum(0)[None] - wg).ravel()], 1)      # (K q, 2)
    v = np.asarray(velocity, dtype=np.float64)
    flat = v.reshape(-1, k * v.shape[-1]).T                                  # (K q, B)
    coef, *_ = np.linalg.lstsq(design, flat, rcond=None)                    # (2, B)
    res = np.linalg.norm(design @ coef - flat, axis=0) / np.maximum(
        np.linalg.norm(flat, axis=0), np.finfo(float).tiny)
    shape = v.shape[:-2]
    norms = np.maximum(np.linalg.norm(design, axis=0), np.finfo(float).tiny)
    cond = float(np.linalg.cond(design / norms))
    return {"alpha": coef[0].reshape(shape), "beta": coef[1].reshape(shape),
            "contrast": (coef[0] - coef[1]).reshape(shape), "residual": res.reshape(shape),
            "condition": cond}


def _pair_weights(y: np.ndarray, k: int, class_weights=None, include_self=False) -> np.ndarray:
    """W[i, j] with sum_j W[i, j] G_j = (1/N) sum over the training set, estimated on the
    probe: w_{y_j} / m_{y_j} (class share over the probe count), self pairs excluded by
    default (then over m - 1 for the own class)."""
    m = np.bincount(y, minlength=k).astype(np.float64)
    w = m / m.sum() if class_weights is None else np.asarray(class_weights, dtype=np.float64)
    per = w[y]                                                               # (M,)
    count = m[y][None, :] - (0 if include_self else (y[:, None] == y[None, :]))
    W = per[None, :] / np.maximum(count, 1)
    if not include_self:
        np.fill_diagonal(W, 0.0)
    return W


def kernel_flow(ntk, z0, y, times, *, class_weights=None, include_self: bool = False,
                substeps: int = 50) -> np.ndarray:
    r"""Logits under the network's first-order drift with the kernel frozen.

    ``dz_i/dt = sum_j W_ij K(x_i, x_j) G(z_j, y_j)``, ``W_ij = w_{y_j} / m_{y_j}`` (the probe
    standing for the training set; self pairs excluded unless ``include_self``), integrated by
    the classical Runge-Kutta method with ``substeps`` steps per interval between ``times``.

    Args:
        ntk: (M, M, q, q) empirical NTK of the logits (:func:`lesde.elasticity.empirical_ntk`).
        z0: (M, q) logits at time 0 (q = K); y: (M,) labels.
        times: increasing times >= 0 (lr-scaled); the result at 0 is z0.

    Returns (len(times), M, q).
    """
    K_ = np.asarray(torch.as_tensor(ntk).detach().cpu(), dtype=np.float64)
    z = np.asarray(z0, dtype=np.float64).copy()
    y = np.asarray(y)
    k = z.shape[1]
    W = _pair_weights(y, k, class_weights, include_self)
    KW = K_ * W[:, :, None, None]

    def f(zz):
        return np.einsum("ijab,jb->ia", KW, _G(zz, y, k))

    out, t = [], 0.0
    for t1 in np.asarray(times, dtype=np.float64):
        if t1 < t:
            raise ValueError("times must be increasing and >= 0")
        h = (t1 - t) / substeps
        for _ in range(substeps if t1 > t else 0):
            a = f(z)
            b = f(z + 0.5 * h * a)
            c = f(z + 0.5 * h * b)
            d = f(z + h * c)
            z = z + h / 6.0 * (a + 2 * b + 2 * c + d)
        t = t1
        out.append(z.copy())
    return np.stack(out)


def class_pair_flow(E, z0, y, times, *, lr: float, runs: int = 200, noise: str = "sgd",
                    seed: int = 0, dt: Optional[float] = None) -> np.ndarray:
    """Mean class-mean logits of the cross-entropy LE-SDE with impact matrix ``E``.

    ``dX_j = (1/M) sum_j' E[y_j, y_j'] (e_{y_j'} - softmax X_j') dt`` + SGD sampling noise at
    learning rate ``lr`` (``noise="sgd"``; "none" for the noise-free ODE), on the probe samples
    from ``z0``, ``runs`` runs, Euler-Maruyama with ``dt`` (default lr / 4).

    Returns the class means averaged over the runs, (len(times), K, q).
    """
    from .model import LESDE, Impacts
    from .solvers import simulate

    y = np.asarray(y)
    times = np.asarray(times, dtype=np.float64)
    sde = LESDE(y, Impacts(np.asarray(E, dtype=np.float64)), "cross_entropy", noise=noise,
                lr=float(lr))
    sol = simulate(sde, torch.as_tensor(np.asarray(z0), dtype=torch.float64), times,
                   dt=float(dt or lr / 4), num_runs=int(runs) if noise != "none" else 1,
                   seed=seed, dtype=torch.float64)
    states = np.asarray(sol.states)                          # (T, B, M, q)
    return _class_means(states, y, int(np.max(y)) + 1).mean(axis=1)


@torch.no_grad()
def _logits(model, x, batch: int = 500) -> np.ndarray:
    was = model.training
    model.eval()
    out = torch.cat([model(x[a:a + batch]) for a in range(0, x.shape[0], batch)])
    model.train(was)
    return out.detach().cpu().double().numpy()


def sgd_interval(model, optimizer, x_train, y_train, x_probe, steps: Sequence[int], *,
                 replicas: int = 50, batch_size: int = 1, replacement: bool = True,
                 momentum: bool = True, batchnorm_train: bool = True, lr_scale: float = 1.0,
                 seed: int = 0, progress: bool = False) -> np.ndarray:
    """Probe logits after n SGD steps from the same state, for independent sample draws.

    Each replica starts from a copy of ``model`` and ``optimizer`` (so SGD momentum buffers
    and BatchNorm running statistics start as saved), draws ``batch_size`` training samples
    per step (uniformly with replacement, or without replacement within the batch), takes the
    optimizer's step on their mean cross-entropy, and records the probe logits (evaluation
    mode) after each n in ``steps``.

    Args:
        momentum: False replaces the optimizer by plain SGD at its learning rate and weight
            decay, without momentum and without the saved buffer.
        batchnorm_train: False keeps the network in evaluation mode during the steps
            (BatchNorm then uses and keeps its running statistics: the per-example network that
            the measurement and the NTK describe).
        lr_scale: multiply the learning rate by this factor (e.g. 0.1: the small-step limit,
            in which SGD's mean step is the first-order drift; the lr-scaled time of n steps is
            then ``n * lr * lr_scale``).

    Returns ``(replicas, len(steps), M, q)`` float64 logits.
    """
    steps = sorted(int(s) for s in steps)
    if not steps or steps[0] < 1:
        raise ValueError("steps must be positive step counts")
    state0 = copy.deepcopy(model.state_dict())
    opt0 = copy.deepcopy(optimizer.state_dict())
    group = optimizer.param_groups[0]
    n = int(y_train.shape[0])
    rng = np.random.default_rng(seed)
    q = _logits(model, x_probe[:1]).shape[1]
    out = np.empty((replicas, len(steps), x_probe.shape[0], q))
    it = range(replicas)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="SGD replicas", unit="replica")
    try:
        for r in it:
            model.load_state_dict(state0)
            if momentum:
                opt = optimizer
                opt.load_state_dict(opt0)
                for g in opt.param_groups:
                    g["lr"] = g["lr"] * lr_scale
            else:
                opt = torch.optim.SGD(model.parameters(), lr=group["lr"] * lr_scale,
                                      weight_decay=group.get("weight_decay", 0.0))
            model.train(batchnorm_train)
            done = 0
            for s in range(1, steps[-1] + 1):
                idx = (rng.integers(n, size=batch_size) if replacement
                       else rng.choice(n, size=batch_size, replace=False))
                idx = torch.as_tensor(idx)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
                opt.step()
                if s == steps[done]:
                    out[r, done] = _logits(model, x_probe)
                    model.train(batchnorm_train)
                    done += 1
    finally:
        model.load_state_dict(state0)
        optimizer.load_state_dict(opt0)
    return out


def first_order_drift(model, x_train, y_train, x_probe, *, batch: int = 500) -> np.ndarray:
    r"""``D(x) = -J(x) grad_w L`` with L the mean cross-entropy over the whole training set:
    the expected velocity of the probe logits per unit of lr-scaled time at this state, to
    first order (evaluation mode; self impacts included, as in the training set).
    Returns (M, q)."""
    from torch.func import functional_call, jvp

    was = model.training
    model.eval()
    try:
        params = {k: v.detach() for k, v in model.named_parameters()}
        grads = {k: torch.zeros_like(v) for k, v in params.items()}
        n = int(y_train.shape[0])
        for a in range(0, n, batch):
            p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
            loss = F.cross_entropy(functional_call(model, p, (x_train[a:a + batch],)),
                                   y_train[a:a + batch], reduction="sum") / n
            for (name, v), g in zip(p.items(), torch.autograd.grad(loss, list(p.values()))):
                grads[name] += g
        tangent = {k: -g for k, g in grads.items()}
        _, drift = jvp(lambda q: functional_call(model, q, (x_probe,)), (params,), (tangent,))
    finally:
        model.train(was)
    return drift.detach().cpu().double().numpy()


@dataclass
class IntervalComparison:
    """Result of :func:`compare_interval` (all velocities per unit of lr-scaled time).

    Attributes:
        steps: (n,) SGD step counts of the intervals; times = steps * lr.
        lr: the learning rate h.
        alpha_hat, beta_hat, E_hat: measured impacts on the probe set.
        fits: name -> {"alpha", "beta", "residual"} arrays (n,) (``"kernel@0"``,
            ``"class_pair@0"``, ``"full_set@0"``: scalars at the start), the left-rule
            intra/inter fit of each velocity.
        velocity_norm: name -> (n,) |V| of the class-mean velocity.
        sgd_bands: SGD variant -> {"alpha": (2, n), "residual": (2, n), "velocity_norm":
            (2, n)} 95% percentile bands over a bootstrap of the replicas.
        cosine: name -> (n,) cosine between the velocity and the SGD velocity of the first
            variant.
    """

    steps: np.ndarray
    lr: float
    alpha_hat: float
    beta_hat: float
    E_hat: np.ndarray
    fits: Dict[str, dict] = field(default_factory=dict)
    velocity_norm: Dict[str, np.ndarray] = field(default_factory=dict)
    sgd_bands: Dict[str, dict] = field(default_factory=dict)
    cosine: Dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: Sequence[dict], *, lr: float, alpha_hat: float, beta_hat: float,
                  E_hat) -> "IntervalComparison":
        """Rebuild a comparison from its :meth:`rows` (e.g. read back from the CSV that
        ``lesde reconcile`` writes), enough for :meth:`decomposition`."""
        def num(r, k):
            return float(r[k]) if r.get(k) not in (None, "") else float("nan")

        names = list(dict.fromkeys(r["velocity"] for r in rows))
        steps = sorted({int(r["steps"]) for r in rows if not r["velocity"].endswith("@0")})
        res = cls(steps=np.asarray(steps), lr=float(lr), alpha_hat=float(alpha_hat),
                  beta_hat=float(beta_hat), E_hat=np.asarray(E_hat, dtype=float))
        for name in names:
            rs = sorted((r for r in rows if r["velocity"] == name), key=lambda r: int(r["steps"]))
            res.fits[name] = {k: np.array([num(r, k) for r in rs]) for k in
                              ("alpha", "beta", "contrast", "residual")}
            res.fits[name]["condition"] = num(rs[0], "condition")
            res.velocity_norm[name] = np.array([num(r, "velocity_norm") for r in rs])
            if rs[0].get("alpha_lo") not in (None, ""):
                res.sgd_bands[name] = {
                    "alpha": np.array([[num(r, "alpha_lo") for r in rs],
                                       [num(r, "alpha_hi") for r in rs]]),
                    "contrast": np.array([[num(r, "contrast_lo") for r in rs],
                                          [num(r, "contrast_hi") for r in rs]]),
                    "velocity_norm": np.array([[num(r, "norm_lo") for r in rs],
                                               [num(r, "norm_hi") for r in rs]])}
            if rs[0].get("cos_to_sgd") not in (None, ""):
                res.cosine[name] = np.array([num(r, "cos_to_sgd") for r in rs])
        return res

    def decomposition(self, steps: int, variant: Optional[str] = None,
                      quantity: str = "contrast") -> dict:
        """The gap between the measured impact and what a fit to SGD's increments over
        ``steps`` steps sees, as a product of three factors (module docstring).

        ``quantity``: "contrast" (alpha - beta, well determined) or "alpha". Returns the
        values (``measured``, ``kernel@0``, ``full_set@0`` when computed, ``kernel_flow``,
        ``class_pair@0``, ``class_pair_flow``, ``sgd`` with ``sgd_lo``, ``sgd_hi``) and the
        factors ``total`` = measured / sgd = form x time_scale x rest, with

        - ``form`` = measured / first-order drift at 0 (the |G|^2-weighted pair average of
          the measurement against the least-squares class-pair fit of the network's drift),
        - ``time_scale`` = kernel@0 / kernel_flow (the drift's relaxation over the interval
          with the kernel frozen),
        - ``rest`` = first-order drift at 0 / time_scale / sgd (what the frozen-kernel,
          first-order picture leaves: the kernel moving, finite steps, noise, momentum,
          BatchNorm),

        where the first-order drift at 0 is ``full_set@0`` (the whole training set's gradient)
        when available, else ``kernel@0``; ``subset`` = kernel@0 / full_set@0 says how well the
        probe samples stand for the training set. ``total_band``, ``rest_band`` come from the
        SGD band; ``model_time_scale`` = class_pair@0 / class_pair_flow; ``norm_*`` are the
        same ratios of velocity norms, which need no class-pair fit.
        """
        if quantity not in ("contrast", "alpha"):
            raise ValueError(f"quantity must be 'contrast' or 'alpha', got {quantity!r}")
        i = int(np.flatnonzero(self.steps == int(steps))[0]) if int(steps) in self.steps else None
        if i is None:
            raise ValueError(f"no interval of {steps} steps (have {self.steps.tolist()})")
        variant = variant or next(iter(self.sgd_bands))

        def val(name):
            v = np.atleast_1d(self.fits[name][quantity])
            return float(v[0] if name.endswith("@0") else v[i])

        def norm(name):
            v = np.atleast_1d(self.velocity_norm[name])
            return float(v[0] if name.endswith("@0") else v[i])

        measured = (self.alpha_hat - self.beta_hat) if quantity == "contrast" else self.alpha_hat
        band = self.sgd_bands[variant][quantity][:, i]
        out = {"steps": int(steps), "t": float(steps * self.lr), "variant": variant,
               "quantity": quantity, "measured": float(measured)}
        for name in ("kernel@0", "kernel_flow", "class_pair@0", "class_pair_flow"):
            out[name] = val(name)
        has_full = "full_set@0" in self.fits
        out["full_set@0"] = val("full_set@0") if has_full else float("nan")
        first = out["full_set@0"] if has_full else out["kernel@0"]
        out.update(sgd=val(variant), sgd_lo=float(band[0]), sgd_hi=float(band[1]))
        nan2 = [float("nan"), float("nan")]
        with np.errstate(divide="ignore", invalid="ignore"):
            out["total"] = measured / out["sgd"]
            out["total_band"] = sorted([measured / band[0], measured / band[1]]) \
                if band[0] > 0 else nan2
            out["form"] = measured / first
            out["subset"] = out["kernel@0"] / out["full_set@0"]
            out["time_scale"] = out["kernel@0"] / out["kernel_flow"]
            expected = first / out["time_scale"]
            out["rest"] = expected / out["sgd"]
            out["rest_band"] = sorted([expected / band[0], expected / band[1]]) \
                if band[0] > 0 else nan2
            out["model_time_scale"] = out["class_pair@0"] / out["class_pair_flow"]
            nb = self.sgd_bands[variant]["velocity_norm"][:, i]
            out["norm_time_scale"] = norm("kernel@0") / norm("kernel_flow")
            out["norm_rest"] = norm("kernel_flow") / norm(variant)
            out["norm_rest_band"] = sorted([norm("kernel_flow") / nb[0], norm("kernel_flow") / nb[1]])
            out["norm_model_vs_kernel"] = norm("class_pair_flow") / norm("kernel_flow")
        return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in out.items()}

    def rows(self) -> list:
        """One dict per (velocity, interval): name, steps, t, alpha, beta, residual, |V|,
        and the bands of the SGD variants."""
        out = []
        for name, fit in self.fits.items():
            a = np.atleast_1d(fit["alpha"])
            steps = self.steps if a.shape[0] == len(self.steps) else np.zeros(1, dtype=int)
            for i, s in enumerate(steps):
                row = {"velocity": name, "steps": int(s), "t": float(s * self.lr),
                       "alpha": float(a[i]), "beta": float(np.atleast_1d(fit["beta"])[i]),
                       "contrast": float(np.atleast_1d(fit["contrast"])[i]),
                       "residual": float(np.atleast_1d(fit["residual"])[i]),
                       "condition": float(fit["condition"]),
                       "velocity_norm": float(np.atleast_1d(self.velocity_norm[name])[i])}
                if name in self.cosine:
                    row["cos_to_sgd"] = float(np.atleast_1d(self.cosine[name])[i])
                if name in self.sgd_bands:
                    b = self.sgd_bands[name]
                    row.update(alpha_lo=float(b["alpha"][0, i]), alpha_hi=float(b["alpha"][1, i]),
                               contrast_lo=float(b["contrast"][0, i]),
                               contrast_hi=float(b["contrast"][1, i]),
                               norm_lo=float(b["velocity_norm"][0, i]),
                               norm_hi=float(b["velocity_norm"][1, i]))
                out.append(row)
        return out


def compare_interval(model, optimizer, x_train, y_train, x_probe, y_probe,
                     steps: Sequence[int], *, lr: Optional[float] = None, replicas: int = 50,
                     batch_size: int = 1, replacement: bool = True,
                     sgd_variants: Optional[Dict[str, dict]] = None, sde_noise: str = "none",
                     sde_runs: int = 200,
                     full_set_drift: bool = True, n_bootstrap: int = 1000, seed: int = 0,
                     progress: bool = False) -> IntervalComparison:
    """Measured impacts, first-order drift, kernel flow, class-pair LE-SDE and real SGD over
    intervals of ``steps`` SGD steps from the state of ``model`` / ``optimizer``.

    Args:
        model, optimizer: the network and its optimizer at the state (not changed).
        x_train, y_train: the training set SGD draws from (tensors in the model's dtype).
        x_probe, y_probe: probe samples (tracked training samples) whose logits are followed.
        steps: interval lengths in SGD steps (e.g. 1, 5, 20, 50).
        lr: learning rate h (default: the optimizer's).
        replicas: SGD replicas per variant.
        sgd_variants: name -> keyword arguments of :func:`sgd_interval` (``momentum``,
            ``batchnorm_train``); default ``{"sgd": {}}`` (the optimizer as it is).
        sde_noise, sde_runs: noise of the class-pair LE-SDE ("none": its noise-free ODE, the
            mean movement up to O(h) corrections; "sgd": SGD sampling noise, averaged over
            ``sde_runs`` runs).
        full_set_drift: also the first-order drift with the gradient of the whole training set.

    Returns an :class:`IntervalComparison`.
    """
    from .elasticity import empirical_ntk, measure_impacts

    steps = np.asarray(sorted(int(s) for s in steps))
    h = float(lr if lr is not None else optimizer.param_groups[0]["lr"])
    y_np = np.asarray(torch.as_tensor(y_probe).cpu(), dtype=np.int64)
    k = int(model.head.out_features) if hasattr(model, "head") else int(y_np.max()) + 1
    times = steps * h
    z0 = _logits(model, x_probe)
    meas = measure_impacts(model, x_probe, torch.as_tensor(y_np), h, num_classes=k,
                           keep_delta=False)
    E_hat = np.asarray(torch.as_tensor(meas.E).detach().cpu(), dtype=np.float64)
    res = IntervalComparison(steps=steps, lr=h, alpha_hat=float(meas.alpha),
                             beta_hat=float(meas.beta), E_hat=E_hat)

    def put(name, vel):
        fit = intra_inter_fit(vel, z0, y_np, k)
        res.fits[name] = fit
        res.velocity_norm[name] = np.linalg.norm(vel.reshape(vel.shape[:-2] + (-1,)), axis=-1)

    # first order, kernel flow, class-pair flow
    ntk = empirical_ntk(model, x_probe)
    W = _pair_weights(y_np, k)
    KW = np.asarray(ntk.detach().cpu(), dtype=np.float64) * W[:, :, None, None]
    d0 = np.einsum("ijab,jb->ia", KW, _G(z0, y_np, k))
    put("kernel@0", _class_means(d0, y_np, k))
    Gbar = _class_means(_G(z0, y_np, k), y_np, k)
    w = np.bincount(y_np, minlength=k) / len(y_np)
    put("class_pair@0", E_hat @ (w[:, None] * Gbar))
    if full_set_drift:
        put("full_set@0", _class_means(first_order_drift(model, x_train, y_train, x_probe),
                                       y_np, k))
    zk = kernel_flow(ntk, z0, y_np, times)
    put("kernel_flow", class_mean_velocity(zk, z0[None], y_np, k, 1.0) / times[:, None, None])
    zc = class_pair_flow(E_hat, z0, y_np, np.concatenate([[0.0], times]), lr=h, runs=sde_runs,
                         noise=sde_noise, seed=seed, dt=h / 10)
    put("class_pair_flow", (zc[1:] - zc[:1]) / times[:, None, None])

    # real SGD, per variant, with bootstrap bands over the replicas
    variants = sgd_variants or {"sgd": {}}
    rng = np.random.default_rng(seed + 1)
    first = None
    for vi, (name, kw) in enumerate(variants.items()):
        z = sgd_interval(model, optimizer, x_train, y_train, x_probe, steps, replicas=replicas,
                         batch_size=batch_size, replacement=replacement, seed=seed + 7 * vi,
                         progress=progress, **kw)
        scale = float(kw.get("lr_scale", 1.0))
        vel = (class_mean_velocity(z, z0[None, None], y_np, k, 1.0)
               / (scale * times)[None, :, None, None])
        put(name, vel.mean(0))
        if first is None:
            first = vel.mean(0)
        boot = rng.integers(0, replicas, size=(n_bootstrap, replicas))
        vb = vel[boot].mean(1)                                      # (B, n, K, q)
        fb = intra_inter_fit(vb, z0, y_np, k)
        nb = np.linalg.norm(vb.reshape(vb.shape[:2] + (-1,)), axis=-1)
        res.sgd_bands[name] = {
            "alpha": np.percentile(fb["alpha"], [2.5, 97.5], axis=0),
            "contrast": np.percentile(fb["contrast"], [2.5, 97.5], axis=0),
            "residual": np.percentile(fb["residual"], [2.5, 97.5], axis=0),
            "velocity_norm": np.percentile(nb, [2.5, 97.5], axis=0)}
    # cosines against the first SGD variant's mean velocity
    ref = first.reshape(len(steps), -1)
    for name, vel in (("kernel_flow", class_mean_velocity(zk, z0[None], y_np, k, 1.0)
                       / times[:, None, None]),
                      ("class_pair_flow", (zc[1:] - zc[:1]) / times[:, None, None])):
        a = vel.reshape(len(steps), -1)
        res.cosine[name] = (a * ref).sum(1) / np.maximum(
            np.linalg.norm(a, axis=1) * np.linalg.norm(ref, axis=1), np.finfo(float).tiny)
    return res
