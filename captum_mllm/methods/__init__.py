"""Shapley estimators (Captum ``PerturbationAttribution`` subclasses), one a file.

All take ``budget=`` in coalition evaluations, batch by
``perturbations_per_eval``, solve every output column at once and report
standard errors (``return_stderr=True``; ``MultimodalLLMAttribution`` puts
them on the result).
"""

from captum_mllm.methods.base import Game, ShapleyEstimator
from captum_mllm.methods.bayes import BayesianShapley
from captum_mllm.methods.exact import ExactShapleyValues
from captum_mllm.methods.hierarchical import HierarchicalShapley
from captum_mllm.methods.kernel import LeverageKernelShap
from captum_mllm.methods.permutation import PairedPermutationSampling
from captum_mllm.methods.regression import RegressionAdjustedShapley

__all__ = [
    "BayesianShapley",
    "ExactShapleyValues",
    "Game",
    "HierarchicalShapley",
    "LeverageKernelShap",
    "PairedPermutationSampling",
    "RegressionAdjustedShapley",
    "ShapleyEstimator",
]
