"""Evaluation: features, linear / fast probes, kNN, fine-tuning, OOD detection, result files."""
