"""Local elasticity measured on networks: the empirical NTK, the direct measurement of the
LE-SDE's impact matrix, and He & Su's / Dan et al.'s similarity measures.

Papers
------
- He & Su, "The local elasticity of neural networks", ICLR 2020 (arXiv 1910.06943).
- Dan, Mukherjee, Das, Gampa, arXiv 2111.01166: local elasticity tracked during training, and
  the KL-based relative similarity.
- Zhang, Wang & Su, "Imitating deep learning dynamics via locally elastic stochastic
  differential equations", NeurIPS 2021 (arXiv 2110.05960): the impact matrix E.

Notation (shapes in brackets)
-----------------------------
``f(x; w)`` is the network's output [q] at one input: the logits (``output="logits"``) or the
penultimate features ``model.features(x)`` (``output="features"``). ``J(x) = df/dw`` [q, P] is its
Jacobian in the P trainable parameters. The empirical neural tangent kernel is

    K(x, x') = J(x) J(x')^T                                   [q, q]

One SGD step of size h on the per-sample loss l(x', y') moves the parameters by
``-h grad_w l(x')`` with ``grad_w l(x') = J_logit(x')^T dl/dlogit(x')``, and so changes the output
at x, to first order in h, by

    Delta f(x) = -h J(x) grad_w l(x')                          [q]

For logits this is ``-h K(x, x') dl/df(x')``. Everything here is computed with ``torch.func``
(``functional_call`` + ``vmap`` + ``jacrev``/``grad``/``jvp``) in chunks of examples, never with
a Python loop over copies of the model; the explicit one-step measures (finite step, any
optimizer) are the exception by nature and loop over update examples.

Evaluation mode: by default every function evaluates the network in ``eval()`` mode (restoring
each submodule's mode afterwards), so that dropout is off and BatchNorm uses its running
statistics; the per-example function ``x -> f(x; w)`` is then well defined. Pass
``eval_mode=False`` for networks without such layers if you want the training-mode forward.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

__all__ = [
    # empirical NTK, its two-layer closed forms, and the direct measurement of the impacts
    "empirical_ntk",
    "mlp_ntk",
    "two_layer_ntk",
    "kernel_similarities",
    "ntk_train",
    "measure_impacts",
    "ImpactMeasurement",
    # He & Su / Dan et al. similarity measures
    "one_step_changes",
    "StepChanges",
    "relative_similarity",
    "kernelized_similarity",
    "kl_relative_similarity",
    "similarity_matrix",
    "symmetrize",
    "class_pair_means",
    # local-elasticity clustering
    "clustering_accuracy",
    "kernel_kmeans",
    "le_cluster",
    "baseline_cluster",
    "train_classifier",
    "cluster_pair",
    "ClusteringResult",
    # synthetic locality check
    "torus_curves",
    "geodesic_distance",
    "torus_locality",
    "locality_profile",
    "LocalityResult",
    # tracking during training, locality statistics and chance levels
    "pair_elasticity",
    "class_elasticity",
    "track_elasticity",
    "tracking_statistics",
    "tracking_summary",
    "locality_statistics",
    "bootstrap_class_means",
    "locality_band",
    "clustering_chance",
    "crop_flip",
    "TRACK_MEASURES",
    "read_reference_curves",
    "ntk_cluster_pair",
]

LossSpec = Union[str, Callable[[Tensor, Tensor], Tensor]]

# Largest Jacobian block (number of scalars) materialised at once when ``chunk`` is None:
# 2**25 scalars = 128 MiB in float32.
_JAC_BUDGET = 2 ** 25
# Per-sample loss gradients of all update examples are kept in memory when they fit in this
# many scalars, and recomputed per probe chunk otherwise.
_GRAD_CACHE = 2 ** 26
# path="auto" uses forward-mode products instead of Jacobians for outputs wider than this;
# jvp chunks: update examples (tangents) per vmap, probes per batch.
_JVP_ABOVE = 16
_JVP_TANGENTS = 8
_JVP_PROBES = 64


# --------------------------------------------------------------------------------------------
# functional view of a network
# --------------------------------------------------------------------------------------------
class _OutputView(nn.Module):
    """``forward(x)`` = the network's logits or its penultimate features (``net.features``)."""

    def __init__(self, net: nn.Module, output: str):
        super().__init__()
        self.net = net
        self.output = output

    def forward(self, x):
        if self.output == "features":
            return self.net.features(x)
        return self.net(x)


@contextlib.contextmanager
def _eval_mode(model: nn.Module, enabled: bool):
    """Put every submodule in eval mode for the duration, then restore each one's own mode."""
    if not enabled:
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _check_output(model: nn.Module, output: str) -> None:
    if output not in ("logits", "features"):
        raise ValueError(f"output must be 'logits' or 'features', got {output!r}")
    if output == "features" and not callable(getattr(model, "features", None)):
        raise ValueError(
            "output='features' needs a model with a features(x) method (penultimate layer), "
            f"e.g. a lesde.nets.FeatureNet; got {type(model).__name__}"
        )


