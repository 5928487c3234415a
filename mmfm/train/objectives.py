"""What each stage optimizes, for the one training loop.

An objective turns a micro-batch into a summed loss plus summed statistics, and says how many units (tokens,
pairs, sequences) that sum is over, so the loop can average over every unit of an optimizer step whatever the
micro-batching and data parallelism:

    pretrain, sft  summed next-token cross-entropy over the tokens that carry loss (captions / assistant turns)
    dpo            a preference loss (DPO, cDPO, IPO, SimPO, ORPO) summed over answer pairs
    grpo           answers sampled per prompt with the KV-cache generator, scored by a rule-based reward;
                   the clipped GRPO objective with a KL penalty, summed over the sampled sequences
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from mmfm.config.schema import StageConfig
from mmfm.data.loader import IGNORE_INDEX, Batch, EncodedSample, collate
from mmfm.train.alignment_losses import (group_advantages, grpo_loss, preference_loss, sequence_logprobs,
                                         token_logprobs)
from mmfm.train.rewards import reward_function

Logits = Callable[[Batch], torch.Tensor]  # a model's logits [B, T, V] for a batch


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over positions whose target is not IGNORE_INDEX (computed in fp32)."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


class TokenObjective:
    """Next-token loss on the tokens that carry it (pretrain: captions; sft: assistant turns)."""
    needs_reference = False
    validates = True

    def units(self, batch: Batch) -> int:
        return batch.num_loss_tokens

    def prepare(self, trainer, micro: list[Batch]) -> list[Batch]:
        return micro

    def __call__(self, policy: Logits, batch: Batch, reference: Optional[Logits]) -> tuple[torch.Tensor, dict]:
        return next_token_loss(policy(batch), batch.targets)[0], {}


def soft_bin_targets(targets: torch.Tensor, vocab: int, bins: int, sigma: float) -> torch.Tensor:
    """[N, bins] Gaussian weights (std sigma bins) around each target bin, summing to 1 (HL-Gauss's discretized
    Gaussian: the bins' ordering made part of the loss)."""
    centres = (targets - (vocab - bins)).to(torch.float32)[:, None]
    grid = torch.arange(bins, device=targets.device, dtype=torch.float32)[None, :]
    weights = torch.exp(-0.5 * ((grid - centres) / sigma) ** 2)
    return weights / weights.sum(dim=1, keepdim=True)


class ActionObjective(TokenObjective):
    """stage=vla: the next-token loss, with label_sigma > 0 the action tokens' targets spread over neighbouring bins
    (a Gaussian of that std in bins), so an answer one bin off costs less than one far off."""

    def __init__(self, bins: int, label_sigma: float):
        self.bins, self.sigma = bins, label_sigma

    def __call__(self, policy: Logits, batch: Batch, reference: Optional[Logits]) -> tuple[torch.Tensor, dict]:
        if self.sigma <= 0:
            return super().__call__(policy, batch, reference)
        logits, targets = policy(batch).flatten(0, 1).float(), batch.targets.flatten()
        vocab = logits.shape[-1]
        is_action = targets >= vocab - self.bins
        hard = F.cross_entropy(logits[~is_action], targets[~is_action], ignore_index=IGNORE_INDEX, reduction="sum")
        logp = F.log_softmax(logits[is_action], dim=-1)[:, vocab - self.bins:]
        soft = -(soft_bin_targets(targets[is_action], vocab, self.bins, self.sigma) * logp).sum()
        return hard + soft, {}


class FlowObjective:
    """stage=vla with stage.vla.action=flow: the action head's flow-matching loss (mmfm.embodied.flow), summed over
    the chunks' numbers that carry it; each sample's noise and time drawn from (seed, step, its key)."""
    needs_reference = False
    validates = True
    VALIDATION_STEP = -1  # validation draws the same noise at every step

    def units(self, batch: Batch) -> int:
        x = batch.extras
        return int(x["action_mask"].sum()) * x["actions"].shape[-1]

    def prepare(self, trainer, micro: list[Batch]) -> list[Batch]:
        for batch in micro:
            self.draw(batch, trainer.cfg.seed, trainer.step)
        return micro

    @staticmethod
    def draw(batch: Batch, seed: int, step: int) -> None:
        from mmfm.embodied.flow import flow_draws

        _, horizon, dims = batch.extras["actions"].shape
        noise, times = flow_draws(batch.keys, seed, step, horizon, dims)
        device = batch.extras["actions"].device
        batch.extras.update(flow_noise=noise.to(device), flow_time=times.to(device))

    def __call__(self, policy: Logits, batch: Batch, reference: Optional[Logits]) -> tuple[torch.Tensor, dict]:
        from mmfm.embodied.flow import flow_loss, interpolate

        if "flow_noise" not in batch.extras:
            self.draw(batch, 0, self.VALIDATION_STEP)
        x = batch.extras
        noisy = interpolate(x["actions"], x["flow_noise"], x["flow_time"])
        last = torch.tensor(batch.prompt_lengths, device=noisy.device) - 1
        velocity = policy(batch, actions=(noisy, x["flow_time"], last))
        return flow_loss(velocity, x["actions"], x["flow_noise"], x["action_mask"]), {}


class PreferenceObjective:
    """A preference loss over pairs (rows: chosen answers, then rejected ones); reference log-probs from the
    frozen reference model or precomputed with the data."""
    validates = True

    def __init__(self, stage: StageConfig):
        self.cfg = stage.preference
        self.needs_reference = self.cfg.loss in ("dpo", "cdpo", "ipo") and self.cfg.reference == "model"

    def units(self, batch: Batch) -> int:
        return batch.pairs

    def prepare(self, trainer, micro: list[Batch]) -> list[Batch]:
        return micro

    def reference_logps(self, batch: Batch, reference: Optional[Logits]) -> tuple[torch.Tensor, torch.Tensor]:
        p = batch.pairs
        if "reference_logps" in batch.extras:
            ref = batch.extras["reference_logps"]
            return ref[:, 0], ref[:, 1]
        if reference is None:
            raise ValueError("stage.preference.reference=precomputed but the batch has no reference_logps; build "
                             "the data with `mmfm data reference-logps` or use stage.preference.reference=model")
        with torch.no_grad():
            logps, _ = sequence_logprobs(reference(batch), batch.targets)
        return logps[:p], logps[p:]

    def loss_arguments(self, logps: torch.Tensor, lengths: torch.Tensor, batch: Batch,
                       reference: Optional[Logits]) -> dict:
        p, c = batch.pairs, self.cfg
        chosen, rejected = logps[:p], logps[p:]
        lc, lr = lengths[:p], lengths[p:]
        if c.loss in ("simpo", "orpo"):
            args = dict(policy_chosen=chosen, policy_rejected=rejected, chosen_len=lc, rejected_len=lr)
            if c.loss == "simpo":
                return {**args, "beta": c.beta, "gamma": c.gamma}
            return {**args, "nll_chosen": -chosen / lc.clamp(min=1), "lam": c.orpo_lambda}
        ref_chosen, ref_rejected = self.reference_logps(batch, reference)
        args = dict(policy_chosen=chosen, policy_rejected=rejected, ref_chosen=ref_chosen.to(chosen.dtype),
                    ref_rejected=ref_rejected.to(chosen.dtype), beta=c.beta)
        if c.loss == "cdpo":
            return {**args, "label_smoothing": c.label_smoothing}
        if c.loss == "ipo" and c.ipo_length_normalized:
            return {**args, "chosen_len": lc, "rejected_len": lr}
        return args

    def __call__(self, policy: Logits, batch: Batch, reference: Optional[Logits]) -> tuple[torch.Tensor, dict]:
        logps, lengths = sequence_logprobs(policy(batch), batch.targets)
        out = preference_loss(self.cfg.loss, **self.loss_arguments(logps, lengths, batch, reference))
        c, r = out.chosen_rewards, out.rejected_rewards
        p = batch.pairs
        stats = {"reward_chosen": c.sum(), "reward_rejected": r.sum(), "reward_margin": (c - r).sum(),
                 # implicit-reward accuracy (TRL's rewards/accuracies), and how often the policy itself ranks the
                 # chosen answer above the rejected one (per-token log-probs, so lengths do not decide)
                 "reward_accuracy": (c > r).sum().float(),
                 "preference_accuracy": (logps[:p] / lengths[:p] > logps[p:] / lengths[p:]).sum().float()}
        return out.loss * batch.pairs, stats


class GrpoObjective:
    """GRPO: each prompt's group of sampled answers, their rewards and group-normalized advantages (prepare),
    then the clipped objective with a KL penalty to the reference model.

    One policy update per rollout: the sampling policy is the current one, so the ratio is 1 in value and its
    gradient is the policy gradient; clipping engages when a rollout is reused for more updates.
    """
    validates = False  # no held-out loss without sampling: the final evaluation measures answer accuracy

    def __init__(self, stage: StageConfig):
        self.cfg = stage.grpo
        self.needs_reference = self.cfg.kl_coef > 0
        self.reward = reward_function(self.cfg.reward)

    def units(self, batch: Batch) -> int:
        return int(((batch.targets != IGNORE_INDEX).sum(1) > 0).sum())

    def prepare(self, trainer, micro: list[Batch]) -> list[Batch]:
        return [self.rollout(trainer, batch) for batch in micro]

    @torch.no_grad()
    def rollout(self, trainer, prompts: Batch) -> Batch:
        """The batch's prompts, each answered group_size times by the current policy, as training rows."""
        g, tok = self.cfg.group_size, trainer.tokenizer
        samples = prompt_samples(prompts)
        answers = trainer.sample_answers([s for s in samples for _ in range(g)], self.cfg)
        rows, rewards = [], []
        for i, completion in enumerate(answers):
            prompt = samples[i // g]
            finished = len(completion) < self.cfg.max_new_tokens  # generation stopped at <eos>
            answer = completion + ([tok.eos_id] if finished else [])
            ids = prompt.input_ids + answer
            targets = [IGNORE_INDEX] * (len(prompt.input_ids) - 1) + answer + [IGNORE_INDEX]
            rows.append(EncodedSample(prompt.key, ids, targets, prompt.images, prompt.caption, len(prompt.input_ids)))
            rewards.append(self.reward(tok.decode(completion), prompt.caption))
        batch = trainer.fit_batch(collate(rows, tok.pad_id).to(trainer.device))
        r = torch.tensor(rewards, dtype=torch.float32, device=trainer.device)
        batch.extras.update(rewards=r, advantages=group_advantages(r, g),
                            completion_tokens=(batch.targets != IGNORE_INDEX).sum(1).float())
        return batch

    def __call__(self, policy: Logits, batch: Batch, reference: Optional[Logits]) -> tuple[torch.Tensor, dict]:
        logp = token_logprobs(policy(batch), batch.targets)
        if self.needs_reference:
            with torch.no_grad():
                ref = token_logprobs(reference(batch), batch.targets)
        else:
            ref = logp.detach()
        mask = batch.targets != IGNORE_INDEX
        out = grpo_loss(logp, logp.detach(), ref, batch.extras["advantages"], mask, self.cfg.clip_eps,
                        self.cfg.kl_coef)
        n = out.n_sequences
        x = batch.extras
        stats = {"reward": x["rewards"].sum(), "kl": out.kl * n, "clip_fraction": out.clip_fraction * n,
                 "completion_tokens": x["completion_tokens"].sum()}
        return out.loss * n, stats


def prompt_samples(batch: Batch) -> list[EncodedSample]:
    """A prompt batch (stage grpo: one prompt per row, reference answer as caption) back as samples."""
    images = list(batch.pixel_values) if batch.pixel_values is not None else []
    samples, start = [], 0
    for row, (n_images, length) in enumerate(zip(batch.images_per_sample, batch.prompt_lengths)):
        ids = batch.input_ids[row, :length].tolist()
        samples.append(EncodedSample(batch.keys[row], ids, [IGNORE_INDEX] * length,
                                     [img.cpu() for img in images[start: start + n_images]],
                                     batch.captions[row], length))
        start += n_images
    return samples


OBJECTIVES = ("pretrain", "sft", "dpo", "grpo", "vla")


def build_objective(stage: StageConfig):
    if stage.objective == "dpo":
        return PreferenceObjective(stage)
    if stage.objective == "grpo":
        return GrpoObjective(stage)
    if stage.objective == "vla" and stage.vla.action == "flow":
        return FlowObjective()
    if stage.objective == "vla":
        return ActionObjective(stage.vla.bins, stage.vla.label_sigma)
    return TokenObjective()
