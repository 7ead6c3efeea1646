"""sinkstream.service: the gRPC server, adapting between the wire (`sinkstream.v1`) and the core.

A request goes servicer -> convert (wire to plain values) -> intake / session_manager -> scheduler (the
forward pass in the core) -> replies -> convert (plain values to wire) -> servicer.
"""
