"""PII de-identification (mmfm.data.pii). Check digits are computed here, independently of the module."""

import ipaddress
import random
import time

import pytest

from mmfm.data.pii import LEVELS, PII_KINDS, deidentify, deidentify_record_texts, find_pii

PLACEHOLDER = {"email": "[EMAIL]", "cn_resident_id": "[ID]", "bank_card": "[BANK_CARD]", "ip": "[IP]",
               "cn_mobile": "[PHONE]", "phone": "[PHONE]"}


# --- independent reference implementations ---------------------------------------------------------------

def id_check_char(first17):
    """GB 11643 / ISO 7064 MOD 11-2: the check character is (12 - sum(d_i * 2^(17-i)) mod 11) mod 11, 10 -> X."""
    total = sum(int(d) * pow(2, 17 - i, 11) for i, d in enumerate(first17))
    value = (12 - total % 11) % 11
    return "X" if value == 10 else str(value)


def make_id(region="110105", birth="19491231", seq=2):
    first17 = f"{region}{birth}{seq:03d}"
    return first17 + id_check_char(first17)


def luhn_ok(digits):
    """Luhn: double every second digit from the right, digit-sum, total divisible by 10."""
    total = 0
    for pos, ch in enumerate(digits[::-1]):
        d = int(ch)
        if pos % 2 == 1:
            d = sum(divmod(d * 2, 10))
        total += d
    return total % 10 == 0


def make_card(prefix, length, rng):
    body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    return next(body + c for c in "0123456789" if luhn_ok(body + c))


def group(digits, sizes, sep):
    assert sum(sizes) == len(digits)
    out, pos = [], 0
    for n in sizes:
        out.append(digits[pos:pos + n])
        pos += n
    return sep.join(out)


def found(text):
    return [(s.kind, text[s.start:s.end]) for s in find_pii(text)]


# --- 1. resident IDs ---------------------------------------------------------------------------------------

def test_reference_check_digit_matches_published_example():
    # The standard's worked example 11010519491231002X; also the reference Luhn on a known test card.
    assert make_id("110105", "19491231", 2) == "11010519491231002X"
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")


def test_valid_resident_ids_caught_wrong_check_digit_not():
    rng = random.Random(1)
    ids = [make_id("110105", "19491231", 2)]  # ends in X
    ids += [make_id("110105", f"{rng.randint(1950, 2010)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
                    rng.randint(0, 999)) for _ in range(30)]
    ids.append(make_id("440305", "20000229", 17))  # leap day
    assert any(i.endswith("X") for i in ids)
    for rid in ids:
        for text in (rid, f"身份证号：{rid}。", f"id {rid.lower()} on file"):
            assert found(text) == [("cn_resident_id", text[text.lower().index(rid.lower()):][:18])], text
        for wrong in "0123456789X":
            if wrong == rid[-1]:
                continue
            bad = rid[:17] + wrong
            kinds = [k for k, _ in found(f"no {bad} here")]
            assert "cn_resident_id" not in kinds
            # A failed ID may still be a card, but only if it is all digits and passes Luhn on its own.
            assert kinds == (["bank_card"] if bad.isdigit() and luhn_ok(bad) else []), bad


def test_resident_id_needs_real_birth_date_and_own_digit_run():
    for birth in ("19490230", "19001301", "18991231", "21000101", "19000229"):  # no such date, or out of range
        rid = make_id("110105", birth, 5)
        assert "cn_resident_id" not in [k for k, _ in found(rid)], rid
    rid = make_id("110105", "19840817", 123)
    assert found(rid) == [("cn_resident_id", rid)]
    assert "cn_resident_id" not in [k for k, _ in found("7" + rid)]  # inside a longer digit run
    assert "cn_resident_id" not in [k for k, _ in found(rid + "1")]


# --- 2. bank cards -----------------------------------------------------------------------------------------

