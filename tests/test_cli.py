"""End to end through the console script: data synth -> train -> generate, with a damaged sample."""

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import SMALL_MODEL

CLI = [sys.executable, "-m", "mmfm.cli.main"]


def mmfm(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=300, env=env)


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["data", "synth", "--help"],
                                  ["train", "--help"]])
def test_help(args, tmp_path):
    res = mmfm(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "usage" in res.stdout.lower() or "== Configuration groups ==" in res.stdout


def damage_first_png(shard: Path) -> str:
    """Overwrite the header of the first PNG member in place; the tar itself stays readable."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    with open(shard, "r+b") as f:
        f.seek(member.offset_data + 8)
        f.write(b"\0" * 32)
    return member.name.split(".")[0]


def record_sha256(data: Path, shard: str) -> None:
    """Write a shard's present sha256 into the manifest (else training refuses the changed shard)."""
    path = data / "manifest.json"
    manifest = json.loads(path.read_text())
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            if entry["file"] == shard:
                entry["sha256"] = hashlib.sha256((data / shard).read_bytes()).hexdigest()
    path.write_text(json.dumps(manifest))


def test_synth_pair_captions_flag(tmp_path):
    res = mmfm("data", "synth", "--out", "d", "--train-size", "20", "--val-size", "8", "--digit-fraction", "0",
               "--pair-fraction", "1", "--pair-captions", "shuffled", "--instruct-text", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "d/manifest.json").read_text())
    assert manifest["params"]["pair_captions"] == "shuffled" and manifest["params"]["instruct_text"]
    captions = json.loads((tmp_path / "d/examples/captions.json").read_text()).values()
    assert all(c.startswith(("on the", "at the")) and " is a " in c for c in captions)


def test_synth_train_generate(tmp_path):
    res = mmfm("data", "synth", "--out", "data", "--train-size", "200", "--val-size", "20", "--shard-size", "100",
               cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "train: 200 samples in 2 shards" in res.stdout
    bad_key = damage_first_png(tmp_path / "data/train-000000.tar")
    record_sha256(tmp_path / "data", "train-000000.tar")  # a data set built with a bad image inside

    res = mmfm("train", "data.path=data", "run_dir=run", "train.max_steps=9", "train.schedule.warmup_steps=1",
               "data.batch_size=25", "logger.log_every=1", "logger.wandb.enabled=false", "eval.num_samples=4",
               *SMALL_MODEL, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "held-out exact-match caption accuracy" in res.stdout
    run = tmp_path / "run"
    assert f"skipped sample {bad_key} (bad_image)" in (run / "train.log").read_text()
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line][-1]
    assert last["skipped_bad_image"] == 1 and last["epoch"] == 1  # the whole first epoch was read

    res = mmfm("generate", "--checkpoint", "run", "--images", *sorted(str(p) for p in (tmp_path / "data/examples").glob("*.png"))[:3],
               "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(lines) == 3 and all(set(r) == {"image", "text"} for r in lines)

    res = mmfm("generate", "--checkpoint", "run", "--images", "missing.png", cwd=tmp_path)
    assert res.returncode == 2 and "cannot read image missing.png" in res.stderr
