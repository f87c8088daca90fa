"""Evaluation: cross-entropy, HellaSwag, faithfulness to a reference model."""

from noln.evaluate.compare import ComparisonResult, compare_models
from noln.evaluate.faithfulness import evaluate_blocks, faithfulness
from noln.evaluate.hellaswag import HellaSwagResult, evaluate_hellaswag, load_hellaswag
from noln.evaluate.loss import CEResult, cross_entropy

__all__ = ["CEResult", "ComparisonResult", "HellaSwagResult", "compare_models", "cross_entropy",
           "evaluate_blocks", "evaluate_hellaswag", "faithfulness", "load_hellaswag"]
