import random

import pytest
import torch

from mmfm.data.chat import ChatTemplate, assistant_positions, encode_conversation
from mmfm.data.loader import IGNORE_INDEX, SkipSample
from mmfm.data.synth import COLOURS, SHAPES, SINGLE_POSITIONS, all_caption_texts, build_synth_dataset
from mmfm.data.synth_instruct import (COUNT_QUESTION, all_instruct_texts, answer_options, build_instruct_dataset,
                                      generate_instruct_samples, generate_preference_pairs, question_kind,
                                      question_place, scene_questions, wrong_answer)
from mmfm.data.tokenizer import TextTokenizer, train_tokenizer

TEMPLATE = ChatTemplate()
TPI = 4  # tokens per image


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer(train_tokenizer(all_caption_texts("describe the image.") + all_instruct_texts(TEMPLATE), 600))


def images(n):
    return [torch.full((3, 8, 8), float(i)) for i in range(n)]


ANSWERS = ["a red circle on the left and a blue square on the right.", "two."]
CONVERSATION = [
    {"from": "system", "value": "answer questions about the images."},
    {"from": "human", "value": "<image> and <image>\nwhat is in the first image?"},
    {"from": "gpt", "value": ANSWERS[0]},
    {"from": "human", "value": COUNT_QUESTION},
    {"from": "gpt", "value": ANSWERS[1]},
]


def find_all(seq, sub):
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


def test_loss_only_on_assistant_answers(tok):
    s = encode_conversation(CONVERSATION, images(2), tok, TEMPLATE, TPI, 256, key="k")
    ids, marker, end = s.input_ids, tok.encode(TEMPLATE.assistant), tok.encode(TEMPLATE.turn_end)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and end == tok.encode("\n")
    expected = set()  # input positions of the loss-carrying tokens, found independently
    for n, answer in enumerate(ANSWERS):
        answer_ids = tok.encode(answer) + end + ([tok.eos_id] if n == len(ANSWERS) - 1 else [])
        hits = find_all(ids, marker + answer_ids)
        assert len(hits) == 1
        start = hits[0] + len(marker)
        expected |= set(range(start, start + len(answer_ids)))
    assert {i + 1 for i in assistant_positions(s)} == expected
    for i in assistant_positions(s):
        assert s.targets[i] == ids[i + 1]
    assert s.targets[-1] == IGNORE_INDEX and len(s.targets) == len(ids)
    # Nothing else carries loss: role markers, system/user text, image tokens, bos.
    for pos, t in enumerate(ids):
        if t in (tok.image_id, tok.bos_id):
            assert pos not in expected
    for text in (TEMPLATE.system, TEMPLATE.user, "what is in the first image?", COUNT_QUESTION):
        for hit in find_all(ids, tok.encode(text)):
            assert not expected & set(range(hit, hit + len(tok.encode(text))))
    # The loss-carrying targets decode to exactly the answers, each closed by turn_end.
    runs, run = [], []
    for i, t in enumerate(s.targets):
        if t != IGNORE_INDEX:
            run.append(t)
        elif run:
            runs, run = runs + [run], []
    assert [tok.decode(r) for r in runs] == [a + "\n" for a in ANSWERS]
    assert runs[-1][-1] == tok.eos_id and s.caption == ANSWERS[-1] and s.key == "k"


def test_images_and_layout(tok):
    s = encode_conversation(CONVERSATION, images(2), tok, TEMPLATE, TPI, 256)
    assert s.input_ids.count(tok.image_id) == 2 * TPI and len(s.images) == 2
    assert torch.equal(s.images[1], images(2)[1])
    expected = ([tok.bos_id] + tok.encode("system: ") + tok.encode("answer questions about the images.")
                + tok.encode("\n") + tok.encode("user: ") + [tok.image_id] * TPI + tok.encode(" and ")
                + [tok.image_id] * TPI + tok.encode("\nwhat is in the first image?") + tok.encode("\n"))
    assert s.input_ids[:len(expected)] == expected
    # Images in a later turn count too.
    later = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "two."},
             {"from": "human", "value": "<image>what shape is on the left?"}, {"from": "gpt", "value": "a circle."}]
    assert encode_conversation(later, images(1), tok, TEMPLATE, TPI, 256).input_ids.count(tok.image_id) == TPI


