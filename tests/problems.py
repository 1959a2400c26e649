"""Small locally elastic SDEs with known answers, shared by the tests."""
import numpy as np
import torch

from lesde import model as m


def balanced_labels(K, n):
    """Labels 0..K-1, n each, interleaved (not sorted) so that layout code is exercised."""
    return np.tile(np.arange(K), n)


def unbalanced_labels():
    """11 samples, classes of sizes 4, 2, 5, in a scrambled order."""
    return np.array([0, 2, 0, 1, 2, 2, 1, 0, 2, 0, 2])


def imodel(K=3, n=4, p=2, alpha=1.0, beta=0.3, sigma=0.5, labels=None):
    y = balanced_labels(K, n) if labels is None else labels
    return m.LESDE(y, m.Impacts.intra_inter(alpha, beta, K), "identity", sigma=sigma, dim=p)


def lmodel(K=3, n=4, alpha=1.0, beta=0.3, sigma=0.5):
    return m.LESDE(balanced_labels(K, n), m.Impacts.intra_inter(alpha, beta, K), "label_projection",
                   sigma=sigma)


def class_constant_x0(labels, p, seed=0, scale=1.0):
    """Initial features equal to their class mean (no within-class spread)."""
    rng = np.random.default_rng(seed)
    K = int(labels.max()) + 1
    means = scale * rng.standard_normal((K, p))
    return means[labels], means


def random_x0(B, N, p, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, p, generator=g, dtype=dtype)
