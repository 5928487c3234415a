"""`mmfm bench data`: loader samples/s against the raw tar-read ceiling and against training consumption."""

import re

from mmfm.cli.bench import main as bench_main
from mmfm.parallel.bench import SMALL_MODEL


def test_data_bench_prints_rates_and_ratios(synth_dir, capsys):
    assert bench_main(["data", "--data", str(synth_dir), "--samples", "300", "--steps", "2", *SMALL_MODEL,
                       "data.pack=true", "model.language.max_seq_len=128", "data.seq_len=96", "--workers", "0", "2"]) == 0
    out = capsys.readouterr().out
    rates = dict(re.findall(r"^(.+?)\s+([\d.]+) samples/s$", out, flags=re.M))
    assert set(rates) == {"raw tar read (ceiling)", "decode+resize+tokenize+pack, in the training process",
                          "decode+resize+tokenize+pack, 2 workers", "training consumes (demo model, fp32)"}
    assert all(float(r) > 0 for r in rates.values())
    # decoding, resizing and tokenizing cost more than reading the tar
    assert float(rates["raw tar read (ceiling)"]) > float(rates["decode+resize+tokenize+pack, in the training process"])
    assert len(re.findall(r"^loader / training, .+: [\d.]+x$", out, flags=re.M)) == 2