def test_errors(tok):
    with pytest.raises(ValueError, match="placeholder"):
        encode_conversation(CONVERSATION, images(1), tok, TEMPLATE, TPI, 256)
    with pytest.raises(ValueError, match="placeholder"):
        encode_conversation(CONVERSATION, images(3), tok, TEMPLATE, TPI, 256)
    with pytest.raises(ValueError, match="role"):
        encode_conversation([{"from": "bot", "value": "x"}, {"from": "gpt", "value": "y"}], [], tok, TEMPLATE, TPI, 64)
    with pytest.raises(ValueError, match="end with"):
        encode_conversation(CONVERSATION[:-1], images(2), tok, TEMPLATE, TPI, 256)
    n = len(encode_conversation(CONVERSATION, images(2), tok, TEMPLATE, TPI, 256).input_ids)
    assert len(encode_conversation(CONVERSATION, images(2), tok, TEMPLATE, TPI, n).input_ids) == n
    with pytest.raises(SkipSample) as err:
        encode_conversation(CONVERSATION, images(2), tok, TEMPLATE, TPI, n - 1)
    assert err.value.args[0] == "too_long"


def test_other_template(tok):
    t = ChatTemplate(user="Q: ", assistant="A: ", turn_end="", image_placeholder="[img]")
    turns = [{"from": "human", "value": "[img]what colour is the circle?"}, {"from": "gpt", "value": "red."}]
    s = encode_conversation(turns, images(1), tok, t, TPI, 64)
    assert s.input_ids == ([tok.bos_id] + tok.encode("Q: ") + [tok.image_id] * TPI
                           + tok.encode("what colour is the circle?") + tok.encode("A: ") + tok.encode("red.")
                           + [tok.eos_id])
    assert tok.decode(t for t in s.targets if t != IGNORE_INDEX) == "red."


def derive_answer(question, objects):
    """The right answer, worked out here from the object list."""
    if question == COUNT_QUESTION:
        return {1: "there is one.", 2: "there are two."}[len(objects)]
    for shape, colour, where in objects:
        if question == f"what colour is the shape {where}?":
            return f"{where} it is {colour}."
        if question == f"what colour is the {shape}?":
            return f"it is {colour}."
        if question == f"where is the {colour} {shape}?":
            return f"it is {where}."
        if question == f"what shape is {where}?":
            return f"{where} it is a {shape}."
    raise AssertionError(question)


def unambiguous(question, objects):
    """Questions that name an object by content are asked of one-object scenes only; the others name a place."""
    words = question.rstrip("?").split()
    if question.startswith("what colour is the") and "shape" not in words:
        return len(objects) == 1 and words[-1] == objects[0][0]
    if question.startswith("where is the"):
        return len(objects) == 1 and (words[-2], words[-1]) == objects[0][1::-1]
    return True


def test_scene_questions():
    pair = [("circle", "red", "on the left"), ("square", "blue", "on the right")]
    assert dict(scene_questions(pair)) == {
        COUNT_QUESTION: "there are two.",
        "what colour is the shape on the left?": "on the left it is red.",
        "what shape is on the left?": "on the left it is a circle.",
        "what colour is the shape on the right?": "on the right it is blue.",
        "what shape is on the right?": "on the right it is a square."}
    same = [("square", "green", "at the top"), ("square", "green", "at the bottom")]
    assert dict(scene_questions(same))["what shape is at the bottom?"] == "at the bottom it is a square."
    one = dict(scene_questions([("cross", "white", "in the center")]))
    assert one == {COUNT_QUESTION: "there is one.", "what colour is the cross?": "it is white.",
                   "where is the white cross?": "it is in the center.",
                   "what shape is in the center?": "in the center it is a cross."}


