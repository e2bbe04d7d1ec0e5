"""Find and redact personal data and secrets with typed placeholders (`<EMAIL>`, `<SECRET>`, ...).

Each detector is a regular expression behind a cheap gate. Candidates that carry a checksum or a shape are
confirmed before they are replaced (Luhn and grouping for card numbers, country length and mod-97 for IBANs,
`ipaddress` for IPs, a mix of character classes for AWS secret keys), so order numbers, version strings and
commit hashes are left alone. tests/pii_corpus/ holds each detector's positives and look-alikes.
"""
from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "credit_card": "<CREDIT_CARD>", "iban": "<IBAN>",
                "ip_address": "<IP_ADDRESS>", "secret": "<SECRET>"}

_TOKENS = (  # secrets recognisable by their own shape
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key ids (long-term, temporary)
    r"|\bgh[pousr]_[A-Za-z0-9]{36,}\b|\bxox[abprs]-[A-Za-z0-9-]{10,}\b"  # GitHub, Slack
    r"|\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,}\b|\bwhsec_[A-Za-z0-9+/=]{24,}"  # Stripe secret/restricted keys, webhook secrets
    r"|\bsk-[A-Za-z0-9_-]{20,}\b|\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"  # OpenAI-style keys, JWTs
    r"|(?i:\bbearer\s+)[A-Za-z0-9._~+/-]{20,}=*|\bAIza[0-9A-Za-z_-]{35}\b"  # bearer tokens, Google API keys
)
# An AWS secret access key is 40 characters of base64 with no prefix of its own: it counts as one only near what
# names it (aws, secret, access key) or after a key id (already <SECRET> when this runs); only the key is replaced.
_AWS_SECRET = (r"(?i:aws|secret|access[ _-]?key|<SECRET>)[^\n]{0,40}?(?<![A-Za-z0-9/+])(?P<value>[A-Za-z0-9/+]{40})"
               r"(?![A-Za-z0-9/+=])")
_SEPARATOR = r"[ .\-/_]"


@dataclass(frozen=True)
class Detector:
    kind: str
    pattern: re.Pattern
    gate: Callable[[str, bool], bool]  # (text, has a digit): may the pattern match at all? (cheap, most text has no PII)
    confirm: Callable[[str], int] | None = None  # characters of a candidate that are PII (0: none)


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_length(text: str) -> int:
    """A card number passes Luhn and is written as cards are: no separators, or one separator between groups of
    four (Amex and Diners: 4-6-5, 4-6-4)."""
    if not _luhn(re.sub(r"\D", "", text)):
        return 0
    separators = set(re.findall(_SEPARATOR, text))
    if not separators:
        return len(text)
    groups = [len(g) for g in re.split(_SEPARATOR, text)]
    well_grouped = all(g == 4 for g in groups[:-1]) and 1 <= groups[-1] <= 4 or groups in ([4, 6, 5], [4, 6, 4])
    return len(text) if len(separators) == 1 and well_grouped else 0


# IBAN length of each country in the IBAN registry: a candidate is cut to its country's length, so an IBAN
# followed by other words is found in any letter case.
IBAN_LENGTHS = dict(
    AD=24, AE=23, AL=28, AT=20, AZ=28, BA=20, BE=16, BG=22, BH=22, BI=27, BR=29, BY=28, CH=21, CR=22, CY=28, CZ=24, DE=22,
    DJ=27, DK=18, DO=28, EE=20, EG=29, ES=24, FI=18, FK=18, FO=18, FR=27, GB=22, GE=22, GI=23, GL=18, GR=27, GT=28, HN=28,
    HR=21, HU=28, IE=22, IL=23, IQ=23, IS=26, IT=27, JO=30, KW=30, KZ=20, LB=28, LC=32, LI=21, LT=20, LU=20, LV=21, LY=25,
    MC=27, MD=24, ME=22, MK=19, MN=20, MR=27, MT=31, MU=30, NI=28, NL=18, NO=15, OM=23, PK=24, PL=28, PS=29, PT=25, QA=29,
    RO=24, RS=22, RU=33, SA=24, SC=31, SD=18, SE=24, SI=19, SK=24, SM=27, SO=23, ST=25, SV=28, TL=23, TN=24, TR=26, UA=29,
    VA=22, VG=24, XK=20, YE=30,
)


def _iban_length(text: str) -> int:
    """Characters of the candidate that make a valid IBAN: its country's length of letters and digits, check digits
    right (mod 97)."""
    length = IBAN_LENGTHS.get(text[:2].upper())
    if length is None:
        return 0
    positions = [i for i, c in enumerate(text) if c.isalnum()][:length]
    if len(positions) < length:
        return 0
    compact = "".join(text[i] for i in positions).upper()
    rearranged = compact[4:] + compact[:4]
    return positions[-1] + 1 if int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1 else 0


def _ip_length(text: str) -> int:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return 0
    return len(text) if address.version == 6 or text.count(".") == 3 else 0


def _phone_length(text: str) -> int:
    """International numbers (+ or a bracketed area code) have 9-15 digits; bare national ones 9-11."""
    digits = sum(c.isdigit() for c in text)
    if text.startswith(("+", "(")):
        return len(text) if 9 <= digits <= 15 else 0
    return len(text) if 9 <= digits <= 11 and any(c in text for c in " .-") else 0


