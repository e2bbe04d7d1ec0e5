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
from training.tokenize import SENTINEL, RenderSettings, render

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """The base model or its tokenizer cannot be used; the message says which and why."""


def refused_input(exc: BaseException) -> ModelLoadError | None:
    """The ModelLoadError a fault of the model folder becomes, wherever it surfaces (the training worker, evaluation):
    a pickle that torch's weights-only loader refuses to run, a chat template that does not compile or render."""
    import pickle

    from jinja2 import TemplateError

    if isinstance(exc, pickle.UnpicklingError):
        return ModelLoadError(f"model weights: refused to unpickle a checkpoint that is not plain tensors (weights-only "
                              f"loading; ship safetensors): {_first_line(exc)[:300]}")
    if isinstance(exc, TemplateError):
        return ModelLoadError(f"chat template: {type(exc).__name__}: {_first_line(exc)[:300]}")
    return None


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


def load_tokenizer(ref: BaseModelRef, section: ModelSection, render_date: str | None = None):
    """The tokenizer with a chat template, its real end-of-turn token as eos, a pad token that is not the
    end-of-turn token, and the render settings (fixed date, chat_template_kwargs) every rendering uses."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.path, revision=ref.revision, trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.base: cannot load the tokenizer of {ref.model_id!r}: {_first_line(exc)}") from None
    family = ref.family
    tokenizer.chat_template = _chat_template(section, tokenizer, family)
    tokenizer.ftpipe_render = RenderSettings(date=section.template_date or render_date,
                                             kwargs=tuple(sorted(section.chat_template_kwargs.items())))
    added = _add_template_tokens(tokenizer, family, ref.model_id)
    end_of_turn = end_of_turn_token(tokenizer, family)
    if end_of_turn:
        tokenizer.eos_token = end_of_turn
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        pad = _unused_pad(tokenizer, family)
        if pad is None:
            pad = family.pad_candidates[0]
            tokenizer.add_tokens([pad], special_tokens=True)
            added.append(tokenizer.convert_tokens_to_ids(pad))
            log.warning("model.base %r has no pad token other than its end-of-turn token and no unused special token: added %s "
                        "(padding carries no loss, so its embedding is never trained)", ref.model_id, pad)
        tokenizer.pad_token = pad
    tokenizer.padding_side = "right"
    tokenizer.ftpipe_added_ids = added  # new embedding rows that training must learn (not saved; recomputed on load)
    return tokenizer


RENDER_FILE = "ftpipe_render.json"  # beside a saved tokenizer: the render settings training used


def save_render_settings(tokenizer, folder: Path) -> None:
    import json

    (Path(folder) / RENDER_FILE).write_text(json.dumps(tokenizer.ftpipe_render.to_dict(), indent=2))


def load_saved_tokenizer(folder: str | Path, settings: RenderSettings | None = None):
    """A tokenizer saved by training (the adapter folder) with the render settings training used, or those given."""
    import json

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    saved = Path(folder) / RENDER_FILE
    tokenizer.ftpipe_render = settings or RenderSettings.from_dict(json.loads(saved.read_text()) if saved.is_file() else None)
    return tokenizer


def end_of_turn_token(tokenizer, family: Family) -> str | None:
    """The special token the chat template writes right after an assistant turn's content (what a server stops on):
    read from the template itself, since a tokenizer with its own template (DeepSeek-R1-Distill on a Qwen
    vocabulary) may end turns differently from its family's default."""
    try:
        text = render(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": SENTINEL}])
    except Exception:  # a template that needs more than a plain exchange: fall back to the family's token
        text = ""
    after = text.split(SENTINEL, 1)[1] if SENTINEL in text else ""
    specials = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    for token_id in tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []:
        if token_id in specials:
            return tokenizer.convert_ids_to_tokens(token_id)
    return family.end_of_turn if family.end_of_turn in tokenizer.get_vocab() else None


def _unused_pad(tokenizer, family: Family) -> str | None:
    """A pad token that is neither end-of-turn nor written by the template: the family's pad, else an unused special
    or reserved token the vocabulary already has (its embedding exists; padding never trains it)."""
    vocab = tokenizer.get_vocab()
    taken = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    for token in family.pad_candidates:
        if token in vocab and vocab[token] not in taken:
            return token
    template = tokenizer.chat_template or ""
    spare = [t.content for i, t in sorted(tokenizer.added_tokens_decoder.items())
             if t.special and i not in taken and t.content not in template and "think" not in t.content]
    return next((t for t in spare if "pad" in t.lower()), None) or next((t for t in spare if "reserved" in t.lower()), None) \
        or (spare[0] if spare else None)


def _add_template_tokens(tokenizer, family: Family, model_id: str) -> list[int]:
    """The family's markers that its real tokenizers hold as one special token, which this template writes but
    this vocabulary lacks (a base model given an instruct template): added, so each stays one token. Markers the
    family's tokenizers spell in pieces (Mistral v1's `[INST]`) stay text, as the real model reads them."""
    template = tokenizer.chat_template or ""
    vocab = tokenizer.get_vocab()
    wanted = [t for t in dict.fromkeys((family.bos_token, family.end_of_turn, *family.template_tokens))
              if t and t in template and t not in vocab]
    if not wanted:
        return []
    tokenizer.add_tokens(wanted, special_tokens=True)
    log.warning("model.base %r lacks %s (written by the chat template as one special token each): added; their embeddings "
                "are trained, and the export ships a merged model", model_id, ", ".join(wanted))
    return [tokenizer.convert_tokens_to_ids(t) for t in wanted]


def fit_embeddings(model, tokenizer) -> bool:
    """Grow the embedding matrices when the tokenizer has ids beyond them (tokens added for the template)."""
    if len(tokenizer) <= model.get_input_embeddings().weight.shape[0]:
        return False
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return True


def _chat_template(section: ModelSection, tokenizer, family: Family) -> str:
    return chat_template_override(section) or tokenizer.chat_template or family.chat_template


def chat_template_override(section: ModelSection) -> str | None:
    """model.chat_template's text: the template itself, or read from the .jinja file it names."""
    override = section.chat_template
    if override and "\n" not in override and override.endswith(".jinja"):
        if not Path(override).is_file():
            raise ModelLoadError(f"model.chat_template: file not found: {override}")
        return Path(override).read_text(encoding="utf-8")
    return override


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
