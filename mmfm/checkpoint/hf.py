"""Hugging Face checkpoints: a folder of config.json + safetensors, read into a model's own parameters at any
layout, and written back.

Reading (`load_parameters`) is generic: given the model's parameter names -> the checkpoint's tensor names, each
rank reads only its own slice of each tensor (`safe_open(...).get_slice(name)[box]`, the box of a DTensor
shard from its mesh and placements), converts the dtype and copies it into its local shard: no rank ever
holds the full model. Every file is untrusted input: config.json is parsed as JSON and may not name code
(auto_map), weights come only from safetensors (never a pickle), shard names in the index must be plain file
names inside the folder, and missing, unexpected or mis-shaped tensors are refused, one line each, before the
first parameter is written.

The language-model entry points (`language_config_from_hf`, `load_language`, `language_model_from_hf`,
`export_language`) find the kind's names and config mapping through its spec (`LanguagePartSpec.hf`).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

import mmfm.models  # noqa: F401  (registers the families and their Hugging Face adapters)
from mmfm.checkpoint.errors import CheckpointError
from mmfm.checkpoint.safe_read import plain_file_name
from mmfm.config.schema import LanguageConfig, ModelConfig
from mmfm.errors import ConfigError
from mmfm.models.init import canonical_name
from mmfm.models.lora import is_adapter
from mmfm.models.spec import LANGUAGE, Stacked, part_spec
from mmfm.parallel.distributed import barrier, is_main_process

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_JSON_BYTES = 64 * 2**20
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' "5GB"
SHOWN = 3  # names listed in one error line


class HFCheckpointError(CheckpointError):
    """A Hugging Face folder mmfm will not read (or write); one line naming the problem and the fix."""


def _few(names: list) -> str:
    more = f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return ", ".join(str(n) for n in names[:SHOWN]) + more


# ---------------------------------------------------------------- reading the folder's files


def read_json(path: Path) -> dict:
    """A JSON object from an untrusted file (size-capped; nothing in it is run)."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise HFCheckpointError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MiB; it is not a Hugging Face "
                                    "config or index file")
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except OSError as exc:
        raise HFCheckpointError(f"cannot read {path} ({exc.strerror or exc})") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise HFCheckpointError(f"{path} is not valid JSON ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(value, dict):
        raise HFCheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def read_hf_config(folder: str | Path) -> dict:
    """config.json of a Hugging Face model folder, refused when it names custom code."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HFCheckpointError(f"{folder} is not a folder; point to a Hugging Face model folder (config.json + "
                                "*.safetensors, as save_pretrained writes)")
    if not (folder / CONFIG).is_file():
        raise HFCheckpointError(f"{folder} is not a Hugging Face model folder: it has no {CONFIG}; point to the "
                                "folder save_pretrained wrote (config.json + *.safetensors)")
    hf = read_json(folder / CONFIG)
    if "auto_map" in hf or hf.get("trust_remote_code"):
        raise HFCheckpointError(f"{folder / CONFIG} names custom code (auto_map); mmfm never runs code from a "
                                "checkpoint: use a model whose architecture transformers itself implements")
    return hf


def tensor_files(folder: str | Path) -> dict[str, str]:
    """Checkpoint tensor name -> the safetensors file (a plain name inside the folder) that holds it."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        weight_map = read_json(folder / INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFCheckpointError(f"{folder / INDEX} has no weight_map object; re-save the checkpoint")
        for name, file in weight_map.items():
            if not plain_file_name(file):
                raise HFCheckpointError(f"{folder / INDEX} names the shard {file!r} (for {name}), which is not a "
                                        "plain file name inside the folder; refusing to read it (use a checkpoint "
                                        "you trust)")
        return dict(weight_map)
    if (folder / SINGLE).is_file():
        with _open(folder, SINGLE) as f:
            return {name: SINGLE for name in f.keys()}
    bins = sorted(p.name for p in folder.glob("*.bin"))
    hint = f" (it has {_few(bins)}: pickles, which mmfm does not load; re-save with safetensors)" if bins else ""
    raise HFCheckpointError(f"{folder} has neither {SINGLE} nor {INDEX}{hint}")


def _open(folder: Path, file: str):
    try:
        return safe_open(str(folder / file), framework="pt")
    except FileNotFoundError:
        raise HFCheckpointError(f"{folder}: the shard {file} is missing; copy the whole checkpoint folder") from None
    except Exception as exc:  # noqa: BLE001  (a damaged or non-safetensors file: safetensors' own errors)
        raise HFCheckpointError(f"{folder / file} is not a readable safetensors file "
                                f"({' '.join(str(exc).split())[:120]}); re-download it") from None


def tensor_infos(folder: str | Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """Checkpoint tensor name -> (file, shape, safetensors dtype), from the files' headers (no data read)."""
    folder = Path(folder)
    by_file: dict[str, list[str]] = {}
    for name, file in tensor_files(folder).items():
        by_file.setdefault(file, []).append(name)
    infos = {}
    for file, names in by_file.items():
        with _open(folder, file) as f:
            held = set(f.keys())
            absent = [n for n in names if n not in held]
            if absent:
                raise HFCheckpointError(f"{folder / INDEX} puts {_few(absent)} in {file}, which does not hold "
                                        "them; re-save the checkpoint")
            for name in names:
                piece = f.get_slice(name)
                infos[name] = (file, tuple(piece.get_shape()), piece.get_dtype())
    return infos


# ---------------------------------------------------------------- into the model


def local_box(param: torch.Tensor) -> tuple[slice, ...]:
    """The part of the full tensor this rank holds: all of it, or a DTensor's local shard."""
    if not isinstance(param, DTensor):
        return tuple(slice(0, n) for n in param.shape)
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _read(f, name: str, box: tuple[slice, ...]) -> torch.Tensor:
    return f.get_slice(name)[box] if box else f.get_tensor(name)


def checkpoint_names(theirs) -> tuple[str, ...]:
    """The checkpoint tensors behind one adapter name: itself, or a Stacked parameter's per-expert tensors."""
    return theirs.names if isinstance(theirs, Stacked) else (theirs,)


def _all_names(names: dict) -> list[str]:
    return [t for theirs in names.values() for t in checkpoint_names(theirs)]


def _expected_shape(theirs, param: torch.Tensor) -> tuple[int, ...]:
    """The shape of each checkpoint tensor behind `theirs` for a model parameter of param's shape."""
    return tuple(param.shape[1:][::-1]) if isinstance(theirs, Stacked) else tuple(param.shape)


def _read_stacked(folder: Path, infos: dict, theirs: Stacked, box: tuple[slice, ...]) -> torch.Tensor:
    """This rank's box of a Stacked parameter: its experts' tensors, each read transposed to the box's last dims."""
    rows = []
    for name in theirs.names[box[0]]:
        with _open(folder, infos[name][0]) as f:
            rows.append(_read(f, name, (box[2], box[1])).t())
    return torch.stack(rows)


def _model_params(module: nn.Module, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """The module's parameters by canonical name, less LoRA adapters (a pretrained base has none)."""
    params = {canonical_name(n): p for n, p in module.named_parameters() if not is_adapter(canonical_name(n))}
    unnamed = [n for n in params if n not in names]
    if unnamed:
        raise HFCheckpointError(f"no checkpoint name for the model's parameters {_few(unnamed)}; the adapter and the "
                                "model disagree (a model of another kind?)")
    on_meta = [n for n, p in params.items() if p.is_meta]
    if on_meta:
        raise HFCheckpointError(f"parameters {_few(on_meta)} are on the meta device; materialize the model "
                                "(to_empty) before loading")
    return params


def _check_names(folder: Path, infos: dict, names: dict[str, str], copies: dict[str, str],
                 ignored: Callable[[str], bool]) -> None:
    wanted = set(_all_names(names))
    missing = [t for t in _all_names(names) if t not in infos]
    if missing:
        raise HFCheckpointError(f"{folder} lacks tensors the model needs ({len(missing)}): {_few(missing)}; the "
                                "checkpoint does not match its config.json or the model's config")
    unexpected = [t for t in infos if t not in wanted and t not in copies and not ignored(t)]
    if unexpected:
        raise HFCheckpointError(f"{folder} holds tensors the model has no place for ({len(unexpected)}): "
                                f"{_few(unexpected)}; the checkpoint is of another architecture or config")


def _check_shapes(folder: Path, infos: dict, params: dict, names: dict[str, str], copies: dict[str, str],
                  sized_by: Callable[[str], str], grown: frozenset = frozenset()) -> None:
    bad = []
    for ours, param in params.items():
        want = _expected_shape(names[ours], param)
        for theirs in checkpoint_names(names[ours]):
            shape = infos[theirs][1]
            if ours in grown and shape[1:] == tuple(param.shape[1:]) and shape[0] <= param.shape[0]:
                continue
            if shape != want:
                bad.append((theirs, shape, want, ours))
    for copy, original in copies.items():
        if copy in infos and infos[copy][1] != infos[original][1]:
            bad.append((copy, infos[copy][1], infos[original][1], original))
    if bad:
        theirs, shape, want, ours = bad[0]
        more = f" (and {len(bad) - 1} more mis-shaped tensors)" if len(bad) > 1 else ""
        hint = sized_by(theirs)
        raise HFCheckpointError(f"{folder}: {theirs} has shape {list(shape)} in the checkpoint but {ours} is "
                                f"{list(want)} in the model{more}{' (sized by ' + hint + ')' if hint else ''}; the "
                                "weights do not match config.json: fix config.json or use the folder they came from")
    not_float = [t for t in _all_names(names) if not infos[t][2].startswith(("F", "BF"))]
    if not_float:
        raise HFCheckpointError(f"{folder}: {_few(not_float)} hold {infos[not_float[0]][2]} values, not floating "
                                "point; the checkpoint is quantized or damaged")


def _check_copies(folder: Path, infos: dict, params: dict, names: dict[str, str], copies: dict[str, str]) -> None:
    """A tied tensor stored twice (e.g. lm_head and the embedding) must hold the same values (this rank's box)."""
    by_theirs = {theirs: ours for ours, theirs in names.items()}
    for copy, original in copies.items():
        ours = by_theirs.get(original)
        if copy not in infos or ours not in params:
            continue
        box = local_box(params[ours])
        with _open(folder, infos[copy][0]) as f:
            a = _read(f, copy, box)
        with _open(folder, infos[original][0]) as f:
            b = _read(f, original, box)
        if not torch.equal(a, b):
            raise HFCheckpointError(f"{folder}: {copy} differs from {original}, but the config ties them; set "
                                    "tie_word_embeddings=false in config.json (and untie the model) to keep both")


def _mean_row(f, name: str, rows: int, chunk: int = 4096) -> torch.Tensor:
    """The mean of a [rows, ...] checkpoint tensor's rows, read a chunk of rows at a time (float64 sum)."""
    piece = f.get_slice(name)
    total = None
    for start in range(0, rows, chunk):
        part = piece[start:min(start + chunk, rows)].to(torch.float64).sum(0)
        total = part if total is None else total + part
    return total / rows


def _copy_grown(f, name: str, local: torch.Tensor, box: tuple[slice, ...], rows: int) -> None:
    """This rank's rows of a tensor the model holds more rows of than the checkpoint (a grown vocabulary): the
    checkpoint's rows where it has them, their mean in the new ones."""
    start, stop = box[0].start, box[0].stop
    held = max(0, min(stop, rows) - start)
    if held:
        local[:held].copy_(f.get_slice(name)[(slice(start, start + held),) + box[1:]].to(local.dtype))
    if held < stop - start:
        local[held:].copy_(_mean_row(f, name, rows)[box[1:]].to(local.dtype))


@torch.no_grad()
def load_parameters(module: nn.Module, folder: str | Path, names: dict[str, str], *,
                    copies: Optional[dict[str, str]] = None, ignored: Callable[[str], bool] = lambda name: False,
                    sized_by: Callable[[str], str] = lambda name: "", grown: frozenset = frozenset()) -> None:
    """Fill every parameter of `module` from the safetensors of a Hugging Face folder.

    names: the model's parameter name (as module.named_parameters(), wrapper prefixes removed) -> the
    checkpoint's tensor name, for the whole model: a pipeline stage's module may hold only some of them.
    copies: checkpoint tensors that may also be present as copies of another (checked equal, not loaded).
    ignored(name): checkpoint tensors that are not weights. sized_by(name): the config fields that size a
    tensor, for the shape-mismatch message. grown: the model's parameters that may have more rows than the
    checkpoint's tensor (embedding and output of a vocabulary grown by added tokens): the new rows get the mean
    of the checkpoint's rows. Parameters may be DTensors (tensor parallel, FSDP): each rank
    reads only its slice. Raises HFCheckpointError before writing anything on missing, unexpected,
    mis-shaped or non-float tensors.
    """
    folder, copies = Path(folder), copies or {}
    params = _model_params(module, names)
    infos = tensor_infos(folder)
    _check_names(folder, infos, names, copies, ignored)
    _check_shapes(folder, infos, params, names, copies, sized_by, grown)
    _check_copies(folder, infos, params, names, copies)
    by_file: dict[str, list[str]] = {}
    for ours in params:
        if isinstance(names[ours], Stacked):
            _copy_stacked(folder, infos, names[ours], params[ours])
        else:
            by_file.setdefault(infos[names[ours]][0], []).append(ours)
    for file, ours_in_file in by_file.items():
        with _open(folder, file) as f:
            for ours in ours_in_file:
                param = params[ours]
                local = param.to_local() if isinstance(param, DTensor) else param
                if local.numel() == 0:  # an uneven FSDP split can leave a rank nothing of a small tensor
                    continue
                rows = infos[names[ours]][1][0] if infos[names[ours]][1] else 0
                if ours in grown and rows < param.shape[0]:
                    _copy_grown(f, names[ours], local, local_box(param), rows)
                    continue
                piece = _read(f, names[ours], local_box(param))
                if piece.shape != local.shape:
                    raise HFCheckpointError(f"{ours}: this rank's slice of {names[ours]} is {list(piece.shape)} but "
                                            f"its shard is {list(local.shape)}; this layout is not supported")
                local.copy_(piece.to(local.dtype))


def _copy_stacked(folder: Path, infos: dict, theirs: Stacked, param: torch.Tensor) -> None:
    local = param.to_local() if isinstance(param, DTensor) else param
    if local.numel():
        local.copy_(_read_stacked(folder, infos, theirs, local_box(param)).to(local.dtype))


# ---------------------------------------------------------------- writing a folder


def refuse_adapters(module: nn.Module) -> None:
    """A model with LoRA adapters has no plain Hugging Face form: merge them first (or export them as PEFT's)."""
    held = [canonical_name(n) for n, _ in module.named_parameters() if is_adapter(canonical_name(n))]
    if held:
        raise HFCheckpointError(f"the model holds LoRA adapters ({_few(held)}); merge them into the base weights "
                                "first (mmfm.models.lora.merge_lora, `mmfm export --merge-lora`) or write them "
                                "with `mmfm export --format peft`")


def _gathered(params: Iterable[tuple], dtype: Optional[torch.dtype]):
    """(name, full tensor on the CPU) on the main process; a collective for DTensors, on every rank. A Stacked
    name yields its experts' tensors, each transposed."""
    for name, param in params:
        full = param.full_tensor() if isinstance(param, DTensor) else param
        if not is_main_process():
            continue
        full = full.detach().to("cpu", dtype or full.dtype)
        if isinstance(name, Stacked):
            yield from ((each, full[e].t().contiguous()) for e, each in enumerate(name.names))
        else:
            yield name, full.contiguous()


def _flush(tmp: Path, shard: dict, shards: list) -> None:
    file = f"part-{len(shards) + 1:05d}.safetensors"
    save_file(shard, str(tmp / file), metadata={"format": "pt"})
    shards.append((file, list(shard)))


def _write_shards(tmp: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    """safetensors files of at most max_shard_bytes (a larger tensor alone), named as transformers does, and
    the index json when there is more than one."""
    shards, shard, size, total = [], {}, 0, 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            _flush(tmp, shard, shards)
            shard, size = {}, 0
        shard[name], size, total = tensor, size + nbytes, total + nbytes
    if shard:
        _flush(tmp, shard, shards)
    if len(shards) == 1:
        os.rename(tmp / shards[0][0], tmp / SINGLE)
        return
    weight_map = {}
    for i, (file, names) in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.rename(tmp / file, tmp / final)
        weight_map.update({name: final for name in names})
    with open(tmp / INDEX, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_hf_folder(out_dir: str | Path, tensors: Iterable[tuple[str, torch.Tensor]], config: dict,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES, extras: Optional[Callable[[Path], None]] = None) -> Path:
    """Write config.json and the tensors (name, full tensor; e.g. from `_gathered`) as safetensors shards into
    out_dir, which must not exist or be empty; extras(folder) writes more files (tokenizer, processor) there. The
    main process writes into a temporary sibling folder that takes out_dir's place at the end, so a failed export
    leaves nothing behind."""
    out_dir = new_folder(out_dir)
    if not is_main_process():
        for _ in tensors:  # take part in the gathers
            pass
        barrier()
        return out_dir
    with staging_folder(out_dir) as tmp:
        _write_shards(tmp, tensors, max_shard_bytes)
        with open(tmp / CONFIG, "w") as f:
            json.dump(config, f, indent=2)
        if extras is not None:
            extras(tmp)
    barrier()
    return out_dir


def new_folder(out_dir: str | Path) -> Path:
    """out_dir as a Path, refused when it exists and is not an empty folder (an export never writes over files)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise HFCheckpointError(f"{out_dir} exists and is not an empty folder; export into a new folder")
    return out_dir


@contextmanager
def staging_folder(out_dir: Path):
    """A temporary sibling of out_dir to write into; it takes out_dir's place when the block ends, and is removed
    when the block fails, so a failed export leaves nothing behind."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the exported folder private
    try:
        yield tmp
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- language models


def _adapter(lm: LanguageConfig, what: str):
    adapter = part_spec(ModelConfig(language=lm), "language").hf
    if adapter is None:
        raise HFCheckpointError(f"model.language.kind={lm.kind} has no Hugging Face form; cannot {what}")
    if lm.mla.kv_lora_rank:
        raise HFCheckpointError(f"model.language.mla.kv_lora_rank={lm.mla.kv_lora_rank}: kind={lm.kind} has no Hugging "
                                f"Face form with latent attention; cannot {what}")
    if lm.moe.num_experts:
        if adapter.moe is None:
            raise HFCheckpointError(f"model.language.moe.num_experts={lm.moe.num_experts}: kind={lm.kind} has no "
                                    f"Hugging Face mixture-of-experts form (qwen3 has: Qwen3MoeForCausalLM); "
                                    f"cannot {what}")
        adapter = adapter.moe
        reason = adapter.inexpressible(lm)
        if reason:
            raise HFCheckpointError(f"model.language.moe: {reason}; cannot {what}")
    return adapter


def language_config_from_hf(folder: str | Path, **overrides) -> LanguageConfig:
    """model.language for a Hugging Face causal LM folder (its config.json), e.g. to build the model that
    load_language fills; overrides: LanguageConfig fields to change (max_seq_len, ...)."""
    hf = read_hf_config(folder)
    model_type = hf.get("model_type")
    adapters = [a for s in LANGUAGE.values() if s.hf is not None for a in (s.hf, s.hf.moe) if a is not None]
    adapter = next((a for a in adapters if a.model_type == model_type), None)
    where = Path(folder) / CONFIG
    if adapter is None:
        types = sorted(a.model_type for a in adapters)
        raise HFCheckpointError(f"{where}: model_type={model_type!r} is not a language model mmfm reads; "
                                f"supported: {types}")
    try:
        lm = LanguageConfig(**{**adapter.config_from_hf(hf), **overrides})
    except ValueError as exc:  # UnsupportedConfig
        raise HFCheckpointError(f"{where}: {exc}; mmfm cannot read this checkpoint as "
                                f"model.language.kind={adapter.kind}") from None
    try:
        part_spec(ModelConfig(language=lm), "language").validate(ModelConfig(language=lm))
    except ConfigError as exc:
        raise HFCheckpointError(f"{where} describes a model mmfm cannot build: {exc}") from None
    return lm


def _sized_by(lm: LanguageConfig, adapter) -> Callable[[str], str]:
    def describe(name: str) -> str:
        values = {**vars(lm), "head_dim": lm.head_dim or lm.hidden_size // lm.num_heads}
        return ", ".join(f"model.language.{f}={values[f]}" for f in adapter.sized_by(name))
    return describe


VOCAB_ROWS = frozenset({"tok_embeddings.weight", "output.weight"})  # a language model's vocabulary-sized parameters


def language_mismatches(ours: LanguageConfig, theirs: LanguageConfig) -> list[tuple[str, object, object]]:
    """(field, ours, checkpoint's) that differ, less a larger vocab_size: tokens added to the tokenizer (e.g.
    <image>) grow the embedding, whose new rows load_language fills with the mean of the checkpoint's rows."""
    diffs = _adapter(ours, "compare it with a checkpoint").mismatches(ours, theirs)
    return [d for d in diffs if not (d[0] == "vocab_size" and d[1] > d[2])]


def load_language(lm: nn.Module, folder: str | Path) -> None:
    """Fill a LanguageModel (lm.cfg: model.language), possibly sharded or a pipeline stage, from a Hugging
    Face folder of the same kind and shape. Buffers (the rotary tables) are left as they are: init_buffers."""
    cfg = lm.cfg
    adapter = _adapter(cfg, "load a Hugging Face checkpoint into it")
    theirs = language_config_from_hf(folder)
    diffs = language_mismatches(cfg, theirs)
    if diffs:
        listed = ", ".join(f"{f}={ours!r} (checkpoint: {want!r})" for f, ours, want in diffs)
        raise HFCheckpointError(f"model.language does not match {Path(folder) / CONFIG}: {listed}; set those "
                                "fields as the checkpoint has them (language_config_from_hf reads them)")
    load_parameters(lm, folder, adapter.names(cfg), copies=adapter.tied_copies(cfg), ignored=adapter.ignored,
                    sized_by=_sized_by(cfg, adapter), grown=VOCAB_ROWS)


def language_model_from_hf(folder: str | Path, device: str | torch.device = "cpu", **overrides) -> nn.Module:
    """A LanguageModel built from the folder's config.json (plus overrides) on `device`, filled from its weights."""
    cfg = language_config_from_hf(folder, **overrides)
    model_cfg = ModelConfig(language=cfg)
    with torch.device("meta"):
        lm = part_spec(model_cfg, "language").build(model_cfg)
    lm.to_empty(device=device)
    lm.init_buffers()
    load_language(lm, folder)
    return lm


def whole_params(module: nn.Module, names: dict[str, str], needs: str) -> dict[str, torch.Tensor]:
    """The module's parameters by canonical name, refused (one line starting with `needs`) when they are not
    exactly `names`' keys (a pipeline stage) or hold unmerged LoRA adapters."""
    refuse_adapters(module)
    params = {canonical_name(n): p for n, p in module.named_parameters()}
    if set(params) != set(names):
        odd = [n for n in names if n not in params] or [n for n in params if n not in names]
        raise HFCheckpointError(f"{needs} in this process; it lacks or adds {_few(odd)} (a pipeline stage?): "
                                "export from a layout without pp")
    return params


def export_language(lm: nn.Module, out_dir: str | Path, dtype: Optional[torch.dtype] = None,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES, extras: Optional[Callable[[Path], None]] = None) -> Path:
    """Write a LanguageModel (lm.cfg: model.language) as the Hugging Face folder its kind's *ForCausalLM
    loads: safetensors shards of at most max_shard_bytes (+ the index when several) and config.json.
    dtype: of the written tensors (default: the parameters'). Under tensor parallelism or FSDP every rank
    calls it (each tensor is gathered in turn; the main process writes); a pipeline stage cannot export."""
    cfg = lm.cfg
    adapter = _adapter(cfg, "export it")
    names = adapter.names(cfg)
    params = whole_params(lm, names, "export_language needs the whole language model")
    written = dtype or next(iter(params.values())).dtype
    config = adapter.config_to_hf(cfg, str(written).removeprefix("torch."))
    tensors = _gathered(((theirs, params[ours]) for ours, theirs in names.items()), dtype)
    return write_hf_folder(out_dir, tensors, config, max_shard_bytes, extras)
