"""`sinkstream serve`: its options, the ServerConfig they make, and running the server until SIGTERM.
Imports torch (the server extra); the command line imports this module only when `serve` runs."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import torch

from sinkstream.clients.cli.options import (
    add_cache_shape_options,
    add_dtype_option,
    add_kv_dtype_option,
    add_offload_options,
    add_speculate_option,
    add_weights_dtype_option,
    check_offload_options,
)
from sinkstream.clients.cli.profile_options import add_profile_option, apply_profile
from sinkstream.core.config import ConfigError, StreamConfig
from sinkstream.core.model_loading import load_model
from sinkstream.core.offload.config import offload_from_args
from sinkstream.service import logs
from sinkstream.service.allocator import keep_freed_memory
from sinkstream.service.quotas import TenantQuotas
from sinkstream.service.server import ServerConfig, serve_until_signal
from sinkstream.service.session_store import prepare_state_dir
from sinkstream.service.tls import TLSFiles


def build_parser() -> argparse.ArgumentParser:
    """The options of `sinkstream serve` (defaults: ServerConfig's)."""
    d = ServerConfig(model="")
    p = argparse.ArgumentParser(prog="sinkstream serve", description="Run the sinkstream gRPC server.")
    p.add_argument("--model", required=True, help="model folder, .gguf file or Hugging Face hub id")
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
    r = p.add_argument_group("several replicas (see \"Running several replicas\" in the README)")
    r.add_argument("--state-store", metavar="URL",
                   help="persist sessions in Redis, shared with the other replicas (redis://host:port/db; "
                        "instead of --state-dir): any replica can take a session over")
    r.add_argument("--advertise-address", metavar="HOST:PORT",
                   help="how the other replicas name this one to clients (default --host:port)")
    r.add_argument("--lease-ttl", type=float, default=d.lease_ttl_s, metavar="SECONDS",
                   help="with --state-store: a replica's sessions can be taken over this long after it "
                        f"stopped renewing their leases (default {d.lease_ttl_s:g})")
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
    p.add_argument("--durability", choices=("on", "off"), default="on" if d.durability else "off",
                   help="with --state-dir or --state-store: log numbered requests to a per-session "
                        "write-ahead log and acknowledge them once durable, so they survive kill -9 "
                        "(default on)")
    p.add_argument("--grace", type=float, default=d.grace_s, metavar="SECONDS",
                   help="on SIGTERM, time open streams get to finish")
    add_security_options(p, d)
    add_cache_shape_options(p, title="session defaults")
    add_kv_dtype_option(p)
    add_dtype_option(p)
    add_weights_dtype_option(p)
    add_speculate_option(p, "every session's greedy generations, and sampled ones without a write-ahead log")
    add_profile_option(p)
    add_offload_options(p)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--plain-logs", action="store_true", help="human-readable logs instead of JSON lines")
    return p


def add_security_options(p: argparse.ArgumentParser, d: ServerConfig) -> None:
    """TLS, tokens, the health port and per-tenant quotas (see "Securing a server" in the README)."""
    g = p.add_argument_group("security (SIGHUP reloads the tokens file and the certificates)")
    g.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate (chain); enables TLS")
    g.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")
    g.add_argument("--tls-client-ca", type=Path, metavar="PEM",
                   help="mutual TLS: clients must present a certificate signed by this CA")
    g.add_argument("--auth-tokens", type=Path, metavar="FILE",
                   help="`TOKEN TENANT` per line (# comments): every call but health needs "
                        "`authorization: Bearer TOKEN` and sees only its tenant's sessions")
    g.add_argument("--health-port", type=int, metavar="PORT",
                   help="also serve the health service alone, plaintext and without tokens, on this port")
    g.add_argument("--insecure-allow-remote", action="store_true",
                   help="without --auth-tokens, listen on a --host other than loopback anyway")
    q = p.add_argument_group("per-tenant quotas and fair share (0 = no limit)")
    q.add_argument("--tenant-max-sessions", type=int, default=d.quotas.max_sessions, metavar="N",
                   help="live sessions per tenant, resident or persisted")
    q.add_argument("--tenant-max-rows", type=int, default=d.quotas.max_rows, metavar="N",
                   help="resident sessions (cache rows) per tenant; more are persisted (needs --state-dir) "
                        "or refused")
    q.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens, metavar="TOKENS",
                   help="input tokens per forward pass, shared fairly between tenants, then sessions")
    q.add_argument("--stalled-reader-timeout", type=float, default=d.stalled_reader_s, metavar="SECONDS",
                   help="end a stream whose client reads no reply this long; its session stays "
                        f"(default {d.stalled_reader_s:g})")


