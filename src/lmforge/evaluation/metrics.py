"""Metrics over hypotheses and references, through maintained libraries.

BLEU and chrF come from sacrebleu (with its signature, so numbers are
comparable with papers); ROUGE-1/2/L from Google's rouge-score package.
Classification accuracy, macro-F1 and the confusion matrix are computed here.
"""

from __future__ import annotations

from lmforge.errors import UserError


def _check_lengths(hypotheses: list[str], references: list[list[str]]) -> None:
    if not hypotheses:
        raise UserError("There are no hypotheses to score; the hypothesis file is empty.")
    for i, refs in enumerate(references):
        if len(refs) != len(hypotheses):
            raise UserError(
                f"Reference set {i + 1} has {len(refs)} lines but there are {len(hypotheses)} "
                f"hypotheses; each hypothesis needs exactly one reference per set."
            )


def bleu_chrf(hypotheses: list[str], references: list[list[str]]) -> dict:
    """Corpus BLEU and chrF. `references` is a list of reference sets, each parallel to the hypotheses."""
    from sacrebleu.metrics import BLEU, CHRF

    _check_lengths(hypotheses, references)
    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(hypotheses, references)
    c = chrf.corpus_score(hypotheses, references)
    return {
        "bleu": b.score,
        "bleu_precisions": list(b.precisions),
        "bleu_brevity_penalty": b.bp,
        "bleu_signature": str(bleu.get_signature()),
        "chrf": c.score,
        "chrf_signature": str(chrf.get_signature()),
    }


def rouge(hypotheses: list[str], references: list[list[str]]) -> dict:
    """Mean ROUGE-1/2/L F-measures (×100); with several reference sets, the best per example."""
    from rouge_score import rouge_scorer

    _check_lengths(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for i, hyp in enumerate(hypotheses):
        scores = scorer.score_multi([refs[i] for refs in references if refs[i] is not None], hyp)
        for key in totals:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * value / len(hypotheses) for key, value in totals.items()}


def classification_metrics(predictions: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1 (over the labels that occur in either list) and the confusion matrix."""
    if len(predictions) != len(labels):
        raise UserError(
            f"There are {len(predictions)} predictions but {len(labels)} labels; "
            f"they must be parallel, one per line."
        )
    if not labels:
        raise UserError("There are no labels to score against.")
    classes = sorted(set(labels) | set(predictions))
    index = {c: i for i, c in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]  # rows: true label, columns: prediction
    for pred, gold in zip(predictions, labels, strict=True):
        matrix[index[gold]][index[pred]] += 1
    f1s = []
    for i in range(len(classes)):
        tp = matrix[i][i]
        predicted = sum(row[i] for row in matrix)
        actual = sum(matrix[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    correct = sum(matrix[i][i] for i in range(len(classes)))
    return {
        "accuracy": correct / len(labels),
        "macro_f1": sum(f1s) / len(f1s),
        "per_class_f1": dict(zip(classes, f1s, strict=True)),
        "labels": classes,
        "confusion_matrix": matrix,
    }
