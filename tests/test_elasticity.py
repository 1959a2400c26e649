"""Tests of lesde.elasticity: empirical NTK, direct impact measurement, similarity measures."""
import copy
import math

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
    with torch.no_grad():  # callers such as a training logger may hold no_grad
        c = el.measure_impacts(net, x, y, lr=0.1)
    torch.testing.assert_close(a.delta, c.delta)
    for output in ("logits", "features"):
        ref = el.measure_impacts(net, x, y, lr=0.1, output=output, path="jacobian")
        for path, chunk in (("jvp", None), ("jvp", 2), ("auto", None)):
            other = el.measure_impacts(net, x, y, lr=0.1, output=output, path=path, chunk=chunk)
            torch.testing.assert_close(other.delta, ref.delta, rtol=1e-10, atol=1e-12)
    part = el.one_step_changes(net, x, y, x[:3], path="jvp")
    torch.testing.assert_close(part.delta, el.one_step_changes(net, x, y).delta[:, :3])
    with pytest.raises(ValueError, match="path"):
        el.measure_impacts(net, x, y, lr=0.1, path="loop")
    with pytest.raises(ValueError, match="one label per example"):
        el.measure_impacts(net, x, y[:3], lr=0.1)
    with pytest.raises(ValueError, match="labels must lie"):
        el.measure_impacts(net, x, y, lr=0.1, num_classes=2)
    with pytest.raises(ValueError, match="loss"):
        el.measure_impacts(net, x, y, lr=0.1, loss="hinge")


def test_impacts_on_package_nets():
    """ResNet-18 (BatchNorm, evaluated in eval mode) and MLP from lesde.nets."""
    from lesde.nets import MLP, ResNet18

    torch.manual_seed(8)
    net = ResNet18(num_classes=3, width=1 / 16)
    net.train()
    x = torch.randn(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 0])
    for output, q in (("logits", 3), ("features", net.feature_dim)):
        res = el.measure_impacts(net, x, y, lr=0.1, output=output)
        assert res.E.shape == (3, 3) and res.delta.shape == (4, 4, q)
        assert torch.isfinite(res.pair_impacts).all()
    assert net.training  # mode restored
    mlp = MLP(4, hidden=(8,), num_classes=3).to(DT)
    xm, ym = _data(6)
    res = el.measure_impacts(mlp, xm, ym, lr=1.0, output="features")
    fd = _sgd_step_change(mlp, xm, xm[2], ym[2], 1e-6, "features")
    torch.testing.assert_close(fd, res.delta[:, 2], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# He & Su's similarities
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ntk", "step"])
def test_similarity_linear_model_exact(method):
    """f(x) = w.x + c is linear in its parameters: S_ker = x.x' + 1 for every step size."""
    torch.manual_seed(9)
    lin = nn.Linear(3, 1).to(DT)
    x = torch.randn(5, 3, dtype=DT)
    y = torch.tensor([0, 1, 0, 1, 1])
    gram = x @ x.T + 1
    for loss in ("bce", "mse"):
        sk = el.kernelized_similarity(lin, x, y, lr=0.5, method=method, loss=loss)
        torch.testing.assert_close(sk, gram, rtol=1e-10, atol=1e-10)
        sr = el.relative_similarity(lin, x, y, lr=0.5, method=method, loss=loss)
        torch.testing.assert_close(sr, gram.abs() / gram.diagonal()[:, None],
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("q,loss", [(1, "bce"), (3, "cross_entropy")])
def test_finite_eta_converges_to_ntk_limit(q, loss):
    torch.manual_seed(10)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, q)).to(DT)
    x, y = _data(6, k=2 if q == 1 else 3)
    lim = el.one_step_changes(net, x, y, loss=loss)
    if q == 1:  # the limit is the NTK itself
        K = el.empirical_ntk(net, x)[:, :, 0, 0]
        torch.testing.assert_close(lim.kernelized(), K, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lim.relative(), K.abs() / K.diagonal()[:, None])
    errs = []
    for eta in (1e-2, 1e-3, 1e-4):
        st = el.one_step_changes(net, x, y, lr=eta, method="step", loss=loss)
        errs.append((float((st.kernelized() - lim.kernelized()).abs().max()),
                     float((st.relative() - lim.relative()).abs().max())))
    for a, b in zip(errs[:-1], errs[1:]):  # O(eta)
        assert b[0] < 0.15 * a[0] and b[1] < 0.15 * a[1]
    assert errs[-1][0] < 1e-3 and errs[-1][1] < 1e-3


