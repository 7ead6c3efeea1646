"""The committed stubs match protos/, the client side imports without torch, the .proto is documented and
compiles to other languages' message code (C++, Java) with the options their gRPC plugins rely on."""

from __future__ import annotations

import ast
import filecmp
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

STUBS = REPO_ROOT / "protos"  # stubs live beside the .proto: protos/sinkstream/v1/*_pb2*.py
PROTO = "sinkstream/v1/sinkstream.proto"


def file_descriptor(tmp_path: Path, source_info: bool = False):
    """The FileDescriptorProto of PROTO, compiled by the bundled protoc (grpc_tools)."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    protoc_include = Path(protoc.__file__).parent / "_proto"
    flags = ["--include_source_info"] if source_info else []
    assert protoc.main(["protoc", f"-I{REPO_ROOT / 'protos'}", f"-I{protoc_include}", *flags,
                        f"--descriptor_set_out={out}", PROTO]) == 0
    (file,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return file


def full_protoc() -> str | None:
    """A protoc with the C++ and Java generators built in: $PROTOC, `protoc` on PATH, or the one torch ships.
    (grpc_tools' bundled protoc only has the Python generators.)"""
    candidates = [os.environ.get("PROTOC"), shutil.which("protoc")]
    torch = importlib.util.find_spec("torch")  # located, not imported
    if torch is not None and torch.submodule_search_locations:
        candidates.append(str(Path(next(iter(torch.submodule_search_locations))) / "bin" / "protoc"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def test_committed_stubs_are_up_to_date(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT / "protos"))
    try:
        import gen_stubs
    finally:
        sys.path.remove(str(REPO_ROOT / "protos"))
    written = gen_stubs.generate(tmp_path)
    assert written, "no .proto files found"
    stale = [str(p.relative_to(tmp_path)) for p in written
             if not filecmp.cmp(p, STUBS / p.relative_to(tmp_path), shallow=False)]
    assert not stale, f"stale stubs {stale}: run `python protos/gen_stubs.py` and commit the result"


def test_stubs_and_client_import_without_torch() -> None:
    # torch and transformers are made unimportable, as on a client-only install. The client library imports
    # the stubs and nothing else of sinkstream; the CLI may add the torch-free option modules of core (their
    # defaults and validation are shared with the server) and nothing else.
    code = (
        "import sys\n"
        "sys.modules.update({'torch': None, 'transformers': None})\n"
        "import sinkstream.clients.aio, sinkstream.clients.client, sinkstream.clients.analysis\n"
        "from sinkstream.v1 import sinkstream_pb2, sinkstream_pb2_grpc\n"
        "assert sinkstream_pb2.DESCRIPTOR.package == 'sinkstream.v1'\n"
        "bad = [m for m in sys.modules if m.startswith(('sinkstream.core', 'sinkstream.service'))]\n"
        "assert not bad, bad\n"
        "import sinkstream.clients.cli\n"
        "sinkstream.clients.cli.build_parser().parse_args(['analyze', 'doc.txt', '--server', 'h:1'])\n"
        "torch_free = {'sinkstream.core', 'sinkstream.core.config', 'sinkstream.core.offload',\n"
        "             'sinkstream.core.offload.config', 'sinkstream.core.profiles',\n"
        "             'sinkstream.core.hardware_facts'}\n"
        "bad = [m for m in sys.modules if m.startswith('sinkstream.service')\n"
        "       or (m.startswith('sinkstream.core') and m not in torch_free)]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_client_library_imports_only_the_stubs_grpc_and_the_standard_library() -> None:
    # Lazy imports included: the library (sinkstream.clients but its CLI) never reaches the engine or server.
    allowed_roots = {"sinkstream", "grpc", "grpc_health", "google", "tqdm", *sys.stdlib_module_names}
    allowed_sinkstream = ("sinkstream.v1", "sinkstream.clients")
    for path in sorted((REPO_ROOT / "clients").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed_roots, f"{path.name} imports {name}"
                if name.startswith("sinkstream"):
                    assert name.startswith(allowed_sinkstream) and not name.startswith(
                        "sinkstream.clients.cli"), f"{path.name} imports {name}"


def test_every_message_field_enum_and_method_is_documented(tmp_path: Path) -> None:
    file = file_descriptor(tmp_path, source_info=True)
    documented = {tuple(loc.path) for loc in file.source_code_info.location
                  if loc.leading_comments.strip() or loc.trailing_comments.strip()}
    # Descriptor paths: 4 = message_type, 2 = field, 5 = enum_type, 6 = service, 2 = method.
    wanted = {}
    for m, message in enumerate(file.message_type):
        wanted[(4, m)] = message.name
        for f, field in enumerate(message.field):
            wanted[(4, m, 2, f)] = f"{message.name}.{field.name}"
    for e, enum in enumerate(file.enum_type):
        wanted[(5, e)] = enum.name
    for s, service in enumerate(file.service):
        wanted[(6, s)] = service.name
        for r, method in enumerate(service.method):
            wanted[(6, s, 2, r)] = f"{service.name}.{method.name}"
    missing = sorted(name for path, name in wanted.items() if path not in documented)
    assert not missing, f"undocumented in the .proto: {missing}"


def test_language_options_match_the_package(tmp_path: Path) -> None:
    options = file_descriptor(tmp_path).options
    assert options.java_multiple_files and options.java_package == "io.sinkstream.v1"
    # go_package "<import path>;<package name>": the path ends in the proto package's folders
    import_path, _, go_name = options.go_package.partition(";")
    assert import_path.endswith("/sinkstream/v1") and "." in import_path.split("/")[0], options.go_package
    assert re.fullmatch(r"[a-z][a-z0-9]*", go_name), options.go_package


def test_proto_compiles_to_cpp_and_java_messages(tmp_path: Path) -> None:
    # Messages only: the gRPC service plugins (grpc_cpp_plugin, protoc-gen-grpc-java) are not installed.
    protoc = full_protoc()
    if protoc is None:
        pytest.skip("no protoc with C++/Java generators (set $PROTOC, put protoc on PATH, or install torch)")
    file = file_descriptor(tmp_path)
    cpp, java = tmp_path / "cpp", tmp_path / "java"
    cpp.mkdir()
    java.mkdir()
    # protoc 3.12-3.14 (torch's) needs the flag for proto3 `optional`; later ones accept and ignore it
    proc = subprocess.run([protoc, "--experimental_allow_proto3_optional", f"-I{REPO_ROOT / 'protos'}",
                           f"--cpp_out={cpp}", f"--java_out={java}", PROTO], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

    header = cpp / "sinkstream" / "v1" / "sinkstream.pb.h"
    assert header.is_file() and (cpp / "sinkstream" / "v1" / "sinkstream.pb.cc").is_file()
    assert all(f"class {m.name} " in header.read_text() for m in file.message_type)

    # java_multiple_files: one file per top-level message (and its OrBuilder) and enum, in java_package
    java_dir = java / "io" / "sinkstream" / "v1"
    written = {p.name for p in java_dir.glob("*.java")}
    want = {f"{m.name}{suffix}.java" for m in file.message_type for suffix in ("", "OrBuilder")}
    want |= {f"{e.name}.java" for e in file.enum_type}
    assert want <= written, sorted(want - written)
    assert len(written - want) == 1, sorted(written - want)  # the outer class holding the descriptor