def _aws_secret_length(value: str) -> int:
    """Base64 secrets mix cases and digits; a 40-character hex commit hash or a word does not."""
    mixed = any(c.isupper() for c in value) and any(c.islower() for c in value) and any(c.isdigit() or c in "/+" for c in value)
    return len(value) if mixed else 0


def _has(*markers: str) -> Callable[[str, bool], bool]:
    """A gate for text holding any of these substrings (one regex: faster than a substring test each)."""
    compiled = re.compile("|".join(map(re.escape, markers)))
    return lambda text, digits: compiled.search(text) is not None


def _gated(regex: str) -> Callable[[str, bool], bool]:
    """A gate for a type that needs digits: any digit, then a pattern cheaper than the type's own."""
    compiled = re.compile(regex)
    return lambda text, digits: digits and compiled.search(text) is not None


# In order: secrets first (a key block or token can contain things that look like other types).
DETECTORS = (
    Detector("secret", re.compile(_TOKENS),
             _has("PRIVATE KEY", "AKIA", "ASIA", "hp_", "ho_", "hu_", "hs_", "hr_", "xox", "sk-", "k_live_", "k_test_", "whsec_",
                  "eyJ", "earer", "AIza")),
    Detector("secret", re.compile(_AWS_SECRET), _has("aws", "AWS", "Aws", "ecret", "ECRET", "ccess", "CCESS", "<SECRET>"),
             _aws_secret_length),
    Detector("email", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b"), _has("@")),
    Detector("iban", re.compile(r"(?i:\b[A-Z]{2}\d{2}(?:[ -]?[A-Z0-9]){11,30}\b)"), _gated(r"\d\d[ -]?[A-Za-z0-9]{4}"), _iban_length),
    Detector("credit_card", re.compile(rf"(?<![\d.\-/_])\d(?:{_SEPARATOR}?\d){{12,18}}(?!\d|{_SEPARATOR}\d)"),
             _gated(r"\d(?:\D{0,2}\d){12}"), _card_length),
    Detector("ip_address", re.compile(r"(?<![\w.:])(?:\d{1,3}(?:\.\d{1,3}){3}|(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4})(?![\w:]|\.\w)"),
             lambda text, digits: ":" in text or (digits and _IPV4_GATE.search(text) is not None), _ip_length),
    Detector("phone", re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?!\w)"),
             _gated(r"\d(?:\D{0,3}\d){8}"), _phone_length),
)
_IPV4_GATE = re.compile(r"\.\d{1,3}\.\d")
_DIGIT = re.compile(r"\d")


class Redactor:
    """Redacts the configured PII types; counts what it replaced."""

    def __init__(self, types: Iterable[str]):
        wanted = set(types)
        self._detectors = [d for d in DETECTORS if d.kind in wanted]

    def redact(self, text: str, counts: Counter) -> str:
        digits = _DIGIT.search(text) is not None
        for detector in self._detectors:
            if detector.gate(text, digits):
                text = detector.pattern.sub(lambda m, d=detector: self._replace(d, m, counts), text)
        return text

    def findings(self, text: str) -> list[tuple[str, str]]:
        """(kind, value) of each piece of PII `redact` would replace in text (monitoring compares an answer's with
        its request's)."""
        digits = _DIGIT.search(text) is not None
        found = []
        for detector in self._detectors:
            if detector.gate(text, digits):
                for match in detector.pattern.finditer(text):
                    start, length = _pii_part(detector, match)
                    if length:
                        found.append((detector.kind, match.group(0)[start:start + length]))
        return found

    @staticmethod
    def _replace(detector: Detector, match: re.Match, counts: Counter) -> str:
        """The match with its PII part replaced (the words around it stay)."""
        whole = match.group(0)
        start, length = _pii_part(detector, match)
        if not length:
            return whole
        counts[detector.kind] += 1
        return whole[:start] + PLACEHOLDERS[detector.kind] + whole[start + length:]


def _pii_part(detector: Detector, match: re.Match) -> tuple[int, int]:
    """Where the PII starts in the match and how long it is: a `value` group alone when the pattern has one, and no
    more of a candidate than `confirm` says is PII (0: none)."""
    start = match.start("value") - match.start() if "value" in match.re.groupindex else 0
    value = match.group(0)[start:]
    return start, len(value) if detector.confirm is None else detector.confirm(value)


def redact_tree(value, redactor: Redactor, counts: Counter | None = None):
    """A JSON-like value with every string in it redacted (keys included): for what the data stage hands on besides
    rows (the recipe's data section in the manifest and card, source names, log lines)."""
    counts = Counter() if counts is None else counts
    if isinstance(value, str):
        return redactor.redact(value, counts)
    if isinstance(value, dict):
        return {redact_tree(k, redactor, counts): redact_tree(v, redactor, counts) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(v, redactor, counts) for v in value]
    return value


class RedactingFilter:
    """A logging filter that redacts each record's final message, so a log line cannot carry what the files do not."""

    def __init__(self, redactor: Redactor):
        self.redactor = redactor

    def filter(self, record) -> bool:
        message = record.getMessage()
        redacted = self.redactor.redact(message, Counter())
        if redacted != message:
            record.msg, record.args = redacted, None
        return True
