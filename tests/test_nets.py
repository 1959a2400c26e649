"""Tests of lesde.nets: shapes, parameter counts, head/feature split, linearity of the linear
MLP, per-example gradients through torch.func, a tiny overfit, and the name registry."""
import json
import time

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, vmap

from lesde.nets import MLP, NETS, FeatureNet, LeNet, ResNet18, ResNet20, build_net


def _n_params(net):
    return sum(p.numel() for p in net.parameters())


# --------------------------------------------------------------------------------------------
# independent parameter counts, from the layer formulas
# --------------------------------------------------------------------------------------------
def _conv(c_in, c_out, k, bias):
    return c_in * c_out * k * k + (c_out if bias else 0)


def _bn(c, batchnorm):
    return 2 * c if batchnorm else 0


def _linear(n_in, n_out):
    return n_in * n_out + n_out


def _count_resnet(widths, blocks, num_classes, in_channels, batchnorm, projection):
    """Parameters of a CIFAR ResNet: stem, BasicBlocks, head (projection or zero-pad shortcut)."""
    bias = not batchnorm
    total = _conv(in_channels, widths[0], 3, bias) + _bn(widths[0], batchnorm)
    c_in = widths[0]
    for i, (c, n) in enumerate(zip(widths, blocks)):
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            total += _conv(c_in, c, 3, bias) + _bn(c, batchnorm)
            total += _conv(c, c, 3, bias) + _bn(c, batchnorm)
            if projection and (stride != 1 or c_in != c):
                total += _conv(c_in, c, 1, bias) + _bn(c, batchnorm)
            c_in = c
    return total + _linear(c_in, num_classes)


def test_resnet18_parameter_count():
    widths = (64, 128, 256, 512)
    expected = _count_resnet(widths, (2, 2, 2, 2), 10, 3, True, projection=True)
    assert expected == 11_173_962  # the commonly quoted count of CIFAR ResNet-18
    assert _n_params(ResNet18()) == expected
    no_bn = _count_resnet(widths, (2, 2, 2, 2), 10, 3, False, projection=True)
    assert _n_params(ResNet18(batchnorm=False)) == no_bn
    quarter = _count_resnet((16, 32, 64, 128), (2, 2, 2, 2), 3, 1, True, projection=True)
    assert _n_params(ResNet18(num_classes=3, width=0.25, in_channels=1)) == quarter


def test_resnet20_parameter_count():
    expected = _count_resnet((16, 32, 64), (3, 3, 3), 10, 3, True, projection=False)
    assert expected == 269_722  # He et al.'s "0.27 M" (option A shortcuts have no parameters)
    assert _n_params(ResNet20()) == expected
    no_bn = _count_resnet((16, 32, 64), (3, 3, 3), 10, 3, False, projection=False)
    assert _n_params(ResNet20(batchnorm=False)) == no_bn
    half = _count_resnet((8, 16, 32), (3, 3, 3), 5, 3, True, projection=False)
    assert _n_params(ResNet20(num_classes=5, width=0.5)) == half


def test_lenet_parameter_count():
    expected = (
        _conv(3, 6, 5, True) + _conv(6, 16, 5, True) + _linear(400, 120) + _linear(120, 84)
        + _linear(84, 3)
    )
    assert expected == 61_411
    assert _n_params(LeNet()) == expected


