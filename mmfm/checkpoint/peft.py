"""A LoRA language model's adapters as the folder PEFT writes (`save_pretrained` of a `get_peft_model` model), which
`peft.PeftModel.from_pretrained(<the transformers base model>, folder)` loads:

    adapter_config.json          peft_type LORA, r, lora_alpha, lora_dropout, use_rslora, target_modules (the base
                                 model's Hugging Face module names, e.g. model.layers.0.self_attn.q_proj)
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in] and .lora_B.weight [out, r]

A and B are stored as they are (PEFT's layout is mmfm's); the scale follows from lora_alpha, r and use_rslora as in
mmfm. The language model alone (its *ForCausalLM): the names come from its family's Hugging Face adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from safetensors.torch import save_file
from torch import nn

from mmfm.checkpoint.hf import HFCheckpointError, _adapter, _gathered, new_folder, staging_folder
from mmfm.config.schema import LoRAConfig
from mmfm.models.init import canonical_name
from mmfm.models.lora import lora_modules
from mmfm.parallel.distributed import barrier, is_main_process

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def peft_module_names(lm: nn.Module) -> dict[str, str]:
    """{mmfm module name of each adapted linear (relative to lm): its Hugging Face module name}."""
    names = _adapter(lm.cfg, "export its adapters").names(lm.cfg)
    out = {}
    for name, _ in lora_modules(lm):
        name = canonical_name(name)
        theirs = names.get(f"{name}.weight")
        if theirs is None or not theirs.endswith(".weight"):
            raise HFCheckpointError(f"the adapted linear {name} has no Hugging Face module name; PEFT export covers "
                                    "the language model's linears")
        out[name] = theirs.removesuffix(".weight")
    return out


def adapter_config(lora: LoRAConfig, targets: list[str], base_model: Optional[str]) -> dict:
    """PEFT's LoraConfig fields for these adapters (the others take PEFT's defaults)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "use_rslora": lora.rslora, "target_modules": sorted(targets),
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "base_model_name_or_path": base_model or None}


def export_peft(lm: nn.Module, lora: LoRAConfig, out_dir: str | Path, base_model: Optional[str] = None) -> Path:
    """Write the adapters of a LoRA language model (lm.cfg: model.language; lora: model.lora) as a PEFT adapter
    folder. Under tensor parallelism or FSDP every rank calls it (adapters gathered one at a time; the main
    process writes). base_model: the base model's folder, recorded as base_model_name_or_path."""
    out_dir = Path(out_dir)
    modules = peft_module_names(lm)
    if not modules:
        raise HFCheckpointError("the language model has no LoRA adapters to export; train with model.lora.enabled=true"
                                " and targets in the language model, or export with --format hf")
    new_folder(out_dir)
    params = {canonical_name(n): p for n, p in lm.named_parameters()}
    pairs = [(f"{PREFIX}{theirs}.{ab}.weight", params[f"{ours}.{ab}.weight"])
             for ours, theirs in modules.items() for ab in ("lora_A", "lora_B")]
    tensors = dict(_gathered(pairs, None))
    if is_main_process():
        with staging_folder(out_dir) as tmp:
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            config = adapter_config(lora, list(modules.values()), base_model)
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    barrier()
    return out_dir
