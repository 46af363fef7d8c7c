"""Learning-rate tools for MAML: the optimal inner rate alpha* (Zou, Liu & Li), stability bounds
alpha_c / beta_c(alpha) from Hessian eigenvalues (the ICLR 2020 two-learning-rates paper), the
closed-form mixed-linear-regression solutions behind them, and the experiments/plots of
``fastmeta advise``."""
from .alpha import OnlineAlphaStar, OverparamAlphaStar, alpha_star, alpha_star_overparam, alpha_star_range
from .closed_form import ClosedFormSolutions, closed_form_solutions, fast_adaptation_distance, maml_solution
from .experiments import (ABMap, AlphaSweep, LinearRegressionMap, alpha_sweep, beta_divergence_boundary,
                          linear_regression_map, maml_ab_map, train_maml)
from .lanczos import LanczosResult, lanczos_topk
from .stability import (StabilityBounds, beta_c_exact, beta_c_paper, bounds_from_eigenvalues, stability_bounds,
                        task_hvp_operator)

__all__ = [
    "alpha_star", "alpha_star_overparam", "alpha_star_range", "OnlineAlphaStar", "OverparamAlphaStar",
    "closed_form_solutions", "ClosedFormSolutions", "maml_solution", "fast_adaptation_distance",
    "stability_bounds", "StabilityBounds", "bounds_from_eigenvalues", "beta_c_paper", "beta_c_exact",
    "task_hvp_operator", "lanczos_topk", "LanczosResult",
    "linear_regression_map", "LinearRegressionMap", "maml_ab_map", "ABMap", "beta_divergence_boundary",
    "alpha_sweep", "AlphaSweep", "train_maml",
]
