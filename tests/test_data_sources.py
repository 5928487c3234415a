"""Sources for `mmfm data build`: each format read correctly, and bad input turned into Dropped(stage="read")."""

import gzip
import io
import json
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from mmfm.data.records import Dropped, Record
from mmfm.data.sources import (ImageFolderSource, JsonlSource, LlavaSource, SourceError, TarShardSource,
                               TextSource, build_source)


def save_image(path, color, fmt="PNG", size=(8, 6)) -> bytes:
    """Save a small image; return the file's bytes (what a source must return unchanged)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path.read_bytes()


def image_bytes(color, fmt="PNG", size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def summary(outcomes):
    """(type, key, reason or text) per outcome: what most assertions compare."""
    return [("D", o.key, o.reason) if isinstance(o, Dropped) else ("R", o.key, o.text) for o in outcomes]


def read_twice(source):
    first, second = list(source), list(source)
    assert first == second  # deterministic order and content
    for o in first:
        assert o.source == source.name
        if isinstance(o, Dropped):
            assert o.stage == "read" and o.detail
        else:
            assert o.license == source.license
    return first


def records(outcomes):
    return {o.key: o for o in outcomes if isinstance(o, Record)}


# ---- image folder -------------------------------------------------------------------------------------------


def test_image_folder(tmp_path):
    a = save_image(tmp_path / "a.png", "red")
    (tmp_path / "a.txt").write_text("  a red square \n")
    b = save_image(tmp_path / "sub" / "b.jpg", "blue", "JPEG")
    (tmp_path / "sub" / "b.json").write_text(json.dumps({"caption": "a blue square", "url": "http://x/b.jpg"}))
    c = save_image(tmp_path / "sub" / "c.JPEG", "green", "JPEG")
    (tmp_path / "sub" / "c.json").write_text(json.dumps({"text": "green"}))
    save_image(tmp_path / "d.png", "white")  # no sidecar
    save_image(tmp_path / "e.png", "black")
    (tmp_path / "e.txt").write_text(" \n")
    save_image(tmp_path / "f.png", "gray")
    (tmp_path / "f.json").write_text("{not json")
    save_image(tmp_path / ".hidden" / "g.png", "red")  # dot folders are not read
    (tmp_path / "notes.md").write_text("not an image")

    out = read_twice(ImageFolderSource(tmp_path, "folder", license="cc-by-4.0"))
    assert summary(out) == [("R", "a", "a red square"), ("D", "d", "no_caption"), ("D", "e", "empty_caption"),
                            ("D", "f", "invalid_json"), ("R", "sub/b", "a blue square"), ("R", "sub/c", "green")]
    recs = records(out)
    assert recs["a"].images == [a] and recs["sub/b"].images == [b] and recs["sub/c"].images == [c]
    assert recs["sub/b"].meta == {"url": "http://x/b.jpg"} and recs["a"].meta == {}
    assert recs["a"].license == "cc-by-4.0" and recs["a"].conversations is None

    only_txt = read_twice(ImageFolderSource(tmp_path, "folder", caption_ext=(".txt",)))
    assert ("D", "sub/b", "no_caption") in summary(only_txt)


# ---- jsonl --------------------------------------------------------------------------------------------------


def test_jsonl(tmp_path):
    x = save_image(tmp_path / "img" / "x.png", "red")
    y = save_image(tmp_path / "img" / "y.jpg", "blue", "JPEG")
    save_image(tmp_path / "elsewhere" / "z.png", "green")
    lines = [
        json.dumps({"image": "img/x.png", "text": "a red one", "score": 0.5}),
        json.dumps({"id": "pair", "image": ["img/x.png", "img/y.jpg"], "text": "two images"}),
        json.dumps({"text": "a text-only document"}),
        '{"image": "img/x.png", "text": ',  # cut short
        "",
        json.dumps({"image": "img/missing.png", "text": "gone"}),
        json.dumps({"image": str(tmp_path / "elsewhere" / "z.png"), "text": "absolute", "key": 7}),
        json.dumps({"image": "img/x.png", "text": "   "}),
        json.dumps({"image": "img/x.png"}),
        json.dumps(["not", "an", "object"]),
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")

    out = read_twice(JsonlSource(tmp_path / "data.jsonl", "pairs"))
    assert summary(out) == [("R", "data:1", "a red one"), ("R", "pair", "two images"),
                            ("R", "data:3", "a text-only document"), ("D", "data:4", "invalid_json"),
                            ("D", "data:6", "missing_image"), ("D", "7", "unsafe_path"),
                            ("D", "data:8", "empty_caption"), ("D", "data:9", "no_caption"),
                            ("D", "data:10", "invalid_json")]
    recs = records(out)
    assert recs["data:1"].images == [x] and recs["data:1"].meta == {"score": 0.5}
    assert recs["pair"].images == [x, y] and recs["data:3"].images == []
    assert "is an absolute path" in next(o for o in out if o.key == "7").detail  # a data file names no other file
    bad_line = next(o for o in out if o.key == "data:4")
    assert "data.jsonl:4" in bad_line.detail
    assert "img/missing.png" in next(o for o in out if o.key == "data:6").detail


def test_jsonl_custom_fields_and_folder(tmp_path):
    x = save_image(tmp_path / "a" / "x.png", "red")
    (tmp_path / "a" / "one.jsonl").write_text(json.dumps({"img": "x.png", "caption": "red"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"caption": "text"}) + "\n")
    out = read_twice(JsonlSource(tmp_path, "folder", image_field="img", text_field="caption"))
    assert summary(out) == [("R", "a/one:1", "red"), ("R", "b:1", "text")]
    assert out[0].images == [x]


# ---- llava --------------------------------------------------------------------------------------------------

LLAVA = """[
  {
    "id": "000000033471",
    "image": "coco/train2017/000000033471.jpg",
    "conversations": [
      {
        "from": "human",
        "value": "<image>\\nWhat are the colors of the bus in the image?"
      },
      {
        "from": "gpt",
        "value": "The bus in the image is white and red."
      },
      {
        "from": "human",
        "value": "What feature can be seen on the back of the bus?"
      },
      {
        "from": "gpt",
        "value": "The back of the bus features an advertisement."
      }
    ]
  },
  {
    "id": "i6IyJda_0",
    "model": "",
    "conversations": [
      {
        "from": "human",
        "value": "How to tell if a customer segment is well segmented? In 3 bullet points."
      },
      {
        "from": "gpt",
        "value": "1. Homogeneity\\n2. Distinctiveness\\n3. Stability"
      }
    ]
  },
  {
    "id": "no_placeholder",
    "image": "coco/train2017/000000033471.jpg",
    "conversations": [
      {"from": "human", "value": "Describe the image briefly."},
      {"from": "gpt", "value": "A bus."}
    ]
  },
  {
    "id": "two_images",
    "image": ["coco/train2017/000000033471.jpg", "vg/VG_100K/2.png"],
    "conversations": [
      {"from": "system", "value": "You are helpful."},
      {"from": "human", "value": "<image>\\n<image>\\nWhat differs?"},
      {"from": "gpt", "value": "The colour."}
    ]
  },
  {
    "id": "too_many_placeholders",
    "image": "coco/train2017/000000033471.jpg",
    "conversations": [
      {"from": "human", "value": "<image>\\n<image>\\nWhat is this?"},
      {"from": "gpt", "value": "A bus."}
    ]
  },
  {
    "id": "placeholder_no_image",
    "conversations": [
      {"from": "human", "value": "<image>\\nWhat is this?"},
      {"from": "gpt", "value": "Nothing."}
    ]
  },
  {
    "id": "missing",
    "image": "coco/train2017/000000000000.jpg",
    "conversations": [
      {"from": "human", "value": "<image>\\nWhat is this?"},
      {"from": "gpt", "value": "?"}
    ]
  },
  {
    "id": "bad_role",
    "conversations": [
      {"from": "bot", "value": "hello"}
    ]
  },
  {
    "id": "empty",
    "conversations": []
  }
]
"""


def test_llava(tmp_path):
    bus = save_image(tmp_path / "images" / "coco" / "train2017" / "000000033471.jpg", "red", "JPEG")
    vg = save_image(tmp_path / "images" / "vg" / "VG_100K" / "2.png", "blue")
    (tmp_path / "llava_v1_5_mix.json").write_text(LLAVA)

    out = read_twice(LlavaSource(tmp_path / "llava_v1_5_mix.json", "llava", license="cc-by-nc-4.0",
                                 image_root=tmp_path / "images"))
    assert [(type(o).__name__, o.key, getattr(o, "reason", "")) for o in out] == [
        ("Record", "000000033471", ""), ("Record", "i6IyJda_0", ""), ("Record", "no_placeholder", ""),
        ("Record", "two_images", ""), ("Dropped", "too_many_placeholders", "bad_conversation"),
        ("Dropped", "placeholder_no_image", "bad_conversation"), ("Dropped", "missing", "missing_image"),
        ("Dropped", "bad_role", "bad_conversation"), ("Dropped", "empty", "bad_conversation")]
    recs = records(out)
    first = recs["000000033471"]
    assert first.text == "" and first.images == [bus] and first.meta == {}
    assert first.conversations == json.loads(LLAVA)[0]["conversations"]
    assert recs["i6IyJda_0"].images == [] and recs["i6IyJda_0"].meta == {"model": ""}
    assert recs["no_placeholder"].conversations[0] == {"from": "human",
                                                       "value": "<image>\nDescribe the image briefly."}
    assert recs["two_images"].images == [bus, vg] and recs["two_images"].conversations[0]["from"] == "system"
    assert "2 <image> placeholder(s) for 1 image(s)" in next(o for o in out if o.key == "too_many_placeholders").detail


def test_llava_default_root_and_bad_file(tmp_path):
    img = save_image(tmp_path / "pic.png", "red")
    entry = {"id": 1, "image": "pic.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                            {"from": "gpt", "value": "Hello"}]}
    (tmp_path / "chat.json").write_text(json.dumps([entry]))
    (out,) = read_twice(LlavaSource(tmp_path / "chat.json", "chat"))
    assert out.key == "1" and out.images == [img]

    (tmp_path / "broken.json").write_text('[{"id": 1, ')
    assert summary(LlavaSource(tmp_path / "broken.json", "b")) == [("D", "broken", "invalid_json")]
    (tmp_path / "object.json").write_text('{"id": 1}')
    assert summary(LlavaSource(tmp_path / "object.json", "o")) == [("D", "object", "invalid_json")]


# ---- tar shards ---------------------------------------------------------------------------------------------


def test_tar_reads_shardwriter_output(tmp_path):
    samples = [{"__key__": "s0", "jpg": image_bytes("red", "JPEG"), "txt": "caption zero"},
               {"__key__": "s1", "png": image_bytes("blue"), "json": {"caption": "caption one", "w": 8}},
               {"__key__": "s2", "jpg": image_bytes("green", "JPEG"), "txt": "caption two"}]
    with wds.ShardWriter(str(tmp_path / "shard-%06d.tar"), maxcount=2, verbose=0) as sink:
        for s in samples:
            sink.write(dict(s))
    source = TarShardSource(str(tmp_path / "shard-*.tar"), "wds", license="mit")
    assert source.paths == [str(tmp_path / "shard-000000.tar"), str(tmp_path / "shard-000001.tar")]
    out = read_twice(source)
    assert summary(out) == [("R", "shard-000000/s0", "caption zero"), ("R", "shard-000000/s1", "caption one"),
                            ("R", "shard-000001/s2", "caption two")]
    assert [o.images for o in out] == [[samples[0]["jpg"]], [samples[1]["png"]], [samples[2]["jpg"]]]
    assert out[1].meta == {"w": 8} and out[0].meta == {}  # the json's caption is the record's text

    # the same samples that webdataset's own reader gives
    raw = list(wds.DataPipeline(wds.SimpleShardList(source.paths), wds.tarfile_to_samples()))
    assert [r["__key__"] for r in raw] == ["s0", "s1", "s2"]
    assert [r.get("jpg", r.get("png")) for r in raw] == [o.images[0] for o in out]

    # brace patterns, folders and lists name the same shards
    assert TarShardSource(str(tmp_path / "shard-{000000..000001}.tar"), "x").paths == source.paths
    assert TarShardSource(tmp_path, "x").paths == source.paths
    assert TarShardSource(list(reversed(source.paths)), "x").paths == source.paths[::-1]


def write_tar(path, members):
    """A tar of (name, bytes) members, in order."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_tar_img2dataset_layout(tmp_path):
    jpg0, jpg1, png1, jpg2 = (image_bytes(c, f) for c, f in
                              [("red", "JPEG"), ("blue", "JPEG"), ("green", "PNG"), ("white", "JPEG")])
    meta0 = {"url": "http://example.com/0.jpg", "caption": "a red thing", "key": "000000000",
             "status": "success", "error_message": None, "width": 8, "height": 6}
    meta2 = {"url": "http://example.com/2.jpg", "caption": "from the json", "key": "000000002",
             "status": "success"}
    write_tar(tmp_path / "00000.tar", [
        ("000000000.jpg", jpg0), ("000000000.txt", b"a red thing"), ("000000000.json", json.dumps(meta0).encode()),
        ("000000001.1.png", png1), ("000000001.0.jpg", jpg1), ("000000001.TXT", b"two views"),
        ("000000002.jpg", jpg2), ("000000002.json", json.dumps(meta2).encode()),
        ("000000003.jpg", jpg0),  # no caption at all
        ("000000004.jpg", jpg0), ("000000004.txt", b"  "),
        ("000000005.jpg", jpg0), ("000000005.json", b"{oops"),
        ("000000006.jpg", jpg0), ("000000006.txt", b"\xff\xfe bad utf-8"),
        ("__meta__", b"skipped"),
    ])
    out = read_twice(TarShardSource(tmp_path / "00000.tar", "laion"))
    assert summary(out) == [("R", "00000/000000000", "a red thing"), ("R", "00000/000000001", "two views"),
                            ("R", "00000/000000002", "from the json"), ("D", "00000/000000003", "no_caption"),
                            ("D", "00000/000000004", "empty_caption"), ("D", "00000/000000005", "invalid_json"),
                            ("D", "00000/000000006", "unreadable_file")]
    recs = records(out)
    assert recs["00000/000000000"].meta == {k: v for k, v in meta0.items() if k != "caption"}
    assert recs["00000/000000000"].images == [jpg0]
    assert recs["00000/000000001"].images == [jpg1, png1]  # "0.jpg" before "1.png"
    assert recs["00000/000000002"].images == [jpg2] and recs["00000/000000002"].meta["status"] == "success"


