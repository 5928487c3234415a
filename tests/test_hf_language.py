"""Hugging Face interop of the language kinds: tiny random Llama (llama3 rope scaling, untied lm_head), Qwen2
(q/k/v biases, tied embeddings) and Qwen3 (q/k norms, head_dim 32 != hidden 64 / 4 heads, sharded index)
built with transformers, imported into mmfm, exported back, and refused when damaged.

Tolerance of the logit comparisons, max abs diff <= 1e-4 (fp32): both sides compute the same math (same
rotate-half rotary, RMSNorm in fp32, SDPA), differing at most in the order of floating-point operations, which
moves fp32 logits of magnitude ~3 by ~1e-6 (measured: 0 in one process, ~1.5e-6 under tensor parallelism,
whose matmuls are split and all-reduced). A wrong mapping moves them by 1e-1 or more: measured 2.1 with the
unscaled rotary frequencies (test_rope_scaling_is_applied), 0.18 with one layer's k bias left at zero.
"""

import datetime
import json
import os
import shutil
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)
from transformers.modeling_rope_utils import _compute_llama3_parameters

from conftest import one_line
from mmfm.checkpoint.hf import (HFCheckpointError, export_language, language_config_from_hf, language_model_from_hf,
                                load_language)
from mmfm.config.schema import LanguageConfig, ModelConfig
from mmfm.errors import ConfigError
from mmfm.models.llama.model import rope_frequencies
from mmfm.models.spec import part_spec
from mmfm.parallel.data_parallel import apply_fsdp
from mmfm.parallel.distributed import free_port

ATOL = 1e-4
VOCAB, B, T = 128, 2, 16
GROWN = 130  # a vocabulary with two added tokens
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
# Llama 3.1's scaling with original_max_position_embeddings=32 puts the 8 frequencies of a 16-wide head in all
# three regimes (kept: wavelength < 8, blended: 8..32, slowed down: > 32), at angles that matter within 16 tokens.
# (rope_theta + rope_scaling: the form both transformers 4.x and 5 read)
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
HF = {
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(**COMMON, tie_word_embeddings=False, rope_theta=10000.0,
                                                    rope_scaling=LLAMA3)),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**COMMON, tie_word_embeddings=True)),
    "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False)),
}
KINDS = list(HF)


def randomize(model) -> None:
    """Random weights everywhere (transformers initializes biases to zero and norms to one, which would hide
    a bias or norm left unloaded)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(batch()).logits


def mmfm_logits(lm) -> torch.Tensor:
    with torch.no_grad():
        return lm(lm.embed(batch()))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """kind -> (folder, transformers model): saved in fp32; qwen3 in 100 KB shards with an index."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind, (cls, make_config) in HF.items():
        torch.manual_seed(0)
        model = cls(make_config()).eval()
        randomize(model)
        folder = root / kind
        model.save_pretrained(folder, max_shard_size="100KB" if kind == "qwen3" else "50GB")
        out[kind] = (folder, model)
    assert (root / "qwen3" / "model.safetensors.index.json").is_file()
    return out


def damaged_copy(folder, tmp_path, edit_config=None):
    """A copy of a folder, its config.json changed by edit_config(dict)."""
    bad = tmp_path / f"bad_{folder.name}"
    shutil.copytree(folder, bad)
    if edit_config:
        config = json.loads((bad / "config.json").read_text())
        edit_config(config)
        (bad / "config.json").write_text(json.dumps(config))
    return bad


def one_line_error(call, *fragments) -> str:
    return one_line(HFCheckpointError, call, *fragments)


def built(cfg: LanguageConfig):
    """A LanguageModel of cfg with random values (to tell whether a refused load wrote anything)."""
    model_cfg = ModelConfig(language=cfg)
    lm = part_spec(model_cfg, "language").build(model_cfg)
    randomize(lm)
    return lm


