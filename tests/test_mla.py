"""Multi-head latent attention (model.language.mla; mmfm.models.llama.mla) against transformers' DeepSeek-V3, under
tensor, context and expert parallelism against one process, and its config errors and counts."""

import pytest
import torch

from mmfm.config import ConfigError, load_config, validate
from mmfm.config.schema import LanguageConfig, MLAConfig, ModelConfig
from mmfm.models.llama import counts
from mmfm.models.llama.model import LanguageModel
from mmfm.train.trainer import Trainer

MLA = ["model.language.num_kv_heads=4", "model.language.mla.kv_lora_rank=16", "model.language.mla.q_lora_rank=24",
       "model.language.mla.qk_nope_head_dim=16", "model.language.mla.qk_rope_head_dim=8",
       "model.language.mla.v_head_dim=12"]
# DeepSeek-V3's routing in small: sigmoid scores in 2 groups, one chosen per token, a shared expert, the combine
# weights scaled; no auxiliary loss (each rank's padding would count in it, docs/moe.md)
DEEPSEEK_MOE = ["model.language.moe.num_experts=4", "model.language.moe.top_k=2",
                "model.language.moe.score_func=sigmoid", "model.language.moe.num_groups=2",
                "model.language.moe.topk_groups=1", "model.language.moe.num_shared_experts=1",
                "model.language.moe.route_scale=2.5", "model.language.moe.first_dense_layers=1",
                "model.language.moe.expert_intermediate_size=48", "model.language.moe.aux_loss_coef=0"]


