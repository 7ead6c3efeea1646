"""Weight-only quantisation of a causal LM's Linear layers (`--weights-dtype`), run by torch's CPU kernels.

Formats (`WEIGHTS_DTYPES`):

- ``float32``: the Linear layers as loaded (nothing is replaced); today's behaviour.
- ``bfloat16``: each weight [N, K] stored in bfloat16; activations are cast to bfloat16 for the matmul.
- ``int8``: symmetric absmax per output channel, ``w ~= q * s`` (q int8 in [-127, 127], one scale per row),
  multiplied by ``torch._weight_int8pack_mm``.
- ``int4``: asymmetric per group of `group_size` inputs of one output channel, ``w ~= (q - 8) * s + z`` (q in
  [0, 15], one scale and one offset per group), packed by ``torch._convert_weight_to_int4pack_for_cpu`` and
  multiplied by ``torch._weight_int4pack_mm_for_cpu``.

A layer whose shape the kernels do not take falls back int4 -> int8 -> bfloat16 (`kernel_format`; e.g.
stories260K's down_proj, K = 172, is stored in bfloat16).

Every quantised matmul runs with bfloat16 activations: on this CPU torch's packed kernels are fast only for
bfloat16 inputs (their float32 paths were 10-40x slower than a plain float32 matmul when measured), and the
residual stream, norms, embeddings and attention stay in the model's dtype (the output is cast back).
Scales and offsets are rounded to bfloat16 before the weights are quantised against them, so the
weight the kernel multiplies by is exactly `dequantize_*` of the stored codes.

The Linear layers of the decoder and the LM head are replaced at load time (the embedding table stays as
loaded: a lookup reads one row per token, so it does not weigh on decode's memory traffic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sinkstream.core.config import WEIGHTS_DTYPES, ConfigError

INT8_MAX = 127
INT4_MAX = 15
INT4_MID = 8  # the kernels' implicit zero point: w = (q - 8) * scale + offset
INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32
COMPUTE_DTYPE = torch.bfloat16
KERNEL_MULTIPLE = 16  # shape multiple the packed kernels need (kernel_format)


def check_weights_dtype(weights_dtype: str | None, group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Raise ConfigError for a format or int4 group size this module does not offer."""
    if weights_dtype is not None and weights_dtype not in WEIGHTS_DTYPES:
        raise ConfigError("weights_dtype",
                          f"unknown weights dtype {weights_dtype!r}; choose from {WEIGHTS_DTYPES}")
    if group_size not in INT4_GROUP_SIZES:
        raise ConfigError("weights_dtype",
                          f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q [N, K] int8, scales [N] bfloat16) with w ~= q * scales[:, None]."""
    w = w.float()
    scales = (w.abs().amax(1) / INT8_MAX).to(COMPUTE_DTYPE)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).float()
    q = (w / safe[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


def quantize_int4_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] (K a multiple of group_size) -> (q [N, K] int32 in [0, 15], scales [N, G], offsets [N, G]
    bfloat16) with w[n, g*gs:(g+1)*gs] ~= (q - 8) * scales[n, g] + offsets[n, g], G = K / group_size."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scales = ((hi - lo) / INT4_MAX).to(COMPUTE_DTYPE)
    offsets = (lo + INT4_MID * scales.float()).to(COMPUTE_DTYPE)  # the value of q = 8
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).float()
    q = ((groups - offsets.float()[..., None]) / safe[..., None] + INT4_MID).round_().clamp_(0, INT4_MAX)
    return q.to(torch.int32).reshape(n, k), scales, offsets


def dequantize_int8_rows(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight [N, K] that codes q [N, K] and scales [N] (quantize_int8_rows) stand for."""
    return q.float() * scales.float()[:, None]


