"""Exact and near-duplicate removal (datasketch MinHash LSH), and the train/eval contamination check."""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import xxhash

from recipes.schema import ContaminationSection, DedupSection


class Deduplicator:
    """Remembers what it has kept; says why a new row is a duplicate (or None when it is new)."""

    def __init__(self, section: DedupSection):
        from datasketch import LeanMinHash, MinHashLSH

        self.section = section
        # LeanMinHash: a frozen sketch built from our values without generating permutations again
        self._lean = LeanMinHash
        self._seen: set[int] = set()
        # bands are stored as 8-byte digests rather than raw slices of the signature: a fraction of the memory
        self._lsh = MinHashLSH(threshold=section.threshold, num_perm=section.num_perm, hashfunc=xxhash.xxh3_64_digest) if section.near else None
        self._next_id = 0

    def check(self, key: int, signature: bytes | None) -> str | None:
        if self.section.exact:
            if key in self._seen:
                return "exact_duplicate"
            self._seen.add(key)
        if self._lsh is not None and signature is not None:
            minhash = self._lean(seed=1, hashvalues=np.frombuffer(signature, dtype=np.uint64), scheme="affine32")
            if self._lsh.query(minhash):
                return "near_duplicate"
            self._lsh.insert(self._next_id, minhash, check_duplication=False)
            self._next_id += 1
        return None


def eval_prompt_text(row: dict) -> str:
    """What a model is asked in an eval row: user turns (and system), not the reference answer."""
    if "text" in row:
        return row["text"]
    messages = row["messages"] if "messages" in row else row["prompt"]
    return "\n".join(m["content"] for m in messages if m["role"] != "assistant")


class ContaminationIndex:
    """Word n-gram hashes of the eval prompts; finds training rows holding most of one eval prompt.

    Training rows come as the same kind of hash arrays (computed in the workers), checked a batch at a time
    with numpy; only rows that share a gram with some eval prompt are looked at one by one."""

    def __init__(self, section: ContaminationSection):
        from data_prep.rows import Sketcher

        self.section = section
        self.sketcher = Sketcher(num_perm=None, ngram=section.ngram)
        self._postings: dict[int, list[int]] = defaultdict(list)
        self._sizes: list[int] = []
        self._all = np.zeros(0, dtype=np.uint32)

    def add_eval_rows(self, rows: list[dict]) -> None:
        rows = rows[: self.section.max_eval_rows - len(self._sizes)]
        _, grams = self.sketcher.sketch([[eval_prompt_text(row)] for row in rows])
        for values in grams:
            index = len(self._sizes)
            self._sizes.append(len(values))
            for value in values.tolist():
                self._postings[value].append(index)
        self._all = np.sort(np.fromiter(self._postings.keys(), dtype=np.uint32, count=len(self._postings)))

    def _known(self, values: np.ndarray) -> np.ndarray:
        """Which values are eval grams: a binary search in the sorted array (np.isin would rehash it per call)."""
        positions = np.minimum(np.searchsorted(self._all, values), len(self._all) - 1)
        return self._all[positions] == values

    @property
    def indexed(self) -> int:
        return len(self._sizes)

    def overlaps(self, batch: list[np.ndarray]) -> list[list[tuple[int, float]]]:
        """For each training row's gram array: (eval row index, share of its grams found) at or above min_overlap."""
        result: list[list[tuple[int, float]]] = [[] for _ in batch]
        if not batch or not len(self._all):
            return result
        sizes = np.fromiter(map(len, batch), dtype=np.int64, count=len(batch))
        flat = np.concatenate(batch) if sizes.sum() else np.zeros(0, dtype=np.uint32)
        hit = self._known(flat)
        if not hit.any():
            return result
        starts = np.cumsum(sizes) - sizes
        # rows with at least one known gram (reduceat reads one element for an empty segment, hence the guard)
        any_hit = (np.add.reduceat(hit, np.minimum(starts, len(hit) - 1)) > 0) & (sizes > 0)
        for row in np.flatnonzero(any_hit).tolist():
            segment = slice(starts[row], starts[row] + sizes[row])
            counts: Counter[int] = Counter()
            for value in flat[segment][hit[segment]].tolist():
                counts.update(self._postings[value])
            result[row] = [(i, round(c / self._sizes[i], 4)) for i, c in counts.items()
                           if self._sizes[i] and c / self._sizes[i] >= self.section.min_overlap]
        return result
