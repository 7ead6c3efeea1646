"""A Llama-family decoder written out in one function (`FusedDecoder`), for models whose Linear layers are
quantised (core.weight_quant): each layer's q/k/v projections run as one packed matmul, and so do its
gate/up projections.

Why: a decoded token is one row through every matmul, so a packed kernel's fixed cost per call and the
module machinery around it weigh as much as the weights' bytes (SmolLM2 int4, 2 threads: k_proj, 576 -> 192,
takes 15 us, of which about 4 are kernel entry and 8 the module call and bfloat16 casts). Stacking q/k/v
and gate/up cuts a layer's seven matmul calls to four, and calling the layers' parts directly skips the
Hugging Face module overhead around them.

Exactness: every element is computed as the model's own forward computes it. A stacked layer's outputs
are its parts' outputs (QuantizedLinear.stacked); the norms, rotary embedding, activation and attention
function are the model's own (an attention observer installed by core.tiers is honoured: the attention
function is looked up per pass). So StreamingInference gives the same numbers with and without fusion
(tests/test_fused_decoder.py compares them bit for bit).

`fuse_projections(model)` stacks the layers once, at load time, and leaves `OutputSlice` modules where the
parts were: the model's own forward (dense paths, `generate`) still runs, and no weight is stored twice.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from sinkstream.core.sink_cache import SinkCache
from sinkstream.core.weight_quant import OutputSlice, QuantizedLinear, stackable

FUSED_MODEL_TYPES = ("llama", "mistral", "qwen2")  # one attention and MLP layout (qwen2: q/k/v biases)
STACKS = (("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
          ("mlp", ("gate_proj", "up_proj"), "gate_up_proj"))


def fuse_projections(model: nn.Module) -> bool:
    """Stack each decoder layer's q/k/v and gate/up QuantizedLinear layers (attributes `qkv_proj` of the
    attention and `gate_up_proj` of the MLP), leaving OutputSlice modules in their places. Returns whether
    it did; a model of another family, or whose layers are not all stackable, is left unchanged."""
    if model.config.model_type not in FUSED_MODEL_TYPES:
        return False
    layers = model.base_model.layers
    for layer in layers:
        for owner_name, names, _ in STACKS:
            if not stackable([getattr(getattr(layer, owner_name), n, None) for n in names]):
                return False
    for layer in layers:
        for owner_name, names, stacked_name in STACKS:
            owner = getattr(layer, owner_name)
            parts = [getattr(owner, n) for n in names]
            stacked = QuantizedLinear.stacked(parts)
            setattr(owner, stacked_name, stacked)
            start = 0
            for name, part in zip(names, parts, strict=True):
                setattr(owner, name, OutputSlice(stacked, start, start + part.out_features))
                start += part.out_features
    return True


class FusedDecoder:
    """The decoder of a model `fuse_projections` stacked, as one function over a SinkCache pass."""

    def __init__(self, model: nn.Module) -> None:
        self.config = model.config
        self.base = model.base_model
        self.layers = list(self.base.layers)
        # The family's own rotary helper and eager attention (llama, mistral and qwen2 each define them).
        family = sys.modules[type(self.layers[0].self_attn).__module__]
        self.apply_rotary, self.eager_attention = family.apply_rotary_pos_emb, family.eager_attention_forward

    @staticmethod
    def applies(model: nn.Module) -> bool:
        """Whether `model` was stacked by fuse_projections (phi3's own qkv_proj/gate_up_proj are not)."""
        return model.config.model_type in FUSED_MODEL_TYPES and all(
            isinstance(getattr(layer.self_attn, "q_proj", None), OutputSlice)
            and isinstance(getattr(layer.mlp, "gate_proj", None), OutputSlice)
            for layer in model.base_model.layers)

    def __call__(self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                 cache: SinkCache) -> torch.Tensor:
        """Final hidden states [b, n, hidden] of ids [b, n] at position_ids [b, n] with the additive mask
        [b, 1, n, num_slots], inside a begun cache step (SinkCache.begin_step)."""
        h = self.base.embed_tokens(ids)
        cos, sin = self.base.rotary_emb(h, position_ids)
        # The model's attention function (an observer installed by core.tiers wraps it).
        name = self.config._attn_implementation
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(name, self.eager_attention)
        for layer in self.layers:
            normed = layer.input_layernorm(h)
            h = h + self._attention(layer.self_attn, normed, cos, sin, mask, cache, attention)
            h = h + self._mlp(layer.mlp, layer.post_attention_layernorm(h))
        return self.base.norm(h)

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor, cache: SinkCache, attention) -> torch.Tensor:
        """The attention block's output [b, n, hidden] for normed input x [b, n, hidden]."""
        b, n, _ = x.shape
        q_size, kv_size = attn.q_proj.out_features, attn.k_proj.out_features
        q, k, v = (t.reshape(b, n, -1, attn.head_dim).transpose(1, 2)
                   for t in attn.qkv_proj(x).split([q_size, kv_size, kv_size], -1))
        q, k = self.apply_rotary(q, k, cos, sin)
        k, v = cache.update(k, v, attn.layer_idx)
        extra = {"sliding_window": attn.sliding_window} if hasattr(attn, "sliding_window") else {}
        out, _ = attention(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling, **extra)
        return attn.o_proj(out.reshape(b, n, -1).contiguous())

    @staticmethod
    def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """down(act(gate(x)) * up(x)) with gate and up from one stacked matmul; x [b, n, hidden]."""
        gate, up = mlp.gate_up_proj(x).split(mlp.gate_proj.out_features, -1)
        return mlp.down_proj(mlp.act_fn(gate) * up)
