"""`mmfm data build <recipe>`: sources -> stages -> shards + manifest, on inputs the tests make."""

import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image, ImageDraw

from mmfm.cli.main import main as cli_main
from mmfm.data import manifest as mf
from mmfm.data.pii import find_pii
from mmfm.data.pipeline import RecipeError, build


def _png(seed: int, size: int = 32) -> bytes:
    img = Image.new("RGB", (size, size), (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256))
    ImageDraw.Draw(img).ellipse([seed % 7, seed % 5, size - seed % 3 - 1, size - 2], fill=(255 - seed, seed, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_inputs(root: Path) -> None:
    folder = root / "folder"
    folder.mkdir(parents=True)
    for i in range(6):
        (folder / f"img{i}.png").write_bytes(_png(i))
        (folder / f"img{i}.txt").write_text(f"a picture of shape number {i} on a plain background")
    (folder / "dup.png").write_bytes(_png(0))  # same image and caption as img0 (case/space differ)
    (folder / "dup.txt").write_text("A  picture of shape number 0 on a plain background")
    (folder / "broken.png").write_bytes(_png(9)[:60])  # truncated
    (folder / "broken.txt").write_text("a broken picture that cannot be decoded")
    (folder / "nocap.png").write_bytes(_png(11))  # no sidecar caption
    lines = [json.dumps({"image": "folder/img1.png", "text": "mail bob.smith@example.com about picture one"}),
             "{not json",
             json.dumps({"image": "folder/missing.png", "text": "an image that is not there"}),
             json.dumps({"image": "folder/img2.png", "text": ""}),
             json.dumps({"text": "a text-only document, call +86 138 0013 8000 for details"})]
    (root / "web.jsonl").write_text("\n".join(lines) + "\n")


RECIPE = """
name: test-set
sources:
  - {type: image_folder, path: folder, name: folder, license: CC0-1.0}
  - {type: jsonl, path: web.jsonl, name: web, license: CC-BY-4.0}
stages:
  - {filter: decode}
  - {filter: text_length, min_words: 2}
  - {pii: mask}
  - {dedup: exact}
output:
  format: webdataset
  split: train
  shard_bytes: 600
  tokenizer: {vocab_size: 300}
"""


@pytest.fixture
def recipe(tmp_path):
    make_inputs(tmp_path / "in")
    path = tmp_path / "in" / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def _samples(out: Path, manifest: dict) -> list[dict]:
    shards = [str(out / s["file"]) for s in manifest["splits"]["train"]["shards"]]
    return list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))


def test_build_counts_every_record_and_masks_pii(recipe, tmp_path):
    out = tmp_path / "out"
    m = build(recipe, out, progress=False)
    assert m["records_read"] == 9 + 5  # 9 image files (one without a caption), 5 JSONL lines
    assert m["stages"]["read"] == {"kept": 10, "dropped": {"no_caption": 1, "invalid_json": 1,
                                                           "missing_image": 1, "empty_caption": 1}}
    assert m["stages"]["decode"] == {"kept": 9, "dropped": {"corrupt_image": 1}}
    assert m["stages"]["text_length"] == {"kept": 9, "dropped": {}}
    assert m["stages"]["pii"] == {"kept": 9, "dropped": {}}
    assert m["stages"]["dedup_exact"] == {"kept": 8, "dropped": {"exact_duplicate": 1}}
    assert m["stages"]["written"] == 8 and m["splits"]["train"]["samples"] == 8
    assert m["sources"]["folder"] == {"samples": 6, "license": "CC0-1.0", "type": "image_folder"}
    assert m["sources"]["web"]["samples"] == 2
    assert m["pii"] == {"email": 1, "cn_mobile": 1}
    samples = _samples(out, m)
    assert len(samples) == 8 and len(m["splits"]["train"]["shards"]) > 1  # 600-byte shards
    for shard in m["splits"]["train"]["shards"]:
        assert mf.sha256_file(out / shard["file"]) == shard["sha256"]
    metas = [json.loads(s["json"]) for s in samples]
    assert all(not find_pii(meta["caption"]) for meta in metas)
    assert "mail [EMAIL] about picture one" in [meta["caption"] for meta in metas]
    assert sum("png" in k for s in samples for k in s) == 7  # 6 folder images + one from the JSONL
    assert (out / mf.TOKENIZER).is_file() and m["tokenizer"]["vocab_size"] == 300
    assert mf.shard_paths(out, "train")  # the training loader's reader accepts it


