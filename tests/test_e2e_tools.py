"""The offline parts of `make e2e` (deploy/e2e): the image's config from the Dockerfile, OCI archives, the
pod-resources decoder. The cluster itself runs only under `make e2e` (root, containerd, a kubelet)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import tarfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> ModuleType:
    """A module of deploy/e2e (a directory of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"e2e_{name}", ROOT / "deploy/e2e" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


images = load("images")
podresources = load("podresources")


def test_image_config_follows_the_dockerfile() -> None:
    """The e2e image runs as deploy/Dockerfile's final stage says: entrypoint, user, environment, port."""
    config = images.dockerfile_config(ROOT / "deploy/Dockerfile")
    assert config.entrypoint == ["/opt/gpuplugin/bin/gpuplugin", "serve"]
    assert config.user == "65532:65532"
    env = dict(e.split("=", 1) for e in config.env)
    assert env["PATH"].startswith("/opt/gpuplugin/bin:/usr/local/sbin")
    assert env["PYTHONUNBUFFERED"] == "1"
    assert config.exposed_ports == ["9400/tcp"]
    assert config.labels["org.opencontainers.image.title"] == "gpuplugin"


def test_oci_archive_is_consistent(tmp_path: Path) -> None:
    """An OCI archive names the image and every blob's digest matches its content."""
    (tmp_path / "root").mkdir()
    (tmp_path / "root/hello").write_text("hi\n")
    layer = images.tar_dir(tmp_path / "root", tmp_path / "layer.tar")
    archive = images.write_oci_archive(
        "docker.io/library/x:1", [layer], images.ImageConfig(cmd=["/hello"]), tmp_path / "image.tar"
    )
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        blobs = {}
        for name in names:
            if name.startswith("blobs/sha256/"):
                f = tar.extractfile(name)
                assert f is not None
                data = f.read()
                assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
                blobs[name.rsplit("/", 1)[1]] = data
        f = tar.extractfile("index.json")
        assert f is not None
        index = json.load(f)
    assert "oci-layout" in names
    entry = index["manifests"][0]
    assert entry["annotations"]["io.containerd.image.name"] == "docker.io/library/x:1"
    manifest = json.loads(blobs[entry["digest"].removeprefix("sha256:")])
    config = json.loads(blobs[manifest["config"]["digest"].removeprefix("sha256:")])
    assert config["rootfs"]["diff_ids"] == [f"sha256:{layer.digest}"]
    assert config["config"]["Cmd"] == ["/hello"]


def _field(number: int, payload: bytes) -> bytes:
    return bytes([number << 3 | 2, len(payload)]) + payload


def test_podresources_decoder() -> None:
    """List's pods, containers and device IDs are decoded from the wire format (unknown fields skipped)."""
    devices = _field(1, b"nvidia.com/gpu") + _field(2, b"GPU-a") + _field(2, b"GPU-b")
    container = _field(1, b"main") + _field(2, devices) + bytes([3 << 3, 7])  # cpu_ids=7, a varint, skipped
    pod = _field(1, b"p") + _field(2, b"default") + _field(3, container)
    (decoded,) = [podresources._pod(v) for n, v in podresources.fields(_field(1, pod)) if isinstance(v, bytes)]
    assert decoded.name == "p"
    assert decoded.namespace == "default"
    assert decoded.containers[0].name == "main"
    assert decoded.containers[0].devices[0].resource == "nvidia.com/gpu"
    assert decoded.containers[0].devices[0].ids == ["GPU-a", "GPU-b"]
