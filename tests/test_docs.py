"""The generated reference docs are current, and every UNCLIP_* variable is defined in one place."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from unclip.settings import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
VARIABLE = re.compile(r"\bUNCLIP_[A-Z0-9_]*[A-Z0-9]\b")


def test_generated_docs_are_current():
    result = subprocess.run(
        [sys.executable, "tools/gen_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_every_environment_variable_is_a_setting():
    """A variable read or set anywhere (code, chart, Makefile, docs) is one unclip.settings defines."""
    files = [
        path
        for pattern in (
            "unclip/**/*.py",
            "gateway/*.py",
            "*_svc/*.py",
            "tests/**/*.py",
            "deploy/**/*",
            "docs/*.md",
            "Makefile",
            "README.md",
        )
        for path in ROOT.glob(pattern)
        if path.is_file() and not path.name.endswith((".gz", ".safetensors"))
    ]
    used = {name for path in files for name in VARIABLE.findall(path.read_text(errors="replace"))}
    assert used <= {setting.name for setting in SETTINGS}, sorted(used - {setting.name for setting in SETTINGS})
    assert {"UNCLIP_TORCH_THREADS", "UNCLIP_S3_ENDPOINT", "UNCLIP_DEVICE"} <= used