def test_similarity_with_separate_probes():
    torch.manual_seed(11)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).to(DT)
    x, y = _data(6)
    full = el.one_step_changes(net, x, y)
    part = el.one_step_changes(net, x, y, x[:4])
    torch.testing.assert_close(part.delta, full.delta[:, :4])
    torch.testing.assert_close(part.self_delta, full.self_delta)
    torch.testing.assert_close(el.relative_similarity(net, x, y, x[:4]), full.relative()[:, :4])
    step = el.one_step_changes(net, x, y, x[:4], method="step", lr=1e-3)
    full_step = el.one_step_changes(net, x, y, method="step", lr=1e-3)
    torch.testing.assert_close(step.delta, full_step.delta[:, :4])
    torch.testing.assert_close(step.self_delta, full_step.self_delta)


def test_adam_and_custom_optimizer_steps():
    """A fresh Adam step is lr * g / (|g| + eps) per parameter; a factory is used as given."""
    torch.manual_seed(12)
    lin = nn.Linear(3, 1).to(DT)
    x = torch.randn(4, 3, dtype=DT)
    y = torch.tensor([1, 0, 1, 0])
    lr = 1e-3
    ch = el.one_step_changes(lin, x, y, lr=lr, method="step", optimizer="adam", loss="bce")
    for i in range(4):
        s = float(ch.loss_grad[i, 0])
        gw, gb = s * x[i], torch.tensor(s, dtype=DT)
        dw = -lr * gw / (gw.abs() + 1e-8)
        db = -lr * gb / (gb.abs() + 1e-8)
        torch.testing.assert_close(ch.delta[i, :, 0], x @ dw + db, rtol=1e-9, atol=1e-15)
    calls = []

    def factory(params, step):
        calls.append(step)
        return torch.optim.SGD(params, lr=step, momentum=0.9)

    a = el.one_step_changes(lin, x, y, lr=lr, method="step", optimizer=factory, loss="bce")
    b = el.one_step_changes(lin, x, y, lr=lr, method="step", optimizer="sgd", loss="bce")
    torch.testing.assert_close(a.delta, b.delta)  # momentum does not act on a first step
    assert calls == [lr] * 4
    with pytest.raises(ValueError, match="eta -> 0"):
        el.one_step_changes(lin, x, y, optimizer="adam")
    with pytest.raises(ValueError, match="optimizer"):
        el.one_step_changes(lin, x, y, method="step", optimizer="lbfgs")


# --------------------------------------------------------------------------------------------
# Dan et al.'s KL relative similarity
# --------------------------------------------------------------------------------------------
def test_kl_helper_true_and_compat():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 4, generator=g, dtype=DT)
    dz = 0.3 * torch.randn(7, 4, generator=g, dtype=DT)
    p, pn = torch.softmax(z, -1), torch.softmax(z + dz, -1)
    true = (p * (p.log() - pn.log())).sum(-1)
    torch.testing.assert_close(el._kl_from_logits(z, dz, "true"), true, rtol=1e-10, atol=1e-14)
    # the compat formula is exactly torch's kl_div with probabilities passed as its input
    compat = F.kl_div(pn, p, reduction="none").sum(-1)
    torch.testing.assert_close(el._kl_from_logits(z, dz, "compat"), compat)
    # the true KL vanishes when nothing changes, the compat value does not
    zero = torch.zeros_like(dz)
    assert float(el._kl_from_logits(z, zero, "true").abs().max()) == 0.0
    assert float(el._kl_from_logits(z, zero, "compat").abs().min()) > 0.1
    # tiny steps: no cancellation (second order, matches 0.5 dz^T (diag p - p p^T) dz)
    tiny = 1e-7 * dz
    fisher = 0.5 * ((tiny ** 2 * p).sum(-1) - (tiny * p).sum(-1) ** 2)
    torch.testing.assert_close(el._kl_from_logits(z, tiny, "true"), fisher, rtol=1e-6, atol=0)


