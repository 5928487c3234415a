"""Hostile data sets and recipes: a manifest, a data file or a recipe cannot run a command, read or write outside
its folder, or leak the environment; a bad manifest and a replaced shard stop training with one line."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import SMALL_MODEL
from mmfm.cli.main import main as cli_main
from mmfm.data import manifest as mf
from mmfm.data.build import load_tokenizer, train_loader
from mmfm.data.pipeline import RecipeError, build
from mmfm.data.sources import JsonlSource, LlavaSource
from mmfm.data.synth import build_synth_dataset
from mmfm.train.trainer import Trainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """200 training samples in two shards of 100 (the same counts), 20 for validation; copy before changing."""
    out = tmp_path_factory.mktemp("trust") / "tiny"
    build_synth_dataset(out, seed=0, train_size=200, val_size=20, shard_size=100, instruct_text=True, progress=False)
    return out


@pytest.fixture
def copy(tiny, tmp_path):
    shutil.copytree(tiny, tmp_path / "data")
    return tmp_path / "data"


def edit_manifest(data, change) -> None:
    path = data / mf.MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def set_first_shard_file(data, name: str) -> None:
    edit_manifest(data, lambda m: m["splits"]["train"]["shards"][0].update(file=name))


# ---- 1. manifest shard entries ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, why", [
    ("pipe:touch {marker}; cat {real}", "is a URL or command, not a file name"),
    ("file://{real}", "is a URL or command"),
    ("{real}", "is an absolute path"),
    ("../tiny/train-000000.tar", "leads outside"),
])
def test_a_manifest_shard_cannot_run_a_command_or_leave_the_folder(copy, tmp_path, monkeypatch, name, why):
    marker = tmp_path / "marker"
    set_first_shard_file(copy, name.format(marker=marker, real=copy / "train-000000.tar"))
    monkeypatch.chdir(copy)  # data.path=. : the shard path would be the bare entry
    for data_path in (copy, "."):
        with pytest.raises(mf.DataError) as info:
            mf.shard_paths(data_path, "train")
        message = str(info.value)
        assert message.startswith(f"{Path(data_path) / mf.MANIFEST}: split 'train' shard 0 file ")
        assert why in message and "shard files must be plain names inside the data folder" in message
    assert not marker.exists()


def test_a_shard_symlinked_from_outside_is_refused(copy, tmp_path):
    outside = tmp_path / "elsewhere.tar"
    shutil.copy(copy / "train-000000.tar", outside)
    (copy / "train-000000.tar").unlink()
    (copy / "train-000000.tar").symlink_to(outside)
    with pytest.raises(mf.DataError, match="'train-000000.tar' leads outside"):
        mf.shard_paths(copy, "train")


def save_png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(path)
    return path


def test_image_paths_in_data_files_stay_inside_the_image_folder(tmp_path):
    save_png(tmp_path / "secret" / "s.png")
    data = tmp_path / "data"
    save_png(data / "img" / "ok.png")
    (data / "img" / "link.png").symlink_to(tmp_path / "secret" / "s.png")
    bad = ["../secret/s.png", str(tmp_path / "secret" / "s.png"), "pipe:touch marker", "img/link.png"]
    lines = [{"image": "img/ok.png", "text": "kept"}] + [{"image": b, "text": f"bad {i}", "id": i}
                                                        for i, b in enumerate(bad)]
    (data / "d.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    (data / "llava.json").write_text(json.dumps([{"id": "x", "image": "../secret/s.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "red"}]}]))

    out = list(JsonlSource(data / "d.jsonl", "web"))
    assert [(o.key, getattr(o, "reason", "kept")) for o in out] == [
        ("d:1", "kept"), ("0", "unsafe_path"), ("1", "unsafe_path"), ("2", "unsafe_path"), ("3", "unsafe_path")]
    assert "leads outside" in out[1].detail and "is an absolute path" in out[2].detail
    assert "URL or command" in out[3].detail and "leads outside" in out[4].detail
    assert [o.reason for o in LlavaSource(data / "llava.json", "llava")] == ["unsafe_path"]
    # a wider image_root lets a JSONL file point at a sibling folder (still no absolute path or command)
    wide = list(JsonlSource(data / "d.jsonl", "web", image_root=tmp_path))
    assert [getattr(o, "reason", "kept") for o in wide] == ["kept", "kept", "unsafe_path", "unsafe_path", "kept"]
    assert not (tmp_path / "marker").exists() and not (data / "marker").exists()


# ---- 2, 3, 4. recipes -------------------------------------------------------------------------------------------


def write_recipe(tmp_path, output: str = "", name: str = "set") -> str:
    (tmp_path / "t.txt").write_text("first document here\nsecond document there\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: {name}\nsources:\n  - {{type: text, path: t.txt, name: t}}\n"
                      f"output:\n  format: webdataset\n{output}")
    return str(recipe)


def files_under(root) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("output", ["  prefix: ../../escape\n", "  prefix: 'pipe:touch {marker}'\n",
                                    "  split: ../up\n", "  prefix: /tmp/abs\n"])
def test_recipe_output_stays_inside_out(tmp_path, output):
    marker = tmp_path / "marker"
    recipe = write_recipe(tmp_path, output.format(marker=marker))
    before = files_under(tmp_path)
    with pytest.raises(RecipeError, match=r"output\.(prefix|split)=.* is not a plain file-name stem"):
        build(recipe, tmp_path / "a" / "b" / "out", progress=False)
    assert files_under(tmp_path) == before and not marker.exists()


def test_recipe_cannot_read_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MMFM_TEST_SECRET", "hunter2-secret")
    recipe = write_recipe(tmp_path, "  split: train\n", name="'leak-${oc.env:MMFM_TEST_SECRET}'")
    with pytest.raises(RecipeError, match=r"name='leak-\$\{oc.env:MMFM_TEST_SECRET\}' calls a resolver"):
        build(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    # references to the recipe's own keys still resolve
    recipe = write_recipe(tmp_path, "  split: train\n", name="'set-${output.split}'")
    manifest = build(recipe, tmp_path / "out", progress=False)
    assert manifest["recipe"]["name"] == "set-train" and "hunter2" not in (tmp_path / "out" / mf.MANIFEST).read_text()


@pytest.mark.parametrize("recipe_text, message", [
    ("name: x\nsources:\n  - {type: text, path: t.txt, name: t}\nstages:\n  - {filter: sharpen}\n",
     "stage filter: sharpen: unknown filter 'sharpen'; known: "),
    ("name: x\nsources:\n  - {type: text, path: t.txt, name: t}\nstages:\n  - {dedup: fuzzy}\n",
     "stage dedup: fuzzy: unknown dedup 'fuzzy'; known: "),
    ("name: [unclosed\n", "cannot be read"),
    ("- just\n- a list\n", "is not a mapping"),
    ("name: x\nsources: [one, two]\n", "sources must be a list of mappings"),
])
def test_bad_recipe_is_one_line_rc_2(tmp_path, capsys, recipe_text, message):
    (tmp_path / "t.txt").write_text("a document\n")
    (tmp_path / "r.yaml").write_text(recipe_text)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["data", "build", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("mmfm data build: error: ")
    assert message in err and err.count("\n") == 1


# ---- 4. bad manifests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (lambda m: m["splits"].pop("train"), "has no split 'train' (it has ['val']); rebuild it with a 'train' split"),
    (lambda m: m["splits"]["train"].update(shards=[]), "lists no shards; rebuild the data set"),
    (lambda m: m.update(splits=["train"]), "'splits' is missing or not an object; rebuild the data set"),
    (lambda m: m["splits"]["train"]["shards"][1].update(samples="many"), "split 'train' shard 1 samples='many' is "
                                                                         "not a count"),
    (lambda m: m["splits"]["train"]["shards"][0].update(sha256=42), "shard 0 sha256=42 is not a sha256 hex digest"),
    (lambda m: m["splits"]["train"].update(shards={"a": 1}), "split 'train' has no list of shards"),
])
def test_bad_manifest_is_one_clear_error(copy, make_cfg, change, message):
    edit_manifest(copy, change)
    cfg = make_cfg(data=copy)
    with pytest.raises(mf.DataError, match=re.escape(message)):
        train_loader(cfg, load_tokenizer(cfg))


@pytest.mark.parametrize("text, message", [("{not json", "is not valid JSON"), ("[1, 2]", "holds a JSON list")])
def test_unreadable_manifest_is_one_clear_error(copy, make_cfg, text, message):
    (copy / mf.MANIFEST).write_text(text)
    with pytest.raises(mf.DataError, match=message):
        load_tokenizer(make_cfg(data=copy))


def test_mmfm_train_without_train_shards_exits_2_with_one_line(copy, tmp_path):
    edit_manifest(copy, lambda m: m["splits"]["train"].update(shards=[]))
    res = subprocess.run([sys.executable, "-m", "mmfm.cli.main", "train", *SMALL_MODEL, f"data.path={copy}",
                          f"run_dir={tmp_path / 'run'}", "logger.wandb.enabled=false", "logger.progress_bar=false"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "WANDB_MODE": "offline"})
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1] == (f"mmfm train: error: split 'train' of {copy}/{mf.MANIFEST} lists "
                                                   "no shards; rebuild the data set")
    assert "Traceback" not in res.stderr


# ---- 5. shard checksums -----------------------------------------------------------------------------------------


def swap_shards(data) -> None:
    """Exchange the two training shards' bytes: both valid, both of 100 samples, each in the other's place."""
    a, b = data / "train-000000.tar", data / "train-000001.tar"
    tmp = data / "swap"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


SHORT = ["train.max_steps=2", "train.schedule.warmup_steps=1", "data.batch_size=4", "data.shuffle_buffer=10"]
REPLACED = (r"^shard .*/train-00000[01]\.tar does not match the sha256 that .*/manifest\.json records for it \(it was "
            r"replaced or changed\); rebuild the data set or restore the shard$")


@pytest.mark.parametrize("workers", [0, 1])
def test_training_refuses_a_replaced_shard(copy, make_cfg, tmp_path, workers):
    swap_shards(copy)
    with pytest.raises(mf.DataError, match=REPLACED):  # one line, also from a loader worker
        Trainer(make_cfg(*SHORT, f"data.num_workers={workers}", data=copy), tmp_path / "run").fit()


def test_unverified_shards_are_read_as_they_are(copy, make_cfg):
    swap_shards(copy)
    cfg = make_cfg(*SHORT, "data.verify_shards=false", data=copy)
    assert len(next(train_loader(cfg, load_tokenizer(cfg))).keys) == 4


def test_each_shard_is_hashed_once_per_process_and_again_when_replaced(copy, monkeypatch):
    hashed = []
    real_hash = mf.sha256_file
    monkeypatch.setattr(mf, "sha256_file", lambda path: hashed.append(path.name) or real_hash(path))
    checksums = mf.ShardChecksums.of(copy, "train")
    shards = mf.shard_paths(copy, "train")
    for _ in range(3):  # three epochs
        for shard in shards:
            checksums.check(shard)
    assert hashed == ["train-000000.tar", "train-000001.tar"]
    shutil.copy(shards[1], shards[0])  # replaced mid-run by a shard with the same sample count
    with pytest.raises(mf.DataError, match=REPLACED):
        checksums.check(shards[0])
