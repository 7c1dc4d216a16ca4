# Every target creates the virtual environment it needs; a fresh machine needs only python3 and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint proto check-proto bench bench-compare gokubelet nvidia-plugin e2e e2e-dra bench-dra-baseline clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25.1"
	$(BIN)/python -m pip install --quiet -e . --group dev
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gpuplugin demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy gpuplugin tests benchmarks
	$(BIN)/lint-imports

# Regenerates gpuplugin/kubelet/api from proto/; tests/test_proto.py fails when the committed code is stale.
proto: $(STAMP)
	$(BIN)/python -m gpuplugin.kubelet.protogen gpuplugin/kubelet/api

bench: $(STAMP)
	$(BIN)/python -m benchmarks --quick

# The parent commit against the checkout, quick Allocate runs compared: reports, fails only on a gross regression.
bench-compare: $(STAMP)
	benchmarks/compare_parent.sh

# The Go load client the benchmarks measure with beside the Python one; needs Debian's Go packages (--install: apt).
gokubelet:
	benchmarks/gokubelet/build.sh --install

# NVIDIA's device plugin, which the nvml scenario measures after ours on a GPU node; needs Go and its module proxy.
nvidia-plugin:
	benchmarks/nvidia/build.sh

# The plugin on a real single-node cluster of upstream Kubernetes (README, "End-to-end on a real cluster"): root,
# Debian's containerd (deploy/e2e/setup.sh installs it), Go; Kubernetes is built from Go modules once and cached.
e2e: $(STAMP)
	deploy/e2e/setup.sh
	$(BIN)/python deploy/e2e/run.py

# DRA mode (deploy/dra) on the same cluster, with containerd 1.7 built from Go modules (cached) and CDI on.
e2e-dra: $(STAMP)
	deploy/e2e/setup.sh
	$(BIN)/python deploy/e2e/run_dra.py

# The Kubernetes DRA example driver's kubelet plugin (benchmarks/draexample/build.sh: Go modules, cached) beside ours,
# both on a real kube-apiserver from the e2e cache: NodePrepareResources and NodeUnprepareResources p50/p99 of each,
# written to benchmarks/results/cluster/dra-baseline.json. Needs Go and the Kubernetes build (first run: minutes).
bench-dra-baseline: $(STAMP)
	deploy/e2e/build-k8s.sh >/dev/null
	benchmarks/draexample/build.sh
	$(BIN)/python -m benchmarks.dra_baseline

clean:
	rm -rf $(VENV) build dist benchmarks/gokubelet/bin benchmarks/gokubelet/build benchmarks/nvidia/bin \
		benchmarks/nvidia/build
