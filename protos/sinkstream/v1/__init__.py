"""Python stubs of the sinkstream.v1 wire contract, generated beside ``sinkstream.proto``.

Import them as protoc writes them: ``from sinkstream.v1 import sinkstream_pb2, sinkstream_pb2_grpc``.
Do not edit the ``*_pb2*`` files by hand: change the .proto and run ``python protos/gen_stubs.py``
(tests/test_protos.py fails when they are stale).
"""
