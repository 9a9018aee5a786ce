"""Evaluation of generated 4D results: metrics, ground truth, trivial predictors (floors), reports and plots."""
