"""Known-answer tests of the local-elasticity measures: networks and kernels whose S_rel is known
in closed form, so that a swapped update/probe axis, a wrong normalisation or a logit/probability
mix-up fails; a clustering construction with a derived margin over K-means; the exact chance
levels; the locality statistics; the two-layer NTK against a wide network."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lesde import elasticity as el

DT = torch.float64


# --------------------------------------------------------------------------------------------
# a scalar network with a closed-form S_rel: f(x) = w |x|^2 + c
# --------------------------------------------------------------------------------------------
class RadialNet(nn.Module):
    """f(x) = w |x|^2 + c. Linear in its parameters (w, c), so its NTK is exactly
    K(x, x') = |x|^2 |x'|^2 + 1 and an SGD step changes the logit by exactly -eta K dL/dz."""

    def __init__(self, w=1.0, c=-1.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w], dtype=DT))
        self.c = nn.Parameter(torch.tensor([c], dtype=DT))

    def forward(self, x):
        return (self.w * (x ** 2).sum(-1) + self.c)[:, None]


def _radial_closed_form(x, w, c):
    rho = (x ** 2).sum(-1)
    K = rho[:, None] * rho[None, :] + 1
    z = w * rho + c
    ds = torch.sigmoid(z) * (1 - torch.sigmoid(z))
    s_logit = K / K.diagonal()[:, None]                       # row = update example
    s_prob = ds[None, :] * K / (ds[:, None] * K.diagonal()[:, None])
    return K, s_logit, s_prob


def _radial_points(seed=0, m=7):
    g = torch.Generator().manual_seed(seed)
    radius = torch.linspace(0.3, 2.2, m, dtype=DT)
    ang = 2 * math.pi * torch.rand(m, generator=g, dtype=DT)
    return torch.stack([radius * torch.cos(ang), radius * torch.sin(ang)], 1)


@pytest.mark.parametrize("method", ["ntk", "step"])
def test_relative_similarity_closed_form_logits_and_probabilities(method):
    """S_rel[i, j] = K_ij / K_ii on the logit and sigma'(z_j) K_ij / (sigma'(z_i) K_ii) on the
    probability, row = update example. The matrices are far from symmetric and far from each
    other, so swapping the axes, normalising by the probe's own change, or measuring the logit
    where the probability is asked (or the reverse) all fail."""
    x = _radial_points()
    y = torch.ones(len(x))
    net = RadialNet()
    K, s_logit, s_prob = _radial_closed_form(x, 1.0, -1.0)
    # the construction separates the candidate mistakes by wide margins
    assert (s_logit - s_logit.T).abs().max() > 1.0
    assert (s_logit - s_prob).abs().max() > 1.0
    assert (s_logit - K / torch.sqrt(K.diagonal()[:, None] * K.diagonal()[None, :])).abs().max() > 1.0
    lr = 1e-3 if method == "step" else 1.0
    got = el.relative_similarity(net, x, y, lr=lr, method=method, loss="bce")
    torch.testing.assert_close(got, s_logit, rtol=1e-9, atol=1e-12)
    got_p = el.relative_similarity(net, x, y, lr=1e-7 if method == "step" else 1.0, method=method,
                                   loss="bce", output="probabilities")
    tol = 1e-9 if method == "ntk" else 2e-4   # explicit steps: the sigmoid is first order only
    torch.testing.assert_close(got_p, s_prob, rtol=tol, atol=tol)
    # kernelized similarity: K on the logit, sigma'(z_i) sigma'(z_j) K on the probability
    ker = el.kernelized_similarity(net, x, y, lr=lr, method=method, loss="bce")
    torch.testing.assert_close(ker, K, rtol=1e-9, atol=1e-12)
    if method == "ntk":
        z = (x ** 2).sum(-1) - 1.0
        ds = torch.sigmoid(z) * (1 - torch.sigmoid(z))
        ker_p = el.kernelized_similarity(net, x, y, method="ntk", loss="bce", output="probabilities")
        torch.testing.assert_close(ker_p, ds[:, None] * ds[None, :] * K, rtol=1e-9, atol=1e-12)
        # the same from the kernel alone
        rel2, ker2 = el.kernel_similarities(K, z, "probabilities")
        torch.testing.assert_close(rel2, s_prob)
        torch.testing.assert_close(ker2, ker_p)


def test_class_pair_means_keep_the_update_axis():
    """class_pair_means(S, y)[k, l] averages rows of class k (update) and columns of class l."""
    x = _radial_points(m=6)
    y = torch.tensor([0, 0, 0, 1, 1, 1])   # radii rise with the index: class 1 is the outer one
    _, s, _ = _radial_closed_form(x, 1.0, -1.0)
    means = el.class_pair_means(s, y, exclude_self=False)
    expected = torch.tensor([[s[:3, :3].mean(), s[:3, 3:].mean()],
                             [s[3:, :3].mean(), s[3:, 3:].mean()]], dtype=DT)
    torch.testing.assert_close(means, expected)
    assert abs(float(means[0, 1] - means[1, 0])) > 1.0


def test_le_clustering_beats_kmeans_by_the_derived_margin():
    """Two concentric rings (radius 1 and 3, n points each, evenly spaced, offset): K-means on
    the points draws a line through the centre (the configuration is centrally symmetric), which
    cuts each ring into two halves of n/2 +- 1 points, so its score is at most 0.5 + 2/n. For
    the radial network S_rel = (r_i^2 r_j^2 + 1) / (r_i^4 + 1) (10/2 from the inner to the outer
    ring, 10/82 back); symmetrised, it is 1 within a ring and (10/2 + 10/82) / 2 = 2.56 across,
    whatever the angles: the rows of the two rings are two constant patterns, and K-means on
    them separates the rings exactly (score 1). Margin >= 0.5 - 2/n."""
    n = 40
    ang = 2 * math.pi * torch.arange(n, dtype=DT) / n
    inner = torch.stack([torch.cos(ang + 0.05), torch.sin(ang + 0.05)], 1)
    outer = 3 * torch.stack([torch.cos(ang + 0.11), torch.sin(ang + 0.11)], 1)
    x = torch.cat([inner, outer])
    truth = np.repeat([0, 1], n)
    aux = 2 * torch.stack([torch.cos(ang[::4]), torch.sin(ang[::4])], 1)
    res = el.cluster_pair(RadialNet(), x, truth, aux, epochs=0, loss="bce", output="logits",
                          pca_components=2)
    assert res.accuracy["kmeans_raw"] <= 0.5 + 2 / n
    assert res.accuracy["kmeans_rel"] == 1.0
    assert res.accuracy["kmeans_rel"] - res.accuracy["kmeans_raw"] >= 0.5 - 2 / n
    s = res.s_rel.numpy()
    np.testing.assert_allclose(s[:n, :n], 1.0)
    np.testing.assert_allclose(s[n:, n:], 1.0)
    np.testing.assert_allclose(s[:n, n:], 0.5 * (10 / 2 + 10 / 82))
    assert res.chance == el.clustering_chance((n, n))


# --------------------------------------------------------------------------------------------
# Dan et al.'s measures on a softmax model with a closed form
# --------------------------------------------------------------------------------------------
def _softmax_closed_form(x, y, k, lr, optimizer):
    """W = 0, b = 0 (uniform predictions u): the logit change at x_j after one step at (x_i, y_i)
    is exact for this linear model. SGD: -lr (x_i.x_j + 1) g_i, g_i = u - e_{y_i}; a fresh Adam
    step moves each parameter by -lr G / (|G| + 1e-8) (G its gradient)."""
    g = torch.full((len(x), k), 1.0 / k, dtype=DT) - F.one_hot(y, k).to(DT)
    dz = torch.empty(len(x), len(x), k, dtype=DT)
    for i in range(len(x)):
        if optimizer == "sgd":
            dz[i] = -lr * (x @ x[i] + 1)[:, None] * g[i][None, :]
        else:
            gw = g[i][:, None] * x[i][None, :]
            dw = -lr * gw / (gw.abs() + 1e-8)
            db = -lr * g[i] / (g[i].abs() + 1e-8)
            dz[i] = x @ dw.T + db
    u = torch.full((k,), 1.0 / k, dtype=DT)
    p_new = torch.softmax(dz, -1)
    kl = torch.logsumexp(dz, -1) - math.log(k) - dz.mean(-1)          # KL(u || softmax(dz))
    compat = (u * (u.log() - p_new)).sum(-1)                           # released formula
    dp = p_new - u
    diag = torch.arange(len(x))
    out = {"kl": kl / kl[diag, diag][:, None],
           "kl_compat": compat / compat[diag, diag][:, None],
           "norm": dz.norm(dim=-1) / dz[diag, diag].norm(dim=-1)[:, None],
           "norm_prob": dp.norm(dim=-1) / dp[diag, diag].norm(dim=-1)[:, None],
           "suhe_compat": dp.abs().mean(-1) / (dp[diag, diag].pow(2).mean(-1).sqrt() + 1e-8)[:, None]}
    return out


def _class_data():
    """Three classes on three axes with class-specific norms (2, 1, 0.5), a little jitter."""
    g = torch.Generator().manual_seed(3)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    scale = torch.tensor([2.0, 1.0, 0.5], dtype=DT)
    x = F.one_hot(y, 3).to(DT) * scale[y][:, None] + 0.1 * torch.randn(7, 3, generator=g, dtype=DT)
    return x, y


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_pair_and_class_elasticity_closed_form(optimizer):
    x, y = _class_data()
    lin = nn.Linear(3, 3).to(DT)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    lr = 0.05
    expected = _softmax_closed_form(x, y, 3, lr, optimizer)
    got = el.pair_elasticity(lin, x, y, lr=lr, optimizer=optimizer)
    assert set(got) == set(el.TRACK_MEASURES)
    for name, mat in expected.items():
        torch.testing.assert_close(got[name], mat, rtol=1e-7, atol=1e-10, msg=name)
    # with uniform predictions the released KL formula is a constant: every ratio is 1
    torch.testing.assert_close(got["kl_compat"], torch.ones(7, 7, dtype=DT), rtol=1e-12, atol=1e-12)
    # the true KL ratio and the logit norm ratio are far from symmetric: a swapped axis fails
    for name in ("kl", "norm", "norm_prob"):
        assert (expected[name] - expected[name].T).abs().max() > 0.5, name
    means = el.class_elasticity(lin, x, y, lr=lr, optimizer=optimizer)
    for name, mat in expected.items():
        ref = torch.stack([torch.stack([mat[y == a][:, y == b].mean() for b in range(3)])
                           for a in range(3)])
        torch.testing.assert_close(means[name], ref, rtol=1e-7, atol=1e-10, msg=name)
    assert (means["kl"] - means["kl"].T).abs().max() > 0.5


# --------------------------------------------------------------------------------------------
# locality statistics: known answers, and what exchangeability gives
# --------------------------------------------------------------------------------------------
def test_locality_statistics_known_answers():
    """S[k, l] = r_k c_l L[k, l] with L = exp(lam delta_kl): the double log-ratio is 2 lam for
    any row effects r and column effects c; the fraction is row-wise (same-class above both
    values of its row): with c = (1, 10, 100), lam = log 2 only row 2 qualifies, while the
    column-wise version would give a different class."""
    r = np.array([5.0, 1.0, 1.0])
    c = np.array([1.0, 10.0, 100.0])
    lam = math.log(2.0)
    L = np.exp(lam * np.eye(3))
    S = r[:, None] * c[None, :] * L
    st = el.locality_statistics(S)
    np.testing.assert_allclose(st["double_log_ratio"], 2 * lam, rtol=1e-12)
    np.testing.assert_array_equal(st["frac_same_exceeds"], [0.0, 0.0, 1.0])
    col_wise = el.locality_statistics(S.T)["frac_same_exceeds"]
    np.testing.assert_array_equal(col_wise, [1.0, 0.0, 0.0])
    diag = np.diag(S)
    cross = S[~np.eye(3, dtype=bool)]
    np.testing.assert_allclose(st["ratio"], diag.mean() / cross.mean(), rtol=1e-12)
    assert st["frac_chance"] == pytest.approx(1 / 3)
    # no locality at all (L = 1): the log-ratio is exactly 0, the fraction still 1/3 here
    flat = el.locality_statistics(r[:, None] * c[None, :])
    assert abs(float(flat["double_log_ratio"])) < 1e-12
    # batched over time
    st2 = el.locality_statistics(np.stack([S, r[:, None] * c[None, :]]))
    np.testing.assert_allclose(st2["double_log_ratio"], [2 * lam, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="K, K"):
        el.locality_statistics(np.ones((3, 2)))


def test_fraction_chance_is_one_over_k_under_exchangeability():
    """Rows of K iid continuous values: P(the same-class value is the row's largest) = 1/K.
    20,000 random 3 x 3 matrices: binomial standard error 0.0033; tolerance 4 of them."""
    rng = np.random.default_rng(0)
    S = rng.lognormal(size=(20000, 3, 3))
    st = el.locality_statistics(S)
    frac = st["frac_same_exceeds"].mean()
    se = math.sqrt((1 / 3) * (2 / 3) / S.shape[0] / 3)
    assert abs(frac - 1 / 3) < 4 * se * math.sqrt(3)
    # and the double log-ratio is centred at 0
    d = st["double_log_ratio"]
    assert abs(d.mean()) < 4 * d.std() / math.sqrt(len(d))


def test_bootstrap_class_means_and_band():
    y = np.repeat([0, 1, 2], 4)
    rng = np.random.default_rng(1)
    S = rng.lognormal(size=(12, 12)) + 3 * (y[:, None] == y[None, :])
    boot = el.bootstrap_class_means(S, y, n_boot=300, seed=0)
    assert boot.shape == (300, 3, 3)
    # each replicate is a class-pair mean over resampled examples: within the range of the block
    for a, b in itertools.product(range(3), range(3)):
        blk = S[y == a][:, y == b]
        v = boot[:, a, b][~np.isnan(boot[:, a, b])]
        assert v.min() >= blk.min() - 1e-12 and v.max() <= blk.max() + 1e-12
    # duplicated draws do not add x = x' pairs: with a huge diagonal, the replicates' same-class
    # means stay at the full mean in expectation (counting duplicates as pairs would inflate
    # them by about 1000 (n - 1) / n^2 = 190 here); 2,000 replicates, sd of their mean < 1
    S2 = S.copy()
    np.fill_diagonal(S2, 1000.0)
    full2 = el.class_pair_means(torch.as_tensor(S2), torch.as_tensor(y), exclude_self=False).numpy()
    boot2 = el.bootstrap_class_means(S2, y, n_boot=2000, seed=0)
    ok = ~np.isnan(boot2).any(axis=(1, 2))       # a class drawn as one example 4 times: nan
    assert 0.9 < ok.mean() < 1.0
    se = boot2[ok].std(0) / math.sqrt(ok.sum())
    assert (np.abs(boot2[ok].mean(0) - full2) < 4 * se + 1e-9).all()
    # one replicate by hand (the block formula of the docstring)
    rng2 = np.random.default_rng(0)
    draws = [rng2.integers(0, 4, size=(2000, 4)) for _ in range(3)]
    b0 = int(np.flatnonzero(ok)[0])
    c = np.zeros(12)
    for cls in range(3):
        np.add.at(c, np.flatnonzero(y == cls)[draws[cls][b0]], 1.0)
    for a in range(3):
        ca = np.where(y == a, c, 0.0)
        for b in range(3):
            cb = np.where(y == b, c, 0.0)
            want = ca @ S2 @ cb / (ca.sum() * cb.sum())
            if a == b:
                n = ca.sum()
                self_mean = (ca * np.diag(S2)).sum() / n
                distinct = (ca @ S2 @ ca - (ca ** 2 * np.diag(S2)).sum()) / (n ** 2 - (ca ** 2).sum())
                want = self_mean / n + (1 - 1 / n) * distinct
            assert boot2[b0, a, b] == pytest.approx(want, rel=1e-12)
    band = el.locality_band(S, y, n_boot=300, seed=0)
    est, lo, hi = band["double_log_ratio"]
    assert lo <= est <= hi and est > 0.5
    with pytest.raises(ValueError, match="labels"):
        el.bootstrap_class_means(S[:5], y)


# --------------------------------------------------------------------------------------------
# chance level of the clustering score
# --------------------------------------------------------------------------------------------
def _enumerated_chance(n1, n2, kind):
    n = n1 + n2
    truth = np.array([0] * n1 + [1] * n2)
    scores, weights = [], []
    if kind == "balanced":   # every split into clusters of the class sizes, equally likely
        labellings = []
        for cl in itertools.combinations(range(n), n1):
            lab = np.ones(n, dtype=int)
            lab[list(cl)] = 0
            labellings.append(lab)
    else:                    # every item in either cluster with probability 1/2
        labellings = [np.array(lab) for lab in itertools.product([0, 1], repeat=n)]
    for lab in labellings:
        scores.append(0.5 + abs(np.mean(lab == truth) - 0.5))
        weights.append(1.0)
    s, w = np.array(scores), np.array(weights) / np.sum(weights)
    mean = float((s * w).sum())
    return mean, float(np.sqrt((w * (s - mean) ** 2).sum()))


@pytest.mark.parametrize("sizes", [(3, 3), (4, 2), (5, 4)])
@pytest.mark.parametrize("kind", ["balanced", "binomial"])
def test_clustering_chance_exact(sizes, kind):
    ch = el.clustering_chance(sizes, kind)
    mean, sd = _enumerated_chance(*sizes, kind)
    assert ch["mean"] == pytest.approx(mean, abs=1e-12)
    assert ch["sd"] == pytest.approx(sd, abs=1e-12)


def test_clustering_chance_large_sample():
    ch = el.clustering_chance((500, 500))
    # normal approximation: A = 2X, sd(X) = sqrt(500 * 0.25 * 500 / 999)
    sd_acc = 2 * math.sqrt(500 * 0.25 * 500 / 999) / 1000
    assert ch["mean"] == pytest.approx(0.5 + sd_acc * math.sqrt(2 / math.pi), abs=5e-4)
    assert ch["q95"] > ch["mean"]
    with pytest.raises(ValueError, match="two classes"):
        el.clustering_chance((3, 3, 3))
    with pytest.raises(ValueError, match="kind"):
        el.clustering_chance((3, 3), "uniform")


# --------------------------------------------------------------------------------------------
# the two-layer NTK: exact empirical form and the closed-form expectation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", None])
def test_two_layer_ntk_matches_a_wide_network(activation):
    """A width-m network with Gaussian weights of PyTorch's variances: its empirical NTK is a sum
    of m iid unit terms, so it differs from the closed-form expectation by about sqrt(m) times
    the unit terms' sd; every entry must lie within 5 such standard errors."""
    from lesde.nets import MLP

    d, m = 6, 20000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, d, generator=g, dtype=DT)
    net = MLP(d, hidden=(m,), num_classes=1, activation=activation).to(DT)
    with torch.no_grad():
        net.layers[0].weight.normal_(0, math.sqrt(1 / (3 * d)), generator=g)
        net.layers[0].bias.normal_(0, math.sqrt(1 / (3 * d)), generator=g)
        net.head.weight.normal_(0, math.sqrt(1 / (3 * m)), generator=g)
    emp = el.mlp_ntk(net, x)
    theory = el.two_layer_ntk(x, activation=activation, width=m)
    # per-unit terms t_r(x, x') = h_r h'_r + a_r^2 g_r g'_r (x.x' + 1)
    u = x @ net.layers[0].weight.detach().T + net.layers[0].bias.detach()
    h = F.relu(u) if activation == "relu" else u
    gd = (u > 0).to(DT) if activation == "relu" else torch.ones_like(u)
    a2 = net.head.weight.detach()[0] ** 2
    terms = h[:, None, :] * h[None, :, :] + a2 * gd[:, None, :] * gd[None, :, :] * (x @ x.T + 1)[:, :, None]
    se = terms.std(-1) * math.sqrt(m)
    assert ((emp - theory).abs() < 5 * se).all()
    assert (se.max() / theory.abs().max()) < 0.02    # the check is not vacuous
    # the limit is Theta_m / m: they differ by [1 + Sigma_dot (x.x' + 1) / 3] / m, Sigma_dot <= 1
    lim = el.two_layer_ntk(x, activation=activation)
    gap = (theory / m - lim).abs()
    assert (gap <= (1 + ((x @ x.T).abs() + 1) / 3) / m + 1e-15).all() and (gap > 0).all()