def tls_files(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TLSFiles | None:
    """The TLS files the options name (a usage error if only one of --tls-cert and --tls-key is given)."""
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            parser.error("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        parser.error("--tls-cert and --tls-key go together")
    return TLSFiles(args.tls_cert, args.tls_key, args.tls_client_ca)


def config_from_args(args: argparse.Namespace, tls: TLSFiles | None = None) -> ServerConfig:
    """The ServerConfig of parsed `serve` options (--tiers already parsed; `tls`: see tls_files)."""
    return ServerConfig(
        model=args.model, host=args.host, port=args.port, max_sessions=args.max_sessions,
        max_resident=args.max_resident, max_cache_shapes=args.max_cache_shapes,
        session_ttl_s=args.session_ttl, idle_evict_s=args.idle_evict, state_dir=args.state_dir,
        state_store=args.state_store, advertise_address=args.advertise_address, lease_ttl_s=args.lease_ttl,
        max_message_bytes=args.max_message_bytes, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host, keepalive_time_ms=args.keepalive_time_ms,
        keepalive_timeout_ms=args.keepalive_timeout_ms,
        min_client_ping_interval_ms=args.min_client_ping_interval_ms, max_new_tokens=args.max_new_tokens,
        max_top_k=args.max_top_k, grace_s=args.grace, decode_input_budget=args.decode_input_budget,
        durability=args.durability == "on",
        defaults=StreamConfig(sink_tokens=args.sink_tokens, window=args.window, chunk=args.chunk,
                              tiers=args.tiers, merge_policy=args.merge_policy,
                              kv_dtype=args.kv_dtype or "model", keep_rotated_keys=args.keep_rotated_keys),
        tls=tls, auth_tokens=args.auth_tokens, health_port=args.health_port,
        insecure_allow_remote=args.insecure_allow_remote,
        quotas=TenantQuotas(max_sessions=args.tenant_max_sessions, max_rows=args.tenant_max_rows),
        max_batch_tokens=args.max_batch_tokens, stalled_reader_s=args.stalled_reader_timeout,
        speculate=args.speculate)


def serve_main(argv: list[str] | None = None) -> int:
    """Run `sinkstream serve` with `argv` until SIGTERM / SIGINT; returns the exit status: 0, 1 when a
    session could not be persisted at shutdown, 2 when the server could not start."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        apply_profile(args)  # before the checks: a profile may set --offload
    except ConfigError as exc:
        parser.error(str(exc))
    if problem := check_offload_options(args):
        parser.error(problem)
    tls = tls_files(parser, args)
    logs.configure(args.log_level, json_lines=not args.plain_logs)
    try:
        config = config_from_args(args, tls)
        if args.threads:
            torch.set_num_threads(args.threads)
        keep_freed_memory()  # passes reuse their temporaries instead of page-faulting them in each time
        if config.state_dir is not None:
            prepare_state_dir(config.state_dir)  # refused now, not once per second while serving
        loaded = load_model(args.model, dtype=getattr(torch, args.dtype), offload=offload_from_args(args),
                            weights_dtype=args.weights_dtype)
        report = asyncio.run(serve_until_signal(config, loaded))
    except (ConfigError, ValueError, OSError) as exc:
        print(f"sinkstream serve: error: {exc}", flush=True)
        return 2
    for session_id, why in report.failed.items():
        print(f"sinkstream serve: error: session {session_id} was not persisted: {why}", flush=True)
    return 0 if report.all_saved else 1
