"""`make e2e`: the plugin deployed as operators deploy it, on a single-node cluster of upstream components.

Builds (or takes from the cache) Kubernetes, etcd and helm from Go modules, makes the plugin's image from
debootstrap and the project's wheels, starts the cluster (deploy/e2e/cluster.py) and runs the scenarios in order,
each an assertion with a message that says what was expected and what was seen. Figures (manifest applied to
plugin pod running, kubelet restart to allocatable back, ...) are printed and written to
benchmarks/results/cluster/e2e.json (from a clean tree only).

    sudo .venv/bin/python deploy/e2e/run.py [--only 1,2] [--keep-work]

Root is needed (a kubelet, containerd, mounts). Everything started is stopped by PID at the end, whatever
happens, and what the kubelet changed on the host is put back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The checkout's root, for benchmarks.provenance: results files name their commit as every benchmark's do.
if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(1, str(Path(__file__).resolve().parents[2]))

import cluster as clusterlib
import images
import podresources

from benchmarks.provenance import measured_commit

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "deploy/e2e"
NS = "kube-system"
GPU = "nvidia.com/gpu"
MIG = "nvidia.com/mig-1g.18gb"
MOCK_GPUS = 8
PLUGIN_SELECTOR = "app.kubernetes.io/name=gpuplugin"
LOCAL_IMAGE = "docker.io/library/gpuplugin:e2e"
BUSYBOX = "docker.io/gpuplugin-e2e/busybox:1"
MOCK_SOCKET = "/run/gpuplugin/mock.sock"
RESULTS = ROOT / "benchmarks/results/cluster/e2e.json"
START = time.monotonic()


class Failed(AssertionError):
    """A scenario's assertion did not hold."""


def log(msg: str) -> None:
    """A line of progress, with the seconds since start."""
    print(f"[{time.monotonic() - START:7.1f}s] {msg}", flush=True)


def check(ok: bool, msg: str) -> None:
    """Fails the scenario with `msg` unless `ok`."""
    if not ok:
        raise Failed(msg)


