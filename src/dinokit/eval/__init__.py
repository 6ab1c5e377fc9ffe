"""Evaluation: features, k-NN, linear probe, online k-NN monitor."""
