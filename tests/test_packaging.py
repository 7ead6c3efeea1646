"""The built wheel: one top-level name, every module and the .proto inside, importable beside a user's own
`core`/`service`/`clients` packages; and the layer contracts (import-linter) hold on what it installs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT

SOURCE_FOLDERS = {"core": "sinkstream/core", "service": "sinkstream/service", "clients": "sinkstream/clients",
                  "protos/sinkstream": "sinkstream"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(REPO_ROOT)], check=True, capture_output=True)
    (path,) = out.glob("sinkstream-*.whl")
    return path


@pytest.fixture(scope="module")
def site(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel unpacked as an installer lays it out in site-packages."""
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


def _env(pythonpath: Path) -> dict[str, str]:
    # PathFinder comes before the editable install's finder, so this copy wins over the work tree.
    return {**os.environ, "PYTHONPATH": str(pythonpath)}


def test_wheel_installs_only_sinkstream_with_every_module_and_the_proto(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"sinkstream"}
    want = {"sinkstream/v1/sinkstream.proto", "sinkstream/v1/sinkstream_pb2.pyi", "sinkstream/__main__.py"}
    for folder, package in SOURCE_FOLDERS.items():
        for source in (REPO_ROOT / folder).rglob("*.py"):
            if "node_modules" not in source.parts:
                want.add(f"{package}/{source.relative_to(REPO_ROOT / folder).as_posix()}")
    assert not want - set(names), f"missing from the wheel: {sorted(want - set(names))}"


def test_wheel_imports_beside_a_users_own_core_service_and_clients(site: Path, tmp_path: Path) -> None:
    project = tmp_path / "users_project"
    for name in ("core", "service", "clients"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(f"OWNER = 'user'\nNAME = {name!r}\n")
    code = (
        "import core, service, clients, sinkstream\n"
        "import sinkstream.clients.cli, sinkstream.clients.client, sinkstream.core.config\n"
        "from sinkstream.v1 import sinkstream_pb2\n"
        "assert (core.OWNER, service.OWNER, clients.OWNER) == ('user',) * 3\n"
        f"assert sinkstream.__file__.startswith({str(site)!r}), sinkstream.__file__\n"
        "sinkstream.clients.cli.build_parser().parse_args(['analyze', 'doc.txt', '--server', 'h:1'])\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=project, env=_env(site), check=True)
    help_text = subprocess.run([sys.executable, "-m", "sinkstream", "--help"], cwd=project, env=_env(site),
                               check=True, capture_output=True, text=True).stdout
    assert help_text.startswith("usage: sinkstream")


def _lint_imports(site: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    return subprocess.run([lint, str(REPO_ROOT / "pyproject.toml"), "--no-cache"], cwd=cwd,
                          env=_env(site), capture_output=True, text=True)


def test_layer_contracts_hold(site: Path, tmp_path: Path) -> None:
    result = _lint_imports(site, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" in result.stdout and " 0 broken" in result.stdout, result.stdout


@pytest.mark.parametrize(("module", "lazy_import"), [
    ("sinkstream/core/_probe.py", "import grpc"),
    ("sinkstream/core/_probe.py", "from sinkstream.service import metrics"),
    ("sinkstream/clients/_probe.py", "import torch"),
    ("sinkstream/clients/_probe.py", "from sinkstream.core import config"),
    ("sinkstream/service/_probe.py", "from sinkstream.clients import results"),
    ("sinkstream/clients/results.py", "from sinkstream.clients.cli import main"),
])
def test_a_lazy_import_across_a_layer_breaks_a_contract(site: Path, tmp_path: Path, module: str,
                                                        lazy_import: str) -> None:
    broken_site = tmp_path / "site"
    shutil.copytree(site, broken_site)
    probe = broken_site / module
    probe.write_text((probe.read_text() if probe.exists() else "") + f"\n\ndef later():\n    {lazy_import}\n")
    result = _lint_imports(broken_site, tmp_path)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout
