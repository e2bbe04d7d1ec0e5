"""Resolve the recipe's base model to something from_pretrained loads, and prepare its tokenizer.

The same code path serves hub ids (pinned by revision), local folders and locally built tiny models.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from recipes.schema import TINY_PREFIX, ModelSection
from training.families import Family, family_for

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """The base model or its tokenizer cannot be used; the message says which and why."""


@dataclass
class BaseModelRef:
    """Where the base model is and what it is; recorded in the artifact's lineage."""

    model_id: str  # as the recipe names it
    revision: str | None
    path: str  # what from_pretrained receives: a local folder or the hub id
    model_type: str

    @property
    def family(self) -> Family:
        return family_for(self.model_type)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_base(section: ModelSection, corpus: Callable[[], list[str]], corpus_key: str | None = None) -> BaseModelRef:
    """Find (or, for tiny:<family>, build from the training text) the base model and read its family."""
    from transformers import AutoConfig

    if section.base.startswith(TINY_PREFIX):
        from training.tiny import tiny_model_path

        path = str(tiny_model_path(section.base[len(TINY_PREFIX):], corpus, corpus_key))
        revision = None
    else:
        path, revision = section.base, section.revision
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError) as exc:
        where = "local folder" if Path(path).exists() else "hub id (is the hub reachable? set HF_HUB_OFFLINE=1 and use a local folder)"
        raise ModelLoadError(f"model.base: cannot load config of {section.base!r} as a {where}: {_first_line(exc)}") from None
    family_for(config.model_type)  # unsupported families fail here, before any training
    return BaseModelRef(model_id=section.base, revision=revision, path=path, model_type=config.model_type)


def load_tokenizer(ref: BaseModelRef, section: ModelSection):
    """The tokenizer with a chat template and a pad token that is not the end-of-turn token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.path, revision=ref.revision, trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.base: cannot load the tokenizer of {ref.model_id!r}: {_first_line(exc)}") from None
    family = ref.family
    tokenizer.chat_template = _chat_template(section, tokenizer, family)
    added = _add_template_tokens(tokenizer, family, ref.model_id)
    vocab = tokenizer.get_vocab()
    if family.end_of_turn in vocab:
        tokenizer.eos_token = family.end_of_turn
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        pad = next((t for t in family.pad_candidates if t in vocab and vocab[t] != tokenizer.eos_token_id), None)
        if pad is None:
            pad = family.pad_candidates[0]
            added += _add_tokens(tokenizer, [pad], ref.model_id, "pad (never trained: padding carries no loss)")
        tokenizer.pad_token = pad
    tokenizer.padding_side = "right"
    tokenizer.ftpipe_added_ids = added  # new embedding rows that training must learn (not saved; recomputed on load)
    return tokenizer


def _add_template_tokens(tokenizer, family: Family, model_id: str) -> list[int]:
    """The family's special tokens that the chat template writes but the vocabulary lacks (a base model given an
    instruct template): added as special tokens, so they stay one token each instead of being spelled out."""
    template = tokenizer.chat_template or ""
    vocab = tokenizer.get_vocab()
    wanted = [t for t in dict.fromkeys((family.bos_token, family.end_of_turn, *family.extra_special)) if t and t in template and t not in vocab]
    return _add_tokens(tokenizer, wanted, model_id, "used by the chat template")


def _add_tokens(tokenizer, tokens: list[str], model_id: str, why: str) -> list[int]:
    if not tokens:
        return []
    tokenizer.add_tokens(tokens, special_tokens=True)
    log.warning("model.base %r lacks %s (%s): added; their embeddings are trained and the export ships a merged model",
                model_id, ", ".join(tokens), why)
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def fit_embeddings(model, tokenizer) -> bool:
    """Grow the embedding matrices when the tokenizer has ids beyond them (tokens added for the template)."""
    if len(tokenizer) <= model.get_input_embeddings().weight.shape[0]:
        return False
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return True


def _chat_template(section: ModelSection, tokenizer, family: Family) -> str:
    override = section.chat_template
    if override:
        path = Path(override)
        if "\n" not in override and override.endswith(".jinja"):
            if not path.is_file():
                raise ModelLoadError(f"model.chat_template: file not found: {override}")
            return path.read_text(encoding="utf-8")
        return override
    return tokenizer.chat_template or family.chat_template


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
