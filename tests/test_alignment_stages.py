"""The stages in sequence through the one training loop, on the synthetic scenes (CPU, a few minutes):
caption pretraining -> SFT on conversations -> DPO on answer pairs, and GRPO from the SFT model; SFT with LoRA from
the same captioner.

The three data sets share one tokenizer, as docs/alignment.md builds them: `mmfm data synth --instruct-text
--pair-captions one-place`, then `mmfm data instruct --tokenizer`. Figures measured on 2 CPU cores are in
docs/alignment.md; the thresholds here are the acceptance levels or sit below the figures.
"""

import itertools
import json
import os

import pytest
import torch

from conftest import SMALL_MODEL, TEST_SEED
from mmfm.checkpoint import CheckpointManager
from mmfm.config import load_config
from mmfm.data.build import load_tokenizer, val_stream
from mmfm.data.synth import build_synth_dataset
from mmfm.data.synth_instruct import build_instruct_dataset
from mmfm.models import build_model
from mmfm.train import evaluate
from mmfm.train.trainer import Trainer, stage_checkpoint

# 16 image tokens (32 px, patch 8), 128-wide vision and language models. Position embeddings start from the 2D
# sine-cosine table: drawn at std 0.02 (or 0.09), whether and when the captioner bound a place to the object there
# was a jump that depended on the seed and CPU path (docs/results.md, "Position embeddings from the sine-cosine table")
MODEL = [*SMALL_MODEL, "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.hidden_size=128",
         "model.vision.position_init=sincos",
         "model.vision.num_layers=2", "model.language.hidden_size=128", "model.language.intermediate_size=352",
         "model.language.max_seq_len=96", "data.seq_len=80"]
LORA_SFT = ["model.lora.enabled=true", "model.lora.rank=16", "model.lora.alpha=32",
            "model.lora.targets=['language.layers.*.attention.w[qkvo]','language.layers.*.feed_forward.w[123]',"
            "'projector.*']"]
QUIET = ["logger.wandb.enabled=false", "logger.progress_bar=false", "train.val_every=0", "eval.num_samples=0",
         f"seed={TEST_SEED}"]
# The first test's fixtures train the captioner and the SFT model (~8 min on 2 idle cores): room for a slower machine;
# scripts/check_portability.sh sets MMFM_TEST_TIMEOUT higher for the scalar path (a marker overrides --timeout).
pytestmark = [pytest.mark.convergence, pytest.mark.timeout(int(os.environ.get("MMFM_TEST_TIMEOUT", "1800")))]


def run(run_dir, data, *overrides) -> dict:
    return Trainer(load_config([f"data.path={data}", *MODEL, *QUIET, *overrides]), run_dir).fit()


def answer_accuracy(checkpoint, data, stage: str, samples: int = 200) -> float:
    """Greedy exact-match accuracy of a checkpoint's answers to the held-out prompts of a data set."""
    cfg = load_config([f"data.path={data}", *MODEL, *QUIET, f"stage={stage}"])
    model = build_model(cfg.model, "cpu")
    CheckpointManager.load(stage_checkpoint(str(checkpoint)), model, no_dist=True)
    held_out = list(itertools.islice(val_stream(cfg, load_tokenizer(cfg)), samples))
    return evaluate.accuracy(evaluate.caption_samples(model, load_tokenizer(cfg), held_out, 100, 12, "cpu"))


