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


def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate keys x [b, heads, n, head_dim] to positions given by cos/sin [b, 1, n, rotary_dim].

    The half-split rotation Hugging Face rotary models use: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin].
    Only the first rotary_dim dims rotate (partial rotary models such as GPT-NeoX and Phi-3). Written into
    `out` (same shape as x, must not overlap it) when given, so a caller can reuse one buffer per step.
    """
    rd = cos.shape[-1]
    half = rd // 2
    if out is None:
        out = torch.empty_like(x)
    x1, x2 = x[..., :half], x[..., half:rd]
    o1, o2 = out[..., :half], out[..., half:rd]
    torch.mul(x1, cos[..., :half], out=o1)
    o1.addcmul_(x2, sin[..., :half], value=-1)
    torch.mul(x2, cos[..., half:], out=o2)
    o2.addcmul_(x1, sin[..., half:])
    if rd < x.shape[-1]:
        out[..., rd:] = x[..., rd:]
    return out


def inverse_rotation(cos: torch.Tensor, sin: torch.Tensor,
                     inv_scale2: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) with which `apply_rotation` undoes a rotation by (cos, sin): rotated keys back to
    position-free ones (see RopeTable.inv_scale2)."""
    return cos * inv_scale2, -sin * inv_scale2