def snapshot(module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def assert_unchanged(module, before: dict) -> None:
    for name, p in module.named_parameters():
        assert torch.equal(p, before[name]), f"{name} was written"


# ---------------------------------------------------------------- import, export


@pytest.mark.parametrize("kind", KINDS)
def test_import_matches_transformers_logits(hf_models, kind):
    folder, model = hf_models[kind]
    lm = language_model_from_hf(folder)
    assert lm.cfg.kind == kind
    assert (lm.cfg.qkv_bias, lm.cfg.qk_norm) == (kind == "qwen2", kind == "qwen3")
    assert lm.cfg.head_dim == (32 if kind == "qwen3" else 0)
    assert lm.cfg.rope_scaling == ("llama3" if kind == "llama" else "none")
    assert lm.cfg.tie_embeddings == (kind == "qwen2")
    diff = (mmfm_logits(lm) - hf_logits(model)).abs().max().item()
    print(f"{kind}: max abs logit diff vs transformers {diff:.2e}")
    assert diff <= ATOL


def test_rope_scaling_is_applied(hf_models):
    """mmfm's llama3 frequencies are transformers' exactly; without them the logits move far beyond ATOL."""
    folder, model = hf_models["llama"]
    lm = language_model_from_hf(folder)
    want, _ = _compute_llama3_parameters(model.config, device="cpu")
    assert torch.equal(rope_frequencies(lm.cfg), want)
    unscaled = replace(lm.cfg, rope_scaling="none")
    assert not torch.equal(rope_frequencies(unscaled), want)
    lm.cfg = unscaled
    lm.init_buffers()
    assert (mmfm_logits(lm) - hf_logits(model)).abs().max().item() > 100 * ATOL


@pytest.mark.parametrize("kind", KINDS)
def test_export_round_trip(hf_models, tmp_path, kind):
    folder, model = hf_models[kind]
    lm = language_model_from_hf(folder)
    out = tmp_path / "export"
    # llama in ~100 KB shards: several files and the index
    export_language(lm, out, max_shard_bytes=100_000 if kind == "llama" else 10**9)
    assert (out / "model.safetensors.index.json").is_file() == (kind == "llama")
    cls = HF[kind][0]
    back = cls.from_pretrained(out).eval()
    assert (hf_logits(back) - mmfm_logits(lm)).abs().max().item() <= ATOL
    theirs, ours = model.state_dict(), back.state_dict()
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs), "fp32 export is not bit-exact"
    assert language_config_from_hf(out) == lm.cfg
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def test_export_and_import_convert_dtype(hf_models, tmp_path):
    folder, _ = hf_models["qwen2"]
    lm = language_model_from_hf(folder)
    export_language(lm, tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    back = language_model_from_hf(tmp_path / "bf16")  # bf16 files into fp32 parameters
    for (name, p), q in zip(lm.named_parameters(), back.parameters()):
        assert q.dtype == torch.float32
        assert torch.equal(q, p.detach().to(torch.bfloat16).float()), name


def test_export_refuses_a_used_folder(hf_models, tmp_path):
    lm = language_model_from_hf(hf_models["qwen2"][0])
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("x")
    one_line_error(lambda: export_language(lm, tmp_path / "used"), "not an empty folder")
    assert sorted(p.name for p in (tmp_path / "used").iterdir()) == ["keep.txt"]


def test_pipeline_stage_loads_only_its_layers(hf_models):
    folder, _ = hf_models["qwen3"]
    full = language_model_from_hf(folder)
    cfg = ModelConfig(language=full.cfg)
    spec = part_spec(cfg, "language")
    with torch.device("meta"):
        stage = spec.build(cfg)
    spec.keep_stage(stage, [1], False, True)  # the last of two stages: layer 1, norm, output
    stage.to_empty(device="cpu")
    load_language(stage, folder)
    want = dict(full.named_parameters())
    names = [n for n, _ in stage.named_parameters()]
    assert "layers.1.attention.q_norm.weight" in names and not any(n.startswith("layers.0") for n in names)
    for name, p in stage.named_parameters():
        assert torch.equal(p, want[name]), name


# ---------------------------------------------------------------- refused input: one line, nothing written


def test_folder_without_config_is_refused(hf_models, tmp_path):
    folder = damaged_copy(hf_models["llama"][0], tmp_path)
    (folder / "config.json").unlink()
    one_line_error(lambda: language_model_from_hf(folder), "is not a Hugging Face model folder", "no config.json")
    one_line_error(lambda: language_model_from_hf(tmp_path / "absent"), "is not a folder")


def test_custom_code_config_is_refused(hf_models, tmp_path):
    folder = damaged_copy(hf_models["llama"][0], tmp_path,
                          lambda c: c.update(auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}))
    lm = language_model_from_hf(hf_models["llama"][0])
    before = snapshot(lm)
    one_line_error(lambda: load_language(lm, folder), "auto_map", "never runs code")
    assert_unchanged(lm, before)