# --------------------------------------------------------------------------------------------
# shapes and the feature/head split
# --------------------------------------------------------------------------------------------
_CASES = {
    "resnet18_w025": (lambda: ResNet18(num_classes=3, width=0.25), (2, 3, 32, 32), 128),
    "resnet18_nobn": (lambda: ResNet18(num_classes=4, width=0.125, batchnorm=False),
                      (2, 3, 16, 16), 64),
    "resnet18_grey": (lambda: ResNet18(num_classes=3, width=0.0625, in_channels=1),
                      (2, 1, 32, 32), 32),
    "resnet20": (lambda: ResNet20(num_classes=10), (2, 3, 32, 32), 64),
    "resnet20_w05": (lambda: ResNet20(num_classes=3, width=0.5), (2, 3, 32, 32), 32),
    "lenet": (lambda: LeNet(num_classes=3), (2, 3, 32, 32), 84),
    "lenet_grey": (lambda: LeNet(num_classes=5, in_channels=1), (2, 1, 32, 32), 84),
    "mlp": (lambda: MLP(12, hidden=(16, 8), num_classes=3), (2, 3, 4), 8),
    "mlp_linear": (lambda: MLP(12, hidden=(16,), num_classes=1, activation=None), (2, 12), 16),
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_shapes_and_head_split(case):
    make, shape, feature_dim = _CASES[case]
    torch.manual_seed(0)
    net = make().eval()
    assert isinstance(net, FeatureNet)
    assert net.feature_dim == feature_dim
    x = torch.randn(*shape)
    z, logits = net.forward_features(x)
    assert z.shape == (shape[0], feature_dim)
    assert logits.shape == (shape[0], net.num_classes)
    assert torch.equal(net.features(x), z)
    assert torch.equal(net(x), logits)
    assert torch.equal(net.head(z), logits)


@pytest.mark.parametrize("make", [
    lambda: ResNet18(num_classes=3, width=0.0625),
    lambda: ResNet20(num_classes=3, width=0.25, batchnorm=False),
    lambda: LeNet(),
    lambda: MLP(12, hidden=(8,), activation="gelu"),
])
def test_float32_and_float64(make):
    torch.manual_seed(0)
    net = make().eval()
    shape = (2, 12) if isinstance(net, MLP) else (2, 3, 32, 32)
    x = torch.randn(*shape)
    y32 = net(x)
    assert y32.dtype == torch.float32
    y64 = net.double()(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y32, rtol=1e-4, atol=1e-5)


def test_resnet_width_rounding():
    assert ResNet18(width=0.01).feature_dim == 5  # round(5.12); channels 1-1-3-5
    assert ResNet20(width=0.01).feature_dim == 1  # at least one channel
    assert ResNet20(width=2).feature_dim == 128


# --------------------------------------------------------------------------------------------
# the MLP
# --------------------------------------------------------------------------------------------
def test_linear_mlp_is_affine():
    torch.manual_seed(0)
    net = MLP(6, hidden=(32, 32), num_classes=3, activation=None).double()
    x1, x2 = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    zero = torch.zeros(5, 6, dtype=torch.float64)
    torch.testing.assert_close(net(x1) + net(x2) - net(zero), net(x1 + x2), rtol=0, atol=1e-12)
    a, b = 0.3, -1.7
    lhs = net(a * x1 + b * x2) - net(zero)
    rhs = a * (net(x1) - net(zero)) + b * (net(x2) - net(zero))
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-12)
    # the same net with a nonlinearity is not affine
    relu = MLP(6, hidden=(32, 32), num_classes=3, activation="relu").double()
    assert (relu(x1) + relu(x2) - relu(zero) - relu(x1 + x2)).abs().max() > 1e-3


def test_linear_mlp_without_bias_is_linear():
    torch.manual_seed(0)
    net = MLP(4, hidden=(8,), num_classes=2, activation="linear", bias=False).double()
    assert all(name.endswith("weight") for name, _ in net.named_parameters())
    x1, x2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(net(2 * x1 - x2), 2 * net(x1) - net(x2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "linear", None, "ReLU"])
def test_mlp_activations(activation):
    net = MLP(3, hidden=(5,), num_classes=2, activation=activation)
    assert net(torch.randn(4, 3)).shape == (4, 2)


def test_mlp_errors():
    with pytest.raises(ValueError, match="activation"):
        MLP(3, activation="softplus")
    with pytest.raises(ValueError, match="entries"):
        MLP(3)(torch.randn(2, 4))


# --------------------------------------------------------------------------------------------
# per-example gradients with torch.func
# --------------------------------------------------------------------------------------------
_PER_EXAMPLE = {
    "mlp": (lambda: MLP(10, hidden=(16, 16), num_classes=3, activation="tanh"), (4, 10)),
    "lenet": (lambda: LeNet(num_classes=3), (4, 3, 32, 32)),
    "resnet18_nobn": (lambda: ResNet18(num_classes=3, width=0.0625, batchnorm=False),
                      (4, 3, 16, 16)),
    "resnet18_bn_eval": (lambda: ResNet18(num_classes=3, width=0.0625), (3, 3, 16, 16)),
    "resnet20_nobn": (lambda: ResNet20(num_classes=3, width=0.25, batchnorm=False),
                      (3, 3, 16, 16)),
}


