"""A Kubernetes control plane from the cached upstream binaries (etcd, kube-apiserver, kube-scheduler) on loopback,
for tests that need the real API server: its validation, its RBAC and the scheduler's DRA allocation.

Nothing on the host changes: state in a temporary directory, ephemeral ports, a self-signed serving certificate.
Every process started is stopped by its PID (SIGTERM, then SIGKILL). Absent binaries: ``available()`` says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

K8S_VERSION = "v1.34.4"
BIN = Path.home() / ".cache" / "gpuplugin-e2e" / f"k8s-{K8S_VERSION}" / "bin"
BINARIES = ("etcd", "kube-apiserver", "kube-scheduler", "kubectl")
ADMIN_TOKEN = "gpuplugin-test-admin"
START_TIMEOUT_S = 120.0


def available() -> str | None:
    """None when the control plane can start here; else why not, for a skip."""
    missing = [name for name in BINARIES if not (BIN / name).is_file()]
    if missing:
        return f"Kubernetes {K8S_VERSION} binaries not cached in {BIN} (deploy/e2e/build-k8s.sh builds them)"
    if subprocess.run(["openssl", "version"], capture_output=True, check=False).returncode != 0:
        return "openssl not installed"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ControlPlane:
    """The running control plane: its API server URL, an admin token, and the processes by name."""

    work: Path
    url: str = ""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def kubeconfig(self, token: str) -> dict[str, Any]:
        """A kubeconfig for ``token`` (the serving certificate is self-signed: not verified)."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.url, "insecure-skip-tls-verify": True}}],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
            "current-context": "test",
        }

    def kubectl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """The cached kubectl as the admin (blocking: from a worker thread in async tests)."""
        command = [str(BIN / "kubectl"), "--kubeconfig", str(self.work / "admin.kubeconfig"), *args]
        return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60, check=False)

    def spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        with (self.work / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.processes[name] = process
        return process

    def log_tail(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text(errors="replace")[-3000:]

    def wait(self, name: str, ready: Any) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise RuntimeError(f"{name} exited {self.processes[name].returncode}:\n{self.log_tail(name)}")
            with contextlib.suppress(OSError, ValueError):
                if ready():
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{name} not ready within {START_TIMEOUT_S:.0f} s:\n{self.log_tail(name)}")

    def stop(self) -> None:
        """SIGTERM every process by PID, newest first; SIGKILL whichever has not exited after 10 s."""
        for name, process in reversed(list(self.processes.items())):
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait()
            del self.processes[name]


def _readyz(url: str) -> bool:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(f"{url}/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(request, context=context, timeout=5) as response:
        return bool(response.read() == b"ok")


def _port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True


@contextlib.contextmanager
def control_plane(feature_gates: Sequence[str] = (), runtime_config: Sequence[str] = ()) -> Iterator[ControlPlane]:
    """etcd, kube-apiserver (token authentication, RBAC) and kube-scheduler, stopped when the block ends; both
    with ``feature_gates`` (gate names) turned on, the API server also serving the ``runtime_config`` API versions
    (``resource.k8s.io/v1alpha3``: the scheduler waits for DeviceTaintRules when DRADeviceTaints is on)."""
    with tempfile.TemporaryDirectory(prefix="gp-k8s-") as tmp:
        plane = ControlPlane(Path(tmp))
        try:
            _start(
                plane,
                [f"--feature-gates={','.join(f'{gate}=true' for gate in feature_gates)}"] if feature_gates else [],
                runtime_config,
            )
            yield plane
        finally:
            plane.stop()


def _start(plane: ControlPlane, gates: list[str], runtime_config: Sequence[str]) -> None:
    work = plane.work
    subprocess.run(["openssl", "genrsa", "-out", str(work / "sa.key"), "2048"], capture_output=True, check=True)
    subprocess.run(
        ["openssl", "rsa", "-in", str(work / "sa.key"), "-pubout", "-out", str(work / "sa.pub")],
        capture_output=True,
        check=True,
    )
    (work / "tokens.csv").write_text(f'{ADMIN_TOKEN},admin,admin,"system:masters"\n')
    etcd, peer, apiserver, scheduler = (free_port() for _ in range(4))
    plane.spawn(
        "etcd",
        [
            str(BIN / "etcd"),
            "--data-dir",
            str(work / "etcd"),
            "--listen-client-urls",
            f"http://127.0.0.1:{etcd}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{etcd}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"default=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync",
            "--log-level",
            "warn",
        ],
    )
    plane.wait("etcd", lambda: _port_open(etcd))
    plane.url = f"https://127.0.0.1:{apiserver}"
    plane.spawn(
        "kube-apiserver",
        [
            str(BIN / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd}",
            "--bind-address=127.0.0.1",
            "--advertise-address=10.255.255.1",
            f"--secure-port={apiserver}",
            f"--cert-dir={work / 'certs'}",
            f"--token-auth-file={work / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={work / 'sa.pub'}",
            f"--service-account-signing-key-file={work / 'sa.key'}",
            "--service-cluster-ip-range=10.96.78.0/24",
            "--profiling=false",
            *gates,
            *([f"--runtime-config={','.join(f'{api}=true' for api in runtime_config)}"] if runtime_config else []),
        ],
    )
    plane.wait("kube-apiserver", lambda: _readyz(plane.url))
    kubeconfig = work / "admin.kubeconfig"
    kubeconfig.write_text(json.dumps(plane.kubeconfig(ADMIN_TOKEN)))
    plane.spawn(
        "kube-scheduler",
        [
            str(BIN / "kube-scheduler"),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={scheduler}",
            *gates,
        ],
    )
    plane.wait("kube-scheduler", lambda: _port_open(scheduler))
