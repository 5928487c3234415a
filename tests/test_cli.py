"""End to end through the console script: data synth -> train -> generate, with a damaged sample."""

import argparse
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import SMALL_MODEL
from mmfm.cli.commands import COMMANDS, TOOLS
from mmfm.cli.main import main as cli_main

CLI = [sys.executable, "-m", "mmfm.cli.main"]
REPO = Path(__file__).resolve().parents[1]
# every command, and every tool of the commands made of tools
ALL = [[command] for command in COMMANDS] + [[command, tool] for command in TOOLS for tool in TOOLS[command]]


def mmfm(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=300, env=env)


def test_help_lists_every_command(tmp_path):
    res = mmfm("--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    listed = re.findall(r"^ {2,4}([a-z]+(?: [a-z-]+)?)  ", res.stdout, re.M)  # the names in the first column
    assert sorted(listed) == sorted(" ".join(args) for args in ALL)
    assert mmfm("nonsense", cwd=tmp_path).returncode == 2


@pytest.mark.parametrize("args", ALL, ids=" ".join)
def test_every_command_has_help(args, tmp_path, capsys):
    if args == ["train"]:  # a Hydra app, whose --help leaves Hydra's global state set: in its own process
        res = mmfm("train", "--help", cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert "mmfm train: train a model" in res.stdout and "== Configuration groups ==" in res.stdout
        return
    with pytest.raises(SystemExit) as exit_info:  # through the dispatch of `mmfm`
        cli_main([*args, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: mmfm {' '.join(args)} ")


@pytest.mark.parametrize("command", TOOLS)
def test_tools_table_matches_the_parsers(command):
    parser = importlib.import_module(COMMANDS[command][0]).build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert list(sub.choices) == list(TOOLS[command])


def test_docs_name_only_real_commands():
    """Every `mmfm <command> [<tool>]` in the README and docs/ (code spans and code blocks) exists."""
    found = set()
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        fenced = False
        for line in doc.read_text().splitlines():
            fenced ^= line.startswith("```")
            pattern = r"^\s*(?:[\w./-]*/)?mmfm ([a-z][\w-]*)(?: ([a-z][\w-]*))?" if fenced else \
                r"`mmfm ([a-z][\w-]*)(?: ([a-z][\w-]*))?"
            for command, word in re.findall(pattern, line):
                assert command in COMMANDS, f"{doc.name}: {line.strip()}"
                if command in TOOLS and word:
                    assert word in TOOLS[command], f"{doc.name}: {line.strip()}"
                found.add(command)
    assert found == set(COMMANDS)


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
