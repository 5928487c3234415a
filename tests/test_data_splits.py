"""`mmfm data build` train/val splits (output.val_fraction / val_count), recipes refused in one line, builds that keep
nothing, source metadata in the output, and training on a data set with or without a val split."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from conftest import SMALL_MODEL
from mmfm.cli.main import main as cli_main
from mmfm.config import load_config
from mmfm.data import manifest as mf
from mmfm.data.pipeline import RecipeError, build
from mmfm.data.splits import SCALE, split_hash
from mmfm.errors import ConfigError
from test_data_build import RECIPE, _png, make_inputs

# ---- helpers ----------------------------------------------------------------------------------------------------


def corpus(root: Path, lines: int, name: str = "t.txt") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("".join(f"document number {i} of the corpus\n" for i in range(lines)))


def text_recipe(root: Path, output: str, lines: int = 40) -> Path:
    """A text corpus of `lines` documents (keys t:1 .. t:<lines>) into webdataset shards of ~2 samples."""
    corpus(root, lines)
    path = root / "r.yaml"
    path.write_text(f"name: s\nsources: [{{type: text, path: t.txt, name: t}}]\n"
                    f"output: {{format: webdataset, shard_bytes: 150, {output}}}\n")
    return path


def samples(out: Path, split: str) -> list[dict]:
    shards = mf.shard_paths(out, split)  # the training loader's reader accepts the split
    return list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))


def keys(out: Path, split: str) -> list[str]:
    return [json.loads(s["json"])["key"] for s in samples(out, split)]


def h(key: str) -> int:
    return split_hash("t", key)


ALL40 = [f"t:{i}" for i in range(1, 41)]


# ---- A. splits --------------------------------------------------------------------------------------------------


def test_val_fraction_splits_by_the_hash_of_source_and_key(tmp_path):
    m = build(text_recipe(tmp_path, "val_fraction: 0.25"), tmp_path / "out", progress=False)
    expected_val = [k for k in ALL40 if h(k) < 0.25 * SCALE]
    assert 0 < len(expected_val) < 40
    out = tmp_path / "out"
    assert keys(out, "val") == expected_val  # in stream order
    assert keys(out, "train") == [k for k in ALL40 if k not in expected_val]
    assert m["splits"]["val"]["samples"] == len(expected_val) == sum(s["samples"] for s in m["splits"]["val"]["shards"])
    assert m["splits"]["train"]["samples"] == 40 - len(expected_val) and m["stages"]["written"] == 40
    assert [s["__key__"] for s in samples(out, "val")] == [f"{i:09d}" for i in range(len(expected_val))]
    assert all(f["file"].startswith("val-") for f in m["splits"]["val"]["shards"])
    for split in ("train", "val"):
        for shard in m["splits"][split]["shards"]:
            assert mf.sha256_file(out / shard["file"]) == shard["sha256"]
    assert mf.read_manifest(out)["splits"] == m["splits"] and not (out / ".val_spool").exists()


def test_val_fraction_is_stable_when_the_corpus_grows(tmp_path):
    build(text_recipe(tmp_path / "a", "val_fraction: 0.25"), tmp_path / "a" / "out", progress=False)
    build(text_recipe(tmp_path / "b", "val_fraction: 0.25", lines=60), tmp_path / "b" / "out", progress=False)
    small, grown = (set(keys(tmp_path / x / "out", "val")) for x in "ab")
    assert small == grown & set(ALL40)  # no old sample changed its split
    assert grown - small == {f"t:{i}" for i in range(41, 61) if h(f"t:{i}") < 0.25 * SCALE}


def test_val_count_takes_the_smallest_hashes_and_grows_by_displacement(tmp_path):
    m = build(text_recipe(tmp_path / "a", "val_count: 5"), tmp_path / "a" / "out", progress=False)
    val = keys(tmp_path / "a" / "out", "val")
    assert set(val) == set(sorted(ALL40, key=h)[:5]) and val == [k for k in ALL40 if k in val]
    train = keys(tmp_path / "a" / "out", "train")
    assert sorted(train + val) == sorted(ALL40) and m["splits"]["val"]["samples"] == 5
    build(text_recipe(tmp_path / "b", "val_count: 5", lines=60), tmp_path / "b" / "out", progress=False)
    grown = set(keys(tmp_path / "b" / "out", "val"))
    all60 = [f"t:{i}" for i in range(1, 61)]
    assert grown == set(sorted(all60, key=h)[:5])
    new_in_val = grown - set(ALL40)
    assert grown & set(ALL40) <= set(val)  # no train sample moved to val
    assert len(set(val) - grown) == len(new_in_val)  # each new val sample displaced exactly one


@pytest.mark.parametrize("output", ["val_fraction: 0.25", "val_count: 5"])
def test_an_interrupted_split_build_resumes_to_the_same_shards(tmp_path, output):
    recipe = text_recipe(tmp_path, output)
    straight = build(recipe, tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        build(recipe, tmp_path / "resumed", progress=False, stop_after=23)
    state = json.loads((tmp_path / "resumed" / ".build_state.json").read_text())["state"]
    assert state["shards"] and state["val_spool"] > 0 and not (tmp_path / "resumed" / mf.MANIFEST).exists()
    resumed = build(recipe, tmp_path / "resumed", progress=False)
    assert resumed["splits"] == straight["splits"]


def test_a_split_build_interrupted_before_its_manifest_resumes(tmp_path, monkeypatch):
    """Stopped after the val shards, before the manifest: the saved state and its spool are still there."""
    import mmfm.data.pipeline as pipeline

    recipe = text_recipe(tmp_path, "val_count: 5")
    straight = build(recipe, tmp_path / "straight", progress=False)

    def interrupted(manifest):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "_manifest_order", interrupted)
        with pytest.raises(KeyboardInterrupt):
            build(recipe, tmp_path / "resumed", progress=False)
    left = {p.name for p in (tmp_path / "resumed").iterdir()}
    assert {".build_state.json", ".val_spool", "val-000000.tar"} <= left and mf.MANIFEST not in left
    assert build(recipe, tmp_path / "resumed", progress=False)["splits"] == straight["splits"]
    assert not (tmp_path / "resumed" / ".val_spool").exists()


def test_indexed_output_splits_into_two_prefixes(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from mmfm.data.tokenizer import TextTokenizer

    corpus(tmp_path, 40)
    (tmp_path / "r.yaml").write_text("sources: [{type: text, path: t.txt, name: t}]\n"
                                     "output: {format: indexed, prefix: corpus, val_count: 4, "
                                     "tokenizer: {vocab_size: 280}}\n")
    m = build(tmp_path / "r.yaml", tmp_path / "out", progress=False)
    val = {k for k in sorted(ALL40, key=h)[:4]}
    docs = {f"t:{i + 1}": f"document number {i} of the corpus" for i in range(40)}
    tok = TextTokenizer.load(tmp_path / "out" / mf.TOKENIZER)

    def read(prefix):
        ds = IndexedDataset(str(tmp_path / "out" / prefix))
        return [tok.decode(ds[i][:-1].tolist()) for i in range(len(ds))]

    assert read("corpus-val") == [docs[k] for k in ALL40 if k in val]
    assert read("corpus") == [docs[k] for k in ALL40 if k not in val]
    assert (m["indexed"]["documents"], m["indexed_val"]["documents"]) == (36, 4)
    assert m["indexed_val"]["prefix"] == "corpus-val"


@pytest.mark.parametrize("output, message", [
    ("val_fraction: 0.1, val_count: 3", "output.val_fraction and output.val_count are mutually exclusive"),
    ("val_fraction: 1.5", "output.val_fraction=1.5 must be a number strictly between 0 and 1"),
    ("val_fraction: 0", "output.val_fraction=0 must be a number strictly between 0 and 1"),
    ("val_count: 0", "output.val_count=0 must be a whole number >= 1"),
    ("val_count: 2.5", "output.val_count=2.5 must be a whole number >= 1"),
    ("val_countt: 8", "unknown output key(s) ['val_countt']; known: format, split, prefix, shard_bytes, tokenizer, "
                      "val_fraction, val_count"),
    ("split: val, val_count: 3", "output.split=val is the name of the held-out split"),
])
def test_bad_split_options_are_one_line_rc_2(tmp_path, capsys, output, message):
    recipe = text_recipe(tmp_path, output)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["data", "build", str(recipe), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("mmfm data build: error: recipe ")
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_split_left_empty_is_refused_and_nothing_is_left(tmp_path):
    lines = 10
    assert all(h(f"t:{i}") >= 0.001 * SCALE for i in range(1, lines + 1))  # so val_fraction 0.001 picks none
    with pytest.raises(RecipeError) as info:
        build(text_recipe(tmp_path, "val_fraction: 0.001", lines=lines), tmp_path / "out", progress=False)
    assert str(info.value) == ("output.val_fraction=0.001 leaves the val split empty (10 samples kept: train 10, "
                               "val 0); raise output.val_fraction (to 0.2 or more) or set output.val_count instead; "
                               "no data set was written")
    assert not (tmp_path / "out").exists()  # its train shards were removed with the folder
    with pytest.raises(RecipeError, match=r"^output.val_count=10 leaves the train split empty \(10 samples kept: "
                                          r"train 0, val 10\); set output.val_count below 10"):
        build(text_recipe(tmp_path, "val_count: 10", lines=lines), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---- B. recipes, empty builds, metadata, manifest order -------------------------------------------------------


def test_two_sources_of_one_name_are_refused(tmp_path):
    corpus(tmp_path, 3)
    (tmp_path / "r.yaml").write_text("sources: [{type: text, path: t.txt, name: t}, {type: text, path: t.txt, name: t}]\n")
    with pytest.raises(RecipeError, match=r"source name\(s\) \['t'\] used more than once; give each source its own"):
        build(tmp_path / "r.yaml", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage, message", [
    ("{pii: hide}", "pii level 'hide' is unknown; use one of ('keep', 'mask', 'drop')"),
    ("{filter: [decode]}", "stage filter: ['decode'] is not a filter name; write e.g. {filter: decode}"),
    ("{dedup: {kind: exact}}", "stage dedup: {'kind': 'exact'} is not a dedup name; write e.g. {dedup: exact}"),
    ("{filtr: decode}", "must have exactly one of filter:, dedup:, pii:"),
])
def test_unknown_stage_is_one_line_rc_2(tmp_path, capsys, stage, message):
    corpus(tmp_path, 3)
    (tmp_path / "r.yaml").write_text(f"sources: [{{type: text, path: t.txt, name: t}}]\nstages: [{stage}]\n")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["data", "build", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("mmfm data build: error: ") and message in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_build_that_keeps_nothing_exits_2_naming_the_drop_reasons(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "real.png").write_bytes(_png(1))
    lines = [json.dumps({"image": f"pics/{i}.png", "text": f"caption {i}"}) for i in range(4)] + ["{bad"]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "r.yaml").write_text("sources: [{type: jsonl, path: d.jsonl, name: web}]\n"
                                     "stages: [{filter: decode}]\noutput: {tokenizer: {vocab_size: 260}}\n")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["data", "build", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("mmfm data build: error: the build kept none of the 5 records read (dropped: "
                          "read/missing_image 4, read/invalid_json 1); the image paths lead to no file: ")
    assert "set the source's image_root; no data set was written" in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "r.yaml").write_text("sources: [{type: jsonl, path: empty.jsonl, name: web}]\n")
    with pytest.raises(RecipeError, match="^the sources yielded no records; check the sources' paths"):
        build(tmp_path / "r.yaml", tmp_path / "out", progress=False)


def test_manifest_file_lists_stages_in_recipe_order(tmp_path):
    make_inputs(tmp_path / "in")
    (tmp_path / "in" / "r.yaml").write_text(RECIPE)
    build(tmp_path / "in" / "r.yaml", tmp_path / "out", progress=False)
    written = json.loads((tmp_path / "out" / mf.MANIFEST).read_text())
    assert list(written["stages"]) == ["read", "decode", "text_length", "pii", "dedup_exact", "written"]
    assert list(written) == sorted(written)  # the rest stays sorted


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_source_metadata_is_kept_under_meta_and_de_identified(tmp_path):
    a2d = {"url": "http://example.com/0.jpg", "caption": "a red thing", "key": "000000000", "status": "success",
           "width": 32, "height": 32, "exif": {"Make": "mail alice@example.com"}}
    write_tar(tmp_path / "00000.tar", [("000000000.jpg", _png(1)), ("000000000.txt", b"a red thing"),
                                       ("000000000.json", json.dumps(a2d).encode()),
                                       ("000000001.jpg", _png(2)), ("000000001.txt", b"no json here")])
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "a document", "id": "doc1", "lang": "en",
                                                  "score": 0.5}) + "\n")
    (tmp_path / "r.yaml").write_text("sources:\n  - {type: tar, path: 00000.tar, name: laion}\n"
                                     "  - {type: jsonl, path: d.jsonl, name: web}\nstages: [{pii: mask}]\n")
    m = build(tmp_path / "r.yaml", tmp_path / "out", progress=False)
    metas = {j["key"]: j for j in (json.loads(s["json"]) for s in samples(tmp_path / "out", "train"))}
    assert metas["00000/000000000"]["caption"] == "a red thing"
    assert metas["00000/000000000"]["meta"] == {"url": "http://example.com/0.jpg", "key": "000000000",
                                                "status": "success", "width": 32, "height": 32,
                                                "exif": {"Make": "mail [EMAIL]"}}
    assert "meta" not in metas["00000/000000001"]  # no metadata: no key
    assert metas["doc1"]["meta"] == {"id": "doc1", "lang": "en", "score": 0.5}
    assert m["pii"] == {"email": 1} and metas["00000/000000000"]["pii"] == {"email": 1}


# ---- A. training on a data set with or without a val split -----------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The same 8 kept samples built without (no_val) and with (val) a val split."""
    root = tmp_path_factory.mktemp("splits")
    make_inputs(root / "in")
    (root / "in" / "r.yaml").write_text(RECIPE)
    (root / "in" / "v.yaml").write_text(RECIPE.replace("shard_bytes: 600", "shard_bytes: 600\n  val_count: 2"))
    build(root / "in" / "r.yaml", root / "no_val", progress=False)
    build(root / "in" / "v.yaml", root / "val", progress=False)
    return root


