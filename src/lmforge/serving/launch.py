"""`lmforge serve`'s entry: open a checkpoint and serve what its kind of model answers — generated
text (serving/server.py: the OpenAI API and the web chat), embeddings or labels (serving/encoders.py)."""

from __future__ import annotations

from lmforge.families import family_of
from lmforge.serving.server import ServerSettings, _default_hosts, create_app


def serve(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    quantize: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_tokens_cap: int = 2048,
    log_level: str = "info",
    adapter: str | None = None,
    allowed_hosts: list[str] | None = None,
    served_model_name: str | None = None,
    context_length: int = 0,
    threads: int = 0,
) -> None:
    """Load `checkpoint` (with a LoRA `adapter` merged in, if given) and serve it until interrupted:
    under `served_model_name` (default: the checkpoint's folder name), with prompt + reply at most
    `context_length` tokens (0: the model's context), on `threads` CPU threads (0: the physical cores)."""
    import time
    from pathlib import Path

    import uvicorn

    import lmforge.inference.timing_cache as timing_cache
    from lmforge.chat import chat_template_of
    from lmforge.checkpoint import open_checkpoint
    from lmforge.device import set_threads
    from lmforge.inference.loading import load_for_inference

    set_threads(threads)
    started = time.perf_counter()
    # A first start on a CPU times its kernels (int8 and the native step) before it is ready: say so.
    timing_cache.progress = lambda what: print(f"Starting: {what}", flush=True)
    opened = open_checkpoint(checkpoint)
    settings = ServerSettings(
        sampling_defaults=opened.generation.sampling,
        task=opened.config.data.task if opened.config is not None else "translation",
        model_name=served_model_name or Path(checkpoint).resolve().name,
        context_length=context_length,
        api_key=api_key,
        max_batch=max_batch,
        max_queue=max_queue,
        max_tokens_cap=max_tokens_cap,
        allowed_hosts=tuple(allowed_hosts or _default_hosts(host)),
    )
    notice = lambda m: print(f"Note: {m}", flush=True)  # noqa: E731
    if opened.is_classifier:  # a text classifier: its labels (serving/encoders.py)
        from lmforge.classification.inference import load_classifier
        from lmforge.serving.encoders import create_classifier_app

        model, tokenizer, labels = load_classifier(opened.path, device)
        app = create_classifier_app(model, tokenizer, labels, settings)
        routes = "POST /v1/classify"
    elif family_of(opened.require("serve").config.model.arch).embeds:  # an encoder: embeddings
        from lmforge.serving.encoders import create_embeddings_app

        model, tokenizer = load_for_inference(opened, device, dtype, quantize, adapter, notice=notice)
        app = create_embeddings_app(model, tokenizer, settings)
        routes = "POST /v1/embeddings"
    else:
        model, tokenizer = load_for_inference(opened, device, dtype, quantize, adapter, notice=notice)
        app = create_app(model, tokenizer, settings, chat_template_of(opened, adapter))
        routes = "OpenAI API under /v1, chat page at /"
    timing_cache.progress = None
    print(f"Serving {settings.model_name} on http://{host}:{port} ({routes}); ready in "
          f"{time.perf_counter() - started:.1f} s.")  # fmt: skip
    from lmforge.serving.http import HeaderDeadline

    uvicorn.run(app, host=host, port=port, log_level=log_level, http=HeaderDeadline)
