"""sinkstream.core: the streaming engine (PyTorch + transformers; no gRPC, no protobuf).

Start at `streaming.StreamingInference`: rows of a bounded `sink_cache.SinkCache`, chunked forward passes,
per-token log-probs; `generation` continues a row, `snapshot` saves and restores one.
"""
