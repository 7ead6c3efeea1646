"""Server bootstrap: model, sessions, scheduler, gRPC (health, reflection, keepalive, message limits),
metrics endpoint, SIGTERM graceful shutdown, and the `sinkstream serve` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sinkstream.core.config import ConfigError, StreamConfig, TierSpec
from sinkstream.core.model_loading import LoadedModel, load_model
from sinkstream.core.offload.config import add_offload_options, check_offload_options, offload_from_args
from sinkstream.service import logs
from sinkstream.service.allocator import keep_freed_memory
from sinkstream.service.engine_pool import EnginePool
from sinkstream.service.metrics import ServerMetrics
from sinkstream.service.options import Limits
from sinkstream.service.scheduler import Scheduler
from sinkstream.service.servicer import SinkStreamServicer
from sinkstream.service.session_manager import SessionManager
from sinkstream.service.session_store import SessionStore
from sinkstream.service.wire import add_servicer
from sinkstream.v1 import sinkstream_pb2 as pb
from sinkstream.v1 import sinkstream_pb2_grpc as pb_grpc

log = logging.getLogger("sinkstream.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SinkStream"].full_name


@dataclass
class ServerConfig:
    """Everything `sinkstream serve` can set (see build_parser for the meaning of each)."""

    model: str
    host: str = "127.0.0.1"
    port: int = 50051
    max_sessions: int = 256
    max_resident: int = 32
    max_cache_shapes: int = 4
    session_ttl_s: float = 3600.0
    idle_evict_s: float = 300.0
    state_dir: Path | None = None
    max_message_bytes: int = 64 << 20
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    keepalive_time_ms: int = 60_000
    keepalive_timeout_ms: int = 20_000
    min_client_ping_interval_ms: int = 10_000
    max_new_tokens: int = 4096
    max_top_k: int = 64
    max_stop_sequences: int = 16
    grace_s: float = 10.0
    decode_input_budget: int = 64
    defaults: StreamConfig = field(default_factory=StreamConfig)


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Channel arguments that avoid the usual traps: the 4 MiB receive limit, and GOAWAY too_many_pings
    for clients that send keepalive pings more often than gRPC's 5-minute default allows."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", config.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", config.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", config.min_client_ping_interval_ms),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.max_ping_strikes", 0),  # never GOAWAY a client for pinging too often
    ]


class SinkStreamServer:
    """A running server; build with `await SinkStreamServer.start(config, loaded)`."""

    def __init__(self, config: ServerConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        model_config = loaded.model.config
        self.limits = Limits(
            max_sessions=config.max_sessions, max_positions=model_config.max_position_embeddings,
            max_top_k=min(config.max_top_k, loaded.model.get_output_embeddings().out_features),
            max_new_tokens=config.max_new_tokens, max_stop_sequences=config.max_stop_sequences,
            max_message_bytes=config.max_message_bytes, max_cache_shapes=config.max_cache_shapes,
            session_ttl_s=config.session_ttl_s)
        config.defaults.validate(model_config.max_position_embeddings)
        pool = EnginePool(loaded.model, loaded.tokenizer, config.max_resident, config.max_cache_shapes,
                          self.metrics)
        store = SessionStore(Path(config.state_dir)) if config.state_dir is not None else None
        self.manager = SessionManager(pool, store, self.metrics, max_sessions=config.max_sessions,
                                      session_ttl_s=config.session_ttl_s, idle_evict_s=config.idle_evict_s)
        self.scheduler = Scheduler(self.manager, self.metrics, config.decode_input_budget)
        self.servicer = SinkStreamServicer(self.manager, self.scheduler, self.metrics, self.limits,
                                           config.defaults, loaded.name)
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(options=grpc_options(config))
        self.port = 0
        self._metrics_http = None

    @classmethod
    async def start(cls, config: ServerConfig, loaded: LoadedModel) -> SinkStreamServer:
        self = cls(config, loaded)
        add_servicer(pb_grpc.add_SinkStreamServicer_to_server, self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {config.host}:{config.port}")
        self.scheduler.start()
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if config.metrics_port is not None:
            self._metrics_http, _ = self.metrics.serve(config.metrics_port, config.metrics_host)
        log.info("serving", extra={"address": f"{config.host}:{self.port}", "model": loaded.name,
                                   "metrics_port": self.metrics_port})
        return self

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_http.server_port if self._metrics_http is not None else None

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: report NOT_SERVING, refuse new calls, give open streams `grace` seconds,
        then persist every session to the state directory."""
        grace = self.config.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.scheduler.stop()
        persisted = await self.manager.persist_all()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("stopped", extra={"persisted_sessions": persisted})


class ServerThread:
    """A server on its own event loop in a background thread (tests, benchmarks, embedding)."""

    def __init__(self, config: ServerConfig, loaded: LoadedModel) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.server: SinkStreamServer | None = None
        self._thread = threading.Thread(target=self._run, args=(config, loaded), daemon=True,
                                        name="sinkstream-server")
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _run(self, config: ServerConfig, loaded: LoadedModel) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self.server = self._loop.run_until_complete(SinkStreamServer.start(config, loaded))
        except BaseException as exc:  # report to the constructor
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return f"{self.server.config.host}:{self.server.port}"

    def call(self, coro, timeout: float = 60.0):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, grace: float = 0.5) -> None:
        if self.server is not None and self._loop.is_running():
            self.call(self.server.stop(grace))
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


