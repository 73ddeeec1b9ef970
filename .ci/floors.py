"""Print pip constraints pinning every dependency to the lowest version pyproject.toml allows.

`make test-floors` installs syncd with these, so the floors we declare are floors we test.
Usage: python .ci/floors.py [EXTRA ...]  (the runtime dependencies plus those extras)
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)")


def floors(pyproject: dict, extras: list[str]) -> dict[str, str]:
    project = pyproject["project"]
    requirements = list(project.get("dependencies", []))
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    pins: dict[str, str] = {}
    for requirement in requirements:
        match = REQUIREMENT.match(requirement)
        assert match, f"cannot parse requirement {requirement!r}"
        name, spec = match.group(1).lower().replace("_", "-"), match.group(2)
        lowest = re.search(r">=\s*([^,\s]+)", spec)
        if lowest is None:
            continue  # no floor declared: nothing to test
        # The same package in two lists with two floors: the higher one binds.
        version = lowest.group(1)
        if name not in pins or _key(version) > _key(pins[name]):
            pins[name] = version
    return pins


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    for name, version in sorted(floors(pyproject, sys.argv[1:]).items()):
        print(f"{name}=={version}")
