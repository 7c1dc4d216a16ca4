"""Container images for the end-to-end cluster, made without a container engine or a registry.

Each image is written as an OCI image archive (oci-layout, index.json naming the image, manifest, config and
uncompressed layer tars) and loaded with `ctr images import`:

- the plugin's image: a Debian root filesystem from debootstrap (Debian's python3, cached by key) plus one layer
  with /opt/gpuplugin, a virtual environment holding the project's wheel and the exact versions of
  deploy/requirements.txt, laid out and configured as deploy/Dockerfile's final stage (its ENV, USER, ENTRYPOINT);
- the pause image: a static `pause` built with gcc;
- a busybox image for the test pods, from Debian's busybox-static.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITE = "bookworm"


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (E2E_DEBIAN_MIRROR overrides; empty: debootstrap's default)."""
    if os.environ.get("E2E_DEBIAN_MIRROR"):
        return os.environ["E2E_DEBIAN_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] or (words[:1] == ["deb"] and len(words) > 2):
                uri = words[1] if words[0] == "URIs:" else next((w for w in words[1:] if "://" in w), "")
                if uri.rstrip("/").endswith("/debian"):
                    return uri
    return ""


MIRROR = apt_mirror()
BASE_PACKAGES = ("python3", "python3-venv")
# Bumped when the way the base is made changes, so that an old cache entry is not reused.
BASE_RECIPE = "1"

PAUSE_C = r"""
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>
static void quit(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
    signal(SIGINT, quit);
    signal(SIGTERM, quit);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
"""

Log = Callable[[str], None]


@dataclass
class Layer:
    """One uncompressed layer tar: its digest is also its diff id."""

    path: Path
    digest: str
    size: int


@dataclass
class ImageConfig:
    """The parts of an image config that the runtime uses."""

    env: list[str] = field(
        default_factory=lambda: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    )
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    user: str = ""
    exposed_ports: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Runs a command, raising with its output when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc  # type: ignore[no-any-return]


def _reset(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Makes a layer entry reproducible: fixed time, root-owned unless the source says otherwise."""
    info.mtime = 0
    info.uname = ""
    info.gname = ""
    return info


def tar_dir(src: Path, dest: Path, *, skip: Callable[[str], bool] = lambda _name: False) -> Layer:
    """Writes `src`'s content as a layer tar (paths relative to it, numeric owners kept)."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, src)
            for name in sorted(dirnames) + sorted(filenames):
                full = os.path.join(dirpath, name)
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                if skip(rel):
                    if name in dirnames:
                        dirnames.remove(name)
                    continue
                info = tar.gettarinfo(full, arcname=rel)
                if info.ischr() and info.devmajor == 0 and info.devminor == 0:
                    raise RuntimeError(f"{full}: an overlay whiteout in a layer (a file of the base was deleted)")
                _reset(info)
                if info.isreg():
                    with open(full, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    return Layer(dest, sha256_file(dest), dest.stat().st_size)


def write_oci_archive(name: str, layers: list[Layer], config: ImageConfig, dest: Path) -> Path:
    """Writes an OCI image archive that `ctr images import` loads under `name`."""
    blobs: dict[str, bytes | Path] = {}

    def add_json(doc: object) -> tuple[str, int]:
        data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return digest, len(data)

    cfg: dict[str, object] = {"Env": config.env}
    if config.entrypoint:
        cfg["Entrypoint"] = config.entrypoint
    if config.cmd:
        cfg["Cmd"] = config.cmd
    if config.user:
        cfg["User"] = config.user
    if config.exposed_ports:
        cfg["ExposedPorts"] = {p: {} for p in config.exposed_ports}
    if config.labels:
        cfg["Labels"] = config.labels
    config_digest, config_size = add_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer.digest}" for layer in layers]},
        }
    )
    for layer in layers:
        blobs[layer.digest] = layer.path
    manifest_digest, manifest_size = add_json(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": f"sha256:{config_digest}",
                "size": config_size,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": f"sha256:{layer.digest}",
                    "size": layer.size,
                }
                for layer in layers
            ],
        }
    )
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": f"sha256:{manifest_digest}",
                "size": manifest_size,
                "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name},
                "platform": {"architecture": "amd64", "os": "linux"},
            }
        ],
    }
    with tarfile.open(dest, "w") as tar:

        def add_bytes(arcname: str, data: bytes) -> None:
            info = tarfile.TarInfo(arcname)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add_bytes("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add_bytes("index.json", json.dumps(index).encode())
        for digest, blob in blobs.items():
            if isinstance(blob, bytes):
                add_bytes(f"blobs/sha256/{digest}", blob)
            else:
                tar.add(blob, arcname=f"blobs/sha256/{digest}")
    return dest


def dockerfile_config(dockerfile: Path) -> ImageConfig:
    """ENV, USER, EXPOSE, LABEL and ENTRYPOINT of a Dockerfile's last stage (JSON-form ENTRYPOINT only)."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    last_from = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    config = ImageConfig()
    env: dict[str, str] = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    for line in lines[last_from + 1 :]:
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "ENV":
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest):
                value = value.strip('"')
                value = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)
                env[key] = value
        elif word == "USER":
            config.user = rest.strip()
        elif word == "EXPOSE":
            config.exposed_ports += [p if "/" in p else f"{p}/tcp" for p in rest.split()]
        elif word == "LABEL":
            config.labels.update({k: v.strip('"') for k, v in re.findall(r'([\w.\-]+)=("[^"]*"|\S+)', rest)})
        elif word == "ENTRYPOINT":
            config.entrypoint = json.loads(rest)
        elif word == "CMD":
            config.cmd = json.loads(rest)
    config.env = [f"{k}={v}" for k, v in env.items()]
    return config


class ImageBuilder:
    """Makes the e2e's images, caching what does not depend on the checkout under `cache`."""

    def __init__(self, cache: Path, work: Path, log: Log) -> None:
        self.cache = cache
        self.work = work
        self.log = log

    def base(self) -> tuple[Path, Layer]:
        """The debootstrapped root filesystem and its layer, made once per key."""
        key = hashlib.sha256(f"{SUITE} {MIRROR} {','.join(BASE_PACKAGES)} {BASE_RECIPE}".encode()).hexdigest()[:12]
        where = self.cache / f"base-{SUITE}-{key}"
        rootfs, layer_tar, meta = where / "rootfs", where / "layer.tar", where / "layer.json"
        if meta.exists():
            info = json.loads(meta.read_text())
            return rootfs, Layer(layer_tar, info["digest"], info["size"])
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        start = time.monotonic()
        self.log(f"debootstrap {SUITE} ({', '.join(BASE_PACKAGES)}) into {rootfs}: once per cache key")
        run(
            [
                "nice",
                "-n",
                "10",
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                SUITE,
                str(rootfs),
                *([MIRROR] if MIRROR else []),
            ]
        )
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info"):
            for child in (rootfs / junk).glob("*"):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                elif child.name != "lock" and child.name != "partial":
                    child.unlink()
        for node in (rootfs / "dev").iterdir():
            if node.is_dir() and not node.is_symlink():
                shutil.rmtree(node)
            else:
                node.unlink()
        layer = tar_dir(rootfs, layer_tar)
        meta.write_text(json.dumps({"digest": layer.digest, "size": layer.size}))
        self.log(f"base made in {time.monotonic() - start:.0f} s ({layer.size >> 20} MiB)")
        return rootfs, layer

    def wheels(self) -> Path:
        """The project's wheel and the pinned dependencies' wheels (pip's cache makes a second run quick)."""
        out = self.work / "wheels"
        out.mkdir(parents=True, exist_ok=True)
        pip = [str(ROOT / ".venv/bin/python"), "-m", "pip", "--disable-pip-version-check"]
        run([*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(ROOT)])
        run(
            [
                *pip,
                "download",
                "--quiet",
                "--only-binary=:all:",
                "--dest",
                str(out),
                "--python-version",
                "3.11",
                "--platform",
                "manylinux2014_x86_64",
                "--platform",
                "manylinux_2_28_x86_64",
                "--platform",
                "manylinux_2_34_x86_64",
                "--platform",
                "linux_x86_64",
                "-r",
                str(ROOT / "deploy/requirements.txt"),
            ]
        )
        shutil.copy(ROOT / "deploy/requirements.txt", out / "requirements.txt")
        return out

    def plugin(self, name: str) -> Path:
        """The plugin's image archive: base + /opt/gpuplugin as deploy/Dockerfile installs it."""
        rootfs, base_layer = self.base()
        wheels = self.wheels()
        upper, workdir, merged = self.work / "upper", self.work / "ovl-work", self.work / "merged"
        for d in (upper, workdir, merged):
            d.mkdir(parents=True, exist_ok=True)
        run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={rootfs},upperdir={upper},workdir={workdir}",
                str(merged),
            ]
        )
        mounted = [merged]
        try:
            for src, fstype in (("/dev", "bind"), ("proc", "proc")):
                target = merged / src.strip("/")
                if fstype == "bind":
                    run(["mount", "--bind", src, str(target)])
                else:
                    run(["mount", "-t", "proc", "proc", str(target)])
                mounted.append(target)
            shutil.copytree(wheels, merged / "tmp/wheels")
            env = {
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "PIP_NO_CACHE_DIR": "1",
                "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            }
            venv_pip = "/opt/gpuplugin/bin/pip"
            steps = [
                ["python3", "-m", "venv", "/opt/gpuplugin"],
                [
                    venv_pip,
                    "install",
                    "--quiet",
                    "--no-index",
                    "--find-links",
                    "/tmp/wheels",
                    "--only-binary=:all:",
                    "--require-virtualenv",
                    "-r",
                    "/tmp/wheels/requirements.txt",
                ],
                [venv_pip, "install", "--quiet", "--no-index", "--no-deps", "--find-links", "/tmp/wheels", "gpuplugin"],
                [venv_pip, "check"],
                [venv_pip, "uninstall", "--quiet", "--yes", "pip", "setuptools"],
            ]
            for step in steps:
                run(["chroot", str(merged), *step], env=env)
            shutil.rmtree(merged / "tmp/wheels")
        finally:
            for target in reversed(mounted):
                run(["umount", str(target)])
        # Only the new tree: what the steps above touched elsewhere (caches, the copied-up /tmp) stays out.
        app = self.work / "app-layer"
        app.mkdir(exist_ok=True)
        os.makedirs(app / "opt", exist_ok=True)
        shutil.move(str(upper / "opt/gpuplugin"), app / "opt/gpuplugin")
        app_layer = tar_dir(app, self.work / "app-layer.tar")
        config = dockerfile_config(ROOT / "deploy/Dockerfile")
        return write_oci_archive(name, [base_layer, app_layer], config, self.work / "plugin-image.tar")

    def pause(self, name: str) -> Path:
        """A pause image: one static binary."""
        d = self.work / "pause"
        d.mkdir(parents=True, exist_ok=True)
        (d / "pause.c").write_text("#include <sys/wait.h>\n" + PAUSE_C)
        root = d / "root"
        root.mkdir(exist_ok=True)
        run(["gcc", "-static", "-Os", "-o", str(root / "pause"), str(d / "pause.c")])
        layer = tar_dir(root, d / "layer.tar")
        return write_oci_archive(name, [layer], ImageConfig(entrypoint=["/pause"], user="65535:65535"), d / "image.tar")

    def busybox(self, name: str) -> Path:
        """A busybox image from Debian's busybox-static (installed on the host for it)."""
        busybox = Path("/bin/busybox")
        if not busybox.exists():
            raise RuntimeError("/bin/busybox is missing: apt-get install busybox-static")
        d = self.work / "busybox"
        (d / "root/bin").mkdir(parents=True, exist_ok=True)
        shutil.copy(busybox, d / "root/bin/busybox")
        applets = run([str(busybox), "--list"]).stdout.split()
        for applet in applets:
            if applet != "busybox":
                (d / "root/bin" / applet).symlink_to("busybox")
        for extra in ("tmp", "dev", "proc", "sys", "etc"):
            (d / "root" / extra).mkdir(exist_ok=True)
        layer = tar_dir(d / "root", d / "layer.tar")
        return write_oci_archive(name, [layer], ImageConfig(cmd=["sh"]), d / "image.tar")
