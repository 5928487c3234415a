"""PII de-identification for offline data construction: find personal data in text, then keep, mask or drop.

Levels (LEVELS):
  keep  text unchanged; what was found is still counted.
  mask  each span replaced by a placeholder: [EMAIL], [ID], [BANK_CARD], [IP], [PHONE] (mobile and other phones).
  drop  text unchanged, PiiResult.drop is True when anything was found (the caller drops the sample).

Detection rules (PII_KINDS, in priority order):
  email           local@domain.tld: local part [A-Za-z0-9._%+-]+, dot-separated domain labels, a 2+ letter TLD.
  cn_resident_id  mainland-China resident ID: 17 digits + check character (digit or X/x), not inside a longer
                  digit run; the check character must match ISO 7064 MOD 11-2 and positions 7-14 must be a real
                  calendar date YYYYMMDD with 1900 <= YYYY <= 2099. Numbers failing either check are not IDs.
  bank_card       13-19 digits with a valid Luhn checksum, contiguous or in a card layout with one kind of single
                  separator (space or hyphen): groups of 4 with a 1-4 digit tail (4-4-4-4, 4-4-4-4-3), 4-6-4/5,
                  or 6 then 7-13 (6-13). Other groupings ("4829301746 2024") are separate numbers, not a card.
                  Not inside a longer digit run or decimal, not after "+", not followed by X/x.
  ip              IPv4 dotted quad validated by ipaddress (octets 0-255, no leading zeros), not part of a longer
                  dotted number (1.2.3.4.5 is a version, not an address); IPv6 full or compressed (also with an
                  embedded IPv4 tail), 2+ colons and at least one hex group, validated by ipaddress.IPv6Address
                  (so 12:30 or 12:30:45 are not addresses).
  cn_mobile       11 digits 1[3-9]XXXXXXXXX, optionally prefixed +86 / 86 (then an optional space or hyphen),
                  optionally written 3-4-4 with spaces or hyphens; not inside a longer digit run.
  phone           international: "+<country code>" then digit groups joined by single spaces, hyphens, dots or
                  parenthesised groups, 8-15 digits in all; mainland landline: area code 0 + 2-3 digits, then a
                  separator (space, hyphen, or parentheses round the area code) and a 7-8 digit number (may itself
                  be split 3/4-4), not right after a separate 4-digit group (then it is the tail of a grouped
                  card-like number). An unseparated landline is not matched: it reads as an order number.

Candidates of every kind are collected, then accepted by priority (email first, then resident id, bank card,
ip, mainland mobile, generic phone; within a kind the earlier, then longer, span): a candidate overlapping an
already accepted span is discarded, so spans never overlap and each piece of text is counted once.

Limits: a bare 13-digit "86" + mobile number (no "+") that also passes Luhn is reported as a bank card; a
grouped card followed by a further 1-4 digit group with the same separator reads as one longer number (missed
if that breaks the length or checksum); an international phone number swallows a following digit group with a
single separator ("+44 20 7946 0958 2" keeps the "2"; over 15 digits it is missed); hex words around a double
colon ("cafe::beef") are valid IPv6 and get masked; only the formats above are recognised (no spaced resident
IDs, no numbers written in words, ASCII digits only).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass

PII_KINDS = ("email", "cn_resident_id", "bank_card", "ip", "cn_mobile", "phone")  # also the priority order
LEVELS = ("keep", "mask", "drop")
PLACEHOLDERS = {"email": "[EMAIL]", "cn_resident_id": "[ID]", "bank_card": "[BANK_CARD]", "ip": "[IP]",
                "cn_mobile": "[PHONE]", "phone": "[PHONE]"}

_PRIORITY = {kind: i for i, kind in enumerate(PII_KINDS)}


def _compile(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.ASCII)  # \d is 0-9 only: full-width or other scripts' digits are not read


_NOT_AFTER_NUMBER = r"(?<!\d)(?<!\d\.)"  # not continuing a digit run or a decimal
_NOT_BEFORE_NUMBER = r"(?!\d)(?!\.\d)"

_EMAIL = _compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@"
                  r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}")
_RESIDENT_ID = _compile(r"(?<!\d)\d{17}[\dXx](?![\dXx])")
_BANK_CARD = _compile(_NOT_AFTER_NUMBER + r"(?<!\+)(?:\d{13,19}"
                      r"|\d{4}([ -])\d{4}\1\d{4}(?:\1\d{4})?(?:\1\d{1,4})?"  # 4-4-4-4, 4-4-4-4-3, ...
                      r"|\d{4}([ -])\d{6}\2\d{4,5}"  # 4-6-5, 4-6-4
                      r"|\d{6}([ -])\d{7,13})"  # 6-13, ...
                      r"(?![\dXx])(?!\.\d)")
_IPV4 = _compile(_NOT_AFTER_NUMBER + r"(?:\d{1,3}\.){3}\d{1,3}" + _NOT_BEFORE_NUMBER)
# Not a suffix of a longer hex/colon run, but "tel:" or "ip:" just before the address is fine.
_IPV6 = _compile(r"(?<![0-9A-Za-z.])(?<![0-9A-Fa-f.]:)(?<!::)(?:[0-9A-Fa-f]{0,4}:){2,7}"
                 r"(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![0-9A-Za-z:])(?!\.\d)")
_MOBILE = _compile(r"(?<![\d+])(?:\+?86[ -]?)?1[3-9]\d([ -]?)\d{4}\1\d{4}(?!\d)")
# Each repetition starts with a separator, so the digit runs cannot be split ambiguously (no backtracking blow-up).
_INTL_PHONE = _compile(r"(?<![0-9A-Za-z+])\+[1-9]\d*(?:(?:[ .-]|[ .-]?\(\d+\)[ .-]?)\d+)*")
# Not next to a 4-digit group either: "6222 0201 1524 4939" is a (Luhn-invalid) card number, not a landline.
_LANDLINE = _compile(_NOT_AFTER_NUMBER + r"(?<!(?<!\d)\d{4}[ -])"
                     r"(?:0[1-9]\d{1,2}[ -]|\(0[1-9]\d{1,2}\)[ -]?)\d{3,4}[ -]?\d{4}" + _NOT_BEFORE_NUMBER)

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


@dataclass
class PiiSpan:
    kind: str
    start: int
    end: int


@dataclass
class PiiResult:
    text: str
    counts: dict[str, int]  # kind -> spans found; only kinds found
    drop: bool


def _valid_date(yyyymmdd: str) -> bool:
    y, m, d = int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:])
    if not (1900 <= y <= 2099 and 1 <= m <= 12 and 1 <= d <= _DAYS[m - 1]):
        return False
    leap = y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)
    return not (m == 2 and d == 29 and not leap)


def _valid_resident_id(s: str) -> bool:
    total = sum(int(c) * w for c, w in zip(s, _ID_WEIGHTS))
    return _ID_CHECK[total % 11] == s[17].upper() and _valid_date(s[6:14])


def _luhn(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        n = int(c) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def _valid_card(s: str) -> bool:
    digits = s.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and _luhn(digits)


def _valid_ip(s: str) -> bool:
    try:
        if ":" in s:  # IPv6: the regex guarantees 2+ colons; require a hex group, so "::" alone is not one
            ipaddress.IPv6Address(s)
            return s.strip(":") != ""
        ipaddress.IPv4Address(s)
        return True
    except ValueError:
        return False


def _valid_intl_phone(s: str) -> bool:
    return 8 <= sum(c.isdigit() for c in s) <= 15


def _always(s: str) -> bool:
    return True


# kind -> (regex, validator, cheap pre-check on the whole text), in priority order.
_RULES = (
    ("email", _EMAIL, _always, lambda t: "@" in t),
    ("cn_resident_id", _RESIDENT_ID, _valid_resident_id, None),
    ("bank_card", _BANK_CARD, _valid_card, None),
    ("ip", _IPV6, _valid_ip, lambda t: ":" in t),
    ("ip", _IPV4, _valid_ip, lambda t: "." in t),
    ("cn_mobile", _MOBILE, _always, None),
    ("phone", _INTL_PHONE, _valid_intl_phone, lambda t: "+" in t),
    ("phone", _LANDLINE, _always, None),
)
_HAS_DIGIT = _compile(r"\d")


def _candidates(text: str) -> list[PiiSpan]:
    """Every validated match of every rule; candidates may overlap."""
    found = []
    for kind, regex, valid, precheck in _RULES:
        if precheck is not None and not precheck(text):
            continue
        found.extend(PiiSpan(kind, m.start(), m.end()) for m in regex.finditer(text) if valid(m.group()))
    return found


def find_pii(text: str) -> list[PiiSpan]:
    """Non-overlapping PII spans sorted by start; overlaps resolved by kind priority, then earlier, then longer."""
    if not _HAS_DIGIT.search(text) and "@" not in text and ":" not in text:
        return []  # every rule except e-mail and IPv6 needs a digit
    accepted: list[PiiSpan] = []
    for span in sorted(_candidates(text), key=lambda s: (_PRIORITY[s.kind], s.start, s.start - s.end)):
        if all(span.end <= a.start or span.start >= a.end for a in accepted):
            accepted.append(span)
    return sorted(accepted, key=lambda s: s.start)


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"unknown PII level {level!r}: expected one of {', '.join(LEVELS)}")


def _count(spans: list[PiiSpan]) -> dict[str, int]:
    """Per-kind counts in PII_KINDS order, only kinds found."""
    c = Counter(s.kind for s in spans)
    return {kind: c[kind] for kind in PII_KINDS if c[kind]}


def _mask(text: str, spans: list[PiiSpan]) -> str:
    parts, pos = [], 0
    for s in spans:
        parts += [text[pos:s.start], PLACEHOLDERS[s.kind]]
        pos = s.end
    parts.append(text[pos:])
    return "".join(parts)


def deidentify(text: str, level: str) -> PiiResult:
    """Find PII in text and apply level: keep (count only), mask (placeholders) or drop (flag if any found)."""
    _check_level(level)
    spans = find_pii(text)
    out = _mask(text, spans) if level == "mask" and spans else text
    return PiiResult(text=out, counts=_count(spans), drop=level == "drop" and bool(spans))


def deidentify_record_texts(texts: list[str], level: str) -> tuple[list[str], dict[str, int], bool]:
    """deidentify each of a sample's texts (e.g. conversation turns): texts, summed counts, drop if any."""
    _check_level(level)
    results = [deidentify(t, level) for t in texts]
    total: Counter = Counter()
    for r in results:
        total.update(r.counts)
    counts = {kind: total[kind] for kind in PII_KINDS if total[kind]}
    return [r.text for r in results], counts, any(r.drop for r in results)
