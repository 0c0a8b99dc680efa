"""Classifier checkpoints and their use: opening one (lmforge's own, or a Hugging Face sequence
classifier mapped onto it), writing one, and labeling texts (`predict`, `evaluate_classifier`).
The format is the language models': config.json (with "task": "classification", the classifier's
settings and the label set), model.safetensors, tokenizer.json.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lmforge.checkpoint import open_checkpoint, write_checkpoint
from lmforge.classification.model import BiLSTMEncoder, ClassifierConfig, TextClassifier, body_width
from lmforge.config import ModelConfig, config_from_dict
from lmforge.device import resolve_device
from lmforge.errors import UserError
from lmforge.evaluation.metrics import classification_metrics
from lmforge.models import build_model
from lmforge.settings import check_fields
from lmforge.tokenizers import TextTokenizer
from lmforge.weights import load_state, load_weights, unique_state_dict

TASK = "classification"


def encode_batch(tokenizer: TextTokenizer, texts: list[str], max_length: int, special_tokens: bool = False
                 ) -> list[list[int]]:  # fmt: skip
    """Each text's first `max_length` tokens (with `special_tokens`: framed by the tokenizer's own,
    [CLS] ... [SEP] or <s> ... </s>, the text cut so that the frame fits)."""
    if special_tokens:
        return tokenizer.encode_framed(texts, max_length)
    fallback = tokenizer.eot_id if tokenizer.eot_id is not None else 0
    return [ids[:max_length] or [fallback] for ids in tokenizer.encode_batch(texts)]


def pad_right(seqs: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
    return ids.to(device), lengths


def predict(
    model: TextClassifier,
    tokenizer: TextTokenizer,
    texts: list[str],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Class probabilities (N, classes) for the texts."""
    model.eval()
    device = resolve_device(device)
    encoded = encode_batch(tokenizer, texts, model.cfg.max_length, model.cfg.special_tokens)
    out = []
    for i in range(0, len(encoded), batch_size):
        ids, lengths = pad_right(encoded[i : i + batch_size], device)
        logits, _ = model(ids, lengths)
        out.append(logits.float().softmax(-1).cpu())
    return torch.cat(out)


def evaluate_classifier(
    model, tokenizer, labels: list[str], texts: list[str], gold: list[str], device="cpu"
) -> dict:
    unknown = sorted(set(gold) - set(labels))
    if unknown:
        raise UserError(
            f"The evaluation data has label(s) {', '.join(map(repr, unknown))} that the classifier "
            f"was not trained on (its labels: {', '.join(labels)})."
        )
    probs = predict(model, tokenizer, texts, device=device)
    predictions = [labels[i] for i in probs.argmax(-1).tolist()]
    return classification_metrics(predictions, gold)


def save_classifier(
    out: Path,
    model: TextClassifier,
    tokenizer: TextTokenizer,
    labels: list[str],
    body_config: ModelConfig | None,
    info: dict,
) -> None:
    write_checkpoint(
        out,
        unique_state_dict(model),
        tokenizer,
        {
            "task": TASK,
            "classifier": dataclasses.asdict(model.cfg),
            "labels": labels,
            "body": dataclasses.asdict(body_config) if body_config is not None else None,
            **info,
        },
    )


def is_classifier(path: str | Path) -> bool:
    try:
        return open_checkpoint(path).is_classifier
    except UserError:
        return False


def _classifier_metadata(data: dict, source: Path) -> tuple[ClassifierConfig, list[str]]:
    """The classifier's settings and labels from its config.json, or one sentence saying what is
    missing or wrong there (a damaged or hand-edited file)."""
    labels, settings = data.get("labels"), data.get("classifier")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise UserError(
            f"{source} has no list of labels (at least two texts); the classifier checkpoint is damaged."
        )
    if not isinstance(settings, dict):
        raise UserError(f"{source} has no 'classifier' settings; the classifier checkpoint is damaged.")
    known = {f.name for f in dataclasses.fields(ClassifierConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UserError(f"{source}: unknown classifier setting(s) {', '.join(unknown)}; the checkpoint was written "
                        f"by another version or edited by hand.")  # fmt: skip
    mcfg = ClassifierConfig(**settings)
    try:
        check_fields(mcfg, "classifier.")
    except UserError as e:
        raise UserError(f"{source}: {e} The classifier checkpoint is damaged.") from None
    return mcfg, labels


def load_classifier(path: str | Path, device: str = "cpu") -> tuple[TextClassifier, TextTokenizer, list[str]]:
    checkpoint = open_checkpoint(path)
    if not checkpoint.is_classifier:
        raise UserError(
            f"{path} is a language model, not a classifier; train one with `lmforge train-classifier`."
        )
    data = checkpoint.metadata
    mcfg, labels = _classifier_metadata(data, checkpoint.path / "config.json")
    if data.get("body"):
        body = build_model(config_from_dict({"model": data["body"]}).model)
    else:
        body = BiLSTMEncoder(mcfg)
    model = TextClassifier(body, body_width(body), len(labels), mcfg)
    if data.get("hf_classifier"):  # a Hugging Face sequence classifier (BERT, DistilBERT, RoBERTa)
        from lmforge.interop.bert import classifier_tensors
        from lmforge.interop.hf import read_hf_weights

        try:
            tensors = classifier_tensors(read_hf_weights(checkpoint.path), data, body.config)
        except KeyError as e:
            raise UserError(f"{checkpoint.path}: weight {e.args[0]} is missing; the files do not match "
                            f"config.json.") from None  # fmt: skip
        unused = ("body.head_", "body.lm_head.")  # the body's masked-LM head: no part of a classifier
        tensors |= {k: v for k, v in model.state_dict().items() if k.startswith(unused)}
        load_state(tensors, model, str(checkpoint.path))
    else:
        load_weights(checkpoint.path / "model.safetensors", model)
    return model.to(resolve_device(device)).eval(), checkpoint.tokenizer(), labels
