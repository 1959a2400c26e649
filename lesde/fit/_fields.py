"""Drift fields as the fits need them: G at logged states, and class means of G at states moved
by a per-class displacement (differentiable, batched over intervals)."""
from __future__ import annotations

import numpy as np
import torch

from ..model import CrossEntropy, CrossEntropyReadout, Identity, LabelProjection, make_field


def field_values(field, features: np.ndarray, labels: np.ndarray, ts: np.ndarray,
                 K: int) -> np.ndarray:
    """G(X_j(t), y_j; t) for every trial, time and sample: features (R, T, N, p) -> same shape."""
    fld = make_field(field)
    fld.check(features.shape[-1], K)
    if type(fld) is Identity:
        return features
    out = np.empty_like(features)
    y = torch.as_tensor(labels)
    with torch.no_grad():
        for i, t in enumerate(ts):
            x = torch.from_numpy(np.ascontiguousarray(features[:, i]))
            out[:, i] = fld(x, y, float(t), num_classes=K).numpy()
    return out


def _softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.amax(-1, keepdim=True).detach())
    return e / e.sum(-1, keepdim=True)


class _ClassSoftmaxMean(torch.autograd.Function):
    """``mean_j softmax(x_j + delta_c)`` over the samples j of each class c, from the fixed
    ``ex = exp(x - rowmax)`` (B, K, n, p) of balanced classes and delta (B, K, p).

    ``softmax(x + d) = ex * exp(d) / <ex, exp(d)>``, so a call costs a product, a sum and a
    division (no exponential over the samples). Its Jacobian in delta_c,
    ``mean_j (diag(s_j) - s_j s_j^T)``, is symmetric: backward and forward mode share one formula.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(ex, delta):
        a = torch.exp(delta - delta.amax(-1, keepdim=True))
        num = ex * a.unsqueeze(-2)
        s = num / num.sum(-1, keepdim=True)
        return s.mean(-2), s

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.s = output[1]

    @staticmethod
    def _apply_jac(s, g):
        sg = s * g.unsqueeze(-2)
        return sg.mean(-2) - (s * sg.sum(-1, keepdim=True)).mean(-2)

    @staticmethod
    def backward(ctx, g, _gs):
        (s,) = ctx.saved_tensors
        return None, _ClassSoftmaxMean._apply_jac(s, g)

    @staticmethod
    def jvp(ctx, _dex, ddelta):
        return _ClassSoftmaxMean._apply_jac(ctx.s, ddelta), None


class ClassMeanField:
    """Class means of G at the states ``X_j + delta[y_j]``.

    ``X`` (B, N, p) are the logged states at the start of each interval (fixed), ``delta``
    (B, K, p) the displacement of each class since then: in the LE-SDE every sample of a class
    has the same drift, so the deterministic flow moves a whole class rigidly. Linear fields need
    only the class means of X.
    """

    def __init__(self, field, labels: np.ndarray, K: int, p: int, dtype=torch.float64):
        self.field = make_field(field)
        self.field.check(p, K)
        self.K, self.p = K, p
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.labels = y
        counts = torch.bincount(y, minlength=K).to(dtype)
        self.avg = torch.nn.functional.one_hot(y, K).to(dtype).T / counts[:, None]   # (K, N)
        self.onehot_K = torch.eye(K, dtype=dtype)
        t = type(self.field)
        self.kind = ("identity" if t is Identity else "label_projection" if t is LabelProjection
                     else "cross_entropy" if t is CrossEntropy
                     else "readout" if t is CrossEntropyReadout else "generic")
        self.linear = self.kind in ("identity", "label_projection")
        if self.kind == "label_projection":
            d = torch.eye(K, dtype=dtype) - 1.0 / K
            self.P = torch.einsum("ka,kb->kab", d, d) / (1.0 - 1.0 / K)          # (K, p, p)
        if self.kind == "readout":
            self.W = self.field.W.to(dtype)                                       # (K, p)
            self.b = None if self.field.b is None else self.field.b.to(dtype)
        self.balanced = bool(torch.all(counts == counts[0]))
        self.order = torch.argsort(y, stable=True)
        self.n = int(counts[0]) if self.balanced else None

    def prepare(self, X: torch.Tensor) -> dict:
        """Fixed per-interval quantities from the start states X (B, N, p)."""
        if self.linear:
            return {"xbar": torch.matmul(self.avg, X)}                            # (B, K, p)
        if self.kind == "readout":
            z = torch.matmul(X, self.W.T)
            if self.b is not None:
                z = z + self.b
            return {"z": z}                                                       # (B, N, K)
        if self.kind == "cross_entropy" and self.balanced:
            xs = X[:, self.order].reshape(X.shape[0], self.K, self.n, self.p)
            return {"ex": torch.exp(xs - xs.amax(-1, keepdim=True))}           # (B, K, n, p)
        return {"x": X}

    def gbar(self, pre: dict, delta: torch.Tensor) -> torch.Tensor:
        """Class means of G (B, K, p) at displacement delta (B, K, p)."""
        if self.kind == "identity":
            return pre["xbar"] + delta
        if self.kind == "label_projection":
            return torch.einsum("kab,nkb->nka", self.P, pre["xbar"] + delta)
        if self.kind == "cross_entropy" and "ex" in pre:
            return self.onehot_K - _ClassSoftmaxMean.apply(pre["ex"], delta)[0]
        if self.kind == "cross_entropy":
            z = pre["x"] + delta[:, self.labels]
            return self.onehot_K - torch.matmul(self.avg, _softmax(z))
        if self.kind == "readout":
            z = pre["z"] + torch.matmul(delta, self.W.T)[:, self.labels]
            return torch.matmul(self.onehot_K - torch.matmul(self.avg, _softmax(z)), self.W)
        g = self.field(pre["x"] + delta[:, self.labels], self.labels, 0.0, num_classes=self.K)
        return torch.matmul(self.avg, g)

    def jacobian(self, pre: dict, delta: torch.Tensor) -> torch.Tensor:
        """``d Gbar_k / d delta_k`` (B, K, p, p) at displacement delta (B, K, p), without a
        graph (each class's mean of G depends only on its own displacement). Closed forms for
        the linear fields and the cross-entropy on logits (``-mean_j (diag(s_j) - s_j
        s_j^T)``); p forward-mode derivatives otherwise."""
        B, K, p = delta.shape
        dt = delta.dtype
        with torch.no_grad():
            if self.kind == "identity":
                return torch.eye(p, dtype=dt).expand(B, K, p, p)
            if self.kind == "label_projection":
                return self.P.to(dt).expand(B, K, p, p)
            if self.kind == "cross_entropy" and "ex" in pre:
                s = _ClassSoftmaxMean.apply(pre["ex"], delta.detach())[1]        # (B, K, n, p)
                outer = torch.einsum("bkna,bknc->bkac", s, s) / s.shape[2]
                return outer - torch.diag_embed(s.mean(2))
            from torch.func import jvp

            at = delta.detach()
            cols = []
            for a in range(p):
                v = torch.zeros_like(at)
                v[..., a] = 1.0
                cols.append(jvp(lambda d: self.gbar(pre, d), (at,), (v,))[1])
            return torch.stack(cols, -1)

