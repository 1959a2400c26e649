"""Tests of lesde.elasticity: empirical NTK, direct impact measurement, similarity measures."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lesde import elasticity as el

DT = torch.float64


class TinyFeatureNet(nn.Module):
    """features(x) -> [B, p]; head: Linear(p, K); forward = head(features)."""

    def __init__(self, in_dim=4, hidden=12, p=5, k=3, act=nn.Tanh):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, hidden), act(), nn.Linear(hidden, p), act())
        self.head = nn.Linear(p, k)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def _data(m=6, d=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g, dtype=DT)
    y = torch.arange(m) % k
    return x, y


# --------------------------------------------------------------------------------------------
# empirical NTK
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q", [1, 3])
def test_ntk_linear_model_closed_form(q):
    torch.manual_seed(0)
    lin = nn.Linear(4, q).to(DT)
    x1, _ = _data(5)
    x2, _ = _data(3, seed=1)
    K = el.empirical_ntk(lin, x1, x2)
    assert K.shape == (5, 3, q, q)
    expected = (x1 @ x2.T + 1)[:, :, None, None] * torch.eye(q, dtype=DT)
    torch.testing.assert_close(K, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(el.empirical_ntk(lin, x1, x2, reduce="trace"),
                               q * (x1 @ x2.T + 1), rtol=0, atol=1e-12)
    torch.testing.assert_close(el.empirical_ntk(lin, x1, x2, reduce="diagonal"),
                               expected.diagonal(dim1=2, dim2=3), rtol=0, atol=1e-12)


def test_ntk_chunking_and_symmetry():
    torch.manual_seed(1)
    net = TinyFeatureNet().to(DT)
    x, _ = _data(7)
    full = el.empirical_ntk(net, x)
    chunked = el.empirical_ntk(net, x, chunk=2)
    torch.testing.assert_close(full, chunked, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(full, full.permute(1, 0, 3, 2), rtol=1e-12, atol=1e-12)
    # against an explicit autograd Jacobian
    params = [p for p in net.parameters()]
    rows = []
    for i in range(x.shape[0]):
        out = net(x[i:i + 1])[0]
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            out[a], params, retain_graph=True)]) for a in range(out.shape[0])]))
    jac = torch.stack(rows)  # [M, q, P]
    torch.testing.assert_close(full, torch.einsum("aqp,brp->abqr", jac, jac),
                               rtol=1e-10, atol=1e-12)


def test_ntk_features_excludes_head():
    torch.manual_seed(2)
    net = TinyFeatureNet().to(DT)
    x, _ = _data(4)
    Kf = el.empirical_ntk(net, x, output="features")
    assert Kf.shape == (4, 4, 5, 5)
    # the same kernel from a body-only model
    Kb = el.empirical_ntk(net.body, x)
    torch.testing.assert_close(Kf, Kb, rtol=1e-12, atol=1e-12)


def test_ntk_restores_training_mode_and_validates():
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).to(DT)
    net.train()
    net[1].eval()  # a mixed state must survive
    x = torch.randn(3, 3, dtype=DT)
    K1 = el.empirical_ntk(net, x)
    K2 = el.empirical_ntk(net, x)
    torch.testing.assert_close(K1, K2)  # eval mode: dropout off, deterministic
    assert net.training and not net[1].training and net[0].training
    with pytest.raises(ValueError, match="features"):
        el.empirical_ntk(net, x, output="features")
    with pytest.raises(ValueError, match="reduce"):
        el.empirical_ntk(net, x, reduce="sum")
    with pytest.raises(ValueError, match="chunk"):
        el.empirical_ntk(net, x, chunk=0)


# --------------------------------------------------------------------------------------------
# direct measurement of the impacts
# --------------------------------------------------------------------------------------------
def test_impacts_linear_model_closed_form():
    """f(x) = W x + b: K = (x.x' + 1) I, so e(x, x') = x.x' + 1 for any loss gradient."""
    torch.manual_seed(3)
    lin = nn.Linear(4, 3).to(DT)
    x, y = _data(9)
    res = el.measure_impacts(lin, x, y, lr=0.05)
    gram = x @ x.T + 1
    torch.testing.assert_close(res.pair_impacts, gram, rtol=1e-10, atol=1e-12)
    # closed-form pooled E_hat with weights |G(x')|^2, x = x' excluded
    p = torch.softmax(lin(x).detach(), -1)
    s = p - F.one_hot(y, 3).to(DT)
    torch.testing.assert_close(res.G, -s, rtol=1e-12, atol=1e-12)
    w = (s ** 2).sum(-1)
    E = np.zeros((3, 3))
    for k in range(3):
        for kk in range(3):
            num = den = 0.0
            for i in range(9):
                for j in range(9):
                    if y[i] == k and y[j] == kk and i != j:
                        num += float(gram[i, j] * w[j])
                        den += float(w[j])
            E[k, kk] = num / den
    np.testing.assert_allclose(res.E.numpy(), E, rtol=1e-10)
    assert res.alpha == pytest.approx(np.mean(np.diag(E)), rel=1e-10)
    assert res.beta == pytest.approx(E[~np.eye(3, dtype=bool)].mean(), rel=1e-10)
    torch.testing.assert_close(res.delta, -0.05 * gram[:, :, None] * s[None, :, :],
                               rtol=1e-10, atol=1e-12)
    # including self pairs changes only the diagonal blocks
    res2 = el.measure_impacts(lin, x, y, lr=0.05, include_self=True, keep_delta=False)
    assert res2.delta is None
    off = ~torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close(res2.E[off], res.E[off])
    assert not torch.allclose(torch.diagonal(res2.E), torch.diagonal(res.E))
    for k in range(3):
        assert float(res.self_impact[k]) == pytest.approx(float(gram.diagonal()[y == k].mean()))


