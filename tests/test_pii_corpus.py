"""Each PII detector against its corpus (tests/pii_corpus/<type>.json): every positive replaced exactly where it is
marked, every look-alike left alone with all detectors on."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from data_prep.pii import PLACEHOLDERS, Redactor

CORPUS = Path(__file__).parent / "pii_corpus"
ALL = Redactor(list(PLACEHOLDERS))
MARKED = re.compile(r"\[\[(.+?)\]\]", re.S)


def _cases(part: str) -> list:
    return [(kind, text) for kind in PLACEHOLDERS for text in json.loads((CORPUS / f"{kind}.json").read_text())[part]]


@pytest.mark.parametrize(("kind", "text"), _cases("positives"))
def test_detector_replaces_each_positive_and_nothing_else(kind, text):
    counts = Counter()
    expected = MARKED.sub(PLACEHOLDERS[kind], text)
    assert ALL.redact(MARKED.sub(r"\1", text), counts) == expected
    assert counts == Counter({kind: len(MARKED.findall(text))})


@pytest.mark.parametrize(("kind", "text"), _cases("negatives"))
def test_look_alikes_stay(kind, text):
    counts = Counter()
    assert ALL.redact(text, counts) == text, f"{kind} look-alike changed"
    assert not counts


def test_only_the_named_types_run():
    """A type switched off leaves its values alone, even the ones another type's context would point at."""
    text = "aws secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY, card 4111.1111.1111.1111, mail a@b.io"
    counts = Counter()
    assert Redactor(["email"]).redact(text, counts) == text.replace("a@b.io", "<EMAIL>")
    assert counts == Counter({"email": 1})
