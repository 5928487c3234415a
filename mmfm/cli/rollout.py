"""`mmfm rollout`: a vision-language-action policy (a stage=vla run) in closed loop on the simulated pick-up task:
its success rate over seeded episodes, beside the scripted expert's and a random policy's, and a few episodes as GIFs
(docs/embodied.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmfm.cli.errors import one_line_errors


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmfm rollout", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("checkpoint", help="a stage=vla run directory (its latest checkpoint) or a step_* folder")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--seed", type=int, default=10_000, help="episode seeds are seed, seed + 1, ... (the demonstrations "
                   "of `mmfm data robot-demos` use 0 up: keep these apart)")
    p.add_argument("--execute", type=int, default=None,
                   help="actions of each predicted chunk run before the next prediction (default: all)")
    p.add_argument("--each-object", action="store_true", help="each table once per object, each named in turn (4 "
                   "episodes per seed): a policy that ignores the instruction succeeds in at most a quarter of them")
    p.add_argument("--gifs", type=int, default=3, help="episodes saved as GIF")
    p.add_argument("--out", default=None, help="folder for results.json and the GIFs (default: RUN/rollout)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error("--episodes must be at least 1")
    return args


def run(args: argparse.Namespace) -> dict:
    from mmfm.checkpoint import find_checkpoint
    from mmfm.embodied.policy import Policy, rollout, save_gif
    from mmfm.embodied.reach import EVERY_OBJECT, episodes_of, random_action, success_rate

    run_dir, _ = find_checkpoint(Path(args.checkpoint))
    policy = Policy.from_checkpoint(args.checkpoint, args.device)
    seeds = range(args.seed, args.seed + args.episodes)
    named = EVERY_OBJECT if args.each_object else (0,)
    result = rollout(policy.act, seeds, args.execute, record=args.gifs, named=named)
    out = Path(args.out) if args.out else run_dir / "rollout"
    out.mkdir(parents=True, exist_ok=True)
    for frames, (seed, k) in zip(result.pop("films"), episodes_of(seeds, named)):
        save_gif(frames, out / (f"episode_{seed}_{k}.gif" if args.each_object else f"episode_{seed}.gif"))
    result["random_policy_success_rate"] = success_rate(random_action, seeds, named=named)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return {**result, "out": str(out)}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with one_line_errors("mmfm rollout"):
        r = run(args)
    print(f"success {r['successes']}/{r['episodes']} ({r['success_rate']:.1%}); random policy "
          f"{r['random_policy_success_rate']:.1%}; {r['act_seconds_median'] * 1000:.0f} ms per chunk (median); "
          f"{r['out']}")
    return 0