def train_cfg(data: Path, *overrides):
    return load_config([f"data.path={data}", *SMALL_MODEL, "logger.wandb.enabled=false", "logger.progress_bar=false",
                        "train.max_steps=2", "train.schedule.warmup_steps=1", "data.batch_size=2",
                        "data.shuffle_buffer=4", "data.seq_len=64", "checkpoint.every=0", *overrides])


def test_training_without_a_val_split_is_refused_before_anything_is_written(built, tmp_path):
    from mmfm.train.trainer import Trainer

    with pytest.raises(ConfigError) as info:
        Trainer(train_cfg(built / "no_val", "train.val_every=1", "eval.num_samples=0"), tmp_path / "run")
    assert str(info.value) == (f"data.path={built / 'no_val'} has no val split, which train.val_every=1 read; build "
                               "it with output.val_fraction (or output.val_count) in the recipe, or set "
                               "train.val_every=0 and eval.num_samples=0 to train without validation")
    with pytest.raises(ConfigError, match=r"which train.val_every=100 and eval.num_samples=256 read; "):
        Trainer(train_cfg(built / "no_val"), tmp_path / "run")  # the defaults
    assert not (tmp_path / "run").exists()


def test_mmfm_train_without_a_val_split_exits_2_with_one_line(built, tmp_path):
    res = subprocess.run([sys.executable, "-m", "mmfm.cli.main", "train", *SMALL_MODEL, "data.seq_len=64",
                          f"data.path={built / 'no_val'}", f"run_dir={tmp_path / 'run'}", "logger.wandb.enabled=false",
                          "logger.progress_bar=false", "train.max_steps=2", "train.schedule.warmup_steps=1"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "WANDB_MODE": "offline"})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        f"mmfm train: error: data.path={built / 'no_val'} has no val split, which train.val_every=100 and "
        "eval.num_samples=256 read; build it with output.val_fraction (or output.val_count) in the recipe, or set "
        "train.val_every=0 and eval.num_samples=0 to train without validation")
    assert not any((tmp_path / "run").rglob("*"))  # Hydra makes the run directory; nothing is written in it


