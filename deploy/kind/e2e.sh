#!/usr/bin/env bash
# End-to-end test on a kind cluster with the mock backend: build the image, create a cluster, validate both
# overlays on its API server, deploy deploy/overlays/mock, wait for nvidia.com/gpu on the node, run a pod with
# 2 GPUs and check what it sees, then inject an XID into GPU 3 through the plugin pod and see allocatable drop
# by one, recover it and see it return.
#
# Needs docker, kind and kubectl. Usage: deploy/kind/e2e.sh
#   KEEP_CLUSTER=1     leave the cluster running afterwards (to look around); the default deletes it
#   CLUSTER=name       kind cluster name (default gpuplugin-e2e); an existing one is reused and kept
#   KIND_NODE_IMAGE=kindest/node:vX.Y.Z   pin the Kubernetes version
set -euo pipefail

CLUSTER=${CLUSTER:-gpuplugin-e2e}
KEEP_CLUSTER=${KEEP_CLUSTER:-}
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-}
IMAGE=gpuplugin:kind
NAMESPACE=kube-system
RESOURCE=nvidia.com/gpu
MOCK_GPUS=8
FAULTY_GPU=3
FATAL_XID=79
MOCK_SOCKET=/run/gpuplugin/mock.sock
TIMEOUT_S=180

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
created_cluster=

log() { printf '\n==> %s\n' "$*"; }
fail() {
  printf '\nFAIL: %s\n' "$*" >&2
  exit 1
}

cleanup() {
  local rc=$?
  set +e
  if ((rc != 0)) && [[ -n ${KUBECONFIG_READY:-} ]]; then
    log "diagnostics"
    kubectl get nodes -o wide
    kubectl -n "$NAMESPACE" get pods -l app.kubernetes.io/name=gpuplugin -o wide
    kubectl -n "$NAMESPACE" describe daemonset gpuplugin
    kubectl -n "$NAMESPACE" logs -l app.kubernetes.io/name=gpuplugin --tail=200
    kubectl -n default describe pod gpu-smoke
  fi
  if [[ -n $created_cluster && -z $KEEP_CLUSTER ]]; then
    log "deleting cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER"
  fi
  exit "$rc"
}
trap cleanup EXIT

# The node's allocatable count of the resource, empty while it has none.
allocatable() {
  kubectl get node "$node" -o jsonpath="{.status.allocatable.${RESOURCE//./\\.}}"
}

# Waits until allocatable equals $1 (the kubelet reports device changes with its next node status update).
wait_allocatable() {
  local want=$1 got='' deadline=$((SECONDS + TIMEOUT_S))
  while ((SECONDS < deadline)); do
    got=$(allocatable || true)
    if [[ $got == "$want" ]]; then
      echo "allocatable $RESOURCE: $got"
      return 0
    fi
    sleep 2
  done
  fail "allocatable $RESOURCE stayed '${got}', expected $want after ${TIMEOUT_S}s"
}

# Runs the plugin's own CLI inside the plugin pod (the image has no shell, and needs none).
plugin_exec() {
  kubectl -n "$NAMESPACE" exec "$plugin_pod" -c gpuplugin -- "$@"
}

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || fail "$tool is not installed"
done

log "building $IMAGE"
docker build --file "$root/deploy/Dockerfile" --tag "$IMAGE" "$root"

if kind get clusters | grep -qx "$CLUSTER"; then
  log "reusing cluster $CLUSTER"
else
  log "creating cluster $CLUSTER"
  created_cluster=1
  kind create cluster --name "$CLUSTER" --config "$here/cluster.yaml" --wait 120s \
    ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}
fi
kubectl config use-context "kind-$CLUSTER"
KUBECONFIG_READY=1

log "loading $IMAGE into the node"
kind load docker-image "$IMAGE" --name "$CLUSTER"

log "validating both overlays on the API server (unknown or misspelled fields are errors)"
kubectl apply --dry-run=server --validate=strict -k "$root/deploy/overlays/nvml"
kubectl apply --dry-run=server --validate=strict -k "$root/deploy/overlays/mock"

log "deploying deploy/overlays/mock"
kubectl apply --validate=strict -k "$root/deploy/overlays/mock"
if [[ -z $created_cluster ]]; then
  # A reused cluster may run an older image under the same tag.
  kubectl -n "$NAMESPACE" rollout restart daemonset/gpuplugin
fi
kubectl -n "$NAMESPACE" rollout status daemonset/gpuplugin --timeout="${TIMEOUT_S}s"
node=$(kubectl get nodes -o jsonpath='{.items[0].metadata.name}')
plugin_pod=$(kubectl -n "$NAMESPACE" get pods -l app.kubernetes.io/name=gpuplugin \
  --field-selector "spec.nodeName=$node,status.phase=Running" -o jsonpath='{.items[0].metadata.name}')
echo "node $node, plugin pod $plugin_pod"

log "waiting for $MOCK_GPUS $RESOURCE on $node"
wait_allocatable "$MOCK_GPUS"
# Readiness is /readyz: served, registered and watched by the kubelet.
kubectl -n "$NAMESPACE" wait --for=condition=Ready "pod/$plugin_pod" --timeout="${TIMEOUT_S}s"

log "a pod with 2 GPUs"
kubectl -n default delete pod gpu-smoke --ignore-not-found --wait
kubectl apply -f "$here/gpu-pod.yaml"
kubectl -n default wait --for=jsonpath='{.status.phase}'=Succeeded pod/gpu-smoke --timeout="${TIMEOUT_S}s"
output=$(kubectl -n default logs gpu-smoke)
echo "$output"
visible=$(sed -n 's/^NVIDIA_VISIBLE_DEVICES=//p' <<<"$output")
ids=$(tr ',' '\n' <<<"$visible" | grep -c '^GPU-' || true)
nodes=$(grep -c '^/dev/nvidia[0-9][0-9]*$' <<<"$output" || true)
[[ $ids == 2 ]] || fail "NVIDIA_VISIBLE_DEVICES has $ids GPU IDs ('$visible'), expected 2"
[[ $nodes == 2 ]] || fail "the pod sees $nodes /dev/nvidiaN nodes, expected 2"
kubectl -n default delete pod gpu-smoke --wait

log "XID $FATAL_XID on GPU $FAULTY_GPU"
plugin_exec gpuplugin mock xid --gpu "$FAULTY_GPU" --xid "$FATAL_XID" --socket "$MOCK_SOCKET"
wait_allocatable "$((MOCK_GPUS - 1))"

log "recovering GPU $FAULTY_GPU"
plugin_exec gpuplugin mock recover --gpu "$FAULTY_GPU" --socket "$MOCK_SOCKET"
wait_allocatable "$MOCK_GPUS"

plugin_exec gpuplugin mock status --socket "$MOCK_SOCKET"
log "PASS"
