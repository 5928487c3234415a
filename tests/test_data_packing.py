"""Sequence packing (mmfm.data.packing): the packed layout, greedy filling over a real stream, exact resume,
and that a packed batch through the model gives the losses and logits of its samples run alone."""

import itertools

import pytest
import torch

from mmfm.data.build import load_tokenizer, sample_encoder
from mmfm.data.loader import IGNORE_INDEX, EncodedSample, SampleStream
from mmfm.data.manifest import shard_paths
from mmfm.data.packing import PackedBatchLoader, pack
from mmfm.models import build_model
from mmfm.models.init import init_parameters

I = IGNORE_INDEX
PAD = 99


def _sample(key, ids, targets, image=None):
    images = [] if image is None else [torch.full((3, 8, 8), float(image))]
    return EncodedSample(key, ids, targets, images, f"caption {key}")


# a, b, c, e carry one image each (filled with 0., 1., 2., 3.); d and f are text-only
A = _sample("a", [1, 3, 5, 2], [I, 5, 2, I], image=0)
B = _sample("b", [1, 3, 2], [I, 2, I], image=1)
C = _sample("c", [1, 3, 7, 8, 2], [I, 7, 8, 2, I], image=2)
D = _sample("d", [1, 9, 2], [9, 2, I])
E = _sample("e", [1, 3, 4, 2], [I, 4, 2, I], image=3)
F = _sample("f", [1, 6, 2], [6, 2, I])


def test_pack_layout():
    batch = pack([[A, B], [C, D], [E], [F]], seq_len=8, pad_id=PAD)
    assert batch.input_ids.tolist() == [[1, 3, 5, 2, 1, 3, 2, PAD],
                                        [1, 3, 7, 8, 2, 1, 9, 2],
                                        [1, 3, 4, 2, PAD, PAD, PAD, PAD],
                                        [1, 6, 2, PAD, PAD, PAD, PAD, PAD]]
    assert batch.targets.tolist() == [[I, 5, 2, I, I, 2, I, I],
                                      [I, 7, 8, 2, I, 9, 2, I],
                                      [I, 4, 2, I, I, I, I, I],
                                      [6, 2, I, I, I, I, I, I]]
    assert batch.document_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, -1],
                                           [0, 0, 0, 0, 0, 1, 1, 1],
                                           [0, 0, 0, 0, -1, -1, -1, -1],
                                           [0, 0, 0, -1, -1, -1, -1, -1]]
    assert batch.positions.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0],
                                        [0, 1, 2, 3, 4, 0, 1, 2],
                                        [0, 1, 2, 3, 0, 0, 0, 0],
                                        [0, 1, 2, 0, 0, 0, 0, 0]]
    assert batch.images_per_sample == [2, 1, 1, 0]  # per row
    assert batch.pixel_values.shape == (4, 3, 8, 8)
    assert batch.pixel_values[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]  # reading order
    assert batch.keys == ["a", "b", "c", "d", "e", "f"]
    assert batch.captions == [f"caption {k}" for k in "abcdef"]
    assert batch.num_loss_tokens == 12
    # no target crosses a boundary: the last position of every document carries no loss
    docs = batch.document_ids
    last = (docs >= 0) & (docs != torch.nn.functional.pad(docs[:, 1:], (0, 1), value=-1))
    assert int(last.sum()) == 6 and (batch.targets[last] == I).all()


def test_pack_text_only_and_errors():
    batch = pack([[D, F]], seq_len=6, pad_id=PAD)
    assert batch.pixel_values is None and batch.images_per_sample == [0]
    assert batch.input_ids.tolist() == [[1, 9, 2, 1, 6, 2]]
    with pytest.raises(ValueError, match=r"row of 9 tokens \(\['a', 'c'\]\) does not fit in seq_len=8"):
        pack([[A, C]], seq_len=8, pad_id=PAD)
    with pytest.raises(ValueError, match="last target must be IGNORE_INDEX"):
        pack([[_sample("x", [1, 5, 2], [5, 2, 7])]], seq_len=8, pad_id=PAD)


