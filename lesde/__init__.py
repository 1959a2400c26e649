"""lesde: locally elastic stochastic differential equations.

Simulate the locally elastic SDE of Zhang, Wang & Su (NeurIPS 2021, arXiv 2110.05960), compare it
with exact linear theory, train real networks while logging per-sample feature trajectories, fit
the SDE to them, and measure local elasticity (He & Su, ICLR 2020) on the networks themselves.
"""
__version__ = "0.1.0"
