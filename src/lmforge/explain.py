"""Why a model decided: attention maps, integrated-gradients attributions and per-token loss.

    text ─▶ tokens ─▶ model ─▶ decision: a classifier's label, or a language model's next token
      attention     every layer and head's attention probabilities (Transformer bodies)
      attributions  integrated gradients (captum) of the decision's logit with respect to each
                    token's embedding, from a baseline of neutral tokens; they add up to
                    logit(text) − logit(baseline), up to the reported convergence delta
      token loss    language models: −log p(token | the tokens before it), for each token

`explain(...)` returns the numbers; `write_report(...)` renders them as PNG figures and a
self-contained HTML page (figures embedded, no external files), plus explain.json.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import UserError, require


@dataclass
class Explanation:
    kind: str  # "classifier" or "language model"
    tokens: list[str]
    decision: str  # the predicted (or requested) label / next token
    probability: float  # of the decision
    attributions: list[float]  # one per token
    output_difference: float  # logit(text) - logit(baseline): what the attributions add up to
    convergence_delta: float  # captum's completeness error of the integral
    baseline_token: str
    attention: list | None = None  # [layer][head][query][key], None for bodies without attention
    token_losses: list[float | None] | None = None  # language models: None for the first token
    top: list[tuple[str, float]] = field(default_factory=list)  # language models: likeliest next tokens

    def to_dict(self) -> dict:
        return asdict(self)


def load_for_explaining(path: str, device: str = "cpu") -> tuple[nn.Module, object, list[str] | None]:
    """The model, its tokenizer and (classifiers) its labels."""
    from lmforge.checkpoint import open_checkpoint
    from lmforge.device import resolve_device

    checkpoint = open_checkpoint(path)
    if checkpoint.is_classifier:
        from lmforge.classification.inference import load_classifier

        model, tokenizer, labels = load_classifier(path, device)
        return model.float().eval(), tokenizer, labels
    model, tokenizer = checkpoint.require("explain").load()
    return model.float().to(resolve_device(device)).eval(), tokenizer, None


@torch.no_grad()
def reply_attention(
    model: nn.Module, ids: list[int], start: int, layer: int | None = None
) -> list[list[float]]:
    """How much each token from `start` on attends to every token (rows: those tokens, columns: all
    tokens), averaged over heads, and over layers unless `layer` is given."""
    from lmforge.models.gpt import recorded_attention

    device = next(model.parameters()).device
    with recorded_attention() as recorded:
        model(torch.tensor([ids], device=device))
    if not recorded:
        raise UserError("This model has no attention layers (a recurrent model) to show.")
    if layer is not None and not 0 <= layer < len(recorded):
        raise UserError(f"layer must be between 0 and {len(recorded) - 1}.", settings=("layer",))
    maps = torch.stack([m[0].float().mean(0) for m in recorded])  # (layers, T, T), mean over heads
    chosen = maps.mean(0) if layer is None else maps[layer]
    return chosen[start:].cpu().tolist()


def _embedding(model: nn.Module, classifier: bool) -> nn.Embedding:
    body = model.body if classifier else model
    return body.wte


def _baseline_id(tokenizer) -> tuple[int, str]:
    """A neutral token to start the integral from: <unk>, else the end-of-text token, else id 0."""
    for token in ("<unk>", "<|endoftext|>"):
        index = tokenizer.hf.token_to_id(token)
        if index is not None:
            return index, token
    eot = tokenizer.eot_id
    index = eot if eot is not None else 0
    return index, tokenizer.hf.id_to_token(index) or str(index)


def explain(model: nn.Module, tokenizer, text: str, labels: list[str] | None = None, target: str | None = None,
            steps: int = 128) -> Explanation:  # fmt: skip
    """Attention, attributions and (language models) per-token loss for `text`."""
    require("captum", "explain", "Explaining a model")
    from captum.attr import LayerIntegratedGradients

    classifier = labels is not None
    if not text.strip():
        raise UserError("Give a non-empty text to explain.")
    if steps < 2:
        raise UserError("--steps must be at least 2.", settings=("steps",))
    ids = tokenizer.encode(text)
    limit = model.cfg.max_length if classifier else getattr(model, "block_size", 1 << 30)
    if len(ids) > limit:
        raise UserError(
            f"The text is {len(ids)} tokens long but the model reads at most {limit}; shorten it.",
            settings=("text",),
        )
    device = next(model.parameters()).device
    idx = torch.tensor([ids], device=device)
    length = torch.tensor([len(ids)])

    def scores(batch: torch.Tensor) -> torch.Tensor:
        """The logits the decision is read from: class logits, or the next token's logits."""
        if classifier:
            return model(batch, length.expand(batch.shape[0]))[0]
        return model(batch)[0][:, -1, :]

    from lmforge.models.gpt import recorded_attention

    with recorded_attention() as recorded, torch.no_grad():
        logits = scores(idx).float()
    attention = [m[0].tolist() for m in recorded] or None
    probabilities = logits.softmax(-1)[0]
    chosen = _target_index(target, labels, tokenizer, int(probabilities.argmax()))
    decision = labels[chosen] if classifier else tokenizer.decode([chosen])

    baseline_id, baseline_token = _baseline_id(tokenizer)
    baseline = torch.full_like(idx, baseline_id)
    integrated = LayerIntegratedGradients(lambda batch: scores(batch).float(), _embedding(model, classifier))
    attributions, delta = integrated.attribute(
        idx, baselines=baseline, target=chosen, n_steps=steps, return_convergence_delta=True,
        internal_batch_size=min(steps, 32),
    )  # fmt: skip
    per_token = attributions.sum(-1)[0].detach().float()
    with torch.no_grad():
        difference = float(scores(idx)[0, chosen] - scores(baseline)[0, chosen])

    tokens = [tokenizer.hf.id_to_token(i) or tokenizer.decode([i]) for i in ids]
    explanation = Explanation(
        kind="classifier" if classifier else "language model",
        tokens=tokens,
        decision=decision,
        probability=float(probabilities[chosen]),
        attributions=per_token.tolist(),
        output_difference=difference,
        convergence_delta=float(delta.abs().max()),
        baseline_token=baseline_token,
        attention=attention,
    )
    if not classifier:
        explanation.token_losses = token_losses(model, idx)
        best = probabilities.topk(min(5, probabilities.numel()))
        explanation.top = [(tokenizer.decode([int(i)]), float(p)) for p, i in zip(*best, strict=True)]
    return explanation


