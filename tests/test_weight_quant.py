"""Weight-only quantised Linear layers (core.weight_quant, `--weights-dtype`): each quantised layer computes
F.linear with the weight a plain reference quantiser written here de-quantises to (to bfloat16 rounding of
the activations and the output), every weight is within half a quantisation step of the original, and a
whole quantised model streams stories260K with an NLL close to float32's and the published greedy text."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_cli_generate import PROMPT, REFERENCE_NEW_TOKENS, run_generate, run_generate_against_server
from test_core_streaming import REFERENCE_CONTINUATION
from torch import nn

from sinkstream.core.config import ConfigError, StreamConfig
from sinkstream.core.model_loading import load_model
from sinkstream.core.offload.config import OffloadConfig
from sinkstream.core.streaming import StreamingInference
from sinkstream.core.weight_quant import QuantizedLinear, quantize_linears, weight_bytes

BF16_UNIT_ROUNDOFF = 2.0 ** -8


def linear(n: int, k: int, seed: int = 0, bias: bool = False) -> nn.Linear:
    """A Linear layer with a few outlier input channels, as real weights have."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        channel_scale = torch.logspace(-2, 0.5, k)[torch.randperm(k, generator=gen)]
        layer.weight.copy_(torch.randn(n, k, generator=gen) * channel_scale)
        if bias:
            layer.bias.copy_(torch.randn(n, generator=gen))
    return layer


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def reference_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(de-quantised w, step) per output row: step = bf16(max|w| / 127), codes round(w / step) clamped to
    -127..127."""
    step = bf16(w.abs().amax(1, keepdim=True) / 127)
    return (w / step).round().clamp(-127, 127) * step, step


def reference_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(de-quantised w, step) per group of `group` inputs: step = bf16((max - min) / 15), the value of code 8
    is bf16(min + 8 step), codes in 0..15."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = bf16((hi - lo) / 15)
    mid = bf16(lo + 8 * step)
    codes = ((g - mid) / step + 8).round().clamp(0, 15)
    return ((codes - 8) * step + mid).reshape(n, k), step.expand(n, k // group, group).reshape(n, k)


def assert_matches_linear(layer: QuantizedLinear, x: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None) -> None:
    """layer(x) == F.linear(bf16(x), weight) + bias, to one bfloat16 rounding of the output (plus float32
    summation-order slack): the kernel multiplies by exactly `weight`."""
    got = layer(x)
    exact = F.linear(bf16(x).double(), weight.double())
    magnitude = F.linear(bf16(x).abs().double(), weight.abs().double())
    bound = BF16_UNIT_ROUNDOFF * exact.abs() + 1e-5 * magnitude
    err = (got.double() - (exact if bias is None else exact + bias.double())).abs()
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], weight.shape[0])
    assert bool((err <= bound * 1.01 + 1e-6).all()), float((err - bound).max())


@pytest.mark.parametrize("bias", [False, True])
def test_int8_layer_is_linear_with_reference_weight(bias):
    source = linear(96, 64, bias=bias)
    layer = QuantizedLinear(source, "int8")
    assert layer.fmt == "int8"
    weight, step = reference_int8(source.weight.detach())
    assert bool(((weight - source.weight).abs() <= step / 2 * (1 + 1e-6)).all())  # half a step
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    assert_matches_linear(layer, x, weight, source.bias)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_layer_is_linear_with_reference_weight(group):
    source = linear(48, 256, seed=group)
    layer = QuantizedLinear(source, "int4", group)
    assert layer.fmt == "int4"
    weight, step = reference_int4(source.weight.detach(), group)
    assert bool(((weight - source.weight).abs() <= step / 2 * (1 + 1e-2) + 1e-6).all())
    for rows in (1, 7):  # decode and a chunk
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
        assert_matches_linear(layer, x, weight, None)


def test_bfloat16_layer_and_shape_fallbacks():
    """bfloat16 stores bf16(w); a shape the packed kernels do not take falls back int4 -> int8 -> bf16."""
    source = linear(64, 172)  # stories260K's down_proj: K = 172 is no multiple of 16
    for fmt in ("bfloat16", "int8", "int4"):
        layer = QuantizedLinear(source, fmt)
        assert layer.fmt == "bfloat16"
        assert_matches_linear(layer, torch.randn(3, 172), bf16(source.weight.detach()), None)
    odd_rows = linear(40, 64)  # int4 packing needs N % 16 == 0
    layer = QuantizedLinear(odd_rows, "int4")
    assert layer.fmt == "int8"
    assert_matches_linear(layer, torch.randn(3, 64), reference_int8(odd_rows.weight.detach())[0], None)


def test_bad_values_are_refused_before_anything_changes(model_dir):
    model = nn.Sequential(linear(16, 32))
    for bad in ("int2", "float16", ""):
        with pytest.raises(ConfigError, match="weights_dtype"):
            quantize_linears(model, bad)
    with pytest.raises(ConfigError, match="group size"):
        quantize_linears(model, "int4", group_size=48)
    assert isinstance(model[0], nn.Linear)
    with pytest.raises(ConfigError, match="unknown weights dtype"):
        load_model(str(model_dir), weights_dtype="int3")
    with pytest.raises(ConfigError, match="cannot be combined with --offload"):
        load_model(str(model_dir), weights_dtype="int8", offload=OffloadConfig(mode="cpu"))


def stream_nll(model: nn.Module, ids: list[int]) -> float:
    engine = StreamingInference(model, StreamConfig(sink_tokens=4, window=60, chunk=16))
    row = engine.open_row()
    with torch.inference_mode():
        logprobs = torch.cat([r.logprobs for r in engine.append(row, ids)])
    return float(-logprobs[1:].mean())  # the first token has no prediction (NaN)


@pytest.fixture(scope="module")
def sotu_ids(model_dir, sotu_path):
    tokenizer = load_model(str(model_dir)).tokenizer
    return tokenizer(sotu_path.read_text()[:4000])["input_ids"][:600]


@pytest.mark.parametrize(("fmt", "relative_bound"), [("float32", 0.0), ("bfloat16", 0.01), ("int8", 0.01),
                                                     ("int4", 0.03)])
def test_quantised_model_streams_close_to_float32(model_dir, sotu_ids, fmt, relative_bound):
    """Streaming NLL over 600 tokens of sotu.txt (window 60: eviction included) with every Linear layer
    quantised is within the bound of float32's; float32 leaves the model untouched, bit for bit; the
    quantised weights take fewer bytes."""
    reference = load_model(str(model_dir))
    loaded = load_model(str(model_dir), weights_dtype=fmt)
    quantised = [m for m in loaded.model.modules() if isinstance(m, QuantizedLinear)]
    # 7 per layer and the LM head; where q/k/v and gate/up stack (core.fused_decoder) 4 per layer. int4 does
    # not stack here: k_proj (32 outputs) is not a whole block of 64 and gate/up fell back to int8.
    assert len(quantised) == {"float32": 0, "bfloat16": 5 * 4 + 1, "int8": 5 * 4 + 1, "int4": 5 * 7 + 1}[fmt]
    base = stream_nll(reference.model, sotu_ids)
    nll = stream_nll(loaded.model, sotu_ids)
    assert abs(nll - base) <= relative_bound * base, (nll, base)
    if fmt == "float32":
        assert nll == base
    else:
        assert weight_bytes(loaded.model) < 0.6 * weight_bytes(reference.model)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_generate_with_quantised_weights(model_dir, tmp_path, fmt):
    """`generate --weights-dtype int8` prints the published continuation exactly; int4 its first sentences
    (then its greedy path drifts: bench/results/weights_dtype.md)."""
    proc = run_generate(model_dir, PROMPT, REFERENCE_NEW_TOKENS, tmp_path, "--weights-dtype", fmt)
    assert proc.returncode == 0, proc.stderr
    if fmt == "int8":
        assert proc.stdout == REFERENCE_CONTINUATION + "\n"
    else:
        same = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
        assert proc.stdout.startswith(same) and REFERENCE_CONTINUATION.startswith(same)


def test_cli_refuses_a_bad_weights_dtype_and_a_remote_one(model_dir, tmp_path):
    proc = run_generate(model_dir, PROMPT, 4, tmp_path, "--weights-dtype", "int3")
    assert proc.returncode == 2 and "invalid choice: 'int3'" in proc.stderr
    remote = run_generate_against_server("--weights-dtype", "int8")
    assert remote.returncode == 2 and "sets the weights of an in-process run" in remote.stderr