class _Functional:
    """The model as pure functions of its trainable parameters.

    ``params``: the trainable parameters the output depends on (for ``output="features"`` the
    parameters of ``model.head`` are excluded: the features do not depend on them), detached,
    keyed by ``"net.<name>"``; ``consts``: every other parameter and buffer.
    """

    def __init__(self, model: nn.Module, output: str = "logits"):
        _check_output(model, output)
        self.model = model
        self.output = output
        self.view = _OutputView(model, output)
        self.logit_view = _OutputView(model, "logits")
        excluded = set()
        if output == "features" and isinstance(getattr(model, "head", None), nn.Module):
            excluded = {id(p) for p in model.head.parameters()}
        self.params: Dict[str, Tensor] = {}
        self.consts: Dict[str, Tensor] = {}
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in excluded:
                self.params["net." + name] = p.detach()
            else:
                self.consts["net." + name] = p.detach()
        for name, b in model.named_buffers():
            self.consts["net." + name] = b
        if not self.params:
            raise ValueError("the model has no trainable parameters the output depends on")
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device
        self.num_params = sum(p.numel() for p in self.params.values())

    def as_input(self, x) -> Tensor:
        return torch.as_tensor(x).to(device=self.device, dtype=self.dtype)

    # one example -> output vector [q]
    def single(self, params, xi):
        out = functional_call(self.view, (params, self.consts), (xi.unsqueeze(0),))
        return out.reshape(-1)

    # one example -> per-sample loss (through the logits)
    def single_loss(self, params, xi, yi, loss_fn):
        logits = functional_call(self.logit_view, (params, self.consts), (xi.unsqueeze(0),))
        return loss_fn(logits, yi.unsqueeze(0)).sum()

    def outputs(self, x: Tensor) -> Tensor:
        """Batched outputs [M, q] (no gradient)."""
        with torch.no_grad():
            out = self.view(x)
        return out.reshape(x.shape[0], -1)

    def out_dim(self, x: Tensor) -> int:
        return self.outputs(x[:1]).shape[1]

    def jacobian(self, x: Tensor) -> Dict[str, Tensor]:
        """Per-example Jacobians, name -> [c, q, n_name]."""
        jac = vmap(jacrev(self.single), in_dims=(None, 0))(self.params, x)
        return {k: v.reshape(v.shape[0], v.shape[1], -1) for k, v in jac.items()}

    def loss_grads(self, x: Tensor, y: Tensor, loss_fn) -> Dict[str, Tensor]:
        """Per-example loss gradients grad_w l(x_i, y_i), name -> [c, n_name]."""
        g = vmap(grad(self.single_loss), in_dims=(None, 0, 0, None))(self.params, x, y, loss_fn)
        return {k: v.reshape(v.shape[0], -1) for k, v in g.items()}

    def pushforward(self, x: Tensor, tangents: Dict[str, Tensor]) -> Tensor:
        """J(x_a) v_b for every example a of the batch and every tangent b (name -> [c, n]):
        [c, M, q], by forward-mode products (vmap over the tangents of one batched jvp)."""
        shapes = {k: p.shape for k, p in self.params.items()}

        def batch(params):
            out = functional_call(self.view, (params, self.consts), (x,))
            return out.reshape(x.shape[0], -1)

        def one(ti):
            t = {k: ti[k].reshape(shapes[k]) for k in shapes}
            return jvp(batch, (self.params,), (t,))[1]

        with warnings.catch_warnings():  # torch's first forward-mode use warns about jit
            warnings.simplefilter("ignore", DeprecationWarning)
            return vmap(one)(tangents)

    def directional(self, x: Tensor, tangents: Dict[str, Tensor]) -> Tensor:
        """J(x_i) v_i for each example and its own tangent v_i (name -> [c, n]): [c, q]."""
        shapes = {k: p.shape for k, p in self.params.items()}

        def one(xi, ti):
            t = {k: ti[k].reshape(shapes[k]) for k in shapes}
            return jvp(lambda p: self.single(p, xi), (self.params,), (t,))[1]

        with warnings.catch_warnings():  # torch's first forward-mode use warns about jit
            warnings.simplefilter("ignore", DeprecationWarning)
            return vmap(one)(x, tangents)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _auto_chunk(chunk: Optional[int], per_example: int) -> int:
    if chunk is not None:
        if int(chunk) < 1:
            raise ValueError(f"chunk must be a positive number of examples, got {chunk}")
        return int(chunk)
    return max(1, _JAC_BUDGET // max(1, per_example))


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------
def _loss_fn(loss: LossSpec) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-sample loss ``l(out [B, q], y [B]) -> [B]``.

    ``"cross_entropy"``: integer labels, softmax cross-entropy. ``"mse"``: 0.5 |out - t|^2 with
    t the one-hot label for integer labels and q > 1, else the label itself. ``"bce"``: scalar
    output (q = 1), logistic loss with 0/1 labels. A callable is used as is (it must return one
    loss per sample).
    """
    if callable(loss):
        return loss
    if loss == "cross_entropy":
        return lambda out, y: F.cross_entropy(out, y.long(), reduction="none")
    if loss == "mse":
        def mse(out, y):
            if out.shape[-1] > 1 and not torch.is_floating_point(y):
                target = F.one_hot(y.long(), out.shape[-1]).to(out.dtype)
            else:
                target = y.to(out.dtype).reshape(out.shape)
            return 0.5 * ((out - target) ** 2).sum(-1)
        return mse
    if loss == "bce":
        def bce(out, y):
            if out.shape[-1] != 1:
                raise ValueError(f"loss='bce' needs a scalar output, got {out.shape[-1]} outputs")
            return F.binary_cross_entropy_with_logits(
                out[..., 0], y.to(out.dtype), reduction="none")
        return bce
    raise ValueError(f"loss must be 'cross_entropy', 'mse', 'bce' or a callable, got {loss!r}")


def _labels(y, n: int, device) -> Tensor:
    y = torch.as_tensor(y, device=device)
    if y.shape[0] != n:
        raise ValueError(f"y must have one label per example ({n}), got shape {tuple(y.shape)}")
    return y


def _output_loss_grad(fn: _Functional, x: Tensor, y: Tensor, loss_fn) -> Tensor:
    """dl/df at each example [M, q]: f = logits, or f = features with l = loss(head(features))."""
    with torch.enable_grad():
        if fn.output == "features":
            feats = fn.model.features(x).detach().reshape(x.shape[0], -1).requires_grad_(True)
            out = fn.model.head(feats)
            (s,) = torch.autograd.grad(loss_fn(out, y).sum(), feats)
        else:
            out = fn.model(x).detach().reshape(x.shape[0], -1).requires_grad_(True)
            (s,) = torch.autograd.grad(loss_fn(out, y).sum(), out)
    return s.detach()


# --------------------------------------------------------------------------------------------
# empirical NTK
# --------------------------------------------------------------------------------------------
def empirical_ntk(
    model: nn.Module,
    x1,
    x2=None,
    *,
    output: str = "logits",
    reduce: Optional[str] = None,
    chunk: Optional[int] = None,
    eval_mode: bool = True,
) -> Tensor:
    """Empirical neural tangent kernel K(x, x') = J(x) J(x')^T over the trainable parameters.

    ``J(x) = d f(x; w) / dw`` [q, P], f the logits (``output="logits"``) or the penultimate
    features ``model.features(x)`` (``output="features"``; the head's parameters are excluded,
    the features do not depend on them).

    Args:
        model: any ``nn.Module`` mapping a batch of inputs [M, ...] to outputs [M, q] (or [M]).
        x1: inputs [M1, ...]; x2: inputs [M2, ...] (default: ``x1``).
        reduce: ``None`` -> [M1, M2, q, q]; ``"trace"`` -> sum_a K_aa [M1, M2];
            ``"diagonal"`` -> K_aa [M1, M2, q].
        chunk: examples per Jacobian block (default: as many as fit in 2**25 scalars). Memory is
            about ``2 * chunk * q * P`` scalars.
        eval_mode: evaluate in ``eval()`` mode (see the module docstring).

    Returns the kernel in the parameters' dtype. Per-example Jacobians come from
    ``vmap(jacrev(.))`` of ``functional_call``; blocks of ``x2`` are recomputed for each block of
    ``x1`` unless all of ``x2``'s Jacobians fit in one block.
    """
    if reduce not in (None, "trace", "diagonal"):
        raise ValueError(f"reduce must be None, 'trace' or 'diagonal', got {reduce!r}")
    with _eval_mode(model, eval_mode):
        fn = _Functional(model, output)
        x1 = fn.as_input(x1)
        x2 = x1 if x2 is None else fn.as_input(x2)
        q = fn.out_dim(x1)
        size = _auto_chunk(chunk, q * fn.num_params)
        spec = {None: "aqn,brn->abqr", "trace": "aqn,bqn->ab", "diagonal": "aqn,bqn->abq"}[reduce]
        cached = [(s, fn.jacobian(x2[s])) for s in _chunks(x2.shape[0], size)] \
            if x2.shape[0] <= size else None
        rows = []
        for s1 in _chunks(x1.shape[0], size):
            j1 = fn.jacobian(x1[s1])
            blocks2 = cached if cached is not None else (
                (s2, fn.jacobian(x2[s2])) for s2 in _chunks(x2.shape[0], size))
            cols = []
            for _s2, j2 in blocks2:
                cols.append(sum(torch.einsum(spec, j1[k], j2[k]) for k in j1))
            rows.append(torch.cat(cols, dim=1))
        return torch.cat(rows, dim=0)


# --------------------------------------------------------------------------------------------
# first-order changes Delta f(x) for a step at x'
# --------------------------------------------------------------------------------------------
def _choose_path(path: str, q: int) -> str:
    if path not in ("auto", "jacobian", "jvp"):
        raise ValueError(f"path must be 'auto', 'jacobian' or 'jvp', got {path!r}")
    if path == "auto":
        return "jacobian" if q <= _JVP_ABOVE else "jvp"
    return path


def _first_order_deltas(
    fn: _Functional, x_probe: Tensor, x_update: Tensor, y_update: Tensor, lr: float,
    loss_fn, chunk: Optional[int], path: str = "auto",
) -> Tensor:
    """Delta[i, j] = -lr * J(x_probe_i) grad_w l(x_update_j)   [M_probe, M_update, q].

    ``path="jacobian"``: probe Jacobians [c, q, P] (q reverse passes per probe) contracted with
    the update examples' loss gradients; the gradients are cached when they fit
    (``_GRAD_CACHE`` scalars), else recomputed per probe chunk. ``path="jvp"``: one forward-mode
    product of the probe batch per update example (cost ~ M_probe * M_update forward passes, no
    q x P Jacobian). ``"auto"``: the Jacobian for small outputs (logits), jvp for wide ones
    (features), where the q x P Jacobian blocks are the bottleneck.
    """
    q = fn.out_dim(x_probe)
    if _choose_path(path, q) == "jvp":
        return _first_order_deltas_jvp(fn, x_probe, x_update, y_update, lr, loss_fn, chunk)
    size = _auto_chunk(chunk, q * fn.num_params)
    gsize = _auto_chunk(chunk, fn.num_params)
    mu = x_update.shape[0]

    def grads():
        for s in _chunks(mu, gsize):
            yield s, fn.loss_grads(x_update[s], y_update[s], loss_fn)

    cached = list(grads()) if mu * fn.num_params <= _GRAD_CACHE else None
    rows = []
    for sp in _chunks(x_probe.shape[0], size):
        jac = fn.jacobian(x_probe[sp])
        cols = []
        for _su, g in (cached if cached is not None else grads()):
            cols.append(sum(torch.einsum("aqn,bn->abq", jac[k], g[k]) for k in jac))
        rows.append(torch.cat(cols, dim=1))
    return -float(lr) * torch.cat(rows, dim=0)


def _first_order_deltas_jvp(fn, x_probe, x_update, y_update, lr, loss_fn, chunk):
    usize = int(chunk) if chunk is not None else _JVP_TANGENTS
    psize = int(chunk) if chunk is not None else _JVP_PROBES
    cols = []
    for su in _chunks(x_update.shape[0], usize):
        g = fn.loss_grads(x_update[su], y_update[su], loss_fn)
        rows = [fn.pushforward(x_probe[sp], g) for sp in _chunks(x_probe.shape[0], psize)]
        cols.append(torch.cat(rows, dim=1))          # [c, Mp, q]
    return -float(lr) * torch.cat(cols, dim=0).transpose(0, 1)


# --------------------------------------------------------------------------------------------
# direct measurement of the impact matrix
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImpactMeasurement:
    """Directly measured impacts of the LE-SDE on a network (see :func:`measure_impacts`).

    Conventions: row = affected sample x (index i), column = the sample x' the SGD step is taken
    at (index j), like ``E[y_j, y_j']`` in the SDE's drift.

    Attributes:
        E: measured impact matrix E_hat [K, K]; E[k, k'] = impact on class k of a step at class
            k', per unit of lr-scaled time t = step * lr (directly comparable with a fitted E(t)).
        alpha: mean of the diagonal of E (intra-class impact).
        beta: mean of the off-diagonal of E (inter-class impact); nan when K = 1.
        pair_impacts: e(x_i, x_j) [M, M] (the diagonal holds the self-impacts e(x, x)).
        self_impact: per-class mean of e(x, x) [K] (nan for an empty class).
        G: G(x') = -dl/df(x') [M, q], the SDE's force at each sample.
        delta: first-order changes Delta f(x_i) for a step of size lr at x_j [M, M, q], or None
            when not kept.
        labels: class labels [M]; lr: the step size h; output: "logits" or "features";
        include_self: whether the x = x' pairs entered E's diagonal blocks.
    """

    E: Tensor
    alpha: float
    beta: float
    pair_impacts: Tensor
    self_impact: Tensor
    G: Tensor
    delta: Optional[Tensor]
    labels: Tensor
    lr: float
    output: str
    include_self: bool = False


def _pooled_impacts(pair: Tensor, weight: Tensor, labels: Tensor, num_classes: int,
                    include_self: bool) -> Tensor:
    """E[k, k'] = sum_{i in k, j in k'} w_j e_ij / sum w_j over valid pairs (pooled LSQ)."""
    m = pair.shape[0]
    valid = torch.isfinite(pair) & (weight > 0)[None, :]
    if not include_self:
        valid &= ~torch.eye(m, dtype=torch.bool, device=pair.device)
    w = torch.where(valid, weight[None, :].expand(m, m), torch.zeros((), dtype=pair.dtype))
    num = torch.where(valid, pair, torch.zeros((), dtype=pair.dtype)) * w
    onehot = F.one_hot(labels.long(), num_classes).to(pair.dtype)  # [M, K]
    num_k = onehot.T @ num @ onehot
    den_k = onehot.T @ w @ onehot
    return torch.where(den_k > 0, num_k / den_k.clamp_min(torch.finfo(pair.dtype).tiny),
                       torch.full_like(num_k, float("nan")))


def measure_impacts(
    model: nn.Module,
    x,
    y,
    lr: float,
    num_classes: Optional[int] = None,
    *,
    output: str = "logits",
    loss: LossSpec = "cross_entropy",
    include_self: bool = False,
    keep_delta: bool = True,
    chunk: Optional[int] = None,
    path: str = "auto",
    eval_mode: bool = True,
) -> ImpactMeasurement:
    """Direct measurement of the LE-SDE's impact matrix E on the network (background.md s. 4).

    One SGD step of size h = ``lr`` on the per-sample loss at x' changes the output at x, to
    first order, by

        Delta f(x) = -h J_f(x) grad_w l(x'),   grad_w l(x') = J_logit(x')^T dl/dlogit(x')

    (for ``output="logits"``: Delta f(x) = -h K(x, x') dl/df(x')). The LE-SDE models the same step
    as X(x) += h E[y, y'] G(x') with G(x') = -dl/df(x'): for logits dl/dlogit, for features
    dl/dfeatures = W_head^T dl/dlogit (the SDE's "cross-entropy through a linear read-out"). For
    features only the parameters before the head move them, so J_feat is taken over those and
    contracted with the same parameters' part of grad_w l(x') (the head's own step does not move
    the features).

    The scalar impact of x' on x is the least-squares coefficient of Delta f(x) on h G(x'):

        e(x, x') = <Delta f(x), h G(x')> / |h G(x')|^2
                 = -<J_f(x) grad_w l(x'), G(x')> / |G(x')|^2      (any output)
                 = G(x')^T K(x, x') G(x') / |G(x')|^2             (logits)

    which does not depend on h. Pooling the least squares over all pairs of a class pair,

        E_hat[k, k'] = sum_{x in k, x' in k'} e(x, x') |G(x')|^2 / sum |G(x')|^2,

    alpha_hat = mean_k E_hat[k, k], beta_hat = mean_{k != k'} E_hat[k, k'].

    Units: SDE time is t = step * lr and the SDE's drift is (1/N) sum_j' E G_j' (per-sample loss
    averaged over the draw, so a minibatch step of the mean loss gives the same expectation),
    hence E_hat is per unit of lr-scaled time and directly comparable with a fitted E(t).

    Self pairs **[package choice]**: x = x' pairs are excluded from the diagonal blocks by
    default (``include_self=False``). In the SDE the self term is one of N terms of the drift;
    on a tracked subset of m << N samples per class it would get weight ~1/m, and the self
    impact K(x, x) is typically far larger than a same-class impact, so including it biases
    alpha_hat upwards. The self impacts are reported separately (``self_impact``).

    Args:
        model: network (for ``output="features"`` a model with ``features(x)`` and a linear
            ``head`` such that logits = head(features), e.g. ``lesde.nets.FeatureNet``).
        x: tracked inputs [M, ...]; y: labels [M] (integers in 0..K-1 for the class pooling).
        lr: SGD step size h (only ``delta`` depends on it).
        num_classes: K (default ``max(y) + 1``).
        loss: per-sample loss on the logits: "cross_entropy" (default), "mse", "bce" or a
            callable ``(logits [B, q], y [B]) -> [B]``.
        keep_delta: keep the [M, M, q] first-order changes (set False to save memory).
        chunk: examples per Jacobian block (see :func:`empirical_ntk`), or per jvp batch.
        path: "jacobian" (per-example Jacobians [q, P] contracted with the loss gradients),
            "jvp" (one forward-mode product of the batch per step sample; no q x P blocks) or
            "auto" (default: Jacobians for outputs of at most 16 entries, e.g. logits, jvp for
            wider ones, e.g. features). Both give the same numbers up to rounding.

    Cost: M loss gradients plus either M q reverse passes and an M^2 q P contraction
    ("jacobian") or M^2 forward-mode passes ("jvp"); see benchmarks/bench_elasticity.py.
    """
    with _eval_mode(model, eval_mode):
        fn = _Functional(model, output)
        x = fn.as_input(x)
        m = x.shape[0]
        y = _labels(y, m, fn.device)
        k = int(num_classes) if num_classes is not None else int(y.max().item()) + 1
        if int(y.min().item()) < 0 or int(y.max().item()) >= k:
            raise ValueError(f"labels must lie in 0..{k - 1} (num_classes={k})")
        loss_fn = _loss_fn(loss)
        s = _output_loss_grad(fn, x, y, loss_fn)            # dl/df [M, q]
        delta = _first_order_deltas(fn, x, x, y, lr, loss_fn, chunk, path)  # [M, M, q]
    h = float(lr)
    hg = -h * s                                             # h G(x') [M, q]
    den = (hg ** 2).sum(-1)                                 # [M]
    num = torch.einsum("ijq,jq->ij", delta, hg)             # <Delta f(x_i), h G(x_j)>
    pair = torch.where(den[None, :] > 0, num / den.clamp_min(torch.finfo(num.dtype).tiny),
                       torch.full_like(num, float("nan")))
    weight = (s ** 2).sum(-1)                               # |G(x')|^2 (h^2 cancels)
    E = _pooled_impacts(pair, weight, y, k, include_self)
    diag = torch.diagonal(E)
    off = E[~torch.eye(k, dtype=torch.bool, device=E.device)]
    onehot = F.one_hot(y.long(), k).to(pair.dtype)
    counts = onehot.sum(0)
    self_imp = torch.where(counts > 0, (onehot.T @ torch.diagonal(pair).nan_to_num()) /
                           counts.clamp_min(1), torch.full_like(counts, float("nan")))
    return ImpactMeasurement(
        E=E, alpha=float(torch.nanmean(diag)) if diag.numel() else float("nan"),
        beta=float(torch.nanmean(off)) if off.numel() else float("nan"),
        pair_impacts=pair, self_impact=self_imp, G=-s, delta=delta if keep_delta else None,
        labels=y, lr=h, output=output, include_self=include_self,
    )


# --------------------------------------------------------------------------------------------
# one-step changes: explicit step (any optimizer) or its eta -> 0 limit (NTK)
# --------------------------------------------------------------------------------------------
OptimizerSpec = Union[str, Callable[[Sequence[Tensor], float], torch.optim.Optimizer]]


def _optimizer_factory(optimizer: OptimizerSpec):
    """``factory(params, lr) -> torch.optim.Optimizer``; "sgd" and "adam" are fresh optimizers."""
    if callable(optimizer):
        return optimizer
    if optimizer == "sgd":
        return lambda params, lr: torch.optim.SGD(params, lr=lr)
    if optimizer == "adam":
        return lambda params, lr: torch.optim.Adam(params, lr=lr)
    raise ValueError(f"optimizer must be 'sgd', 'adam' or a callable (params, lr) -> "
                     f"torch.optim.Optimizer, got {optimizer!r}")


@dataclass(frozen=True)
class StepChanges:
    """Changes of the outputs caused by one optimizer step at each update example.

    Convention (He & Su): row i = update example x_i, column j = probe x'_j.

    Attributes:
        delta: Delta_i f(x'_j) = f(x'_j; w_i+) - f(x'_j; w) [Mu, Mp, q], w_i+ one step at
            (x_i, y_i) from w.
        self_delta: Delta_i f(x_i), the change at the update example itself [Mu, q].
        loss_grad: dL/df at (x_i, y_i), f = the measured output (logits, features or, for a
            scalar output, the sigmoid probability) [Mu, q].
        before_probe: f(x'_j; w) [Mp, q]; before_self: f(x_i; w) [Mu, q].
        lr: the step size eta; method: "ntk" (first order, exact eta -> 0 limit, SGD only)
            or "step" (an explicit optimizer step).
        output: "logits", "features" or "probabilities" (what f is).
    """

    delta: Tensor
    self_delta: Tensor
    loss_grad: Tensor
    before_probe: Tensor
    before_self: Tensor
    lr: float
    method: str
    output: str = "logits"

    def relative(self) -> Tensor:
        """S_rel(x_i, x'_j) = |Delta_i f(x'_j)| / |Delta_i f(x_i)|  [Mu, Mp] (Euclidean norm)."""
        den = self.self_delta.norm(dim=-1)
        return self.delta.norm(dim=-1) / den[:, None]

    def kernelized(self) -> Tensor:
        """S_ker(x_i, x'_j) [Mu, Mp]: the coefficient of Delta_i f(x'_j) on -eta dL/df(x_i).

        Scalar output: Delta_i f(x'_j) / (-eta dL/df(x_i)) (He & Su). Vector output: the
        least-squares coefficient <Delta_i f(x'_j), -eta s_i> / |eta s_i|^2, s_i = dL/df(x_i),
        which reduces to the scalar formula for q = 1. In the eta -> 0 limit with SGD it is
        s_i^T K(x'_j, x_i) s_i / |s_i|^2, i.e. K(x_i, x'_j) for scalar outputs.

        For the sigmoid probability p of a scalar output (``output="probabilities"``),
        s_i = dL/dp(x_i) as in He & Su's BCE models; the eta -> 0 limit is then
        sigma'(z_i) sigma'(z'_j) K(x_i, x'_j). Not defined for softmax probabilities (dL/dp is
        not unique on the simplex).
        """
        if self.output == "probabilities" and self.delta.shape[-1] > 1:
            raise ValueError("kernelized similarity of softmax probabilities is not defined "
                             "(dL/dp is not unique on the simplex); use output='logits'")
        step = -self.lr * self.loss_grad
        return torch.einsum("ijq,iq->ij", self.delta, step) / (step ** 2).sum(-1)[:, None]


def one_step_changes(
    model: nn.Module,
    x,
    y,
    x_probe=None,
    *,
    lr: float = 1e-3,
    method: str = "ntk",
    optimizer: OptimizerSpec = "sgd",
    loss: LossSpec = "cross_entropy",
    output: str = "logits",
    chunk: Optional[int] = None,
    path: str = "auto",
    eval_mode: bool = True,
) -> StepChanges:
    """Change of the outputs at probes x'_j after one optimizer step at each example (x_i, y_i).

    ``method="step"`` takes the step explicitly (He & Su; Dan et al.): for each update example a
    fresh optimizer from ``optimizer`` (``"sgd"``, ``"adam"`` -- a fresh Adam's first step is
    about ``-eta sign(grad)`` -- or a callable ``(params, lr) -> Optimizer``) on a copy of the
    parameters (the model is not modified), one step on the per-sample loss L(f(x_i), y_i), then
    the outputs at the probes. ``method="ntk"`` gives the exact first-order (eta -> 0) SGD change

        Delta_i f(x'_j) = -eta J(x'_j) grad_w L(x_i, y_i)    (= -eta K(x'_j, x_i) dL/df(x_i))

    computed in chunks with ``torch.func`` (no loop over examples); SGD only.

    Args:
        x: update examples [Mu, ...]; y: their labels [Mu] (class indices for "cross_entropy",
            0/1 for "bce", targets for "mse").
        x_probe: probes [Mp, ...] (default: ``x``, giving square matrices).
        output: what is measured: the ``"logits"`` (default), the penultimate ``"features"``,
            or the ``"probabilities"`` g(z) of the logits z: the sigmoid for a scalar output
            (He & Su's binary cross-entropy models measure this), the softmax otherwise. For an
            explicit step Delta p = g(z + Delta z) - g(z); for ``method="ntk"`` its first
            order, Delta p = J_g(z') Delta z (sigma'(z') Delta z' for the sigmoid), so that
            S_rel(x, x') = sigma'(z') |K(x, x')| / (sigma'(z) K(x, x)) for a scalar output:
            not a constant multiple of the logit S_rel. **[package choice]** the default is
            the logits (the NTK quantity, He & Su's MSE models); :func:`cluster_pair` measures
            the probability for ``loss="bce"``, as He & Su do.
        chunk, path: memory and algorithm of the NTK path (see :func:`measure_impacts`).
    """
    if method not in ("ntk", "step"):
        raise ValueError(f"method must be 'ntk' or 'step', got {method!r}")
    if method == "ntk" and optimizer != "sgd":
        raise ValueError("method='ntk' is the eta -> 0 limit of an SGD step; use method='step' "
                         f"for optimizer={optimizer!r}")
    factory = _optimizer_factory(optimizer)
    loss_fn = _loss_fn(loss)
    if output not in ("logits", "features", "probabilities"):
        raise ValueError(f"output must be 'logits', 'features' or 'probabilities', got {output!r}")
    prob = output == "probabilities"
    if prob:
        output = "logits"
    with _eval_mode(model, eval_mode):
        fn = _Functional(model, output)
        x = fn.as_input(x)
        y = _labels(y, x.shape[0], fn.device)
        square = x_probe is None
        xp = x if square else fn.as_input(x_probe)
        s = _output_loss_grad(fn, x, y, loss_fn)
        before_p = fn.outputs(xp)
        before_s = before_p if square else fn.outputs(x)
        if method == "ntk":
            delta = _first_order_deltas(fn, xp, x, y, lr, loss_fn, chunk, path).transpose(0, 1)
            if square:
                self_delta = torch.diagonal(delta, dim1=0, dim2=1).T
            else:
                gsize = _auto_chunk(chunk, fn.num_params)
                parts = []
                for sl in _chunks(x.shape[0], gsize):
                    g = fn.loss_grads(x[sl], y[sl], loss_fn)
                    parts.append(fn.directional(x[sl], g))
                self_delta = -float(lr) * torch.cat(parts)
        else:
            delta, self_delta = _explicit_steps(model, output, x, y, xp, square, lr, factory,
                                                loss_fn, before_p, before_s)
    delta, self_delta = delta.detach(), self_delta.detach()
    if prob:
        return _to_probabilities(delta, self_delta, s, before_p, before_s, float(lr), method)
    return StepChanges(delta=delta, self_delta=self_delta, loss_grad=s,
                       before_probe=before_p, before_self=before_s, lr=float(lr), method=method,
                       output=output)


def _link(z: Tensor) -> Tensor:
    """g(z): the sigmoid of a scalar output [.., 1], the softmax of a vector output."""
    return torch.sigmoid(z) if z.shape[-1] == 1 else torch.softmax(z, dim=-1)


def _link_jvp(z: Tensor, dz: Tensor) -> Tensor:
    """J_g(z) dz, broadcasting z [.., q] against dz [.., q]: sigma'(z) dz, or for the softmax
    p * (dz - <p, dz>)."""
    if z.shape[-1] == 1:
        p = torch.sigmoid(z)
        return p * (1 - p) * dz
    p = torch.softmax(z, dim=-1)
    return p * (dz - (p * dz).sum(-1, keepdim=True))


def _to_probabilities(delta, self_delta, s, z_probe, z_self, lr, method) -> StepChanges:
    """Logit changes -> changes of g(z) (explicit: exact; ntk: first order)."""
    if method == "step":
        dp = _link(z_probe[None] + delta) - _link(z_probe)[None]
        dps = _link(z_self + self_delta) - _link(z_self)
    else:
        dp = _link_jvp(z_probe[None], delta)
        dps = _link_jvp(z_self, self_delta)
    if z_self.shape[-1] == 1:   # dL/dp = dL/dz / sigma'(z)
        p = torch.sigmoid(z_self)
        grad_p = s / (p * (1 - p))
    else:
        grad_p = s
    return StepChanges(delta=dp, self_delta=dps, loss_grad=grad_p, before_probe=_link(z_probe),
                       before_self=_link(z_self), lr=lr, method=method, output="probabilities")


def _explicit_steps(model, output, x, y, xp, square, lr, factory, loss_fn, before_p, before_s):
    """One fresh optimizer step per update example on a copy of all trainable parameters."""
    full = _Functional(model, "logits")   # every trainable parameter moves
    view = _OutputView(model, output)
    probes = xp if square else torch.cat([xp, x])
    mp = xp.shape[0]
    deltas, selfs = [], []
    for i in range(x.shape[0]):
        params = {k: v.clone().requires_grad_(True) for k, v in full.params.items()}
        opt = factory(list(params.values()), float(lr))
        opt.zero_grad()
        with torch.enable_grad():
            logits = functional_call(full.logit_view, (params, full.consts), (x[i:i + 1],))
            loss_fn(logits, y[i:i + 1]).sum().backward()
        opt.step()
        with torch.no_grad():
            after = functional_call(view, (params, full.consts), (probes,))
            after = after.reshape(probes.shape[0], -1)
        deltas.append(after[:mp] - before_p)
        selfs.append(after[i] - before_s[i] if square else after[mp + i] - before_s[i])
    return torch.stack(deltas), torch.stack(selfs)


def relative_similarity(model: nn.Module, x, y, x_probe=None, **kwargs) -> Tensor:
    """He & Su's relative similarity S_rel(x_i, x'_j) = |Delta_i f(x'_j)| / |Delta_i f(x_i)|.

    Shape [Mu, Mp], row = update example, column = probe; vector outputs are summarised by the
    Euclidean norm. With ``method="ntk"`` (default) the exact eta -> 0 SGD limit
    |K(x'_j, x_i) s_i| / |K(x_i, x_i) s_i| (s_i = dL/df(x_i); |K(x_i, x'_j)| / K(x_i, x_i) for
    scalar outputs); ``method="step"`` takes an explicit optimizer step. Keyword arguments as
    in :func:`one_step_changes`.
    """
    return one_step_changes(model, x, y, x_probe, **kwargs).relative()


def kernelized_similarity(model: nn.Module, x, y, x_probe=None, **kwargs) -> Tensor:
    """He & Su's kernelized similarity S_ker(x_i, x'_j) = Delta_i f(x'_j) / (-eta dL/df(x_i)).

    Shape [Mu, Mp], row = update example, column = probe. Vector outputs: the least-squares
    coefficient on the step direction (:meth:`StepChanges.kernelized`). With ``method="ntk"``
    (default) the exact eta -> 0 SGD limit, the empirical NTK K(x_i, x'_j) for scalar outputs.
    Keyword arguments as in :func:`one_step_changes`.
    """
    return one_step_changes(model, x, y, x_probe, **kwargs).kernelized()


def _kl_from_logits(z_old: Tensor, dz: Tensor, kl_mode: str) -> Tensor:
    """KL(softmax(z_old) || softmax(z_old + dz)) per row, computed without cancellation.

    With p = softmax(z_old) and u = dz - <p, dz>:  KL = log sum_a p_a exp(u_a)
    = log1p(sum_a p_a (expm1(u_a) - u_a)) (the first-order terms cancel exactly), in float64.
    ``kl_mode="compat"``: sum_a p_a (log p_a - p+_a), see :func:`kl_relative_similarity`.
    """
    z_old = z_old.to(torch.float64)
    dz = dz.to(torch.float64)
    logp = torch.log_softmax(z_old, dim=-1)
    p = logp.exp()
    if kl_mode == "true":
        u = dz - (p * dz).sum(-1, keepdim=True)
        return torch.log1p((p * (torch.expm1(u) - u)).sum(-1))
    p_new = torch.softmax(z_old + dz, dim=-1)
    return (p * (logp - p_new)).sum(-1)


def kl_relative_similarity(
    model: nn.Module,
    x,
    y,
    x_probe=None,
    *,
    lr: float = 1e-4,
    optimizer: OptimizerSpec = "adam",
    kl_mode: str = "true",
    loss: LossSpec = "cross_entropy",
    eval_mode: bool = True,
) -> Tensor:
    """Dan et al.'s KL relative similarity (arXiv 2111.01166), [Mu, Mp]:

        S_rel^KL(x_i, x'_j) = KL(g(x'_j; w) || g(x'_j; w_i+)) / KL(g(x_i; w) || g(x_i; w_i+)),

    g = softmax of the logits, w_i+ one fresh optimizer step at (x_i, y_i) (Adam with lr 1e-4 in
    their protocol). Row = update example, column = probe.

    ``kl_mode="true"`` (default, **[package choice]**): the KL divergence, computed in float64
    without cancellation (it is second order in the step).

    ``kl_mode="compat"`` reproduces the released code's formula. torch's
    ``F.kl_div(input, target)`` computes sum target * (log target - input) and expects ``input``
    to be log-probabilities, so KL(g || g+) is ``kl_div(log g+, g)``; the released code passes
    the probabilities g+ as ``input`` (background.md section 1), which gives

        sum_a g_a (log g_a - g+_a)

    (not a divergence: it does not vanish when nothing changes). This reading of the code is
    taken from that description; torch's reduction (mean over elements) scales numerator and
    denominator alike and cancels in the ratio.
    """
    if kl_mode not in ("true", "compat"):
        raise ValueError(f"kl_mode must be 'true' or 'compat', got {kl_mode!r}")
    ch = one_step_changes(model, x, y, x_probe, lr=lr, method="step", optimizer=optimizer,
                          loss=loss, output="logits", eval_mode=eval_mode)
    return _kl_ratio(ch, kl_mode)


def _kl_ratio(ch: StepChanges, kl_mode: str) -> Tensor:
    num = _kl_from_logits(ch.before_probe[None].expand_as(ch.delta), ch.delta, kl_mode)
    den = _kl_from_logits(ch.before_self, ch.self_delta, kl_mode)
    return (num / den[:, None]).to(ch.delta.dtype)


# --------------------------------------------------------------------------------------------
# pairwise matrices and class-pair summaries
# --------------------------------------------------------------------------------------------
def symmetrize(s: Tensor, normalize: bool = False) -> Tensor:
    """(S + S^T) / 2; with ``normalize``, then S_ij / sqrt(S_ii S_jj) (a normalised kernel,
    diagonal 1; needs a positive diagonal)."""
    s = torch.as_tensor(s)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"S must be a square matrix, got shape {tuple(s.shape)}")
    s = 0.5 * (s + s.T)
    if normalize:
        d = torch.diagonal(s)
        if bool((d <= 0).any()):
            raise ValueError("normalize=True needs a positive diagonal")
        s = s / torch.sqrt(d[:, None] * d[None, :])
    return s


def similarity_matrix(
    model: nn.Module,
    x,
    y,
    *,
    kind: str = "relative",
    symmetric: bool = True,
    normalize: bool = False,
    **kwargs,
) -> Tensor:
    """Pairwise similarity over a data set, [M, M], row = update example, column = probe.

    ``kind``: "relative" (S_rel), "kernelized" (S_ker) or "kl" (Dan et al.'s S_rel^KL; explicit
    step, keyword arguments of :func:`kl_relative_similarity`). ``symmetric``: return
    (S + S^T)/2 (He & Su). ``normalize``: the normalised kernel S_ij / sqrt(S_ii S_jj) (for
    "kernelized"). Other keyword arguments go to :func:`one_step_changes`; the default
    ``method="ntk"`` computes the eta -> 0 limit in batches through the empirical NTK.
    """
    if kind == "relative":
        s = relative_similarity(model, x, y, **kwargs)
    elif kind == "kernelized":
        s = kernelized_similarity(model, x, y, **kwargs)
    elif kind == "kl":
        s = kl_relative_similarity(model, x, y, **kwargs)
    else:
        raise ValueError(f"kind must be 'relative', 'kernelized' or 'kl', got {kind!r}")
    if normalize and not symmetric:
        d = torch.diagonal(s)
        return s / torch.sqrt(d[:, None] * d[None, :])
    return symmetrize(s, normalize) if symmetric else s


def class_pair_means(s, y_rows, y_cols=None, num_classes: Optional[int] = None,
                     exclude_self: bool = True) -> Tensor:
    """Mean of S[i, j] over i in class k (rows) and j in class k' (columns): [K, K].

    ``y_cols`` defaults to ``y_rows`` (a square matrix over one set); then ``exclude_self``
    leaves out the i = j entries. nan where a class pair has no entries.
    """
    s = torch.as_tensor(s)
    yr = torch.as_tensor(y_rows).long().to(s.device)
    same = y_cols is None
    yc = yr if same else torch.as_tensor(y_cols).long().to(s.device)
    if s.shape != (yr.shape[0], yc.shape[0]):
        raise ValueError(f"S has shape {tuple(s.shape)}, labels give "
                         f"({yr.shape[0]}, {yc.shape[0]})")
    k = int(num_classes) if num_classes is not None else int(max(yr.max(), yc.max())) + 1
    valid = torch.isfinite(s)
    if same and exclude_self:
        valid &= ~torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    w = valid.to(s.dtype)
    vals = torch.where(valid, s, torch.zeros((), dtype=s.dtype))
    a, b = F.one_hot(yr, k).to(s.dtype), F.one_hot(yc, k).to(s.dtype)
    num, den = a.T @ vals @ b, a.T @ w @ b
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, float("nan")))


# --------------------------------------------------------------------------------------------
# clustering with local elasticity (He & Su)
# --------------------------------------------------------------------------------------------
def clustering_accuracy(true, pred) -> float:
    """Accuracy of a clustering under the best one-to-one matching of clusters to classes.

    The matching maximises the number of agreements (Hungarian algorithm,
    ``scipy.optimize.linear_sum_assignment`` on the confusion matrix). For two clusters and two
    classes this is He & Su's score 0.5 + |acc - 0.5|.
    """
    from scipy.optimize import linear_sum_assignment

    t = np.asarray(true).reshape(-1)
    p = np.asarray(pred).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"true and pred must have the same length, got {t.size} and {p.size}")
    if t.size == 0:
        raise ValueError("empty labelling")
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    conf = np.zeros((ti.max() + 1, pi.max() + 1), dtype=np.int64)
    np.add.at(conf, (ti, pi), 1)
    rows, cols = linear_sum_assignment(-conf)
    return float(conf[rows, cols].sum() / t.size)


def kernel_kmeans(gram, n_clusters: int, *, n_init: int = 10, max_iter: int = 100,
                  seed: int = 0) -> np.ndarray:
    """Kernel K-means (Lloyd iterations in the feature space of a Gram matrix).

    Squared distance of point i to the mean of cluster C in feature space:

        K_ii - (2/|C|) sum_{j in C} K_ij + (1/|C|^2) sum_{j, l in C} K_jl.

    Initialisation by kernel k-means++ (``n_init`` restarts from ``numpy.random.default_rng
    (seed)``); the labelling with the smallest within-cluster sum of squared distances is
    returned [n] (integers 0..n_clusters-1). An empty cluster takes the point farthest from its
    own cluster's mean. ``gram`` [n, n] should be symmetric positive semi-definite (e.g. a
    symmetrised S_ker or an NTK); other symmetric matrices are accepted (the iterations then
    need not decrease the objective, and stop after ``max_iter``).
    """
    K = np.asarray(gram, dtype=np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"gram must be a square matrix, got shape {K.shape}")
    n, k = K.shape[0], int(n_clusters)
    if not 1 <= k <= n:
        raise ValueError(f"n_clusters must be in 1..{n}, got {n_clusters}")
    K = 0.5 * (K + K.T)
    diag = np.diag(K)
    rng = np.random.default_rng(seed)
    best, best_obj = None, np.inf
    for _ in range(max(1, int(n_init))):
        centres = [int(rng.integers(n))]
        d2 = np.maximum(diag - 2 * K[:, centres[0]] + K[centres[0], centres[0]], 0)
        for _c in range(1, k):
            prob = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
            c = int(rng.choice(n, p=prob))
            centres.append(c)
            d2 = np.minimum(d2, np.maximum(diag - 2 * K[:, c] + K[c, c], 0))
        cen = np.asarray(centres)
        labels = np.argmin(diag[:, None] - 2 * K[:, cen] + K[cen, cen][None, :], axis=1)
        for _it in range(int(max_iter)):
            dist = _kernel_distances(K, diag, labels, k)
            own = dist[np.arange(n), labels]
            new = np.argmin(dist, axis=1)
            for c in range(k):  # refill empty clusters
                if not np.any(new == c):
                    far = int(np.argmax(own))
                    new[far] = c
                    own[far] = -np.inf
            if np.array_equal(new, labels):
                break
            labels = new
        dist = _kernel_distances(K, diag, labels, k)
        obj = float(dist[np.arange(n), labels].sum())
        if obj < best_obj:
            best, best_obj = labels.copy(), obj
    return best


def _kernel_distances(K, diag, labels, k):
    onehot = np.zeros((K.shape[0], k))
    onehot[np.arange(K.shape[0]), labels] = 1.0
    counts = np.maximum(onehot.sum(0), 1.0)
    ko = K @ onehot
    within = np.einsum("ic,ic->c", onehot, ko) / counts ** 2
    return diag[:, None] - 2 * ko / counts[None, :] + within[None, :]


def le_cluster(s_rel, s_ker, n_clusters: int = 2, *, seed: int = 0) -> Dict[str, np.ndarray]:
    """He & Su's local-elasticity clusterings of symmetric similarity matrices [n, n].

    Returns labels [n] for ``"kmeans_rel"`` (K-means on the rows of S_rel, scikit-learn),
    ``"spectral_rel"`` (spectral clustering with S_rel as the precomputed affinity; negative
    entries, possible for finite steps, are clipped to 0) and ``"kernel_kmeans_ker"`` (kernel
    K-means with S_ker as the Gram matrix, :func:`kernel_kmeans`). Either matrix may be None
    to skip its methods.
    """
    from sklearn.cluster import KMeans, SpectralClustering

    out: Dict[str, np.ndarray] = {}
    if s_rel is not None:
        a = np.asarray(torch.as_tensor(s_rel).detach().cpu(), dtype=np.float64)
        out["kmeans_rel"] = KMeans(n_clusters, n_init=10, random_state=seed).fit_predict(a)
        out["spectral_rel"] = SpectralClustering(
            n_clusters, affinity="precomputed", random_state=seed
        ).fit_predict(np.clip(0.5 * (a + a.T), 0, None))
    if s_ker is not None:
        g = np.asarray(torch.as_tensor(s_ker).detach().cpu(), dtype=np.float64)
        out["kernel_kmeans_ker"] = kernel_kmeans(g, n_clusters, seed=seed)
    return out


def baseline_cluster(x, n_clusters: int = 2, *, seed: int = 0,
                     pca_components: int = 100) -> Dict[str, np.ndarray]:
    """He & Su's baselines on the flattened inputs [n, ...]: ``"kmeans_raw"`` (K-means on raw
    pixels) and ``"pca_kmeans"`` (PCA to min(pca_components, n, d) dimensions, then K-means)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    a = np.asarray(torch.as_tensor(x).detach().cpu(), dtype=np.float64).reshape(len(x), -1)
    comps = int(min(pca_components, a.shape[0], a.shape[1]))
    z = PCA(comps, random_state=seed).fit_transform(a)
    return {
        "kmeans_raw": KMeans(n_clusters, n_init=10, random_state=seed).fit_predict(a),
        "pca_kmeans": KMeans(n_clusters, n_init=10, random_state=seed).fit_predict(z),
    }


def train_classifier(model: nn.Module, x, y, *, epochs: int = 10, lr: float = 0.01,
                     batch_size: int = 32, loss: LossSpec = "bce", momentum: float = 0.0,
                     optimizer: str = "sgd", seed: int = 0, progress: bool = False) -> list:
    """Train ``model`` in place by minibatch SGD (or Adam) on the mean per-sample loss.

    Shuffling uses ``torch.Generator().manual_seed(seed)``. Returns the mean training loss of
    each epoch. A plain loop for the clustering and locality experiments here; the package's
    training logger (``lesde.tracking``) is the tool for logged runs.
    """
    loss_fn = _loss_fn(loss)
    p0 = next(model.parameters())
    x = torch.as_tensor(x).to(device=p0.device, dtype=p0.dtype)
    y = torch.as_tensor(y).to(p0.device)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    gen = torch.Generator().manual_seed(int(seed))
    n, history = x.shape[0], []
    it = range(int(epochs))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="train", leave=False)
    model.train()
    for _ in it:
        perm = torch.randperm(n, generator=gen).to(p0.device)
        total = 0.0
        for start in range(0, n, int(batch_size)):
            idx = perm[start:start + int(batch_size)]
            opt.zero_grad()
            out = model(x[idx]).reshape(len(idx), -1)
            batch_loss = loss_fn(out, y[idx]).mean()
            batch_loss.backward()
            opt.step()
            total += float(batch_loss.detach()) * len(idx)
        history.append(total / n)
    return history


@dataclass
class ClusteringResult:
    """Result of :func:`cluster_pair` / :func:`ntk_cluster_pair`: ``accuracy`` (method ->
    score), ``labels`` (method -> predicted clusters [n]), the symmetrised matrices ``s_rel`` and
    ``s_ker`` [n, n], the training ``history``, the ``output`` measured ("logits" or
    "probabilities") and the ``chance`` level of the score for these class sizes
    (:func:`clustering_chance`, balanced random split)."""

    accuracy: Dict[str, float]
    labels: Dict[str, np.ndarray]
    s_rel: Tensor
    s_ker: Tensor
    history: list = field(default_factory=list)
    output: str = "logits"
    chance: Dict[str, float] = field(default_factory=dict)


def _resolve_output(output: str, loss) -> str:
    if output == "auto":
        return "probabilities" if loss == "bce" else "logits"
    if output not in ("logits", "probabilities"):
        raise ValueError(f"output must be 'auto', 'logits' or 'probabilities', got {output!r}")
    return output


def _finish_clustering(truth, xp, s_rel, s_ker, seed, baselines, pca_components, normalize_kernel,
                       history, output) -> ClusteringResult:
    n_clusters = len(np.unique(truth))
    s_rel = symmetrize(s_rel)
    s_ker = symmetrize(s_ker, normalize=normalize_kernel)
    labels = le_cluster(s_rel, s_ker, n_clusters, seed=seed)
    if baselines:
        labels.update(baseline_cluster(torch.as_tensor(xp).cpu(), n_clusters, seed=seed,
                                       pca_components=pca_components))
    acc = {name: clustering_accuracy(truth, lab) for name, lab in labels.items()}
    sizes = np.unique(truth, return_counts=True)[1]
    chance = clustering_chance(sizes) if len(sizes) == 2 else {}
    return ClusteringResult(accuracy=acc, labels=labels, s_rel=s_rel, s_ker=s_ker,
                            history=history, output=output, chance=chance)


def cluster_pair(
    model: nn.Module,
    x_primary,
    labels_primary,
    x_aux,
    *,
    epochs: int = 20,
    lr: float = 0.01,
    batch_size: int = 32,
    loss: LossSpec = "bce",
    output: str = "auto",
    method: str = "ntk",
    probe_lr: float = 1e-4,
    normalize_kernel: bool = False,
    baselines: bool = True,
    pca_components: int = 100,
    seed: int = 0,
    chunk: Optional[int] = None,
    progress: bool = False,
) -> ClusteringResult:
    """He & Su's local-elasticity clustering of a primary pair of classes (ICLR 2020).

    1. Train ``model`` (scalar output, q = 1) in place to output 1 on the primary examples (both
       classes together, [n, ...]) and 0 on the auxiliary examples [n_aux, ...] (``loss`` "bce"
       or "mse"; minibatch SGD, ``epochs``, ``lr``, ``batch_size``, shuffling from ``seed``).
    2. Probe: for every primary example x_i, one SGD step at (x_i, 1) of size ``probe_lr``
       (``method="step"``) or its exact eta -> 0 limit (``method="ntk"``, default, batched; for a
       one-hidden-layer ``lesde.nets.MLP`` through :func:`mlp_ntk`, seconds even for wide
       networks), and the change Delta_i f at every primary example: S_rel, S_ker [n, n] (row =
       update example, column = probe), symmetrised (S + S^T)/2; ``normalize_kernel`` uses
       S_ij / sqrt(S_ii S_jj) for the kernel. ``output``: the change of the logit, or of the
       sigmoid probability p = sigma(z) (He & Su's BCE networks, ``MLPProb``, measure this;
       see :func:`kernel_similarities`); ``"auto"`` (default) = probabilities for ``loss="bce"``,
       logits for ``"mse"``, as in their code.
    3. Cluster into two (:func:`le_cluster`) and, with ``baselines``, K-means on raw pixels and
       PCA(``pca_components``) + K-means (:func:`baseline_cluster`); score each with
       :func:`clustering_accuracy` against ``labels_primary`` [n]. Compare the scores with
       ``result.chance`` (what a labelling that ignores the classes scores) and with their spread
       over seeds before calling one method better than another.
    """
    output = _resolve_output(output, loss)
    p0 = next(model.parameters())
    xp = torch.as_tensor(x_primary).to(device=p0.device, dtype=p0.dtype)
    xa = torch.as_tensor(x_aux).to(device=p0.device, dtype=p0.dtype)
    truth = np.asarray(torch.as_tensor(labels_primary).cpu()).reshape(-1)
    if truth.shape[0] != xp.shape[0]:
        raise ValueError(f"labels_primary must have one label per primary example "
                         f"({xp.shape[0]}), got {truth.shape[0]}")
    with torch.no_grad():
        q = model(xp[:1]).reshape(1, -1).shape[1]
    if q != 1:
        raise ValueError(f"cluster_pair needs a scalar-output model (num_classes=1), got {q}")
    x_train = torch.cat([xp, xa])
    y_train = torch.cat([torch.ones(len(xp)), torch.zeros(len(xa))]).to(p0.device)
    history = train_classifier(model, x_train, y_train, epochs=epochs, lr=lr,
                               batch_size=batch_size, loss=loss, seed=seed, progress=progress)
    if method == "ntk" and _two_layer_parts(model) is not None:
        K = mlp_ntk(model, xp)
        with torch.no_grad():
            z = model(xp).reshape(-1).double()
        s_rel, s_ker = kernel_similarities(K, z, output)
    else:
        ch = one_step_changes(model, xp, torch.ones(len(xp), device=p0.device), lr=probe_lr,
                              method=method, loss=loss, chunk=chunk, output=output)
        s_rel, s_ker = ch.relative(), ch.kernelized()
    return _finish_clustering(truth, xp, s_rel, s_ker, seed, baselines, pca_components,
                              normalize_kernel, history, output)


def ntk_cluster_pair(
    x_primary,
    labels_primary,
    x_aux,
    *,
    activation: Optional[str] = "relu",
    width: float = 40960,
    output: str = "auto",
    loss: str = "bce",
    lr: float = 3e-3,
    epochs: int = 200,
    batch_size: int = 500,
    normalize_kernel: bool = False,
    baselines: bool = True,
    pca_components: int = 100,
    seed: int = 0,
    theta=None,
) -> ClusteringResult:
    """He & Su's clustering (:func:`cluster_pair`) for their two-layer network in the wide
    limit, with no network at all: the kernel is :func:`two_layer_ntk` (``activation`` "relu"
    or "linear", ``width`` m; PyTorch's initialisation), which does not move during training
    at infinite width. ``theta`` [n + n_aux, n + n_aux] (primary examples first) replaces it by
    any given NTK, e.g. the empirical NTK of a finite network at initialisation
    (:func:`mlp_ntk`): the same computation in the lazy (kernel) regime of that network.

    - ``output="logits"``: S_rel = |K_ij| / K_ii and S_ker = K; training does not enter.
      ``width=math.inf`` gives the m -> infinity limit (up to a factor).
    - ``output="probabilities"`` (the default for ``loss="bce"``, as in He & Su's ``MLPProb``):
      the logits z of the primary examples after training come from the linearised network
      trained in function space (:func:`ntk_train` on primary = 1, auxiliary = 0, from f = 0,
      with their SGD settings ``lr``, ``epochs``, ``batch_size``: 3e-3, 200, 500 on CIFAR-10),
      then :func:`kernel_similarities`. Needs a finite width (the kernel's scale sets the
      training speed; He & Su's 40,960 by default).
    """
    output = _resolve_output(output, loss)
    xp = _flat64(x_primary)
    xa = _flat64(x_aux)
    truth = np.asarray(torch.as_tensor(labels_primary).cpu()).reshape(-1)
    if truth.shape[0] != xp.shape[0]:
        raise ValueError(f"labels_primary must have one label per primary example "
                         f"({xp.shape[0]}), got {truth.shape[0]}")
    n = xp.shape[0]
    if theta is not None:
        theta = torch.as_tensor(theta, dtype=torch.float64)
        if theta.shape != (n + xa.shape[0], n + xa.shape[0]):
            raise ValueError(f"theta must be [{n + xa.shape[0]}, {n + xa.shape[0]}] (primary, "
                             f"then auxiliary examples), got {tuple(theta.shape)}")
    if output == "logits":
        K = two_layer_ntk(xp, activation=activation, width=width) if theta is None \
            else theta[:n, :n]
        s_rel, s_ker = kernel_similarities(K, output="logits")
        history: list = []
    else:
        if theta is None and math.isinf(float(width)):
            raise ValueError("output='probabilities' needs a finite width (the trained logits "
                             "depend on the kernel's scale)")
        if theta is None:
            theta = two_layer_ntk(torch.cat([xp, xa]), activation=activation, width=width)
        t = torch.cat([torch.ones(n), torch.zeros(xa.shape[0])]).double()
        f = ntk_train(theta, t, lr=lr, epochs=epochs, batch_size=batch_size, loss=loss)
        s_rel, s_ker = kernel_similarities(theta[:n, :n], f[:n], "probabilities")
        p = torch.sigmoid(f)
        history = [float(F.binary_cross_entropy(p, t)) if loss == "bce"
                   else float(0.5 * ((f - t) ** 2).mean())]
    return _finish_clustering(truth, xp, s_rel, s_ker, seed, baselines, pca_components,
                              normalize_kernel, history, output)


# --------------------------------------------------------------------------------------------
# two-layer networks: the exact empirical NTK and its infinite-width limit
# --------------------------------------------------------------------------------------------
def _flat64(x) -> Tensor:
    x = torch.as_tensor(x).detach().to(torch.float64)
    return x.reshape(x.shape[0], -1)


def _gaussian_moments(activation: Optional[str], k11: Tensor, k22: Tensor, k12: Tensor):
    """E[s(u) s(u')] and E[s'(u) s'(u')] for (u, u') centred Gaussian with variances k11, k22
    and covariance k12 (broadcasting): closed forms for ReLU (Cho & Saul, NIPS 2009, arc-cosine
    kernels of degree 1 and 0) and for the identity."""
    if activation in (None, "linear"):
        return k12, torch.ones_like(k12)
    if activation != "relu":
        raise ValueError(f"closed-form infinite-width kernels exist here for 'relu' and 'linear', "
                         f"got {activation!r}")
    norm = torch.sqrt(k11 * k22)
    cos = torch.clamp(k12 / norm, -1.0, 1.0)
    theta = torch.arccos(cos)
    sigma = norm * (torch.sin(theta) + (math.pi - theta) * cos) / (2 * math.pi)
    sigma_dot = (math.pi - theta) / (2 * math.pi)
    return sigma, sigma_dot


def two_layer_ntk(
    x1,
    x2=None,
    *,
    activation: Optional[str] = "relu",
    width: float = math.inf,
    weight_var: Optional[float] = None,
    bias_var: Optional[float] = None,
    readout_var: Optional[float] = None,
    bias: bool = True,
) -> Tensor:
    """The NTK of a two-layer network f(x) = sum_r a_r s(w_r . x + b_r) + c, averaged over its
    random initialisation, in closed form (no network, any width).

    With w_r ~ N(0, ``weight_var`` I), b_r ~ N(0, ``bias_var``), a_r ~ N(0, ``readout_var``),
    the pre-activations u(x) are a centred Gaussian process with covariance
    k(x, x') = weight_var x.x' + bias_var, and at width m

        Theta_m(x, x') = m Sigma(x, x') + 1 + m readout_var Sigma_dot(x, x') (x.x' + 1)

    (readout weights, readout bias, first-layer weights and biases), where Sigma = E[s(u) s(u')]
    and Sigma_dot = E[s'(u) s'(u')] are the arc-cosine kernels of Cho & Saul (NIPS 2009): for
    ReLU, with cos theta = k(x, x') / sqrt(k(x, x) k(x', x')),

        Sigma     = sqrt(k(x, x) k(x', x')) (sin theta + (pi - theta) cos theta) / (2 pi),
        Sigma_dot = (pi - theta) / (2 pi);

    for the identity ("linear") Sigma = k and Sigma_dot = 1. Defaults follow PyTorch's
    ``nn.Linear`` initialisation, which He & Su's networks use (standard parameterisation):
    weight_var = bias_var = 1 / (3 d) for inputs of d entries and readout_var = 1 / (3 m), so
    the last term is Sigma_dot (x.x' + 1) / 3. ``bias=False``: no first-layer bias (bias_var = 0
    and x.x' instead of x.x' + 1).

    In this parameterisation Theta_m grows like m, and ``width=math.inf`` returns the limit of
    Theta_m / m, Sigma itself. Relative similarities |K(x, x')| / K(x, x), normalised kernels and
    the clusterings built from them do not change under a common factor, so the limit is the
    similarity of an infinitely wide network of He & Su's kind (they used m = 40,960; at that
    width the first-layer term still contributes a few per cent on CIFAR-10).

    Exact for Gaussian weights; PyTorch draws them uniformly, and the pre-activations are then
    Gaussian only in the limit of many inputs (central limit theorem; for CIFAR-10's d = 3,072
    the difference is negligible, for d = 3 it is not).

    Args: x1 [M1, ...], x2 [M2, ...] (default x1), flattened. Returns [M1, M2] in float64.
    """
    a = _flat64(x1)
    b = a if x2 is None else _flat64(x2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x1 and x2 need the same number of entries, got {a.shape[1]} and "
                         f"{b.shape[1]}")
    d = a.shape[1]
    m = float(width)
    if not m > 0:
        raise ValueError(f"width must be positive (or math.inf), got {width}")
    wv = 1.0 / (3 * d) if weight_var is None else float(weight_var)
    bv = (1.0 / (3 * d) if bias_var is None else float(bias_var)) if bias else 0.0
    gram = a @ b.T
    k12 = wv * gram + bv
    k11 = (wv * (a * a).sum(1) + bv)[:, None]
    k22 = (wv * (b * b).sum(1) + bv)[None, :]
    sigma, sigma_dot = _gaussian_moments(activation, k11, k22, k12)
    if math.isinf(m):
        return sigma
    rv = 1.0 / (3 * m) if readout_var is None else float(readout_var)
    return m * sigma + 1.0 + m * rv * sigma_dot * (gram + (1.0 if bias else 0.0))


def _two_layer_parts(model: nn.Module):
    """(first Linear, activation name, activation kwargs, head) of a one-hidden-layer
    ``lesde.nets.MLP``, else None."""
    from .nets import MLP

    if isinstance(model, MLP) and len(model.layers) == 1:
        return model.layers[0], model.activation, model.activation_kwargs, model.head
    return None


def mlp_ntk(model: nn.Module, x1, x2=None, *, chunk: int = 1024) -> Tensor:
    """The exact empirical NTK of a one-hidden-layer ``lesde.nets.MLP`` without forming any
    Jacobian: with U = X W^T + b, H = s(U), G = s'(U) and head weights A [q, m],

        K_cc'(x, x') = [H(x) . H(x') + 1] delta_cc' + sum_r A_cr A_c'r G_r(x) G_r(x') (x.x' + 1)

    (head weights, head bias, first-layer weights, first-layer bias; the 1s drop without the
    corresponding bias). Cost O(M1 M2 (m + d)) instead of O(M1 M2 P): the whole 1,000 x 1,000
    matrix of a 3,072-input, width-2,048 network takes seconds. Returns [M1, M2] for a scalar
    output, else [M1, M2, q, q], in float64; evaluated as the network is (no mode change
    needed: an MLP has no dropout or BatchNorm). s' comes from autograd, so any elementwise
    activation of ``lesde.nets`` works.
    """
    parts = _two_layer_parts(model)
    if parts is None:
        raise ValueError("mlp_ntk needs a lesde.nets.MLP with one hidden layer; use "
                         "empirical_ntk for other networks")
    lin, act_name, act_kw, head = parts
    a = _flat64(x1)
    b = a if x2 is None else _flat64(x2)
    W = lin.weight.detach().double()
    bw = lin.bias.detach().double() if lin.bias is not None else None
    A = head.weight.detach().double()                     # [q, m]
    act = model._act

    def feats(x):
        hs, gs = [], []
        for sl in _chunks(x.shape[0], int(chunk)):
            u = x[sl] @ W.T + (bw if bw is not None else 0.0)
            if act is None:
                hs.append(u)
                gs.append(torch.ones_like(u))
                continue
            u = u.detach().requires_grad_(True)
            with torch.enable_grad():
                h = act(u)
                (g,) = torch.autograd.grad(h.sum(), u)
            hs.append(h.detach())
            gs.append(g.detach())
        return torch.cat(hs), torch.cat(gs)

    h1, g1 = feats(a)
    h2, g2 = (h1, g1) if x2 is None else feats(b)
    inner = a @ b.T + (1.0 if bw is not None else 0.0)
    top = h1 @ h2.T + (1.0 if head.bias is not None else 0.0)
    q = A.shape[0]
    if q == 1:
        return top + ((g1 * A[0] ** 2) @ g2.T) * inner
    mixed = torch.einsum("ir,cr,dr,jr->ijcd", g1, A, A, g2) * inner[:, :, None, None]
    return top[:, :, None, None] * torch.eye(q, dtype=top.dtype) + mixed


def kernel_similarities(K, logits=None, output: str = "logits") -> Tuple[Tensor, Tensor]:
    """He & Su's S_rel and S_ker [n, n] (row = update, column = probe, not symmetrised) in the
    eta -> 0 limit, from the scalar-output NTK K [n, n] of the examples:

    - ``output="logits"``: S_rel = |K_ij| / K_ii, S_ker = K_ij;
    - ``output="probabilities"`` (the sigmoid p = sigma(z) of the logits ``logits`` [n]):
      S_rel = sigma'(z_j) |K_ij| / (sigma'(z_i) K_ii), S_ker = sigma'(z_i) sigma'(z_j) K_ij.
    """
    K = torch.as_tensor(K, dtype=torch.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"K must be a square [n, n] kernel, got shape {tuple(K.shape)}")
    diag = torch.diagonal(K)
    if output == "logits":
        return K.abs() / diag[:, None], K.clone()
    if output != "probabilities":
        raise ValueError(f"output must be 'logits' or 'probabilities', got {output!r}")
    if logits is None:
        raise ValueError("output='probabilities' needs the logits z of the examples")
    z = torch.as_tensor(logits, dtype=torch.float64).reshape(-1)
    if z.shape[0] != K.shape[0]:
        raise ValueError(f"need one logit per example ({K.shape[0]}), got {z.shape[0]}")
    p = torch.sigmoid(z)
    ds = p * (1 - p)
    return ds[None, :] * K.abs() / (ds[:, None] * diag[:, None]), ds[:, None] * ds[None, :] * K


def ntk_train(theta, y, *, lr: float, epochs: int, batch_size: int, loss: str = "bce",
              f0=None) -> Tensor:
    """Training of the linearised (infinitely wide, lazy) network in function space, on the
    training points: per minibatch step the expected change of SGD on the mean per-sample
    loss, f <- f - (lr / N) Theta dl/df, for ``epochs * ceil(N / batch_size)`` steps (Jacot,
    Gabriel & Hongler, NeurIPS 2018). ``theta`` [N, N] the NTK, ``y`` [N] targets (0/1 for
    "bce", reals for "mse" = 0.5 (f - y)^2), ``f0`` the initial function (default 0, the mean
    over initialisations). Returns f [N] (float64). Raises if the iteration diverges (lr too
    large for the kernel's largest eigenvalue)."""
    th = torch.as_tensor(theta, dtype=torch.float64)
    t = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
    n = t.shape[0]
    if th.shape != (n, n):
        raise ValueError(f"theta must be [N, N] with N = len(y) = {n}, got {tuple(th.shape)}")
    f = torch.zeros(n, dtype=torch.float64) if f0 is None else \
        torch.as_tensor(f0, dtype=torch.float64).reshape(-1).clone()
    steps = int(epochs) * math.ceil(n / int(batch_size))
    for _ in range(steps):
        if loss == "bce":
            g = torch.sigmoid(f) - t
        elif loss == "mse":
            g = f - t
        else:
            raise ValueError(f"loss must be 'bce' or 'mse', got {loss!r}")
        f = f - (float(lr) / n) * (th @ g)
        if not torch.isfinite(f).all():
            raise FloatingPointError("linearised training diverged: lower lr (the kernel's "
                                     "largest eigenvalue times lr / N must stay below about 2)")
    return f


# --------------------------------------------------------------------------------------------
# synthetic check of locality: two interlocking curves on a torus (He & Su)
# --------------------------------------------------------------------------------------------
def torus_curves(n_per_class: int = 50, *, r: float = 8.0, k: int = 4,
                 seed: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """He & Su's two interlocking closed curves on a torus, theta ~ U[-pi, pi].

    Class 1: (r cos t + sin(kt) cos t, r sin t + sin(kt) sin t,  cos(kt));
    class 0: (r cos t - sin(kt) cos t, r sin t - sin(kt) sin t, -cos(kt)).
    Returns x [2n, 3] (float64; class 1 first), y [2n] (1 then 0), theta [2n].
    """
    rng = np.random.default_rng(seed)
    t = rng.uniform(-np.pi, np.pi, size=(2, int(n_per_class)))
    xs = []
    for sign, th in zip((1.0, -1.0), t):
        s = sign * np.sin(k * th)
        xs.append(np.stack([r * np.cos(th) + s * np.cos(th), r * np.sin(th) + s * np.sin(th),
                            sign * np.cos(k * th)], axis=1))
    x = torch.as_tensor(np.concatenate(xs), dtype=torch.float64)
    y = torch.cat([torch.ones(n_per_class), torch.zeros(n_per_class)]).long()
    return x, y, torch.as_tensor(t.reshape(-1), dtype=torch.float64)


def geodesic_distance(theta1, theta2) -> Tensor:
    """Distance along a closed curve: min(|dtheta|, 2 pi - |dtheta|), broadcasting."""
    d = torch.remainder(torch.as_tensor(theta1) - torch.as_tensor(theta2), 2 * math.pi)
    return torch.minimum(d, 2 * math.pi - d)


@dataclass
class LocalityResult:
    """Result of :func:`torus_locality`, over ordered same-class pairs x != x':

    - ``pearson``: Pearson correlation of S_rel with the geodesic distance (He & Su's number;
      negative = locality);
    - ``pearson_abscos``: correlation of S_rel with |cos dtheta|, the shape of a linear
      network's S_rel (x.x' ~ r^2 cos dtheta on the torus), high for a non-local network;
    - ``bin_edges`` [B + 1] over [0, pi] and ``bin_means`` [B]: mean S_rel per distance bin;
      ``monotone``: whether the bin means fall strictly from bin to bin (locality decays
      with distance; a function symmetric about pi/2, such as |cos|, rises again);
    - ``distance``, ``s_rel`` (1-D, per pair), training accuracy and final loss, the ``model``.
    """

    pearson: float
    distance: np.ndarray
    s_rel: np.ndarray
    train_accuracy: float
    final_loss: float
    model: nn.Module
    pearson_abscos: float = float("nan")
    bin_edges: np.ndarray = field(default_factory=lambda: np.zeros(0))
    bin_means: np.ndarray = field(default_factory=lambda: np.zeros(0))
    monotone: bool = False


def locality_profile(distance, s_rel, bins: int = 6) -> Tuple[np.ndarray, np.ndarray, bool]:
    """Mean of ``s_rel`` in ``bins`` equal bins of ``distance`` over [0, pi]: (edges [bins+1],
    means [bins], strictly decreasing?)."""
    d = np.asarray(distance, dtype=np.float64)
    v = np.asarray(s_rel, dtype=np.float64)
    edges = np.linspace(0.0, math.pi, int(bins) + 1)
    idx = np.clip(np.digitize(d, edges[1:-1]), 0, int(bins) - 1)
    means = np.array([v[idx == b].mean() if np.any(idx == b) else np.nan
                      for b in range(int(bins))])
    return edges, means, bool(np.all(np.diff(means) < 0))


def torus_locality(
    activation: Optional[str] = "relu",
    *,
    model: Optional[nn.Module] = None,
    n_per_class: int = 50,
    hidden: int = 1024,
    steps: int = 2000,
    lr: float = 0.01,
    loss: LossSpec = "bce",
    method: str = "ntk",
    probe_lr: float = 1e-4,
    activation_kwargs: Optional[Dict[str, float]] = None,
    bias_spread: Optional[float] = None,
    bins: int = 6,
    seed: int = 0,
) -> LocalityResult:
    """He & Su's synthetic locality check (background.md section 1).

    Data from :func:`torus_curves` (``seed``); a one-hidden-layer MLP of width ``hidden`` with
    ``activation`` ("relu", "tanh", "elephant" with ``activation_kwargs``, or None for the same
    network without activation; ``bias_spread`` as in ``lesde.nets.MLP``; float64, initialised under
    ``torch.manual_seed(seed)`` without touching the global RNG) or a given scalar-output
    ``model``; ``steps`` full-batch SGD steps of size ``lr`` (``steps=0``: the network at
    initialisation); then S_rel(x, x') of the logit for all ordered same-class pairs x != x'
    (``method="ntk"``: the exact eta -> 0 limit |K(x, x')| / K(x, x)) against the geodesic
    distance min(|dtheta|, 2 pi - |dtheta|). Locality shows as a negative Pearson correlation
    and a profile that falls over the whole of [0, pi] (:class:`LocalityResult`).
    """
    x, y, theta = torus_curves(n_per_class, seed=seed)
    if model is None:
        from .nets import MLP

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MLP(3, hidden=(int(hidden),), num_classes=1, activation=activation,
                        activation_kwargs=activation_kwargs, bias_spread=bias_spread).double()
    p0 = next(model.parameters())
    x = x.to(device=p0.device, dtype=p0.dtype)
    yt = y.to(device=p0.device, dtype=p0.dtype)
    loss_fn = _loss_fn(loss)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(int(steps)):
        opt.zero_grad()
        out = model(x).reshape(len(x), 1)
        batch_loss = loss_fn(out, yt).mean()
        batch_loss.backward()
        opt.step()
    with torch.no_grad():
        out = model(x).reshape(-1)
        final = float(loss_fn(out[:, None], yt).mean())
        pred = (out > 0).long() if loss == "bce" else (out > 0.5).long()
        acc = float((pred.cpu() == y).double().mean())
    s = relative_similarity(model, x, yt, lr=probe_lr, method=method, loss=loss).cpu()
    d = geodesic_distance(theta[:, None], theta[None, :])
    mask = (y[:, None] == y[None, :]) & ~torch.eye(len(y), dtype=torch.bool)
    sv, dv = s[mask].numpy(), d[mask].numpy()
    pearson = float(np.corrcoef(sv, dv)[0, 1])
    pearson_abscos = float(np.corrcoef(sv, np.abs(np.cos(dv)))[0, 1])
    edges, means, monotone = locality_profile(dv, sv, bins)
    return LocalityResult(pearson=pearson, distance=dv, s_rel=sv, train_accuracy=acc,
                          final_loss=final, model=model, pearson_abscos=pearson_abscos,
                          bin_edges=edges, bin_means=means, monotone=monotone)


# --------------------------------------------------------------------------------------------
# locality statistics with their chance levels
# --------------------------------------------------------------------------------------------
def locality_statistics(S) -> Dict[str, np.ndarray]:
    """Locality statistics of class-pair similarity matrices S [..., K, K] (row k = class of the
    update example, column l = class of the probe; e.g. from :func:`class_elasticity`).

    - ``frac_same_exceeds`` [..., K]: 1 where the same-class value S[k, k] exceeds every
      cross-class value S[k, l] of its row (Dan et al.'s statistic), else 0. **Chance level
      1/K**: if the K values of a row are exchangeable (no locality), each is the largest with
      probability 1/K.
    - ``ratio`` [...]: mean_k S[k, k] / mean_{k != l} S[k, l]; 1 when there is no locality.
    - ``double_log_ratio`` [...]: the mean over unordered class pairs k < l of
      log(S[k, k] S[l, l] / (S[k, l] S[l, k])). If S[k, l] = r_k c_l L[k, l] (any positive row
      effect r, e.g. how strongly an update moves the network; any column effect c, e.g. how
      easily a probe's prediction moves), the r's and c's cancel and only the locality L is
      left: 0 without locality, positive when same-class impacts dominate. The fraction and
      the ratio have no such protection: a strong column effect alone drives the fraction to
      1 for one row and 0 for another.

    Needs positive S for the log-ratio (nan otherwise).
    """
    s = np.asarray(S, dtype=np.float64)
    if s.ndim < 2 or s.shape[-1] != s.shape[-2]:
        raise ValueError(f"S must be [..., K, K], got shape {s.shape}")
    k = s.shape[-1]
    if k < 2:
        raise ValueError("locality statistics need at least two classes")
    diag = np.diagonal(s, axis1=-2, axis2=-1)                       # [..., K]
    off = ~np.eye(k, dtype=bool)
    cross = s[..., off].reshape(s.shape[:-2] + (k, k - 1))           # row-wise, [..., K, K-1]
    exceeds = (diag[..., None] > cross).all(axis=-1).astype(np.float64)
    ratio = diag.mean(-1) / cross.mean(axis=(-1, -2))
    iu, ju = np.triu_indices(k, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(s)
        dlr = (logs[..., iu, iu] + logs[..., ju, ju] - logs[..., iu, ju] - logs[..., ju, iu])
    return {"frac_same_exceeds": exceeds, "ratio": ratio,
            "double_log_ratio": dlr.mean(-1), "frac_chance": 1.0 / k}


def bootstrap_class_means(S_pairs, labels, n_boot: int = 1000, seed: int = 0,
                          num_classes: Optional[int] = None) -> np.ndarray:
    """Bootstrap replicates of the class-pair means of a per-example matrix S [M, M] (row =
    update example, column = probe, the same M examples in both roles, as in Dan et al.'s
    20 x 20 protocol): in each replicate the examples of every class are resampled with
    replacement and used for both roles, and the class-pair means of the resampled pairs are
    returned, [n_boot, K, K].

    A same-class block of the full mean gives weight 1/n to its x = x' pairs. Two draws of the
    same example are not two examples, so in a replicate the block is

        (1/n) sum_i c_i S_ii / n + (1 - 1/n) (c^T S c - sum_i c_i^2 S_ii) / (n^2 - sum_i c_i^2)

    (counts c of the class's n draws): self pairs keep weight 1/n and the rest is the mean over
    pairs of distinct examples. With every c_i = 1 this is the full mean; counting duplicated
    draws as pairs instead would bias the same-class means towards S(x, x). A replicate that
    draws a single example n times for a class has no distinct pair: nan there."""
    s = np.asarray(S_pairs, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if s.shape != (y.size, y.size):
        raise ValueError(f"S_pairs must be [M, M] with M = len(labels) = {y.size}, "
                         f"got {s.shape}")
    k = int(num_classes) if num_classes is not None else int(y.max()) + 1
    rng = np.random.default_rng(seed)
    counts = np.zeros((int(n_boot), k, y.size))
    for c in range(k):
        idx = np.flatnonzero(y == c)
        if idx.size == 0:
            raise ValueError(f"class {c} has no examples")
        draws = rng.integers(0, idx.size, size=(int(n_boot), idx.size))
        for b in range(int(n_boot)):
            np.add.at(counts[b, c], idx[draws[b]], 1.0)
    n = counts.sum(-1)                                                # [B, K]
    out = np.einsum("bkm,mn,bln->bkl", counts, s, counts) / (n[:, :, None] * n[:, None, :])
    diag = np.diagonal(s)
    total = np.einsum("bkm,mn,bkn->bk", counts, s, counts)            # c_k^T S c_k
    sq = counts ** 2
    self_mean = (counts @ diag) / n
    den = n ** 2 - sq.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        distinct = (total - sq @ diag) / den
    # a class drawn as one example repeated has no pair of distinct examples: nan
    block = np.where(den > 0, self_mean / n + (1 - 1 / n) * distinct, np.nan)
    idx = np.arange(k)
    out[:, idx, idx] = block
    return out


def locality_band(S_pairs, labels, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                  num_classes: Optional[int] = None) -> Dict[str, Tuple[float, float, float]]:
    """The :func:`locality_statistics` of one per-example matrix [M, M] with percentile
    bootstrap bands over the probe examples (:func:`bootstrap_class_means`): name ->
    (estimate, low, high) for ``"frac_same_exceeds"`` (mean over the K rows), ``"ratio"`` and
    ``"double_log_ratio"``."""
    y = np.asarray(labels).reshape(-1)
    k = int(num_classes) if num_classes is not None else int(y.max()) + 1
    full = class_pair_means(torch.as_tensor(np.asarray(S_pairs, dtype=np.float64)),
                            torch.as_tensor(y), num_classes=k, exclude_self=False).numpy()
    est = locality_statistics(full)
    boot = locality_statistics(bootstrap_class_means(S_pairs, y, n_boot, seed, k))
    lo, hi = 50 * (1 - level), 50 * (1 + level)
    out = {}
    for name in ("frac_same_exceeds", "ratio", "double_log_ratio"):
        e, b = est[name], boot[name]
        if name == "frac_same_exceeds":
            e, b = e.mean(-1), b.mean(-1)
        out[name] = (float(e), float(np.nanpercentile(b, lo)), float(np.nanpercentile(b, hi)))
    return out


def clustering_chance(sizes: Sequence[int], kind: str = "balanced") -> Dict[str, float]:
    """Exact distribution of He & Su's two-cluster score 0.5 + |acc - 0.5| for a labelling
    that ignores the classes, for classes of ``sizes`` = (n1, n2) items.

    ``kind="balanced"``: a uniformly random split into clusters of the class sizes; the number
    X of class-1 items in cluster 1 is hypergeometric (n, n1, n1), the agreements are
    A = 2 X + n2 - n1. ``kind="binomial"``: every item in either cluster with probability 1/2;
    A ~ Binomial(n, 1/2). The score is max(A, n - A) / n. Returns ``mean``, ``sd`` and the
    ``q95`` quantile of the score (an accuracy above ``q95`` happens by chance 5% of the time).

    Example: 500 + 500 items give mean 0.5126, sd 0.0095 (balanced).
    """
    from scipy import stats

    if len(sizes) != 2:
        raise ValueError("the 0.5 + |acc - 0.5| score is for two classes; got "
                         f"{len(sizes)} sizes")
    n1, n2 = (int(v) for v in sizes)
    if n1 < 1 or n2 < 1:
        raise ValueError(f"class sizes must be positive, got {sizes}")
    n = n1 + n2
    if kind == "balanced":
        xs = np.arange(max(0, n1 - n2), n1 + 1)
        pmf = stats.hypergeom(n, n1, n1).pmf(xs)
        agree = 2 * xs + n2 - n1
    elif kind == "binomial":
        agree = np.arange(n + 1)
        pmf = stats.binom(n, 0.5).pmf(agree)
    else:
        raise ValueError(f"kind must be 'balanced' or 'binomial', got {kind!r}")
    score = np.maximum(agree, n - agree) / n
    pmf = pmf / pmf.sum()
    mean = float((pmf * score).sum())
    order = np.argsort(score)
    cdf = np.cumsum(pmf[order])
    q95 = float(score[order][np.searchsorted(cdf, 0.95)])
    return {"mean": mean, "sd": float(np.sqrt((pmf * (score - mean) ** 2).sum())), "q95": q95,
            "n": n}


# --------------------------------------------------------------------------------------------
# tracking during training (Dan et al.)
# --------------------------------------------------------------------------------------------
TRACK_MEASURES = ("kl", "kl_compat", "norm", "norm_prob", "suhe_compat")
"""The measures :func:`class_elasticity` computes (see there)."""


def pair_elasticity(
    model: nn.Module,
    x,
    y,
    *,
    lr: float = 1e-4,
    optimizer: OptimizerSpec = "adam",
    loss: LossSpec = "cross_entropy",
    measures: Sequence[str] = TRACK_MEASURES,
    eval_mode: bool = True,
) -> Dict[str, Tensor]:
    """Per-example relative similarities from one explicit step per example [M, M] (row =
    update example x_i, column = probe x_j, the same examples in both roles); measures as in
    :func:`class_elasticity`."""
    unknown = sorted(set(measures) - set(TRACK_MEASURES))
    if unknown:
        raise ValueError(f"unknown measures {unknown}; known: {list(TRACK_MEASURES)}")
    ch = one_step_changes(model, x, y, lr=lr, method="step", optimizer=optimizer, loss=loss,
                          output="logits", eval_mode=eval_mode)
    out: Dict[str, Tensor] = {}
    for m in measures:
        if m == "kl":
            out[m] = _kl_ratio(ch, "true")
        elif m == "kl_compat":
            out[m] = _kl_ratio(ch, "compat")
        elif m == "norm":
            out[m] = ch.relative()
        else:
            p0, ps = _link(ch.before_probe.double()), _link(ch.before_self.double())
            dp = _link(ch.before_probe.double()[None] + ch.delta.double()) - p0[None]
            dps = _link(ch.before_self.double() + ch.self_delta.double()) - ps
            if m == "norm_prob":
                out[m] = (dp.norm(dim=-1) / dps.norm(dim=-1)[:, None]).to(ch.delta.dtype)
            else:  # suhe_compat: mean_c |dp_c(x')| / (sqrt(mean_c dp_c(x)^2) + 1e-8)
                den = dps.pow(2).mean(-1).sqrt() + 1e-8
                out[m] = (dp.abs().mean(-1) / den[:, None]).to(ch.delta.dtype)
    return out


def class_elasticity(
    model: nn.Module,
    x,
    y,
    *,
    lr: float = 1e-4,
    optimizer: OptimizerSpec = "adam",
    num_classes: Optional[int] = None,
    loss: LossSpec = "cross_entropy",
    measures: Sequence[str] = TRACK_MEASURES,
    exclude_self: bool = False,
    eval_mode: bool = True,
) -> Dict[str, Tensor]:
    """Class-pair means of the relative similarities on a probe set, from one explicit step per
    probe example (Dan et al., arXiv 2111.01166; their protocol: 20 probes per class, one fresh
    Adam step with lr 1e-4).

    Returns [K, K] matrices, **row = class of the update example x, column = class of the
    probe x'** (Dan et al.'s released curves are indexed (probe, update): transpose to
    compare), for each of ``measures``:

    - ``"kl"``: S_rel^KL = KL(g(x') || g+(x')) / KL(g(x) || g+(x)), g the softmax, the true KL
      (:func:`kl_relative_similarity`);
    - ``"kl_compat"``: the released code's formula for the same ratio (not a divergence);
    - ``"norm"``: He & Su's |Delta z(x')| / |Delta z(x)| on the logits z;
    - ``"norm_prob"``: He & Su's ratio on the softmax probabilities, |Delta p(x')| / |Delta p(x)|;
    - ``"suhe_compat"``: the released code's version of the latter, mean_c |Delta p_c(x')| /
      (sqrt(mean_c Delta p_c(x)^2) + 1e-8) (an L1 mean over an RMS, so not 1 at x = x').

    ``exclude_self=False`` averages over all n x n probe pairs of a class pair, x = x'
    included, as in their 20 x 20 average.
    """
    mats = pair_elasticity(model, x, y, lr=lr, optimizer=optimizer, loss=loss,
                           measures=measures, eval_mode=eval_mode)
    yl = torch.as_tensor(y)
    k = int(num_classes) if num_classes is not None else int(yl.max()) + 1
    return {name: class_pair_means(m.cpu(), yl, num_classes=k, exclude_self=exclude_self)
            for name, m in mats.items()}


def crop_flip(x, pad: int = 4, fill: float = 0.0, seed: int = 0) -> Tensor:
    """Random crop after zero padding and a random horizontal flip, once per image
    ([N, C, H, W] -> same shape; torchvision's ``RandomCrop(H, padding=pad)`` +
    ``RandomHorizontalFlip()``). Dan et al.'s released code applies this augmentation once,
    when their training set is collected, not anew every epoch. ``fill`` is the padding value
    (0 = black for [0, 1] images, before normalisation)."""
    x = torch.as_tensor(x)
    if x.ndim != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    g = torch.Generator().manual_seed(int(seed))
    padded = F.pad(x, (pad, pad, pad, pad), value=float(fill))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        img = padded[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w]
        out[i] = img.flip(-1) if flip[i] else img
    return out


def _accuracy(model, x, y, batch_size=512) -> float:
    correct = 0
    with torch.no_grad():
        for sl in _chunks(x.shape[0], batch_size):
            correct += int((model(x[sl]).argmax(-1) == y[sl]).sum())
    return correct / max(1, x.shape[0])


def track_elasticity(
    model: nn.Module,
    x_train,
    y_train,
    x_probe,
    y_probe,
    *,
    epochs: int = 7,
    batch_size: int = 256,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    every: int = 9,
    schedule: str = "epoch",
    drop_last: bool = True,
    probe_lr: Optional[float] = None,
    measures: Sequence[str] = TRACK_MEASURES,
    x_test=None,
    y_test=None,
    test_at: str = "epoch",
    seed: int = 0,
    checkpoint: Optional[str] = None,
    return_pairs: bool = False,
    progress: bool = True,
):
    """Train ``model`` in place and track local elasticity during training (Dan et al.).

    Minibatch training on the mean cross-entropy (``optimizer`` "adam" with ``lr`` 1e-4 and
    ``weight_decay`` 1e-4 in their protocol, "sgd" otherwise; shuffling from ``seed``; with
    ``drop_last`` the incomplete last minibatch of an epoch is dropped, as their loader does).
    Records of :func:`class_elasticity` on the fixed probe set (one fresh step of the same
    optimizer, without weight decay, with ``probe_lr`` (default ``lr``), per probe example;
    the model itself is not changed by a probe):

    - ``schedule="epoch"`` (their released code): after the optimizer step of every minibatch
      b (0-based, within each epoch) with b % ``every`` == 0, so the first record follows the
      first step; with 5,000 images per class, batch 256 and ``every=9``: 7 records per epoch;
    - ``schedule="global"``: once before training and after every ``every``-th step.

    Each record also holds the running training accuracy of the minibatches since the last
    record and, when given, the accuracy on (``x_test``, ``y_test``): at every record
    (``test_at="record"``) or, by default (``"epoch"``), only at the first record and the last
    record of each epoch (nan elsewhere; a test pass can cost as much as a record).

    ``checkpoint``: a file path; after every record the model, optimizer, shuffling state and
    the records so far are saved there (``torch.save``; read back with ``weights_only=True``),
    and a run that finds the file resumes where it stopped (the result is the same as an
    uninterrupted run).

    Returns a ``pandas.DataFrame``, one row per record: ``step``, ``epoch`` (fractional),
    ``train_acc``, ``test_acc``, and for each measure ``m`` and class pair the column
    ``f"{m}_{k}_{k2}"`` (row class k = update, k2 = probe). With ``return_pairs``, also a dict
    measure -> per-example matrices [records, M, M] (for bootstrap bands, see
    :func:`locality_band`). Summarise with :func:`tracking_statistics` /
    :func:`tracking_summary`.
    """
    import os

    import pandas as pd

    if schedule not in ("epoch", "global"):
        raise ValueError(f"schedule must be 'epoch' or 'global', got {schedule!r}")
    if int(every) < 1 or int(batch_size) < 1 or int(epochs) < 0:
        raise ValueError("every and batch_size must be positive and epochs non-negative")
    p0 = next(model.parameters())
    xt = torch.as_tensor(x_train).to(device=p0.device, dtype=p0.dtype)
    yt = torch.as_tensor(y_train).long().to(p0.device)
    xp = torch.as_tensor(x_probe).to(device=p0.device, dtype=p0.dtype)
    yp = torch.as_tensor(y_probe).long().to(p0.device)
    xs = None if x_test is None else torch.as_tensor(x_test).to(device=p0.device, dtype=p0.dtype)
    ys = None if y_test is None else torch.as_tensor(y_test).long().to(p0.device)
    k = int(max(int(yt.max()), int(yp.max()))) + 1
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    n, bs = xt.shape[0], int(batch_size)
    per_epoch = n // bs if drop_last else math.ceil(n / bs)
    if per_epoch < 1:
        raise ValueError(f"no complete minibatch of {bs} in {n} training examples")
    gen = torch.Generator().manual_seed(int(seed))
    state = {"rows": [], "pairs": [], "hits": 0, "seen": 0, "step": 0, "epoch": 0,
             "batch": 0, "perm": None}
    if checkpoint is not None and os.path.exists(checkpoint):
        ck = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        state.update({key: ck[key] for key in state if key in ck})

    def save():
        if checkpoint is None:
            return
        tmp = checkpoint + ".tmp"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "generator": gen.get_state(), **state}, tmp)
        os.replace(tmp, checkpoint)

    if test_at not in ("epoch", "record"):
        raise ValueError(f"test_at must be 'epoch' or 'record', got {test_at!r}")

    def record(step, last_of_epoch=True):
        mats = pair_elasticity(model, xp, yp, lr=probe_lr if probe_lr is not None else lr,
                               optimizer=optimizer, measures=measures)
        test = xs is not None and (test_at == "record" or last_of_epoch or not state["rows"])
        row = {"step": step, "epoch": step / per_epoch,
               "train_acc": state["hits"] / state["seen"] if state["seen"] else float("nan"),
               "test_acc": _accuracy(model.eval(), xs, ys) if test else float("nan")}
        model.train()
        for name, m in mats.items():
            cm = class_pair_means(m.cpu(), yp.cpu(), num_classes=k, exclude_self=False)
            for a in range(k):
                for b in range(k):
                    row[f"{name}_{a}_{b}"] = float(cm[a, b])
        state["rows"].append(row)
        state["pairs"].append({name: m.detach().cpu().float() for name, m in mats.items()})
        state["hits"] = state["seen"] = 0

    bar = None
    total = int(epochs) * per_epoch
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=state["step"], desc="track", leave=False)
    if schedule == "global" and state["step"] == 0 and not state["rows"]:
        record(0)
        save()
    model.train()
    while state["epoch"] < int(epochs):
        if state["perm"] is None:
            state["perm"] = torch.randperm(n, generator=gen)
        perm = state["perm"].to(p0.device)
        while state["batch"] < per_epoch:
            b = state["batch"]
            idx = perm[b * bs:(b + 1) * bs]
            opt.zero_grad()
            logits = model(xt[idx])
            F.cross_entropy(logits, yt[idx]).backward()
            opt.step()
            state["hits"] += int((logits.detach().argmax(-1) == yt[idx]).sum())
            state["seen"] += len(idx)
            state["step"] += 1
            state["batch"] += 1
            if bar is not None:
                bar.update(1)
            if schedule == "epoch":
                due = b % int(every) == 0
                last = b + int(every) >= per_epoch
            else:
                due = state["step"] % int(every) == 0
                last = (state["step"] + int(every)) // per_epoch > state["step"] // per_epoch \
                    or state["step"] + int(every) > total
            if due:
                record(state["step"], last)
                save()
        state["epoch"] += 1
        state["batch"] = 0
        state["perm"] = None
        save()
    if bar is not None:
        bar.close()
    frame = pd.DataFrame(state["rows"])
    if not return_pairs:
        return frame
    pairs = {name: torch.stack([p[name] for p in state["pairs"]]).numpy()
             for name in (state["pairs"][0] if state["pairs"] else {})}
    return frame, pairs


def _measure_matrices(frame, measure: str) -> np.ndarray:
    """[T, K, K] class-pair matrices of one measure from a tracking frame."""
    cols = [c for c in frame.columns if c.startswith(measure + "_")
            and c[len(measure) + 1:].replace("_", "").isdigit()]
    if not cols:
        raise ValueError(f"no columns for measure {measure!r} in the frame")
    k = int(round(math.sqrt(len(cols))))
    return np.stack([[frame[f"{measure}_{a}_{b}"].to_numpy(dtype=np.float64) for b in range(k)]
                     for a in range(k)]).transpose(2, 0, 1)


def tracking_statistics(frame, measure: str = "kl"):
    """Per-record :func:`locality_statistics` of one measure of a :func:`track_elasticity`
    frame: a ``pandas.DataFrame`` with ``step``, ``epoch``, ``frac_same_exceeds`` (mean over
    the K update classes; chance 1/K), ``frac_k`` per update class, ``ratio`` (chance 1) and
    ``double_log_ratio`` (chance 0)."""
    import pandas as pd

    st = locality_statistics(_measure_matrices(frame, measure))
    out = pd.DataFrame({"step": frame["step"].to_numpy(), "epoch": frame["epoch"].to_numpy()})
    out["frac_same_exceeds"] = st["frac_same_exceeds"].mean(-1)
    for a in range(st["frac_same_exceeds"].shape[-1]):
        out[f"frac_{a}"] = st["frac_same_exceeds"][:, a]
    out["ratio"] = st["ratio"]
    out["double_log_ratio"] = st["double_log_ratio"]
    return out


def tracking_summary(frame, measure: str = "kl") -> Dict[str, float]:
    """Dan et al.'s two numbers from a :func:`track_elasticity` frame, for one measure, with
    their chance levels, and the double log-ratio:

    - ``frac_same_exceeds``: fraction of (record, update class k) where S[k, k] exceeds every
      cross-class S[k, l] (row = update class); ``frac_chance`` = 1/K (exchangeable rows);
      ``frac_per_class``: the same per update class (a column effect shows as 1s and 0s);
    - ``last_epoch_ratio``: over the records of the last epoch, mean_k S[k, k] divided by the
      mean of the cross-class values (chance 1);
    - ``double_log_ratio_first`` / ``double_log_ratio_last_epoch``: the double log-ratio of
      :func:`locality_statistics` at the first record and averaged over the last epoch
      (chance 0).

    Records before training (step 0) are left out of the fraction and ratio.
    """
    s = _measure_matrices(frame, measure)
    st = locality_statistics(s)
    trained = frame["step"].to_numpy() > 0
    epoch = frame["epoch"].to_numpy()
    last = trained & (epoch > (np.ceil(epoch.max()) - 1))
    k = s.shape[-1]
    diag = np.diagonal(s, axis1=-2, axis2=-1)
    cross = s[:, ~np.eye(k, dtype=bool)]
    exceeds = st["frac_same_exceeds"][trained]
    return {"frac_same_exceeds": float(exceeds.mean()), "frac_chance": 1.0 / k,
            "frac_per_class": [float(v) for v in exceeds.mean(0)],
            "last_epoch_ratio": float(diag[last].mean() / cross[last].mean()),
            "double_log_ratio_first": float(st["double_log_ratio"][0]),
            "double_log_ratio_last_epoch": float(st["double_log_ratio"][last].mean()),
            "records": int(len(frame))}


# --------------------------------------------------------------------------------------------
# Dan et al.'s released curves as a reference
# --------------------------------------------------------------------------------------------
DAN_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
DAN_CIFAR10_STD = (0.2023, 0.1994, 0.2010)
"""The per-channel normalisation of Dan et al.'s CIFAR-10 inputs (after scaling to [0, 1])."""


def read_reference_curves(path, dataset: str = "cifar10", definition: str = "kl"):
    """Dan et al.'s released S_rel curves (``srel_curves.csv``: columns ``dataset``,
    ``definition``, ``run``, ``probe_class``, ``update_class``, ``record``, ``s_rel``) as
    class-pair matrices in this module's orientation: an array [runs, records, K, K] with
    **row = update class, column = probe class**."""
    import pandas as pd

    tab = pd.read_csv(path)
    need = {"dataset", "definition", "run", "probe_class", "update_class", "record", "s_rel"}
    missing = need - set(tab.columns)
    if missing:
        raise ValueError(f"{path}: not a reference-curve table (missing columns "
                         f"{sorted(missing)})")
    tab = tab[(tab["dataset"] == dataset) & (tab["definition"] == definition)]
    if tab.empty:
        raise ValueError(f"{path}: no rows for dataset {dataset!r}, definition {definition!r}")
    runs = sorted(tab["run"].unique())
    recs = sorted(tab["record"].unique())
    k = int(max(tab["probe_class"].max(), tab["update_class"].max())) + 1
    out = np.full((len(runs), len(recs), k, k), np.nan)
    ri = {r: i for i, r in enumerate(runs)}
    ti = {r: i for i, r in enumerate(recs)}
    for row in tab.itertuples(index=False):
        out[ri[row.run], ti[row.record], int(row.update_class), int(row.probe_class)] = row.s_rel
    return out
