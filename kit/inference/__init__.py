"""Inference and submissions: checkpoints, probabilities, ensembles, TTA, adaptation, blends, reports."""
