"""Layer offloading: same numbers as the resident model, bounded residency, clear loader errors."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from sinkstream.core.config import ConfigError, StreamConfig
from sinkstream.core.model_loading import load_model
from sinkstream.core.offload.checkpoint import CheckpointError
from sinkstream.core.offload.config import OffloadConfig
from sinkstream.core.offload.loading import enable_layer_offload, load_model_offloaded
from sinkstream.core.offload.prefetch import OffloadError
from sinkstream.core.streaming import StreamingInference
from tests.tiny_models import tiny_config

MODES = ("disk", "cpu")
PROMPT = [1, 403, 407, 261, 378]  # "Once upon a time" for stories260K


def resident(path: Path, dtype: torch.dtype = torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()


def offloaded(path: Path, mode: str = "disk", k: int = 2, d: int = 1, dtype: torch.dtype = torch.float32,
              **options):
    model, offloader = load_model_offloaded(path, OffloadConfig(mode, k, d, **options), dtype=dtype)
    return model, offloader


def assert_same_outputs(ref, model, ids: torch.Tensor, new_tokens: int) -> None:
    """Bit-identical logits over `ids` [batch, seq] and identical greedy continuations."""
    with torch.inference_mode():
        assert torch.equal(ref(ids).logits, model(ids).logits)
        want = ref.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        got = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    assert torch.equal(want, got)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A random 4-layer Llama saved as several small safetensors shards."""
    config = tiny_config("llama")
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path, max_shard_size="40KB")
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


@pytest.fixture(scope="module")
def tiny_bf16_dir(tmp_path_factory) -> Path:
    """The same kind of model stored in bfloat16 (offloaded reads convert it on the fly)."""
    config = tiny_config("llama")
    config.num_hidden_layers = 3
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("tiny_llama_bf16")
    model.save_pretrained(path)
    return path


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize(("mode", "k", "d"), [("disk", 1, 0), ("disk", 2, 1), ("disk", 3, 2), ("cpu", 2, 1)])
def test_stories260k_logits_and_greedy_identical(model_dir, mode, k, d):
    ref = resident(model_dir)
    model, offloader = offloaded(model_dir, mode, k, d)
    assert_same_outputs(ref, model, torch.tensor([PROMPT]), new_tokens=40)
    assert offloader.stats.peak_materialised == d + 1
    offloader.close()


@pytest.mark.parametrize("mode", MODES)
def test_tiny_sharded_logits_identical(tiny_dir, mode):
    ref = resident(tiny_dir)
    model, offloader = offloaded(tiny_dir, mode, k=2, d=1)
    ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(3))
    assert_same_outputs(ref, model, ids, new_tokens=12)
    offloader.close()


def test_converts_checkpoint_dtype_like_from_pretrained(tiny_bf16_dir):
    ref = resident(tiny_bf16_dir, torch.float32)
    model, offloader = offloaded(tiny_bf16_dir, "disk", dtype=torch.float32)
    ids = torch.arange(1, 20)[None]
    with torch.inference_mode():
        assert torch.equal(ref(ids).logits, model(ids).logits)
    offloader.close()


@pytest.mark.parametrize("mode", MODES)
def test_chunked_prefill_then_decode_batch_of_two(tiny_dir, mode):
    """Chunks of 5 through a DynamicCache, then greedy single-token steps, two sequences at once."""
    ref = resident(tiny_dir)
    model, offloader = offloaded(tiny_dir, mode, k=2, d=1)
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(4))
    caches = {"ref": DynamicCache(config=ref.config), "off": DynamicCache(config=model.config)}
    with torch.inference_mode():
        for start in range(0, ids.shape[1], 5):
            chunk = ids[:, start : start + 5]
            a = ref(input_ids=chunk, past_key_values=caches["ref"], use_cache=True).logits
            b = model(input_ids=chunk, past_key_values=caches["off"], use_cache=True).logits
            assert torch.equal(a, b)
        for _ in range(6):
            nxt = a[:, -1].argmax(-1, keepdim=True)
            a = ref(input_ids=nxt, past_key_values=caches["ref"], use_cache=True).logits
            b = model(input_ids=nxt, past_key_values=caches["off"], use_cache=True).logits
            assert torch.equal(a, b)
    assert offloader.stats.loads == 4 * (5 + 6)  # 4 layers, one load each per forward pass
    offloader.close()


