"""Hugging Face hub ids as checkpoints: `lmforge generate HuggingFaceTB/SmolLM2-135M-Instruct`.

A checkpoint argument that is not a local path but looks like a hub id (`name`, `org/name`,
optionally `@revision`) is fetched with `huggingface_hub.snapshot_download` into the standard
hub cache, only the files a model needs (config, tokenizer, safetensors weights, templates).
The usual environment applies: `HF_TOKEN` (or a saved login) for gated and private models,
`HF_HUB_CACHE`/`HF_HOME` for the cache, `HF_HUB_OFFLINE=1` to use the cache only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lmforge.errors import UserError

# what a model needs; never pickled weights (*.bin, *.pt), which lmforge would not open anyway
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.spm", "*.tiktoken"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")


def looks_like_hub_id(spec: str) -> bool:
    return bool(HUB_ID.match(spec)) and not spec.endswith((".gguf", ".safetensors", ".json"))


def split_revision(spec: str, revision: str | None = None) -> tuple[str, str | None]:
    """`org/name@rev` → (`org/name`, `rev`); an explicit `revision` wins."""
    repo, _, at = spec.partition("@")
    return repo, revision or at or None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def fetch(spec: str, revision: str | None = None) -> Path:
    """The local folder of hub model `spec` (downloaded on first use, then from the cache)."""
    repo, revision = split_revision(spec, revision)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise UserError(f"{spec} is not a local path; to fetch it from the Hugging Face hub, "
                        f"pip install huggingface_hub.") from None  # fmt: skip
    where = f"{repo}" + (f" (revision {revision})" if revision else "")
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=MODEL_FILES,
                                   cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                                   local_files_only=_offline())  # fmt: skip
    except GatedRepoError:
        raise UserError(f"{where} is a gated model: accept its terms on huggingface.co, then set HF_TOKEN "
                        f"(or run `hf auth login`).") from None  # fmt: skip
    except RevisionNotFoundError:
        raise UserError(
            f"The Hugging Face model {repo} has no revision {revision!r}.", settings=("revision",)
        ) from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo} is not a local checkpoint, and the Hugging Face hub has no model {repo} "
                        f"(or it is private: set HF_TOKEN).") from None  # fmt: skip
    except LocalEntryNotFoundError:
        raise UserError(f"{repo} is not a local checkpoint, and {where} is not in the Hugging Face cache; "
                        f"fetch it while online (`hf download {repo}`, or unset HF_HUB_OFFLINE).") from None  # fmt: skip
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"{repo} is not a local checkpoint, and fetching {where} from the Hugging Face hub "
                        f"failed ({e}).") from None  # fmt: skip
    return Path(folder)
