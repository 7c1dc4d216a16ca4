"""`make e2e-dra`: the plugin in DRA mode (deploy/dra, the mock backend) on the single-node cluster of `make e2e`.

The same cluster (deploy/e2e/cluster.py), but with containerd 1.7 built from Go modules
(deploy/e2e/build-containerd.sh) and CDI on in its CRI plugin, so that the kubelet prepares claims through the
plugin and containerd injects the CDI spec the plugin wrote for each. Scenarios, in order: a pod from the example
ResourceClaimTemplate (CEL on attributes and memory) sees what its claim's CDI spec injects; a claim of two GPUs; an
XID takes an allocated GPU out of the ResourceSlice; a plugin restart keeps the prepared claim and pod deletion
unprepares it; a kubelet restart; a ResourceClaim shared by the two containers of a pod (deploy/dra/shared-claim.yaml):
both see its GPU; pod start, creation to container started, of 10 pods one after another with a claim, then (the DRA
plugin replaced by the device plugin of deploy/overlays/mock, as `make e2e` deploys it) of 10 with
`nvidia.com/gpu: 1`. Figures (and the pod-start samples) go to benchmarks/results/cluster/e2e-dra.json (from a clean
tree only).

    sudo .venv/bin/python deploy/e2e/run_dra.py [--only a,b] [--keep-work]

The plugin pod reaches the API server on the host's loopback (hostNetwork, KUBERNETES_SERVICE_HOST): this cluster
runs no kube-proxy, so the `kubernetes` Service's ClusterIP leads nowhere.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cluster as clusterlib
import images
import run as dp
from run import check, log, wait_for

ROOT = dp.ROOT
NS = dp.NS
DRIVER = "gpu.gpuplugin.dev"
CDI_DIR = Path("/var/run/cdi")
CHECKPOINT = clusterlib.KUBELET_ROOT / "plugins" / DRIVER / "checkpoint.json"
RESULTS = ROOT / "benchmarks/results/cluster/e2e-dra.json"
#: Pods started one after another for each kind of request in the pod-start scenario.
POD_STARTS = 10


def host_api_daemonset(objects: list[dict[str, Any]], port: int) -> list[dict[str, Any]]:
    """The rendered objects, the plugin's DaemonSet on the host's network with the API server at 127.0.0.1:port."""
    out = []
    for obj in objects:
        if obj.get("kind") == "DaemonSet":
            obj = json.loads(json.dumps(obj))
            spec = obj["spec"]["template"]["spec"]
            spec["hostNetwork"] = True
            spec["dnsPolicy"] = "ClusterFirstWithHostNet"
            for container in spec["containers"]:
                env = [e for e in container.get("env", []) if not e["name"].startswith("KUBERNETES_SERVICE_")]
                env += [
                    {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                    {"name": "KUBERNETES_SERVICE_PORT", "value": str(port)},
                ]
                container["env"] = env
        out.append(obj)
    return out


def attribute(device: dict[str, Any], name: str) -> Any:
    """A slice device's attribute value, whether its key is qualified by the driver's domain or not."""
    attrs = device.get("attributes", {})
    value = attrs.get(name, attrs.get(f"{DRIVER}/{name}", {}))
    return next(iter(value.values()), None) if isinstance(value, dict) else None


def visible_devices(log_text: str) -> list[str]:
    """The IDs of the `NVIDIA_VISIBLE_DEVICES=...` line a test container prints first."""
    for line in log_text.splitlines():
        if line.startswith("NVIDIA_VISIBLE_DEVICES="):
            return [v for v in line.split("=", 1)[1].split(",") if v]
    return []


def spec_env(spec: dict[str, Any]) -> dict[str, str]:
    """Every environment variable a CDI spec injects (its own edits and its devices'), by name."""
    edits = [spec.get("containerEdits", {})] + [d.get("containerEdits", {}) for d in spec.get("devices", [])]
    return dict(e.split("=", 1) for ed in edits for e in ed.get("env", []) if "=" in e)


class DraE2E(dp.E2E):
    """The DRA scenarios, run in order against one cluster."""

    def __init__(self, c: clusterlib.Cluster, work: Path) -> None:
        super().__init__(c, None, work)
        self.claim_pods: dict[str, dict[str, Any]] = {}
        self.samples: dict[str, list[float]] = {}

    # Helpers.
    def slice_devices(self) -> dict[str, dict[str, Any]]:
        """The devices of the node's ResourceSlices of the driver, by name."""
        slices = self.c.kubectl_json("get", "resourceslices")["items"]
        return {
            d["name"]: d
            for s in slices
            if s["spec"].get("driver") == DRIVER and s["spec"].get("nodeName") == clusterlib.NODE_NAME
            for d in s["spec"].get("devices", [])
        }

    def claim_pod(
        self, name: str, template: str = "", *, claim: str = "", containers: tuple[str, ...] = ("main",)
    ) -> dict[str, Any]:
        """A busybox pod holding one claim, from `template` or the ResourceClaim `claim`, named by each of its
        `containers`, each printing what it sees, then sleeping."""
        source = {"resourceClaimName": claim} if claim else {"resourceClaimTemplateName": template}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": name, "e2e": "dra"}},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "automountServiceAccountToken": False,
                "containers": [
                    {
                        "name": container,
                        "image": dp.BUSYBOX,
                        "imagePullPolicy": "Never",
                        "command": [
                            "sh",
                            "-c",
                            'echo "NVIDIA_VISIBLE_DEVICES=$NVIDIA_VISIBLE_DEVICES"; ls -1 /dev | grep "^nvidia"; '
                            "exec sleep 3600",
                        ],
                        "resources": {"claims": [{"name": "gpu"}]},
                    }
                    for container in containers
                ],
                "resourceClaims": [{"name": "gpu", **source}],
            },
        }

    def container_sees(self, pod: str, container: str) -> tuple[list[str], list[str]]:
        """What a claim pod's container printed: its NVIDIA_VISIBLE_DEVICES IDs and its /dev/nvidia* nodes."""
        text = wait_for(
            f"{pod}/{container}'s log",
            lambda: self.c.kubectl("logs", pod, "-c", container, timeout=20) or None,
            20,
        )
        return visible_devices(text), sorted(line for line in text.splitlines()[1:] if line.startswith("nvidia"))

    def claim_spec(self, uid: str) -> Path:
        """The one CDI spec the plugin wrote for claim `uid`."""
        specs = sorted(CDI_DIR.glob(f"*{uid}*.json"))
        check(len(specs) == 1, f"one CDI spec for claim {uid} in {CDI_DIR}, found {[p.name for p in specs]}")
        return specs[0]

    def start_claim_pod(self, name: str, template: str, want: int) -> dict[str, Any]:
        """Starts a claim pod; checks that it got `want` devices and sees what its claim's CDI spec injects."""
        t0 = time.monotonic()
        self.apply(self.claim_pod(name, template))
        pod = self.running_pods(f"app={name}", 1, timeout=90)[0]
        running = time.monotonic() - t0
        claim_name = pod["status"]["resourceClaimStatuses"][0]["resourceClaimName"]
        claim = self.c.kubectl_json("get", "resourceclaim", claim_name)
        results = claim["status"]["allocation"]["devices"]["results"]
        check(
            len(results) == want and all(r["driver"] == DRIVER for r in results),
            f"claim {claim_name} of {name}: allocated {results}, expected {want} devices of {DRIVER}",
        )
        devices = self.slice_devices()
        allocated = [devices[r["device"]] for r in results]
        spec_file = self.claim_spec(claim["metadata"]["uid"])
        injected = spec_env(json.loads(spec_file.read_text())).get("NVIDIA_VISIBLE_DEVICES", "")
        visible, nodes = self.container_sees(name, "main")
        check(
            bool(visible) and visible == [v for v in injected.split(",") if v],
            f"{name} sees NVIDIA_VISIBLE_DEVICES={visible}, its claim's CDI spec injects {injected!r}",
        )
        ids = {str(attribute(d, "uuid")) for d in allocated} | {str(attribute(d, "index")) for d in allocated}
        check(
            len(visible) == want and set(visible) <= ids,
            f"{name} sees {visible}, the claim allocated {[r['device'] for r in results]} ({sorted(ids)})",
        )
        check(len(nodes) == want, f"{name} sees device nodes {nodes}, expected {want}")
        log(
            f"  {name}: claim {claim_name} → {', '.join(r['device'] for r in results)}; container sees "
            f"NVIDIA_VISIBLE_DEVICES={','.join(visible)} and /dev/{', /dev/'.join(nodes)} ({running:.2f} s)"
        )
        info = {"pod": pod, "claim": claim, "devices": allocated, "spec": spec_file, "running_s": running}
        self.claim_pods[name] = info
        return info

    def mock(self, *args: str) -> None:
        """`gpuplugin mock ...` in the plugin's container."""
        self.plugin_exec("gpuplugin", "mock", *args, "--socket", dp.MOCK_SOCKET)

    # Scenarios.
    def s0_deploy(self) -> None:
        """kubectl apply of deploy/dra: the plugin runs and publishes the node's 8 mock GPUs in a ResourceSlice."""
        rendered = [o for o in yaml.safe_load_all(self.c.kubectl("kustomize", str(ROOT / "deploy/dra"))) if o]
        objects = host_api_daemonset(rendered, self.c.ports["apiserver"])
        templates = [
            o for o in yaml.safe_load_all((ROOT / "deploy/dra/claim-template.yaml").read_text()) if o["kind"] != "Pod"
        ]
        t0 = time.monotonic()
        self.c.kubectl(
            "apply",
            "--validate=strict",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects + templates}),
        )
        self.wait_plugin_ready(90)
        ready = time.monotonic() - t0
        wait_for(
            f"{dp.MOCK_GPUS} GPUs in the node's ResourceSlices", lambda: len(self.slice_devices()) >= dp.MOCK_GPUS, 60
        )
        published = time.monotonic() - t0
        self.figures.update(apply_to_plugin_ready_s=ready, apply_to_slice_published_s=published)
        log(
            f"  applied → plugin Ready {ready:.2f} s, ResourceSlice with {len(self.slice_devices())} devices"
            f" {published:.2f} s"
        )

    def s1_claim_template(self) -> None:
        """A pod from the example template (CEL on productName and memory) sees what the claim's CDI spec injects."""
        info = self.start_claim_pod("claim-one", "one-large-gpu", 1)
        self.figures["claim_pod_apply_to_running_s"] = info["running_s"]

    def s2_two_gpus(self) -> None:
        """A claim of two GPUs on one NUMA node: both allocated, both visible in the container."""
        info = self.start_claim_pod("claim-two", "two-gpus-one-numa-node", 2)
        numa = {attribute(d, "numaNode") for d in info["devices"]}
        check(len(numa) == 1, f"the two GPUs of claim-two are on NUMA nodes {numa}, expected one")
        self.figures["two_gpu_claim_apply_to_running_s"] = info["running_s"]

    def s3_xid(self) -> None:
        """XID 79 on an allocated GPU takes it out of the ResourceSlice within 2 s; recovery brings it back."""
        device = self.claim_pods["claim-one"]["devices"][0]
        name, index = device["name"], attribute(device, "index")
        t0 = time.monotonic()
        self.mock("xid", "--gpu", str(index), "--xid", "79")
        injected = time.monotonic()
        wait_for(f"{name} gone from the ResourceSlice", lambda: name not in self.slice_devices(), 10, 0.02)
        took = time.monotonic() - injected
        self.figures.update(xid_to_slice_s=took, xid_with_kubectl_exec_to_slice_s=time.monotonic() - t0)
        check(took <= 2.0, f"{name} left the ResourceSlice {took:.2f} s after the XID, more than 2 s")
        log(f"  XID 79 on GPU {index} ({name}, held by claim-one) → gone from the ResourceSlice in {took:.2f} s")
        self.mock("recover", "--gpu", str(index))
        t0 = time.monotonic()
        wait_for(f"{name} back in the ResourceSlice", lambda: name in self.slice_devices(), 10, 0.02)
        self.figures["recover_to_slice_s"] = time.monotonic() - t0
        log(f"  recovered → back in {self.figures['recover_to_slice_s']:.2f} s")

    def s4_plugin_restart(self) -> None:
        """Plugin pod deleted: the prepared claim stays (spec, checkpoint); deleting its pod unprepares it."""
        info = self.claim_pods["claim-one"]
        uid, spec = info["claim"]["metadata"]["uid"], info["spec"]
        old = self.plugin_pod()
        t0 = time.monotonic()
        self.c.kubectl("-n", NS, "delete", "pod", old["metadata"]["name"], "--wait=false")
        self.wait_plugin_ready(90, not_uid=old["metadata"]["uid"])
        ready = time.monotonic() - t0
        self.figures["plugin_pod_deleted_to_ready_s"] = ready
        check(spec.exists(), f"the plugin restart removed claim {uid}'s CDI spec {spec}")
        check(uid in CHECKPOINT.read_text(), f"the restarted plugin's checkpoint {CHECKPOINT} lost claim {uid}")
        pod = self.running_pods("app=claim-one", 1)[0]
        self.check_undisturbed(info["pod"], pod, "claim-one was disturbed by the plugin restart")
        log(f"  plugin pod deleted → new pod Ready {ready:.2f} s; claim {uid} still prepared (spec, checkpoint)")
        t0 = time.monotonic()
        self.c.kubectl("delete", "pod", "claim-one", "--wait=false")
        wait_for(f"claim {uid}'s CDI spec removed", lambda: not spec.exists(), 60, 0.05)
        gone = time.monotonic() - t0
        wait_for(f"claim {uid} gone from the checkpoint", lambda: uid not in CHECKPOINT.read_text(), 10)
        self.figures["pod_deleted_to_unprepared_s"] = gone
        log(f"  claim-one deleted → unprepared, CDI spec removed in {gone:.2f} s")

    def s5_kubelet_restart(self) -> None:
        """Kubelet restarted: the plugin registers again, the running claim pod is untouched and is unprepared."""
        info = self.claim_pods["claim-two"]
        uid, spec = info["claim"]["metadata"]["uid"], info["spec"]
        before = self.running_pods("app=claim-two", 1)[0]
        kubelet_log = self.c.logs / "kubelet.log"
        offset = kubelet_log.stat().st_size
        self.c.stop_kubelet()
        t0 = time.monotonic()
        self.c.start_kubelet()
        connected = f'driverName="{DRIVER}"'
        wait_for(
            "the kubelet connected to the plugin again",
            lambda: any(
                "Connection changed" in line and connected in line and "connected=true" in line
                for line in kubelet_log.read_text(errors="replace")[offset:].splitlines()
            ),
            60,
            0.05,
        )
        registered = time.monotonic() - t0
        self.c.wait_node_ready(60)
        self.figures["kubelet_restart_to_plugin_connected_s"] = registered
        after = self.running_pods("app=claim-two", 1)[0]
        self.check_undisturbed(before, after, "claim-two was disturbed by the kubelet restart")
        check(spec.exists(), f"the kubelet restart removed claim {uid}'s CDI spec {spec}")
        log(f"  kubelet restarted → plugin connected again {registered:.2f} s; claim-two untouched")
        # The kubelet deletes its node's ResourceSlices when it starts, for the drivers to publish them again.
        wait_for("the node's ResourceSlices published again", lambda: len(self.slice_devices()) >= dp.MOCK_GPUS, 10)
        self.figures["kubelet_restart_to_slices_back_s"] = time.monotonic() - t0
        log(f"  ResourceSlices back {self.figures['kubelet_restart_to_slices_back_s']:.2f} s after the restart")
        t0 = time.monotonic()
        self.c.kubectl("delete", "pod", "claim-two", "--wait=false")
        wait_for(f"claim {uid}'s CDI spec removed", lambda: not spec.exists(), 60, 0.05)
        gone = self.figures["pod_deleted_to_unprepared_after_kubelet_restart_s"] = time.monotonic() - t0
        wait_for("every claim's CDI spec removed", lambda: not list(CDI_DIR.glob(f"*{DRIVER}*claim*")), 30)
        log(f"  claim-two deleted → unprepared in {gone:.2f} s")

    def s6_shared_claim(self) -> None:
        """deploy/dra/shared-claim.yaml: one ResourceClaim named by both containers of a pod; both see its one GPU,
        the NVIDIA_VISIBLE_DEVICES its CDI spec injects; the pod's deletion unprepares it."""
        docs = [d for d in yaml.safe_load_all((ROOT / "deploy/dra/shared-claim.yaml").read_text()) if d]
        claim_doc = next(d for d in docs if d["kind"] == "ResourceClaim")
        containers = tuple(c["name"] for c in next(d for d in docs if d["kind"] == "Pod")["spec"]["containers"])
        name = claim_doc["metadata"]["name"]
        self.c.kubectl("apply", "--validate=strict", "-f", "-", input=json.dumps(claim_doc))
        t0 = time.monotonic()
        self.apply(self.claim_pod("shared", claim=name, containers=containers))
        self.running_pods("app=shared", 1, timeout=90)
        running = time.monotonic() - t0
        claim = self.c.kubectl_json("get", "resourceclaim", name)
        results = claim["status"]["allocation"]["devices"]["results"]
        check(
            len(results) == 1 and results[0]["driver"] == DRIVER,
            f"claim {name}: allocated {results}, expected one device of {DRIVER}",
        )
        reserved = [r["name"] for r in claim["status"].get("reservedFor", [])]
        check(reserved == ["shared"], f"claim {name} is reserved for {reserved}, expected the pod shared alone")
        uid = claim["metadata"]["uid"]
        spec_file = self.claim_spec(uid)
        injected = spec_env(json.loads(spec_file.read_text())).get("NVIDIA_VISIBLE_DEVICES", "")
        device = self.slice_devices()[results[0]["device"]]
        check(
            injected in {str(attribute(device, "uuid")), str(attribute(device, "index"))},
            f"claim {name}'s CDI spec injects NVIDIA_VISIBLE_DEVICES={injected!r}, not its device {device['name']}",
        )
        seen = {container: self.container_sees("shared", container) for container in containers}
        for container, (visible, nodes) in seen.items():
            check(
                visible == [injected],
                f"shared/{container} sees NVIDIA_VISIBLE_DEVICES={visible}, its claim's CDI spec injects {injected!r}",
            )
            check(len(nodes) == 1, f"shared/{container} sees device nodes {nodes}, expected one")
        check(
            len({tuple(nodes) for _, nodes in seen.values()}) == 1,
            f"the containers of shared see different device nodes: {seen}",
        )
        self.figures["shared_claim_pod_apply_to_running_s"] = running
        log(
            f"  shared: claim {name} → {results[0]['device']}; containers {' and '.join(containers)} both see "
            f"NVIDIA_VISIBLE_DEVICES={injected} and /dev/{seen[containers[0]][1][0]} ({running:.2f} s)"
        )
        self.c.kubectl("delete", "pod", "shared", "--wait=false")
        wait_for(f"claim {uid}'s CDI spec removed", lambda: not spec_file.exists(), 60, 0.05)
        self.c.kubectl("delete", "resourceclaim", name, "--wait=true", timeout=60)
        log("  shared deleted → its claim unprepared, CDI spec removed")

    def time_pod_starts(self, label: str, pod: Callable[[str], dict[str, Any]]) -> list[float]:
        """Creates POD_STARTS pods one after another, each deleted (gone) before the next; the seconds from each
        pod's creation (kubectl create returned) to the watch showing it Running with its container started."""
        samples = []
        with clusterlib.watching_pods(self.c, f"e2e={label}") as watch:
            # The watch lists what matches (nothing) before it follows changes; give it time to start.
            time.sleep(1.0)
            for number in range(POD_STARTS):
                name = f"{label}-{number}"
                obj = pod(name)
                obj["metadata"]["labels"]["e2e"] = label
                self.c.kubectl("create", "-f", "-", input=json.dumps(obj))
                created = time.monotonic()
                samples.append(watch.wait_started(name, 90) - created)
                self.delete_and_wait(f"pod/{name}")
        return samples

    def s7_pod_start(self) -> None:
        """Pod start with a DRA claim (this driver) beside pod start with nvidia.com/gpu: 1 (the device plugin, as
        `make e2e` deploys it), on this cluster in this run; one plugin at a time (both take the node's lock)."""

        def with_claim(name: str) -> dict[str, Any]:
            obj = self.gpu_pod(name, {"main": 1})
            obj["spec"]["containers"][0]["resources"] = {"claims": [{"name": "gpu"}]}
            obj["spec"]["resourceClaims"] = [{"name": "gpu", "resourceClaimTemplateName": "one-large-gpu"}]
            return obj

        dra = self.time_pod_starts("start-claim", with_claim)
        log(f"  DRA claim: pod created → container started, median {statistics.median(dra):.2f} s of {len(dra)}")
        self.c.kubectl("-n", NS, "delete", "daemonset", "gpuplugin", "--wait=true", timeout=90)
        wait_for(
            "the DRA plugin's pods gone",
            lambda: not self.c.kubectl("-n", NS, "get", "pods", "-l", dp.PLUGIN_SELECTOR, "-o", "name").strip(),
            60,
        )
        self.c.kubectl("apply", "--validate=strict", "-k", str(ROOT / "deploy/overlays/mock"))
        self.wait_plugin_ready(90)
        self.wait_allocatable(dp.MOCK_GPUS, 60)
        device_plugin = self.time_pod_starts("start-gpu", lambda name: self.gpu_pod(name, {"main": 1}))
        log(
            f"  {dp.GPU}: 1: pod created → container started, median {statistics.median(device_plugin):.2f} s of"
            f" {len(device_plugin)}"
        )
        self.samples.update(pod_start_dra_claim_s=dra, pod_start_device_plugin_s=device_plugin)
        self.figures.update(
            pod_start_dra_claim_median_s=statistics.median(dra),
            pod_start_device_plugin_median_s=statistics.median(device_plugin),
        )

    def diagnostics(self) -> None:
        """What helps to see why a scenario failed."""
        super().diagnostics()
        for args in (("get", "resourceclaims,resourceslices", "-A", "-o", "yaml"),):
            try:
                print(f"--- kubectl {' '.join(args)}\n{self.c.kubectl(*args, timeout=20)[-6000:]}", flush=True)
            except Exception as e:
                print(f"--- kubectl {' '.join(args)}: {e}", flush=True)


