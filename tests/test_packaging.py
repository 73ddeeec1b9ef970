"""What the sdist and the wheel carry, the license metadata, and floors that are tested."""

from __future__ import annotations

import email.parser
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def build(kind: str, out: Path) -> Path:
    """Run setuptools' PEP 517 hook (the one `python -m build` calls), without isolation."""
    code = f"import setuptools.build_meta as b; print(b.build_{kind}({str(out)!r}))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return out / result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    archive = build("sdist", tmp_path_factory.mktemp("sdist"))
    with tarfile.open(archive) as tar:
        top = archive.name.removesuffix(".tar.gz")
        return [name.removeprefix(top + "/") for name in tar.getnames()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    return zipfile.ZipFile(build("wheel", tmp_path_factory.mktemp("wheel")))


def test_the_sdist_carries_what_an_operator_needs(sdist: list[str]) -> None:
    for name in ("LICENSE", "README.md", "config.example.toml", "pyproject.toml",
                 "systemd/syncd.service", "systemd/README.md", "systemd/credentials.example",
                 "migrations/env.py", "syncd/daemon.py"):
        assert name in sdist, f"{name} is missing from the sdist"
    # Every file under contrib/ in the checkout (alert rules, dashboard), when there are any.
    contrib = [str(p.relative_to(ROOT)) for p in (ROOT / "contrib").rglob("*") if p.is_file()]
    assert set(contrib) <= set(sdist)
    assert not [name for name in sdist if "__pycache__" in name or name.endswith(".pyc")]


def test_license_is_apache_2_0_as_spdx_metadata_with_the_full_text(wheel: zipfile.ZipFile) -> None:
    [metadata_name] = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = email.parser.Parser().parsestr(wheel.read(metadata_name).decode())
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    [license_name] = [n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    text = wheel.read(license_name).decode()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a pointer to it


def test_the_wheel_installs_the_guide_where_the_unit_documentation_points(wheel: zipfile.ZipFile) -> None:
    # A venv at /opt/syncd gets /opt/syncd/share/doc/syncd/README.md (syncd.service Documentation=).
    [guide] = [n for n in wheel.namelist() if n.endswith(".data/data/share/doc/syncd/README.md")]
    assert wheel.read(guide) == (ROOT / "systemd" / "README.md").read_bytes()
    unit = (ROOT / "systemd" / "syncd.service").read_text()
    assert "Documentation=file:/opt/syncd/share/doc/syncd/README.md" in unit


def test_every_floor_is_pinned_by_the_floors_constraints() -> None:
    """`make test-floors` installs exactly the declared lower bounds."""
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        from floors import floors
    finally:
        sys.path.pop(0)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = floors(pyproject, ["test"])
    for requirement in pyproject["project"]["dependencies"]:
        name = requirement.split(">=")[0].split("[")[0].strip().lower().replace("_", "-")
        floor = requirement.split(">=")[1].split(",")[0].strip()
        assert pins[name] == floor, requirement
    assert pins["setuptools"] == "77.0.3"  # the test extra's, which builds wheels without isolation


def test_install_docs_name_what_exists() -> None:
    """`pip install 'syncd[...]'` would fetch whatever someone registers as "syncd" on
    the package index; the docs install from the checkout or a wheel built from it."""
    for doc in ("README.md", "systemd/README.md"):
        text = (ROOT / doc).read_text()
        assert "install 'syncd[" not in text and "install --upgrade 'syncd[" not in text, doc
        assert "'syncd==" not in text, doc