def shard_with_offsets(path, n=3):
    """A ShardWriter-style shard of n samples (incompressible "images"); its members' TarInfo."""
    import random
    rng = random.Random(0)
    samples = [{"__key__": f"k{i}", "jpg": rng.randbytes(3000), "txt": f"caption {i}"} for i in range(n)]
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(dict(s))
    with tarfile.open(path) as tf:
        return samples, tf.getmembers()


def test_truncated_tar(tmp_path):
    samples, members = shard_with_offsets(tmp_path / "full.tar")
    data = (tmp_path / "full.tar").read_bytes()
    second = next(m for m in members if m.name == "k1.jpg")

    cut = tmp_path / "cut.tar"  # in the middle of the second sample's image data
    cut.write_bytes(data[: second.offset_data + second.size // 2])
    out = read_twice(TarShardSource(cut, "t"))
    assert summary(out) == [("R", "cut/k0", "caption 0"), ("D", "cut", "truncated_tar")]
    assert out[0].images == [samples[0]["jpg"]]
    assert str(cut) in out[1].detail and "after 1 complete sample(s)" in out[1].detail
    assert "'k1' in progress" in out[1].detail

    # cut exactly before a header: tarfile itself stops without an error here
    third = next(m for m in members if m.name == "k2.jpg")
    quiet = tmp_path / "quiet.tar"
    quiet.write_bytes(data[: third.offset])
    assert sum(1 for _ in tarfile.open(quiet, "r|*")) == 4  # no error from tarfile
    assert summary(TarShardSource(quiet, "t")) == [("R", "quiet/k0", "caption 0"), ("D", "quiet", "truncated_tar")]

    gz = tmp_path / "cut.tar.gz"  # compressed shards are read too, and their damage found
    gz.write_bytes(gzip.compress(data[: second.offset_data + 100]))
    assert summary(TarShardSource(gz, "t")) == [("R", "cut/k0", "caption 0"), ("D", "cut", "truncated_tar")]
    (tmp_path / "full.tar.gz").write_bytes(gzip.compress(data))
    assert len(records(TarShardSource(tmp_path / "full.tar.gz", "t"))) == 3


def test_unreadable_and_short_shards(tmp_path):
    import random
    (tmp_path / "junk.tar").write_bytes(random.Random(0).randbytes(5000))
    (tmp_path / "empty.tar").write_bytes(b"")
    out = read_twice(TarShardSource([tmp_path / "junk.tar", tmp_path / "empty.tar"], "bad"))
    assert summary(out) == [("D", "junk", "unreadable_file"), ("D", "empty", "unreadable_file")]

    # a well-formed shard with fewer samples than the mmfm manifest.json beside it lists
    shard_with_offsets(tmp_path / "train-000000.tar", n=2)
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"splits": {"train": {"shards": [{"file": "train-000000.tar", "samples": 3}]}}}))
    out = list(TarShardSource(tmp_path / "train-000000.tar", "m"))
    assert summary(out)[-1] == ("D", "train-000000", "truncated_tar") and "lists 3" in out[-1].detail
    assert len(records(out)) == 2