def small_mla(q_lora_rank: int = 24, **language) -> LanguageConfig:
    mla = MLAConfig(kv_lora_rank=16, q_lora_rank=q_lora_rank, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    return LanguageConfig(**{"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4,
                             "intermediate_size": 48, "max_seq_len": 32, "tie_embeddings": False, "norm_eps": 1e-6,
                             "mla": mla, **language})


def random_model(lm: LanguageConfig, seed: int = 0) -> LanguageModel:
    model = LanguageModel(lm)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    model.init_buffers()
    return model


def deepseek_v3_twin(model: LanguageModel):
    """transformers' DeepseekV3ForCausalLM of the same shape (all layers dense, rotary halves as mmfm turns them)
    holding the same weights, mapped by hand."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    lm, mla = model.cfg, model.cfg.mla
    config = DeepseekV3Config(
        vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
        num_hidden_layers=lm.num_layers, first_k_dense_replace=lm.num_layers, num_attention_heads=lm.num_heads,
        num_key_value_heads=lm.num_heads, q_lora_rank=mla.q_lora_rank or None, kv_lora_rank=mla.kv_lora_rank,
        qk_nope_head_dim=mla.qk_nope_head_dim, qk_rope_head_dim=mla.qk_rope_head_dim, v_head_dim=mla.v_head_dim,
        rope_interleave=False, rms_norm_eps=lm.norm_eps, max_position_embeddings=lm.max_seq_len,
        tie_word_embeddings=False, attn_implementation="eager")
    twin = DeepseekV3ForCausalLM(config).eval()
    names = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attention.wq": "self_attn.q_proj", "attention.wq_a": "self_attn.q_a_proj",
             "attention.q_norm": "self_attn.q_a_layernorm", "attention.wq_b": "self_attn.q_b_proj",
             "attention.wkv_a": "self_attn.kv_a_proj_with_mqa", "attention.kv_norm": "self_attn.kv_a_layernorm",
             "attention.wkv_b": "self_attn.kv_b_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj"}
    theirs = twin.state_dict()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("layers."):
                _, i, rest = name.split(".", 2)
                module, leaf = rest.rsplit(".", 1)
                key = f"model.layers.{i}.{names[module]}.{leaf}"
            else:
                key = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                       "output.weight": "lm_head.weight"}[name]
            theirs[key].copy_(p)
    return twin


@pytest.mark.parametrize("q_lora_rank", [24, 0], ids=["query-latent", "direct-query"])
def test_logits_equal_transformers_deepseek_v3(q_lora_rank):
    model = random_model(small_mla(q_lora_rank)).eval()
    twin = deepseek_v3_twin(model)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(model.embed(ids))
        want = twin(ids).logits
    assert want.abs().max() > 1.0  # the comparison is not of near-zero logits
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)


def test_decoding_with_the_cache_equals_the_full_forward():
    """Keys (nope + rope wide) and values (v_head_dim wide) cached at their own widths."""
    model = random_model(small_mla()).eval()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(model.embed(ids))
        cache = model.new_cache(2, 16, torch.float32, torch.device("cpu"))
        assert cache.keys[0].shape[-1] == 12 and cache.values[0].shape[-1] == 6
        first = model(model.embed(ids[:, :6]), cache=cache)
        cache.length = 6
        mask = torch.ones(10, 10, dtype=torch.bool).tril()[6:][None, None].expand(2, 1, 4, 10)
        rest = model(model.embed(ids[:, 6:]), positions=torch.arange(6, 10).expand(2, 4), cache=cache, attn_mask=mask)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_counts_equal_the_built_model():
    for q_lora_rank in (24, 0):
        lm = small_mla(q_lora_rank)
        model = LanguageModel(lm)
        assert counts.num_params(ModelConfig(language=lm)) == sum(p.numel() for p in model.parameters())
    # attention FLOPs: q k^T over 4 x (8 + 4) wide heads and the values over 4 x 6 per layer
    lm = small_mla()
    dense = counts.flops_per_token(ModelConfig(language=lm), 0)
    assert counts.flops_per_token(ModelConfig(language=lm), 10) - dense == 6 * 2 * (48 + 24) * 10


@pytest.mark.parametrize("override,message", [
    (["model.language.num_kv_heads=2"], "num_kv_heads=2 differs from num_heads=4"),
    (["model.language.mla.qk_rope_head_dim=7"], "qk_rope_head_dim=7 is odd"),
    (["model.language.mla.v_head_dim=0"], "v_head_dim=0 must be > 0"),
    (["model.language.mla.q_lora_rank=-1"], "q_lora_rank=-1 must be >= 0"),
    (["model.language.kind=qwen3", "model.language.qk_norm=true"], "use kind=llama"),
    (["model.language.head_dim=32"], "head_dim=32 has no use under latent attention"),
    (["model=gpt", "model.language.num_kv_heads=${model.language.num_heads}"], "kind=gpt has multi-head attention only"),
])
def test_bad_latent_attention_config_is_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate(load_config([*MLA, *override]))
    assert "\n" not in str(err.value)


def test_hugging_face_export_refuses_latent_attention(tmp_path):
    from mmfm.checkpoint.hf import HFCheckpointError, export_language

    model = random_model(small_mla())
    with pytest.raises(HFCheckpointError, match="mla.kv_lora_rank=16: kind=llama has no Hugging Face form"):
        export_language(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def deepseek_base(synth_dir) -> list[str]:
    from conftest import SMALL_MODEL, STEPS

    return [f"data.path={synth_dir}", *SMALL_MODEL, *STEPS, "data.partitions=4", *MLA, *DEEPSEEK_MOE]


@pytest.fixture(scope="module")
def one_process(synth_dir, tmp_path_factory):
    from parallel_runs import local_full_params

    single = Trainer(load_config([*deepseek_base(synth_dir), "data.batch_size=4"]), tmp_path_factory.mktemp("single"))
    return single.fit(), local_full_params(single)


@pytest.mark.parametrize("world,layout", [
    (2, ["parallel.tp=2"]),
    (2, ["parallel.cp=2"]),
    (4, ["parallel.tp=2", "parallel.dp_shard=2", "parallel.ep=2"]),
    (4, ["parallel.cp=2", "parallel.dp_shard=2", "parallel.ep=2"]),
], ids=["tp2", "cp2", "ep2xtp2", "ep2xcp2"])
def test_latent_attention_layouts_train_as_one_process(world, layout, one_process, synth_dir, tmp_path):
    """A DeepSeek-V3-shaped small model (latent attention, sigmoid group-limited experts with a shared one) in N gloo
    processes against one, 3 AdamW steps of 8 samples: losses rtol 1e-5, gradient norms 1e-4, parameters atol 1e-4.
    Under tp the latents' projections run whole on each rank while the heads split; a missing sum of the shared
    rotated key's gradient moves wkv_a by ~lr = 1e-3, far outside the bound."""
    from parallel_runs import run_layout

    want, want_params = one_process
    data_ranks = world // 2 if "parallel.tp=2" in layout or "parallel.cp=2" in layout else world
    got = run_layout(world, [*deepseek_base(synth_dir), f"data.batch_size={4 // data_ranks}", *layout], tmp_path)
    for step, loss in want["losses"].items():
        assert got["losses"][step] == pytest.approx(loss, rel=1e-5), step
        assert got["grad_norms"][step] == pytest.approx(want["grad_norms"][step], rel=1e-4), step
    assert any("wkv_a" in name for name in want_params) and any("experts.w2" in name for name in want_params)
    for name, value in want_params.items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=1e-4, msg=name)