def test_impacts_scalar_output_mse():
    torch.manual_seed(4)
    lin = nn.Linear(3, 1).to(DT)
    x = torch.randn(6, 3, dtype=DT)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    res = el.measure_impacts(lin, x, y, lr=0.1, loss="mse")
    torch.testing.assert_close(res.pair_impacts, x @ x.T + 1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.G[:, 0], (y.to(DT) - lin(x).detach()[:, 0]))


def _sgd_step_change(net, x, xj, yj, h, output):
    """(f(x; w+) - f(x; w)) / h after one real torch.optim.SGD step at (xj, yj)."""
    new = copy.deepcopy(net)
    opt = torch.optim.SGD(new.parameters(), lr=h)
    opt.zero_grad()
    F.cross_entropy(new(xj[None]), yj[None], reduction="sum").backward()
    opt.step()
    with torch.no_grad():
        if output == "features":
            return (new.features(x) - net.features(x)) / h
        return (new(x) - net(x)) / h


@pytest.mark.parametrize("output", ["logits", "features"])
def test_impacts_match_real_sgd_step(output):
    """First-order prediction vs an actual optimizer step; the error shrinks like O(h)."""
    torch.manual_seed(5)
    net = TinyFeatureNet().to(DT)
    x, y = _data(6)
    res = el.measure_impacts(net, x, y, lr=1.0, output=output)  # delta per unit step
    errors = []
    for h in (1e-2, 1e-3, 1e-4):
        err = 0.0
        for j in range(x.shape[0]):
            fd = _sgd_step_change(net, x, x[j], y[j], h, output)
            err = max(err, float((fd - res.delta[:, j]).abs().max()))
        errors.append(err)
    scale = float(res.delta.abs().max())
    assert errors[-1] < 1e-3 * scale
    # O(h): each tenfold smaller step gives about a tenfold smaller error
    assert errors[1] / errors[0] < 0.15 and errors[2] / errors[1] < 0.15
    # and the impact is the projection of the change on h G(x')
    G = res.G
    e = torch.einsum("ijq,jq->ij", res.delta, G) / (G ** 2).sum(-1)[None, :]
    torch.testing.assert_close(res.pair_impacts, e)


def test_impacts_features_formula():
    """Features: G = -W^T dl/dlogit and Delta = -h J_feat grad_w l, against explicit autograd."""
    torch.manual_seed(6)
    net = TinyFeatureNet().to(DT)
    x, y = _data(5)
    res = el.measure_impacts(net, x, y, lr=0.3, output="features")
    logits = net(x).detach()
    s_logit = torch.softmax(logits, -1) - F.one_hot(y, 3).to(DT)
    torch.testing.assert_close(res.G, -(s_logit @ net.head.weight.detach()))
    body = list(net.body.parameters())
    delta = torch.zeros(5, 5, 5, dtype=DT)
    for j in range(5):
        gl = torch.autograd.grad(F.cross_entropy(net(x[j:j + 1]), y[j:j + 1]), body)
        for i in range(5):
            feat = net.features(x[i:i + 1])[0]
            for a in range(5):
                ga = torch.autograd.grad(feat[a], body, retain_graph=True)
                delta[i, j, a] = -0.3 * sum((u * v).sum() for u, v in zip(ga, gl))
    torch.testing.assert_close(res.delta, delta, rtol=1e-10, atol=1e-12)


def test_impacts_chunked_equals_unchunked_and_validates():
    torch.manual_seed(7)
    net = TinyFeatureNet().to(DT)
    x, y = _data(7)
    a = el.measure_impacts(net, x, y, lr=0.1)
    b = el.measure_impacts(net, x, y, lr=0.1, chunk=3)
    torch.testing.assert_close(a.E, b.E)
    torch.testing.assert_close(a.delta, b.delta)
    with pytest.raises(ValueError, match="one label per example"):
        el.measure_impacts(net, x, y[:3], lr=0.1)
    with pytest.raises(ValueError, match="labels must lie"):
        el.measure_impacts(net, x, y, lr=0.1, num_classes=2)
    with pytest.raises(ValueError, match="loss"):
        el.measure_impacts(net, x, y, lr=0.1, loss="hinge")
