"""Small locally elastic SDEs with known answers, shared by the tests."""
import numpy as np
import torch
from scipy.stats import chi2

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


def check_gaussian_moments(samples, mean, cov):
    """samples (R, D) against exact mean (D,) and covariance (D, D): means within 4.5 standard
    errors, variances within the 1e-5 / 1 - 1e-5 chi-square quantiles, covariances within 4.5
    standard errors of the sample covariance (Gaussian formula)."""
    Rn = samples.shape[0]
    smean = samples.mean(0)
    se = np.sqrt(np.diag(cov) / Rn)
    z = (smean - mean) / se
    assert np.abs(z).max() < 4.5, f"mean off by {np.abs(z).max():.2f} standard errors"
    s2 = samples.var(0, ddof=1)
    ratio = (Rn - 1) * s2 / np.diag(cov)
    lo, hi = chi2.ppf(1e-5, Rn - 1), chi2.ppf(1 - 1e-5, Rn - 1)
    assert np.all((ratio > lo) & (ratio < hi)), f"variance ratios {ratio / (Rn - 1)} outside chi-square bounds"
    # covariances: sample covariance entry has variance (S_ii S_jj + S_ij^2) / R (Gaussian)
    scov = np.cov(samples.T)
    se_c = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov ** 2) / Rn)
    assert np.abs((scov - cov) / se_c).max() < 4.5


def check_within_class_spread(within_cov, n, sigma2_t, within0=0.0):
    """Within-class spread started from ``within0`` (per coordinate) against its law under
    additive noise: ``(n / (sigma^2 t)) * (within_cov[k, a, a] - within0)`` summed over runs,
    classes and coordinates is chi-square with ``R K p (n - 1)`` degrees of freedom (balanced
    classes, no initial spread; checked at the 1e-5 / 1 - 1e-5 quantiles)."""
    diag = np.diagonal(within_cov, axis1=-2, axis2=-1)               # (R, K, p)
    stat = (n / sigma2_t) * (diag - within0).sum()
    dof = diag.size * (n - 1)
    assert chi2.ppf(1e-5, dof) < stat < chi2.ppf(1 - 1e-5, dof), (stat, dof)
