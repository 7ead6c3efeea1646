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
- ``int4``: asymmetric quantisation per group of `int4_group(D)` (32) elements of a stored vector:
  ``q = round((x - m) / s)`` in 0..15 with ``m = min``, ``s = (max - min) / 15`` (every element within
  ``s / 2``), two codes per byte (element 2i in the low nibble, 2i+1 in the high one). Scale and minimum of
  every group are kept in float32, interleaved: ``[s_0, m_0, s_1, m_1, ...]``. For head_dim 64 a vector
  takes 48 bytes against int8's 68 and float32's 256.

All storage is preallocated [L, R, H, N, D] (L layers, R rows, H kv heads, N slots, D head_dim); reading a
layer de-quantises into one workspace [R, H, N, D] shared by every layer (each layer's attention consumes
it before the next layer reads), so no step allocates cache-sized tensors.
"""

from __future__ import annotations

import torch

from sinkstream.core.config import KV_DTYPES

INT8_MAX = 127
INT4_MAX = 15
INT4_GROUPS = (32, 16, 8)  # preferred group sizes, largest first (int4_group)
_STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8,
                   "int4": torch.uint8}


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float -> (q [..., D] int8, scale [..., 1] float32) with x ~= q * scale.

    All-zero vectors get scale 0 and de-quantise to exact zeros.
    """
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (x / safe).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def int4_group(head_dim: int) -> int:
    """Elements sharing one int4 scale and minimum: the largest of INT4_GROUPS dividing head_dim, else all."""
    return next((g for g in INT4_GROUPS if head_dim % g == 0), head_dim)


def quantize_int4(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float (D even, a multiple of group) -> (codes [..., D / 2] uint8, two per byte,
    params [..., 2 * D / group] float32: scale and minimum of each group, interleaved)."""
    x = x.float()
    *lead, d = x.shape
    groups = x.reshape(*lead, d // group, group)
    lo = groups.amin(-1, keepdim=True)
    scale = (groups.amax(-1, keepdim=True) - lo) / INT4_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((groups - lo) / safe).round_().clamp_(0, INT4_MAX).to(torch.uint8).reshape(*lead, d)
    return q[..., 0::2] | (q[..., 1::2] << 4), torch.cat((scale, lo), -1).reshape(*lead, 2 * (d // group))


def dequantize_int4(codes: torch.Tensor, params: torch.Tensor, group: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of quantize_int4: codes [..., D / 2], params [..., 2 * D / group] -> x [..., D] (float32,
    or written into `out`, contiguous, in its dtype)."""
    *lead, half = codes.shape
    q = torch.stack((codes & 0xF, codes >> 4), -1).reshape(*lead, 2 * half // group, group)
    p = params.reshape(*lead, 2 * half // group, 2)
    x = torch.addcmul(p[..., 1:], q.float(), p[..., :1]).reshape(*lead, 2 * half)
    return x if out is None else out.copy_(x)


class KVStorage:
    """Keys and values of every layer, row, head and slot in one format (see the module docstring).

    `keys`/`values` [L, R, H, N, D] are the stored data (int8 for ``int8``; [L, R, H, N, D / 2] uint8 for
    ``int4``); `key_scales`/`value_scales` float32 exist only for those two: [L, R, H, N, 1] for ``int8``,
    [L, R, H, N, 2 * D / group] (scale, minimum per group) for ``int4``.
    """

    def __init__(self, shape: tuple[int, int, int, int, int], kv_dtype: str, compute_dtype: torch.dtype,
                 device: torch.device) -> None:
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
        storage = _STORAGE_DTYPES.get(kv_dtype, compute_dtype)
        self.kv_dtype = kv_dtype
        self.compute_dtype = compute_dtype
        self.quantized = kv_dtype in ("int8", "int4")
        self.converts = storage != compute_dtype  # reads go through the workspace
        head_dim = shape[-1]
        self.group = int4_group(head_dim)
        data_shape, params = (shape, 1) if kv_dtype != "int4" else ((*shape[:-1], head_dim // 2),
                                                                   2 * head_dim // self.group)
        self.keys = torch.zeros(data_shape, dtype=storage, device=device)
        self.values = torch.zeros(data_shape, dtype=storage, device=device)
        self.key_scales = self.value_scales = None
        if self.quantized:
            self.key_scales = torch.zeros(*shape[:-1], params, dtype=torch.float32, device=device)
            self.value_scales = torch.zeros(*shape[:-1], params, dtype=torch.float32, device=device)
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
            qk, sk = self._quantize(keys)
            qv, sv = self._quantize(values)
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
            self._dequantize(keys, ks, out_k)
            self._dequantize(values, vs, out_v)
        else:
            out_k.copy_(keys)
            out_v.copy_(values)
        return out_k, out_v

    # ----------------------------------------------------------------- whole-row slot access (all layers)
    def gather(self, row: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 keys and values [L, H, n, D] of `slots` [n] of `row`, de-quantised."""
        keys = self.keys[:, row].index_select(2, slots)
        values = self.values[:, row].index_select(2, slots)
        if self.quantized:
            return (self._dequantize(keys, self.key_scales[:, row].index_select(2, slots)),
                    self._dequantize(values, self.value_scales[:, row].index_select(2, slots)))
        return keys.float(), values.float()

    def assign(self, row: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys/values [L, H, n, D] at slots [start, start + n) of `row`, every layer."""
        n = keys.shape[2]
        dst = slice(start, start + n)
        if self.quantized:
            qk, sk = self._quantize(keys)
            qv, sv = self._quantize(values)
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

    # ----------------------------------------------------------------- the quantised formats
    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., D] -> (stored data, scales) in this storage's quantised format."""
        return quantize_int4(x, self.group) if self.kv_dtype == "int4" else quantize_int8(x)

    def _dequantize(self, data: torch.Tensor, scales: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """Stored data and scales -> values [..., D] (float32, or into `out` in its dtype)."""
        if self.kv_dtype == "int4":
            return dequantize_int4(data, scales, self.group, out)
        return torch.mul(data, scales, out=out) if out is not None else data.float() * scales

    def clear(self, row: int, dst: slice) -> None:
        """Zero the slots `dst` of `row`, every layer (int8 scales too)."""
        for t in self.tensors():
            t[:, row, :, dst] = 0

    # ----------------------------------------------------------------- persistence and size
    def tensors(self) -> list[torch.Tensor]:
        """The stored tensors, all [L, R, H, N, *]: keys, values, then the int8/int4 scales if any."""
        scales = [self.key_scales, self.value_scales] if self.quantized else []
        return [self.keys, self.values, *scales]

    @property
    def nbytes(self) -> int:
        """Bytes of the storage and of the read workspace; constant for the storage's lifetime."""
        workspace = [self.read_keys, self.read_values] if self.converts else []
        return sum(t.nbytes for t in self.tensors() + workspace)
