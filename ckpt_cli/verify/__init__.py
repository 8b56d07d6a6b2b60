"""Numerical verification of converted checkpoints (reference forward passes)."""