def test_generated_samples_are_correct():
    samples = list(generate_instruct_samples("train", 200, seed=3, size=32))
    kinds, lengths = set(), set()
    for s in samples:
        objs = s["objects"]
        assert s["image"].size == (32, 32) and len(objs) in (1, 2)
        positions = {w for _, _, w in objs}
        assert len(positions) == len(objs) and positions <= set(SINGLE_POSITIONS)
        if len(objs) == 2:
            assert positions in ({"on the left", "on the right"}, {"at the top", "at the bottom"})
        conv = s["conversations"]
        lengths.add(len(conv))
        assert conv[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in conv) == 1
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        for q, a in zip(conv[::2], conv[1::2]):
            question = q["value"].removeprefix("<image>\n")
            kinds.add(question_kind(question))
            assert unambiguous(question, objs)
            assert a["value"] == derive_answer(question, objs)
        if len(conv) == 4:
            assert conv[0]["value"] != "<image>\n" + conv[2]["value"]
    assert kinds == {"colour", "count", "position", "shape"} and lengths == {2, 4, 6}
    assert any(len(s["objects"]) == 1 for s in samples) and any(len(s["objects"]) == 2 for s in samples)


def test_preference_pairs():
    pairs = list(generate_preference_pairs("train", 300, seed=5, size=16))
    for p in pairs:
        assert unambiguous(p["prompt"], p["objects"])
        assert p["chosen"] == derive_answer(p["prompt"], p["objects"])
        assert p["rejected"] != p["chosen"]
        assert p["rejected"] in answer_options(question_kind(p["prompt"]), question_place(p["prompt"]))
    rng = random.Random(0)
    objs = [("triangle", "yellow", "at the top"), ("cross", "purple", "at the bottom")]
    for q, a in scene_questions(objs):
        wrong = {wrong_answer(q, a, objs, rng) for _ in range(200)}
        assert a not in wrong and wrong <= set(answer_options(question_kind(q), question_place(q))) and len(wrong) > 1


def test_determinism():
    def snapshot(gen):
        return [({k: v for k, v in r.items() if k != "image"}, r["image"].tobytes()) for r in gen]

    assert snapshot(generate_instruct_samples("val", 20, 7, 16)) == snapshot(generate_instruct_samples("val", 20, 7, 16))
    assert snapshot(generate_instruct_samples("val", 20, 7, 16)) != snapshot(generate_instruct_samples("val", 20, 8, 16))
    assert snapshot(generate_preference_pairs("val", 20, 7, 16)) == snapshot(generate_preference_pairs("val", 20, 7, 16))


def test_instruct_texts_cover_generated_text():
    texts = set(all_instruct_texts(TEMPLATE))
    assert {TEMPLATE.system, TEMPLATE.user, TEMPLATE.assistant, TEMPLATE.turn_end} <= texts
    for s in generate_instruct_samples("train", 100, 1, 16):
        for t in s["conversations"]:
            assert t["value"].removeprefix("<image>\n") in texts
    for p in generate_preference_pairs("train", 100, 1, 16):
        assert {p["prompt"], p["chosen"], p["rejected"]} <= texts
    assert all(f"it is {c}." in texts for c in COLOURS) and all(f"it is a {s}." in texts for s in SHAPES)
    assert all(f"at the top it is {c}." in texts for c in COLOURS)


def test_default_instruct_tokenizer_is_the_alignment_pretraining_one(tmp_path):
    """Without --tokenizer, `mmfm data instruct` trains the tokenizer that `mmfm data synth --instruct-text
    --pair-captions shuffled` trains, so the stages still share a vocabulary."""
    small = dict(train_size=6, val_size=2, shard_size=10, progress=False)
    synth = build_synth_dataset(tmp_path / "synth", instruct_text=True, pair_captions="shuffled", **small)
    ordered = build_synth_dataset(tmp_path / "ordered", instruct_text=True, **small)
    instruct = build_instruct_dataset(tmp_path / "sft", "sft", **small)
    assert instruct["tokenizer"]["sha256"] == synth["tokenizer"]["sha256"] != ordered["tokenizer"]["sha256"]
