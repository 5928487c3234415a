"""Evaluation (mmfm.eval, `mmfm eval`): metrics against hand-computed values, task files and their errors, the
model answerer against a direct forward, and the command end to end on a small trained run."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import one_line

from mmfm.eval import metrics
from mmfm.eval.runner import ModelAnswerer, ScoreRequest, GenerateRequest, run_task
from mmfm.eval.tasks import TaskError, load_items, load_task, resolve_task


# --- metrics ----------------------------------------------------------------------------------------------------

def test_bleu4_equals_the_geometric_mean_of_the_ngram_precisions():
    """One word of six differs: 5/6, 4/5, 3/4 and 2/3 of the 1- to 4-grams match, same length (no brevity penalty):
    BLEU-4 = (5/6 * 4/5 * 3/4 * 2/3) ** (1/4) = (1/3) ** (1/4)."""
    scores = metrics.caption_scores({"a": "a red circle on the left", "b": "the handwritten digit five"},
                                    {"a": ["a red circle on the right"], "b": ["the handwritten digit five"]})
    # corpus BLEU: the n-gram counts of both items pooled: (5+4)/(6+4), (4+3)/(5+3), (3+2)/(4+2), (2+1)/(3+1)
    want = (9 / 10 * 7 / 8 * 5 / 6 * 3 / 4) ** 0.25
    assert scores["bleu4"] == pytest.approx(want, rel=1e-6)
    alone = metrics.caption_scores({"a": "A red circle, on the LEFT."}, {"a": ["a red circle on the right"]})
    assert alone["bleu4"] == pytest.approx((1 / 3) ** 0.25, rel=1e-6)  # case and punctuation do not count


def test_cider_d_equals_the_hand_computed_tf_idf_cosine():
    """Two images: an n-gram in one reference has document frequency 1 (or 0 in a hypothesis only), weight
    log 2 - log 1; "the", in both references, weighs log 2 - log 2 = 0. CIDEr-D is 10 x the mean over n of the
    clipped cosine: for the one-word change 4/5 (a, red, circle, on of 5 weighted words), 4/5, 3/4, 2/3; 1 for the
    exact caption; equal lengths, no length penalty. The corpus score is the mean of the two."""
    scores = metrics.caption_scores({"a": "a red circle on the left", "b": "the handwritten digit five"},
                                    {"a": ["a red circle on the right"], "b": ["the handwritten digit five"]})
    first = 10 * (4 / 5 + 4 / 5 + 3 / 4 + 2 / 3) / 4
    assert scores["cider"] == pytest.approx((first + 10) / 2, rel=1e-6)
    wrong = metrics.caption_scores({"a": "the handwritten digit five", "b": "a red circle on the right"},
                                   {"a": ["a red circle on the right"], "b": ["the handwritten digit five"]})
    assert wrong["cider"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("raw, normalized", [
    ("Two", "2"), ("the red one.", "red 1"), ("yes!", "yes"), ("dont", "don't"), ("1,000", "1000"),
    ("3.5", "3.5"), ("A cat.", "cat"), ("  on the\tleft ", "on left"), ("black/white", "black white"),
])
def test_vqa_normalization_follows_the_vqa2_evaluation(raw, normalized):
    assert metrics.normalize_vqa_answer(raw) == normalized


def test_vqa_accuracy_with_ten_answers_averages_the_leave_one_out_sets():
    three = ["red"] * 3 + ["blue"] * 7
    assert metrics.vqa_accuracy("Red.", three) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    two = ["red"] * 2 + ["blue"] * 8
    assert metrics.vqa_accuracy("red", two) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    assert metrics.vqa_accuracy("blue", three) == 1.0 and metrics.vqa_accuracy("green", three) == 0.0
    assert metrics.vqa_accuracy("it is red.", ["it is red.", "red"]) == 1.0  # other counts: any one matches
    assert metrics.vqa_accuracy("the five", ["5"]) == 1.0


OPTIONS = ["a red circle.", "a blue square.", "a green cross.", "a white triangle."]


@pytest.mark.parametrize("answer, choice", [
    ("B", 1), ("(C)", 2), ("C. a green cross.", 2), ("The answer is D.", 3), ("[b]", None),
    ("a blue square.", 1), ("it is A blue square", 0),  # a standalone capital A reads as a letter, as in MMBench
    ("B or C", None), ("surely a white triangle.", 3), ("a white triangle, surely", None), ("nothing like it", None),
])
def test_letter_extraction_reads_answers_as_mmbench_does(answer, choice):
    assert metrics.extract_choice(answer, OPTIONS) == choice


def test_perplexity_and_majority():
    assert metrics.perplexity(-4 * math.log(2), 4) == pytest.approx(2.0)
    assert metrics.majority(["b", "a", "b"]) == "b"


# --- task files -------------------------------------------------------------------------------------------------

def write_task(folder, items, image_files=(), **yaml_keys):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    for name in image_files:
        Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "images" / name)
    (folder / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    lines = [f"{k}: {json.dumps(v)}" for k, v in yaml_keys.items()]
    (folder / "task.yaml").write_text("\n".join(lines) + "\n")
    return folder


def test_task_file_errors_are_one_line(tmp_path):
    vqa = [{"id": "q1", "image": "1.png", "question": "what colour?", "answers": ["red"]}]
    cases = [
        ({"type": "ocr"}, vqa, "type='ocr' is unknown"),
        ({"type": "vqa", "scorer": "x"}, vqa, "unknown key(s) ['scorer']"),
        ({"type": "vqa", "images": "../elsewhere"}, vqa, "images='../elsewhere' must be a relative path inside"),
        ({"type": "vqa", "max_new_tokens": 0}, vqa, "max_new_tokens=0 must be an integer >= 1"),
        ({"type": "multiple_choice", "mode": "vote"}, vqa, "mode='vote' is unknown"),
    ]
    for i, (keys, items, fragment) in enumerate(cases):
        folder = write_task(tmp_path / f"t{i}", items, ["1.png"], **keys)
        one_line(TaskError, lambda: load_items(load_task(folder)), fragment)
    items_cases = [
        ({"type": "vqa"}, [{"id": "q", "image": "1.png", "question": "?"}], "needs the field(s) ['answers']"),
        ({"type": "vqa"}, [{"id": "q", "image": "/etc/passwd", "question": "?", "answers": ["a"]}],
         "must be a relative path inside"),
        ({"type": "multiple_choice"}, [{"id": "m", "image": "1.png", "options": ["x", "y"], "answer": "C"}],
         "answer='C' must be an option index in [0, 2) or its letter"),
        ({"type": "caption"}, [{"id": "c", "image": "1.png", "references": []}], "references must be a non-empty"),
    ]
    for i, (keys, items, fragment) in enumerate(items_cases):
        folder = write_task(tmp_path / f"i{i}", items, ["1.png"], **keys)
        one_line(TaskError, lambda: load_items(load_task(folder)), fragment)
    bad_json = write_task(tmp_path / "json", vqa, ["1.png"], type="vqa")
    (bad_json / "items.jsonl").write_text('{"id": "q1", "image": "1.png",\n')
    one_line(TaskError, lambda: load_items(load_task(bad_json)), "items.jsonl:1: not a JSON object")
    one_line(TaskError, lambda: resolve_task("mmbench_dev"), "unknown task 'mmbench_dev'", "synth/caption")
    one_line(TaskError, lambda: resolve_task("synth/ocr"), "unknown task 'synth/ocr'", "synth/vqa_cloze")


def test_a_missing_image_is_counted_and_left_out(tmp_path):
    items = [{"id": f"q{i}", "image": f"{i}.png", "question": "what colour?", "answers": ["red"]} for i in range(3)]
    folder = write_task(tmp_path / "vqa", items, ["0.png", "2.png"], type="vqa", prompt="{question}")
    loaded = load_items(load_task(folder))
    assert [i.id for i in loaded.items] == ["q0", "q2"] and loaded.missing_images == ["q1"]
    from mmfm.eval.runner import ConstantAnswerer

    result = run_task(ConstantAnswerer("red"), loaded)
    assert result.summary() == {"type": "vqa", "vqa_accuracy": 1.0, "items": 2, "missing_images": 1}


def test_the_synthetic_suite_is_deterministic(tmp_path):
    from mmfm.eval.synth_suite import SUITE_TASKS, write_suite

    write_suite(tmp_path / "a")
    write_suite(tmp_path / "b")
    for name in SUITE_TASKS:
        a, b = ((tmp_path / s / name / "items.jsonl").read_text() for s in "ab")
        assert a == b and len(a.splitlines()) == 200
        task = load_task(tmp_path / "a" / name)
        assert task.name == f"synth/{name}" and not load_items(task).missing_images
    assert (tmp_path / "a/mc/images/mc-0007.png").read_bytes() == (tmp_path / "b/mc/images/mc-0007.png").read_bytes()
    mc = [json.loads(line) for line in (tmp_path / "a/mc/items.jsonl").read_text().splitlines()]
    assert sorted({m["answer"] for m in mc}) == [0, 1, 2, 3] and all(len(set(m["options"])) == 4 for m in mc)


# --- the model answerer -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_answerer(synth_dir):
    from mmfm.config import load_config
    from mmfm.data.build import sample_encoder
    from mmfm.data.tokenizer import TextTokenizer
    from mmfm.models import build_model
    from mmfm.parallel.bench import SMALL_MODEL

    torch.manual_seed(0)
    cfg = load_config([f"data.path={synth_dir}", *SMALL_MODEL])
    model = build_model(cfg.model, "cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)  # a random model with peaked distributions
    tokenizer = TextTokenizer.load(synth_dir / "tokenizer.json")
    return ModelAnswerer(model.eval(), tokenizer, sample_encoder(cfg, tokenizer), "cpu", batch_size=3)


def test_loglikelihood_equals_a_direct_forward_and_knows_greedy_answers(tiny_answerer, synth_dir):
    """Batched, right-padded scoring of 4 requests (with and without an image, different lengths) equals one
    forward per request; the greedy continuation is flagged greedy, another is not."""
    from mmfm.models.generate import generate

    a = tiny_answerer
    image = next((synth_dir / "examples").glob("*.png"))
    requests = [ScoreRequest("describe the image.", "a red", image, end=False),
                ScoreRequest("describe the image.", "a red circle on the left.", image),
                ScoreRequest("", "the handwritten digit two.", None),
                ScoreRequest("describe the image.", "a", image, answer_prefix="on the left is")]
    batched = a.loglikelihood(requests)
    for r, got in zip(requests, batched):
        ctx = a.context(r.prompt, r.answer_prefix, int(r.image is not None))
        cont = a.tokenizer.encode(r.continuation) + ([a.tokenizer.eos_id] if r.end else [])
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = a.model(ids, a.pixels([r.image])).log_softmax(-1)[0]
        want = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert got.logprob == pytest.approx(want, rel=1e-5, abs=1e-5) and got.tokens == len(cont)
        picked = logp[len(ctx) - 1: len(ctx) - 1 + len(cont)].argmax(-1).tolist()
        assert got.greedy == (picked == cont)
    assert not batched[1].greedy
    # what greedy decoding writes is greedy, and scores the sum of the best log-probabilities
    ctx = a.context("describe the image.", "", 1)
    written = generate(a.model, [ctx], a.pixels([image]), 4, a.tokenizer.eos_id, a.tokenizer.pad_id)[0]
    score = a.score_rows([(ctx, written)], a.pixels([image]))[0]
    with torch.no_grad():
        logp = a.model(torch.tensor([ctx + written]), a.pixels([image])).log_softmax(-1)[0]
    assert len(written) == 4 and score.greedy
    assert score.logprob == pytest.approx(float(logp[len(ctx) - 1: -1].max(-1).values.sum()), rel=1e-5)


def test_a_multiple_choice_task_picks_the_likeliest_option(tiny_answerer, tmp_path, synth_dir):
    """loglikelihood mode: the option with the highest score wins; generate mode: the letter the model writes."""
    image = next((synth_dir / "examples").glob("*.png"))
    folder = tmp_path / "mc"
    options = ["a red circle.", "a blue square.", "the handwritten digit one."]
    write_task(folder, [{"id": "m", "image": "x.png", "question": "q", "options": options, "answer": 2}],
               type="multiple_choice", prompt="describe the image.")
    shutil.copy(image, folder / "images" / "x.png")
    result = run_task(tiny_answerer, load_items(load_task(folder)))
    scores = tiny_answerer.loglikelihood([ScoreRequest("describe the image.", o, folder / "images" / "x.png")
                                          for o in options])
    best = max(range(3), key=lambda i: scores[i].logprob)
    assert result.predictions[0]["choice"] == best and result.scores["accuracy"] == float(best == 2)


# --- mmfm eval --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(synth_dir, tmp_path_factory):
    """The small model after 40 steps, checkpoints at 20 and 40."""
    from mmfm.config import load_config
    from mmfm.parallel.bench import QUIET, SMALL_MODEL
    from mmfm.train.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("eval_run")
    cfg = load_config([f"data.path={synth_dir}", *SMALL_MODEL, *QUIET, "train.max_steps=40", "checkpoint.every=20",
                       "train.schedule.warmup_steps=5", "train.optim.lr=3e-3", "data.batch_size=16"])
    Trainer(cfg, run_dir).fit()
    return run_dir


def mmfm_eval(*argv):
    from mmfm.cli.main import main

    return main(["eval", *map(str, argv)])


def test_mmfm_eval_scores_every_checkpoint_and_plots_them(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MMFM_CACHE", str(tmp_path / "cache"))
    assert mmfm_eval(trained_run, "tasks=[synth/caption,synth/mc]", "--limit", 12, "--all-checkpoints",
                     "--baseline", "--out", tmp_path / "out") == 0
    printed = capsys.readouterr().out
    assert "synth/caption" in printed and "cider" in printed and "constant baseline" in printed
    for step in ("20", "40"):
        results = json.loads((tmp_path / "out/eval" / step / "results.json").read_text())
        assert set(results) == {"synth/caption", "synth/mc"}
        assert results["synth/mc"]["items"] == 12 and 0 <= results["synth/mc"]["accuracy"] <= 1
        assert set(results["synth/caption"]["baseline"]) == {"bleu4", "cider"}
        preds = (tmp_path / "out/eval" / step / "predictions/synth_mc.jsonl").read_text().splitlines()
        assert len(preds) == 12
    assert (tmp_path / "out/eval/curves.png").stat().st_size > 1000
    assert "| 20 |" in (tmp_path / "out/eval/curves.md").read_text()


def test_mmfm_eval_reads_an_exported_hugging_face_folder(synth_dir, tmp_path, monkeypatch):
    """A small LLaVA-shaped run (tiny_llava's SigLIP tower, 3 steps), `mmfm export --format hf`, then `mmfm eval` on
    the folder: every item answered, under eval/hf. (The folder holds a chat template, so it is asked as a chat
    model, where its run was a captioner: the two score differently by design.)"""
    from conftest import STEPS

    from mmfm.cli.main import main
    from mmfm.config import load_config
    from mmfm.parallel.bench import SMALL_MODEL
    from mmfm.train.trainer import Trainer

    monkeypatch.setenv("MMFM_CACHE", str(tmp_path / "cache"))
    Trainer(load_config([f"data.path={synth_dir}", "model=tiny_llava", *SMALL_MODEL, *STEPS]), tmp_path / "llava").fit()
    assert main(["export", str(tmp_path / "llava"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert mmfm_eval(tmp_path / "hf", "tasks=[synth/mc,synth/vqa_cloze]", "--limit", 8, "--out", tmp_path / "out") == 0
    results = json.loads((tmp_path / "out/eval/hf/results.json").read_text())
    assert results["synth/mc"]["items"] == results["synth/vqa_cloze"]["items"] == 8
    rows = [json.loads(line) for line in (tmp_path / "out/eval/hf/predictions/synth_mc.jsonl").open()]
    assert len(rows) == 8 and all(len(r["logprobs"]) == 4 and max(r["logprobs"]) < 0 for r in rows)


def test_mmfm_eval_refuses_bad_input_in_one_line(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MMFM_CACHE", str(tmp_path / "cache"))

    def error(*argv) -> str:
        with pytest.raises(SystemExit) as exit_info:
            mmfm_eval(*argv)
        assert exit_info.value.code == 2
        message = capsys.readouterr().err.strip()
        assert "\n" not in message
        return message

    assert "unknown task 'nope'" in error(trained_run, "tasks=[nope]")
    assert "unknown argument 'task=synth/mc'" in error(trained_run, "task=synth/mc")
    assert "--limit=-1 must be >= 0" in error(trained_run, "--limit", -1)
    other = tmp_path / "other_run"
    shutil.copytree(trained_run, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    (other / "tokenizer.json").write_text(json.dumps(tokenizer, indent=1))  # the same tokens, another file
    assert "was trained with another tokenizer than" in error(other, "tasks=[synth/mc]")


EVAL_TASKS = ["eval.tasks=[synth/mc,synth/vqa_cloze,synth/perplexity]", "eval.limit=10"]


@pytest.fixture(scope="module")
def one_process_eval(synth_dir, tmp_path_factory):
    """3 AdamW steps on one process, then eval.tasks: (run directory, scores, each item's answer)."""
    from mmfm.config import load_config
    from mmfm.train.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("eval_single")
    trainer = Trainer(load_config([*eval_base(synth_dir), "data.batch_size=4"]), run_dir)
    return run_dir, trainer.fit()["tasks"], trainer.task_predictions


def eval_base(synth_dir) -> list[str]:
    from conftest import STEPS

    from mmfm.parallel.bench import SMALL_MODEL

    return [f"data.path={synth_dir}", *SMALL_MODEL, *STEPS, "data.partitions=4", "checkpoint.every=3", *EVAL_TASKS]


@pytest.fixture(scope="module")
def suite_cache(tmp_path_factory):
    """The synthetic suite written once for the module's runs (before any rank reads it)."""
    import os

    from mmfm.eval.synth_suite import ensure_suite

    cache = tmp_path_factory.mktemp("suite")
    old = os.environ.get("MMFM_CACHE")
    os.environ["MMFM_CACHE"] = str(cache)
    ensure_suite()
    yield cache
    if old is None:
        del os.environ["MMFM_CACHE"]
    else:
        os.environ["MMFM_CACHE"] = old


@pytest.mark.parametrize("layout", [["parallel.dp_shard=2", "data.batch_size=2"], ["parallel.tp=2", "data.batch_size=4"]],
                         ids=["fsdp2", "tp2"])
def test_in_training_evaluation_at_fsdp2_and_tp2_equals_one_process(layout, suite_cache, one_process_eval, synth_dir,
                                                                    tmp_path):
    """eval.tasks after 3 AdamW steps on 2 gloo ranks against one process: the same greedy answers (the model is
    nearly random, so any difference in a forward shows), option log-likelihoods and perplexity within rtol 1e-4.
    Under tp the forwards are padded to a multiple of 2 for sequence parallelism, each decoding step included."""
    from parallel_runs import run_layout

    _, scores, predictions = one_process_eval
    got = run_layout(2, [*eval_base(synth_dir), *layout], tmp_path)
    assert set(scores) == {"synth/mc/accuracy", "synth/vqa_cloze/vqa_accuracy", "synth/perplexity/perplexity"}
    for name, value in scores.items():
        assert got["tasks"][name] == pytest.approx(value, rel=1e-4), name
    ours, theirs = got["task_predictions"], predictions
    assert [p["prediction"] for p in ours["synth/vqa_cloze"]] == [p["prediction"] for p in theirs["synth/vqa_cloze"]]
    assert any(p["prediction"] for p in theirs["synth/vqa_cloze"])
    for a, b in zip(ours["synth/mc"], theirs["synth/mc"]):
        assert a["logprobs"] == pytest.approx(b["logprobs"], rel=1e-4)
    for a, b in zip(ours["synth/perplexity"], theirs["synth/perplexity"]):
        assert a["logprob"] == pytest.approx(b["logprob"], rel=1e-4)


@pytest.mark.parametrize("layout", ["parallel.dp_shard=2", "parallel.tp=2"], ids=["fsdp2", "tp2"])
def test_sharded_mmfm_eval_equals_one_process(layout, suite_cache, one_process_eval, tmp_path):
    """`mmfm eval RUN parallel.<dim>=2` on 2 gloo ranks (as under torchrun): each rank loads its shards of the
    checkpoint; rank 0 writes the same answers, option log-likelihoods (rtol 1e-4) and scores as one process."""
    from parallel_runs import run_cli

    run_dir, _, _ = one_process_eval
    tasks = "tasks=[synth/mc,synth/vqa_cloze]"
    assert mmfm_eval(run_dir, tasks, "--limit", 10, "--out", tmp_path / "one") == 0
    run_cli(2, ["eval", run_dir, tasks, layout, "--limit", 10, "--out", tmp_path / "two"])
    one, two = (json.loads((tmp_path / f"{w}/eval/3/results.json").read_text()) for w in ("one", "two"))
    assert two["synth/mc"]["accuracy"] == one["synth/mc"]["accuracy"]
    assert two["synth/vqa_cloze"]["vqa_accuracy"] == one["synth/vqa_cloze"]["vqa_accuracy"]
    for name in ("synth_mc", "synth_vqa_cloze"):
        a, b = ([json.loads(line) for line in (tmp_path / f"{w}/eval/3/predictions/{name}.jsonl").open()]
                for w in ("one", "two"))
        assert [r.get("prediction") for r in a] == [r.get("prediction") for r in b]
        for x, y in zip(a, b):
            assert y.get("logprobs", [0]) == pytest.approx(x.get("logprobs", [0]), rel=1e-4)


def test_eval_tasks_refuse_pipeline_parallelism_in_one_line(synth_dir):
    from mmfm.config import load_config
    from mmfm.config.validate import validate
    from mmfm.errors import ConfigError

    one_line(ConfigError, lambda: validate(load_config([f"data.path={synth_dir}", "parallel.pp=2",
                                                        "eval.tasks=[synth/mc]"])),
             "eval.tasks runs on data- and tensor-parallel layouts, not at parallel.pp=2")


def test_mmfm_eval_on_the_final_checkpoint_scores_what_training_scored(suite_cache, one_process_eval):
    run_dir, scores, _ = one_process_eval
    assert mmfm_eval(run_dir, "tasks=[synth/mc,synth/vqa_cloze,synth/perplexity]", "--limit", 10) == 0
    results = json.loads((run_dir / "eval/3/results.json").read_text())
    for name, value in scores.items():
        task, metric = name.rsplit("/", 1)
        assert results[task][metric] == pytest.approx(value, rel=1e-5), name


# --- the lm-evaluation-harness model ------------------------------------------------------------------------------

TEXT_ITEMS = [{"id": f"t{i}", "question": q, "options": opts, "answer": a, "answers": [opts[a]], "text": t}
              for i, (q, opts, a, t) in enumerate([
                  ("describe the image.", ["a red circle.", "a blue square.", "the handwritten digit two."], 0,
                   "a red circle on the left."),
                  ("the handwritten digit", ["two.", "three.", "a green cross."], 1, "the handwritten digit seven."),
                  ("a green", ["cross at the top.", "circle.", "square on the right."], 0,
                   "on the left is a white square."),
              ])]
HARNESS_TASKS = {
    "mmfm_local_mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{options}}'\n"
                     "doc_to_target: '{{answer}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n",
    "mmfm_local_gen": "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answers[0]}}'\n"
                      "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 6\nmetric_list:\n  - metric: exact_match\n",
    "mmfm_local_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                      "metric_list:\n  - metric: word_perplexity\n",
}


def harness_tasks(folder, items_file):
    folder.mkdir()
    for name, body in HARNESS_TASKS.items():
        (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                             f"    test: {items_file}\ntest_split: test\n{body}")
    return folder


def test_lm_eval_runs_a_checkpoint_on_local_tasks_as_mmfm_eval_does(trained_run, tmp_path, monkeypatch):
    """lm-evaluation-harness with model `mmfm` on three local text tasks (multiple choice, generate_until,
    loglikelihood_rolling): each item's option log-likelihoods, answer and text log-likelihood equal `mmfm eval`'s on
    the same items (rel 1e-5), and `python -m mmfm.eval.harness` (lm-eval's command line, `--model mmfm`) runs."""
    import subprocess
    import sys

    import lm_eval
    from lm_eval.tasks import TaskManager

    from mmfm.eval.harness import MmfmLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(i) + "\n" for i in TEXT_ITEMS))
    tasks = harness_tasks(tmp_path / "harness", items)
    out = lm_eval.simple_evaluate(model=MmfmLM(str(trained_run), batch_size=2, device="cpu"),
                                  tasks=list(HARNESS_TASKS), task_manager=TaskManager(include_path=str(tasks)),
                                  log_samples=True)
    samples = {name: sorted(rows, key=lambda r: r["doc_id"]) for name, rows in out["samples"].items()}

    for kind, keys in (("multiple_choice", {"prompt": "{question}", "score_end": False}),
                       ("vqa", {"prompt": "{question}", "until": ["."], "max_new_tokens": 6}),
                       ("perplexity", {"score_end": False})):
        folder = write_task(tmp_path / kind, TEXT_ITEMS, type=kind, **keys)
        assert mmfm_eval(trained_run, f"tasks=[{folder}]", "--out", tmp_path / "mmfm") == 0
    preds = {kind: [json.loads(line) for line in (tmp_path / f"mmfm/eval/40/predictions/{kind}.jsonl").open()]
             for kind in ("multiple_choice", "vqa", "perplexity")}
    for got, want in zip(samples["mmfm_local_mc"], preds["multiple_choice"]):
        assert [r[0] for r in got["filtered_resps"]] == pytest.approx(want["logprobs"], rel=1e-5)
    assert [s["filtered_resps"][0] for s in samples["mmfm_local_gen"]] == [p["prediction"] for p in preds["vqa"]]
    for got, want in zip(samples["mmfm_local_ppl"], preds["perplexity"]):
        assert got["filtered_resps"][0] == pytest.approx(want["logprob"], rel=1e-5)
    accuracy = out["results"]["mmfm_local_mc"]["acc,none"]
    assert accuracy == pytest.approx(sum(p["correct"] for p in preds["multiple_choice"]) / 3)

    cli = subprocess.run([sys.executable, "-m", "mmfm.eval.harness", "run", "--model", "mmfm", "--model_args",
                          f"checkpoint={trained_run}", "--tasks", "mmfm_local_mc", "--include_path", str(tasks),
                          "--device", "cpu", "--output_path", str(tmp_path / "cli")], capture_output=True, text=True,
                         env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1",
                              "HF_DATASETS_CACHE": str(tmp_path / "datasets")}, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert f"{accuracy:.4f}" in cli.stdout


