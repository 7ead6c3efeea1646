"""Storage of a SinkCache's keys and values in a chosen format, de-quantised on the fly for attention.

Formats (`StreamConfig.kv_dtype`):

- ``model``: the model's own dtype. The cache returns views of its storage; nothing is converted.
- ``float32`` / ``bfloat16``: stored in that dtype, converted to the model's dtype when read (when it
  equals the model's dtype this is ``model``).
- ``int8``: symmetric absmax quantisation with one float32 scale per stored vector (per layer, row, head
  and slot, over head_dim): ``q = round(x / s)``, ``s = max|x| / 127``, so every element is within
  ``s / 2`` of its original. One scale per token and head for both keys and values: KIVI's per-channel key
  scales need a group of tokens to share a scale, which a ring written one chunk at a time and tiers
  rewritten in place do not give; keys are stored position-free (RoPE removed) and rotated only after
  de-quantisation, so positions stay exact whatever the quantisation error.

All storage is preallocated [L, R, H, N, D] (L layers, R rows, H kv heads, N slots, D head_dim); reading a
layer de-quantises into one workspace [R, H, N, D] shared by every layer (each layer's attention consumes
it before the next layer reads), so no step allocates cache-sized tensors.
"""

from __future__ import annotations

import torch

from sinkstream.core.config import KV_DTYPES

INT8_MAX = 127
_STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float -> (q [..., D] int8, scale [..., 1] float32) with x ~= q * scale.

    All-zero vectors get scale 0 and de-quantise to exact zeros.
    """
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (x / safe).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


class KVStorage:
    """Keys and values of every layer, row, head and slot in one format (see the module docstring).

    `keys`/`values` [L, R, H, N, D] are the stored data (int8 for ``int8``); `key_scales`/`value_scales`
    [L, R, H, N, 1] float32 exist only for ``int8``.
    """

    def __init__(self, shape: tuple[int, int, int, int, int], kv_dtype: str, compute_dtype: torch.dtype,
                 device: torch.device) -> None:
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
        storage = _STORAGE_DTYPES.get(kv_dtype, compute_dtype)
        self.kv_dtype = kv_dtype
        self.compute_dtype = compute_dtype
        self.quantized = storage == torch.int8
        self.converts = storage != compute_dtype  # reads go through the workspace
        self.keys = torch.zeros(shape, dtype=storage, device=device)
        self.values = torch.zeros(shape, dtype=storage, device=device)
        self.key_scales = self.value_scales = None
        if self.quantized:
            self.key_scales = torch.zeros(*shape[:-1], 1, dtype=torch.float32, device=device)
            self.value_scales = torch.zeros(*shape[:-1], 1, dtype=torch.float32, device=device)
        # De-quantised values of one layer; keys de-quantise into the cache's rotation input instead.
        self.read_values = (torch.empty(shape[1:], dtype=compute_dtype, device=device)
                            if self.converts else None)
        self.read_keys = (torch.empty(shape[1:], dtype=compute_dtype, device=device)
                          if self.converts else None)

    # ----------------------------------------------------------------- chunk writes and layer reads
    def put(self, layer: int, index: tuple[torch.Tensor, ...], keys: torch.Tensor,
            values: torch.Tensor) -> None:
        """Store keys/values [b, H, n, D] of one layer at `index` (row, head, slot index tensors that
        broadcast to [b, H, n], as for Tensor.index_put_ on [R, H, N, D])."""
        if self.quantized:
            qk, sk = quantize_int8(keys)
            qv, sv = quantize_int8(values)
            self.keys[layer].index_put_(index, qk)
            self.values[layer].index_put_(index, qv)
            self.key_scales[layer].index_put_(index, sk)
            self.value_scales[layer].index_put_(index, sv)
        else:
            self.keys[layer].index_put_(index, keys.to(self.keys.dtype))
            self.values[layer].index_put_(index, values.to(self.values.dtype))

    def read(self, layer: int, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `rows` [b] (None: every row, in order) of one layer, [b, H, N, D] in the
        compute dtype. Views of the storage or of the shared workspace: consume before the next read."""
        keys, values = self.keys[layer], self.values[layer]
        if rows is not None:
            keys, values = keys.index_select(0, rows), values.index_select(0, rows)
        if not self.converts:
            return keys, values
        b = keys.shape[0]
        out_k, out_v = self.read_keys[:b], self.read_values[:b]
        if self.quantized:
            ks, vs = self.key_scales[layer], self.value_scales[layer]
            if rows is not None:
                ks, vs = ks.index_select(0, rows), vs.index_select(0, rows)
            torch.mul(keys, ks, out=out_k)
            torch.mul(values, vs, out=out_v)
        else:
            out_k.copy_(keys)
            out_v.copy_(values)
        return out_k, out_v

    # ----------------------------------------------------------------- whole-row slot access (all layers)
    def gather(self, row: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 keys and values [L, H, n, D] of `slots` [n] of `row`, de-quantised."""
        keys = self.keys[:, row].index_select(2, slots).float()
        values = self.values[:, row].index_select(2, slots).float()
        if self.quantized:
            keys *= self.key_scales[:, row].index_select(2, slots)
            values *= self.value_scales[:, row].index_select(2, slots)
        return keys, values

    def assign(self, row: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys/values [L, H, n, D] at slots [start, start + n) of `row`, every layer."""
        n = keys.shape[2]
        dst = slice(start, start + n)
        if self.quantized:
            qk, sk = quantize_int8(keys)
            qv, sv = quantize_int8(values)
            self.keys[:, row, :, dst], self.key_scales[:, row, :, dst] = qk, sk
            self.values[:, row, :, dst], self.value_scales[:, row, :, dst] = qv, sv
        else:
            self.keys[:, row, :, dst] = keys.to(self.keys.dtype)
            self.values[:, row, :, dst] = values.to(self.values.dtype)

    def move(self, row: int, dst: slice | torch.Tensor, src: torch.Tensor) -> None:
        """Copy the stored slots `src` [n] of `row` to `dst` (a slice or slots [n]), every layer, exactly
        (no re-quantisation)."""
        for t in self.tensors():
            t[:, row, :, dst] = t[:, row, :, src]

    def clear(self, row: int, dst: slice) -> None:
        """Zero the slots `dst` of `row`, every layer (int8 scales too)."""
        for t in self.tensors():
            t[:, row, :, dst] = 0

    # ----------------------------------------------------------------- persistence and size
    def tensors(self) -> list[torch.Tensor]:
        """The stored tensors, all [L, R, H, N, *]: keys, values, then the int8 scales if any."""
        scales = [self.key_scales, self.value_scales] if self.quantized else []
        return [self.keys, self.values, *scales]

    @property
    def nbytes(self) -> int:
        """Bytes of the storage and of the read workspace; constant for the storage's lifetime."""
        workspace = [self.read_keys, self.read_values] if self.converts else []
        return sum(t.nbytes for t in self.tensors() + workspace)
