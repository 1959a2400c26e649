"""lesde: locally elastic stochastic differential equations.

Simulate the locally elastic SDE of Zhang, Wang & Su (NeurIPS 2021, arXiv 2110.05960), compare it
with exact linear theory, train real networks while logging per-sample feature trajectories, fit
the SDE to them, and measure local elasticity (He & Su, ICLR 2020) on the networks themselves.

The public names are re-exported here; everything else is private to its module.
"""
from .model import (
    LESDE,
    Constant,
    CallableField,
    CrossEntropy,
    CrossEntropyReadout,
    DriftField,
    FunctionSchedule,
    Identity,
    Impacts,
    LabelProjection,
    PowerLaw,
    Schedule,
    make_field,
)
from .solvers import LESDEOverflowWarning, Solution, initial_state, simulate, simulate_feature_sgd
from . import metrics, theory
from .data import (
    CIFAR10_CLASSES,
    GEOMNIST_CLASSES,
    DataFormatError,
    GeoMNIST,
    UnsafePickleError,
    apply_label_noise,
    load_cifar10,
    make_geomnist,
)
from .tracking import TrainConfig, TrajectoryStore, load_store, train_and_track
from .fit import (
    GoodnessOfFit,
    IEstimator,
    ImpactForm,
    LEstimator,
    ModelComparison,
    RegressionEstimator,
    ShootingEstimator,
    Trajectory,
    as_trajectory,
    compare_models,
    goodness_of_fit,
    smooth_derivative,
    tail_index,
)
from .phase import PhaseSpec, load_sweep, run_sweep
from .nets import NETS, MLP, FeatureNet, LeNet, ResNet18, ResNet20, build_net
from .elasticity import (
    ImpactMeasurement,
    class_elasticity,
    cluster_pair,
    clustering_accuracy,
    empirical_ntk,
    kernel_kmeans,
    kernelized_similarity,
    kl_relative_similarity,
    measure_impacts,
    relative_similarity,
    similarity_matrix,
    torus_locality,
    track_elasticity,
)

__version__ = "0.1.0"

__all__ = [
    "LESDE", "Impacts", "Schedule", "Constant", "PowerLaw", "FunctionSchedule",
    "DriftField", "Identity", "LabelProjection", "CrossEntropy", "CrossEntropyReadout",
    "CallableField", "make_field",
    "simulate", "simulate_feature_sgd", "initial_state", "Solution", "LESDEOverflowWarning",
    "theory", "metrics", "TrainConfig", "TrajectoryStore", "load_store", "train_and_track", "Trajectory", "as_trajectory", "IEstimator", "LEstimator",
    "RegressionEstimator", "smooth_derivative", "tail_index", "goodness_of_fit", "GoodnessOfFit",
    "ShootingEstimator", "ImpactForm", "compare_models", "ModelComparison", "PhaseSpec", "run_sweep", "load_sweep",
    "load_cifar10", "make_geomnist", "apply_label_noise", "GeoMNIST", "CIFAR10_CLASSES",
    "GEOMNIST_CLASSES", "DataFormatError", "UnsafePickleError",
    "FeatureNet", "ResNet18", "ResNet20", "LeNet", "MLP", "build_net", "NETS",
    "empirical_ntk", "measure_impacts", "ImpactMeasurement", "relative_similarity",
    "kernelized_similarity", "kl_relative_similarity", "similarity_matrix", "kernel_kmeans",
    "clustering_accuracy", "cluster_pair", "torus_locality", "class_elasticity", "track_elasticity",
]