def test_two_layer_ntk_relu_closed_form_values():
    """ReLU: Sigma(x, x) = k(x, x) / 2, Sigma(x, -x) = 0 without bias, Sigma_dot(x, x) = 1/2."""
    x = torch.tensor([[1.0, 2.0, -0.5]], dtype=DT)
    both = torch.cat([x, -x])
    sig = el.two_layer_ntk(both, activation="relu", bias=False)
    k = (x ** 2).sum() / 9
    torch.testing.assert_close(sig[0, 0], k / 2)
    assert abs(float(sig[0, 1])) < 1e-15
    th = el.two_layer_ntk(both, activation="relu", bias=False, width=100)
    torch.testing.assert_close(th[0, 0], 100 * k / 2 + 1 + 0.5 * (x ** 2).sum() / 3)
    with pytest.raises(ValueError, match="relu"):
        el.two_layer_ntk(x, activation="tanh")


def test_mlp_ntk_is_the_empirical_ntk():
    from lesde.nets import MLP

    torch.manual_seed(0)
    x = torch.randn(6, 4, dtype=DT)
    for act, kw, q in (("relu", None, 1), ("tanh", None, 3), ("elephant", {"a": 0.5}, 1),
                       (None, None, 2)):
        net = MLP(4, hidden=(9,), num_classes=q, activation=act, activation_kwargs=kw).to(DT)
        ref = el.empirical_ntk(net, x)
        got = el.mlp_ntk(net, x)
        torch.testing.assert_close(got, ref[:, :, 0, 0] if q == 1 else ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="one hidden layer"):
        el.mlp_ntk(MLP(4, hidden=(3, 3), num_classes=1), x)


