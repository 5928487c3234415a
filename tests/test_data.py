import io
import json
import logging
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from mmfm.data.build import load_tokenizer, sample_encoder, train_loader, val_stream
from mmfm.data.loader import IGNORE_INDEX, BatchLoader, SampleStream
from mmfm.data.manifest import DataError, shard_paths
from mmfm.data.synth import COLOURS, SHAPES, build_synth_dataset, generate_samples


def png_bytes(colour=(200, 30, 30), size=32):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(size=32):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def caption_json(caption):
    return json.dumps({"caption": caption}).encode()


def write_tar(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path), encoder=False, mtime=0.0) as w:
        for s in samples:
            w.write(s)
    return str(path)


def stream_of(cfg, tok, shards, **kw):
    return SampleStream(shards, sample_encoder(cfg, tok), seed=0, shuffle_buffer=4, **kw)


def test_synth_is_deterministic_from_seed(tmp_path):
    kw = dict(train_size=40, val_size=10, shard_size=16, progress=False)
    a = build_synth_dataset(tmp_path / "a", seed=5, **kw)
    b = build_synth_dataset(tmp_path / "b", seed=5, **kw)
    c = build_synth_dataset(tmp_path / "c", seed=6, **kw)
    sha = lambda m: [s["sha256"] for split in m["splits"].values() for s in split["shards"]]  # noqa: E731
    assert sha(a) == sha(b) and sha(a) != sha(c)
    assert a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"]
    assert [s["samples"] for s in a["splits"]["train"]["shards"]] == [16, 16, 8]
    assert sum(a["sources"]["train"].values()) == 40 and set(a["licences"]) == set(a["sources"]["train"])
    # an identical second build is reused; other parameters need --force
    assert build_synth_dataset(tmp_path / "a", seed=5, **kw) == a
    with pytest.raises(DataError, match="--force"):
        build_synth_dataset(tmp_path / "a", seed=7, **kw)


def dominant_colour(image, box) -> str:
    """The palette colour nearest the mean of the shape pixels (brighter than any background) inside box."""
    pixels = torch.tensor(list(image.crop(box).getdata()), dtype=torch.float32)
    mean = pixels[pixels.max(1).values > 80].mean(0)
    return min(COLOURS, key=lambda c: float(((torch.tensor(COLOURS[c], dtype=torch.float32) - mean) ** 2).sum()))


def test_place_first_pair_captions_name_each_place_with_its_object():
    samples = list(generate_samples("train", 300, 1, 64, 0.0, 1.0, ([], []), pair_captions="shuffled"))
    halves = {"on the left": (0, 0, 32, 64), "on the right": (32, 0, 64, 64), "at the top": (0, 0, 64, 32),
              "at the bottom": (0, 32, 64, 64)}
    phrase = re.compile(r"(on the left|on the right|at the top|at the bottom) is a (\w+) (\w+)")
    first_places = set()
    for s in samples:
        parts = s.caption.removesuffix(".").split(" and ")
        found = [phrase.fullmatch(p).groups() for p in parts]
        assert len(found) == 2 and {found[0][0], found[1][0]} in ({"on the left", "on the right"},
                                                                   {"at the top", "at the bottom"})
        first_places.add(found[0][0])
        for place, colour, shape in found:
            assert shape in SHAPES and dominant_colour(s.image, halves[place]) == colour, (s.caption, place)
    assert first_places == set(halves)  # either object may come first
    one_place = {}
    for s in generate_samples("train", 200, 1, 64, 0.0, 1.0, ([], []), pair_captions="one-place"):
        place, colour, shape = phrase.fullmatch(s.caption.removesuffix(".")).groups()
        assert shape in SHAPES and dominant_colour(s.image, halves[place]) == colour, s.caption
        one_place[place] = one_place.get(place, 0) + 1
    assert set(one_place) == set(halves) and min(one_place.values()) >= 30  # either object of the pair is named
    with pytest.raises(DataError, match="pair_captions='sideways' is unknown"):
        build_synth_dataset(Path("unused"), pair_captions="sideways", progress=False)


