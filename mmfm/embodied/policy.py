"""A trained vision-language-action policy for a robot loop, and its closed-loop score on the simulated task
(`mmfm rollout`, docs/embodied.md):

    policy = Policy.from_checkpoint("runs/vla")
    chunk = policy.act(image, "pick up the red circle.", state)   # [horizon, action dims], un-normalized
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from mmfm.errors import ConfigError


class Policy:
    def __init__(self, model, encoder, device: torch.device, flow_steps: int = 0, seed: int = 0):
        """flow_steps > 0: the model's flow head acts (that many Euler steps, noise drawn from `seed`); else its
        action tokens."""
        self.model, self.encoder, self.device = model, encoder, device
        self.tokens = encoder.tokens
        self.dims = len(self.tokens.action.low)
        self.flow_steps = flow_steps
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], device: str = "cpu") -> "Policy":
        """A stage=vla run directory (its latest checkpoint) or one of its step_* folders."""
        from mmfm.checkpoint import find_checkpoint
        from mmfm.checkpoint.run_model import load_run_model
        from mmfm.config.load import load_run_config
        from mmfm.data.build import vla_encoder
        from mmfm.data.tokenizer import TextTokenizer
        from mmfm.embodied.actions import ROBOT_CARD

        run_dir, ckpt = find_checkpoint(Path(path))
        cfg = load_run_config(run_dir / "config.yaml")
        if cfg.stage.objective != "vla":
            raise ConfigError(f"{run_dir} trained stage={cfg.stage.objective}, not a vla policy (stage=vla)")
        card = run_dir / ROBOT_CARD
        if not card.is_file():
            raise ConfigError(f"{run_dir} has no {ROBOT_CARD} (the action statistics a vla run writes); it is not a "
                              "complete vla run directory")
        tokenizer = TextTokenizer.load(run_dir / "tokenizer.json")
        encoder = vla_encoder(cfg, tokenizer, robot=json.loads(card.read_text()))
        model = load_run_model(cfg, ckpt, device).eval()
        flow = cfg.stage.vla.flow_steps if cfg.stage.vla.action == "flow" else 0
        return cls(model, encoder, torch.device(device), flow, cfg.seed)

    @torch.no_grad()
    def act(self, image: np.ndarray, instruction: str, state: Sequence[float]) -> np.ndarray:
        """The next horizon actions [horizon, action dims] for an RGB uint8 image [H, W, 3], the instruction and
        the proprioceptive state: decoded greedily over the action tokens alone (KV-cached), or integrated by the
        flow head from the prompt's hidden state."""
        from mmfm.data.loader import load_image
        from mmfm.embodied.lerobot import png_bytes
        from mmfm.models.generate import generate

        pixels = load_image(png_bytes(image), self.encoder.conversation.processor).unsqueeze(0).to(self.device)
        prompt = self.encoder.prompt(instruction, state)
        if self.flow_steps:
            return self.flow_act(prompt, pixels)
        tokenizer = self.encoder.conversation.tokenizer
        ids = generate(self.model, [prompt], pixels, self.encoder.horizon * self.dims, tokenizer.eos_id,
                       tokenizer.pad_id, stop_early=False,
                       allowed=(self.tokens.first_id, self.tokens.vocab_size))[0]
        return self.tokens.decode_actions(ids)

    def flow_act(self, prompt: list[int], pixels: torch.Tensor) -> np.ndarray:
        from mmfm.embodied.flow import sample_actions

        ids = torch.tensor([prompt], device=self.device)
        hidden = self.model.language(self.model.embed(ids, pixels), final_hidden=True)
        chunk = sample_actions(self.model.action_head, hidden, self.flow_steps, self.generator)[0]
        return self.tokens.action.denormalize(chunk.cpu().numpy()).astype(np.float32)


def rollout(act, seeds: Sequence[int], execute: Optional[int] = None, record: int = 0, named=(0,)) -> dict:
    """Closed loop on the simulated task: `act(image, instruction, state) -> [steps, 3]` is called for each chunk,
    whose first `execute` actions (all when None) run before the next call; each seed's table once per entry of
    `named` (reach.new_scene). Returns the success rate, per-episode outcomes, the seconds per act call (median) and
    the frames of the first `record` episodes."""
    from mmfm.embodied.reach import ReachGraspEnv, episodes_of

    env, outcomes, latencies, films = ReachGraspEnv(), [], [], []
    for n, (seed, k) in enumerate(episodes_of(seeds, named)):
        obs, info = env.reset(seed=seed, options={"named": k})
        frames, ended = [obs["image"]], False
        while not ended:
            start = time.perf_counter()
            chunk = act(obs["image"], info["instruction"], obs["state"])
            latencies.append(time.perf_counter() - start)
            for action in chunk[:execute]:
                obs, _, terminated, truncated, info = env.step(action)
                frames.append(obs["image"])
                ended = terminated or truncated
                if ended:
                    break
        outcomes.append({"seed": seed, "named": k, "instruction": info["instruction"],
                         "success": bool(info["success"]), "steps": info["steps"]})
        if n < record:
            films.append(frames)
    wins = sum(o["success"] for o in outcomes)
    return {"success_rate": wins / len(outcomes), "episodes": len(outcomes), "successes": wins,
            "act_seconds_median": float(np.median(latencies)), "outcomes": outcomes, "films": films}


def save_gif(frames: list[np.ndarray], path: Path, scale: int = 4, fps: int = 5) -> None:
    """An episode for people to look at: each frame enlarged `scale` times, `fps` frames per second."""
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)

