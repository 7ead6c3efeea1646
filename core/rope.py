"""Rotary position embedding tables, and moving cached keys between positions.

The cache keeps keys position-free (RoPE removed) so that a key can be placed at any slot position, and
so that tiers can merge keys from different positions. The tables come from the model's own rotary module,
so rope scaling variants (linear, llama3, yarn, ...) and partial rotary dims match the model exactly.
"""

from __future__ import annotations

import torch
from torch import nn

# Rope types whose frequencies do not depend on the sequence length seen so far. "dynamic" only changes
# past the trained context, which the cache never reaches; "longrope" switches factors past its original
# context, so it is allowed only when all positions stay below that (checked in model_loading).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The half-split rotation Hugging Face rotary models use: [x1, x2] -> [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RopeTable:
    """cos/sin for positions ``0..max_positions-1``, shape [max_positions, rotary_dim]."""

    def __init__(self, rotary_emb: nn.Module, max_positions: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        positions = torch.arange(max_positions, device=device)[None]
        probe = torch.zeros(1, dtype=dtype, device=device)
        with torch.no_grad():
            cos, sin = rotary_emb(probe, positions)
        self.cos = cos[0].to(dtype)
        self.sin = sin[0].to(dtype)
        # Some rope types scale cos and sin by a factor a; the inverse rotation divides by a^2.
        self.inv_scale2 = 1.0 / float((self.cos[0] ** 2 + self.sin[0] ** 2).mean())
        self.rotary_dim = self.cos.shape[-1]

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin at `positions` [..., n] -> two tensors [..., 1, n, rotary_dim] (broadcast over heads)."""
        return self.cos[positions].unsqueeze(-3), self.sin[positions].unsqueeze(-3)


def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate keys x [b, heads, n, head_dim] to positions given by cos/sin [b, 1, n, rotary_dim].

    Only the first rotary_dim dims rotate (partial rotary models such as GPT-NeoX and Phi-3).
    """
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def remove_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    inv_scale2: float = 1.0) -> torch.Tensor:
    """Inverse of `apply_rotation`: keys rotated by (cos, sin) back to position-free keys."""
    return apply_rotation(x, cos * inv_scale2, -sin * inv_scale2)
