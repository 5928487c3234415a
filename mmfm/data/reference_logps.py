"""`mmfm data reference-logps`: a copy of a preference data set in which every pair carries the reference model's
summed log-probs of its two answers ("reference_logps": [chosen, rejected]), for
stage.preference.reference=precomputed: DPO, cDPO and IPO then train without a second model in memory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import torch
import webdataset as wds

from mmfm.data import manifest as mf
from mmfm.data.loader import SkipSample, collate


def _raw_samples(shard: Path) -> Iterator[dict]:
    yield from wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples())


def _members(raw: dict) -> dict:
    """The tar members of a raw sample (webdataset adds __url__ and the like when reading)."""
    return {k: v for k, v in raw.items() if k == "__key__" or not k.startswith("__")}


@torch.no_grad()
def _pair_logps(model, encoded: list, pad_id: int, device) -> list[tuple[float, float]]:
    from mmfm.train.alignment_losses import sequence_logprobs

    batch = collate(encoded, pad_id).to(device)
    logps, _ = sequence_logprobs(model(batch.input_ids, batch.pixel_values), batch.targets)
    p = batch.pairs
    return list(zip(logps[:p].tolist(), logps[p:].tolist()))


def _with_logps(chunk: list[dict], encoder, model, pad_id: int, device) -> list[dict]:
    """The chunk's samples, each usable pair's JSON given its reference_logps (unusable ones unchanged: training
    skips and counts them as it would have)."""
    out, usable, encoded = [], [], []
    for raw in chunk:
        out.append(_members(raw))
        try:
            encoded.append(encoder(raw))
            usable.append(out[-1])
        except SkipSample:
            pass
    for members, logps in zip(usable, _pair_logps(model, encoded, pad_id, device) if encoded else []):
        meta = json.loads(members["json"])
        meta["reference_logps"] = list(logps)
        members["json"] = json.dumps(meta, sort_keys=True).encode()
    return out


def write_reference_logps(data: str | Path, checkpoint: str | Path, out: str | Path, batch_size: int = 32,
                          device: str = "auto", progress: bool = True) -> dict:
    """Copy the preference data set `data` to `out` with reference log-probs from `checkpoint` (a run directory
    or a step_* folder: the model of the stage the policy starts from). Same shards, samples and order."""
    from tqdm import tqdm

    from mmfm.checkpoint import find_checkpoint
    from mmfm.checkpoint.run_model import load_run_model
    from mmfm.config.load import load_run_config
    from mmfm.data.build import load_tokenizer, sample_encoder
    from mmfm.train.trainer import pick_device

    data, out = Path(data), Path(out)
    if out.resolve() == data.resolve():
        raise mf.DataError(f"--out {out} is the input data set; write the copy to another folder")
    run_dir, ckpt = find_checkpoint(Path(checkpoint))
    cfg = load_run_config(run_dir / "config.yaml")
    cfg.data.path, cfg.stage.objective = str(data), "dpo"
    tokenizer = load_tokenizer(cfg)  # checks the data set and that its vocabulary fits the model
    encoder, dev = sample_encoder(cfg, tokenizer), pick_device(device)
    model = load_run_model(cfg, ckpt, dev, no_dist=True)
    model.eval()
    manifest = mf.read_manifest(data)
    out.mkdir(parents=True, exist_ok=True)
    for split, info in manifest["splits"].items():
        checksums = mf.ShardChecksums.of(data, split)
        for i, shard in enumerate(info["shards"]):
            checksums.check(str(data / shard["file"]))
            raws = list(_raw_samples(data / shard["file"]))
            chunks = range(0, len(raws), batch_size)
            samples = [s for start in tqdm(chunks, desc=f"{split} shard {i}", disable=not progress)
                       for s in _with_logps(raws[start: start + batch_size], encoder, model, tokenizer.pad_id, dev)]
            info["shards"][i] = mf.write_shard(samples, out / shard["file"])
    shutil.copyfile(data / mf.TOKENIZER, out / mf.TOKENIZER)
    manifest["reference_logps"] = {"checkpoint": str(ckpt.resolve()), "from": str(data.resolve())}
    mf.write_json_atomic(out / mf.MANIFEST, manifest)
    return manifest