def test_training_without_a_val_split_runs_without_validation(built, tmp_path):
    from mmfm.train.trainer import Trainer

    summary = Trainer(train_cfg(built / "no_val", "train.val_every=0", "eval.num_samples=0"), tmp_path / "run").fit()
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written == {"step": 2} and summary["step"] == 2 and len(summary["losses"]) == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records if r["kind"] != "train"] == ["eval"]


def test_training_on_a_built_val_split_validates_and_evaluates(built, tmp_path):
    from mmfm.train.trainer import Trainer

    cfg = train_cfg(built / "val", "train.val_every=1", "eval.num_samples=2", "eval.max_new_tokens=4")
    summary = Trainer(cfg, tmp_path / "run").fit()
    assert summary["caption_samples"] == 2 and summary["val_loss"] > 0
    vals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in vals if r["kind"] == "val"] == [1, 2]


def test_a_damaged_val_shard_is_found_before_training(built, tmp_path):
    import shutil

    from mmfm.train.trainer import Trainer

    data = tmp_path / "data"
    shutil.copytree(built / "val", data)
    shard = data / "val-000000.tar"
    data_bytes = bytearray(shard.read_bytes())
    data_bytes[len(data_bytes) // 3] ^= 0xFF  # one byte changed, same size
    shard.write_bytes(bytes(data_bytes))
    with pytest.raises(mf.DataError, match=r"^shard .*/val-000000\.tar does not match the sha256 that "):
        Trainer(train_cfg(data, "train.val_every=0", "eval.num_samples=0"), tmp_path / "run")
    shard.unlink()
    with pytest.raises(mf.DataError, match=r"^1 shard\(s\) listed in .*manifest.json are missing, e.g. .*val-000000"):
        Trainer(train_cfg(data, "train.val_every=0", "eval.num_samples=0"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
