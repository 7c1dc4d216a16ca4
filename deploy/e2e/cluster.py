"""A single-node Kubernetes cluster from upstream binaries, on this machine, with no registry and no network.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd (Debian's, with runc) and a kubelet, all
started here as child processes with their state in one private work directory, and stopped by PID at the end.
What the kubelet changes on the host is put back: the sysctls it sets, its bind mount of /var/lib/kubelet (and
the directory itself when it did not exist before), the pods' mounts and network namespaces, the CNI bridge.

The settings are the ones these machines need (shared/docs/real-node.md): hybrid cgroup v1 with the cgroupfs
driver and no QoS cgroups, `restrict_oom_score_adj` in containerd (root lacks CAP_SYS_RESOURCE), no swap, and no
eviction (the kubelet cannot read the root filesystem's stats).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KUBELET_ROOT = Path("/var/lib/kubelet")
LOCK = Path("/run/gpuplugin-e2e.lock")
# Left in /var/lib/kubelet when this test created it, so that a run that could not remove it (killed) lets the next
# one do so.
MARKER = ".created-by-gpuplugin-e2e"
NODE_NAME = "gpuplugin-e2e"
POD_SUBNET = "10.244.77.0/24"
SERVICE_RANGE = "10.96.77.0/24"
BRIDGE = "gpue2e0"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10.1"
# What the kubelet sets at start (and the CNI bridge, ip_forward): read before, written back after.
SYSCTLS = (
    "kernel.panic",
    "kernel.panic_on_oops",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
)
Log = Callable[[str], None]


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_ip() -> str:
    """The address of the interface with the default route (what the kubelet reports as InternalIP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.123", 9))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def sysctl_path(name: str) -> Path:
    """/proc/sys path of a sysctl."""
    return Path("/proc/sys") / name.replace(".", "/")


def mounts_under(prefix: Path) -> list[str]:
    """Mount points at or under `prefix`, deepest last."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == str(prefix) or point.startswith(f"{prefix}/"):
            out.append(point)
    return out


def run(cmd: list[str], *, check: bool = True, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Runs a command; raises with its output when it fails and `check` is set."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


@dataclass
class Proc:
    """A component started by the cluster."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class Cluster:
    """The cluster's processes, files and what it changed on the host."""

    bin: Path
    work: Path
    log: Log
    procs: dict[str, Proc] = field(default_factory=dict)
    sysctls: dict[str, str] = field(default_factory=dict)
    kubelet_root_existed: bool = True
    host_dirs_created: list[Path] = field(default_factory=list)
    netns_before: set[str] = field(default_factory=set)
    chains_before: set[tuple[str, str, str]] = field(default_factory=set)
    ports: dict[str, int] = field(default_factory=dict)
    ip: str = ""
    lock_fd: int = -1
    # Another containerd than the one on PATH (deploy/e2e/build-containerd.sh: its containerd, ctr and shim), and
    # CDI on in its CRI plugin (1.7 or later), for DRA.
    containerd_bin: Path | None = None
    cdi: bool = False

    # Paths.
    @property
    def pki(self) -> Path:
        return self.work / "pki"

    @property
    def kubeconfig(self) -> Path:
        return self.work / "admin.kubeconfig"

    @property
    def containerd_sock(self) -> Path:
        return self.work / "containerd/containerd.sock"

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    def env(self) -> dict[str, str]:
        """An environment whose kubectl talks to this cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": f"{self.bin}:{os.environ['PATH']}"}

    # Start.
    def start(self) -> None:
        """Starts every component and waits until the node is Ready."""
        self._lock()
        self.logs.mkdir(parents=True, exist_ok=True)
        self.ip = node_ip()
        for name in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kubelet", "kubelet-healthz"):
            self.ports[name] = free_port()
        self._record_host()
        self._pki()
        self._start_etcd()
        self._start_apiserver()
        self._start_controller_manager()
        self._start_scheduler()
        self._start_containerd()
        self.start_kubelet()
        self.wait_node_ready()

    def _lock(self) -> None:
        """One cluster at a time on a machine: /var/lib/kubelet and the device-plugins directory are fixed paths."""
        self.lock_fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another end-to-end cluster holds {LOCK}: one at a time on a machine") from None
        if mounts_under(KUBELET_ROOT) or any(p.name.startswith("kubelet") for p in self._processes()):
            raise RuntimeError(f"a kubelet runs here already (or {KUBELET_ROOT} is mounted): stop it first")

    @staticmethod
    def _processes() -> list[Path]:
        """Names of running executables (the targets of /proc/*/exe that can be read)."""
        out = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                with contextlib.suppress(OSError):
                    out.append(Path(os.readlink(p / "exe")))
        return out

    def _record_host(self) -> None:
        for name in SYSCTLS:
            with contextlib.suppress(OSError):
                self.sysctls[name] = sysctl_path(name).read_text().strip()
        self.kubelet_root_existed = KUBELET_ROOT.exists() and not (KUBELET_ROOT / MARKER).exists()
        if not self.kubelet_root_existed:
            KUBELET_ROOT.mkdir(parents=True, exist_ok=True)
            (KUBELET_ROOT / MARKER).touch()
        for d in (Path("/run/gpuplugin"), Path("/run/cdi"), Path("/var/log/pods"), Path("/var/log/containers")):
            if not d.exists():
                self.host_dirs_created.append(d)
        netns = Path("/run/netns")
        self.netns_before = {p.name for p in netns.iterdir()} if netns.exists() else set()
        self.chains_before = self._kube_chains()

    def _pki(self) -> None:
        """A CA; serving certs for the API server; client certs for the admin, the kubelet; a service-account key."""
        pki = self.pki
        pki.mkdir(parents=True, exist_ok=True)

        def ossl(*args: str) -> None:
            run(["openssl", *args], cwd=pki)

        ossl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=gpuplugin-e2e-ca",
        )

        def cert(name: str, subj: str, sans: str = "") -> None:
            ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subj)
            ext = pki / f"{name}.ext"
            ext.write_text(
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                + ("extendedKeyUsage=serverAuth\n" if sans else "extendedKeyUsage=clientAuth\n")
                + (f"subjectAltName={sans}\n" if sans else "")
            )
            ossl(
                "x509",
                "-req",
                "-in",
                f"{name}.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                f"{name}.crt",
                "-days",
                "2",
                "-extfile",
                ext.name,
            )

        first_service_ip = SERVICE_RANGE.rsplit(".", 1)[0] + ".1"
        cert(
            "apiserver",
            "/CN=kube-apiserver",
            f"IP:127.0.0.1,IP:{self.ip},IP:{first_service_ip},DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc",
        )
        cert("admin", "/O=system:masters/CN=gpuplugin-e2e-admin")
        cert("kubelet", f"/O=system:nodes/CN=system:node:{NODE_NAME}")
        ossl("genrsa", "-out", "sa.key", "2048")
        ossl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        server = f"https://127.0.0.1:{self.ports['apiserver']}"
        for name, user in (("admin", "admin"), ("kubelet", "kubelet")):
            cfg = {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "e2e", "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")}}
                ],
                "users": [
                    {
                        "name": user,
                        "user": {
                            "client-certificate": str(pki / f"{user}.crt"),
                            "client-key": str(pki / f"{user}.key"),
                        },
                    }
                ],
                "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": user}}],
                "current-context": "e2e",
            }
            (self.work / f"{name}.kubeconfig").write_text(json.dumps(cfg, indent=1))

    def _spawn(self, name: str, cmd: list[str], *, env: dict[str, str] | None = None) -> Proc:
        log = self.logs / f"{name}.log"
        f = log.open("ab")
        popen = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env
        )
        f.close()
        proc = Proc(name, popen, log)
        self.procs[name] = proc
        return proc

    def _wait(self, what: str, ok: Callable[[], bool], proc: Proc | None = None, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.popen.poll() is not None:
                tail = proc.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{proc.name} exited {proc.popen.returncode} while waiting for {what}:\n{tail}")
            with contextlib.suppress(Exception):
                if ok():
                    return
            time.sleep(0.1)
        tail = proc.log.read_text(errors="replace")[-3000:] if proc else ""
        raise RuntimeError(f"{what}: not within {timeout:.0f} s\n{tail}")

    def _port_open(self, port: int) -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True

    def _start_etcd(self) -> None:
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        proc = self._spawn(
            "etcd",
            [
                str(self.bin / "etcd"),
                "--name",
                "e2e",
                "--data-dir",
                str(self.work / "etcd"),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"e2e={peer}",
                "--unsafe-no-fsync",
                "--log-level",
                "warn",
                "--listen-metrics-urls",
                "",
            ],
        )
        self._wait("etcd listening", lambda: self._port_open(self.ports["etcd"]), proc)

    def _start_apiserver(self) -> None:
        pki = self.pki
        proc = self._spawn(
            "kube-apiserver",
            [
                str(self.bin / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                "--bind-address=127.0.0.1",
                f"--advertise-address={self.ip}",
                f"--secure-port={self.ports['apiserver']}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--kubelet-client-certificate={pki / 'admin.crt'}",
                f"--kubelet-client-key={pki / 'admin.key'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_RANGE}",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                "--kubelet-preferred-address-types=InternalIP",
                "--profiling=false",
                "--v=1",
            ],
        )
        self._wait(
            "kube-apiserver ready",
            lambda: self.kubectl("get", "--raw", "/readyz", timeout=5).strip() == "ok",
            proc,
            timeout=90,
        )

    def _start_controller_manager(self) -> None:
        kc = str(self.kubeconfig)
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bin / "kube-controller-manager"),
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['controller-manager']}",
                f"--service-account-private-key-file={self.pki / 'sa.key'}",
                f"--root-ca-file={self.pki / 'ca.crt'}",
                f"--service-cluster-ip-range={SERVICE_RANGE}",
                "--use-service-account-credentials=false",
                "--controllers=*,-bootstrapsigner,-tokencleaner,-csrsigning,-nodeipam",
                "--v=1",
            ],
        )

    def _start_scheduler(self) -> None:
        kc = str(self.kubeconfig)
        self._spawn(
            "kube-scheduler",
            [
                str(self.bin / "kube-scheduler"),
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['scheduler']}",
                "--v=1",
            ],
        )

    def _start_containerd(self) -> None:
        d = self.work / "containerd"
        cni = self.work / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        (cni / "net.d/10-e2e.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "0.4.0",
                    "name": "gpuplugin-e2e",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": BRIDGE,
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_SUBNET}]],
                                "dataDir": str(cni / "ipam"),
                            },
                        }
                    ],
                },
                indent=1,
            )
        )
        config = d / "config.toml"
        d.mkdir(parents=True, exist_ok=True)
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        cdi = '  enable_cdi = true\n  cdi_spec_dirs = ["/etc/cdi", "/var/run/cdi"]\n' if self.cdi else ""
        config.write_text(f"""version = 2
root = "{d / "root"}"
state = "{d / "state"}"
[grpc]
  address = "{self.containerd_sock}"
[ttrpc]
  address = "{d / "containerd.sock.ttrpc"}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d / "opt"}"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  enable_selinux = false
{cdi}[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{d / "runc"}"
[{cri}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{cni / "net.d"}"
""")
        # containerd finds its shim on PATH.
        env = {**os.environ, "PATH": f"{self.containerd_bin}:{os.environ['PATH']}"} if self.containerd_bin else None
        proc = self._spawn("containerd", [self._containerd_tool("containerd"), "--config", str(config)], env=env)
        self._wait("containerd serving", lambda: self.ctr("version") is not None, proc)

    def ctr(self, *args: str, timeout: float = 120) -> str:
        """Runs ctr against this cluster's containerd, in the CRI's namespace."""
        return run(
            [self._containerd_tool("ctr"), "--address", str(self.containerd_sock), "--namespace", "k8s.io", *args],
            timeout=timeout,
        ).stdout

    def _containerd_tool(self, name: str) -> str:
        return str(self.containerd_bin / name) if self.containerd_bin else name

    def import_image(self, archive: Path) -> None:
        """Loads an OCI image archive into containerd's CRI namespace."""
        self.ctr("images", "import", str(archive), timeout=300)

    def start_kubelet(self) -> Proc:
        """Starts (or starts again) the kubelet; returns its process."""
        cfg = self.work / "kubelet-config.yaml"
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "port": self.ports["kubelet"],
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.ports["kubelet-healthz"],
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(self.pki / "ca.crt")},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "containerRuntimeEndpoint": f"unix://{self.containerd_sock}",
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failCgroupV1": False,
            "failSwapOn": False,
            "oomScoreAdj": 0,
            "localStorageCapacityIsolation": False,
            "evictionHard": {
                "memory.available": "1Mi",
                "nodefs.available": "0%",
                "nodefs.inodesFree": "0%",
                "imagefs.available": "0%",
                "imagefs.inodesFree": "0%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "resolvConf": "/etc/resolv.conf",
            # Quick enough for the scenarios: node status (allocatable) each second, pod sync (ConfigMap volumes)
            # each 5 s.
            "nodeStatusUpdateFrequency": "1s",
            "nodeStatusReportFrequency": "10s",
            "syncFrequency": "5s",
            "podLogsDir": str(self.work / "pod-logs"),
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            "shutdownGracePeriod": "0s",
        }
        cfg.write_text(json.dumps(config, indent=1))
        return self._spawn(
            "kubelet",
            [
                str(self.bin / "kubelet"),
                f"--config={cfg}",
                f"--kubeconfig={self.work / 'kubelet.kubeconfig'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={self.ip}",
                f"--cert-dir={self.work / 'kubelet-pki'}",
                "--v=2",
            ],
        )

    def stop_kubelet(self) -> None:
        """Stops the kubelet (SIGTERM, then SIGKILL)."""
        proc = self.procs.pop("kubelet", None)
        if proc is not None:
            self._stop(proc)

    def kubectl(self, *args: str, timeout: float = 120, input: str | None = None, check: bool = True) -> str:
        """Runs kubectl against the cluster and returns its stdout."""
        cmd = [str(self.bin / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def kubectl_json(self, *args: str) -> Any:
        """kubectl get ... -o json, parsed."""
        return json.loads(self.kubectl(*args, "-o", "json"))

    def node(self) -> Any:
        """The node object."""
        return self.kubectl_json("get", "node", NODE_NAME)

    def wait_node_ready(self, timeout: float = 120) -> None:
        """Waits until the node is registered and Ready."""

        def ready() -> bool:
            conds = self.node()["status"].get("conditions", [])
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

        self._wait(f"node {NODE_NAME} Ready", ready, self.procs.get("kubelet"), timeout)

    # Stop.
    def _stop(self, proc: Proc, timeout: float = 15) -> None:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(10)

    def stop(self) -> None:
        """Stops everything started, by PID, and puts the host back as it was. Never raises."""
        steps: list[tuple[str, Callable[[], None]]] = [
            ("workloads", self._delete_workloads),
            ("kubelet", self.stop_kubelet),
            ("containers", self._kill_containers),
        ]
        for name in ("containerd", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            if name in self.procs:
                steps.append((name, functools.partial(self._stop, self.procs[name])))
        steps += [
            ("mounts", self._unmount),
            ("network", self._network),
            ("sysctls", self._restore_sysctls),
            ("host dirs", self._remove_host_dirs),
            ("state", self._remove_state),
        ]
        for name, step in steps:
            try:
                step()
            except Exception as e:
                self.log(f"cleanup: {name}: {e}")
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1

    def _delete_workloads(self) -> None:
        """Deletes every pod the test made, so that the kubelet tears down their sandboxes, volumes and CNI."""
        if "kube-apiserver" not in self.procs or "kubelet" not in self.procs:
            return
        with contextlib.suppress(Exception):
            self.kubectl(
                "delete", "daemonset,deployment,pod", "--all", "-A", "--wait=false", "--grace-period=1", timeout=30
            )
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            try:
                if not self._running_tasks():
                    return
            except Exception:
                return
            time.sleep(0.5)

    def _running_tasks(self) -> list[str]:
        if "containerd" not in self.procs:
            return []
        lines = self.ctr("tasks", "ls", timeout=15).splitlines()[1:]
        return [line.split()[0] for line in lines if "RUNNING" in line]

    def _pod_sandboxes(self) -> list[str]:
        if "containerd" not in self.procs:
            return []
        out = self.ctr("containers", "ls", "-q", timeout=15)
        return out.split()

    def _kill_containers(self) -> None:
        """Kills what is left in containerd: tasks, then the shims, which exit with their tasks."""
        if "containerd" not in self.procs or self.procs["containerd"].popen.poll() is not None:
            return
        for line in self.ctr("tasks", "ls", timeout=15).splitlines()[1:]:
            cid = line.split()[0]
            with contextlib.suppress(Exception):
                self.ctr("tasks", "kill", "--signal", "SIGKILL", cid, timeout=15)
            time.sleep(0.2)
            with contextlib.suppress(Exception):
                self.ctr("tasks", "delete", "--force", cid, timeout=15)
        for cid in self._pod_sandboxes():
            with contextlib.suppress(Exception):
                self.ctr("containers", "delete", cid, timeout=15)
        # Shims of this containerd (found by its socket on their command line) that are still there.
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = (p / "cmdline").read_bytes().split(b"\0")
                if b"containerd-shim" in cmdline[0] and str(self.containerd_sock).encode() in cmdline:
                    os.kill(int(p.name), signal.SIGKILL)

    def _unmount(self) -> None:
        """Unmounts what is left under the work directory and /var/lib/kubelet (its self-bind-mount included)."""
        for prefix in (self.work, KUBELET_ROOT):
            for _ in range(5):
                points = mounts_under(prefix)
                if not points:
                    break
                for point in sorted(points, key=len, reverse=True):
                    if run(["umount", point], check=False).returncode != 0:
                        run(["umount", "-l", point], check=False)
            left = mounts_under(prefix)
            if left:
                self.log(f"cleanup: still mounted: {left}")
        if not self.kubelet_root_existed and KUBELET_ROOT.exists() and not mounts_under(KUBELET_ROOT):
            removed = run(["rm", "-rf", "--one-file-system", str(KUBELET_ROOT)], check=False)
            if removed.returncode != 0:
                self.log(f"cleanup: {KUBELET_ROOT} not removed: {removed.stderr.strip()}")

    def _network(self) -> None:
        """Removes the CNI bridge, the network namespaces the pods left and the kubelet's iptables chains."""
        netns = Path("/run/netns")
        if netns.exists():
            for p in netns.iterdir():
                if p.name.startswith("cni-") and p.name not in self.netns_before:
                    run(["umount", str(p)], check=False)
                    with contextlib.suppress(OSError):
                        p.unlink()
        if Path(f"/sys/class/net/{BRIDGE}").exists():
            run(["ip", "link", "delete", BRIDGE], check=False)
        for tool, table, chain in sorted(self._kube_chains() - self.chains_before):
            # Rules of other chains that jump to it first, then the chain itself.
            for rule in run([tool, "-t", table, "-S"], check=False).stdout.splitlines():
                if rule.startswith("-A ") and rule.endswith(f"-j {chain}"):
                    run([tool, "-t", table, "-D", *shlex.split(rule)[1:]], check=False)
            run([tool, "-t", table, "-F", chain], check=False)
            run([tool, "-t", table, "-X", chain], check=False)

    @staticmethod
    def _kube_chains() -> set[tuple[str, str, str]]:
        """The KUBE-* chains of every table, of iptables and ip6tables (the kubelet makes some)."""
        out = set()
        for tool in ("iptables", "ip6tables"):
            if shutil.which(f"{tool}-save") is None:
                continue
            table = ""
            for line in run([f"{tool}-save"], check=False).stdout.splitlines():
                if line.startswith("*"):
                    table = line[1:]
                elif line.startswith(":KUBE-"):
                    out.add((tool, table, line[1:].split()[0]))
        return out

    def _restore_sysctls(self) -> None:
        for name, value in self.sysctls.items():
            path = sysctl_path(name)
            with contextlib.suppress(OSError):
                if path.read_text().strip() != value:
                    path.write_text(value)
                    self.log(f"restored {name} = {value}")

    def _remove_state(self) -> None:
        """Removes the cluster's state (images, etcd's data), keeping the logs."""
        for name in ("containerd", "etcd", "cni", "kubelet-pki"):
            path = self.work / name
            if path.exists() and not mounts_under(path):
                run(["rm", "-rf", "--one-file-system", str(path)], check=False)

    def _remove_host_dirs(self) -> None:
        for d in self.host_dirs_created:
            if d.exists() and not mounts_under(d):
                run(["rm", "-rf", "--one-file-system", str(d)], check=False)


@contextlib.contextmanager
def running(bin_dir: Path, work: Path, log: Log, **options: Any) -> Iterator[Cluster]:
    """A started cluster, stopped and cleaned up on the way out (an exception or a signal included)."""
    cluster = Cluster(bin_dir, work, log, **options)

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        for s, handler in old.items():
            signal.signal(s, handler)


class PodWatch:
    """`kubectl get pods -l SELECTOR --watch`, each event's pod state read with the time it arrived.

    One watch for a series of pods: the events stream from the API server as they happen, so a pod's start is seen
    within the event's delivery, not a polling interval (and no kubectl process is started per look)."""

    #: name, phase, then each container's `started`, one line an event.
    TEMPLATE = '{.metadata.name} {.status.phase} {.status.containerStatuses[*].started}{"\\n"}'

    def __init__(self, cluster: Cluster, selector: str) -> None:
        cmd = [str(cluster.bin / "kubectl"), f"--kubeconfig={cluster.kubeconfig}", "get", "pods", "-l", selector]
        self.proc = subprocess.Popen(
            [*cmd, "--watch", "-o", f"jsonpath={self.TEMPLATE}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.events: queue.Queue[tuple[float, list[str]]] = queue.Queue()
        self.reader = threading.Thread(target=self._read, name="pod-watch", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put((time.monotonic(), line.split()))

    def wait_started(self, name: str, timeout: float) -> float:
        """The monotonic time of the first event showing pod `name` Running with every container started."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                at, fields = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"pod {name} not Running with its containers started within {timeout:g} s") from None
            if fields[:2] == [name, "Running"] and len(fields) > 2 and all(f == "true" for f in fields[2:]):
                return at

    def stop(self) -> None:
        """Ends the watch by its PID."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(timeout=5)


@contextlib.contextmanager
def watching_pods(cluster: Cluster, selector: str) -> Iterator[PodWatch]:
    """A PodWatch for the block's length."""
    watch = PodWatch(cluster, selector)
    try:
        yield watch
    finally:
        watch.stop()
