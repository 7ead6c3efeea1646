"""Server bootstrap: model, sessions, scheduler, gRPC (health, reflection, keepalive, message limits,
TLS, bearer tokens), the health-only port, metrics endpoint, SIGHUP reload of tokens and certificates,
SIGTERM graceful shutdown. The `sinkstream serve` command that runs it is in the CLI."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sinkstream.core.config import StreamConfig
from sinkstream.core.model_loading import LoadedModel
from sinkstream.service.auth import AuthInterceptor, TokenTable
from sinkstream.service.engine_pool import EnginePool
from sinkstream.service.errors import RequestError
from sinkstream.service.leases import Leases
from sinkstream.service.metrics import ServerMetrics
from sinkstream.service.options import Limits
from sinkstream.service.quotas import NO_QUOTAS, TenantQuotas
from sinkstream.service.redis_log import RedisLogCommitter
from sinkstream.service.redis_state import LogRef, RedisStateStore, connect
from sinkstream.service.scheduler import Scheduler
from sinkstream.service.servicer import SinkStreamServicer
from sinkstream.service.session_manager import SessionManager, ShutdownReport
from sinkstream.service.session_store import SessionStore
from sinkstream.service.state_backend import LogCommitter, StateStore
from sinkstream.service.tls import CertificateSource, TLSFiles
from sinkstream.service.wire import add_servicer
from sinkstream.service.write_ahead_log import Done, GroupCommitter
from sinkstream.v1 import sinkstream_pb2 as pb
from sinkstream.v1 import sinkstream_pb2_grpc as pb_grpc

log = logging.getLogger("sinkstream.server")
END_STREAMS_S = 2.0  # after the grace: time for the streams ended by the server to send their last answers
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SinkStream"].full_name


@dataclass
class ServerConfig:
    """Everything `sinkstream serve` can set (see sinkstream.clients.cli.serve for the meaning of each)."""

    model: str
    host: str = "127.0.0.1"
    port: int = 50051
    max_sessions: int = 256
    max_resident: int = 32
    max_cache_shapes: int = 4
    session_ttl_s: float = 3600.0
    idle_evict_s: float = 300.0
    state_dir: Path | None = None
    state_store: str | None = None  # redis://host:port/db: shared with other replicas (instead of state_dir)
    advertise_address: str | None = None  # how other replicas name this one to clients (default host:port)
    lease_ttl_s: float = 5.0  # a session's lease lapses this long after its replica stopped renewing it
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
    durability: bool = True  # with a state_dir: numbered requests are logged and acknowledged once durable
    wal_sync: bool = True  # fsync the write-ahead log (off only for benchmarks measuring its cost)
    defaults: StreamConfig = field(default_factory=StreamConfig)
    tls: TLSFiles | None = None
    auth_tokens: Path | None = None
    health_port: int | None = None
    insecure_allow_remote: bool = False
    quotas: TenantQuotas = NO_QUOTAS
    max_batch_tokens: int = 0
    stalled_reader_s: float = 60.0
    speculate: int = 0  # draft tokens a speculative decoding pass verifies (0 = off; scheduler.py)


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 possibly in brackets) is this machine only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(config: ServerConfig) -> None:
    """ValueError if the server would let anyone who reaches it use every session: no tokens, and an
    address other than loopback without --insecure-allow-remote."""
    if config.auth_tokens is None and not config.insecure_allow_remote and not is_loopback(config.host):
        raise ValueError(f"refusing to listen on {config.host} without --auth-tokens: anyone reaching it "
                         "could read, write and delete every session; give --auth-tokens FILE, listen on "
                         "127.0.0.1, or pass --insecure-allow-remote")


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
        check_exposure(config)  # before anything starts (the log committer's thread)
        if config.speculate < 0:
            raise ValueError(f"speculate must be >= 0, got {config.speculate}")
        self.config = config
        self.metrics = ServerMetrics()
        model_config = loaded.model.config
        self.limits = Limits(
            max_sessions=config.max_sessions, max_positions=model_config.max_position_embeddings,
            max_top_k=min(config.max_top_k, loaded.model.get_output_embeddings().out_features),
            max_new_tokens=config.max_new_tokens, max_stop_sequences=config.max_stop_sequences,
            max_message_bytes=config.max_message_bytes, max_cache_shapes=config.max_cache_shapes,
            session_ttl_s=config.session_ttl_s)
        config.defaults.validate(model_config.max_position_embeddings, chunk_within_window=True)
        pool = EnginePool(loaded.model, loaded.tokenizer, config.max_resident, config.max_cache_shapes,
                          self.metrics)
        self._loop: asyncio.AbstractEventLoop | None = None
        store, self.committer, self.leases = self._state_store(config)
        self._lease_keeper: asyncio.Task | None = None
        self.manager = SessionManager(pool, store, self.metrics, max_sessions=config.max_sessions,
                                      session_ttl_s=config.session_ttl_s, idle_evict_s=config.idle_evict_s,
                                      quotas=config.quotas, stalled_reader_s=config.stalled_reader_s,
                                      committer=self.committer, durable=config.durability,
                                      leases=self.leases)
        self.scheduler = Scheduler(self.manager, self.metrics, config.decode_input_budget,
                                   config.max_batch_tokens, config.speculate)
        self.servicer = SinkStreamServicer(self.manager, self.scheduler, self.metrics, self.limits,
                                           config.defaults, loaded.name)
        self.health = health.aio.HealthServicer()
        self.tokens = TokenTable(Path(config.auth_tokens)) if config.auth_tokens is not None else None
        self.certificates = CertificateSource(config.tls) if config.tls is not None else None
        interceptors = [AuthInterceptor(self.tokens)] if self.tokens is not None else []
        self.server = grpc.aio.server(options=grpc_options(config), interceptors=interceptors)
        # Orchestrator probes that cannot present credentials: the health service alone, plaintext.
        self.health_server = grpc.aio.server() if config.health_port is not None else None
        self.port = 0
        self.health_port: int | None = None
        self._metrics_http = None

    def _state_store(self, config: ServerConfig) -> tuple[StateStore | None, LogCommitter | None,
                                                          Leases | None]:
        """The store sessions are persisted in, its log committer and (for a shared store) the leases."""
        if config.state_store is not None:
            if config.state_dir is not None:
                raise ValueError("--state-dir and --state-store are alternatives: give one")
            if config.lease_ttl_s <= 0:
                raise ValueError(f"--lease-ttl must be positive, not {config.lease_ttl_s:g}")
            client = connect(config.state_store)
            leases = Leases(client, config.lease_ttl_s)
            committer = RedisLogCommitter(client, self._post_durable, self._post_fenced)
            return RedisStateStore(client, leases), committer, leases
        if config.state_dir is None:
            return None, None, None
        store = SessionStore(Path(config.state_dir))
        return store, GroupCommitter(self._post_durable, sync=config.wal_sync), None

    def _post_fenced(self, ref: LogRef) -> None:
        """Log committer thread: the store refused a session's write (another replica owns it now)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.manager.moved, ref.key, ref.generation)

    def _post_durable(self, results: list[tuple[Done, BaseException | None]]) -> None:
        """Log committer thread: hand a round's durable records to the event loop (acks are sent there)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_run_durable, results)

    @classmethod
    async def start(cls, config: ServerConfig, loaded: LoadedModel) -> SinkStreamServer:
        self = cls(config, loaded)
        self._loop = asyncio.get_running_loop()
        add_servicer(pb_grpc.add_SinkStreamServicer_to_server, self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        address = f"{config.host}:{config.port}"
        self.port = (self.server.add_secure_port(address, self.certificates.credentials())
                     if self.certificates is not None else self.server.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        if self.leases is not None:
            self.leases.advertise(config.advertise_address or f"{config.host}:{self.port}")
            self._lease_keeper = asyncio.create_task(self.manager.keep_leases(config.lease_ttl_s / 3),
                                                     name="sinkstream-leases")
        if self.health_server is not None:
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = self.health_server.add_insecure_port(f"{config.host}:{config.health_port}")
            if self.health_port == 0:
                raise OSError(f"cannot listen on {config.host}:{config.health_port} (--health-port)")
            await self.health_server.start()
        self.scheduler.start()
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if config.metrics_port is not None:
            self._metrics_http, _ = self.metrics.serve(config.metrics_port, config.metrics_host)
        log.info("serving", extra={"address": f"{config.host}:{self.port}", "model": loaded.name,
                                   "metrics_port": self.metrics_port, "health_port": self.health_port,
                                   "tls": self.certificates is not None, "auth": self.tokens is not None})
        if self.tokens is None and is_loopback(config.host):
            log.info("no --auth-tokens: listening on loopback only, where every local client can use every "
                     "session (--auth-tokens FILE, or --insecure-allow-remote, to listen elsewhere)")
        elif self.tokens is None:
            log.warning("no --auth-tokens and --insecure-allow-remote: every client that reaches %s can "
                        "use every session", config.host)
        return self

    def reload(self) -> None:
        """SIGHUP: read the tokens file and the certificates again (each keeps its current contents if
        the new ones cannot be used); open streams are not disturbed."""
        if self.tokens is not None:
            self.tokens.reload()
        if self.certificates is not None:
            self.certificates.reload()

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_http.server_port if self._metrics_http is not None else None

    async def stop(self, grace: float | None = None) -> ShutdownReport:
        """Graceful shutdown: report NOT_SERVING, refuse new calls, give open streams `grace` seconds, end
        the streams still open with UNAVAILABLE (each request they will get no answer to is answered with
        an error first), then persist every session to the state directory, each on its own. Returns
        which sessions were saved and which failed to."""
        grace = self.config.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        # grpc cancels the calls still open after its grace; ours ends them first, with their answers
        stopping = asyncio.create_task(self.server.stop(grace + END_STREAMS_S))
        await asyncio.wait([stopping], timeout=grace)
        await self.scheduler.stop()
        self.manager.end_streams(RequestError(
            grpc.StatusCode.UNAVAILABLE, "the server is shutting down; this request was not processed (its "
            "input is kept with the session: resume it on a server with the same state directory)"))
        await stopping
        if self._lease_keeper is not None:
            self._lease_keeper.cancel()
        if self.health_server is not None:
            await self.health_server.stop(0)
        report = await self.manager.persist_all()
        if self.committer is not None:
            await asyncio.to_thread(self.committer.stop)  # everything logged is on disk
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if report.all_saved:
            log.info("stopped", extra={"persisted_sessions": len(report.saved)})
        else:
            log.error("stopped; some sessions could not be persisted",
                      extra={"persisted_sessions": len(report.saved), "failed_sessions": report.failed})
        return report


def _run_durable(results: list[tuple[Done, BaseException | None]]) -> None:
    for done, error in results:
        try:
            done(error)
        except Exception:  # one session's ack must not stop the others'
            log.exception("acknowledging a durable record failed")


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

    def stop(self, grace: float = 0.5) -> ShutdownReport | None:
        """Stop the server (see SinkStreamServer.stop); None if it was not running."""
        report = None
        if self.server is not None and self._loop.is_running():
            report = self.call(self.server.stop(grace))
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        return report


async def serve_until_signal(config: ServerConfig, loaded: LoadedModel) -> ShutdownReport:
    """Serve until SIGTERM / SIGINT, then stop gracefully; returns what persisting the sessions did."""
    server = await SinkStreamServer.start(config, loaded)
    # Machine-readable line for supervisors and tests that pass --port 0.
    print(f"sinkstream: listening on {config.host}:{server.port}"
          + (f" metrics on {config.metrics_host}:{server.metrics_port}" if server.metrics_port else "")
          + (f" health on {config.host}:{server.health_port}" if server.health_port else ""),
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    await stop.wait()
    log.info("shutting down", extra={"grace_s": config.grace_s})
    return await server.stop()