def test_pickle_only_folder_is_refused(hf_models, tmp_path):
    folder = damaged_copy(hf_models["llama"][0], tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    one_line_error(lambda: language_model_from_hf(folder), "pytorch_model.bin", "pickles")


def test_shape_mismatch_is_refused_before_writing(hf_models, tmp_path):
    folder = damaged_copy(hf_models["qwen2"][0], tmp_path, lambda c: c.update(intermediate_size=80))
    lm = built(language_config_from_hf(folder))
    before = snapshot(lm)
    one_line_error(lambda: load_language(lm, folder), "model.layers.0.mlp.gate_proj.weight has shape [96, 64]",
                   "is [80, 64] in the model", "(and 5 more mis-shaped tensors)",
                   "model.language.intermediate_size=80")
    assert_unchanged(lm, before)


def test_model_config_mismatch_is_refused(hf_models):
    folder, _ = hf_models["qwen3"]
    # a smaller vocabulary (a larger one grows: test_grown_vocabulary_*)
    lm = built(replace(language_config_from_hf(folder), num_heads=2, vocab_size=64))
    before = snapshot(lm)
    one_line_error(lambda: load_language(lm, folder), "vocab_size=64 (checkpoint: 128)",
                   "num_heads=2 (checkpoint: 4)")
    assert_unchanged(lm, before)


def test_shard_outside_the_folder_is_refused(hf_models, tmp_path):
    folder = damaged_copy(hf_models["qwen3"][0], tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    for evil in ("../x.safetensors", "/tmp/x.safetensors"):
        index["weight_map"][first] = evil
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        one_line_error(lambda: language_model_from_hf(folder), repr(evil), "not a plain file name")


def rewrite_weights(folder, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_missing_and_unexpected_tensors_are_refused(hf_models, tmp_path):
    source, _ = hf_models["llama"]
    lm = language_model_from_hf(source)
    before = snapshot(lm)
    missing = damaged_copy(source, tmp_path)
    rewrite_weights(missing, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    one_line_error(lambda: load_language(lm, missing), "lacks tensors the model needs (1)",
                   "model.layers.1.mlp.up_proj.weight")
    shutil.rmtree(missing)
    extra = damaged_copy(source, tmp_path)
    rewrite_weights(extra, lambda t: t.update({f"model.layers.{i}.self_attn.o_proj.bias": torch.zeros(64)
                                               for i in range(4)}))
    one_line_error(lambda: load_language(lm, extra), "holds tensors the model has no place for (4)",
                   "model.layers.0.self_attn.o_proj.bias", "(+1 more)")
    assert_unchanged(lm, before)


def test_tied_lm_head_copy_must_equal_the_embedding(hf_models, tmp_path):
    source, model = hf_models["qwen2"]  # tied: save_pretrained wrote no lm_head
    same = damaged_copy(source, tmp_path)
    rewrite_weights(same, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    assert (mmfm_logits(language_model_from_hf(same)) - hf_logits(model)).abs().max().item() <= ATOL
    shutil.rmtree(same)
    other = damaged_copy(source, tmp_path)
    rewrite_weights(other, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
    one_line_error(lambda: language_model_from_hf(other), "lm_head.weight differs from model.embed_tokens.weight",
                   "tie_word_embeddings=false")


UNSUPPORTED = {
    "sliding window": ("qwen2", dict(use_sliding_window=True, sliding_window=8,
                                     layer_types=["full_attention", "sliding_attention"]),
                       "layers [1] use sliding-window attention"),
    "yarn rope": ("qwen3", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
                  "rope_type='yarn' is not supported"),
    "attention bias": ("llama", dict(attention_bias=True), "attention_bias=true is not supported"),
    "gelu": ("qwen2", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    "other model_type": ("llama", dict(model_type="mistral"), "model_type='mistral' is not a language model"),
    "string size": ("qwen3", dict(hidden_size="64"), "hidden_size='64' is not an int"),
    "odd head": ("llama", dict(head_dim=15), "head size 15 is odd"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_configs_are_refused(hf_models, tmp_path, case):
    kind, edits, fragment = UNSUPPORTED[case]
    folder = damaged_copy(hf_models[kind][0], tmp_path, lambda c: c.update(edits))
    one_line_error(lambda: language_config_from_hf(folder), fragment)


# ---------------------------------------------------------------- the kinds' config checks and counts


@pytest.mark.parametrize("kind,flags,fix", [
    ("qwen2", {}, "model.language.kind=qwen2 needs model.language.qkv_bias=true"),
    ("qwen3", {"qk_norm": True, "qkv_bias": True}, "model.language.kind=qwen3 needs model.language.qkv_bias=false"),
    ("llama", {"qk_norm": True}, "model.language.kind=llama needs model.language.qk_norm=false"),
    ("llama", {"rope_scaling": "yarn"}, "model.language.rope_scaling='yarn' is unknown"),
    ("llama", {"rope_scaling": "llama3", "rope_low_freq_factor": 4.0}, "must satisfy 0 < low < high"),
])
def test_kind_checks(kind, flags, fix):
    cfg = ModelConfig(language=LanguageConfig(kind=kind, **flags))
    with pytest.raises(ConfigError) as info:
        part_spec(cfg, "language").validate(cfg)
    assert fix in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("kind,flags", [("llama", {}), ("qwen2", {"qkv_bias": True}),
                                        ("qwen3", {"qk_norm": True, "head_dim": 48}),
                                        ("llama", {"head_dim": 24, "rope_scaling": "llama3"})])
def test_param_count_matches_modules(kind, flags):
    cfg = ModelConfig(language=LanguageConfig(kind=kind, tie_embeddings=False, **flags))
    spec = part_spec(cfg, "language")
    spec.validate(cfg)
    with torch.device("meta"):
        lm = spec.build(cfg)
    assert spec.num_params(cfg) == sum(p.numel() for p in lm.parameters())


def test_llama_kind_parameters_unchanged():
    """kind=llama keeps its parameter names (and so its DCP checkpoints): no biases, no q/k norms."""
    cfg = ModelConfig(language=LanguageConfig(num_layers=1))
    with torch.device("meta"):
        lm = part_spec(cfg, "language").build(cfg)
    assert [n for n, _ in lm.named_parameters()] == [
        "tok_embeddings.weight", "layers.0.attention_norm.weight", "layers.0.attention.wq.weight",
        "layers.0.attention.wk.weight", "layers.0.attention.wv.weight", "layers.0.attention.wo.weight",
        "layers.0.ffn_norm.weight", "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w3.weight",
        "layers.0.feed_forward.w2.weight", "norm.weight"]


# ---------------------------------------------------------------- sharded loads (tp=2, fsdp=2 on gloo)

WORLD = 2
SHARDED_KINDS = ("qwen2", "qwen3")  # biases split with their projections; q/k norms replicated


def sharded_model(folder, mesh, layout: str, **overrides):
    cfg = ModelConfig(language=language_config_from_hf(folder, **overrides))
    spec = part_spec(cfg, "language")
    with torch.device("meta"):
        lm = spec.build(cfg)
    if layout == "tp":
        spec.apply_tensor_parallel(lm, mesh)
    else:
        apply_fsdp(lm, mesh, ("layers",))
    lm.to_empty(device="cpu")
    lm.init_buffers()
    load_language(lm, folder)
    return lm


def shard_dim(p):
    return next((pl.dim for pl in p.placements if pl.is_shard()), None)


def sharded_check(folder, mesh, layout: str, export_to: str) -> dict:
    """This rank's shards (with their split dim), the full logits and, under tp, the gradients of a fixed loss;
    then the model exported (every rank gathers, rank 0 writes)."""
    lm = sharded_model(folder, mesh, layout)
    shards = {n: (p.to_local().detach().clone(), shard_dim(p)) for n, p in lm.named_parameters()}
    if layout == "fsdp":
        lm.unshard()  # embed runs outside the root's forward, which would gather the embedding
    logits = lm(lm.embed(batch()))
    logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
    result = {"shards": shards, "logits": logits.detach()}
    if layout == "tp":
        (logits * loss_weights(logits)).sum().backward()
        result["grads"] = {n: p.grad.full_tensor() for n, p in lm.named_parameters()}
    export_language(lm, export_to)
    return result


def loss_weights(logits):
    return torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))


def sharded_worker(rank: int, port: int, folders: dict, out: str, exports: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    result = {}
    for layout in ("tp", "fsdp"):
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=(layout,))
        result[layout] = {kind: sharded_check(folder, mesh, layout, f"{exports}/{layout}-{kind}")
                          for kind, folder in folders.items()}
        grown = sharded_model(folders["qwen2"], mesh, layout, vocab_size=GROWN)
        result[layout]["grown"] = grown.tok_embeddings.weight.to_local().detach().clone()
    torch.save(result, f"{out}.{rank}")
    dist.barrier()  # no rank tears its gloo group down while the other is still in a collective
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    out = str(root / "result.pt")
    folders = {kind: str(hf_models[kind][0]) for kind in SHARDED_KINDS}
    mp.start_processes(sharded_worker, args=(free_port(), folders, out, str(root)), nprocs=WORLD, join=True,
                       start_method="spawn")
    return {"ranks": [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)], "exports": root}


@pytest.mark.parametrize("layout", ["tp", "fsdp"])
@pytest.mark.parametrize("kind", SHARDED_KINDS)
def test_sharded_load_reads_each_ranks_slice(hf_models, sharded, kind, layout):
    folder, model = hf_models[kind]
    full = dict(language_model_from_hf(folder).named_parameters())
    split = set()
    for rank, result in enumerate(sharded["ranks"]):
        for name, (local, dim) in result[layout][kind]["shards"].items():
            want = full[name].detach() if dim is None else full[name].detach().chunk(WORLD, dim)[rank]
            assert torch.equal(local, want), f"rank {rank}: {name}"
            if dim is not None:
                split.add(name)
        diff = (result[layout][kind]["logits"] - hf_logits(model)).abs().max().item()
        print(f"{kind} {layout}=2 rank {rank}: max abs logit diff vs transformers {diff:.2e}")
        assert diff <= ATOL
    if layout == "tp":  # the projections and their biases are split, the q/k norms are not
        assert {"layers.0.attention.wq.weight", "layers.0.feed_forward.w2.weight"} <= split
        assert ("layers.0.attention.wq.bias" in split) == (kind == "qwen2")
        assert "layers.0.attention.q_norm.weight" not in split
    else:
        assert split == set(full)  # FSDP splits every parameter


def grown_embedding(folder) -> torch.Tensor:
    """The checkpoint's embedding with GROWN - VOCAB rows of its mean appended (tokens added to the tokenizer)."""
    embedding = load_file(str(folder / "model.safetensors"))["model.embed_tokens.weight"]
    mean = embedding.double().mean(0).float()
    return torch.cat([embedding, mean.expand(GROWN - VOCAB, -1)])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_grown_vocabulary_keeps_the_checkpoint_rows_and_fills_the_mean(hf_models, kind):
    """Tokens added to a pretrained tokenizer (<image>) grow the embedding: model.language.vocab_size above the
    checkpoint's loads, the new rows at the mean of the old; logits over the old vocabulary are unchanged."""
    folder, model = hf_models[kind]
    lm = language_model_from_hf(folder, vocab_size=GROWN)
    want = grown_embedding(folder)
    assert torch.equal(lm.tok_embeddings.weight.detach(), want)
    if kind == "llama":  # untied: the output layer grows the same way
        output = load_file(str(folder / "model.safetensors"))["lm_head.weight"]
        assert torch.equal(lm.output.weight.detach()[:VOCAB], output)
        torch.testing.assert_close(lm.output.weight.detach()[VOCAB:], output.double().mean(0).float().expand(2, -1))
    diff = (mmfm_logits(lm)[..., :VOCAB] - hf_logits(model)).abs().max().item()
    assert diff <= ATOL
    smaller = replace(language_config_from_hf(folder), vocab_size=VOCAB - 8)  # shrinking is refused
    one_line_error(lambda: load_language(built(smaller), folder), "vocab_size=120 (checkpoint: 128)")


@pytest.mark.parametrize("layout", ["tp", "fsdp"])
def test_grown_vocabulary_loads_each_ranks_rows(hf_models, sharded, layout):
    """Rank 1's vocabulary shard holds checkpoint rows and new ones (tp: rows 65..129 of 130)."""
    got = torch.cat([r[layout]["grown"] for r in sharded["ranks"]])
    assert torch.equal(got, grown_embedding(hf_models["qwen2"][0]))


@pytest.mark.parametrize("kind", SHARDED_KINDS)
def test_tensor_parallel_gradients_match_one_process(hf_models, sharded, kind):
    """The replicated q/k norms' gradients are summed over the ranks' heads; the biases' stay split."""
    lm = language_model_from_hf(hf_models[kind][0])
    logits = lm(lm.embed(batch()))
    (logits * loss_weights(logits)).sum().backward()
    for name, p in lm.named_parameters():
        got = sharded["ranks"][0]["tp"][kind]["grads"][name]
        # fp32 sums split over two ranks: agreement to ~1e-6 of the gradient's scale (a missing all-reduce: ~1)
        torch.testing.assert_close(got, p.grad, rtol=0, atol=1e-5 * p.grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("layout", ["tp", "fsdp"])
@pytest.mark.parametrize("kind", SHARDED_KINDS)
def test_sharded_export_equals_the_checkpoint(hf_models, sharded, kind, layout):
    folder, model = hf_models[kind]
    back = HF[kind][0].from_pretrained(sharded["exports"] / f"{layout}-{kind}")
    theirs, ours = model.state_dict(), back.state_dict()
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
