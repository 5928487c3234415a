"""A checkpoint is hostile until checked: nothing in it runs, a damaged one is refused in one line, a resume never
loses checkpoints and never mixes the state of another model, tokenizer or stage, and a refused run writes nothing."""

import errno
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from test_cli import mmfm
from mmfm.checkpoint import CheckpointError, CheckpointManager
from mmfm.checkpoint import checksums
from mmfm.checkpoint import manager as ckpt_module
from mmfm.checkpoint.manager import model_state, optim_state
from mmfm.checkpoint.safe_read import read_metadata
from mmfm.errors import ConfigError
from mmfm.data.synth import build_synth_dataset
from mmfm.errors import MmfmError
from mmfm.train.trainer import Trainer

SHORT = ["train.schedule.warmup_steps=1", "data.batch_size=4", "logger.log_every=1"]


class RunsCommand:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def rerecord(ckpt: Path) -> None:
    """Rewrite checksums.json to match the files, as an attacker who edits a checkpoint would."""
    digests = {name: checksums.sha256_file(ckpt / name) for name in checksums.data_files(ckpt)}
    checksums.write_record(ckpt, {**digests, "trainer_state.json": checksums.sha256_file(ckpt / "trainer_state.json")})


@pytest.fixture
def run(make_cfg, tmp_path):
    """A 2-step run with checkpoints at steps 1 and 2."""
    Trainer(make_cfg(*SHORT, "train.max_steps=2", "checkpoint.every=1"), tmp_path / "run").fit()
    return tmp_path / "run"


def test_checkpoint_records_and_verifies_the_sha256_of_every_file(run):
    ckpt = run / "checkpoints/step_00000002"
    record = json.loads((ckpt / "checksums.json").read_text())["files"]
    assert set(record) == {p.name for p in ckpt.iterdir() if p.name != "checksums.json"}
    assert all(record[name] == checksums.sha256_file(ckpt / name) for name in record)
    shard = next(ckpt.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[200:200 + 4096] = bytes(range(256)) * 16  # 4 KB of garbage, same size
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"step_00000002: {shard.name} does not match its recorded sha256 "):
        CheckpointManager.load(ckpt, torch.nn.Linear(1, 1))


def test_crafted_metadata_pickle_runs_nothing(run, tmp_path):
    ckpt = run / "checkpoints/step_00000002"
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(RunsCommand(marker)))
    rerecord(ckpt)  # the checksums match: only the unpickler stands in the way
    res = mmfm("generate", "--checkpoint", str(run), "--images", "none.png", cwd=tmp_path)
    assert res.returncode == 2 and not marker.exists(), res.stderr
    assert res.stderr.count("\n") == 1 and ".metadata is not plain DCP metadata (posix.system is not a checkpoint " \
                                           "metadata class)" in res.stderr, res.stderr


def test_crafted_value_in_a_shard_runs_nothing(make_cfg, run, tmp_path):
    """DCP reads non-tensor values (here an optimizer hyper-parameter) with a full unpickler; mmfm does not."""
    trainer = Trainer(make_cfg(*SHORT, "train.max_steps=2"), tmp_path / "other")
    parts, optimizers = trainer.parts.parts, trainer.optimizers
    optim = ckpt_module._merged(optim_state(parts, optimizers))
    key = next(k for k, v in optim.items() if isinstance(v, float))
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted/step_00000002"
    state = {"model": ckpt_module._merged(model_state(parts)), "optim": {**optim, key: RunsCommand(marker)},
             "rng": ckpt_module.rng_state()}
    dcp.save(state, checkpoint_id=str(crafted), no_dist=True)
    shutil.copy(run / "checkpoints/step_00000002/trainer_state.json", crafted)
    rerecord(crafted)
    with pytest.raises(CheckpointError, match=r"could not be loaded \(UnsafeCheckpoint: the value of optim\..* is not a plain number, string or tensor \(GLOBAL posix.system\); refusing"):
        CheckpointManager.load(crafted, parts, optimizers)
    assert not marker.exists()


def test_metadata_naming_a_file_outside_the_checkpoint_is_refused(run):
    ckpt = run / "checkpoints/step_00000002"
    metadata = read_metadata(ckpt)
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../../../tokenizer.json"
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    rerecord(ckpt)
    with pytest.raises(CheckpointError, match=r"names the data file '\.\./\.\./\.\./tokenizer\.json'"):
        read_metadata(ckpt)


def test_resuming_an_older_checkpoint_never_prunes_newer_ones(make_cfg, tmp_path):
    run = tmp_path / "run"
    Trainer(make_cfg(*SHORT, "train.max_steps=20", "checkpoint.every=5", "checkpoint.keep_last=4"), run).fit()
    older = run / "checkpoints/step_00000005"
    Trainer(make_cfg(*SHORT, "train.max_steps=8", "checkpoint.every=1", "checkpoint.keep_last=2",
                     f"checkpoint.resume={older}"), run).fit()
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert names == ["step_00000007", "step_00000008", "step_00000010", "step_00000015", "step_00000020"]
    assert CheckpointManager(run / "checkpoints").latest().name == "step_00000008"


