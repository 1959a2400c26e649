"""Networks whose penultimate features are logged during training.

Every network is a :class:`FeatureNet`: a feature map ``features(x) -> (B, feature_dim)`` (the
penultimate layer) followed by one linear ``head`` ``(B, feature_dim) -> (B, num_classes)``.
``forward_features`` returns both in one pass, which is what the training logger records per
sample (Zhang, Wang & Su, NeurIPS 2021, arXiv 2110.05960, track features and logits of every
training example).

Networks
--------
- :class:`ResNet18` -- the CIFAR variant of ResNet-18 (He, Zhang, Ren & Sun, CVPR 2016,
  arXiv 1512.03385), optionally without BatchNorm as in Dan, Mukherjee, Das & Gampa
  (arXiv 2111.01166).
- :class:`ResNet20` -- the CIFAR ResNet-20 of He et al. (2016), section 4.2.
- :class:`LeNet` -- the LeNet-style net of Zhang, Wang & Su (2021).
- :class:`MLP` -- a fully connected net; ``activation=None`` gives the linear control model of
  He & Su (ICLR 2020, arXiv 1910.06943); ``activation="elephant"`` the elephant activation of
  Lan & Mahmood (arXiv 2310.01365, :func:`elephant`).
- :class:`ResNet18ImageNet` -- ResNet-18 in its ImageNet layout (7x7 stride-2 stem and max pool)
  without BatchNorm and without convolution biases, the network of Dan, Gampa & Mukherjee's
  local-elasticity tracking (arXiv 2111.01166).

:func:`build_net` builds any of them by name from a JSON-able configuration; :data:`NETS` is the
registry it reads.

Per-example gradients and ``torch.func``
----------------------------------------
All networks work with ``torch.func.functional_call`` combined with ``vmap`` and ``grad`` /
``jacrev`` / ``vjp`` over their parameters (no in-place operations on activations). BatchNorm in
*train* mode is not a per-example function: it mixes the examples of a batch and updates its
running statistics in place, so it cannot be vmapped per example. Do per-example measurements
(gradients, empirical NTK, one-step probes) in eval mode (``net.eval()``, BatchNorm then uses its
running statistics, passed as buffers to ``functional_call``) or with ``batchnorm=False``::

    net.eval()
    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = {k: v.detach() for k, v in net.named_buffers()}

    def loss(p, x, y):  # one example; x without its batch dimension
        logits = torch.func.functional_call(net, (p, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
    # grads[name] has shape (B, *param.shape)

Both float32 and float64 work (``net.double()``).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeatureNet", "ResNet18", "ResNet18ImageNet", "ResNet20", "LeNet", "MLP", "Elephant",
           "elephant", "NETS", "build_net"]


# --------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------
class FeatureNet(nn.Module):
    """A network split into a feature map and a linear head.

    Subclasses set ``self.feature_dim`` and ``self.num_classes``, own
    ``self.head = nn.Linear(feature_dim, num_classes)`` and implement :meth:`features`.

    Attributes
    ----------
    feature_dim : int
        Width p of the penultimate layer.
    num_classes : int
        Number of outputs K.
    head : nn.Linear
        The last layer, ``(B, p) -> (B, K)``.
    """

    feature_dim: int
    num_classes: int
    head: nn.Linear

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``(B, feature_dim)`` of inputs ``x`` (batch first)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` = ``head(features(x))``."""
        return self.head(self.features(x))

    def forward_features(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Features ``(B, feature_dim)`` and logits ``(B, num_classes)`` in one pass."""
        z = self.features(x)
        return z, self.head(z)


# --------------------------------------------------------------------------------------------
# residual networks
# --------------------------------------------------------------------------------------------
def _scaled(c: int, width: float) -> int:
    """Channel count ``c * width``, rounded, at least 1."""
    return max(1, int(round(c * width)))


def _positive_int(name: str, value) -> int:
    """``value`` as an int >= 1 (numpy integers and integral floats accepted), else ValueError."""
    try:
        ok = not isinstance(value, bool) and float(value) == int(value) and int(value) >= 1
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _width(value) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        w = float("nan")
    if isinstance(value, bool) or not (math.isfinite(w) and w > 0):
        raise ValueError(f"width must be a positive number (a channel multiplier), got {value!r}")
    return w


def _norm(c: int, batchnorm: bool) -> nn.Module:
    return nn.BatchNorm2d(c) if batchnorm else nn.Identity()


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut (He et al. 2016, figure 2).

    ``(B, c_in, H, W) -> (B, c_out, H / stride, W / stride)``::

        out = relu( bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x) )

    ``shortcut`` is the identity when the shape is kept. Otherwise it is ``"conv"`` (option B of
    the paper: 1x1 convolution with stride, plus BatchNorm) or ``"pad"`` (option A: subsample by
    ``stride`` and pad the new channels with zeros; no parameters).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, batchnorm: bool, shortcut: str):
        super().__init__()
        bias = not batchnorm
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = _norm(c_out, batchnorm)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=bias)
        self.bn2 = _norm(c_out, batchnorm)
        self.stride = stride
        self.pad = 0
        self.shortcut: Optional[nn.Module] = None
        if stride != 1 or c_in != c_out:
            if shortcut == "conv":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias), _norm(c_out, batchnorm)
                )
            elif shortcut == "pad":
                if c_out < c_in:
                    raise ValueError("shortcut='pad' needs c_out >= c_in")
                self.pad = c_out - c_in
            else:
                raise ValueError(f"shortcut must be 'conv' or 'pad', got {shortcut!r}")

    def _skip(self, x: Tensor) -> Tensor:
        if self.shortcut is not None:
            return self.shortcut(x)
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad))
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._skip(x))


class _CifarResNet(FeatureNet):
    """Stem conv 3x3 (stride 1) -> stages of :class:`_BasicBlock` -> global average pool -> head.

    Initialisation (He et al. 2015, arXiv 1502.01852, as used by He et al. 2016): every
    convolution is drawn from N(0, 2 / fan_in), biases are zero, BatchNorm has weight 1 and
    bias 0; the head keeps PyTorch's default.

    Without BatchNorm (``batchnorm=False``) the convolutions get biases, and the residual scale is
    kept sensible by the initialisation alone: the second convolution of every residual branch is
    drawn with standard deviation multiplied by ``1 / sqrt(n_blocks)``. Each block then adds a
    branch of second moment about ``1 / n_blocks`` of its input's (the 1x1 projection shortcuts,
    followed by the block's ReLU, keep the He gain), so the forward second moment stays O(1)
    through the whole network at initialisation (the idea behind Fixup, Zhang, Dauphin & Ma,
    ICLR 2019, without Fixup's extra scalar parameters). No other normalisation is added, and the
    parameter count is exactly that of the BatchNorm network minus BatchNorm plus conv biases.
    """

    def __init__(
        self,
        widths: Sequence[int],
        blocks: Sequence[int],
        num_classes: int,
        in_channels: int,
        batchnorm: bool,
        shortcut: str,
    ):
        super().__init__()
        self.num_classes = _positive_int("num_classes", num_classes)
        in_channels = _positive_int("in_channels", in_channels)
        self.batchnorm = bool(batchnorm)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=not batchnorm)
        self.stem_bn = _norm(widths[0], batchnorm)
        layers = []
        c_in = widths[0]
        for i, (c, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(_BasicBlock(c_in, c, stride, batchnorm, shortcut))
                c_in = c
        self.blocks = nn.Sequential(*layers)
        self.feature_dim = c_in
        self.head = nn.Linear(self.feature_dim, self.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        branch_scale = 1.0 if self.batchnorm else 1.0 / math.sqrt(len(self.blocks))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if not self.batchnorm:
            with torch.no_grad():
                for block in self.blocks:
                    block.conv2.weight.mul_(branch_scale)

    def features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, feature_dim)``: stem, residual stages, global average pool."""
        out = F.relu(self.stem_bn(self.stem(x)))
        out = self.blocks(out)
        return out.mean(dim=(2, 3))


class ResNet18(_CifarResNet):
    """ResNet-18, CIFAR variant (He, Zhang, Ren & Sun, CVPR 2016, arXiv 1512.03385).

    Architecture, for inputs ``(B, in_channels, 32, 32)`` and ``w = width``::

        conv 3x3, 64w, stride 1 (+BN) + ReLU          -> (B,  64w, 32, 32)   no max-pool
        2 BasicBlocks,  64w                           -> (B,  64w, 32, 32)
        2 BasicBlocks, 128w, first with stride 2      -> (B, 128w, 16, 16)
        2 BasicBlocks, 256w, first with stride 2      -> (B, 256w,  8,  8)
        2 BasicBlocks, 512w, first with stride 2      -> (B, 512w,  4,  4)
        global average pool = features                -> (B, 512w)
        head: Linear(512w, num_classes)               -> (B, num_classes)

    Channel counts are ``round(c * width)``, at least 1; ``feature_dim = round(512 * width)``.
    Shortcuts that change the shape are 1x1 convolutions with stride (+BN) (option B). Any input
    size works (the pool is global). At width 1 with 10 classes: 11,173,962 parameters.

    Parameters
    ----------
    num_classes : int
        Number of outputs K.
    width : float
        Channel multiplier (1.0: 64-128-256-512).
    in_channels : int
        Input channels (3 for CIFAR, 1 for grey images).
    batchnorm : bool
        ``False`` removes every BatchNorm, as Dan et al. (arXiv 2111.01166) do; the convolutions
        then have biases and the residual branches are down-scaled at initialisation (see
        :class:`_CifarResNet`) so that the network trains without any normalisation.
    """

    def __init__(
        self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3,
        batchnorm: bool = True,
    ):
        width = _width(width)
        widths = [_scaled(c, width) for c in (64, 128, 256, 512)]
        super().__init__(widths, (2, 2, 2, 2), num_classes, in_channels, batchnorm, "conv")
        self.width = float(width)


class ResNet20(_CifarResNet):
    """ResNet-20 for CIFAR (He, Zhang, Ren & Sun, CVPR 2016, arXiv 1512.03385, section 4.2).

    Architecture, for inputs ``(B, in_channels, 32, 32)`` and ``w = width``::

        conv 3x3, 16w (+BN) + ReLU                    -> (B, 16w, 32, 32)
        3 BasicBlocks, 16w                            -> (B, 16w, 32, 32)
        3 BasicBlocks, 32w, first with stride 2       -> (B, 32w, 16, 16)
        3 BasicBlocks, 64w, first with stride 2       -> (B, 64w,  8,  8)
        global average pool = features                -> (B, 64w)
        head: Linear(64w, num_classes)                -> (B, num_classes)

    6n + 2 = 20 weighted layers with n = 3. Shortcuts are identities; where the shape changes,
    option A of the paper: subsample by 2 and pad the new channels with zeros (no parameters).
    ``feature_dim = round(64 * width)``. At width 1 with 10 classes: 269,722 parameters (the
    paper's 0.27 M).

    Parameters are as for :class:`ResNet18`.
    """

    def __init__(
        self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3,
        batchnorm: bool = True,
    ):
        width = _width(width)
        widths = [_scaled(c, width) for c in (16, 32, 64)]
        super().__init__(widths, (3, 3, 3), num_classes, in_channels, batchnorm, "pad")
        self.width = float(width)


class _PlainBlock(nn.Module):
    """BasicBlock without normalisation and without biases: ``relu(conv2(relu(conv1(x))) + skip)``,
    ``skip`` a bias-free 1x1 convolution with stride where the shape changes (option B)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.downsample = (nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
                           if stride != 1 or c_in != c_out else None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(out + skip)


class ResNet18ImageNet(FeatureNet):
    """ResNet-18 in the ImageNet layout (He, Zhang, Ren & Sun, CVPR 2016, arXiv 1512.03385,
    table 1) with every BatchNorm removed, as Dan, Gampa & Mukherjee (arXiv 2111.01166) run it
    on 32x32 CIFAR images.

    Architecture, for inputs ``(B, in_channels, 32, 32)`` and ``w = width``::

        conv 7x7, 64w, stride 2, padding 3 + ReLU     -> (B,  64w, 16, 16)
        max pool 3x3, stride 2, padding 1             -> (B,  64w,  8,  8)
        2 blocks,  64w                                -> (B,  64w,  8,  8)
        2 blocks, 128w, first with stride 2           -> (B, 128w,  4,  4)
        2 blocks, 256w, first with stride 2           -> (B, 256w,  2,  2)
        2 blocks, 512w, first with stride 2           -> (B, 512w,  1,  1)
        global average pool = features                -> (B, 512w)
        head: Linear(512w, num_classes)               -> (B, num_classes)

    No normalisation layer and no convolution bias (their BatchNorm layers are replaced by the
    identity, and the torchvision-style convolutions have ``bias=False``); convolutions are
    initialised from N(0, 2 / fan_out) (``kaiming_normal_(mode="fan_out")``), the head keeps
    PyTorch's default. Unlike :class:`ResNet18` (CIFAR layout, no down-sampling before the first
    stage) this layout reaches 8x8 after the stem, so a forward pass costs about 1/15 of it at
    the same width. At width 1 with 3 classes: 11,168,451 parameters (torchvision's ResNet-18
    less its BatchNorm, with a 3-way head).

    Parameters
    ----------
    num_classes : int
        Number of outputs K.
    width : float
        Channel multiplier (1.0: 64-128-256-512); channels ``round(c * width)``, at least 1.
    in_channels : int
        Input channels.
    """

    def __init__(self, num_classes: int = 3, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        self.num_classes = int(num_classes)
        self.width = float(width)
        widths = [_scaled(c, width) for c in (64, 128, 256, 512)]
        self.stem = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
        layers, c_in = [], widths[0]
        for i, c in enumerate(widths):
            for j in range(2):
                layers.append(_PlainBlock(c_in, c, 2 if (i > 0 and j == 0) else 1))
                c_in = c
        self.blocks = nn.Sequential(*layers)
        self.feature_dim = c_in
        self.head = nn.Linear(c_in, self.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, feature_dim)``: stem, max pool, residual stages, average pool."""
        out = F.max_pool2d(F.relu(self.stem(x)), 3, stride=2, padding=1)
        return self.blocks(out).mean(dim=(2, 3))


# --------------------------------------------------------------------------------------------
# LeNet and MLP
# --------------------------------------------------------------------------------------------
class LeNet(FeatureNet):
    """LeNet-style net of Zhang, Wang & Su (NeurIPS 2021, arXiv 2110.05960), for 32x32 inputs.

    Architecture::

        (B, in_channels, 32, 32)
        conv 6@5x5 + ReLU, max-pool 2        -> (B, 6, 14, 14)
        conv 16@5x5 + ReLU, max-pool 2       -> (B, 16, 5, 5) -> flatten (B, 400)
        FC 120 + ReLU                        -> (B, 120)
        FC 84 + ReLU = features              -> (B, 84)
        head: FC num_classes                 -> (B, num_classes)

    PyTorch's default initialisation. With 3 input channels and 3 classes: 61,411 parameters.
    """

    def __init__(self, num_classes: int = 3, in_channels: int = 3):
        super().__init__()
        self.num_classes = _positive_int("num_classes", num_classes)
        in_channels = _positive_int("in_channels", in_channels)
        self.feature_dim = 84
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.head = nn.Linear(84, self.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """``(B, C, 32, 32) -> (B, 84)``."""
        out = F.max_pool2d(F.relu(self.conv1(x)), 2)
        out = F.max_pool2d(F.relu(self.conv2(out)), 2)
        out = torch.flatten(out, 1)
        out = F.relu(self.fc1(out))
        return F.relu(self.fc2(out))


def elephant(x: Tensor, a: float = 1.0, d: float = 4.0, h: float = 1.0) -> Tensor:
    """Elephant activation of Lan & Mahmood ("Elephant neural networks: born to be a continual
    learner", arXiv 2310.01365):

        elephant(x) = h / (1 + |x / a|^d)

    a bump of height ``h`` and half-width ``a`` (elephant(+-a) = h/2) whose flanks fall like
    |x|^-d. Its output and its gradient are both sparse: for |x| >> a both vanish, so a unit
    only learns from, and only changes its output at, inputs whose pre-activation lies within
    about ``a`` of 0. ``d`` sets how sharp the edge is (d > 1 for a derivative at 0).

    The authors' code learns ``a`` and ``h`` per unit and normalises pre-activations
    (LayerNorm) before the activation, with d = 4 and a = 0.1 by default; here a, d and h are
    fixed numbers, so choose ``a`` relative to the scale of the pre-activations.
    """
    u = torch.abs(x / a)
    small = u <= 1
    # evaluated without overflow: 1 / (1 + u^d) for u <= 1, u^-d / (u^-d + 1) beyond (each branch
    # on inputs where it is finite, so that neither the value nor the gradient meets inf / inf)
    u_lo = torch.where(small, u, torch.ones_like(u))
    v_hi = torch.where(small, torch.ones_like(u), u) ** (-d)
    return h * torch.where(small, 1.0 / (1.0 + u_lo ** d), v_hi / (1.0 + v_hi))


class Elephant(nn.Module):
    """The elephant activation :func:`elephant` as a module (fixed ``a``, ``d``, ``h``)."""

    def __init__(self, a: float = 1.0, d: float = 4.0, h: float = 1.0):
        super().__init__()
        if not (a > 0 and d > 0 and h > 0):
            raise ValueError(f"elephant needs a, d, h > 0, got a={a}, d={d}, h={h}")
        self.a, self.d, self.h = float(a), float(d), float(h)

    def forward(self, x: Tensor) -> Tensor:
        return elephant(x, self.a, self.d, self.h)

    def extra_repr(self) -> str:
        return f"a={self.a:g}, d={self.d:g}, h={self.h:g}"


_ACTIVATIONS: Dict[Optional[str], Optional[Callable[[Tensor], Tensor]]] = {
    None: None,
    "linear": None,
    "relu": F.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "elephant": elephant,
}
# parameters each activation accepts through ``MLP(activation_kwargs=...)``
_ACTIVATION_PARAMS: Dict[Optional[str], Tuple[str, ...]] = {"elephant": ("a", "d", "h")}


class MLP(FeatureNet):
    """Fully connected network on flattened inputs (He & Su, ICLR 2020, arXiv 1910.06943).

    Architecture, with ``hidden = (h_1, ..., h_L)`` and activation sigma::

        x (B, ...) -> flatten (B, in_dim)
        h <- sigma(Linear(h_{l-1}, h_l)(h)),  l = 1..L   -> (B, h_L) = features
        head: Linear(h_L, num_classes)                   -> (B, num_classes)

    ``feature_dim = h_L`` (``in_dim`` when ``hidden`` is empty). ``activation=None`` or
    ``"linear"`` drops sigma: the same parameterisation, but an affine map of the input -- the
    linear control model whose updates are not locally elastic (He & Su). PyTorch's default
    initialisation.

    Parameters
    ----------
    in_dim : int
        Number of input entries after flattening (e.g. 3 for the torus data, 3072 for CIFAR).
    hidden : sequence of int
        Hidden widths.
    num_classes : int
        Number of outputs K (``1`` for a scalar-output net).
    activation : {"relu", "tanh", "gelu", "elephant", "linear", None}
        Nonlinearity after every hidden layer.
    bias : bool
        Biases in every layer, head included.
    activation_kwargs : dict, optional
        Parameters of the activation: for ``"elephant"`` its ``a``, ``d``, ``h``
        (:func:`elephant`; defaults a = 1, d = 4, h = 1).
    bias_spread : float, optional
        If given, the biases of the first layer are set to evenly spaced values over
        [-sqrt(3) s, sqrt(3) s] (standard deviation s = ``bias_spread``), the initialisation
        Lan & Mahmood's code gives elephant layers so that the units' bumps sit at different
        places; default: PyTorch's.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int] = (512,),
        num_classes: int = 2,
        activation: Optional[str] = "relu",
        bias: bool = True,
        activation_kwargs: Optional[Dict[str, float]] = None,
        bias_spread: Optional[float] = None,
    ):
        super().__init__()
        key = activation.lower() if isinstance(activation, str) else activation
        if key not in _ACTIVATIONS:
            known = ", ".join(repr(k) for k in _ACTIVATIONS)
            raise ValueError(f"activation must be one of {known}; got {activation!r}")
        self.activation = key if key is not None else "linear"
        self._act = _ACTIVATIONS[key]
        self.activation_kwargs = dict(activation_kwargs or {})
        if self.activation_kwargs:
            allowed = _ACTIVATION_PARAMS.get(key, ())
            unknown = sorted(set(self.activation_kwargs) - set(allowed))
            if unknown:
                raise ValueError(f"activation {self.activation!r} takes parameters "
                                 f"{list(allowed)}; got {unknown}")
            if key == "elephant":
                Elephant(**self.activation_kwargs)  # validates a, d, h > 0
            self._act = functools.partial(self._act, **self.activation_kwargs)
        self.in_dim = _positive_int("in_dim", in_dim)
        if isinstance(hidden, (str, bytes)) or not hasattr(hidden, "__iter__"):
            raise ValueError(f"hidden must be a sequence of layer widths, got {hidden!r}")
        self.hidden = tuple(_positive_int("hidden width", h) for h in hidden)
        self.num_classes = _positive_int("num_classes", num_classes)
        dims = (self.in_dim,) + self.hidden
        self.layers = nn.ModuleList(
            nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:])
        )
        self.feature_dim = dims[-1]
        self.head = nn.Linear(self.feature_dim, self.num_classes, bias=bias)
        self.bias_spread = None if bias_spread is None else float(bias_spread)
        if self.bias_spread is not None:
            if not self.layers or not bias or self.bias_spread < 0:
                raise ValueError("bias_spread needs a hidden layer with biases and a value >= 0")
            first = self.layers[0].bias
            half = math.sqrt(3.0) * self.bias_spread
            with torch.no_grad():
                first.copy_(torch.linspace(-half, half, first.numel(), dtype=first.dtype))

    def features(self, x: Tensor) -> Tensor:
        """``(B, ...) -> (B, feature_dim)``; the input is flattened after the batch dimension."""
        h = torch.flatten(x, 1)
        if h.shape[1] != self.in_dim:
            raise ValueError(
                f"MLP expects inputs with {self.in_dim} entries per example, got shape "
                f"{tuple(x.shape)}"
            )
        for layer in self.layers:
            h = layer(h)
            if self._act is not None:
                h = self._act(h)
        return h


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
NETS: Dict[str, type] = {
    "resnet18": ResNet18,
    "resnet20": ResNet20,
    "lenet": LeNet,
    "mlp": MLP,
}
"""Registry ``name -> class`` read by :func:`build_net`."""


def build_net(name: str, num_classes: int, **kwargs) -> FeatureNet:
    """Build a network of :data:`NETS` by name (case-insensitive).

    Parameters
    ----------
    name : str
        One of ``"resnet18"``, ``"resnet20"``, ``"lenet"``, ``"mlp"``.
    num_classes : int
        Number of outputs K.
    **kwargs
        The other constructor arguments of the class (``in_dim`` is required for ``"mlp"``),
        e.g. from a JSON training configuration.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the known ones).
    """
    key = str(name).lower()
    if key not in NETS:
        raise ValueError(f"unknown network {name!r}; known: {', '.join(sorted(NETS))}")
    return NETS[key](num_classes=num_classes, **kwargs)
