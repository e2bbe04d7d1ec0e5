"""Exact and near-duplicate removal (MinHash LSH with candidates verified), and the train/eval
contamination check.

Near duplicates: datasketch picks the LSH bands and rows for the recipe's threshold (its weighted
false-positive/false-negative optimisation, leaning to recall because every candidate is then verified);
a candidate pair counts only when its estimated Jaccard similarity (share of equal MinHash values) reaches
the threshold, so `threshold` means what it says. The index is kept here rather than in datasketch's
MinHashLSH, whose in-memory buckets cost ~2.5 KB a row and would not fit a 5 GB source: per kept row it
holds 8 bytes for the exact key and 8 a band (a 32-bit bucket key and a 32-bit row id) in sorted arrays,
and the row's signature goes to a file on disk, read back only for candidates.
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from recipes.schema import ContaminationSection, DedupSection

KEPT, EXACT, NEAR = 0, 1, 2
REASONS = {EXACT: "exact_duplicate", NEAR: "near_duplicate"}
LSH_WEIGHTS = (0.2, 0.8)  # false positives cost a verification; false negatives are duplicates left in


def lsh_bands(section: DedupSection) -> tuple[int, int] | None:
    """(bands, rows per band) datasketch's MinHashLSH uses for this threshold and num_perm."""
    from datasketch import MinHashLSH

    if not section.near:
        return None
    lsh = MinHashLSH(threshold=section.threshold, num_perm=section.num_perm, weights=LSH_WEIGHTS)
    return lsh.b, lsh.r


