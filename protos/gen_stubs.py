"""Generate the Python gRPC stubs from protos/ (the single source of truth for the wire).

    python protos/gen_stubs.py            # rewrite the committed stubs in clients/sinkstream_pb/
    python protos/gen_stubs.py --out DIR  # write them elsewhere (tests compare the two)

Needs grpcio-tools pinned to the same version as grpcio (the `dev` extra). protoc writes
`sinkstream/v1/<name>_pb2*.py` importing each other as `sinkstream.v1`; the stubs live flat in the
`clients.sinkstream_pb` package, so those imports are rewritten to package-relative ones.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_PACKAGE_DIR = Path("sinkstream") / "v1"
DEFAULT_OUT = PROTO_ROOT.parent / "clients" / "sinkstream_pb"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
_ABSOLUTE_IMPORT = re.compile(r"^from sinkstream\.v1 import ", re.MULTILINE)


def proto_files() -> list[Path]:
    """The .proto files of sinkstream.v1, relative to PROTO_ROOT, sorted for a stable output."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PROTO_PACKAGE_DIR).glob("*.proto"))


def generated_names() -> list[str]:
    """File names the generator writes into the output folder."""
    return [p.stem + suffix for p in proto_files() for suffix in GENERATED_SUFFIXES]


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (grpc_tools) and write the flattened, import-fixed stubs into out_dir."""
    from grpc_tools import protoc  # dev-only dependency

    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto shipped with grpc_tools
    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *map(str, proto_files())]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed: " + " ".join(args))
        written = []
        for name in generated_names():
            text = (Path(tmp) / PROTO_PACKAGE_DIR / name).read_text()
            target = out_dir / name
            target.write_text(_ABSOLUTE_IMPORT.sub("from . import ", text))
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
