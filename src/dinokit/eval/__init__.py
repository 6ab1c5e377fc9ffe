"""Evaluation: features, k-NN, linear probe, online k-NN monitor."""

from dinokit.eval.features import extract_features
from dinokit.eval.knn import knn_classify, knn_evaluate
from dinokit.eval.linear import LinearProbeResult, linear_probe

__all__ = ["LinearProbeResult", "extract_features", "knn_classify", "knn_evaluate", "linear_probe"]
