"""Python stubs of the sinkstream.v1 wire contract, generated from protos/ by `python protos/gen_stubs.py`.

Do not edit the *_pb2*.py files by hand: change the .proto files and regenerate (tests/test_protos.py fails
when these files are stale).
"""

from . import sinkstream_pb2, sinkstream_pb2_grpc

__all__ = ["sinkstream_pb2", "sinkstream_pb2_grpc"]
