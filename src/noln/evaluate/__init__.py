"""Evaluation: cross-entropy, HellaSwag, faithfulness to a reference model."""

from noln.evaluate.loss import CEResult, cross_entropy

__all__ = ["CEResult", "cross_entropy"]