def test_streaming_inference_on_offloaded_model(model_dir):
    """The core engine (4-D masks, its own Cache, row batching, eviction) sees no difference."""
    config = StreamConfig(sink_tokens=4, window=60, chunk=16)
    ids = torch.randint(3, 512, (150,), generator=torch.Generator().manual_seed(5)).tolist()
    results = []
    loaded = load_model(str(model_dir), offload=OffloadConfig("disk", 2, 1))  # the CLI/server entry
    assert loaded.tokenizer is not None and all(p.is_meta for p in loaded.model.model.layers.parameters())
    for model in (resident(model_dir), loaded.model):
        engine = StreamingInference(model, config, max_rows=2)
        rows = [engine.open_row(seed=0), engine.open_row(seed=0)]
        chunks = [c.logprobs for c in engine.append(rows[0], [1, *ids])]
        batched = engine.step({rows[0]: ids[:7], rows[1]: ids[7:9]})
        results.append((torch.cat(chunks), batched[rows[0]].logprobs, batched[rows[1]].logprobs,
                        engine.next_logprobs(rows[1])))
    for want, got in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert results[0][0].isfinite().sum() == 150


# ----------------------------------------------------------------------------- residency invariant
@pytest.mark.parametrize(("k", "d"), [(1, 0), (2, 1), (3, 1), (3, 2), (4, 3)])
def test_never_more_than_k_layers_materialised(tiny_dir, k, d):
    model, offloader = offloaded(tiny_dir, "disk", k, d)
    layers = model.model.layers
    seen = []

    def check(module, args):  # runs after the offloader's own pre-hook
        bound = sum(any(not p.is_meta for p in layer.parameters()) for layer in layers)
        seen.append((offloader.stats.materialised, bound))

    filled = set()
    before_fetch = offloader.slots.before_fetch

    def record(slot):  # worker thread: the slot about to be written
        filled.add(slot)
        before_fetch(slot)

    offloader.slots.before_fetch = record
    for layer in layers:
        layer.register_forward_pre_hook(check)
    with torch.inference_mode():
        for n in (9, 1, 1, 4):
            model(torch.randint(0, 97, (1, n)))
    assert len(seen) == 4 * 4
    assert max(m for m, _ in seen) == min(k, d + 1) == offloader.stats.peak_materialised
    assert filled == set(range(min(k, d + 1)))  # slots reused LIFO: with K=3, D=1 slot 2 is never written
    assert all(b == 1 for _, b in seen)  # only the running layer is bound to the model
    assert len(offloader.slots.buffers) == k
    assert offloader.slots.nbytes >= k * max(offloader.layer_bytes)
    assert list(offloader.stats.order) == [0, 1, 2, 3] * 4
    # Between passes nothing is bound; only the prefetched layers hold slots.
    assert all(p.is_meta for p in layers.parameters())
    assert offloader.stats.materialised == d
    offloader.close()


def test_a_pass_aborted_mid_model_leaves_a_usable_offloader(tiny_dir):
    """An exception in layer 2 (layer 3 already prefetched) must not leak slots or break later passes."""
    ref = resident(tiny_dir)
    model, offloader = offloaded(tiny_dir, "disk", k=2, d=1)
    fail = [True]

    def explode_once(module, args):
        if fail.pop() if fail else False:
            raise RuntimeError("abort inside layer 2")

    model.model.layers[2].register_forward_pre_hook(explode_once)
    ids = torch.arange(1, 12)[None]
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="abort inside layer 2"):
            model(ids)
        assert all(p.is_meta for p in model.model.layers.parameters())
        for _ in range(2):
            assert torch.equal(ref(ids).logits, model(ids).logits)
    assert offloader.stats.peak_materialised == 2
    assert list(offloader.stats.order) == [0, 1, 2] + [0, 1, 2, 3] * 2
    offloader.close()


