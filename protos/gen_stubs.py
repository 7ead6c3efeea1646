"""Generate the Python gRPC stubs beside the .proto files (the single source of truth for the wire).

    python protos/gen_stubs.py            # rewrite the committed stubs in protos/sinkstream/v1/
    python protos/gen_stubs.py --out DIR  # write DIR/sinkstream/v1/... instead (tests compare the two)

protoc runs with protos/ as the include root, so the stubs import each other as `sinkstream.v1`,
exactly the name they are installed under: nothing is rewritten. Needs grpcio-tools pinned to the same
version as grpcio (the `dev` extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_PACKAGE_DIR = Path("sinkstream") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """The .proto files of sinkstream.v1, relative to PROTO_ROOT, sorted for a stable output."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PROTO_PACKAGE_DIR).glob("*.proto"))


def generated_files() -> list[Path]:
    """Paths, relative to an output root, of the files protoc writes."""
    return [proto.parent / (proto.stem + suffix) for proto in proto_files() for suffix in GENERATED_SUFFIXES]


def generate(out_root: Path) -> list[Path]:
    """Run protoc (grpc_tools) with ``out_root`` as the output root; returns the files written."""
    from grpc_tools import protoc  # dev-only dependency

    out_root.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto shipped with grpc_tools
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", *map(str, proto_files())]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return [out_root / path for path in generated_files()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT,
                        help=f"output root; stubs go to OUT/{PROTO_PACKAGE_DIR} (default {PROTO_ROOT})")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