# --- the lmms-eval model ----------------------------------------------------------------------------------------

LMMS_UTILS = '''from pathlib import Path

from PIL import Image


def doc_to_visual(doc):
    return [Image.open(Path(__file__).parent / "images" / doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def doc_to_choice(doc):
    return doc["options"]


def doc_to_answer(doc):
    return doc["answers"][0]
'''
LMMS_TASKS = {
    "mmfm_lmms_vqa": "output_type: generate_until\ndoc_to_target: !function utils.doc_to_answer\n"
                     "generation_kwargs:\n  until: ['.']\n"
                     "  max_new_tokens: 8\nmetric_list:\n  - metric: exact_match\n",
    "mmfm_lmms_mc": "output_type: multiple_choice\ndoc_to_target: answer\ndoc_to_choice: !function utils.doc_to_choice\n"
                    "target_delimiter: ''\nmetric_list:\n  - metric: acc\n",
}


def test_lmms_eval_runs_a_checkpoint_on_a_local_image_task_as_mmfm_eval_does(trained_run, tmp_path, monkeypatch):
    """lmms-eval with model `mmfm` (found through its entry point) on two local image tasks from the synthetic
    suite's items: each answer, each option's log-likelihood (lmms-eval takes a loss: its negative) and the
    multiple-choice accuracy equal `mmfm eval`'s on the same items."""
    import lmms_eval.evaluator
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    from mmfm.eval.synth_suite import ensure_suite

    monkeypatch.setenv("MMFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    suite = ensure_suite()
    folder = tmp_path / "lmms"
    shutil.copytree(suite / "mc" / "images", folder / "images")
    rows = [json.loads(line) for line in (suite / "mc" / "items.jsonl").read_text().splitlines()[:6]]
    items = [{**r, "question": "describe the image.", "answers": [r["options"][r["answer"]].rstrip(".")]}
             for r in rows]
    (folder / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (folder / "utils.py").write_text(LMMS_UTILS)
    for name, body in LMMS_TASKS.items():
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'items.jsonl'}\n"
            "test_split: test\ndoc_to_visual: !function utils.doc_to_visual\ndoc_to_text: !function utils.doc_to_text\n"
            + body)
    model = get_model("mmfm")(checkpoint=str(trained_run), device="cpu")
    out = lmms_eval.evaluator.simple_evaluate(model=model, tasks=list(LMMS_TASKS),
                                              task_manager=TaskManager(include_path=str(folder)), log_samples=True)
    samples = {name: sorted(rows, key=lambda r: r["doc_id"]) for name, rows in out["samples"].items()}

    for kind, keys in (("vqa", {"until": ["."], "max_new_tokens": 8}), ("mc", {"score_end": False})):
        write_task(tmp_path / kind, items, type="vqa" if kind == "vqa" else "multiple_choice", prompt="{question}",
                   **keys)
        shutil.copytree(folder / "images", tmp_path / kind / "images", dirs_exist_ok=True)
    assert mmfm_eval(trained_run, f"tasks=[{tmp_path / 'vqa'},{tmp_path / 'mc'}]", "--out", tmp_path / "mmfm") == 0
    preds = {kind: [json.loads(line) for line in (tmp_path / f"mmfm/eval/40/predictions/{kind}.jsonl").open()]
             for kind in ("vqa", "mc")}
    assert [s["filtered_resps"][0] for s in samples["mmfm_lmms_vqa"]] == [p["prediction"] for p in preds["vqa"]]
    for got, want in zip(samples["mmfm_lmms_mc"], preds["mc"]):
        assert [-r[0] for r in got["filtered_resps"]] == pytest.approx(want["logprobs"], rel=1e-5)
    mc_accuracy = json.loads((tmp_path / "mmfm/eval/40/results.json").read_text())["mc"]["accuracy"]
    assert out["results"]["mmfm_lmms_mc"]["acc,none"] == pytest.approx(mc_accuracy)

    import os
    import subprocess
    import sys

    cli = subprocess.run([str(Path(sys.executable).parent / "lmms-eval"), "--model", "mmfm", "--model_args",
                          f"checkpoint={trained_run}", "--tasks", "mmfm_lmms_mc", "--include_path", str(folder),
                          "--device", "cpu", "--output_path", str(tmp_path / "cli")], capture_output=True, text=True,
                         env={**os.environ}, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    row = next(line for line in cli.stdout.splitlines() if line.startswith("|mmfm_lmms_mc"))
    assert float(row.split("|")[6]) == pytest.approx(mc_accuracy, abs=1e-4)