# ---------------------------------------------------------------------- the `serve` command
def build_parser() -> argparse.ArgumentParser:
    d = ServerConfig(model="")
    p = argparse.ArgumentParser(prog="sinkstream serve", description="Run the sinkstream gRPC server.")
    p.add_argument("--model", required=True, help="model folder or Hugging Face hub id")
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"port; 0 picks a free one (default {d.port})")
    p.add_argument("--max-sessions", type=int, default=d.max_sessions,
                   help=f"live sessions, in memory or persisted (default {d.max_sessions})")
    p.add_argument("--max-resident", type=int, default=d.max_resident,
                   help=f"sessions in memory per cache shape = batch rows (default {d.max_resident})")
    p.add_argument("--max-cache-shapes", type=int, default=d.max_cache_shapes,
                   help=f"distinct session cache shapes served at once (default {d.max_cache_shapes})")
    p.add_argument("--session-ttl", type=float, default=d.session_ttl_s, metavar="SECONDS",
                   help=f"delete detached sessions unused this long; 0 = never (default {d.session_ttl_s:g})")
    p.add_argument("--idle-evict", type=float, default=d.idle_evict_s, metavar="SECONDS",
                   help="persist and release sessions idle this long (needs --state-dir; 0 = never; "
                        f"default {d.idle_evict_s:g})")
    p.add_argument("--state-dir", type=Path, help="where sessions are persisted (default: memory only)")
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes,
                   help=f"largest message sent or received (default {d.max_message_bytes})")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0 = any)")
    p.add_argument("--metrics-host", default=d.metrics_host)
    p.add_argument("--keepalive-time-ms", type=int, default=d.keepalive_time_ms,
                   help="server keepalive ping interval")
    p.add_argument("--keepalive-timeout-ms", type=int, default=d.keepalive_timeout_ms)
    p.add_argument("--min-client-ping-interval-ms", type=int, default=d.min_client_ping_interval_ms,
                   help="shortest client keepalive interval accepted without too_many_pings")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="limit per Generate")
    p.add_argument("--max-top-k", type=int, default=d.max_top_k, help="limit on analysis top_k")
    p.add_argument("--decode-input-budget", type=int, default=d.decode_input_budget, metavar="TOKENS",
                   help="input tokens per forward pass while sessions generate (0 = no limit; "
                        f"default {d.decode_input_budget}): lower = faster tokens, slower ingest")
    p.add_argument("--grace", type=float, default=d.grace_s, metavar="SECONDS",
                   help="on SIGTERM, time open streams get to finish")
    g = p.add_argument_group("session defaults")
    g.add_argument("--sink-tokens", type=int, default=d.defaults.sink_tokens)
    g.add_argument("--window", type=int, default=d.defaults.window)
    g.add_argument("--chunk", type=int, default=d.defaults.chunk)
    g.add_argument("--tiers", default="", help="e.g. 32x4,16x4")
    g.add_argument("--merge-policy", default=d.defaults.merge_policy)
    add_offload_options(p)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--plain-logs", action="store_true", help="human-readable logs instead of JSON lines")
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        model=args.model, host=args.host, port=args.port, max_sessions=args.max_sessions,
        max_resident=args.max_resident, max_cache_shapes=args.max_cache_shapes,
        session_ttl_s=args.session_ttl, idle_evict_s=args.idle_evict, state_dir=args.state_dir,
        max_message_bytes=args.max_message_bytes, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host, keepalive_time_ms=args.keepalive_time_ms,
        keepalive_timeout_ms=args.keepalive_timeout_ms,
        min_client_ping_interval_ms=args.min_client_ping_interval_ms, max_new_tokens=args.max_new_tokens,
        max_top_k=args.max_top_k, grace_s=args.grace, decode_input_budget=args.decode_input_budget,
        defaults=StreamConfig(sink_tokens=args.sink_tokens, window=args.window, chunk=args.chunk,
                              tiers=TierSpec.parse(args.tiers), merge_policy=args.merge_policy))


async def serve_until_signal(config: ServerConfig, loaded: LoadedModel) -> None:
    server = await SinkStreamServer.start(config, loaded)
    # Machine-readable line for supervisors and tests that pass --port 0.
    print(f"sinkstream: listening on {config.host}:{server.port}"
          + (f" metrics on {config.metrics_host}:{server.metrics_port}" if server.metrics_port else ""),
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"grace_s": config.grace_s})
    await server.stop()


def serve_main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if problem := check_offload_options(args):
        parser.error(problem)
    logs.configure(args.log_level, json_lines=not args.plain_logs)
    try:
        config = config_from_args(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        keep_freed_memory()  # passes reuse their temporaries instead of page-faulting them in each time
        loaded = load_model(args.model, offload=offload_from_args(args))
        asyncio.run(serve_until_signal(config, loaded))
    except (ConfigError, ValueError, OSError) as exc:
        print(f"sinkstream serve: error: {exc}", flush=True)
        return 2
    return 0
