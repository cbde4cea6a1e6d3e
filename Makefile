# SPDX-License-Identifier: Apache-2.0
# The two set-up commands: `make demo` and `make test`. See README.md.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SRC := controller kubeletplugin proto_gen tests hack bench
# The Kubernetes release the harness, the demo and the dev cluster run (default:
# hack/k8s-bin/DEFAULT); K8S_MATRIX narrows the release matrix the tests run.
export K8S_RELEASE
export K8S_MATRIX

.PHONY: all venv deps test lint typecheck proto proto-check pytest k8s-bins k8s-bins-matrix tools \
        cluster-up cluster-down node-up node-down dev-setup dev-teardown demo bench clean image

all: test

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Debian packages the tests and the image build need (etcd, buildah, debootstrap,
# qemu-user-static unpacked into the cache). Idempotent; needs root.
deps:
	hack/install-deps.sh

# The driver's image from the Containerfile (buildah, local stand-ins for the
# UBI bases, no registry): prints the docker-archive tarball and figures.
# ARCH=ppc64le builds the ppc64le image under qemu (binfmt in a private user namespace).
image: deps venv
	$(PY) -m tests.harness.driver_image build $(if $(ARCH),--arch $(ARCH))

tools:
	hack/build-tools.sh

k8s-bins:
	hack/build-k8s.sh

# Every release of the matrix (hack/k8s-bin/v1.*): about 6 minutes each with a warm
# Go cache, 15 for the first.
k8s-bins-matrix:
	K8S_RELEASE=all hack/build-k8s.sh

lint: venv
	$(VENV)/bin/ruff check $(SRC)
	$(VENV)/bin/ruff format --check $(SRC)

typecheck: venv
	$(VENV)/bin/mypy

proto: venv
	$(PY) hack/gen_proto.py

proto-check: venv
	$(PY) hack/gen_proto.py --check

pytest: deps venv k8s-bins k8s-bins-matrix
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# The README's test command: lint, types, generated-code check, all tests.
test: lint typecheck proto-check pytest

cluster-up: venv k8s-bins
	$(PY) -m tests.harness.cluster up

cluster-down: venv
	$(PY) -m tests.harness.cluster down

# A real node (kubelet + containerd with CDI + our plugin) in a private mount namespace.
node-up: deps venv k8s-bins
	hack/fetch-containerd.sh >/dev/null
	$(PY) -m tests.harness.node up

node-down: venv
	$(PY) -m tests.harness.node down

# The local development cluster (the old driver's names): the demo's set-up left
# running: control plane, manifests/base installed, the controller, and real nodes
# running our plugin (with their DaemonSet pods' identities), examples applied.
dev-setup: deps venv k8s-bins
	$(PY) -m tests.harness.demo --keep

dev-teardown: venv
	$(PY) -m tests.harness.demo --down

demo: deps venv k8s-bins
	$(PY) -m tests.harness.demo

# BUSY=2: the plugin bench again beside two busy-looping processes, compared with
# the last quiet run.
bench: venv k8s-bins
	$(PY) -m bench.run $(if $(BUSY),--busy $(BUSY))

clean:
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
