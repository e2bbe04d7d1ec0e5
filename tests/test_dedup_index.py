"""The de-duplication index and sketches behind the data stage, checked against datasketch and plain Python."""
from __future__ import annotations

import random

import numpy as np
import pytest

from data_prep.dedup import EXACT, KEPT, LSH_WEIGHTS, NEAR, Deduplicator, SortedKeys, lsh_bands
from data_prep.rows import Sketcher
from recipes.schema import DedupSection

WORDS = [f"w{i}" for i in range(400)]


def variants(count: int, seed: int = 0) -> list[str]:
    """Texts of 40-60 words, many of them edits of earlier ones (1-8 words changed), so estimated
    similarities spread over the whole range around the threshold."""
    rng = random.Random(seed)
    texts: list[str] = []
    for _ in range(count):
        if texts and rng.random() < 0.5:
            words = rng.choice(texts).split()
            for _ in range(rng.randint(1, 8)):
                words[rng.randrange(len(words))] = rng.choice(WORDS)
        else:
            words = [rng.choice(WORDS) for _ in range(rng.randint(40, 60))]
        texts.append(" ".join(words))
    return texts


def test_sorted_keys_finds_every_stored_key_and_id():
    rng = np.random.default_rng(0)
    index, expected = SortedKeys(), {}
    index.MAX_RUN = 5_000  # several frozen runs, as a large source would have
    for batch in range(40):
        keys = rng.integers(0, 3_000, 500, dtype=np.uint64).astype(np.uint32)  # many repeats
        ids = np.arange(batch * 500, batch * 500 + 500, dtype=np.uint32)
        index.add(keys, ids)
        for key, id_ in zip(keys.tolist(), ids.tolist(), strict=True):
            expected.setdefault(key, set()).add(id_)
    queries = np.arange(0, 3_500, dtype=np.uint32)
    positions, ids = index.matches(queries)
    found: dict[int, set] = {}
    for position, id_ in zip(positions.tolist(), ids.tolist(), strict=True):
        found.setdefault(int(queries[position]), set()).add(id_)
    assert found == expected
    assert index.contains(queries).tolist() == [int(q) in expected for q in queries]
    assert len(index.runs) < 10 and sum(keys.nbytes + ids.nbytes for keys, ids in index.runs) == 8 * 40 * 500


def test_word_hashes_and_signatures_do_not_depend_on_neighbours():
    sketcher = Sketcher(num_perm=32, ngram=3, bands=(4, 8))
    alone = sketcher.sketch(["alpha beta gamma delta"])
    in_chunk = sketcher.sketch(["zeta", "Alpha  beta\ngamma delta", "", "x y"])
    assert np.array_equal(alone[1][0], in_chunk[1][1]) and np.array_equal(alone[0][0], in_chunk[0][1])
    words, counts = sketcher.words(["b a", "a b c", "   "])
    assert counts.tolist() == [2, 3, 1] and words[1] == words[2] and words[0] == words[3] and words[0] != words[1]


def test_signature_is_the_minhash_of_the_word_3_grams():
    sketcher = Sketcher(num_perm=16, ngram=None, bands=(2, 8))
    text = "one two three four five two three four"
    _, signatures, _, _ = sketcher.sketch([text])
    w = [int(v) for v in sketcher.words([text])[0]]
    grams = {(a * 0x9E3779B1 ^ b * 0x85EBCA77 ^ c * 0xC2B2AE3D) & 0xFFFFFFFF for a, b, c in zip(w, w[1:], w[2:], strict=False)}
    expected = [min((g * int(a) + int(b)) & 0xFFFFFFFF for g in grams) for a, b in zip(sketcher.a, sketcher.b, strict=True)]
    assert signatures[0].tolist() == expected


@pytest.mark.parametrize("threshold", [0.6, 0.8, 0.9])
def test_near_duplicate_decisions_match_datasketch_row_by_row(tmp_path, threshold):
    """Chunked decisions (across and within chunks) equal datasketch's MinHashLSH queried and filled one
    row at a time with the same bands, each candidate verified by MinHash.jaccard."""
    from datasketch import LeanMinHash, MinHashLSH

    section = DedupSection(exact=False, threshold=threshold)
    texts = variants(1_500)
    sketcher = Sketcher(section.num_perm, None, lsh_bands(section))
    bands, signatures, _, _ = sketcher.sketch(texts)

    lsh = MinHashLSH(threshold=threshold, num_perm=section.num_perm, weights=LSH_WEIGHTS)
    assert (lsh.b, lsh.r) == lsh_bands(section)
    kept, expected = {}, []
    for i, signature in enumerate(signatures):
        minhash = LeanMinHash(seed=1, hashvalues=signature.astype(np.uint64), scheme="affine32")
        if any(minhash.jaccard(kept[j]) >= threshold for j in lsh.query(minhash)):
            expected.append(NEAR)
            continue
        kept[i] = minhash
        lsh.insert(i, minhash)
        expected.append(KEPT)

    verdicts = []
    with Deduplicator(section, tmp_path) as dedup:
        keys = np.arange(len(texts), dtype=np.uint64)
        for start in range(0, len(texts), 97):
            part = slice(start, start + 97)
            verdict = dedup.decide(keys[part], bands[part], signatures[part])
            dedup.commit(keys[part], bands[part], signatures[part], verdict)
            verdicts.extend(verdict.tolist())
    assert verdicts == expected
    assert 20 <= expected.count(NEAR) <= 0.6 * len(expected)  # the data exercises both outcomes


def test_exact_duplicates_within_and_across_chunks(tmp_path):
    with Deduplicator(DedupSection(near=False), tmp_path) as dedup:
        first = np.array([1, 2, 1, 3], dtype=np.uint64)
        verdict = dedup.decide(first, None, None)
        dedup.commit(first, None, None, verdict)
        second = np.array([3, 4, 4], dtype=np.uint64)
        assert verdict.tolist() == [KEPT, KEPT, EXACT, KEPT]
        assert dedup.decide(second, None, None).tolist() == [EXACT, KEPT, EXACT]


def test_benchmark_catches_what_it_plants(tmp_path):
    """bench/data_prep.py at a small size: every planted kind is caught and the counts reconcile."""
    from bench import data_prep as bench

    planted = bench.generate(tmp_path / "rows.jsonl", None, 6_000)
    _, data, peak_mb = bench.measure_stage(tmp_path / "rows.jsonl", tmp_path / "out", 2)
    recall = bench.recall(data, planted)
    assert recall["exact duplicates"] == 1.0 and recall["bad rows"] == 1.0 and recall["PII"] == 1.0
    assert recall["near duplicates"] >= 0.95
    counts = data["sources"][0]
    assert counts["rows_in"] == 6_000 == counts["kept"] + counts["quarantined"] + sum(counts["removed"].values())
    assert peak_mb > 0