@pytest.mark.filterwarnings("ignore:reduction")
def test_kl_relative_similarity():
    torch.manual_seed(13)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).to(DT)
    x, y = _data(6)
    s = el.kl_relative_similarity(net, x, y, lr=1e-4)
    assert s.shape == (6, 6)
    torch.testing.assert_close(s.diagonal(), torch.ones(6, dtype=DT))
    assert bool((s >= 0).all())
    # compat mode: the ratio of torch's kl_div (default 'mean' reduction) of probabilities
    ch = el.one_step_changes(net, x, y, lr=1e-4, method="step", optimizer="adam")
    p0 = torch.softmax(ch.before_probe, -1)
    ref = torch.empty(6, 6, dtype=DT)
    for i in range(6):
        ps = torch.softmax(ch.before_self[i] + ch.self_delta[i], -1)
        den = F.kl_div(ps[None], p0[i][None])
        for j in range(6):
            pn = torch.softmax(ch.before_probe[j] + ch.delta[i, j], -1)
            ref[i, j] = F.kl_div(pn[None], p0[j][None]) / den
    sc = el.kl_relative_similarity(net, x, y, lr=1e-4, kl_mode="compat")
    torch.testing.assert_close(sc, ref)
    # SGD, eta -> 0: ratio of the Fisher quadratic forms of the first-order logit changes
    lim = el.one_step_changes(net, x, y)
    p = torch.softmax(lim.before_probe, -1)

    def quad(d, pp):
        return (d ** 2 * pp).sum(-1) - (d * pp).sum(-1) ** 2

    expected = quad(lim.delta, p[None]) / quad(lim.self_delta, p)[:, None]
    s_sgd = el.kl_relative_similarity(net, x, y, lr=1e-6, optimizer="sgd")
    torch.testing.assert_close(s_sgd, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="kl_mode"):
        el.kl_relative_similarity(net, x, y, kl_mode="torch")


# --------------------------------------------------------------------------------------------
# matrices and summaries
# --------------------------------------------------------------------------------------------
def test_symmetrize_matrix_and_class_means():
    s = torch.tensor([[4.0, 1.0], [3.0, 1.0]])
    torch.testing.assert_close(el.symmetrize(s), torch.tensor([[4.0, 2.0], [2.0, 1.0]]))
    torch.testing.assert_close(el.symmetrize(s, normalize=True),
                               torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        el.symmetrize(torch.ones(2, 3))
    m = torch.arange(16.0).reshape(4, 4)
    y = torch.tensor([0, 0, 1, 1])
    cm = el.class_pair_means(m, y)
    torch.testing.assert_close(cm, torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    cm2 = el.class_pair_means(m, y, exclude_self=False)
    torch.testing.assert_close(cm2, torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    cm3 = el.class_pair_means(m[:, :2], y, torch.tensor([1, 1]), num_classes=2)
    assert torch.isnan(cm3[:, 0]).all()
    torch.testing.assert_close(cm3[:, 1], torch.tensor([2.5, 10.5]))

    torch.manual_seed(14)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)).to(DT)
    x, yy = _data(5, k=2)
    sk = el.similarity_matrix(net, x, yy, kind="kernelized", normalize=True, loss="bce")
    torch.testing.assert_close(sk, sk.T)
    torch.testing.assert_close(sk.diagonal(), torch.ones(5, dtype=DT))
    K = el.empirical_ntk(net, x)[:, :, 0, 0]
    torch.testing.assert_close(sk, K / torch.sqrt(K.diagonal()[:, None] * K.diagonal()))
    with pytest.raises(ValueError, match="kind"):
        el.similarity_matrix(net, x, yy, kind="cosine")


# --------------------------------------------------------------------------------------------
# clustering
# --------------------------------------------------------------------------------------------
def test_clustering_accuracy():
    t = np.array([0, 0, 0, 1, 1, 1])
    assert el.clustering_accuracy(t, [1, 1, 1, 0, 0, 0]) == 1.0
    assert el.clustering_accuracy(t, [0, 0, 1, 1, 1, 1]) == pytest.approx(5 / 6)
    # two clusters: 0.5 + |acc - 0.5|
    for pred in ([0, 1, 1, 0, 0, 1], [1, 1, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]):
        acc = float(np.mean(np.asarray(pred) == t))
        assert el.clustering_accuracy(t, pred) == pytest.approx(0.5 + abs(acc - 0.5))
    t3 = np.array([0, 0, 1, 1, 2, 2])
    assert el.clustering_accuracy(t3, [2, 2, 0, 0, 1, 1]) == 1.0
    assert el.clustering_accuracy(t3, [2, 2, 0, 0, 0, 1]) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="same length"):
        el.clustering_accuracy(t, [0, 1])


