"""sinkstream: gRPC streaming inference for Hugging Face causal LMs over unbounded inputs in fixed memory.

One import package, assembled from the repository's folders (see pyproject.toml):

- ``sinkstream.v1``: the wire contract, stubs generated beside ``protos/sinkstream/v1/sinkstream.proto``;
- ``sinkstream.core``: the streaming engine (PyTorch + transformers; no gRPC, no protobuf);
- ``sinkstream.service``: the gRPC server, adapting between the wire and the core;
- ``sinkstream.clients``: the client library (wire stubs only; no torch) and, in
  ``sinkstream.clients.cli``, the command line: the composition root that may start a server or run
  the core in-process.
"""