def _target_index(target: str | None, labels: list[str] | None, tokenizer, predicted: int) -> int:
    if target is None:
        return predicted
    if labels is not None:
        if target not in labels:
            raise UserError(f"{target!r} is not one of the classifier's labels ({', '.join(labels)}).",
                            settings=("target",))  # fmt: skip
        return labels.index(target)
    ids = tokenizer.encode(target)
    if len(ids) != 1:
        raise UserError(f"The target {target!r} is {len(ids)} tokens; give a single next token.",
                        settings=("target",))  # fmt: skip
    return ids[0]


@torch.no_grad()
def token_losses(model: nn.Module, idx: torch.Tensor) -> list[float | None]:
    """−log p(token_t | tokens before t) for each token; the first has no context (None)."""
    logits = model(idx)[0][0, :-1].float()
    losses = F.cross_entropy(logits, idx[0, 1:], reduction="none")
    return [None, *losses.tolist()]


# ---- rendering ------------------------------------------------------------------------------


def _figure_png(draw) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def attention_png(explanation: Explanation, max_panels: int = 48) -> bytes | None:
    """One heat map per layer and head (per layer, averaged over heads, when there are too many)."""
    if not explanation.attention:
        return None
    maps = torch.tensor(explanation.attention)  # (layers, heads, T, T)
    layers, heads = maps.shape[:2]
    averaged = layers * heads > max_panels
    panels = maps.mean(1, keepdim=True) if averaged else maps
    rows, cols = panels.shape[0], panels.shape[1]
    if averaged:  # a grid of layers instead of one long column
        cols = min(6, layers)
        rows = math.ceil(layers / cols)
    labels = [t[:8] for t in explanation.tokens]

    def draw(plt):
        size = max(2.0, 0.25 * len(labels))
        fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
        for n, ax in enumerate(axes.flat):
            ax.axis("off")
            layer, head = (n, None) if averaged else divmod(n, cols)
            if layer >= panels.shape[0]:
                continue
            ax.imshow(panels[layer, 0 if averaged else head].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer}" + ("" if averaged else f" head {head}"), fontsize=8)
            if len(labels) <= 24:
                ax.axis("on")
                ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
                ax.set_yticks(range(len(labels)), labels, fontsize=6)
        fig.suptitle("attention (rows: queries, columns: keys)" + (", mean over heads" if averaged else ""))
        fig.tight_layout()
        return fig

    return _figure_png(draw)