def dequantize_int4_groups(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                           group_size: int) -> torch.Tensor:
    """The float32 weight [N, K] that codes q [N, K] and scales/offsets [N, G] (quantize_int4_groups)
    stand for."""
    n, k = q.shape
    groups = q.float().reshape(n, k // group_size, group_size)
    return ((groups - INT4_MID) * scales.float()[..., None] + offsets.float()[..., None]).reshape(n, k)


def kernel_format(fmt: str, n: int, k: int, group_size: int) -> str:
    """The format a [N, K] weight asked to be `fmt` is stored in: the kernels need int4 N % 16 == 0 and
    K % group_size == 0, int8 K % 16 == 0 (torch 2.13's int8 kernel crashes otherwise), so a layer that
    does not fit falls back int4 -> int8 -> bfloat16."""
    if fmt == "int4" and (n % KERNEL_MULTIPLE or k % group_size):
        fmt = "int8"
    if fmt == "int8" and k % KERNEL_MULTIPLE:
        fmt = "bfloat16"
    return fmt


# Stored tensors of each format and their output (N) dimension: int4's packed codes are [N, K / 2] on the CPU
# and its scales/offsets [K / group_size, N, 2]. The int4 packing interleaves rows within blocks of 64
# outputs, so int4 layers stack only in whole blocks (measured: parts of 16, 32, 48 or 96 outputs do not).
INT4_STACK_BLOCK = 64
_STACK_DIMS = {"bfloat16": (("weight_bf16", 0),), "int8": (("weight_int8", 0), ("scales", 0)),
               "int4": (("weight_int4", 0), ("scales_and_zeros", 1))}


class QuantizedLinear(nn.Module):
    """A Linear layer y = x W^T + b whose weight W [N, K] is stored as `fmt` (bfloat16, int8 or int4; see
    the module docstring). Input [..., K] in any float dtype, output [..., N] in the input's dtype."""

    def __init__(self, linear: nn.Linear, fmt: str, group_size: int = DEFAULT_GROUP_SIZE) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        fmt = kernel_format(fmt, self.out_features, self.in_features, group_size)
        self.fmt, self.group_size = fmt, group_size
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)
        if fmt == "bfloat16":
            self.register_buffer("weight_bf16", w.to(COMPUTE_DTYPE).contiguous())
        elif fmt == "int8":
            q, scales = quantize_int8_rows(w)
            self.register_buffer("weight_int8", q.contiguous())
            self.register_buffer("scales", scales)
        elif fmt == "int4":
            q, scales, offsets = quantize_int4_groups(w, group_size)
            self.register_buffer("weight_int4", torch._convert_weight_to_int4pack_for_cpu(q, 1))
            # The kernel's layout: [K / group_size, N, 2] (scale, offset).
            self.register_buffer("scales_and_zeros", torch.stack([scales, offsets], -1).transpose(0, 1)
                                 .contiguous())
        else:
            raise ConfigError("weights_dtype", f"QuantizedLinear stores bfloat16, int8 or int4, got {fmt!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE)
        if self.fmt == "bfloat16":
            y = F.linear(flat, self.weight_bf16)
        elif self.fmt == "int8":
            y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        else:
            y = torch._weight_int4pack_mm_for_cpu(flat, self.weight_int4, self.group_size,
                                                  self.scales_and_zeros)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    @classmethod
    def stacked(cls, parts: list[QuantizedLinear]) -> QuantizedLinear:
        """One layer whose output [..., sum N_i] is the outputs of `parts` side by side (same input size,
        format and group size): their stored codes, scales and biases are concatenated as they are, so each
        output element is computed exactly as its part computes it (fused q/k/v: core.fused_decoder)."""
        if not stackable(parts):
            raise ValueError("stacked layers need one format, input size and group size (int4: outputs in "
                             f"multiples of {INT4_STACK_BLOCK})")
        first = parts[0]
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.out_features = first.in_features, sum(p.out_features for p in parts)
        fused.fmt, fused.group_size = first.fmt, first.group_size
        fused.bias = None
        if any(p.bias is not None for p in parts):
            fused.bias = nn.Parameter(torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features)
                                                 for p in parts]), requires_grad=False)
        for name, dim in _STACK_DIMS[first.fmt]:  # the output dimension of each stored tensor
            fused.register_buffer(name, torch.cat([getattr(p, name) for p in parts], dim))
        return fused

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.fmt == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}{group}"


def stackable(parts: list[nn.Module]) -> bool:
    """Whether QuantizedLinear.stacked can join `parts` exactly."""
    if not parts or not all(isinstance(p, QuantizedLinear) for p in parts):
        return False
    first = parts[0]
    same = all((p.fmt, p.in_features, p.group_size) == (first.fmt, first.in_features, first.group_size)
               for p in parts)
    return same and (first.fmt != "int4" or all(p.out_features % INT4_STACK_BLOCK == 0 for p in parts))


class OutputSlice(nn.Module):
    """Outputs [start, stop) of a shared layer: stands where one of the layers stacked into it was (q_proj of
    a fused q/k/v layer), so code that still calls that layer (the Hugging Face forward) gets what it got."""

    def __init__(self, layer: QuantizedLinear, start: int, stop: int) -> None:
        super().__init__()
        self.layer, self.start, self.stop = layer, start, stop
        self.in_features, self.out_features = layer.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)[..., self.start : self.stop]


def quantize_linears(model: nn.Module, weights_dtype: str | None,
                     group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Replace every nn.Linear of `model` (decoder layers and LM head) by a QuantizedLinear of
    `weights_dtype`; None or ``float32`` leaves the model as loaded. Returns the number replaced.

    Raises ConfigError for an unknown format or group size, before anything changes. The replaced float
    weights are freed unless something else holds them (a tied LM head's table stays the embedding).
    """
    check_weights_dtype(weights_dtype, group_size)
    if weights_dtype in (None, "float32"):
        return 0
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantizedLinear(linear, weights_dtype, group_size))
    return len(targets)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights share one)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
