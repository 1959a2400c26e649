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
from . import theory

__version__ = "0.1.0"

__all__ = [
    "LESDE", "Impacts", "Schedule", "Constant", "PowerLaw", "FunctionSchedule",
    "DriftField", "Identity", "LabelProjection", "CrossEntropy", "CrossEntropyReadout",
    "CallableField", "make_field",
    "simulate", "simulate_feature_sgd", "initial_state", "Solution", "LESDEOverflowWarning",
    "theory",
]
