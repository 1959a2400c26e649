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
    """The whole He & Su pipeline on scikit-learn's 8x8 digits (3 vs 5), in seconds: the fast
    two-layer path gives the same symmetrised matrices as the generic per-example path, for the
    logit and for the probability, and the result carries its chance level."""
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
    assert res.output == "probabilities"          # the default for BCE, as He & Su measure
    assert set(res.accuracy) == {"kmeans_rel", "spectral_rel", "kernel_kmeans_ker",
                                 "kmeans_raw", "pca_kmeans"}
    assert res.history[-1] < 0.5 * res.history[0]
    assert res.chance == el.clustering_chance((80, 80))
    xp = torch.as_tensor(X[prim], dtype=DT)
    ones = torch.ones(len(prim))
    for output, s_rel, s_ker in (("probabilities", res.s_rel, res.s_ker),
                                 ("logits", None, None)):
        generic = el.one_step_changes(nn.Sequential(net), xp, ones, loss="bce", output=output)
        if s_rel is None:
            z = net(xp).detach().reshape(-1)
            s_rel, s_ker = (el.symmetrize(m) for m in el.kernel_similarities(
                el.mlp_ntk(net, xp), z, output))
        torch.testing.assert_close(s_rel, el.symmetrize(generic.relative()), rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(s_ker, el.symmetrize(generic.kernelized()), rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="scalar-output"):
        el.cluster_pair(MLP(64, hidden=(8,), num_classes=2), X[prim], Y[prim], X[aux])
    with pytest.raises(ValueError, match="output"):
        el.cluster_pair(net, X[prim], Y[prim], X[aux], output="logit")


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


def test_torus_locality_relu_decays_linear_is_closed_form():
    """ReLU: S_rel falls with geodesic distance over the whole of [0, pi] (bin means strictly
    decreasing, near/far contrast large); a symmetric function of the angle (e.g. |cos dtheta|,
    which is what a linear network gives) rises again beyond pi/2 and fails this.

    Linear network f(x) = a.(W x + b) + c: its NTK is exactly
    |a|^2 (x.x' + 1) + (W x + b).(W x' + b) + 1, so its S_rel is known from the weights; on the
    torus it follows |cos dtheta| (V-shaped in distance), not the distance."""
    relu = el.torus_locality("relu", seed=0, hidden=512, steps=300, lr=0.01)
    assert relu.monotone, relu.bin_means
    assert relu.bin_means[0] > 5 * relu.bin_means[-3:].mean()
    assert relu.pearson < -0.9
    assert relu.s_rel.shape == relu.distance.shape == (2 * 50 * 49,)
    lin = el.torus_locality(None, seed=0, hidden=512, steps=300, lr=0.001)
    x, y, theta = el.torus_curves(50, seed=0)
    W, b = lin.model.layers[0].weight.detach(), lin.model.layers[0].bias.detach()
    a = lin.model.head.weight.detach()[0]
    h = x @ W.T + b
    K = (a @ a) * (x @ x.T + 1) + h @ h.T + 1
    S = (K.abs() / K.diagonal()[:, None])
    mask = (y[:, None] == y[None, :]) & ~torch.eye(100, dtype=torch.bool)
    np.testing.assert_allclose(lin.s_rel, S[mask].numpy(), rtol=1e-9)
    assert not lin.monotone
    assert lin.bin_means[-1] > 2 * lin.bin_means[len(lin.bin_means) // 2]   # rises again
    assert lin.pearson_abscos > 0.9


# --------------------------------------------------------------------------------------------
# tracking during training
# --------------------------------------------------------------------------------------------
def _digits3(n=240):
    from sklearn.datasets import load_digits

    X, Y = load_digits(return_X_y=True)
    keep = Y < 3
    X, Y = X[keep][:n] / 16.0, Y[keep][:n]
    rng = np.random.default_rng(0)
    probe = np.concatenate([rng.choice(np.where(Y == c)[0], 4, replace=False) for c in range(3)])
    return torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(Y), probe


def test_tracking_records_the_measures_of_the_trained_network():
    """Each record is class_elasticity of the network at that moment (row = update class),
    taken where the schedule says: 'epoch' after minibatch b of every epoch with b % every == 0
    (the first record follows the first step, as in Dan et al.'s code), 'global' before training
    and every `every` steps. The first records are recomputed here by hand."""
    import copy

    from lesde.nets import MLP

    X, Y, probe = _digits3()
    torch.manual_seed(0)
    net = MLP(64, hidden=(32,), num_classes=3)
    start = copy.deepcopy(net)
    frame = el.track_elasticity(net, X, Y, X[probe], Y[probe], epochs=2, batch_size=40, lr=1e-3,
                                weight_decay=1e-4, every=3, x_test=X[:60], y_test=Y[:60],
                                progress=False)
    assert list(frame["step"]) == [1, 4, 7, 10]      # 6 minibatches per epoch, b = 0, 3
    assert {"kl_0_0", "kl_2_1", "norm_1_1", "kl_compat_0_2", "norm_prob_2_2", "suhe_compat_1_0",
            "train_acc", "test_acc"} <= set(frame.columns)
    # the first record: one Adam step (weight decay 1e-4) on the first minibatch of the shuffle
    manual = copy.deepcopy(start)
    opt = torch.optim.Adam(manual.parameters(), lr=1e-3, weight_decay=1e-4)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    F.cross_entropy(manual(X[perm[:40]]), Y[perm[:40]]).backward()
    opt.step()
    mats = el.class_elasticity(manual, X[probe], Y[probe], lr=1e-3)
    for name, m in mats.items():
        got = np.array([[frame[f"{name}_{a}_{b}"].iloc[0] for b in range(3)] for a in range(3)])
        np.testing.assert_allclose(got, m.numpy(), rtol=1e-5, err_msg=name)
    # the global schedule records the untouched network first
    g = el.track_elasticity(copy.deepcopy(start), X, Y, X[probe], Y[probe], epochs=1,
                            batch_size=40, lr=1e-3, every=2, schedule="global", progress=False)
    assert list(g["step"]) == [0, 2, 4, 6]
    m0 = el.class_elasticity(start, X[probe], Y[probe], lr=1e-3)
    np.testing.assert_allclose(g["kl_1_2"].iloc[0], float(m0["kl"][1, 2]), rtol=1e-6)
    with pytest.raises(ValueError, match="schedule"):
        el.track_elasticity(net, X, Y, X[probe], Y[probe], schedule="step", progress=False)


def test_tracking_resumes_from_its_checkpoint(tmp_path):
    """An interrupted run (here: stopped after one of two epochs) continues from its checkpoint
    and ends with the same records and weights as an uninterrupted run."""
    from lesde.nets import MLP

    X, Y, probe = _digits3(150)
    kw = dict(batch_size=30, lr=1e-3, every=2, progress=False, seed=3)
    torch.manual_seed(1)
    full_net = MLP(64, hidden=(16,), num_classes=3)
    state = {k: v.clone() for k, v in full_net.state_dict().items()}
    full, pairs = el.track_elasticity(full_net, X, Y, X[probe], Y[probe], epochs=2,
                                      return_pairs=True, **kw)
    ck = str(tmp_path / "ck.pt")
    part_net = MLP(64, hidden=(16,), num_classes=3)
    part_net.load_state_dict(state)
    el.track_elasticity(part_net, X, Y, X[probe], Y[probe], epochs=1, checkpoint=ck, **kw)
    resumed_net = MLP(64, hidden=(16,), num_classes=3)   # other weights: the checkpoint wins
    resumed, pairs2 = el.track_elasticity(resumed_net, X, Y, X[probe], Y[probe], epochs=2,
                                          checkpoint=ck, return_pairs=True, **kw)
    assert len(resumed) == len(full) == 6
    np.testing.assert_allclose(resumed.drop(columns=["test_acc"]).to_numpy(dtype=float),
                               full.drop(columns=["test_acc"]).to_numpy(dtype=float), rtol=1e-6)
    for a, b in zip(resumed_net.parameters(), full_net.parameters()):
        torch.testing.assert_close(a, b)
    assert pairs2["kl"].shape == pairs["kl"].shape == (6, 12, 12)


def test_tracking_summary_known_answer():
    """A frame built from S[t, k, l] = r_k c_l L_t[k, l]: the summary's fraction is row-wise
    (update class), its chance 1/K, the ratio is diag mean over off-diagonal mean over the last
    epoch, and the double log-ratio recovers the locality alone."""
    import pandas as pd

    r = np.array([5.0, 1.0, 1.0])
    c = np.array([1.0, 10.0, 100.0])
    lams = np.array([0.1, 0.4, 0.7, 0.9])              # records at epochs 0.5, 1.0, 1.5, 2.0
    rows = []
    for t, lam in enumerate(lams):
        S = r[:, None] * c[None, :] * np.exp(lam * np.eye(3))
        row = {"step": t + 1, "epoch": 0.5 * (t + 1), "train_acc": 0.5, "test_acc": 0.5}
        row.update({f"kl_{a}_{b}": S[a, b] for a in range(3) for b in range(3)})
        rows.append(row)
    frame = pd.DataFrame(rows)
    summ = el.tracking_summary(frame, "kl")
    # row 2 qualifies always (100 e^lam > 1, 10); rows 0 and 1 never (e^lam < 10)
    assert summ["frac_same_exceeds"] == pytest.approx(1 / 3)
    assert summ["frac_per_class"] == [0.0, 0.0, 1.0]
    assert summ["frac_chance"] == pytest.approx(1 / 3)
    assert summ["double_log_ratio_first"] == pytest.approx(2 * 0.1)
    assert summ["double_log_ratio_last_epoch"] == pytest.approx(2 * np.mean([0.7, 0.9]))
    last = [np.exp(0.7 * np.eye(3)), np.exp(0.9 * np.eye(3))]
    S_last = [r[:, None] * c[None, :] * L for L in last]
    diag = np.mean([np.diag(S).mean() for S in S_last])
    cross = np.mean([S[~np.eye(3, dtype=bool)].mean() for S in S_last])
    assert summ["last_epoch_ratio"] == pytest.approx(diag / cross)
    stats = el.tracking_statistics(frame, "kl")
    np.testing.assert_allclose(stats["double_log_ratio"], 2 * lams)
    with pytest.raises(ValueError, match="measure"):
        el.tracking_summary(frame, "cosine")


def test_crop_flip_is_a_shifted_crop_or_its_mirror():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20, 3, 8, 8, generator=g)
    out = el.crop_flip(x, pad=2, seed=1)
    assert out.shape == x.shape
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(20):
        found = any(torch.equal(out[i], cand) for oy in range(5) for ox in range(5)
                    for cand in (padded[i, :, oy:oy + 8, ox:ox + 8],
                                 padded[i, :, oy:oy + 8, ox:ox + 8].flip(-1)))
        assert found
    assert not torch.equal(out, x)
    assert torch.equal(out, el.crop_flip(x, pad=2, seed=1))
