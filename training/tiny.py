"""Small random-initialised models of each family, built locally from their transformers config.

They stand in for hub models on machines without a hub (the embedded default and the tests): same
architecture code, same chat template and special tokens, a byte-level BPE tokenizer trained on the
recipe's own training text. Built once per (family, corpus) and cached.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from training.families import Family, family_for

log = logging.getLogger(__name__)

BUILDER_VERSION = "2"  # bump when the shape or tokenizer recipe changes, to invalidate caches
TINY_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MAX_POSITIONS = 2048
VOCAB_SIZE = 1024
# With the default 0.02, the frozen random LM head caps logits near 2.5, so no adapter can push the loss
# below ~4.6 nats; 1/sqrt(hidden) lets a LoRA adapter learn the task the way it would on a real model.
INIT_STD = 0.09


def cache_root() -> Path:
    return Path(os.environ.get("FTPIPE_CACHE", Path.home() / ".cache" / "ftpipe"))


def tiny_model_path(family_name: str, corpus: Callable[[], list[str]], corpus_key: str | None = None, seed: int = 0) -> Path:
    """Return the folder of the tiny model for this family and corpus, building it on first use.

    corpus_key names the corpus when the caller has a stable name for it (the prepared data's cache key),
    so a rerun finds the same model without re-reading text that later filtering may have changed."""
    from recipes.schema import TINY_MODEL_TYPES

    family = family_for(TINY_MODEL_TYPES.get(family_name, family_name))
    digest = hashlib.sha256(f"{BUILDER_VERSION}\x00{family_name}\x00{seed}\x00".encode())
    texts = None
    if corpus_key:
        digest.update(f"key:{corpus_key}".encode())
    else:
        texts = corpus()
        for text in texts:
            digest.update(text.encode() + b"\x00")
    target = cache_root() / "tiny" / f"{family_name}-{digest.hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return target
    corpus = texts if texts is not None else corpus()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build_tiny_model(family, corpus, staging, seed)
        try:
            staging.rename(target)
        except OSError:  # another process finished the same build first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("built tiny %s model at %s", family_name, target)
    return target


def build_tiny_model(family: Family, corpus: Iterable[str], out_dir: Path, seed: int = 0) -> None:
    save_tiny_model(family, train_tokenizer(family, corpus), out_dir, seed)


def save_tiny_model(family: Family, tokenizer, out_dir: Path, seed: int = 0) -> None:
    """A random tiny model of the family sized to this tokenizer, saved with it (a folder from_pretrained loads)."""
    import torch
    import transformers

    config = tiny_config(family, len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def tiny_config(family: Family, vocab_size: int = VOCAB_SIZE, **token_ids):
    """The transformers config of a family's tiny model."""
    import transformers

    config_class = getattr(transformers, family.config_class)
    return config_class(
        vocab_size=vocab_size,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        initializer_range=INIT_STD,
        **{**TINY_SHAPE, **dict(family.tiny_config)},
        **token_ids,
    )


def train_tokenizer(family: Family, corpus: Iterable[str]):
    """A byte-level BPE tokenizer with the family's special tokens and chat template."""
    pad = family.pad_candidates[0]
    tokenizer = bpe_tokenizer(corpus, [*family.extra_special], bos=family.bos_token, eos=family.end_of_turn, pad=pad,
                              unk="<unk>" if "<unk>" in family.extra_special else None)
    tokenizer.chat_template = family.chat_template
    return tokenizer


def bpe_tokenizer(corpus: Iterable[str], specials: list[str], bos: str | None, eos: str, pad: str | None, unk: str | None = None,
                  plain: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer trained on the corpus, holding bos/eos/pad/unk and `specials` as special tokens and
    `plain` as added tokens that are not special (Qwen3's <think>), as a published tokenizer declares them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    reserved = list(dict.fromkeys(t for t in (bos, eos, pad, unk, *specials) if t))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=reserved, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    if plain:
        bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
        additional_special_tokens=[t for t in reserved if t not in (bos, eos, pad, unk)], model_max_length=MAX_POSITIONS,
    )