def wait_for(what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Polls `probe` until it returns something truthy; fails with `what` and the last value or error seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
            if last:
                return last
        except Exception as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            raise Failed(f"{what}: not within {timeout:g} s (last seen: {last!r})")
        time.sleep(interval)


class E2E:
    """The scenarios, run in order against one cluster."""

    def __init__(self, c: clusterlib.Cluster, helm: Path | None, work: Path) -> None:
        self.c = c
        self.helm = helm
        self.work = work
        self.figures: dict[str, float] = {}
        self.plugin_image = ""

    # Helpers.
    def allocatable(self, resource: str = GPU) -> int:
        """The node's allocatable count of `resource` (0 when absent)."""
        return int(self.c.node()["status"].get("allocatable", {}).get(resource, "0"))

    def wait_allocatable(self, want: int, timeout: float, resource: str = GPU) -> float:
        """Waits until the node's allocatable `resource` is `want`; returns the seconds it took."""
        t0 = time.monotonic()
        wait_for(f"node allocatable {resource} == {want}", lambda: self.allocatable(resource) == want, timeout)
        return time.monotonic() - t0

    def plugin_pod(self) -> dict[str, Any]:
        """The plugin's pod that is running and not being deleted."""
        pods = self.c.kubectl_json("-n", NS, "get", "pods", "-l", PLUGIN_SELECTOR)["items"]
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp") and p["status"].get("phase") == "Running"]
        check(len(live) == 1, f"expected one running plugin pod, found {[p['metadata']['name'] for p in pods]}")
        return live[0]  # type: ignore[no-any-return]

    def wait_plugin_ready(self, timeout: float, not_uid: str = "") -> dict[str, Any]:
        """Waits for a Ready plugin pod (another one than `not_uid`)."""

        def ready() -> dict[str, Any] | None:
            pod = self.plugin_pod()
            conds = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
            if pod["metadata"]["uid"] != not_uid and conds.get("Ready") == "True":
                return pod
            return None

        return wait_for("a Ready plugin pod", ready, timeout)  # type: ignore[no-any-return]

    def plugin_exec(self, *args: str) -> str:
        """Runs a command in the plugin's container (its image has no shell, and needs none)."""
        pod = self.plugin_pod()["metadata"]["name"]
        return self.c.kubectl("-n", NS, "exec", pod, "-c", "gpuplugin", "--", *args, timeout=30)

    def gpu_pod(self, name: str, requests: dict[str, int], *, kind: str = "Pod", replicas: int = 1) -> dict[str, Any]:
        """A pod (or Deployment) of busybox containers, one per entry of `requests`, each holding its GPUs."""
        containers = [
            {
                "name": cname,
                "image": BUSYBOX,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", "sleep 3600"],
                "resources": {"limits": {resource: count}},
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "runAsNonRoot": True,
                    "runAsUser": 65534,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
            for cname, (resource, count) in (
                (k.split("=")[0], (k.split("=")[1] if "=" in k else GPU, v)) for k, v in requests.items()
            )
        ]
        spec = {"terminationGracePeriodSeconds": 1, "automountServiceAccountToken": False, "containers": containers}
        labels = {"app": name, "e2e": "gpu"}
        if kind == "Pod":
            return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels}, "spec": spec}
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": labels}, "spec": spec},
            },
        }

    def apply(self, obj: dict[str, Any]) -> None:
        """kubectl apply of one object."""
        self.c.kubectl("apply", "-f", "-", input=json.dumps(obj))

    def running_pods(self, selector: str, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        """Waits until `count` pods of `selector` are Running with every container started."""

        def ready() -> list[dict[str, Any]] | None:
            pods = self.c.kubectl_json("get", "pods", "-l", selector)["items"]
            live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
            for p in live:
                if p["status"].get("reason") == "UnexpectedAdmissionError" or p["status"].get("phase") == "Failed":
                    raise Failed(f"pod {p['metadata']['name']} failed: {p['status'].get('message')}")
            running = [
                p
                for p in live
                if p["status"].get("phase") == "Running"
                and all(s.get("ready") for s in p["status"].get("containerStatuses", []))
            ]
            return running if len(running) == count else None

        return wait_for(f"{count} running pods of {selector}", ready, timeout)  # type: ignore[no-any-return]

    def delete_and_wait(self, *what: str, selector: str = "", timeout: float = 60) -> None:
        """Deletes objects and waits until their pods are gone (their devices free again)."""
        args = ["delete", *what, "--ignore-not-found", "--wait=true", f"--timeout={int(timeout)}s"]
        if selector:
            args += ["-l", selector]
        self.c.kubectl(*args, timeout=timeout + 10)

    def container_view(self, pod: str, container: str) -> tuple[list[str], list[str]]:
        """What a container sees: the IDs in NVIDIA_VISIBLE_DEVICES and its /dev/nvidia* nodes."""
        out = self.c.kubectl(
            "exec",
            pod,
            "-c",
            container,
            "--",
            "sh",
            "-c",
            'echo "$NVIDIA_VISIBLE_DEVICES"; ls -1 /dev/ | grep "^nvidia" || true',
            timeout=30,
        )
        lines = out.splitlines()
        visible = [v for v in lines[0].split(",") if v] if lines else []
        return visible, sorted(f"/dev/{n}" for n in lines[1:] if n)

    def check_gpu_pods(self, selector: str, count: int) -> dict[str, list[str]]:
        """Every container of the pods sees exactly its allocation; no device is held twice. Returns the holders."""
        pods = self.running_pods(selector, count)
        held = {
            (p.namespace, p.name, c.name): [i for d in c.devices for i in d.ids]
            for p in podresources.list_pods()
            for c in p.containers
        }
        owners: dict[str, list[str]] = {}
        for pod in pods:
            name = pod["metadata"]["name"]
            for ctr in pod["spec"]["containers"]:
                want = sum(int(v) for v in ctr["resources"]["limits"].values())
                ids = held.get((pod["metadata"]["namespace"], name, ctr["name"]), [])
                check(len(ids) == want, f"pod-resources lists {ids} for {name}/{ctr['name']}, which asked for {want}")
                visible, nodes = self.container_view(name, ctr["name"])
                check(
                    sorted(visible) == sorted(ids),
                    f"{name}/{ctr['name']}: NVIDIA_VISIBLE_DEVICES={visible}, but the kubelet allocated {ids}",
                )
                check(
                    len(nodes) == want and all(n[len("/dev/nvidia") :].isdigit() for n in nodes),
                    f"{name}/{ctr['name']}: sees device nodes {nodes}, expected {want} /dev/nvidiaN",
                )
                for i in ids:
                    owners.setdefault(i, []).append(f"{name}/{ctr['name']}")
                log(f"  {name}/{ctr['name']}: {', '.join(ids)} as {', '.join(nodes)}")
        twice = {i: o for i, o in owners.items() if len(o) > 1}
        check(not twice, f"devices given to more than one container: {twice}")
        return owners

    def check_undisturbed(self, before: dict[str, Any], after: dict[str, Any], what: str) -> None:
        """The pod `after` is `before`: the same pod and container, never restarted; else fails with `what`."""
        s0, s1 = before["status"]["containerStatuses"][0], after["status"]["containerStatuses"][0]
        check(
            after["metadata"]["uid"] == before["metadata"]["uid"]
            and s1["containerID"] == s0["containerID"]
            and s1["restartCount"] == 0,
            f"{what}: {s0} → {s1}",
        )

    def http(self, ip: str, path: str) -> tuple[int, str]:
        """GET http://ip:9400/path."""
        with urllib.request.urlopen(f"http://{ip}:9400{path}", timeout=5) as r:
            return int(r.status), r.read().decode(errors="replace")

    def load_images(self, builder: images.ImageBuilder) -> None:
        """Builds and loads the plugin, pause and busybox images; the plugin's also under the overlay's name."""
        t0 = time.monotonic()
        for archive in (builder.pause(clusterlib.PAUSE_IMAGE), builder.busybox(BUSYBOX), builder.plugin(LOCAL_IMAGE)):
            self.c.import_image(archive)
        rendered = list(yaml.safe_load_all(self.c.kubectl("kustomize", str(ROOT / "deploy/overlays/mock"))))
        ds = next(o for o in rendered if o and o["kind"] == "DaemonSet")
        self.plugin_image = ds["spec"]["template"]["spec"]["containers"][0]["image"]
        full = self.plugin_image if "/" in self.plugin_image.split(":")[0] else f"docker.io/library/{self.plugin_image}"
        self.c.ctr("images", "tag", "--force", LOCAL_IMAGE, full)
        log(f"images built and loaded in {time.monotonic() - t0:.1f} s (the plugin's as {LOCAL_IMAGE} and {full})")

    # Scenarios.
    def s1_deploy(self) -> None:
        """kubectl apply -k deploy/overlays/mock: pod Running, allocatable 8, /metrics and the probes answer."""
        t0 = time.monotonic()
        self.c.kubectl("apply", "--validate=strict", "-k", str(ROOT / "deploy/overlays/mock"))
        wait_for("the plugin pod Running", lambda: self.plugin_pod(), 90, interval=0.05)
        running = time.monotonic() - t0
        pod = self.wait_plugin_ready(60)
        ready = time.monotonic() - t0
        self.wait_allocatable(MOCK_GPUS, 30)
        alloc = time.monotonic() - t0
        self.figures.update(apply_to_pod_running_s=running, apply_to_pod_ready_s=ready, apply_to_allocatable_s=alloc)
        log(f"  applied → pod Running {running:.2f} s, Ready {ready:.2f} s, allocatable {GPU}=8 {alloc:.2f} s")
        ip = pod["status"]["podIP"]
        for path in ("/healthz", "/readyz"):
            status, body = self.http(ip, path)
            check(status == 200, f"GET {path} through the pod ({ip}) answered {status}: {body[:200]}")
        status, body = self.http(ip, "/metrics")
        check(status == 200 and "gpuplugin_" in body, f"GET /metrics through the pod answered {status}: {body[:300]}")
        restarts = pod["status"]["containerStatuses"][0]["restartCount"]
        check(restarts == 0, f"the plugin container restarted {restarts} times (liveness probe?)")
        alloc_ids = podresources.allocatable().get(GPU, [])
        check(len(alloc_ids) == MOCK_GPUS, f"pod-resources GetAllocatableResources lists {alloc_ids}")

    def s2_allocate(self) -> None:
        """A Deployment of pods holding 1 and 2 GPUs: each container sees its allocation; none is given twice."""
        self.apply(self.gpu_pod("gpu-workers", {"one": 1, "two": 2}, kind="Deployment", replicas=2))
        owners = self.check_gpu_pods("app=gpu-workers", 2)
        check(len(owners) == 6, f"6 GPUs should be held by 2 pods of (1 + 2), found {len(owners)}")
        self.delete_and_wait("deployment/gpu-workers")
        wait_for(
            "gpu-workers pods gone",
            lambda: not self.c.kubectl("get", "pods", "-l", "app=gpu-workers", "-o", "name").strip(),
            60,
        )

    def s3_health(self) -> None:
        """XIDs drop allocatable within 2 s; a pod needing more than the healthy GPUs is Pending until recovery."""
        t0 = time.monotonic()
        self.plugin_exec("gpuplugin", "mock", "xid", "--gpu", "3", "--xid", "79", "--socket", MOCK_SOCKET)
        injected = time.monotonic()
        self.wait_allocatable(MOCK_GPUS - 1, 10)
        took = time.monotonic() - injected
        self.figures["xid_to_allocatable_s"] = took
        check(took <= 2.0, f"allocatable fell to {MOCK_GPUS - 1} {took:.2f} s after the XID, more than 2 s")
        log(
            f"  XID 79 on GPU 3 (kubectl exec {injected - t0:.2f} s) → node allocatable {MOCK_GPUS - 1} {took:.2f} s"
            " after the mock took it"
        )
        for gpu in (0, 1, 2, 4, 5):
            self.plugin_exec("gpuplugin", "mock", "xid", "--gpu", str(gpu), "--xid", "79", "--socket", MOCK_SOCKET)
        self.wait_allocatable(2, 5)
        self.apply(self.gpu_pod("gpu-three", {"main": 3}))
        time.sleep(5)
        pod = self.c.kubectl_json("get", "pod", "gpu-three")
        conds = {c["type"]: c for c in pod["status"].get("conditions", [])}
        sched = conds.get("PodScheduled", {})
        check(
            pod["status"].get("phase") == "Pending" and sched.get("status") == "False",
            f"a 3-GPU pod with 2 healthy GPUs should stay Pending, unscheduled; it is {pod['status']}",
        )
        check(
            f"Insufficient {GPU}" in sched.get("message", ""),
            f"the scheduler should say 'Insufficient {GPU}', it says {sched.get('message')!r}",
        )
        log(f"  3-GPU pod Pending: {sched.get('message')}")
        for gpu in (0, 1, 2, 3, 4, 5):
            self.plugin_exec("gpuplugin", "mock", "recover", "--gpu", str(gpu), "--socket", MOCK_SOCKET)
        self.wait_allocatable(MOCK_GPUS, 5)
        self.check_gpu_pods("app=gpu-three", 1)
        self.delete_and_wait("pod/gpu-three")

    def s4_restarts(self) -> None:
        """Plugin pod deleted: recreated, GPUs back. Kubelet restarted: registered again, running pods untouched."""
        old = self.plugin_pod()
        t0 = time.monotonic()
        self.c.kubectl("-n", NS, "delete", "pod", old["metadata"]["name"], "--wait=false")
        self.wait_plugin_ready(90, not_uid=old["metadata"]["uid"])
        ready = time.monotonic() - t0
        wait_for("pod-resources lists 8 GPUs again", lambda: len(podresources.allocatable().get(GPU, [])) == 8, 30)
        self.wait_allocatable(MOCK_GPUS, 30)
        self.figures["plugin_pod_deleted_to_ready_s"] = ready
        log(f"  plugin pod deleted → new pod Ready {ready:.2f} s, allocatable {MOCK_GPUS}")

        self.apply(self.gpu_pod("survivor", {"main": 1}))
        before = self.running_pods("app=survivor", 1)[0]
        before_ids = self.check_gpu_pods("app=survivor", 1)
        self.c.stop_kubelet()
        t0 = time.monotonic()
        wall0 = time.time()
        self.c.start_kubelet()
        wait_for(
            "pod-resources after the kubelet restart lists 8 allocatable GPUs",
            lambda: len(podresources.allocatable(timeout=1).get(GPU, [])) == MOCK_GPUS,
            60,
            0.02,
        )
        back = time.monotonic() - t0

        def node_back() -> bool:
            node = self.c.node()
            ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
            beat = time.mktime(time.strptime(ready["lastHeartbeatTime"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
            return bool(
                ready["status"] == "True"
                and beat >= int(wall0)
                and int(node["status"]["allocatable"].get(GPU, 0)) == MOCK_GPUS
            )

        wait_for("node Ready again with allocatable 8 after the kubelet restart", node_back, 60)
        node = time.monotonic() - t0
        self.figures.update(kubelet_restart_to_allocatable_s=back, kubelet_restart_to_node_status_s=node)
        log(f"  kubelet restarted → pod-resources allocatable {MOCK_GPUS} in {back:.2f} s, node status in {node:.2f} s")
        after = self.running_pods("app=survivor", 1)[0]
        self.check_undisturbed(before, after, "the running pod was disturbed by the kubelet restart")
        # The restarted kubelet lists a pod's devices once it has synced the pod again.
        wait_for(
            "pod-resources lists the running pod's GPU again after the kubelet restart",
            lambda: any(
                p.name == before["metadata"]["name"] and any(d.ids for c in p.containers for d in c.devices)
                for p in podresources.list_pods()
            ),
            30,
        )
        check(self.check_gpu_pods("app=survivor", 1) == before_ids, "the running pod's GPU changed")
        # A new pod is admitted: the plugin registered again (UnexpectedAdmissionError otherwise).
        self.apply(self.gpu_pod("after-restart", {"main": 2}))
        self.check_gpu_pods("e2e=gpu", 2)
        self.delete_and_wait("pod/survivor", "pod/after-restart")

    def config(self) -> dict[str, Any]:
        """The plugin's config file, from its ConfigMap."""
        cm = self.c.kubectl_json("-n", NS, "get", "configmap", "gpuplugin-config")
        return yaml.safe_load(cm["data"]["config.yaml"])  # type: ignore[no-any-return]

    def set_config(self, config: dict[str, Any]) -> None:
        """Replaces the plugin's config file in its ConfigMap."""
        cm = self.c.kubectl_json("-n", NS, "get", "configmap", "gpuplugin-config")
        cm["data"]["config.yaml"] = yaml.safe_dump(config, sort_keys=False)
        self.c.kubectl("replace", "-f", "-", input=json.dumps(cm))

    def s5_config(self) -> None:
        """ConfigMap edited (time-slicing replicas 1 → 4): allocatable 8 → 32, the plugin pod not restarted."""
        before = self.plugin_pod()
        original = self.config()
        shared = {**original, "sharing": {"timeSlicing": {"resources": [{"name": GPU, "replicas": 4}]}}}
        t0 = time.monotonic()
        self.set_config(shared)
        self.wait_allocatable(MOCK_GPUS * 4, 120)
        took = time.monotonic() - t0
        self.figures["configmap_edit_to_allocatable_s"] = took
        log(f"  ConfigMap edited → allocatable {MOCK_GPUS * 4} in {took:.1f} s")
        after = self.plugin_pod()
        self.check_undisturbed(before, after, "the plugin pod restarted for a config change")
        self.set_config(original)
        self.wait_allocatable(MOCK_GPUS, 120)

    def s6_partitioned(self) -> None:
        """The partitioned backend: MIG-style resources appear and a pod asking for one runs."""
        mig = yaml.safe_load((ROOT / "deploy/examples/mig-mock.yaml").read_text())
        self.set_config({**self.config(), "backend": mig["backend"]})
        old = self.plugin_pod()
        self.c.kubectl("-n", NS, "set", "env", "daemonset/gpuplugin", "GPUPLUGIN_BACKEND=partitioned")
        self.wait_plugin_ready(90, not_uid=old["metadata"]["uid"])
        self.wait_allocatable(MOCK_GPUS * 7, 60, resource=MIG)
        log(f"  allocatable {MIG}: {self.allocatable(MIG)}")
        self.apply(self.gpu_pod("mig-pod", {f"main={MIG}": 1}))
        pod = self.running_pods("app=mig-pod", 1)[0]
        visible, _ = self.container_view(pod["metadata"]["name"], "main")
        check(
            len(visible) == 1 and visible[0].startswith("MIG-"),
            f"the MIG pod sees NVIDIA_VISIBLE_DEVICES={visible}, expected one MIG-... id",
        )
        held = [d.ids for p in podresources.list_pods() if p.name == "mig-pod" for c in p.containers for d in c.devices]
        check(len(held) == 1 and len(held[0]) == 1, f"pod-resources lists {held} for mig-pod, expected one partition")
        log(f"  mig-pod holds {held[0][0]}, sees {visible[0]}")
        self.delete_and_wait("pod/mig-pod")
        self.c.kubectl("delete", "-k", str(ROOT / "deploy/overlays/mock"), "--wait=true", timeout=90)
        wait_for(
            "plugin pods gone",
            lambda: not self.c.kubectl("-n", NS, "get", "pods", "-l", PLUGIN_SELECTOR, "-o", "name").strip(),
            60,
        )

    def s7_helm(self) -> None:
        """The Helm chart: lint, template agreeing with Kustomize, and install passing scenarios 1 and 2."""
        if self.helm is None:
            raise Failed("helm was not built (deploy/e2e/build-helm.sh)")
        chart = ROOT / "deploy/helm/gpuplugin"
        helm = [str(self.helm), f"--kubeconfig={self.c.kubeconfig}"]
        subprocess.run([*helm, "lint", "--strict", str(chart)], check=True, capture_output=True, text=True)
        env = {**os.environ, "GPUPLUGIN_E2E_HELM": str(self.helm), "GPUPLUGIN_E2E_KUBECTL": str(self.c.bin / "kubectl")}
        test = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_helm.py"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        check(
            test.returncode == 0 and "skipped" not in test.stdout.splitlines()[-1],
            f"tests/test_helm.py (helm template against the Kustomize render) failed:\n{test.stdout[-3000:]}",
        )
        log(f"  helm lint, {test.stdout.splitlines()[-1].strip()}")
        repo, _, tag = LOCAL_IMAGE.rpartition(":")
        t0 = time.monotonic()
        out = subprocess.run(
            [
                *helm,
                "install",
                "gpuplugin",
                str(chart),
                "--namespace",
                NS,
                "--set",
                "backend=mock",
                "--set",
                f"image.repository={repo}",
                "--set",
                f"image.tag={tag}",
                "--wait",
                "--timeout",
                "120s",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        check(out.returncode == 0, f"helm install failed: {out.stderr or out.stdout}")
        pod = self.wait_plugin_ready(60)
        self.wait_allocatable(MOCK_GPUS, 60)
        self.figures["helm_install_to_allocatable_s"] = time.monotonic() - t0
        status, body = self.http(pod["status"]["podIP"], "/metrics")
        check(status == 200 and "gpuplugin_" in body, f"GET /metrics through the Helm release's pod: {status}")
        log(f"  helm install → Ready, allocatable {MOCK_GPUS} in {self.figures['helm_install_to_allocatable_s']:.2f} s")
        self.s2_allocate()
        subprocess.run([*helm, "uninstall", "gpuplugin", "--namespace", NS, "--wait"], check=True, capture_output=True)

    def diagnostics(self) -> None:
        """What helps to see why a scenario failed."""
        for args in (
            ("get", "nodes", "-o", "wide"),
            ("get", "pods", "-A", "-o", "wide"),
            ("-n", NS, "describe", "pods", "-l", PLUGIN_SELECTOR),
            ("-n", NS, "logs", "-l", PLUGIN_SELECTOR, "--tail=60"),
            ("get", "events", "-A", "--sort-by=.lastTimestamp"),
        ):
            with contextlib.suppress(Exception):
                print(f"--- kubectl {' '.join(args)}\n{self.c.kubectl(*args, timeout=20)}", flush=True)
        kubelet_log = self.c.logs / "kubelet.log"
        if kubelet_log.exists():
            tail = [line for line in kubelet_log.read_text(errors="replace").splitlines() if " E" in line[:3]][-30:]
            print("--- kubelet errors (last 30)\n" + "\n".join(tail), flush=True)


SCENARIOS: list[tuple[str, Callable[[E2E], None]]] = [
    ("1 deploy the mock overlay", E2E.s1_deploy),
    ("2 allocate 1 and 2 GPUs", E2E.s2_allocate),
    ("3 health: XIDs and recovery", E2E.s3_health),
    ("4 plugin pod and kubelet restarts", E2E.s4_restarts),
    ("5 ConfigMap hot reload", E2E.s5_config),
    ("6 the partitioned backend", E2E.s6_partitioned),
    ("7 the Helm chart", E2E.s7_helm),
]


def run_scenarios(
    e2e: Any,
    scenarios: list[tuple[str, Callable[[Any], None]]],
    only: set[str],
    timings: dict[str, float],
    passed: list[str],
    failed: list[str],
) -> None:
    """Runs the scenarios in order (those in `only`, when given), up to the first failure, which shows diagnostics."""
    for title, scenario in scenarios:
        key = title.split()[0]
        if only and key not in only:
            continue
        log(f"scenario {title}")
        t0 = time.monotonic()
        try:
            scenario(e2e)
        except Exception as e:
            failed.append(title)
            log(f"FAIL scenario {title}: {e}")
            e2e.diagnostics()
            return
        passed.append(title)
        timings[f"scenario_{key}_s"] = time.monotonic() - t0
        log(f"ok   scenario {title} ({timings[f'scenario_{key}_s']:.1f} s)")


def build(script: str) -> tuple[Path, float]:
    """Runs a build script of deploy/e2e (cached); returns what it printed last and the seconds it took."""
    t0 = time.monotonic()
    proc = subprocess.run([str(HERE / script)], stdout=subprocess.PIPE, text=True, check=True)
    return Path(proc.stdout.strip().splitlines()[-1]), time.monotonic() - t0


def write_results(path: Path, figures: dict[str, Any]) -> bool:
    """Writes a passed run's figures under the commit measured and the date; only from a clean checkout (results name
    the commit they measured, and a changed tree is none), else says why nothing was written."""
    commit = measured_commit()
    if commit.endswith("-dirty"):
        log(f"figures not written to {path}: the checkout has changes ({commit})")
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"commit": commit, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **figures}
    path.write_text(json.dumps(result, indent=2) + "\n")
    log(f"figures written to {path}")
    return True


def parse_args(doc: str | None, results: Path, only_help: str) -> argparse.Namespace:
    """The command line of an e2e entry: --only, --keep-work, --results."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help=only_help)
    parser.add_argument("--keep-work", action="store_true", help="keep the work directory (logs) after a pass")
    parser.add_argument("--results", type=Path, default=results, help="where to write the figures (JSON)")
    return parser.parse_args()


def preflight(target: str, tools: tuple[str, ...]) -> bool:
    """Root and the host tools (`tools` and those every e2e needs) are there; one line on stderr when not."""
    if os.geteuid() != 0:
        print(f"{target} needs root: it runs a kubelet and containerd", file=sys.stderr)
        return False
    for tool in (*tools, "runc", "debootstrap", "openssl", "gcc", "iptables"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: deploy/e2e/setup.sh installs what the e2e needs", file=sys.stderr)
            return False
    return True


def finish(name: str, work: Path, passed: list[str], failed: list[str], *, keep_work: bool) -> int:
    """Keeps the logs of a failed run (or when asked), else removes the work directory; the exit status."""
    if failed or keep_work:
        log(f"logs kept in {work}/cluster/logs")
    else:
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
    print(f"{name}: {len(passed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def main() -> int:
    """Builds, starts, runs the scenarios, stops; exit status 0 when every scenario passed."""
    args = parse_args(__doc__, RESULTS, "comma-separated scenario numbers (default: all)")
    if not preflight("make e2e", ("containerd", "ctr")):
        return 2
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    timings: dict[str, float] = {}
    log("building Kubernetes, etcd and helm from Go modules (cached by version)")
    bin_dir, timings["build_kubernetes_s"] = build("build-k8s.sh")
    helm: Path | None
    try:
        helm, timings["build_helm_s"] = build("build-helm.sh")
    except subprocess.CalledProcessError:
        helm = None
        log("helm could not be built: scenario 7 will fail")
    log(f"binaries ready in {timings['build_kubernetes_s'] + timings.get('build_helm_s', 0):.1f} s: {bin_dir}")
    cache = bin_dir.parent.parent
    work = Path(tempfile.mkdtemp(prefix="gpuplugin-e2e.", dir="/tmp"))
    log(f"work directory {work}")
    failed: list[str] = []
    passed: list[str] = []
    figures: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        with clusterlib.running(bin_dir, work / "cluster", log) as c:
            timings["cluster_start_s"] = time.monotonic() - t0
            log(f"cluster up in {timings['cluster_start_s']:.1f} s (node {clusterlib.NODE_NAME} Ready)")
            e2e = E2E(c, helm, work)
            e2e.figures = figures
            t0 = time.monotonic()
            e2e.load_images(images.ImageBuilder(cache, work / "images", log))
            timings["images_s"] = time.monotonic() - t0
            run_scenarios(e2e, SCENARIOS, only, timings, passed, failed)
            log("stopping the cluster")
    except Exception as e:
        failed.append(f"setup: {e}")
        log(f"FAIL {e}")
    finally:
        # The image's layers are large; the logs (under cluster/logs) are what a failed run needs.
        subprocess.run(["rm", "-rf", "--one-file-system", str(work / "images")], check=False)
    total = time.monotonic() - START
    timings["total_s"] = total
    if not failed and not only:
        write_results(
            args.results,
            {
                "kubernetes": bin_dir.parent.name.removeprefix("k8s-"),
                "figures_s": {k: round(v, 3) for k, v in figures.items()},
                "timings_s": {k: round(v, 1) for k, v in timings.items()},
            },
        )
    print(
        json.dumps(
            {
                "figures_s": {k: round(v, 3) for k, v in figures.items()},
                "timings_s": {k: round(v, 1) for k, v in timings.items()},
            },
            indent=2,
        )
    )
    return finish("e2e", work, passed, failed, keep_work=args.keep_work)


if __name__ == "__main__":
    sys.exit(main())