def test_same_recipe_same_shards_parallel_or_not_and_finished_work_is_skipped(recipe, tmp_path):
    a = build(recipe, tmp_path / "a", progress=False)
    b = build(recipe, tmp_path / "b", workers=2, progress=False)
    hashes = lambda m: [s["sha256"] for s in m["splits"]["train"]["shards"]]  # noqa: E731
    assert hashes(a) == hashes(b)
    before = (tmp_path / "a" / mf.MANIFEST).stat().st_mtime_ns
    assert build(recipe, tmp_path / "a", progress=False) == a  # nothing redone
    assert (tmp_path / "a" / mf.MANIFEST).stat().st_mtime_ns == before


def test_interrupted_build_resumes_to_the_same_shards(recipe, tmp_path):
    straight = build(recipe, tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        build(recipe, tmp_path / "resumed", progress=False, stop_after=9)
    assert (tmp_path / "resumed" / ".build_state.json").is_file()
    assert not (tmp_path / "resumed" / mf.MANIFEST).exists()
    resumed = build(recipe, tmp_path / "resumed", progress=False)
    assert resumed["splits"] == straight["splits"] and resumed["stages"] == straight["stages"]


def test_text_corpus_to_megatron_indexed_dataset(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from mmfm.data.tokenizer import TextTokenizer

    docs = ["the first document is here", "a second one follows it", "the first document is here",
            "and a third, with more words than the others"]
    (tmp_path / "corpus.txt").write_text("\n".join(docs) + "\n")
    (tmp_path / "r.yaml").write_text("""
sources: [{type: text, path: corpus.txt, name: corpus, license: CC0-1.0}]
stages: [{dedup: exact}]
output: {format: indexed, prefix: corpus, tokenizer: {vocab_size: 280}}
""")
    m = build(tmp_path / "r.yaml", tmp_path / "out", progress=False)
    assert m["indexed"]["documents"] == 3 and m["stages"]["dedup_exact"]["dropped"] == {"exact_duplicate": 1}
    ds = IndexedDataset(str(tmp_path / "out" / "corpus"))
    tok = TextTokenizer.load(tmp_path / "out" / mf.TOKENIZER)
    assert [tok.decode(ds[i][:-1].tolist()) for i in range(len(ds))] == [docs[0], docs[1], docs[3]]
    assert all(int(ds[i][-1]) == tok.eos_id for i in range(len(ds)))
    assert sum(len(ds[i]) for i in range(len(ds))) == m["indexed"]["tokens"]
    # and back: an indexed dataset (ours, or one prepared for Megatron) as a source of another build
    (tmp_path / "back.yaml").write_text("""
sources: [{type: indexed, path: out/corpus, tokenizer: out/tokenizer.json, name: megatron, license: CC0-1.0}]
output: {format: indexed, prefix: again, tokenizer: {file: out/tokenizer.json}}
""")
    again = build(tmp_path / "back.yaml", tmp_path / "again", progress=False)
    assert again["indexed"]["sha256"] == m["indexed"]["sha256"] and again["sources"]["megatron"]["samples"] == 3


def test_bad_recipes_are_clear_errors(tmp_path, recipe):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [{type: jsonl, path: nowhere.jsonl, name: x}]\n")
    with pytest.raises(ValueError, match="nowhere.jsonl"):
        build(bad, tmp_path / "o1", progress=False)
    bad.write_text(RECIPE.replace("{pii: mask}", "{pii: hide}").replace("path: ", f"path: {recipe.parent}/"))
    with pytest.raises(RecipeError, match="pii level 'hide' is unknown"):
        build(bad, tmp_path / "o2", progress=False)
    with pytest.raises(RecipeError, match="does not exist"):
        build(tmp_path / "missing.yaml", tmp_path / "o3", progress=False)


def test_cli_build(recipe, tmp_path, capsys):
    assert cli_main(["data", "build", str(recipe), "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    assert "8 samples" in capsys.readouterr().out