def bars_png(tokens: list[str], values: list[float | None], title: str, signed: bool) -> bytes:
    def draw(plt):
        fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(tokens)), 3.2))
        numbers = [0.0 if v is None else v for v in values]
        colors = ["tab:red" if v > 0 else "tab:blue" for v in numbers] if signed else "tab:orange"
        ax.bar(range(len(tokens)), numbers, color=colors)
        ax.set_xticks(range(len(tokens)), [t[:12] for t in tokens], rotation=90, fontsize=7)
        ax.set_title(title)
        ax.axhline(0, color="black", linewidth=0.5)
        fig.tight_layout()
        return fig

    return _figure_png(draw)


def _spans(tokens: list[str], values: list[float | None], signed: bool) -> str:
    """Tokens as coloured spans: red for positive (or high loss), blue for negative."""
    scale = max((abs(v) for v in values if v is not None), default=0.0) or 1.0
    out = []
    for token, value in zip(tokens, values, strict=True):
        if value is None:
            style, title = "", "no context"
        else:
            strength = abs(value) / scale
            rgb = "220,40,40" if value >= 0 or not signed else "40,90,220"
            style, title = f"background: rgba({rgb},{strength:.3f})", f"{value:.4f}"
        out.append(
            f'<span class="tok" style="{style}" title="{html.escape(title)}">{html.escape(token)}</span>'
        )
    return " ".join(out)


def write_report(explanation: Explanation, out: str | Path) -> dict[str, Path]:
    """attention.png, attributions.png, token_loss.png (language models), explain.html, explain.json."""
    from lmforge.io import atomic_write_bytes, atomic_write_json, atomic_write_text

    out = Path(out)
    e = explanation
    figures: dict[str, bytes] = {}
    attention = attention_png(e)
    if attention:
        figures["attention.png"] = attention
    figures["attributions.png"] = bars_png(
        e.tokens, e.attributions, f"integrated gradients for {e.decision!r}", True
    )
    if e.token_losses:
        figures["token_loss.png"] = bars_png(e.tokens, e.token_losses, "loss of each token (nats)", False)
    written = {}
    for name, data in figures.items():
        atomic_write_bytes(out / name, data)
        written[name] = out / name
    atomic_write_text(out / "explain.html", render_html(e, figures))
    atomic_write_json(out / "explain.json", e.to_dict())
    written.update({"explain.html": out / "explain.html", "explain.json": out / "explain.json"})
    return written


def _script_json(data: dict) -> str:
    """JSON inside a <script> element: entities are not decoded there, only "</" must not appear."""
    return json.dumps(data).replace("</", "<\\/")


def render_html(e: Explanation, figures: dict[str, bytes]) -> str:
    sections = [
        f"<h1>{html.escape(e.kind.capitalize())}: {html.escape(repr(e.decision))} "
        f"(p = {e.probability:.3f})</h1>",
        "<h2>Attributions (integrated gradients)</h2>",
        f"<p>Red tokens raise the logit of {html.escape(repr(e.decision))}, blue ones lower it. They add up to "
        f"{sum(e.attributions):.4f}; the logit's change from a text of {html.escape(e.baseline_token)} tokens is "
        f"{e.output_difference:.4f} (convergence delta {e.convergence_delta:.2e}).</p>",
        f'<p class="text">{_spans(e.tokens, e.attributions, True)}</p>',
    ]
    if e.token_losses:
        known = [v for v in e.token_losses if v is not None]
        mean = sum(known) / max(1, len(known))
        sections += ["<h2>Loss of each token</h2>",
                     f"<p>Darker tokens surprised the model more (mean {mean:.3f} nats).</p>",
                     f'<p class="text">{_spans(e.tokens, e.token_losses, False)}</p>']  # fmt: skip
    if e.top:
        items = "".join(f"<li>{html.escape(repr(t))}: {p:.3f}</li>" for t, p in e.top)
        sections += ["<h2>Likeliest next tokens</h2>", f"<ol>{items}</ol>"]
    for name, data in figures.items():
        sections.append(f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" '
                        f'src="data:image/png;base64,{base64.b64encode(data).decode()}">')  # fmt: skip
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             ".tok{padding:1px 3px;border-radius:3px;white-space:pre}.text{line-height:2}img{max-width:100%}")  # fmt: skip
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>lmforge explain</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{style}</style></head>'
            f"<body>{''.join(sections)}<script type=\"application/json\" id=\"data\">"
            f"{_script_json({k: v for k, v in e.to_dict().items() if k != 'attention'})}</script>"
            f"</body></html>\n")  # fmt: skip
