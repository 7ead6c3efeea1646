"""core.fused_decoder: stacked q/k/v and gate/up layers compute exactly what their parts compute, and a
quantised Llama-family model streams bit for bit as it does through the Hugging Face forward."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import COMMON, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from sinkstream.core.config import StreamConfig, TierSpec
from sinkstream.core.fused_decoder import FUSED_MODEL_TYPES, FusedDecoder, fuse_projections
from sinkstream.core.model_loading import load_model
from sinkstream.core.streaming import StreamingInference
from sinkstream.core.weight_quant import OutputSlice, QuantizedLinear, quantize_linears


def quantised(sizes: tuple[int, ...], fmt: str, bias: bool, gen: torch.Generator) -> list[QuantizedLinear]:
    parts = []
    for n in sizes:
        linear = torch.nn.Linear(64, n, bias=bias)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(n, 64, generator=gen))
        parts.append(QuantizedLinear(linear, fmt))
    return parts


@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "int4"])
@pytest.mark.parametrize("bias", [False, True])
def test_a_stacked_layer_is_its_parts_side_by_side(fmt, bias):
    gen = torch.Generator().manual_seed(0)
    parts = quantised((128, 64, 64), fmt, bias, gen)
    stacked = QuantizedLinear.stacked(parts)
    x = torch.randn(3, 5, 64, generator=gen)
    with torch.inference_mode():
        assert torch.equal(stacked(x), torch.cat([p(x) for p in parts], -1))
    assert stacked.out_features == 256 and stacked.fmt == fmt


def test_layers_that_cannot_stack_exactly_are_refused():
    gen = torch.Generator().manual_seed(1)
    with pytest.raises(ValueError, match="one format"):
        QuantizedLinear.stacked([*quantised((64,), "int8", False, gen),
                                 *quantised((64,), "bfloat16", False, gen)])
    with pytest.raises(ValueError, match="multiples of 64"):  # int4 packs rows in blocks of 64 outputs
        QuantizedLinear.stacked(quantised((64, 32, 32), "int4", False, gen))


def wider_tiny_model(family: str) -> torch.nn.Module:
    """A tiny model of `family` whose projections have 64 or 128 outputs, so that int4 layers stack."""
    config = tiny_config(family)
    config = type(config)(**{**COMMON, "hidden_size": 64, "intermediate_size": 128, "num_key_value_heads": 4},
                          **({"sliding_window": None} if family == "mistral" else {}))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def quantised_pair(family: str, fmt: str):
    """The same quantised tiny model twice: as quantize_linears leaves it, and stacked by fuse_projections."""
    plain = wider_tiny_model(family)
    quantize_linears(plain, fmt)
    fused = copy.deepcopy(plain)
    return plain, fused, fuse_projections(fused)


@pytest.mark.parametrize("family", FUSED_MODEL_TYPES)
@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "int4"])
def test_fused_streams_bit_for_bit_as_the_model_forward(family, fmt):
    plain, fused, did = quantised_pair(family, fmt)
    assert did and FusedDecoder.applies(fused) and not FusedDecoder.applies(plain)
    assert isinstance(fused.model.layers[0].self_attn.k_proj, OutputSlice)
    ids = torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(4)).tolist()
    for config in (StreamConfig(sink_tokens=2, window=24, chunk=8),
                   StreamConfig(sink_tokens=2, window=24, chunk=8, tiers=TierSpec.parse("4x2"),
                                merge_policy="attention", keep_rotated_keys=True)):
        results = []
        for model in (plain, fused):
            engine = StreamingInference(model, config)
            assert (engine.fused is not None) == (model is fused)
            row = engine.open_row()
            lps = [engine.step({row: ids[i : i + size]})[row].logprobs
                   for i, size in zip(range(0, 150, 5), [1, 5] * 15, strict=True)]
            results.append(torch.cat((*lps, engine.next_logprobs(row))))
        torch.testing.assert_close(results[0], results[1], rtol=0, atol=0, equal_nan=True)  # 1st is NaN


def test_eager_attention_models_stream_as_their_own_forward():
    """A model loaded with attn_implementation="eager" goes through the family's eager attention."""
    plain, fused, _ = quantised_pair("llama", "int8")
    for model in (plain, fused):
        model.set_attn_implementation("eager")
    ids = torch.randint(0, 97, (60,), generator=torch.Generator().manual_seed(6)).tolist()
    results = []
    for model in (plain, fused):
        engine = StreamingInference(model, StreamConfig(sink_tokens=2, window=24, chunk=8))
        row = engine.open_row()
        results.append(torch.cat([r.logprobs for r in engine.append(row, ids)]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("family", FUSED_MODEL_TYPES)
def test_the_model_forward_of_a_fused_model_is_unchanged(family):
    """Dense paths still call the model's own forward: its OutputSlice layers give the same logits."""
    plain, fused, _ = quantised_pair(family, "int4")
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        assert torch.equal(plain(ids).logits, fused(ids).logits)


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gpt_neox"])
def test_other_families_are_left_as_they_are(family):
    model = tiny_model(family)
    quantize_linears(model, "int8")
    before = {name: type(m) for name, m in model.named_modules()}
    assert not fuse_projections(model)
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert StreamingInference(model, StreamConfig(sink_tokens=2, window=24, chunk=8)).fused is None


def test_load_model_fuses_quantised_llama_weights_only(model_dir):
    assert FusedDecoder.applies(load_model(str(model_dir), weights_dtype="int8").model)
    assert not FusedDecoder.applies(load_model(str(model_dir)).model)
