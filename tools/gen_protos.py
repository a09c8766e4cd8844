"""Generate the Python gRPC code under unclip/v1/ from protos/, or check that it is current.

python tools/gen_protos.py          # regenerate
python tools/gen_protos.py --check  # exit 1 if the committed code is stale
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("unclip") / "v1"


def generate(out_root: Path) -> list[Path]:
    """Run protoc for every .proto; return the generated files relative to out_root."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"  # well-known types shipped with grpcio-tools
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(p.relative_to(out_root) for p in (out_root / PACKAGE_DIR).glob("*_pb2*.py*"))


def stale_files() -> list[str]:
    """Generated files that differ from, are missing from, or are extra in the committed tree."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = set(generate(Path(tmp)))
        committed = {p.relative_to(ROOT) for p in (ROOT / PACKAGE_DIR).glob("*_pb2*.py*")}
        problems = [f"missing: {p}" for p in sorted(fresh - committed)]
        problems += [f"not generated from any .proto: {p}" for p in sorted(committed - fresh)]
        problems += [f"stale: {p}" for p in sorted(fresh & committed) if not filecmp.cmp(Path(tmp) / p, ROOT / p, shallow=False)]
        return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that unclip/v1 is current")
    args = parser.parse_args()
    if args.check:
        problems = stale_files()
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("run: python tools/gen_protos.py", file=sys.stderr)
        return 1 if problems else 0
    for path in generate(ROOT):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