def test_resume_into_another_model_is_refused_and_writes_nothing(make_cfg, tmp_path):
    run = tmp_path / "run"
    Trainer(make_cfg(*SHORT, "train.max_steps=1", "model.language.num_layers=4"), run).fit()
    before = tree_hash(run)
    with pytest.raises(CheckpointError, match=r"written for another model config \(18 parameter\(s\) differ, e\.g\. "
                                              r"language\.layers\.2\..* is in the checkpoint, not in this model; "
                                              r"config: model\.language\.num_layers=4 there, 2 here\)"):
        Trainer(make_cfg(*SHORT, "train.max_steps=2"), run).fit()
    assert tree_hash(run) == before


def test_resume_with_another_tokenizer_is_refused_and_keeps_the_runs_tokenizer(make_cfg, tmp_path):
    run = tmp_path / "run"
    Trainer(make_cfg(*SHORT, "train.max_steps=1"), run).fit()
    other = tmp_path / "captions-only"  # no instruction text: another tokenizer
    build_synth_dataset(other, train_size=40, val_size=8, progress=False)
    before = tree_hash(run)
    with pytest.raises(CheckpointError, match="trained with another tokenizer than data.path=.*captions-only; resume "
                                              "with the data set it was trained on"):
        Trainer(make_cfg(*SHORT, "train.max_steps=2", data=other), run).fit()
    assert tree_hash(run) == before


def test_resume_into_another_stage_is_refused(make_cfg, sft_dir, tmp_path):
    run = tmp_path / "run"
    Trainer(make_cfg(*SHORT, "train.max_steps=1"), run).fit()
    with pytest.raises(CheckpointError, match="written by stage=pretrain, this run is stage=sft; to start sft from it "
                                              "use stage.init_from="):
        Trainer(make_cfg(*SHORT, "train.max_steps=2", "stage=sft", data=sft_dir), run)


@pytest.mark.parametrize("damage,message", [
    (lambda c: (c / "latest").write_bytes(b"\xff\xfe\x00binary"), "latest does not hold the name of a step_"),
    (lambda c: (c / "latest").write_text("../../elsewhere\n"), "latest does not hold the name of a step_"),
    (lambda c: (c / "step_00000001/trainer_state.json").write_text("{}"), "trainer_state.json has no 'step' of type int"),
    (lambda c: (c / "step_00000001/trainer_state.json").write_text('{"step": "1", "scheduler": {}, "data": []}'),
     "trainer_state.json has no 'step' of type int"),
    (lambda c: (c / "step_00000001/trainer_state.json").write_text('{"step": 1, "scheduler": [], "data": []}'),
     "trainer_state.json has no 'scheduler' of type dict"),
    (lambda c: (c / "step_00000001/checksums.json").write_text("[1, 2]"), "checksums.json is unreadable or malformed"),
])
def test_damaged_checkpoint_files_are_one_line_errors(make_cfg, tmp_path, damage, message):
    run = tmp_path / "run"
    Trainer(make_cfg(*SHORT, "train.max_steps=1"), run).fit()
    damage(run / "checkpoints")
    if "trainer_state" in message:
        (run / "checkpoints/step_00000001/checksums.json").unlink()  # else the checksum refuses it first
    with pytest.raises(CheckpointError, match=message) as info:
        Trainer(make_cfg(*SHORT, "train.max_steps=2"), run).fit()
    assert "\n" not in str(info.value)


def test_refused_run_through_the_cli_is_one_line_and_writes_nothing(synth_dir, tmp_path):
    common = [f"data.path={synth_dir}", "run_dir=run", "train.max_steps=1", "logger.wandb.enabled=false",
              "eval.num_samples=0", *SHORT]
    assert mmfm("train", *common, cwd=tmp_path).returncode == 0
    run = tmp_path / "run"
    assert {".hydra", "config.yaml", "train.log"} <= {p.name for p in run.iterdir()}
    before = tree_hash(run)
    for resume, message in (("never", "already holds checkpoints"), ("/nonexistent/ckpt", "no such folder")):
        res = mmfm("train", *common, f"checkpoint.resume={resume}", "train.max_steps=3", cwd=tmp_path)
        assert res.returncode == 2 and message in res.stderr and res.stderr.count("\n") == 1, res.stderr
        assert tree_hash(run) == before


def test_full_disk_during_save_keeps_the_previous_checkpoint(make_cfg, tmp_path, monkeypatch):
    trainer = Trainer(make_cfg(*SHORT, "train.max_steps=1"), tmp_path)
    trainer.fit()

    def disk_full(state, checkpoint_id, **kw):
        Path(checkpoint_id, "__0_0.distcp").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_module.dcp, "save", disk_full)
    trainer.step = 2
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step_00000002 \(no space left on the "
                                              r"device\); the previous checkpoint \(.*step_00000001\) is intact"):
        trainer.save()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000001"]


def test_unwritable_run_dir_is_one_line(make_cfg, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"run_dir=.*a-file/run is not writable \(Not a directory\)") as info:
        Trainer(make_cfg(*SHORT, "train.max_steps=1"), blocker / "run")
    assert isinstance(info.value, MmfmError)
