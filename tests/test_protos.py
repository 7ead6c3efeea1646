"""The committed stubs match protos/, and the client side imports without torch."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

STUBS = REPO_ROOT / "clients" / "sinkstream_pb"


def test_committed_stubs_are_up_to_date(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT / "protos"))
    try:
        import gen_stubs
    finally:
        sys.path.remove(str(REPO_ROOT / "protos"))
    written = gen_stubs.generate(tmp_path)
    assert written, "no .proto files found"
    stale = [p.name for p in written if not filecmp.cmp(p, STUBS / p.name, shallow=False)]
    assert not stale, f"stale stubs {stale}: run `python protos/gen_stubs.py` and commit the result"


def test_stubs_and_client_import_without_torch() -> None:
    # torch and transformers are made unimportable, as on a client-only install; the CLI may use the
    # torch-free option modules of core (their validation is shared with the server) and nothing else.
    code = (
        "import sys\n"
        "sys.modules.update({'torch': None, 'transformers': None})\n"
        "import clients, clients.cli, clients.client, clients.aio, clients.sinkstream_pb\n"
        "from clients.sinkstream_pb import sinkstream_pb2, sinkstream_pb2_grpc\n"
        "assert sinkstream_pb2.DESCRIPTOR.package == 'sinkstream.v1'\n"
        "clients.cli.build_parser().parse_args(['analyze', 'doc.txt', '--server', 'h:1'])\n"
        "torch_free = {'core', 'core.config', 'core.offload_config'}\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'service'\n"
        "       or (m.split('.')[0] == 'core' and m not in torch_free)]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_every_message_field_enum_and_method_is_documented(tmp_path: Path) -> None:
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    protoc_include = Path(protoc.__file__).parent / "_proto"
    assert protoc.main(["protoc", f"-I{REPO_ROOT / 'protos'}", f"-I{protoc_include}", "--include_source_info",
                        f"--descriptor_set_out={out}", "sinkstream/v1/sinkstream.proto"]) == 0
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (file,) = fds.file
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