def test_valid_bank_cards_caught_luhn_invalid_not():
    rng = random.Random(2)
    for _ in range(20):
        c16, c19 = make_card("622202", 16, rng), make_card("621700", 19, rng)
        shown = [c16, group(c16, [4, 4, 4, 4], " "), group(c16, [4, 4, 4, 4], "-"),
                 c19, group(c19, [4, 4, 4, 4, 3], " "), group(c19, [6, 13], " "), group(c19, [4, 4, 4, 4, 3], "-")]
        for s in shown:
            assert found(f"卡号 {s} 谢谢") == [("bank_card", s)], s
            assert deidentify(f"pay to {s}.", "mask").text == "pay to [BANK_CARD]."
        for card in (c16, c19):
            bad = card[:-1] + str((int(card[-1]) + rng.randint(1, 9)) % 10)
            assert not luhn_ok(bad)
            for s in (bad, group(bad, [4] * (len(bad) // 4) + [len(bad) % 4] * (len(bad) % 4 > 0), " ")):
                assert found(f"card {s} x") == [], s


def test_bank_card_not_inside_longer_run_or_mixed_separators():
    card = "4111111111111111"
    assert found(card) == [("bank_card", card)]
    assert found("9" + card) == [] and found(card + "0") == []
    assert found("4111 1111-1111 1111") == []  # groups must share one separator
    assert found("12345678901234567890123") == []  # 23 digits
    # Two numbers side by side are not one card, even when their 14 digits happen to pass Luhn.
    assert luhn_ok("48293017462024") and found("order 4829301746 2024") == []
    assert found("amex 3782 822463 10005") == [("bank_card", "3782 822463 10005")]


# --- 3. the other kinds, and things that are not PII -------------------------------------------------------

@pytest.mark.parametrize("value, kind", [
    ("alice.smith+tag@mail.example.co.uk", "email"),
    ("zhang_san2024@163.com", "email"),
    ("192.168.1.254", "ip"),
    ("8.8.8.8", "ip"),
    ("2001:0db8:85a3:0000:0000:8a2e:0370:7334", "ip"),
    ("2001:db8::8a2e:370:7334", "ip"),
    ("fe80::1", "ip"),
    ("::ffff:10.0.0.1", "ip"),
    ("13812345678", "cn_mobile"),
    ("+8613912345678", "cn_mobile"),
    ("+86 159 8765 4321", "cn_mobile"),
    ("186 1234 5678", "cn_mobile"),
    ("177-0000-1111", "cn_mobile"),
    ("86-13712345678", "cn_mobile"),
    ("010-62345678", "phone"),
    ("0755-1234567", "phone"),
    ("(021) 5555 6666", "phone"),
    ("+1 (415) 555-2671", "phone"),
    ("+44 20 7946 0958", "phone"),
    ("+49.30.1234.5678", "phone"),
])
def test_each_kind_caught(value, kind):
    for text in (value, f"contact: {value}, thanks", f"联系{value}。"):
        assert found(text) == [(kind, value)], text
        r = deidentify(text, "mask")
        assert r.text == text.replace(value, PLACEHOLDER[kind]) and r.counts == {kind: 1} and not r.drop


def test_labels_glued_to_values():
    assert found("ip:2001:db8::1;") == [("ip", "2001:db8::1")]
    assert found("邮箱a1@qq.com，") == [("email", "a1@qq.com")]
    assert found("电话：+8613812345678。卡号4111111111111111") == [("cn_mobile", "+8613812345678"),
                                                                ("bank_card", "4111111111111111")]
    assert found("1:2:3:4:5:6:7:8:9") == []  # nine groups: no address, and no address inside it either


@pytest.mark.parametrize("text", [
    "upgrade to version 1.2.3.4.5 today",
    "meet at 12:30, or 12:30:45",
    "a photo from 2024",
    "price 1999.00 yuan, was 2999.99",
    "order no. 4829301746 shipped",  # random 10-digit run
    "order no. 0482930174 shipped",  # starting with 0, no separator: not a landline
    "ref 4111111111111112",  # Luhn-invalid 16 digits
    "code 12345 and 123456789",  # too short
    "ratio 3:2, score 10:8, 999.999.999.999, 256.1.1.1",
    "scientific 1.23e10, +5 degrees, +100.00 up",
    "no at-sign in user@localhost, nor in @handle",
])
def test_not_pii(text):
    assert find_pii(text) == []
    assert deidentify(text, "mask").text == text
    assert deidentify(text, "drop").drop is False


# --- 4. a generated corpus with planted PII ----------------------------------------------------------------

FILLER = ("a", "cat", "sits", "on", "the", "red", "mat", "photo", "of", "two", "dogs", "sunny", "beach", "in",
          "2024", "at", "12:30", "version", "1.2.3.4.5", "costs", "1999.00", "order", "#4829301746", "x3", "图片",
          "一只猫", "3", "cats")
LABELS = ("email", "tel:", "call", "id", "card", "ip", "电话：", "邮箱", "身份证", "卡号", "(", "at", "->")
AFTER = (",", ".", "。", "，", ")", " ok", "!", ";")


def plant(kind, rng):
    """One value of the kind, in a random written form (every value detected on its own as exactly that kind)."""
    digits = lambda n: "".join(rng.choice("0123456789") for _ in range(n))  # noqa: E731
    if kind == "email":
        return rng.choice(["li", "wang.wei", "j_doe", "x"]) + digits(rng.randint(0, 11)) + "@" + \
            rng.choice(["qq.com", "163.com", "mail.example.org", "uni.edu.cn"])
    if kind == "cn_resident_id":
        return make_id(rng.choice(["110105", "310104", "440305", "510107"]),
                       f"{rng.randint(1940, 2015)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
                       rng.randint(0, 999))
    if kind == "bank_card":
        length = rng.choice([16, 19])
        card = make_card(rng.choice(["622202", "621700", "4", "5"]), length, rng)
        sizes = rng.choice([[length], [4, 4, 4, 4] if length == 16 else [4, 4, 4, 4, 3],
                            [6, length - 6]])
        return group(card, sizes, rng.choice([" ", "-"]))
    if kind == "ip":
        if rng.random() < 0.5:
            return str(ipaddress.IPv4Address(rng.getrandbits(32)))
        addr = ipaddress.IPv6Address(rng.getrandbits(128) & ~(0xFFFFFFFF << 32 * rng.randint(0, 2)))
        return addr.compressed if rng.random() < 0.7 else addr.exploded
    if kind == "cn_mobile":
        num = "1" + rng.choice("3456789") + digits(9)
        sep = rng.choice(["", " ", "-"])
        return rng.choice(["", "+86", "+86 ", "+86-"]) + group(num, [3, 4, 4], sep)
    if rng.random() < 0.5:  # landline
        area = "0" + rng.choice("123456789") + digits(rng.choice([1, 2]))
        return area + rng.choice(["-", " "]) + digits(rng.choice([7, 8]))
    sep = rng.choice([" ", "-", "."])  # international: country code, then 2-3, 3 and 4 digits
    return "+" + rng.choice(["1", "44", "49", "33", "81"]) + sep + sep.join(
        [digits(rng.choice([2, 3])), digits(3), digits(4)])


def build_corpus(n=300, seed=0):
    """(segments, planted) per text: segments are plain strings or (kind, value) pairs."""
    rng = random.Random(seed)
    corpus = []
    for i in range(n):
        segs = [" ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 5)))]
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            kind = rng.choice(PII_KINDS)
            label = rng.choice(LABELS)
            gap = " " if label[-1].isascii() and label[-1].isalnum() else rng.choice(["", " "])
            segs += [" " + label + gap, (kind, plant(kind, rng)),
                     rng.choice(AFTER) + " " + " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 4)))]
        corpus.append(segs)
    return corpus


def render(segs, masked=False):
    return "".join(s if isinstance(s, str) else (PLACEHOLDER[s[0]] if masked else s[1]) for s in segs)


def planted_counts(segs):
    counts = {}
    for s in segs:
        if not isinstance(s, str):
            counts[s[0]] = counts.get(s[0], 0) + 1
    return counts


def test_corpus_mask_keep_drop():
    corpus = build_corpus()
    texts = [render(segs) for segs in corpus]
    planted = [planted_counts(segs) for segs in corpus]
    values = [s[1] for segs in corpus for s in segs if not isinstance(s, str)]
    assert set(k for p in planted for k in p) == set(PII_KINDS)  # every kind planted
    assert 80 < sum(1 for p in planted if not p) < 150  # plenty of clean texts too

    total_planted, total_counted = {}, {}
    for segs, text, want in zip(corpus, texts, planted):
        # Spans are exactly the planted values, kind for kind.
        assert found(text) == [s for s in segs if not isinstance(s, str)], text
        m = deidentify(text, "mask")
        assert m.text == render(segs, masked=True)
        assert m.counts == want and m.drop is False
        assert find_pii(m.text) == []
        for s in segs:
            if not isinstance(s, str):
                assert s[1] not in m.text
        k = deidentify(text, "keep")
        assert (k.text, k.counts, k.drop) == (text, want, False)
        d = deidentify(text, "drop")
        assert (d.text, d.counts, d.drop) == (text, want, bool(want))
        for kind, n in want.items():
            total_planted[kind] = total_planted.get(kind, 0) + n
        for kind, n in m.counts.items():
            total_counted[kind] = total_counted.get(kind, 0) + n
    assert total_counted == total_planted
    assert sum(total_planted.values()) == len(values)

    # The same corpus as one multi-text record.
    out, counts, drop = deidentify_record_texts(texts, "mask")
    assert out == [render(segs, masked=True) for segs in corpus]
    assert counts == total_planted and drop is False
    assert deidentify_record_texts(texts, "keep") == (texts, total_planted, False)
    clean = [t for t, p in zip(texts, planted) if not p]
    assert deidentify_record_texts(clean, "drop") == (clean, {}, False)
    assert deidentify_record_texts(clean + texts[:1] + [t for t, p in zip(texts, planted) if p][:1], "drop")[2]
    assert deidentify_record_texts([], "mask") == ([], {}, False)


# --- 5. overlaps -------------------------------------------------------------------------------------------

def test_overlap_resolved_by_priority():
    email = "wang13812345678.4111111111111111@163.com"  # contains a mobile number and a Luhn-valid card
    assert found(f"mail {email} now") == [("email", email)]
    assert deidentify(f"mail {email} now", "mask").counts == {"email": 1}

    # A resident ID that also passes Luhn as an 18-digit "card": reported once, as the ID.
    rid = next(r for r in (make_id("110105", "19491231", s) for s in range(1000)) if r.isdigit() and luhn_ok(r))
    for text in (rid, f"ID {rid}, card?"):
        spans = find_pii(text)
        assert [(s.kind, text[s.start:s.end]) for s in spans] == [("cn_resident_id", rid)]
        r = deidentify(text, "mask")
        assert r.counts == {"cn_resident_id": 1} and r.text == text.replace(rid, "[ID]")

    # A +86 mobile is a phone number too: counted once, as the mobile.
    assert found("call +86 138 1234 5678 now") == [("cn_mobile", "+86 138 1234 5678")]
    # An IPv4-mapped IPv6 address is one ip, not two.
    assert found("from ::ffff:192.168.0.1 ok") == [("ip", "::ffff:192.168.0.1")]
    # Spans never overlap and come sorted.
    text = f"{rid} {email} 8.8.8.8 13812345678 010-62345678"
    spans = find_pii(text)
    assert [s.kind for s in spans] == ["cn_resident_id", "email", "ip", "cn_mobile", "phone"]
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:]))


# --- 6. levels ---------------------------------------------------------------------------------------------

def test_bad_level_raises():
    assert LEVELS == ("keep", "mask", "drop")
    for bad in ("strict", "MASK", ""):
        with pytest.raises(ValueError) as err:
            deidentify("mail a@b.com", bad)
        assert all(level in str(err.value) for level in LEVELS)
        with pytest.raises(ValueError, match="keep"):
            deidentify_record_texts(["x"], bad)


def test_pathological_inputs_stay_fast():
    # Long runs that invite regex backtracking; each must finish quickly (a blow-up would take minutes).
    texts = ["1" * 50000, "a" * 50000 + "@", "a@" + "b" * 50000, ":" * 50000, "1:" * 25000, "+1 " * 20000,
             "1." * 25000, "1 " * 25000, "1-" * 25000, "f" * 5000 + "::" + "f" * 5000]
    start = time.perf_counter()
    for t in texts:
        find_pii(t)
    assert time.perf_counter() - start < 20
