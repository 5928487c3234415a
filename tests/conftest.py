import os

# Triton kernels run in Triton's interpreter on CPU machines. Set before torch is imported: torch imports
# triton with torch._dynamo, and triton reads the flag then. MMFM_TEST_DEVICE=cuda runs them compiled.
if os.environ.get("MMFM_TEST_DEVICE", "cpu") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from mmfm.config import load_config  # noqa: E402
from mmfm.data.synth import build_synth_dataset  # noqa: E402
from mmfm.data.synth_instruct import build_instruct_dataset  # noqa: E402
from mmfm.parallel.bench import SMALL_MODEL  # noqa: E402,F401  (the small model the tests share)

torch.set_num_threads(min(2, os.cpu_count() or 1))

# The seed of the convergence tests (marked `convergence`); scripts/check_portability.sh runs them at several
# seeds and on several CPU code paths, collecting the figures each one records into $MMFM_FIGURES.
TEST_SEED = int(os.environ.get("MMFM_TEST_SEED", "0"))


@pytest.fixture
def record_figures(request):
    """record(name=value, ...): one JSON line of a convergence test's figures in $MMFM_FIGURES (when set)."""

    def record(**figures) -> None:
        path = os.environ.get("MMFM_FIGURES")
        if path:
            row = {"test": request.node.name, "seed": TEST_SEED, "cpu": torch.backends.cpu.get_cpu_capability(),
                   **figures}
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")

    return record



# Three optimizer steps of two micro-batches, nothing else: the runs that parallel layouts are compared on.
STEPS = ["train.max_steps=3", "train.schedule.warmup_steps=1", "train.grad_accum_steps=2", "eval.num_samples=0",
         "logger.wandb.enabled=false", "logger.progress_bar=false", "train.val_every=0", "checkpoint.every=0"]


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small synthetic data set shared by the tests (read-only: copy it before damaging it)."""
    out = tmp_path_factory.mktemp("data") / "synth"
    build_synth_dataset(out, seed=0, train_size=3000, val_size=300, shard_size=500, instruct_text=True,
                        progress=False)
    return out


@pytest.fixture(scope="session")
def sft_dir(synth_dir, tmp_path_factory):
    """Conversations about the synthetic scenes (1-2 questions each), with the pretraining data's tokenizer."""
    out = tmp_path_factory.mktemp("data") / "sft"
    build_instruct_dataset(out, "sft", synth_dir / "tokenizer.json", train_size=3000, val_size=300, shard_size=1000,
                           max_turns=2, progress=False)
    return out


@pytest.fixture(scope="session")
def preference_dir(synth_dir, tmp_path_factory):
    """Preference pairs (right vs plausible wrong answer) about the synthetic scenes, same tokenizer."""
    out = tmp_path_factory.mktemp("data") / "preference"
    build_instruct_dataset(out, "preference", synth_dir / "tokenizer.json", train_size=3000, val_size=200,
                           shard_size=1000, progress=False)
    return out


@pytest.fixture
def make_cfg(synth_dir):
    """load_config with the test data set, no wandb, no progress bar, plus the given overrides."""

    def make(*overrides, small=True, data=None):
        base = [f"data.path={data or synth_dir}", "logger.wandb.enabled=false", "logger.progress_bar=false",
                "eval.num_samples=0", "train.val_every=0", "checkpoint.every=0"]
        return load_config(base + (SMALL_MODEL if small else []) + list(overrides))

    return make


def one_line(exc_type, call, *fragments) -> str:
    """call() raises exc_type with a one-line message holding every fragment; returns the message."""
    with pytest.raises(exc_type) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message