class SortedKeys:
    """A growing multiset of keys (with an optional uint32 id each) held as a few sorted arrays: a new batch
    is one more array, and arrays of similar size are merged, so there are O(log n) of them to search.
    Arrays stop growing at MAX_RUN keys, which bounds what a merge needs on top of the keys themselves.

    A bitmap of the keys' low `bitmap_bits` bits answers most lookups of absent keys (nearly all of them:
    most rows are new) without a binary search; the rest are searched in sorted order, which keeps the
    searches in cache."""

    MAX_RUN = 2**23

    def __init__(self, bitmap_bits: int = 27) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._mask = np.uint64(2**bitmap_bits - 1)
        self._bitmap = np.zeros(2 ** (bitmap_bits - 3), dtype=np.uint8)

    def _maybe(self, values: np.ndarray) -> np.ndarray:
        """Indices of the values the bitmap cannot rule out, ordered by value."""
        low = values.astype(np.uint64) & self._mask
        maybe = np.flatnonzero((self._bitmap[low >> np.uint64(3)] >> (low & np.uint64(7)).astype(np.uint8)) & 1)
        return maybe[np.argsort(values[maybe], kind="stable")]

    def contains(self, values: np.ndarray) -> np.ndarray:
        found = np.zeros(values.shape, dtype=bool)
        maybe = self._maybe(values)
        for keys, _ in self.runs:
            at = np.minimum(np.searchsorted(keys, values[maybe]), len(keys) - 1)
            found[maybe] |= keys[at] == values[maybe]
        return found

    def matches(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index into values, id) for every stored key equal to a value."""
        queries, ids = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.uint32)]
        maybe = self._maybe(values)
        for keys, run_ids in self.runs:
            left = np.minimum(np.searchsorted(keys, values[maybe], "left"), len(keys) - 1)
            equal = keys[left] == values[maybe]
            if not equal.any():
                continue
            hit, start = maybe[equal], left[equal]
            repeats = np.searchsorted(keys, values[hit], "right") - start
            offsets = np.arange(int(repeats.sum())) - np.repeat(np.cumsum(repeats) - repeats, repeats)
            queries.append(np.repeat(hit, repeats))
            ids.append(run_ids[np.repeat(start, repeats) + offsets])
        return np.concatenate(queries), np.concatenate(ids)

    def add(self, values: np.ndarray, ids: np.ndarray | None = None) -> None:
        if not values.size:
            return
        low = values.ravel().astype(np.uint64) & self._mask
        np.bitwise_or.at(self._bitmap, low >> np.uint64(3), np.left_shift(1, low & np.uint64(7)).astype(np.uint8))
        self.runs.append(_sorted_run(values.ravel(), ids))
        while len(self.runs) > 1 and len(self.runs[-1][0]) * 4 >= len(self.runs[-2][0]) and \
                len(self.runs[-2][0]) + len(self.runs[-1][0]) <= self.MAX_RUN:
            (newer, newer_ids), (older, older_ids) = self.runs.pop(), self.runs.pop()
            self.runs.append(_sorted_run(np.concatenate((older, newer)), None if ids is None else np.concatenate((older_ids, newer_ids))))


def _sorted_run(keys: np.ndarray, ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    if ids is None:
        return np.sort(keys), None
    order = np.argsort(keys, kind="stable")
    return keys[order], ids.ravel()[order]


class SignatureStore:
    """Kept rows' MinHash signatures, appended to a file; read back by row id for candidate pairs."""

    def __init__(self, path: Path, num_perm: int):
        self.path, self.row_bytes, self.count = path, 4 * num_perm, 0
        self._file = path.open("w+b")

    def append(self, signatures: np.ndarray) -> np.ndarray:
        self._file.seek(0, os.SEEK_END)
        self._file.write(np.ascontiguousarray(signatures, dtype=np.uint32).tobytes())
        self._file.flush()
        ids = np.arange(self.count, self.count + len(signatures), dtype=np.uint32)
        self.count += len(signatures)
        return ids

    def read(self, ids: np.ndarray) -> np.ndarray:
        fd = self._file.fileno()
        data = b"".join(os.pread(fd, self.row_bytes, int(i) * self.row_bytes) for i in ids.tolist())
        return np.frombuffer(data, dtype=np.uint32).reshape(len(ids), -1)

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class Deduplicator:
    """Remembers the rows it has kept; decides a chunk of new rows at a time, in order, as if row by row:
    a row is an exact duplicate when its content key was seen, a near duplicate when its estimated
    similarity to a kept row reaches the threshold. `decide` does not remember; `commit` remembers the rows
    actually taken (a source stopped by max_samples does not take the rest of its chunk)."""

    def __init__(self, section: DedupSection, spill_dir: Path):
        self.section = section
        self._exact = SortedKeys(bitmap_bits=27)  # 16 MB
        self._bands = SortedKeys(bitmap_bits=30)  # 128 MB: several keys a row
        self._store = SignatureStore(Path(spill_dir) / f".signatures-{id(self)}.bin", section.num_perm) if section.near else None

    def __enter__(self) -> Deduplicator:
        return self

    def __exit__(self, *exc) -> None:
        if self._store is not None:
            self._store.close()

    def decide(self, keys: np.ndarray, bands: np.ndarray | None, signatures: np.ndarray | None) -> np.ndarray:
        """KEPT, EXACT or NEAR for each row."""
        verdict = np.full(len(keys), KEPT, dtype=np.uint8)
        if self.section.exact:
            first = np.zeros(len(keys), dtype=bool)
            first[np.unique(keys, return_index=True)[1]] = True
            verdict[~first | self._exact.contains(keys)] = EXACT
        if self._store is not None and bands is not None:
            candidates = np.flatnonzero(verdict == KEPT)
            verdict[self._near_kept_rows(candidates, bands, signatures)] = NEAR
            verdict[self._near_within(np.flatnonzero(verdict == KEPT), bands, signatures)] = NEAR
        return verdict

    def commit(self, keys: np.ndarray, bands: np.ndarray | None, signatures: np.ndarray | None, verdict: np.ndarray) -> None:
        """Remember rows as decided: exact keys of every row that was not an exact duplicate (as a
        row-by-row index would have seen them); band keys and signatures of the kept rows."""
        if self.section.exact:
            self._exact.add(keys[verdict != EXACT])
        if self._store is not None and bands is not None:
            kept = verdict == KEPT
            ids = self._store.append(signatures[kept])
            self._bands.add(bands[kept], np.repeat(ids, bands.shape[1]))

    def _similar(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.mean(a == b, axis=-1) >= self.section.threshold

    def _near_kept_rows(self, rows: np.ndarray, bands: np.ndarray, signatures: np.ndarray) -> np.ndarray:
        """Rows with an earlier kept row (from earlier chunks) at or above the threshold."""
        if not len(rows) or not self._bands.runs:
            return rows[:0]
        queries, ids = self._bands.matches(bands[rows].ravel())
        if not len(ids):
            return rows[:0]
        pairs = np.unique((rows[queries // bands.shape[1]].astype(np.uint64) << np.uint64(32)) | ids.astype(np.uint64))
        row_of, id_of = (pairs >> np.uint64(32)).astype(np.int64), (pairs & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        unique_ids, where = np.unique(id_of, return_inverse=True)
        similar = self._similar(signatures[row_of], self._store.read(unique_ids)[where])
        return np.unique(row_of[similar])

    def _near_within(self, rows: np.ndarray, bands: np.ndarray, signatures: np.ndarray) -> list[int]:
        """Rows (of `rows`, in order) similar to an earlier kept row of the same chunk. Only rows with a
        band key that occurs twice need looking at one by one."""
        if len(rows) < 2:
            return []
        keys = bands[rows]
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        shared = (counts[inverse.reshape(keys.shape)] > 1).any(axis=1)
        kept_by_key: dict[int, list[int]] = defaultdict(list)
        duplicates = []
        for row, row_keys in zip(rows[shared].tolist(), keys[shared].tolist(), strict=True):
            earlier = {other for key in row_keys for other in kept_by_key.get(key, ())}
            if earlier and self._similar(signatures[sorted(earlier)], signatures[row]).any():
                duplicates.append(row)
                continue
            for key in row_keys:
                kept_by_key[key].append(row)
        return duplicates


def eval_prompt_text(row: dict) -> str:
    """What a model is asked in an eval row: user turns (and system), not the reference answer."""
    if "text" in row:
        return row["text"]
    messages = row["messages"] if "messages" in row else row["prompt"]
    return "\n".join(m["content"] for m in messages if m["role"] != "assistant")


class ContaminationIndex:
    """Word n-gram hashes of the eval prompts; finds training rows holding most of one eval prompt.

    Training rows come as the same kind of hashes (computed in the workers), checked a batch at a time
    with numpy: a bitmap of the eval grams' low 28 bits rules out almost every training gram with one
    lookup, a binary search confirms the rest, and only rows that share a gram with some eval prompt are
    looked at one by one."""

    BITMAP_BITS = 28  # 32 MB; ~0.2% false positives with 600,000 eval grams

    def __init__(self, section: ContaminationSection):
        from data_prep.rows import Sketcher

        self.section = section
        self.sketcher = Sketcher(num_perm=None, ngram=section.ngram)
        self._postings: dict[int, list[int]] = defaultdict(list)
        self._sizes: list[int] = []
        self._all = np.zeros(0, dtype=np.uint32)
        self._bitmap = np.zeros(2 ** (self.BITMAP_BITS - 3), dtype=np.uint8)

    def add_eval_rows(self, rows: list[dict]) -> None:
        rows = rows[: self.section.max_eval_rows - len(self._sizes)]
        if not rows:
            return
        _, _, grams, counts = self.sketcher.sketch([eval_prompt_text(row) for row in rows])
        for values in np.split(grams, np.cumsum(counts)[:-1]):
            index = len(self._sizes)
            self._sizes.append(len(values))
            for value in values.tolist():
                self._postings[value].append(index)
        self._all = np.sort(np.fromiter(self._postings.keys(), dtype=np.uint32, count=len(self._postings)))
        low = self._all & np.uint32(2**self.BITMAP_BITS - 1)
        np.bitwise_or.at(self._bitmap, low >> 3, np.left_shift(1, low & 7).astype(np.uint8))

    def _known(self, values: np.ndarray) -> np.ndarray:
        """Which values are eval grams: the bitmap, then a binary search for the few it lets through."""
        low = values & np.uint32(2**self.BITMAP_BITS - 1)
        maybe = np.flatnonzero((self._bitmap[low >> 3] >> (low & 7).astype(np.uint8)) & 1)
        known = np.zeros(len(values), dtype=bool)
        positions = np.minimum(np.searchsorted(self._all, values[maybe]), len(self._all) - 1)
        known[maybe] = self._all[positions] == values[maybe]
        return known

    @property
    def indexed(self) -> int:
        return len(self._sizes)

    def overlaps(self, flat: np.ndarray, sizes: np.ndarray) -> list[list[tuple[int, float]]]:
        """For each training row (its gram hashes, rows one after another in `flat`, `sizes` per row):
        (eval row index, share of that eval prompt's grams found) at or above min_overlap."""
        result: list[list[tuple[int, float]]] = [[] for _ in range(len(sizes))]
        if not len(flat) or not len(self._all):
            return result
        hit = self._known(flat)
        if not hit.any():
            return result
        starts = np.cumsum(sizes) - sizes
        hits_per_row = np.bincount(np.repeat(np.arange(len(sizes)), sizes)[hit], minlength=len(sizes))
        for row in np.flatnonzero(hits_per_row).tolist():
            segment = slice(starts[row], starts[row] + sizes[row])
            counts: Counter[int] = Counter()
            for value in np.unique(flat[segment][hit[segment]]).tolist():
                counts.update(self._postings[value])
            result[row] = [(i, round(c / self._sizes[i], 4)) for i, c in counts.items()
                           if self._sizes[i] and c / self._sizes[i] >= self.section.min_overlap]
        return result