def test_enable_on_a_loaded_model_frees_its_layers(tiny_dir):
    ref = resident(tiny_dir)
    model = resident(tiny_dir)
    offloader = enable_layer_offload(model, tiny_dir, OffloadConfig("disk", 2, 1))
    assert all(p.is_meta for p in model.model.layers.parameters())
    ids = torch.arange(1, 30)[None]
    with torch.inference_mode():
        assert torch.equal(ref(ids).logits, model(ids).logits)
    for future in list(offloader._futures.values()):  # the next pass's layer 0 may still be loading
        future.result(timeout=60)
    offloader.close()
    assert offloader.slots.buffers == []  # an idle worker: the slots are freed before close returns


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(mode="ssd"), "offload"),
    (dict(mode="disk", resident_layers=0, prefetch_depth=0), "resident_layers"),
    (dict(mode="disk", prefetch_depth=-1), "prefetch_depth"),
    (dict(mode="disk", resident_layers=2, prefetch_depth=2), "prefetch_depth"),
    (dict(mode="disk", resident_layers=9, prefetch_depth=1), "resident_layers"),
])
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        OffloadConfig(**kwargs).validate(num_layers=5)
    assert info.value.field == field


# ----------------------------------------------------------------------------- loader failures
@pytest.mark.timeout(60)
def test_missing_shard_is_a_clear_error(tiny_dir, tmp_path):
    path = copy_checkpoint(tiny_dir, tmp_path / "ckpt")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}.*missing"):
        offloaded(path)


@pytest.mark.timeout(60)
def test_no_checkpoint_is_a_clear_error(tmp_path):
    tiny_config("llama").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no safetensors checkpoint"):
        offloaded(tmp_path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", ["garbage_header", "truncated"])
def test_corrupt_shard_is_a_clear_error(model_dir, tmp_path, damage):
    path = copy_checkpoint(model_dir, tmp_path / "ckpt")
    shard = path / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(b"\xff" * 64 + data[64:] if damage == "garbage_header" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        offloaded(path)


@pytest.mark.timeout(60)
def test_shard_truncated_after_loading_fails_the_forward_pass(tiny_dir, tmp_path):
    path = copy_checkpoint(tiny_dir, tmp_path / "ckpt")
    model, offloader = offloaded(path, "disk", k=2, d=1)
    for shard in path.glob("model-*.safetensors"):
        shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(OffloadError, match=r"decoder layer 0 failed: .*safetensors: tensor model\.layers\.0"):
        model(torch.arange(1, 5)[None])
    offloader.close()


@pytest.mark.timeout(60)
def test_worker_crash_surfaces_and_the_offloader_recovers(tiny_dir):
    ref = resident(tiny_dir)
    model, offloader = offloaded(tiny_dir, "disk", k=2, d=1)
    fetch = offloader.source.fetch

    def crash(layer, staging):
        raise RuntimeError(f"simulated worker crash on layer {layer}")

    offloader.source.fetch = crash
    ids = torch.arange(1, 9)[None]
    with torch.inference_mode():
        with pytest.raises(OffloadError, match="decoder layer 0 failed: simulated worker crash"):
            model(ids)
        offloader.source.fetch = fetch
        assert torch.equal(ref(ids).logits, model(ids).logits)
    offloader.close()


@pytest.mark.timeout(60)
def test_stuck_worker_times_out_instead_of_hanging(tiny_dir):
    model, offloader = offloaded(tiny_dir, "disk", k=2, d=1, load_timeout_s=0.5)
    release = threading.Event()
    offloader.source.fetch = lambda layer, staging: release.wait(10)
    with pytest.raises(OffloadError, match=r"did not load within 0\.5 s"):
        model(torch.arange(1, 5)[None])
    with pytest.raises(OffloadError, match="stuck"):  # stays failed: the slot may still be written
        model(torch.arange(1, 5)[None])
    assert offloader._worker.thread.daemon  # a hung read cannot keep the process alive at exit
    offloader.close()  # the worker is still stuck (up to 10 s): close must not wait for it
    assert offloader._worker.thread.is_alive()  # close returned while the stuck read still runs
    assert offloader.slots.buffers  # the stuck read may still write its slot: kept until it returns
    release.set()
    offloader._worker.thread.join(10)
    assert not offloader._worker.thread.is_alive() and offloader.slots.buffers == []


# ----------------------------------------------------------------------------- CUDA path
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_side_stream_prefetch_identical(model_dir, mode):
    ref = resident(model_dir).to("cuda")
    model, offloader = load_model_offloaded(model_dir, OffloadConfig(mode, 2, 1), device="cuda")
    for _ in range(3):
        assert_same_outputs(ref, model, torch.tensor([PROMPT], device="cuda"), new_tokens=40)
    assert offloader.stats.peak_materialised == 2
    offloader.close()
