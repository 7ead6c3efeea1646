"""The sinkstream client library (`client`: synchronous, `aio`: asyncio, over the transport-independent
`protocol`; `results`: the typed results; `analysis`, `passages`: document summaries). It imports only the
wire stubs (sinkstream.v1), grpc, protobuf and the standard library: no torch, no core, no service.
The `sinkstream` command is the subpackage `cli`."""