SCENARIOS: list[tuple[str, Callable[[DraE2E], None]]] = [
    ("0 deploy deploy/dra", DraE2E.s0_deploy),
    ("a a pod from the example claim template", DraE2E.s1_claim_template),
    ("b a claim of two GPUs", DraE2E.s2_two_gpus),
    ("c XID on an allocated GPU", DraE2E.s3_xid),
    ("d plugin restart, then unprepare", DraE2E.s4_plugin_restart),
    ("e kubelet restart", DraE2E.s5_kubelet_restart),
    ("f a claim shared by two containers", DraE2E.s6_shared_claim),
    ("g pod start: a DRA claim beside nvidia.com/gpu: 1", DraE2E.s7_pod_start),
]


def main() -> int:
    """Builds, starts, runs the scenarios, stops; exit status 0 when every scenario passed."""
    args = dp.parse_args(__doc__, RESULTS, "comma-separated scenario letters (default: all; 0 always runs)")
    if not dp.preflight("make e2e-dra", ()):
        return 2
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    timings: dict[str, float] = {}
    log("building Kubernetes, etcd and containerd from Go modules (cached by version)")
    bin_dir, timings["build_kubernetes_s"] = dp.build("build-k8s.sh")
    containerd_bin, timings["build_containerd_s"] = dp.build("build-containerd.sh")
    cold = containerd_bin.parent / "build-seconds"
    log(f"binaries ready: {bin_dir}, {containerd_bin}")
    work = Path(tempfile.mkdtemp(prefix="gpuplugin-e2e-dra.", dir="/tmp"))
    log(f"work directory {work}")
    failed: list[str] = []
    passed: list[str] = []
    figures: dict[str, float] = {}
    samples: dict[str, list[float]] = {}
    try:
        t0 = time.monotonic()
        with clusterlib.running(bin_dir, work / "cluster", log, containerd_bin=containerd_bin, cdi=True) as c:
            timings["cluster_start_s"] = time.monotonic() - t0
            version = c.ctr("version").split("Server:")[-1].split("Version:")[1].split()[0]
            log(f"cluster up in {timings['cluster_start_s']:.1f} s (containerd {version}, CDI on)")
            e2e = DraE2E(c, work)
            e2e.figures = figures
            e2e.samples = samples
            t0 = time.monotonic()
            e2e.load_images(images.ImageBuilder(bin_dir.parent.parent, work / "images", log))
            timings["images_s"] = time.monotonic() - t0
            dp.run_scenarios(e2e, SCENARIOS, (only | {"0"}) if only else only, timings, passed, failed)
            log("stopping the cluster")
    except Exception as e:
        failed.append(f"setup: {e}")
        log(f"FAIL {e}")
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(work / "images")], check=False)
    timings["total_s"] = time.monotonic() - dp.START
    report = {
        "figures_s": {k: round(v, 3) for k, v in figures.items()},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "samples_s": {k: [round(x, 3) for x in v] for k, v in samples.items()},
    }
    if not failed and not only:
        dp.write_results(
            args.results,
            {
                "kubernetes": bin_dir.parent.name.removeprefix("k8s-"),
                "containerd": containerd_bin.parent.name.removeprefix("containerd-"),
                "containerd_cold_build_s": float(cold.read_text()) if cold.exists() else None,
                **report,
            },
        )
    print(json.dumps(report, indent=2))
    return dp.finish("e2e-dra", work, passed, failed, keep_work=args.keep_work)


if __name__ == "__main__":
    sys.exit(main())