def test_kernel_kmeans_known_clusterings():
    from sklearn.cluster import KMeans

    # two concentric circles: K-means on the points fails, kernel K-means with the
    # kernel <phi(x), phi(x')> of phi(x) = |x|^2 separates them exactly
    rng = np.random.default_rng(0)
    ang = rng.uniform(0, 2 * np.pi, 200)
    rad = np.repeat([1.0, 3.0], 100)
    pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
    truth = np.repeat([0, 1], 100)
    phi = (pts ** 2).sum(1)
    labels = el.kernel_kmeans(np.outer(phi, phi) + 1.0, 2, seed=0)
    assert el.clustering_accuracy(truth, labels) == 1.0
    plain = KMeans(2, n_init=10, random_state=0).fit_predict(pts)
    assert el.clustering_accuracy(truth, plain) < 0.75
    # a noisy block Gram matrix with three blocks of unequal size
    sizes = [10, 25, 15]
    t3 = np.repeat(np.arange(3), sizes)
    feats = np.eye(3)[t3] + 0.2 * rng.standard_normal((50, 3))
    lab3 = el.kernel_kmeans(feats @ feats.T, 3, seed=1)
    assert el.clustering_accuracy(t3, lab3) == 1.0
    # identity Gram matrix, as many clusters as points: every point its own cluster
    assert len(np.unique(el.kernel_kmeans(np.eye(4), 4))) == 4
    with pytest.raises(ValueError, match="n_clusters"):
        el.kernel_kmeans(np.eye(3), 5)


def test_cluster_pair_on_sklearn_digits():
    """The whole He & Su pipeline on scikit-learn's 8x8 digits (3 vs 5), in seconds."""
    from sklearn.datasets import load_digits

    from lesde.nets import MLP

    X, Y = load_digits(return_X_y=True)
    X = X / 16.0
    rng = np.random.default_rng(0)
    prim = np.concatenate([rng.choice(np.where(Y == d)[0], 80, replace=False) for d in (3, 5)])
    aux = rng.choice(np.where((Y != 3) & (Y != 5))[0], 120, replace=False)
    torch.manual_seed(0)
    net = MLP(64, hidden=(128,), num_classes=1).to(DT)
    res = el.cluster_pair(net, X[prim], Y[prim], X[aux], epochs=15, lr=0.05, seed=0)
    assert set(res.accuracy) == {"kmeans_rel", "spectral_rel", "kernel_kmeans_ker",
                                 "kmeans_raw", "pca_kmeans"}
    assert res.history[-1] < res.history[0]
    for name, acc in res.accuracy.items():
        assert 0.5 <= acc <= 1.0
        assert acc > 0.75, (name, acc)  # 3 vs 5 is easy: all methods cluster it well
    assert res.s_rel.shape == (160, 160)
    torch.testing.assert_close(res.s_rel, res.s_rel.T)
    with pytest.raises(ValueError, match="scalar-output"):
        el.cluster_pair(MLP(64, hidden=(8,), num_classes=2), X[prim], Y[prim], X[aux])