def train_metrics(run_dir) -> list[dict]:
    return [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if m["kind"] == "train"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Caption, conversation and preference data about the synthetic scenes, with one tokenizer."""
    out = tmp_path_factory.mktemp("scenes")
    # 20,000 captions and 20,000 conversations: on 3,000 each (21 epochs in 2000 steps) the captioner and the SFT
    # model memorised their data, and held-out answer accuracy ended anywhere from 0.85 to 1.00 by seed and CPU path,
    # which DPO's bar then inherited (docs/results.md, "20,000 captions and conversations")
    # One-place captions: a two-object scene is captioned by one of its places and the object there, so that its
    # colour and shape both need the binding of the place (docs/alignment.md)
    build_synth_dataset(out / "synth", train_size=20000, val_size=300, shard_size=500, instruct_text=True,
                        pair_captions="one-place", progress=False)
    tokenizer = out / "synth" / "tokenizer.json"
    build_instruct_dataset(out / "sft", "sft", tokenizer, train_size=20000, val_size=300, shard_size=1000,
                           max_turns=2, progress=False)
    build_instruct_dataset(out / "preference", "preference", tokenizer, train_size=3000, val_size=200,
                           shard_size=1000, progress=False)
    return out


@pytest.fixture(scope="module")
def pretrained(scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    # 3000 steps: at 2000 the captioner of the scalar path's seed 0 named both objects of a two-object scene but
    # put them at the wrong places half the time, and the SFT model above it stalled at 0.84 (docs/results.md,
    # "Why a chain run stalls"); with 3000 it bound every place by step 1000.
    run(out, scenes / "synth", "train.max_steps=3000", "train.optim.lr=2e-3", "train.schedule.warmup_steps=30",
        "checkpoint.every=0")
    return out


@pytest.fixture(scope="module")
def sft(pretrained, scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    # 2000 steps at lr 1e-3: at 2e-3 native seed 0 stalled at 0.84 from step 600 on (the colour or shape at a named
    # place of two-object scenes) where 1e-3 reached 0.987 (docs/results.md)
    summary = run(out, scenes / "sft", "stage=sft", f"stage.init_from={pretrained}", "train.max_steps=2000",
                  "train.optim.lr=1e-3", "train.schedule.warmup_steps=20", "checkpoint.every=100",
                  "checkpoint.keep_last=20", "eval.num_samples=300")
    return out, summary


def test_sft_lifts_held_out_answer_accuracy(pretrained, sft, scenes, record_figures):
    run_dir, summary = sft
    before = answer_accuracy(pretrained, scenes / "sft", "sft", samples=300)
    record_figures(before=before, answer_accuracy=summary["answer_accuracy"])
    assert before <= 0.05  # the captioner does not answer questions
    assert summary["answer_samples"] == 300
    assert summary["answer_accuracy"] >= 0.80


def test_mmfm_eval_scores_the_captioner_and_the_sft_model_far_above_a_constant_answer(pretrained, sft, tmp_path,
                                                                                      monkeypatch, record_figures):
    """`mmfm eval --baseline` on 100 items of each synthetic task: the captioner's CIDEr, cloze VQA and
    multiple-choice accuracy, the SFT model's VQA accuracy, each far above the constant-answer baseline's."""
    from mmfm.cli.main import main

    monkeypatch.setenv("MMFM_CACHE", str(tmp_path / "cache"))
    sft_run, _ = sft

    def scores(run_dir, out, *tasks) -> dict:
        assert main(["eval", str(run_dir), *tasks, "--limit", "100", "--baseline", "--out", str(out)]) == 0
        step, = (out / "eval").iterdir()
        return json.loads((step / "results.json").read_text())

    captioner = scores(pretrained, tmp_path / "captioner")
    answers = scores(sft_run, tmp_path / "sft", "tasks=[synth/vqa]")["synth/vqa"]
    caption, cloze, mc = (captioner[f"synth/{t}"] for t in ("caption", "vqa_cloze", "mc"))
    record_figures(cider=caption["cider"], bleu4=caption["bleu4"], vqa_cloze=cloze["vqa_accuracy"],
                   mc=mc["accuracy"], sft_vqa=answers["vqa_accuracy"],
                   baselines=[caption["baseline"]["cider"], cloze["baseline"]["vqa_accuracy"],
                              mc["baseline"]["accuracy"], answers["baseline"]["vqa_accuracy"]])
    assert caption["cider"] >= 4.0 and caption["baseline"]["cider"] <= 1.5 and caption["bleu4"] >= 0.6
    assert cloze["vqa_accuracy"] >= 0.8 and cloze["baseline"]["vqa_accuracy"] <= 0.4
    assert mc["accuracy"] >= 0.8 and mc["baseline"]["accuracy"] <= 0.4
    assert captioner["synth/perplexity"]["perplexity"] <= 2.0
    assert answers["vqa_accuracy"] >= 0.8 and answers["baseline"]["vqa_accuracy"] <= 0.4


def test_lora_sft_reaches_the_sft_bar_within_5_points(pretrained, scenes, tmp_path, record_figures):
    """SFT with rank-16 adapters on the language model's attention and SwiGLU projections and on the projector (the
    vision tower, embeddings and norms frozen), from the same captioner: held-out answers >= 0.75, the full fine-tune's
    bar (0.80) less 5 points. 1500 steps at lr 5e-3 (~130 s): at 1000 the AVX2 path's seed 0 ended at 0.717, where
    its full SFT reached 0.993; 1500 took it to 0.837 (docs/results.md, "Position embeddings from the sine-cosine
    table")."""
    summary = run(tmp_path, scenes / "sft", "stage=sft", f"stage.init_from={pretrained}", *LORA_SFT,
                  "train.max_steps=1500", "train.optim.lr=5e-3", "train.schedule.warmup_steps=20", "checkpoint.every=0",
                  "eval.num_samples=300")
    record_figures(lora_answer_accuracy=summary["answer_accuracy"])
    assert summary["answer_samples"] == 300
    assert summary["answer_accuracy"] >= 0.80 - 0.05


def test_dpo_lifts_preference_accuracy_and_keeps_answers(sft, scenes, tmp_path, record_figures):
    sft_run, _ = sft
    overrides = [f"data.path={scenes / 'preference'}", *MODEL, *QUIET, "stage=dpo", f"stage.init_from={sft_run}",
                 "stage.preference.beta=2.0", "train.max_steps=150", "train.optim.lr=1e-4",
                 "train.schedule.warmup_steps=10", "checkpoint.every=0", "train.val_batches=3"]
    trainer = Trainer(load_config(overrides), tmp_path)
    trainer.resume()  # the SFT weights (stage.init_from), as fit() starts
    start = trainer.validate_now()  # policy == reference: every implicit reward is 0
    summary = trainer.fit()
    before = answer_accuracy(sft_run, scenes / "preference", "dpo")
    after = answer_accuracy(tmp_path, scenes / "preference", "dpo")
    record_figures(reward_accuracy=summary["val_reward_accuracy"], preference_accuracy=summary["val_preference_accuracy"],
                   start_preference_accuracy=start["preference_accuracy"], reward_margin=summary["val_reward_margin"],
                   answers_before=before, answers_after=after)
    assert start["reward_margin"] == pytest.approx(0.0, abs=1e-6) and start["reward_accuracy"] == 0.0
    assert summary["val_reward_margin"] > 1.0
    # 192 held-out pairs. From the SFT model at ~1.00, beta 1.0 cost one run 10 points of greedy answers
    # (0.995 -> 0.890); beta 2.0 stops pushing the pairs apart sooner and kept them (-> 0.985; docs/results.md)
    assert summary["val_reward_accuracy"] >= 0.95
    assert summary["val_preference_accuracy"] >= max(0.95, start["preference_accuracy"] - 0.02)
    assert after >= before - 0.05
    logged = train_metrics(tmp_path)[-1]
    assert {"reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "preference_accuracy"} <= set(logged)


def test_grpo_raises_the_mean_reward(sft, scenes, tmp_path, record_figures):
    """From an early SFT checkpoint (sampled answers right about 65% of the time): 32 prompts x 4 answers a
    step, 100 steps. The mean reward of a quarter (25 steps x 128 answers) varies by about 0.01; per-seed
    and per-CPU-path figures are in docs/results.md. At lr 1e-3 the first steps lose reward and the gain
    varied from +0.02 to +0.15 between seeds; at 5e-4 it climbs steadily."""
    early = sft[0] / "checkpoints" / "step_00000100"
    run(tmp_path, scenes / "sft", "stage=grpo", f"stage.init_from={early}", "data.batch_size=32", "stage.grpo.group_size=4",
        "train.max_steps=100", "train.optim.lr=5e-4", "train.schedule.warmup_steps=5", "logger.log_every=1",
        "checkpoint.every=0")
    rewards = [m["reward"] for m in train_metrics(tmp_path)]
    quarter = len(rewards) // 4
    first, last = sum(rewards[:quarter]) / quarter, sum(rewards[-quarter:]) / quarter
    record_figures(first_quarter_reward=first, last_quarter_reward=last)
    assert len(rewards) == 100 and last >= first + 0.04, (first, last)


def test_freeze_trains_only_the_projector(pretrained, scenes, tmp_path):
    run(tmp_path, scenes / "sft", "stage=sft", f"stage.init_from={pretrained}", "stage.freeze=[vision,language]",
        "train.max_steps=3", "train.schedule.warmup_steps=1", "checkpoint.every=0")
    cfg = load_config([f"data.path={scenes / 'sft'}", *MODEL])
    before, after = build_model(cfg.model, "cpu"), build_model(cfg.model, "cpu")
    CheckpointManager.load(stage_checkpoint(str(pretrained)), before, no_dist=True)
    CheckpointManager.load(stage_checkpoint(str(tmp_path)), after, no_dist=True)
    old, new = dict(before.named_parameters()), dict(after.named_parameters())
    for name in old:
        same = torch.equal(old[name], new[name])
        assert same == (not name.startswith("projector.")), name