# ---- text ---------------------------------------------------------------------------------------------------


def test_text_modes(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n  second line  \n\nthird\nstill third\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("only\n")
    (tmp_path / "sub" / "empty.txt").write_text("\n \n")

    lines = read_twice(TextSource(tmp_path, "t", mode="line"))
    assert summary(lines) == [("R", "a:1", "first line"), ("R", "a:3", "second line"), ("R", "a:5", "third"),
                              ("R", "a:6", "still third"), ("R", "sub/b:1", "only"),
                              ("D", "sub/empty", "empty_caption")]
    assert all(o.images == [] for o in records(lines).values())

    paragraphs = read_twice(TextSource(tmp_path, "t", mode="paragraph"))
    assert summary(paragraphs)[:3] == [("R", "a:1", "first line"), ("R", "a:3", "second line"),
                                       ("R", "a:5", "third\nstill third")]

    files = read_twice(TextSource(tmp_path, "t", mode="file"))
    assert summary(files) == [("R", "a", "first line\n\n  second line  \n\nthird\nstill third"),
                              ("R", "sub/b", "only"), ("D", "sub/empty", "empty_caption")]

    single = read_twice(TextSource(tmp_path / "sub" / "b.txt", "one", mode="file"))
    assert summary(single) == [("R", "b", "only")]


def test_text_not_utf8(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good line\n\xff\xfe\xfa bad bytes\n" + b"x" * 20000)
    out = read_twice(TextSource(tmp_path, "t"))
    assert summary(out)[-1] == ("D", "bad", "unreadable_file")
    assert summary(TextSource(tmp_path, "t", mode="file")) == [("D", "bad", "unreadable_file")]


# ---- build_source -------------------------------------------------------------------------------------------


def test_build_source(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    (tmp_path / "t.txt").write_text("hi\n")
    (tmp_path / "l.json").write_text("[]")
    write_tar(tmp_path / "s.tar", [("k.txt", b"hi")])
    specs = {"image_folder": tmp_path, "jsonl": tmp_path / "d.jsonl", "llava": tmp_path / "l.json",
             "tar": str(tmp_path / "*.tar"), "text": tmp_path / "t.txt"}
    kinds = {"image_folder": ImageFolderSource, "jsonl": JsonlSource, "llava": LlavaSource,
             "tar": TarShardSource, "text": TextSource}
    for kind, path in specs.items():
        src = build_source({"type": kind, "path": str(path), "name": f"my-{kind}", "license": "odc-by"})
        assert isinstance(src, kinds[kind]) and src.name == f"my-{kind}" and src.license == "odc-by"
    src = build_source({"type": "text", "path": str(tmp_path / "t.txt"), "name": "x", "mode": "file"})
    assert summary(src) == [("R", "t", "hi")]
    assert summary(build_source({"type": "tar", "path": str(tmp_path / "s.tar"), "name": "x"})) == [
        ("R", "s/k", "hi")]


def test_build_source_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown type 'parquet'.*image_folder, jsonl, llava, tar, text"):
        build_source({"type": "parquet", "path": str(tmp_path), "name": "p"})
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(ValueError, match=r"source 'web'.*nowhere\.jsonl"):
        build_source({"type": "jsonl", "path": str(missing), "name": "web"})
    with pytest.raises(ValueError, match=r"source 'shards'.*nothing-\*\.tar"):
        build_source({"type": "tar", "path": str(tmp_path / "nothing-*.tar"), "name": "shards"})
    with pytest.raises(ValueError, match=r"unknown parameter.*'colour'"):
        build_source({"type": "text", "path": str(tmp_path), "name": "t", "colour": "red"})
    with pytest.raises(ValueError, match="mode"):
        build_source({"type": "text", "path": str(tmp_path), "name": "t", "mode": "sentence"})
    with pytest.raises(ValueError, match="no name"):
        build_source({"type": "text", "path": str(tmp_path)})
    with pytest.raises(SourceError):  # an mmfm error: the CLI prints it as one line
        build_source({"type": "llava", "path": str(tmp_path), "name": "l"})  # a folder, not a file