# --------------------------------------------------------------------------------------------
# synthetic locality check on the torus
# --------------------------------------------------------------------------------------------
def test_torus_curves():
    x, y, theta = el.torus_curves(20, seed=3)
    assert x.shape == (40, 3) and y.tolist() == [1] * 20 + [0] * 20
    # both curves lie on the torus (distance r from the z axis circle, radius 1 tube)
    rho = torch.sqrt(x[:, 0] ** 2 + x[:, 1] ** 2)
    torch.testing.assert_close((rho - 8) ** 2 + x[:, 2] ** 2, torch.ones(40, dtype=DT))
    x2, _, _ = el.torus_curves(20, seed=3)
    assert torch.equal(x, x2)
    d = el.geodesic_distance(torch.tensor([3.0, -3.0]), torch.tensor([-3.0, 0.0]))
    torch.testing.assert_close(d, torch.tensor([2 * math.pi - 6.0, 3.0]))


def test_torus_locality_relu_vs_linear():
    """ReLU: S_rel falls with geodesic distance; linear: no relation.

    Observed (seeds 0-4, width 512, 0 to 3,000 full-batch steps): ReLU Pearson -0.95 to -0.96;
    linear -0.02 to -0.05. For the linear net S_rel = |x^T A x' + c| / (x^T A x + c), and on
    the torus x.x' ~ r^2 cos(dtheta): |cos| is symmetric about dtheta = pi/2, so its
    correlation with dtheta in [0, pi] is about zero. The thresholds (-0.5 and 0.2) sit far from
    both observed ranges.
    """
    relu = el.torus_locality("relu", seed=0, hidden=512, steps=300, lr=0.01)
    lin = el.torus_locality(None, seed=0, hidden=512, steps=300, lr=0.001)
    assert relu.pearson < -0.5
    assert abs(lin.pearson) < 0.2
    assert relu.s_rel.shape == relu.distance.shape == (2 * 50 * 49,)


# --------------------------------------------------------------------------------------------
# tracking during training
# --------------------------------------------------------------------------------------------
def test_class_elasticity_and_tracking():
    from sklearn.datasets import load_digits

    from lesde.nets import MLP

    X, Y = load_digits(return_X_y=True)
    keep = Y < 3
    X, Y = X[keep][:240] / 16.0, Y[keep][:240]
    rng = np.random.default_rng(0)
    probe = np.concatenate([rng.choice(np.where(Y == c)[0], 4, replace=False) for c in range(3)])
    torch.manual_seed(0)
    net = MLP(64, hidden=(32,), num_classes=3)
    mats = el.class_elasticity(net, X[probe], Y[probe], lr=1e-3)
    assert set(mats) == {"kl", "kl_compat", "norm"}
    for m in mats.values():
        assert m.shape == (3, 3) and torch.isfinite(m).all()
    before = [p.detach().clone() for p in net.parameters()]
    frame = el.track_elasticity(net, X, Y, X[probe], Y[probe], epochs=2, batch_size=40,
                                lr=1e-3, every=3, x_test=X[:60], y_test=Y[:60], progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert list(frame["step"]) == [0, 3, 6, 9, 12]
    assert {"kl_0_0", "kl_2_1", "norm_1_1", "kl_compat_0_2", "train_acc", "test_acc"} \
        <= set(frame.columns)
    assert frame["train_acc"].iloc[-1] > frame["train_acc"].iloc[1]
    for measure in ("kl", "norm"):
        summ = el.tracking_summary(frame, measure)
        assert 0.0 <= summ["frac_same_exceeds"] <= 1.0 and summ["last_epoch_ratio"] > 0
    with pytest.raises(ValueError, match="measure"):
        el.tracking_summary(frame, "cosine")