def test_ntk_train_mse_closed_form():
    """Linear dynamics: f_T = (I - (I - lr Theta / N)^T) y from f = 0."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=DT)
    theta = a @ a.T + torch.eye(6, dtype=DT)
    y = torch.randn(6, generator=g, dtype=DT)
    f = el.ntk_train(theta, y, lr=0.5, epochs=7, batch_size=3, loss="mse")
    steps = 7 * 2
    step = torch.eye(6, dtype=DT) - 0.5 / 6 * theta
    expected = (torch.eye(6, dtype=DT) - torch.linalg.matrix_power(step, steps)) @ y
    torch.testing.assert_close(f, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(FloatingPointError, match="diverged"):
        el.ntk_train(theta * 1e4, y, lr=1.0, epochs=500, batch_size=6, loss="mse")


def test_ntk_cluster_pair_uses_the_kernel():
    """Logits: S_rel of the closed-form kernel; probabilities: sigma' of the trained linearised
    logits; both symmetrised."""
    g = torch.Generator().manual_seed(0)
    xp = torch.randn(20, 5, generator=g, dtype=DT) + torch.repeat_interleave(
        torch.tensor([[2.0, 0, 0, 0, 0], [-2.0, 0, 0, 0, 0]], dtype=DT), 10, 0)
    yp = np.repeat([0, 1], 10)
    xa = torch.randn(10, 5, generator=g, dtype=DT)
    res = el.ntk_cluster_pair(xp, yp, xa, width=math.inf, output="logits", baselines=False)
    K = el.two_layer_ntk(xp)
    torch.testing.assert_close(res.s_rel, el.symmetrize(K / K.diagonal()[:, None]))
    res_p = el.ntk_cluster_pair(xp, yp, xa, width=1000, output="probabilities", lr=0.01,
                                epochs=20, batch_size=10, baselines=False)
    theta = el.two_layer_ntk(torch.cat([xp, xa]), width=1000)
    f = el.ntk_train(theta, torch.cat([torch.ones(20), torch.zeros(10)]), lr=0.01, epochs=20,
                     batch_size=10)
    rel, _ = el.kernel_similarities(theta[:20, :20], f[:20], "probabilities")
    torch.testing.assert_close(res_p.s_rel, el.symmetrize(rel))
    # any given kernel in place of the closed form (here the same one)
    res_t = el.ntk_cluster_pair(xp, yp, xa, output="probabilities", lr=0.01, epochs=20,
                                batch_size=10, baselines=False, theta=theta)
    torch.testing.assert_close(res_t.s_rel, res_p.s_rel)
    with pytest.raises(ValueError, match="primary, then auxiliary"):
        el.ntk_cluster_pair(xp, yp, xa, theta=theta[:5, :5])
    with pytest.raises(ValueError, match="finite width"):
        el.ntk_cluster_pair(xp, yp, xa, width=math.inf, output="probabilities")


# --------------------------------------------------------------------------------------------
# the probability output of a real network: NTK path, explicit steps and the fast MLP path
# --------------------------------------------------------------------------------------------
def test_probability_output_paths_agree():
    from lesde.nets import MLP

    torch.manual_seed(4)
    net = MLP(4, hidden=(16,), num_classes=1, activation="tanh").to(DT)
    x = torch.randn(8, 4, dtype=DT)
    y = torch.ones(8)
    ntk = el.one_step_changes(net, x, y, loss="bce", output="probabilities")
    z = net(x).detach().reshape(-1)
    rel, ker = el.kernel_similarities(el.mlp_ntk(net, x), z, "probabilities")
    torch.testing.assert_close(ntk.relative(), rel, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ntk.kernelized(), ker, rtol=1e-9, atol=1e-12)
    errs = []
    for eta in (1e-2, 1e-3, 1e-4):
        st = el.one_step_changes(net, x, y, lr=eta, method="step", loss="bce", output="probabilities")
        errs.append(float((st.relative() - rel).abs().max()))
    assert errs[1] < 0.2 * errs[0] and errs[2] < 0.2 * errs[1]    # O(eta)
    # softmax probabilities have no kernelized similarity
    net3 = MLP(4, hidden=(8,), num_classes=3).to(DT)
    ch = el.one_step_changes(net3, x, torch.arange(8) % 3, output="probabilities")
    with pytest.raises(ValueError, match="softmax"):
        ch.kernelized()
    with pytest.raises(ValueError, match="output"):
        el.one_step_changes(net3, x, torch.arange(8) % 3, output="probs")
