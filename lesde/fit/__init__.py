r"""Fit the locally elastic SDE to feature trajectories, with calibrated bands and model checks.

The locally elastic SDE (Zhang, Wang & Su, NeurIPS 2021, arXiv 2110.05960; background.md
sections 2 and 4) in the package's canonical form::

    dX_j = sum_k E(t)[y_j, k] (n_k/N) Gbar_k(t) dt + noise_j,

``Gbar_k`` the mean of the drift field G over class k, ``E = (alpha - beta) I + beta 11^T`` in
the paper's case, ``A(t) = int alpha`` and ``B(t) = int beta``. Time is the lr-scaled training
time ``t = step * lr``, so alpha and beta are impacts per unit of lr-scaled time.

Public surface (one module per idea):

* input (:mod:`.trajectory`): :class:`Trajectory`, :func:`as_trajectory` (a simulation, a
  ``lesde simulate`` file, a training store, an ``.npz`` log, arrays, several runs as trials);
* the default method (:mod:`.shooting`): :class:`ShootingEstimator`, trajectory matching by
  multiple shooting with E(t) parametrised by an :class:`ImpactForm` (:mod:`.forms`), fitted
  noise (additive and SGD), quasi-likelihood weights, and bands (parametric bootstrap, sandwich,
  sample and trial bootstraps: :mod:`.uncertainty`);
* closed forms for the linear models (:mod:`.modes`): :class:`IEstimator`, :class:`LEstimator`;
* the linear windowed regression (:mod:`.regression`): :class:`RegressionEstimator`;
* derivatives and tail indices (:mod:`.derivatives`): :func:`smooth_derivative`,
  :func:`default_window`, :func:`tail_index` (the paper's definition and the log-log slope);
* model checks (:mod:`.checks`): :func:`goodness_of_fit`, :func:`compare_models`.

Estimators follow scikit-learn's convention: hyper-parameters in ``__init__``,
``fit(trajectory)`` returns the estimator, results are attributes ending in ``_``.
"""
from .checks import GoodnessOfFit, ModelComparison, compare_models, goodness_of_fit
from .derivatives import default_window, smooth_derivative, tail_index
from .forms import ImpactForm
from .modes import IEstimator, LEstimator
from .regression import RegressionEstimator
from .shooting import ShootingEstimator
from .trajectory import Trajectory, as_trajectory

__all__ = [
    "Trajectory",
    "as_trajectory",
    "ShootingEstimator",
    "ImpactForm",
    "IEstimator",
    "LEstimator",
    "RegressionEstimator",
    "smooth_derivative",
    "default_window",
    "tail_index",
    "GoodnessOfFit",
    "goodness_of_fit",
    "ModelComparison",
    "compare_models",
]
