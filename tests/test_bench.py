"""`mmfm bench parallel`: TP + sequence-parallel bytes measured around Trainer.train_step against the
analytic count, and pipeline idle fractions on sleeping stages against the textbook bubble."""

import pytest

from mmfm.parallel.bench import comm_bench, pipeline_bench


def test_tp2_step_bytes_match_analytic():
    results = comm_bench("tp2", steps=1)  # 2 ranks, small model, 2 micro-batches of 4 samples
    assert len(results) == 2
    for rank in results:
        (step,) = rank
        got, want = step["measured"], step["analytic"]
        assert set(got) == set(want) == {"all_gather", "reduce_scatter", "all_reduce"}
        for kind in want:
            assert 0.99 <= got[kind] / want[kind] <= 1.01, (kind, got[kind], want[kind])
        assert got == want  # in fact exact, byte for byte
        assert got["all_gather"] > 100_000  # real activation traffic, not an empty count


def test_pipeline_idle_fraction_matches_bubble():
    rows = pipeline_bench(pp=2, microbatches=[4], schedules=["gpipe", "1f1b"], t_f=0.05, steps=3)
    assert [r["schedule"] for r in rows] == ["gpipe", "1f1b"]
    for row in rows:
        assert row["analytic"] == pytest.approx(0.2)  # (p - 1) / (m + p - 1)
        assert row["idle"] == pytest.approx(0.2, abs=0.07), row
