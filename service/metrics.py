"""Prometheus metrics of one server, in its own registry (several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """Counters, gauges and histograms the scheduler and servicer update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tokens = Counter("sinkstream_tokens_processed", "Tokens run through the model",
                              ["kind"], registry=r)  # kind: input | generated
        # per tenant (the tenants of the tokens file, or "default"): bounded by the operator's file
        self.tenant_tokens = Counter("sinkstream_tenant_tokens_processed", "Tokens run through the model "
                                     "per tenant", ["tenant", "kind"], registry=r)
        self.tenant_sessions = Gauge("sinkstream_tenant_sessions", "Live sessions per tenant",
                                     ["tenant", "state"], registry=r)
        self.stalled_streams = Counter("sinkstream_stalled_streams", "Streams ended because their client "
                                       "read no reply for too long (their sessions kept)", registry=r)
        self.sessions = Gauge("sinkstream_sessions", "Live sessions", ["state"], registry=r)
        self.attached = Gauge("sinkstream_attached_streams", "Streams attached to sessions", registry=r)
        self.queue_depth = Gauge("sinkstream_queue_depth", "Requests queued in sessions, not yet started",
                                 registry=r)
        self.pending_tokens = Gauge("sinkstream_pending_tokens", "Input tokens waiting for a forward pass",
                                    registry=r)
        self.batch_rows = Histogram("sinkstream_batch_rows", "Sessions per forward pass",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.batch_tokens = Histogram("sinkstream_batch_tokens", "Tokens per forward pass",
                                      buckets=(1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096), registry=r)
        self.step_seconds = Histogram("sinkstream_step_seconds", "Forward pass wall time",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft_seconds = Histogram("sinkstream_time_to_first_token_seconds",
                                      "Generate request arrival to its first token", buckets=_LATENCY_BUCKETS,
                                      registry=r)
        self.token_seconds = Histogram("sinkstream_inter_token_seconds",
                                       "Time between generated tokens of one generation",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.speculative_passes = Counter("sinkstream_speculative_passes", "Speculative decoding passes "
                                          "(one per round that verified a draft)", registry=r)
        self.speculative_accepted = Counter("sinkstream_speculative_accepted_tokens", "Draft tokens "
                                            "accepted by speculative passes", registry=r)
        self.cache_bytes = Gauge("sinkstream_cache_bytes", "Bytes of preallocated KV cache", registry=r)
        self.requests = Counter("sinkstream_requests", "Stream requests received", ["kind"], registry=r)
        self.errors = Counter("sinkstream_errors", "Requests or streams refused", ["code"], registry=r)
        self.evictions = Counter("sinkstream_evictions", "Sessions persisted and released from memory",
                                 registry=r)
        self.recoveries = Counter("sinkstream_recoveries",
                                  "Sessions recovered from their write-ahead log after a restart", registry=r)
        self.restores = Counter("sinkstream_restores", "Sessions restored from the state directory",
                                registry=r)

    def serve(self, port: int, addr: str = "127.0.0.1"):
        """Start the /metrics HTTP endpoint; returns (http server, thread)."""
        return start_http_server(port, addr=addr, registry=self.registry)
