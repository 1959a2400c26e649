"""lesde: locally elastic stochastic differential equations.

Simulate the locally elastic SDE of Zhang, Wang & Su (NeurIPS 2021, arXiv 2110.05960), compare it
with exact linear theory, train real networks while logging per-sample feature trajectories, fit
the SDE to them, and measure local elasticity (He & Su, ICLR 2020) on the networks themselves.

The public names are re-exported here; everything else is private to its module. They are loaded
on first use (PEP 562): ``import lesde`` imports no submodule, ``lesde.simulate`` imports the model
and the solvers (and torch) and nothing else, and the data, networks, tracking, fitting,
elasticity, sweeps and figures (with pandas, zarr, scikit-learn, Dask and matplotlib) are imported
only when one of their names is used.
"""
import importlib as _importlib

__version__ = "0.1.0"

# submodule -> the public names it exports here
_EXPORTS = {
    "model": (
        "LESDE",
        "Constant",
        "CallableField",
        "CrossEntropy",
        "CrossEntropyReadout",
        "DriftField",
        "FunctionSchedule",
        "Identity",
        "Impacts",
        "LabelProjection",
        "PowerLaw",
        "Schedule",
        "make_field",
    ),
    "solvers": ("LESDEOverflowWarning", "Solution", "initial_state", "simulate", "simulate_feature_sgd"),
    "data": (
        "CIFAR10_CLASSES",
        "GEOMNIST_CLASSES",
        "DataFormatError",
        "GEOMNIST_VARIANTS",
        "GeoMNIST",
        "UnsafePickleError",
        "apply_label_noise",
        "geomnist_train_val",
        "load_cifar10",
        "make_geomnist",
    ),
    "tracking": ("TrainConfig", "TrajectoryStore", "load_store", "train_and_track"),
    "fit": (
        "GoodnessOfFit",
        "IEstimator",
        "ImpactForm",
        "LEstimator",
        "ModelComparison",
        "RegressionEstimator",
        "ShootingEstimator",
        "Trajectory",
        "as_trajectory",
        "compare_models",
        "goodness_of_fit",
        "smooth_derivative",
        "tail_index",
    ),
    "phase": ("PhaseSpec", "load_sweep", "run_sweep"),
    "nets": ("NETS", "MLP", "FeatureNet", "LeNet", "ResNet18", "ResNet18ImageNet", "ResNet20",
             "build_net", "elephant"),
    "elasticity": (
        "ImpactMeasurement",
        "class_elasticity",
        "cluster_pair",
        "clustering_accuracy",
        "empirical_ntk",
        "kernel_kmeans",
        "kernelized_similarity",
        "kl_relative_similarity",
        "measure_impacts",
        "relative_similarity",
        "similarity_matrix",
        "torus_locality",
        "track_elasticity",
        "two_layer_ntk",
        "mlp_ntk",
        "ntk_cluster_pair",
        "clustering_chance",
        "locality_statistics",
    ),
}

# submodules reachable as attributes (``lesde.metrics``, ``lesde.figures``, ...)
_SUBMODULES = ("model", "solvers", "theory", "metrics", "data", "nets", "tracking", "fit",
               "elasticity", "phase", "protocols", "reconcile", "figures", "plotting", "storage",
               "resources", "cli")

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
    "GEOMNIST_VARIANTS", "geomnist_train_val",
    "FeatureNet", "ResNet18", "ResNet20", "LeNet", "MLP", "build_net", "NETS",
    "empirical_ntk", "measure_impacts", "ImpactMeasurement", "relative_similarity",
    "kernelized_similarity", "kl_relative_similarity", "similarity_matrix", "kernel_kmeans",
    "clustering_accuracy", "cluster_pair", "torus_locality", "class_elasticity", "track_elasticity",
    "two_layer_ntk", "mlp_ntk", "ntk_cluster_pair", "clustering_chance", "locality_statistics",
    "ResNet18ImageNet", "elephant",
]

_ORIGIN = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name):
    """Load a public name (or a submodule) on first use and keep it (PEP 562)."""
    module = _ORIGIN.get(name)
    if module is not None:
        value = getattr(_importlib.import_module(f".{module}", __name__), name)
    elif name in _SUBMODULES:
        value = _importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
