"""Allocator tuning: a forward pass's big temporaries are reused, not page-faulted in again every pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# 30 chunked passes of a one-layer Llama with a 32000-token vocabulary (logits [64, 32000] per pass) on a
# worker thread, as the server runs them; minor page faults of the process counted.
_PROBE = """
import json, resource, sys, threading, torch
from transformers import LlamaConfig, LlamaForCausalLM
from core.config import StreamConfig
from core.streaming import StreamingInference
from service.allocator import keep_freed_memory

tuned = keep_freed_memory() if sys.argv[1] == "tuned" else False
torch.set_num_threads(1)
torch.manual_seed(0)
config = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
engine = StreamingInference(LlamaForCausalLM(config).eval(), StreamConfig(sink_tokens=4, window=60, chunk=64))
row = engine.open_row(seed=0)
faults = []

def passes():
    engine.step({row: list(range(3, 67))})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(30):
        engine.step({row: list(range(3 + i, 67 + i))})
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

worker = threading.Thread(target=passes)
worker.start()
worker.join()
print(json.dumps({"tuned": tuned, "faults": faults[0]}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=REPO_ROOT, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_keeping_freed_memory_stops_refaulting_pass_temporaries():
    plain, tuned = _faults("plain"), _faults("tuned")
    assert tuned["tuned"], "mallopt was refused"
    # Untuned, each pass maps its logits and log-softmax (2 x 8 MB = 4000 pages) in again.
    assert plain["faults"] > 30 * 4000
    assert tuned["faults"] < plain["faults"] / 10
