"""The runtime data options in the training loop: packing, loader workers and weighted mixing, with exact
resume (an interrupted run continues bitwise like an uninterrupted one, fp32 on CPU)."""

import pytest

from conftest import TEST_SEED
from mmfm.data.synth import build_synth_dataset
from mmfm.train.metrics import read_metrics
from mmfm.train.trainer import Trainer

SHORT = ["train.max_steps=6", "train.schedule.warmup_steps=1", "data.batch_size=4", "logger.log_every=1",
         "model.language.max_seq_len=128", "data.seq_len=96", "data.shuffle_buffer=100"]


class Interrupted(Exception):
    pass


class StopsAt(Trainer):
    def train_step(self):
        if self.step + 1 == 4:
            raise Interrupted
        return super().train_step()


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """A second synthetic set (another seed: other samples, the same tokenizer)."""
    out = tmp_path_factory.mktemp("other") / "synth"
    build_synth_dataset(out, seed=1, train_size=400, val_size=20, shard_size=100, instruct_text=True,  # as synth_dir
                        progress=False)
    return out


@pytest.mark.convergence
def test_packed_rows_hold_several_samples_and_train(make_cfg, tmp_path, record_figures):
    summary = Trainer(make_cfg(*SHORT, "data.pack=true", "train.max_steps=8", "train.optim.lr=3e-3",
                               f"seed={TEST_SEED}"), tmp_path).fit()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    # ~30-token samples in 96-token rows: about 3 samples per row of the 4 rows of a step
    assert all(r["samples_per_s"] / r["tokens_per_s"] * 96 > 2 for r in rows if "samples_per_s" in r)
    record_figures(loss_ratio=summary["losses"][8] / summary["losses"][1])
    assert summary["losses"][8] < summary["losses"][1]


def test_mixing_serves_the_configured_proportions(make_cfg, other_data, tmp_path):
    trainer = Trainer(make_cfg(*SHORT, "train.max_steps=25", "data.batch_size=8", "data.weight=3",
                               f"data.mix=[{{path: {other_data}, weight: 1}}]"), tmp_path)
    trainer.fit()
    counts = trainer.loader.stream.counts
    assert sum(counts) == 200
    # binomial: p = 0.75, n = 200, std 0.031; 0.12 is almost 4 std
    assert abs(counts[0] / 200 - 0.75) < 0.12


@pytest.mark.parametrize("options", [["data.pack=true"], ["data.num_workers=2"], ["data.pack=true", "MIX"]],
                         ids=["pack", "workers", "pack+mix"])
def test_resume_is_exact_with_runtime_options(make_cfg, other_data, tmp_path, options):
    options = [f"data.mix=[{{path: {other_data}, weight: 1}}]" if o == "MIX" else o for o in options]
    cfg = lambda: make_cfg(*SHORT, "checkpoint.every=3", *options)  # noqa: E731
    reference = Trainer(cfg(), tmp_path / "straight").fit()["losses"]
    with pytest.raises(Interrupted):
        StopsAt(cfg(), tmp_path / "stopped").fit()
    resumed = Trainer(cfg(), tmp_path / "stopped").fit()["losses"]
    assert sorted(resumed) == [4, 5, 6]
    assert all(resumed[s] == reference[s] for s in resumed)