def test_loader_packs_greedily_and_ends_with_a_partial_batch():
    loader = PackedBatchLoader(iter([A, B, C, D, E, F, A]), rows=2, seq_len=8, pad_id=PAD)
    first = next(loader)
    assert first.keys == ["a", "b", "c", "d"] and first.input_ids.shape == (2, 8)
    assert loader.tokens_per_row == [7, 8] and loader.fill == pytest.approx(15 / 16)
    second = next(loader)  # e + f fill row 0 (7 tokens), a opens row 1: the stream ends
    assert second.keys == ["e", "f", "a"] and second.document_ids[:, :5].tolist() == [[0, 0, 0, 0, 1],
                                                                                     [0, 0, 0, 0, -1]]
    assert second.images_per_sample == [1, 1] and second.pixel_values[:, 0, 0, 0].tolist() == [3.0, 0.0]
    with pytest.raises(StopIteration):
        next(loader)
    partial = list(PackedBatchLoader(iter([A, B, C]), rows=4, seq_len=8, pad_id=PAD))
    assert [b.keys for b in partial] == [["a", "b", "c"]] and partial[0].input_ids.shape == (2, 8)
    with pytest.raises(ValueError, match="sample c has 5 tokens > seq_len=4"):
        next(PackedBatchLoader(iter([C]), rows=2, seq_len=4, pad_id=PAD))


# ---- over the synthetic data set (samples of 27-36 tokens; data.seq_len=48, so pack twice that) ----

ROWS, SEQ = 4, 96


def _stream(cfg, split="train", **kwargs):
    """A SampleStream as mmfm.data.build.train_loader makes it."""
    tok = load_tokenizer(cfg)
    return SampleStream(shard_paths(cfg.data.path, split), sample_encoder(cfg, tok), cfg.seed,
                        cfg.data.shuffle_buffer, **kwargs), tok.pad_id


def _loader(cfg, split="train", **kwargs):
    stream, pad_id = _stream(cfg, split, **kwargs)
    return PackedBatchLoader(stream, ROWS, SEQ, pad_id)


def test_loader_over_a_real_stream_serves_every_sample_once_in_order(make_cfg):
    cfg = make_cfg()
    loader = _loader(cfg)
    batches, fills = [], []
    for batch in itertools.islice(loader, 8):
        batches.append(batch)
        fills.append(loader.fill)
    plain, _ = _stream(cfg)
    samples = list(itertools.islice(plain, sum(len(b.keys) for b in batches) + 1))
    assert [k for b in batches for k in b.keys] == [s.key for s in samples[:-1]]
    i = 0
    for batch, fill in zip(batches, fills):
        assert batch.input_ids.shape == batch.targets.shape == batch.document_ids.shape == (ROWS, SEQ)
        assert fill == pytest.approx(float((batch.document_ids >= 0).float().mean())) and fill > 0.5
        images, per_row = [], []
        for r in range(ROWS):
            start = 0
            for d in range(int(batch.document_ids[r].max()) + 1):
                s, n = samples[i], len(samples[i].input_ids)
                span = slice(start, start + n)
                assert (batch.document_ids[r, span] == d).all()  # whole sample in one row, contiguous
                assert batch.input_ids[r, span].tolist() == s.input_ids
                assert batch.targets[r, span].tolist() == s.targets and s.targets[-1] == I
                assert batch.positions[r, span].tolist() == list(range(n))
                images += s.images
                start, i = start + n, i + 1
            assert (batch.document_ids[r, start:] == -1).all() and (batch.targets[r, start:] == I).all()
            per_row.append(len(images) - sum(per_row))
            # greedy: the next sample did not fit in this row
            assert start + len(samples[i].input_ids) > SEQ
        assert batch.images_per_sample == per_row
        assert torch.equal(batch.pixel_values, torch.stack(images))
    assert i == len(samples) - 1


