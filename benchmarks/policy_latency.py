"""Latency of one `Policy.act` call (mmfm.embodied.policy): the prompt's forward with the image, then horizon x action
dims tokens decoded with the KV cache, restricted to the action tokens (or, with stage.vla.action=flow, the flow
head's Euler steps). What a robot loop waits for per chunk.

    python benchmarks/policy_latency.py RUN [--calls 50] [--device cpu|cuda] [--threads N]

RUN: a stage=vla run directory (e.g. experiment=demo_vla's). Prints the median, 10th and 90th percentile seconds per
call over --calls calls on frames of the simulated task (the first 5 calls are warm-up, not counted), and the chunk
length, so the ms per action.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, also without pip install
from mmfm.embodied.policy import Policy  # noqa: E402
from mmfm.embodied.reach import ReachGraspEnv  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = Policy.from_checkpoint(args.run, args.device)
    env, times = ReachGraspEnv(), []
    for call in range(args.calls + 5):
        obs, info = env.reset(seed=20_000 + call)
        start = time.perf_counter()
        chunk = policy.act(obs["image"], info["instruction"], obs["state"])
        if args.device == "cuda":
            torch.cuda.synchronize()
        if call >= 5:
            times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=10)
    print(json.dumps({"device": args.device, "threads": torch.get_num_threads(), "calls": len(times),
                      "median_s": statistics.median(times), "p10_s": q[0], "p90_s": q[-1],
                      "actions_per_call": len(chunk),
                      "median_ms_per_action": 1000 * statistics.median(times) / len(chunk)}, indent=2))


if __name__ == "__main__":
    main()
