"""Find and redact personal data and secrets with typed placeholders (`<EMAIL>`, `<SECRET>`, ...).

One combined regular expression finds candidates in a single pass; candidates that carry a checksum are
confirmed before they are replaced (Luhn for card numbers, mod-97 for IBANs, `ipaddress` for IPs), so
order numbers and version strings are left alone.
"""
from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Iterable

PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "credit_card": "<CREDIT_CARD>", "iban": "<IBAN>",
                "ip_address": "<IP_ADDRESS>", "secret": "<SECRET>"}

_PATTERNS = {
    # secrets first: a key block or token can contain things that look like other types
    "secret": r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"
              r"|\bAKIA[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{36,}\b|\bxox[abprs]-[A-Za-z0-9-]{10,}\b"
              r"|\bsk-[A-Za-z0-9_-]{20,}\b|\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"
              r"|(?i:\bbearer\s+)[A-Za-z0-9._~+/-]{20,}=*|\bAIza[0-9A-Za-z_-]{35}\b",
    "email": r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b",
    "iban": r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b",
    "credit_card": r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])",
    "ip_address": r"(?<![\w.:])(?:\d{1,3}(?:\.\d{1,3}){3}|(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4})(?![\w.:])",
    "phone": r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?!\w)",
}


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban_ok(text: str) -> bool:
    compact = text.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _ip_ok(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return address.version == 6 or text.count(".") == 3


def _phone_ok(text: str) -> bool:
    """International numbers (+ or a bracketed area code) have 9-15 digits; bare national ones 9-11."""
    digits = sum(c.isdigit() for c in text)
    if text.startswith(("+", "(")):
        return 9 <= digits <= 15
    return 9 <= digits <= 11 and any(c in text for c in " .-")


_CONFIRM = {
    "credit_card": lambda t: _luhn(re.sub(r"\D", "", t)),
    "iban": _iban_ok,
    "ip_address": _ip_ok,
    "phone": _phone_ok,
}


# Cheap checks that must pass before a type's full pattern runs: most text has no PII, and the full patterns
# (lookarounds, alternations) cost far more. Substring tests run in C; the digit test is one scan shared by
# the types that need digits.
_SECRET_MARKERS = ("PRIVATE KEY", "AKIA", "hp_", "ho_", "hu_", "hs_", "hr_", "xox", "sk-", "eyJ", "earer", "AIza")
_DIGIT = re.compile(r"\d")
_GATES = {
    "secret": lambda text, digits: any(marker in text for marker in _SECRET_MARKERS),
    "email": lambda text, digits: "@" in text,
    "iban": lambda text, digits: digits and _IBAN_GATE.search(text) is not None,
    "credit_card": lambda text, digits: digits and _CARD_GATE.search(text) is not None,
    "ip_address": lambda text, digits: ":" in text or (digits and _IPV4_GATE.search(text) is not None),
    "phone": lambda text, digits: digits and _PHONE_GATE.search(text) is not None,
}
_IBAN_GATE = re.compile(r"[A-Z]{2}\d{2}")
_CARD_GATE = re.compile(r"\d(?:\D{0,2}\d){12}")
_IPV4_GATE = re.compile(r"\.\d{1,3}\.\d")
_PHONE_GATE = re.compile(r"\d(?:\D{0,3}\d){8}")


class Redactor:
    """Redacts the configured PII types; counts what it replaced."""

    def __init__(self, types: Iterable[str]):
        self.types = [t for t in _PATTERNS if t in set(types)]
        self._regexes = [(t, _GATES[t], re.compile(_PATTERNS[t])) for t in self.types]

    def redact(self, text: str, counts: Counter) -> str:
        digits = _DIGIT.search(text) is not None
        for kind, gate, regex in self._regexes:
            if gate(text, digits):
                text = regex.sub(lambda m, kind=kind: self._replace(kind, m, counts), text)
        return text

    @staticmethod
    def _replace(kind: str, match: re.Match, counts: Counter) -> str:
        value = match.group(0)
        confirm = _CONFIRM.get(kind)
        if confirm is not None and not confirm(value):
            return value
        counts[kind] += 1
        return PLACEHOLDERS[kind]