def test_tokenizer_round_trips_every_caption(synth_dir, make_cfg):
    tok = load_tokenizer(make_cfg())
    captions = [s.caption for s in stream_of(make_cfg(), tok, shard_paths(synth_dir, "val"), shuffle=False,
                                              loop=False)]
    assert len(captions) == 300
    assert all(tok.decode(tok.encode(c)) == c for c in captions)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.image_id) == (0, 1, 2, 3)


def test_constant_caption_baseline_is_under_20_percent(synth_dir, make_cfg):
    cfg = make_cfg()
    tok = load_tokenizer(cfg)
    train = Counter(s.caption for s in stream_of(cfg, tok, shard_paths(synth_dir, "train"), loop=False))
    val = Counter(s.caption for s in val_stream(cfg, tok))
    majority = train.most_common(1)[0][0]
    assert val[majority] / 300 < 0.2
    assert max(val.values()) / 300 < 0.2  # no constant caption does better
    assert len(val) > 50


def test_batch_masks_only_caption_and_eos(make_cfg):
    cfg = make_cfg()
    tok = load_tokenizer(cfg)
    batch = next(train_loader(cfg, tok))
    prompt_len = len(tok.encode(cfg.data.prompt))
    image_tokens = 16
    for row, caption in enumerate(batch.captions):
        ids, tgt = batch.input_ids[row], batch.targets[row]
        caption_ids = tok.encode(caption) + [tok.eos_id]
        start = 1 + image_tokens + prompt_len  # first caption position
        assert ids[0] == tok.bos_id and torch.all(ids[1:1 + image_tokens] == tok.image_id)
        assert ids[start:start + len(caption_ids)].tolist() == caption_ids
        loss_positions = torch.nonzero(tgt != IGNORE_INDEX).flatten().tolist()
        # position t predicts token t+1: the last prompt token predicts the first caption token
        assert loss_positions == list(range(start - 1, start - 1 + len(caption_ids)))
        assert tgt[loss_positions].tolist() == caption_ids
        assert torch.all(ids[start + len(caption_ids):] == tok.pad_id)
    assert batch.pixel_values.shape == (cfg.data.batch_size, 3, 64, 64)
    assert -1.0 <= batch.pixel_values.min() and batch.pixel_values.max() <= 1.0


def test_epoch_sees_every_sample_once_in_seeded_order(synth_dir, make_cfg):
    cfg = make_cfg()
    tok = load_tokenizer(cfg)
    shards = shard_paths(synth_dir, "train")
    keys = lambda **kw: [s.key for s in stream_of(cfg, tok, shards, loop=False, **kw)]  # noqa: E731
    first = keys()
    assert len(first) == 3000 and len(set(first)) == 3000
    assert first == keys()
    assert first != sorted(first)
    assert keys(shuffle=False) == sorted(first)


