"""Check the client SDK at the lowest versions its dependency ranges allow, without the server side.

    python tools/check_sdk_floor.py [VENV]      # default VENV: .sdk-floor

Reads `[project] dependencies` from pyproject.toml, installs each at its lower bound into a fresh
virtual environment together with this checkout (no extras, so no torch), and runs the SDK's
tests (tests/test_client.py, which fails if importing the SDK loads torch or a server module).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOWER_BOUND = re.compile(r"^([A-Za-z0-9_.-]+)\s*>=\s*([^,\s]+)")


def floors() -> list[str]:
    """`name==lower bound` for every runtime dependency of the SDK; an unbounded one is an error."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = []
    for requirement in dependencies:
        match = LOWER_BOUND.match(requirement)
        if match is None:
            raise SystemExit(f"{requirement!r} has no lower bound to check")
        pins.append(f"{match[1]}=={match[2]}")
    return pins


def main() -> int:
    venv = ROOT / (sys.argv[1] if len(sys.argv) > 1 else ".sdk-floor")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    pins = floors()
    print("SDK floor:", " ".join(pins), flush=True)
    subprocess.run([*pip, *pins, "pytest==9.2.0", "pytest-timeout==2.4.0"], check=True)
    subprocess.run([*pip, "--no-deps", str(ROOT)], check=True)
    # --noconftest: the suite's conftest builds model configs, which needs torch.
    test = [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", "test_client.py"]
    return subprocess.run(test, cwd=ROOT / "tests").returncode


if __name__ == "__main__":
    sys.exit(main())
