"""SmolLM2-135M-Instruct served over gRPC (issue 13): ingest over gRPC against in-process, and chat latency
as a conversation grows.

  ingest  the same sotu.txt text (default 40,000 characters, about 9k tokens) ingested in 8,192-character
          pieces by the in-process core (IncrementalEncoder + StreamingInference, as the server does) and
          by a `sinkstream serve` process through the asyncio client, alternating, best of --repeat runs.
  chat    one session with a system message; user messages of about 1,000 tokens of sotu.txt and short
          assistant messages are appended with the chat protocol (AppendMessage) until the conversation
          holds 1k, 10k and 50k tokens; at each mark a user question is appended, then a greedy chat
          reply of --reply-tokens tokens is generated. Time to first token (client side, from sending
          Generate; the question was already processed), ms/token of the reply (median gap between
          tokens), and the time to append and process the question (it re-renders the conversation).

Both use S = 4, W = 1020, C = 64 and the same number of torch threads (--threads, default 1: on a shared
machine two threads per process oversubscribe the cores) in the server and in-process.

  SINKSTREAM_CACHE_DIR=/tmp/ggufcache python bench/smollm2_serving_bench.py     # about 10 minutes here
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grpc_bench import ingest_pieces, pieces, start_server  # noqa: E402  (bench/ is on sys.path when run as a script)

from sinkstream.clients.aio import AsyncSinkStreamClient  # noqa: E402
from sinkstream.clients.results import GenerateParams, SessionSettings  # noqa: E402
from sinkstream.core.config import StreamConfig  # noqa: E402
from sinkstream.core.model_loading import load_model  # noqa: E402
from sinkstream.core.streaming import StreamingInference  # noqa: E402

SHARED = Path(os.environ.get("SINKSTREAM_SHARED", ROOT.parent / "shared"))
GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SOTU = SHARED / "data" / "sotu.txt"
RESULTS = ROOT / "bench" / "results"
CONFIG = StreamConfig(sink_tokens=4, window=1020, chunk=64)
SETTINGS = SessionSettings(sink_tokens=4, window=1020, chunk=64, logprobs=True)
SYSTEM = "You are a concise assistant. Answer in one short sentence."
QUESTION = "In one sentence, what was the last message about?"


@torch.inference_mode()
def in_process_ingest(loaded, text: str) -> tuple[int, float]:
    """(tokens, seconds) for the core alone: tokenizing pieces incrementally, whole chunks as they come."""
    engine = StreamingInference(loaded.model, CONFIG)
    return ingest_pieces(engine, engine.open_row(), loaded.tokenizer, text)


async def grpc_ingest(address: str, text: str) -> tuple[int, float]:
    async with AsyncSinkStreamClient(address) as client:
        session = await client.open_session(SETTINGS)
        started = time.perf_counter()
        tokens = 0
        async for chunk in session.stream_text(pieces(text)):
            tokens += chunk.num_tokens
        seconds = time.perf_counter() - started
        await session.close()
    return tokens, seconds


async def chat_marks(address: str, text: str, marks: list[int], reply_tokens: int) -> list[dict]:
    """Grow one conversation to each mark (tokens in the stream) and time a chat reply there."""
    out = []
    paragraphs = pieces(text, 4500)  # about 1,000 tokens each
    async with AsyncSinkStreamClient(address) as client:
        session = await client.open_session(SETTINGS, system_message=SYSTEM)
        seen, k, t0 = 0, 0, time.perf_counter()
        for mark in marks:
            while seen < mark:
                await session.append_message("user", paragraphs[k % len(paragraphs)])
                chunks = await session.append_message("assistant", "Noted.")
                seen = chunks[-1].tokens_seen if chunks else seen
                k += 1
            print(f"  conversation at {seen} tokens after {time.perf_counter() - t0:.0f} s", flush=True)
            q0 = time.perf_counter()
            await session.append_message("user", QUESTION)
            question_s = time.perf_counter() - q0
            stamps, text_out = [], ""
            g0 = time.perf_counter()
            async for token in session.generate_stream(GenerateParams(max_new_tokens=reply_tokens,
                                                                      chat_reply=True)):
                stamps.append(time.perf_counter())
                text_out += token.text
            result = session.last_generation
            gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
            out.append({"conversation_tokens": seen, "question_s": question_s,
                        "ttft_s": stamps[0] - g0 if stamps else float("nan"),
                        "server_ttft_s": result.time_to_first_token_s,
                        "ms_per_token": statistics.median(gaps) * 1e3 if gaps else float("nan"),
                        "reply_tokens": result.generated_tokens, "stop": result.stop_reason,
                        "reply": text_out, "tokens_seen_after": result.tokens_seen})
            print(f"  {out[-1]}", flush=True)
            seen = result.tokens_seen
        await session.close()
    return out


def markdown(d: dict) -> str:
    ing = d["ingest"]
    best_in = max(r["tokens"] / r["seconds"] for r in ing["in_process"])
    best_grpc = max(r["tokens"] / r["seconds"] for r in ing["grpc"])
    lines = [
        "# SmolLM2-135M-Instruct over gRPC: ingest vs in-process, and chat latency",
        "",
        f"Command: `{d['command']}` ({d['wall_s']:.0f} s in all; load average {d['load_before']} before, "
        f"{d['load_after']} after, on a 2-core machine shared with other jobs).",
        "",
        f"Model `{GGUF.name}` de-quantised to fp32; S = 4, W = 1020, C = 64; {d['threads']} torch "
        f"thread(s) in the server and in-process.",
        "",
        f"## Ingest, one stream ({ing['chars']:,} characters of sotu.txt, best of {len(ing['grpc'])} "
        f"alternating runs; target gRPC >= 0.95 of in-process)",
        "",
        "| path | tokens | runs, tokens/s | best tokens/s | vs in-process |",
        "|---|---:|---|---:|---:|",
        f"| in-process core | {ing['in_process'][0]['tokens']:,} | "
        + ", ".join(f"{r['tokens'] / r['seconds']:.0f}" for r in ing["in_process"])
        + f" | {best_in:.0f} | 1.00 |",
        f"| gRPC (`sinkstream serve`, asyncio client) | {ing['grpc'][0]['tokens']:,} | "
        + ", ".join(f"{r['tokens'] / r['seconds']:.0f}" for r in ing["grpc"])
        + f" | {best_grpc:.0f} | **{best_grpc / best_in:.2f}** |",
        "",
        f"## Chat latency as the conversation grows (greedy reply of up to {d['reply_tokens']} tokens)",
        "",
        f"System message: \"{SYSTEM}\" (pinned). User messages: about 1,000 tokens of sotu.txt each, each "
        f"followed by the assistant message \"Noted.\". Question: \"{QUESTION}\"",
        "",
        "| conversation tokens | append question (s) | time to first token (s) | server TTFT (s) | "
        "ms/token (median) | reply tokens | stop | reply |",
        "|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for m in d["chat"]:
        reply = m["reply"].replace("|", "\\|").replace("\n", " ")[:80]
        lines.append(f"| {m['conversation_tokens']:,} | {m['question_s']:.2f} | {m['ttft_s']:.3f} | "
                     f"{m['server_ttft_s']:.3f} | {m['ms_per_token']:.1f} | {m['reply_tokens']} | "
                     f"{m['stop']} | {reply} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ingest-chars", type=int, default=40_000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--marks", default="1000,10000,50000")
    ap.add_argument("--reply-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = SOTU.read_text()
    loaded = load_model(str(GGUF))
    proc, address = start_server(str(GGUF), rows=4, threads=args.threads)
    try:
        asyncio.run(grpc_ingest(address, text[:4000]))  # warm-up: engine allocation
        in_process_ingest(loaded, text[:4000])
        ingest: dict = {"chars": args.ingest_chars, "in_process": [], "grpc": []}
        body = text[: args.ingest_chars]
        for run in range(args.repeat):
            n, s = in_process_ingest(loaded, body)
            ingest["in_process"].append({"tokens": n, "seconds": s})
            n, s = asyncio.run(grpc_ingest(address, body))
            ingest["grpc"].append({"tokens": n, "seconds": s})
            print(f"ingest run {run}: in-process {ingest['in_process'][-1]}, gRPC {ingest['grpc'][-1]}",
                  flush=True)
        del loaded
        marks = [int(m) for m in args.marks.split(",")]
        chat = asyncio.run(chat_marks(address, text[args.ingest_chars:], marks, args.reply_tokens))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    data = {"command": "python bench/smollm2_serving_bench.py " + " ".join(sys.argv[1:]),
            "ingest": ingest, "chat": chat, "reply_tokens": args.reply_tokens, "threads": args.threads,
            "wall_s": time.perf_counter() - started, "load_before": load_before,
            "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    (RESULTS / "smollm2_serving.json").write_text(json.dumps(data, indent=1))
    (RESULTS / "smollm2_serving.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