def test_resumed_loader_continues_exactly_across_epochs(tmp_path, make_cfg):
    cfg = make_cfg()
    tok = load_tokenizer(cfg)
    shards = [write_tar(tmp_path / f"s{i}.tar", [
        {"__key__": f"s{i}-{j}", "png": png_bytes((20 * j, 100, 50 * i)), "json": caption_json("a red circle on the left.")}
        for j in range(5)]) for i in range(2)]
    reference = BatchLoader(stream_of(cfg, tok, shards), 3, tok.pad_id)
    batches = [next(reference) for _ in range(8)]  # 24 samples: more than two epochs of 10
    for k in (1, 3, 4, 6):
        partial = BatchLoader(stream_of(cfg, tok, shards), 3, tok.pad_id)
        for _ in range(k):
            next(partial)
        state = json.loads(json.dumps(partial.state_dict()))  # as stored in a checkpoint
        resumed = BatchLoader(stream_of(cfg, tok, shards), 3, tok.pad_id)
        resumed.load_state_dict(state)
        for want in batches[k:]:
            got = next(resumed)
            assert got.keys == want.keys
            assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.pixel_values, want.pixel_values)
    first_epoch = [key for b in batches for key in b.keys][:10]
    assert sorted(first_epoch) == sorted(f"s{i}-{j}" for i in range(2) for j in range(5))


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, make_cfg, caplog):
    cfg = make_cfg()
    tok = load_tokenizer(cfg)
    good = lambda k: {"__key__": k, "png": png_bytes(), "json": caption_json("a red square on the left.")}  # noqa: E731
    corrupt_jpeg = jpeg_bytes()[:200]
    s1 = write_tar(tmp_path / "s1.tar", [
        good("g1"),
        {"__key__": "badjpg", "jpg": corrupt_jpeg, "json": caption_json("a green square on the right.")},
        {"__key__": "nocap", "png": png_bytes(), "json": json.dumps({"source": "x"}).encode()},
        {"__key__": "nojson", "png": png_bytes()},
        {"__key__": "garbled", "png": png_bytes(), "json": b"{not json"},
        good("g2"),
    ])
    s2 = write_tar(tmp_path / "s2.tar", [good("h1"), good("h2"), good("h3")])
    data = Path(s2).read_bytes()
    Path(s2).write_bytes(data[: 512 * 5 + 100])  # cut inside the third member's data: an unreadable member
    s3 = write_tar(tmp_path / "s3.tar", [good("k1")])
    stream = stream_of(cfg, tok, [s1, s2, s3], shuffle=False, loop=False)
    with caplog.at_level(logging.WARNING, logger="mmfm.data.loader"):
        keys = [s.key for s in stream]
    assert keys == ["g1", "g2", "k1"]  # h1 is cut after its json member: its image is lost, so it is not served
    assert dict(stream.skipped) == {"bad_image": 1, "no_caption": 2, "bad_json": 1, "read_error": 1}
    assert "skipped sample badjpg (bad_image)" in caplog.text and "read_error" in caplog.text


def test_missing_data_set_is_a_clear_error(tmp_path, make_cfg):
    with pytest.raises(DataError, match=r"no manifest.json in .*mmfm data synth"):
        load_tokenizer(make_cfg(data=tmp_path))


def test_data_with_no_usable_sample_stops_instead_of_spinning(tmp_path, make_cfg):
    cfg = make_cfg()
    tok = load_tokenizer(cfg)
    shard = write_tar(tmp_path / "bad.tar", [{"__key__": f"k{i}", "png": png_bytes()} for i in range(3)])
    with pytest.raises(DataError, match="gave no usable sample"):
        next(stream_of(cfg, tok, [shard]))


def test_multi_image_and_text_only_samples_batch_and_run_through_the_model(tmp_path, make_cfg):
    from mmfm.models import build_model

    cfg = make_cfg()
    tok = load_tokenizer(cfg)
    shard = write_tar(tmp_path / "mixed.tar", [
        {"__key__": "two", "0.png": png_bytes((200, 0, 0)), "1.jpg": jpeg_bytes(),
         "json": caption_json("a red square on the left.")},
        {"__key__": "text", "json": caption_json("the handwritten digit one.")},
    ])
    batch = next(BatchLoader(stream_of(cfg, tok, [shard], shuffle=False), 2, tok.pad_id))
    per_image = 16  # 64 px / 16 px patches
    assert batch.images_per_sample == [2, 0]
    assert batch.pixel_values.shape == (2, 3, 64, 64)
    assert batch.pixel_values[0, 0].mean() > batch.pixel_values[1, 0].mean()  # red image first
    assert int((batch.input_ids[0] == tok.image_id).sum()) == 2 * per_image
    assert int((batch.input_ids[1] == tok.image_id).sum()) == 0
    text_ids = tok.encode("the handwritten digit one.") + [tok.eos_id]
    assert batch.input_ids[1, : len(text_ids) + 1].tolist() == [tok.bos_id] + text_ids
    assert batch.targets[1, : len(text_ids)].tolist() == text_ids
    logits = build_model(cfg.model)(batch.input_ids, batch.pixel_values)
    assert logits.shape == (*batch.input_ids.shape, cfg.model.language.vocab_size)