@pytest.mark.parametrize("case", sorted(_PER_EXAMPLE))
def test_per_example_gradients_match_backward_loop(case):
    make, shape = _PER_EXAMPLE[case]
    torch.manual_seed(0)
    net = make().double()
    if "bn_eval" in case:
        # give the running statistics non-trivial values, then measure in eval mode
        with torch.no_grad():
            net.train()(torch.randn(8, *shape[1:], dtype=torch.float64))
    net.eval()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, net.num_classes, (shape[0],))
    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = {k: v.detach() for k, v in net.named_buffers()}

    def loss(p, xi, yi):
        logits = functional_call(net, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(logits, yi.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

    for i in range(shape[0]):
        net.zero_grad()
        F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in net.named_parameters():
            torch.testing.assert_close(per_example[name][i], p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["mlp", "resnet18_nobn"])
def test_per_example_jacobians_of_logits(case):
    """vmap(jacrev) of the logits over the parameters (what the empirical NTK needs) equals one
    backward pass per example and output."""
    make, shape = _PER_EXAMPLE[case]
    torch.manual_seed(0)
    net = make().double().eval()
    x = torch.randn(2, *shape[1:], dtype=torch.float64)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def logits(p, xi):
        return functional_call(net, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(logits), in_dims=(None, 0))(params, x)
    for i in range(2):
        for k in range(net.num_classes):
            net.zero_grad()
            net(x[i : i + 1])[0, k].backward()
            for name, p in net.named_parameters():
                torch.testing.assert_close(jac[name][i, k], p.grad, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def _overfit(net, x, y, steps, lr):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for step in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        if step % 25 == 24:
            net.eval()
            with torch.no_grad():
                acc = (net(x).argmax(1) == y).float().mean().item()
            net.train()
            if acc == 1.0:
                return step + 1, acc
    return steps, acc


def test_lenet_overfits_random_labels():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)
    net = LeNet(num_classes=3)
    t0 = time.perf_counter()
    steps, acc = _overfit(net, x, y, steps=300, lr=1e-3)
    assert acc == 1.0, f"train accuracy {acc} after {steps} steps"
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize("make", [
    lambda: ResNet20(num_classes=4, width=0.25),
    lambda: ResNet20(num_classes=4, width=0.25, batchnorm=False),
    lambda: ResNet18(num_classes=4, width=0.125, batchnorm=False),
])
def test_resnets_overfit_random_labels(make):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    x = torch.randn(16, 3, 16, 16, generator=gen)
    y = torch.randint(0, 4, (16,), generator=gen)
    steps, acc = _overfit(make(), x, y, steps=300, lr=1e-3)
    assert acc == 1.0, f"train accuracy {acc} after {steps} steps"


def test_resnet18_without_batchnorm_trains_with_plain_sgd():
    """The residual down-scaling at initialisation keeps the BatchNorm-free net trainable by
    plain SGD over a range of learning rates (no divergence, loss falls)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 16, 16, generator=gen)
    y = torch.randint(0, 4, (16,), generator=gen)
    for lr in (0.1, 0.01):
        torch.manual_seed(1)
        net = ResNet18(num_classes=4, width=0.125, batchnorm=False)
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        first = F.cross_entropy(net(x), y).item()
        for _ in range(100):
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
        assert torch.isfinite(loss)
        assert loss.item() < 0.1 * first


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
def test_build_net_by_name_from_json():
    assert set(NETS) == {"resnet18", "resnet20", "lenet", "mlp"}
    configs = [
        {"name": "resnet18", "num_classes": 3, "width": 0.0625, "batchnorm": False},
        {"name": "ResNet20", "num_classes": 2, "width": 0.25},
        {"name": "lenet", "num_classes": 3, "in_channels": 1},
        {"name": "mlp", "num_classes": 2, "in_dim": 3, "hidden": [64], "activation": None},
    ]
    for cfg in json.loads(json.dumps(configs)):
        net = build_net(cfg.pop("name"), **cfg)
        assert isinstance(net, NETS[type(net).__name__.lower()])
        assert net.num_classes == cfg["num_classes"]
    assert build_net("mlp", 2, in_dim=3, hidden=[64]).hidden == (64,)


def test_build_net_unknown_name():
    with pytest.raises(ValueError, match="lenet, mlp, resnet18, resnet20"):
        build_net("vgg11", num_classes=10)
