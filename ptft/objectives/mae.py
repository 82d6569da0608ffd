"""MAE (He et al. 2022): mask most of a ViT's patches in token space, reconstruct their pixels.

The encoder sees only the kept patches (`model.encoder(x, keep=...)`, models/backbones.py), so a
75% mask makes pretraining about 4x cheaper than a full pass; a small transformer decoder, owned
by the objective (saved under `objective.`, left behind by finetuning), fills the masked
positions with a learned mask token and predicts their pixels. The loss is on masked patches only.
"""

from __future__ import annotations

import torch
from torch import nn

from ptft.objectives import EVAL_CHUNK_SIZE


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C): row-major patches, as a ViT's patch embedding orders them."""
    n, c, h, w = x.shape
    p = patch_size
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # (N, H/p, W/p, p, p, C)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def random_keep(n: int, num_patches: int, keep: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept indices (N, keep), masked (N, L) bool): `keep` patches per image, uniformly without replacement."""
    noise = torch.rand(n, num_patches, generator=generator, device=generator.device)
    kept = noise.argsort(dim=1)[:, :keep]  # (N, keep)
    masked = torch.ones(n, num_patches, dtype=torch.bool, device=kept.device).scatter(1, kept, False)
    return kept, masked


class MAE(nn.Module):
    """Masked patch reconstruction through a ViT encoder and a lightweight decoder.

    Args:
        tokens: the encoder's `patch_tokens` (patch size, number of patches, width D).
        channels: image channels C.
        mask_ratio: fraction of patches hidden from the encoder (at least one is kept).
        decoder_dim, decoder_depth, decoder_heads: the decoder transformer's width, blocks, heads.
        norm_pix_loss: targets are each patch's pixels normalised by their own mean and std (MAE's default).
    """

    needs_labels = False
    reconstructs_inputs = True  # its loss compares outputs with inputs (data.decode_size refuses it)
    uses_only_encoder = True
    # A fresh mask per call: where validation batches start decides which image gets which mask.
    eval_chunk_size = EVAL_CHUNK_SIZE

    def __init__(self, tokens, channels: int, mask_ratio: float, decoder_dim: int, decoder_depth: int,
                 decoder_heads: int, norm_pix_loss: bool):
        super().__init__()
        self.patch_size, self.num_patches = tokens.patch_size, tokens.num_patches
        self.keep = max(1, round(self.num_patches * (1 - mask_ratio)))
        self.norm_pix_loss = norm_pix_loss
        self.embed = nn.Linear(tokens.width, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.position = nn.Parameter(torch.randn(1, self.num_patches, decoder_dim) * 0.02)
        block = nn.TransformerEncoderLayer(decoder_dim, decoder_heads, 4 * decoder_dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.decoder = nn.TransformerEncoder(block, decoder_depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(decoder_dim)
        self.to_pixels = nn.Linear(decoder_dim, self.patch_size ** 2 * channels)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = len(x)
        kept, masked = random_keep(n, self.num_patches, self.keep, generator)
        encoded = model.encoder(x, keep=kept)  # (N, prefix + K, D)
        visible = self.embed(encoded[:, -self.keep:])  # (N, K, d): the class token is not decoded
        slots = self.mask_token.expand(n, self.num_patches, -1)  # (N, L, d)
        slots = slots.scatter(1, kept.unsqueeze(-1).expand(-1, -1, slots.shape[-1]), visible)
        predicted = self.to_pixels(self.norm(self.decoder(slots + self.position)))  # (N, L, p*p*C)
        target = patchify(x, self.patch_size)
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        per_patch = (predicted.float() - target.float()).pow(2).mean(-1)  # (N, L)
        loss = (per_patch * masked).sum() / masked.sum()
        return loss, {}