def _assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys == b.keys and a.captions == b.captions and a.images_per_sample == b.images_per_sample
        for name in ("input_ids", "targets", "pixel_values", "document_ids", "positions"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("split, k, m", [("train", 3, 4), ("val", None, 3)], ids=["train", "val_epoch_boundary"])
def test_resume_continues_exactly(make_cfg, split, k, m):
    cfg = make_cfg()
    whole = _loader(cfg, split)
    batches, states = [], []
    for batch in itertools.islice(whole, 40 if k is None else k + m):
        batches.append(batch)
        states.append(whole.state_dict())
    if k is None:  # resume at the last batch of epoch 0 of the 300 val samples
        k = max(j for j, s in enumerate(states) if s["epoch"] == 0) + 1
        assert states[k + m - 1]["epoch"] == 1
    state = states[k - 1]
    after = states[k]  # a pending sample is held back: the state is from before it
    assert (state["epoch"], state["position"]) < (after["epoch"], after["position"])
    resumed = _loader(cfg, split)
    resumed.load_state_dict(state)
    _assert_same_batches(list(itertools.islice(resumed, m)), batches[k:k + m])
    assert resumed.state_dict() == states[k + m - 1]


def test_finite_stream_ends_with_a_partial_batch(make_cfg):
    loader = _loader(make_cfg(), "val", shuffle=False, loop=False)
    batches = list(loader)
    keys = [k for b in batches for k in b.keys]
    plain, _ = _stream(make_cfg(), "val", shuffle=False, loop=False)
    assert keys == [s.key for s in plain] and len(set(keys)) == len(keys) == 300
    assert batches[-1].input_ids.shape[0] <= ROWS
    assert all(b.input_ids.shape == (ROWS, SEQ) for b in batches[:-1])


# ---- through the model ----

def _model(cfg):
    model = build_model(cfg.model, "meta")
    model.to_empty(device="cpu")
    init_parameters(model, 0)
    return model.eval()


def _alone(s):
    ids = torch.tensor([s.input_ids])
    return ids, (torch.stack(s.images) if s.images else None), torch.tensor([s.targets])


def test_packed_batch_through_the_model_equals_samples_alone(make_cfg):
    cfg = make_cfg("model.language.max_seq_len=128")  # room for rows of SEQ=96 (positions stay < 36)
    model = _model(cfg)
    stream, pad_id = _stream(cfg, "val", shuffle=False, loop=False)
    samples = list(itertools.islice(stream, 12))
    batch = next(PackedBatchLoader(iter(samples), rows=2, seq_len=SEQ, pad_id=pad_id))
    used = samples[:len(batch.keys)]
    assert batch.keys == [s.key for s in used] and len(used) >= 5 and batch.pixel_values.shape[0] == len(used)
    kwargs = dict(positions=batch.positions, document_ids=batch.document_ids)
    with torch.no_grad():
        loss = model(batch.input_ids, batch.pixel_values, targets=batch.targets, **kwargs)
        logits = model(batch.input_ids, batch.pixel_values, **kwargs)
        alone = sum(model(*_alone(s)[:2], targets=_alone(s)[2]) for s in used)
        torch.testing.assert_close(loss, alone, rtol=1e-5, atol=0)
        i = 0
        for r in range(2):
            start = 0
            for _ in range(int(batch.document_ids[r].max()) + 1):
                s = used[i]
                ids, pixels, _ = _alone(s)
                torch.testing.assert_close(logits[r, start:start + len(s.input_ids)], model(ids, pixels)[0],
                                           rtol=0, atol=1e-5)
                start, i = start + len(s.input_ids), i + 1
        assert i == len(used)
    # the check can fail: attending across documents (no document_ids) moves later documents' logits
    with torch.no_grad():
        mixed = model(batch.input_ids, batch.pixel_values, positions=batch.positions)
    assert (mixed - logits).abs().max() > 1e-2
