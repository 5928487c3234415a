"""The vision-language model: a vision tower, a projector and a language model, each chosen by kind
(model.vision.kind, model.projector.kind, model.language.kind); projected image features are spliced into
the token sequence at placeholder tokens."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mmfm.config.schema import ModelConfig
from mmfm.models.spec import part_spec


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = part_spec(cfg, "vision").build(cfg)
        self.projector = part_spec(cfg, "projector").build(cfg)
        self.language = part_spec(cfg, "language").build(cfg)
        head = cfg.action_head
        if head.kind == "flow":  # stage.vla.action=flow (mmfm.embodied.flow)
            from mmfm.embodied.flow import FlowActionHead

            self.action_head = FlowActionHead(cfg.language.hidden_size, head.horizon, head.dims, head.width,
                                              head.layers)

    @property
    def tokens_per_image(self) -> int:
        return self.vision.num_patches

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """Initialize the full tensor of parameter `name` (e.g. 'language.layers.0.attention.wq.weight')."""
        part, rest = name.split(".", 1)
        getattr(self, part).init_parameter(rest, tensor, generator, self.cfg.init_std)

    def init_buffers(self) -> None:
        self.language.init_buffers()

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, tokens_per_image, language hidden]."""
        return self.projector(self.vision(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor]) -> torch.Tensor:
        """Token embeddings with the i-th image's features at the i-th run of placeholder tokens.

        Images are consumed in reading order over the batch (sample by sample, left to right), so a
        sample may hold any number of images, including none. pixel_values is [N, C, H, W] in that
        order, or [B, K, C, H, W] per sample, padded to K images (the form that splits into micro-batches
        along the batch dim): a sample's images are then the first (its placeholders / tokens per image).
        """
        h = self.language.embed(input_ids)
        slots = input_ids == self.cfg.image_token_id
        if pixel_values is not None and pixel_values.dim() == 5:
            counts = slots.sum(1) // self.tokens_per_image
            present = torch.arange(pixel_values.shape[1], device=counts.device) < counts.unsqueeze(1)
            pixel_values = pixel_values[present]
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        expected = num_images * self.tokens_per_image
        if int(slots.sum()) != expected:
            raise ValueError(f"batch has {int(slots.sum())} image placeholder tokens but {num_images} images "
                             f"x {self.tokens_per_image} tokens per image = {expected}")
        if num_images == 0:
            # Run the vision tower anyway (on a blank image, contributing exactly zero) so that every
            # rank executes the same modules and collectives whatever its batch holds.
            v = self.cfg.vision
            blank = torch.zeros(1, v.num_channels, v.image_size, v.image_size, device=h.device, dtype=h.dtype)
            return h + 0.0 * self.image_features(blank).sum()
        feats = self.image_features(pixel_values.to(h.dtype)).reshape(-1, h.shape[-1])
        return h.masked_scatter(slots.unsqueeze(-1), feats.to(h.dtype))

    def forward(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                cache=None, document_ids: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None, actions: Optional[tuple] = None) -> torch.Tensor:
        """Logits [B, T, V], or with targets the summed next-token loss (see LanguageModel.forward).
        positions default to 0..T-1 for every row; document_ids [B, T] separates packed documents.
        actions (noisy chunks [B, H, D], times [B], each row's last prompt position [B]): the action head's
        velocities [B, H, D] instead, attending to each row's prompt (mmfm.embodied.flow).

        A later pipeline stage holds no vision tower: its input is the previous stage's hidden states.
        """
        h = self.embed(input_ids, pixel_values) if self.vision is not None else input_ids
        if actions is None:
            return self.language(h, positions, attn_mask, cache, document_ids, targets)
        noisy, times, last = actions
        hidden = self.language(h, positions, attn_mask, cache, document_ids, final_hidden=True)
        return self.action_head(noisy, times, hidden, last)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        return self.language.new_cache(batch, max_len, dtype, device)
