"""`unclip serve ray` as a user runs it: a local Ray cluster of its own, stopped with it."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from unclip import certs
from unclip.launcher import free_port
from unclip.ray_apps import load_config
from unclip.tls import GATEWAY_SERVER, CertificateDirectory

# Starts a Ray cluster in a process of its own.
pytestmark = pytest.mark.slow


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, name, state) of every process, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # exited meanwhile
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
            found[int(entry.name)] = (int(ppid), name, state)
    return found


def _descendants(pid: int) -> dict[int, str]:
    processes = _processes()
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, name, _) in processes.items():
            if ppid == parent and child not in found:
                found[child] = name
                frontier.append(child)
    return found


def _alive(pids) -> list[int]:
    processes = _processes()
    return [pid for pid in pids if pid in processes and processes[pid][2] != "Z"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_ray_stops_the_cluster_it_started(tmp_path, signum):
    config = load_config()
    # One small application is enough to start every process a cluster runs; ports of its own.
    config["applications"] = [app for app in config["applications"] if app["name"] == "encoder"]
    config["http_options"]["port"] = free_port()
    config["grpc_options"]["port"] = free_port()
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    # One of the runs also serves Ray's HTTP proxy over HTTPS (`--tls-cert`/`--tls-key`).
    tls = CertificateDirectory(tmp_path / "certs") if signum == signal.SIGINT else None
    tls_flags = []
    if tls is not None:
        certs.init(tls.path)
        cert, key = tls.pair(GATEWAY_SERVER)
        tls_flags = ["--tls-cert", str(cert), "--tls-key", str(key)]
    process = subprocess.Popen(
        [sys.executable, "-m", "unclip", "serve", "ray", "--config", str(path), *tls_flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    started: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 240
        while not any("serving on Ray" in line for line in list(output)):
            assert process.poll() is None, "".join(output)
            assert time.monotonic() < deadline, "unclip serve ray did not serve within 240 s:\n" + "".join(output)
            time.sleep(0.5)
        if tls is not None:
            context = ssl.create_default_context(cafile=str(tls.ca))
            url = f"https://127.0.0.1:{config['http_options']['port']}/-/healthz"
            with urllib.request.urlopen(url, context=context, timeout=30) as response:
                assert response.read() == b"success"
            assert any("gRPC proxy serves plaintext" in line for line in output)
        # Everything the cluster runs descends from this process: GCS, raylet, workers, Serve's actors.
        started = _descendants(process.pid)
        assert {"gcs_server", "raylet"} <= set(started.values()), started
        process.send_signal(signum)
        process.wait(timeout=90)
        reader.join(timeout=10)
        assert process.returncode == 0, "".join(output)
        assert any("stopping" in line for line in output)
        left = _alive(started)
        deadline = time.monotonic() + 30  # processes Ray told to stop may take a moment to exit
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = _alive(left)
        assert not left, f"still running after serve ray exited: {[(pid, started[pid]) for pid in left]}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in _alive(started):
            os.kill(pid, signal.SIGKILL)
