"""The package's requirements, listed once in pyproject.toml: read from the installed package's
metadata, or from pyproject.toml in a source checkout (``make`` installs them from there, and
``rkv-local serve`` names the server's when they are missing).

``python -m rkv_local.requirements [EXTRA ...]`` prints the runtime requirements and those of the
extras, one per line (``make``'s input to pip).
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _from_pyproject(extra: str | None) -> list[str]:
    try:
        import tomllib
    except ImportError:          # Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    if extra is None:
        return list(project["dependencies"])
    return [r for r in project["optional-dependencies"][extra] if not r.startswith("rkv-local")]


def requirements(extra: str | None = None) -> list[str]:
    """The runtime requirements (``extra`` None) or those an extra adds (``server``, ``evals``, ``test``)."""
    if PYPROJECT.is_file():      # a source checkout: its pyproject.toml is the truth, installed or not
        return _from_pyproject(extra)
    wanted = [r for r in metadata.requires("rkv-local") or [] if ("extra ==" in r) == (extra is not None)]
    if extra is not None:
        wanted = [r for r in wanted if re.search(rf"extra\s*==\s*['\"]{re.escape(extra)}['\"]", r)]
    return [r.split(";")[0].strip() for r in wanted if not r.startswith("rkv-local")]


def main(argv: list[str]) -> int:
    for extra in [None, *argv]:
        print("\n".join(requirements(extra)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
