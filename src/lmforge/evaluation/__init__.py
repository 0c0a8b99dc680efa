"""Evaluation: perplexity and bits per byte of language models; BLEU, chrF, ROUGE and
classification metrics over hypotheses and references."""

from lmforge.evaluation.metrics import bleu_chrf, classification_metrics, rouge
from lmforge.evaluation.perplexity import PerplexityReport, evaluate_text

__all__ = ["PerplexityReport", "bleu_chrf", "classification_metrics", "evaluate_text", "rouge"]
