"""The networks local-elasticity measurements add to lesde.nets: the elephant activation (Lan &
Mahmood, arXiv 2310.01365) and ResNet-18 in the ImageNet layout without BatchNorm (Dan et al.)."""
import math

import pytest
import torch
import torch.nn.functional as F

from lesde.nets import MLP, Elephant, ResNet18ImageNet, elephant

DT = torch.float64


def test_elephant_values_and_gradient():
    x = torch.tensor([0.0, 0.5, 1.0, -2.0, 3.0], dtype=DT)
    torch.testing.assert_close(elephant(x), 1 / (1 + x.abs() ** 4))
    torch.testing.assert_close(elephant(x, a=2.0, d=2.0, h=3.0), 3 / (1 + (x / 2) ** 2))
    assert float(elephant(torch.tensor(0.7, dtype=DT), a=0.7)) == pytest.approx(0.5)  # half-width
    xg = torch.linspace(-3, 3, 13, dtype=DT).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: elephant(t, 0.7, 4.0, 1.3), (xg,))
    # far out: value and gradient vanish without inf / inf
    big = torch.tensor([1e10, -1e30, 1e300], dtype=DT, requires_grad=True)
    out = elephant(big, d=8.0)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(big.grad).all()
    assert float(out.detach().max()) < 1e-70
    # sparse gradients: the derivative is small away from the bump
    g = torch.autograd.grad(elephant(xg).sum(), xg)[0]
    assert float(g.abs()[xg.abs() > 2.5].max()) < 0.05 * float(g.abs().max())
    with pytest.raises(ValueError, match="a, d, h"):
        Elephant(a=0.0)
    assert "a=0.5" in repr(Elephant(a=0.5))


def test_mlp_elephant_parameters_and_bias_spread():
    net = MLP(3, hidden=(5,), num_classes=1, activation="elephant", activation_kwargs={"a": 0.5, "d": 2})
    x = torch.randn(4, 3)
    u = net.layers[0](x)
    torch.testing.assert_close(net.features(x), 1 / (1 + (u / 0.5) ** 2))
    spread = MLP(3, hidden=(7,), num_classes=1, activation="elephant", bias_spread=2.0)
    half = math.sqrt(3) * 2.0
    torch.testing.assert_close(spread.layers[0].bias.detach(), torch.linspace(-half, half, 7))
    with pytest.raises(ValueError, match="takes parameters"):
        MLP(3, activation="relu", activation_kwargs={"a": 1.0})
    with pytest.raises(ValueError, match="a, d, h"):
        MLP(3, activation="elephant", activation_kwargs={"d": -1.0})
    with pytest.raises(ValueError, match="bias_spread"):
        MLP(3, hidden=(), activation="elephant", bias_spread=1.0)
    # per-example gradients through the activation (torch.func) work
    from lesde.elasticity import empirical_ntk

    K = empirical_ntk(net.double(), torch.randn(3, 3, dtype=DT))
    assert K.shape == (3, 3, 1, 1) and torch.isfinite(K).all()


def test_resnet18_imagenet_layout():
    net = ResNet18ImageNet(num_classes=3)
    # torchvision's ResNet-18 (11,689,512 parameters with 1,000 classes) less 9,600 BatchNorm
    # parameters and the 1,000-way head (513,000), plus a 3-way head (1,539)
    assert sum(p.numel() for p in net.parameters()) == 11_689_512 - 9_600 - 513_000 + 1_539
    assert all(m.bias is None for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    small = ResNet18ImageNet(num_classes=4, width=0.125)
    x = torch.randn(2, 3, 32, 32)
    z, out = small.forward_features(x)
    assert z.shape == (2, 64) and out.shape == (2, 4)
    # the stem and max pool leave 8x8 maps for the first stage
    stem = F.max_pool2d(F.relu(small.stem(x)), 3, stride=2, padding=1)
    assert stem.shape[-2:] == (8, 8)
    # training mode and evaluation mode are the same function (no BatchNorm, no dropout)
    small.train()
    a = small(x)
    small.eval()
    torch.testing.assert_close(a, small(x))
