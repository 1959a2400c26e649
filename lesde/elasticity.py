"""Local elasticity measured on networks: the empirical NTK, the direct measurement of the
LE-SDE's impact matrix, and He & Su's / Dan et al.'s similarity measures.

Papers
------
- He & Su, "The local elasticity of neural networks", ICLR 2020 (arXiv 1910.06943).
- Dan, Mukherjee, Das, Gampa, "Quantifying and localizing usable information leakage... /
  local elasticity during training", arXiv 2111.01166 (the KL-based relative similarity).
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
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

__all__ = [
    "empirical_ntk",
    "measure_impacts",
    "ImpactMeasurement",
]

LossSpec = Union[str, Callable[[Tensor, Tensor], Tensor]]

# Largest Jacobian block (number of scalars) materialised at once when ``chunk`` is None:
# 2**25 scalars = 128 MiB in float32.
_JAC_BUDGET = 2 ** 25
# Per-sample loss gradients of all update examples are kept in memory when they fit in this
# many scalars, and recomputed per probe chunk otherwise.
_GRAD_CACHE = 2 ** 26


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

    def directional(self, x: Tensor, tangents: Dict[str, Tensor]) -> Tensor:
        """J(x_i) v_i for each example and its own tangent v_i (name -> [c, n]): [c, q]."""
        shapes = {k: p.shape for k, p in self.params.items()}

        def one(xi, ti):
            t = {k: ti[k].reshape(shapes[k]) for k in shapes}
            return jvp(lambda p: self.single(p, xi), (self.params,), (t,))[1]

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
def _first_order_deltas(
    fn: _Functional, x_probe: Tensor, x_update: Tensor, y_update: Tensor, lr: float,
    loss_fn, chunk: Optional[int],
) -> Tensor:
    """Delta[i, j] = -lr * J(x_probe_i) grad_w l(x_update_j)   [M_probe, M_update, q].

    Probe Jacobians are computed once per probe chunk; the update examples' loss gradients are
    cached when they fit (``_GRAD_CACHE`` scalars), else recomputed per probe chunk (one
    backward pass each, cheap next to a Jacobian).
    """
    q = fn.out_dim(x_probe)
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
        chunk: examples per Jacobian block (see :func:`empirical_ntk`).
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
        delta = _first_order_deltas(fn, x, x, y, lr, loss_fn, chunk)  # [M, M, q]
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
