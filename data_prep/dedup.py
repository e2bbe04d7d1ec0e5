"""Exact and near-duplicate removal (datasketch MinHash LSH), and the train/eval contamination check."""
from __future__ import annotations

import re
from collections import Counter, defaultdict

import numpy as np
import xxhash

from recipes.schema import ContaminationSection, DedupSection

_WORD = re.compile(r"\w+")


class Deduplicator:
    """Remembers what it has kept; says why a new row is a duplicate (or None when it is new)."""

    def __init__(self, section: DedupSection):
        from datasketch import MinHashLSH

        self.section = section
        self._seen: set[int] = set()
        # bands are stored as 8-byte digests rather than raw slices of the signature: a fraction of the memory
        self._lsh = MinHashLSH(threshold=section.threshold, num_perm=section.num_perm, hashfunc=xxhash.xxh3_64_digest) if section.near else None
        self._next_id = 0

    def check(self, key: int, signature: np.ndarray | None) -> str | None:
        if self.section.exact:
            if key in self._seen:
                return "exact_duplicate"
            self._seen.add(key)
        if self._lsh is not None and signature is not None:
            from datasketch import LeanMinHash

            # LeanMinHash: a frozen sketch built from our values without generating permutations again
            minhash = LeanMinHash(seed=1, hashvalues=signature, scheme="affine32")
            if self._lsh.query(minhash):
                return "near_duplicate"
            self._lsh.insert(self._next_id, minhash, check_duplication=False)
            self._next_id += 1
        return None


def ngram_hashes(text: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams as tuples: Python hashes them in C, and the index lives in this one process."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return set(zip(*(words[i:] for i in range(n))))


def eval_prompt_text(row: dict) -> str:
    """What a model is asked in an eval row: user turns (and system), not the reference answer."""
    if "text" in row:
        return row["text"]
    messages = row["messages"] if "messages" in row else row["prompt"]
    return "\n".join(m["content"] for m in messages if m["role"] != "assistant")


class ContaminationIndex:
    """Word n-grams of the eval prompts; finds training rows that contain most of one eval prompt."""

    def __init__(self, section: ContaminationSection):
        self.section = section
        self._postings: dict[tuple[str, ...], list[int]] = defaultdict(list)
        self._sizes: list[int] = []

    def add_eval_row(self, row: dict) -> None:
        if len(self._sizes) >= self.section.max_eval_rows:
            return
        grams = ngram_hashes(eval_prompt_text(row), self.section.ngram)
        index = len(self._sizes)
        self._sizes.append(len(grams))
        for gram in grams:
            self._postings[gram].append(index)

    @property
    def indexed(self) -> int:
        return len(self._sizes)

    def overlaps(self, text: str) -> list[tuple[int, float]]:
        """(eval row index, share of its n-grams found in text) for every eval row at or above min_overlap."""
        grams = ngram_hashes(text, self.section.ngram)
        if self._postings.keys().isdisjoint(grams):  # the common case, decided in C
            return []
        hits: Counter[int] = Counter()
        for gram in grams:
            for index in self._postings.get(gram, ()):
                hits[index] += 1
        return [(i, round(c / self._sizes[i], 4)) for i, c in hits.items() if self._sizes[i] and c / self._sizes[i] >= self.section.min_overlap]
