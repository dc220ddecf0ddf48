"""The filter as an OCI image (`make oci`), and the local registry the e2e suite pushes it to.

Built without a Docker engine: the OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/`)
is written directly, which is both simpler and more reproducible than driving a builder.

Format: the Wasm image spec's *compat* variant (github.com/solo-io/wasm spec-compat.md), the
one both consumers read first:

- one layer, media type `application/vnd.oci.image.layer.v1.tar+gzip`, a tar holding
  `plugin.wasm` at its root;
- manifest annotation `module.wasm.image/variant: compat` (the spec requires it with this
  layer media type).

Why this variant rather than the Wasm-specific `application/vnd.module.wasm.content.layer.v1+wasm`
(*oci* variant): Istio (`pkg/wasm/imagefetcher.go`, used for `WasmPlugin`) and Envoy Gateway
(`internal/wasm/imagefetcher.go`, a copy of Istio's, used for `EnvoyExtensionPolicy` Wasm of type
Image) both take the image's *last* layer and try, in order, Docker `rootfs.diff.tar.gzip`, then
the OCI `tar+gzip` compat layer (`plugin.wasm` inside), and only then the *oci* variant, which
additionally demands exactly two layers. The compat layer is also a plain image layer, so every
registry, `skopeo`, `crane`, `umoci` and `docker pull` handle it without artifact support.
The tag points at a single image manifest (never an index): both fetchers call
`remote.Get(ref).Image()`, which on an index would select a linux/amd64 child.

Config `os`/`architecture`: `wasip1`/`wasm`, the Go GOOS/GOARCH names of the target, as the OCI
image spec prescribes. Neither fetcher reads the config (the Istio fetcher compares the WasmPlugin
`sha256` with the *manifest* digest, which is what `make oci` prints); tools that would turn it
into a container refuse (`umoci unpack`: "unsupported OS: wasip1"), which is right.

Reproducible: the same .wasm, version, revision and SOURCE_DATE_EPOCH give the same bytes, hence
the same manifest digest. Every timestamp is SOURCE_DATE_EPOCH (default: the HEAD commit's
time), tar entries are sorted with uid/gid 0, no user/group names and fixed modes, the gzip
header is written here (no file name, mtime 0, OS 255, so it does not vary with Python's or
zlib's own header choices), JSON is canonical (sorted keys, no whitespace). The one external
factor is zlib's deflate output, stable for a given zlib.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "ma_gateway.wasm"
OUT = ROOT / "target" / "oci"
NAME = "ma-gateway"

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
PLUGIN_FILE = "plugin.wasm"


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def cargo_version(root: Path = ROOT) -> str:
    """`[package] version` of Cargo.toml (tomllib is Python 3.11+; a plain scan otherwise)."""
    text = (root / "Cargo.toml").read_text()
    try:
        import tomllib
    except ModuleNotFoundError:
        section = re.search(r"^\[package\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
        match = section and re.search(r'^version\s*=\s*"([^"]+)"', section.group(1), re.M)
        if not match:
            raise ValueError("no [package] version in Cargo.toml")
        return match.group(1)
    return tomllib.loads(text)["package"]["version"]


def _git(*args: str, root: Path = ROOT) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def git_revision(root: Path = ROOT) -> str:
    return _git("rev-parse", "HEAD", root=root) or "unknown"


def source_date_epoch(root: Path = ROOT) -> int:
    """SOURCE_DATE_EPOCH if set (reproducible-builds.org), else the HEAD commit time, else 0."""
    explicit = os.environ.get("SOURCE_DATE_EPOCH")
    if explicit:
        return int(explicit)
    commit_time = _git("log", "-1", "--format=%ct", "HEAD", root=root)
    return int(commit_time) if commit_time else 0


# ---------------------------------------------------------------------------------------------
# Deterministic encodings
# ---------------------------------------------------------------------------------------------

def canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def rfc3339(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def deterministic_tar(files: dict[str, bytes], mtime: int) -> bytes:
    """A POSIX ustar archive of regular files: sorted names, uid/gid 0, no names, mode 0644."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mtime = mtime
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(files[name]))
    return buf.getvalue()


def deterministic_gzip(data: bytes, level: int = 9) -> bytes:
    """RFC 1952 member with a fixed header: no FNAME, MTIME 0, XFL 2 (best), OS 255 (unknown)."""
    header = b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + bytes([2 if level == 9 else 0, 255])
    deflate = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 9, zlib.Z_DEFAULT_STRATEGY)
    body = deflate.compress(data) + deflate.flush()
    trailer = struct.pack("<II", zlib.crc32(data) & 0xFFFFFFFF, len(data) & 0xFFFFFFFF)
    return header + body + trailer


# ---------------------------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------------------------

@dataclass
class Image:
    layout: Path
    tag: str
    manifest_digest: str
    manifest: dict
    config: dict
    blobs_bytes: int
    archive: Path | None = None

    @property
    def layer_size(self) -> int:
        return self.manifest["layers"][0]["size"]


def build(
    wasm: bytes,
    out: Path,
    *,
    version: str,
    revision: str,
    epoch: int,
    tag: str | None = None,
    archive: Path | None = None,
) -> Image:
    """Writes the OCI layout at `out` (replaced whole) and optionally an oci-archive tar."""
    tag = tag or version
    created = rfc3339(epoch)
    labels = {
        "module.wasm.image/variant": "compat",
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.description": "ma-gateway: Claude Managed Agents proxy-wasm filter for Envoy",
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.title": NAME,
        "org.opencontainers.image.version": version,
    }

    layer_tar = deterministic_tar({PLUGIN_FILE: wasm}, epoch)
    layer = deterministic_gzip(layer_tar)
    config = {
        "architecture": "wasm",
        "os": "wasip1",
        "created": created,
        "config": {"Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(layer_tar)]},
        "history": [{"created": created, "created_by": f"make oci: COPY {PLUGIN_FILE} /"}],
    }
    config_blob = canonical_json(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": sha256_digest(config_blob), "size": len(config_blob)},
        "layers": [{"mediaType": MEDIA_LAYER, "digest": sha256_digest(layer), "size": len(layer)}],
        "annotations": labels,
    }
    manifest_blob = canonical_json(manifest)
    manifest_digest = sha256_digest(manifest_blob)
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": len(manifest_blob),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }

    files: dict[str, bytes] = {
        "oci-layout": canonical_json({"imageLayoutVersion": "1.0.0"}),
        "index.json": canonical_json(index),
    }
    for blob in (layer, config_blob, manifest_blob):
        files["blobs/sha256/" + hashlib.sha256(blob).hexdigest()] = blob

    # Written beside `out`, then swapped in: no stale blobs, no half-written layout.
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        for rel, data in files.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    out.chmod(0o755)

    if archive is not None:
        archive = Path(archive)
        archive.parent.mkdir(parents=True, exist_ok=True)
        archive.write_bytes(_layout_archive(files, epoch))

    blobs_bytes = len(layer) + len(config_blob) + len(manifest_blob)
    return Image(out, tag, manifest_digest, manifest, config, blobs_bytes, archive)


def _layout_archive(files: dict[str, bytes], mtime: int) -> bytes:
    """The layout as an `oci-archive` tar (directories included, as skopeo writes them)."""
    buf = io.BytesIO()
    dirs = sorted({"blobs", "blobs/sha256"})
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        entries = [(d, None) for d in dirs] + [(f, files[f]) for f in files]
        for name, data in sorted(entries):
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.type, info.mode, info.size = tarfile.REGTYPE, 0o644, len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Reading a layout back (what Istio / Envoy Gateway do with the pulled image)
# ---------------------------------------------------------------------------------------------

def read_blob(layout: Path, digest: str) -> bytes:
    algo, hexdigest = digest.split(":", 1)
    data = (Path(layout) / "blobs" / algo / hexdigest).read_bytes()
    if sha256_digest(data) != digest:
        raise ValueError(f"blob {digest} does not match its digest")
    return data


def manifest_for(layout: Path, tag: str) -> tuple[str, dict]:
    index = json.loads((Path(layout) / "index.json").read_text())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return desc["digest"], json.loads(read_blob(layout, desc["digest"]))
    raise KeyError(f"no manifest tagged {tag!r} in {layout}/index.json")


def extract_plugin_wasm(layout: Path, tag: str) -> bytes:
    """As the Istio/Envoy Gateway fetchers: last layer, OCI tar+gzip, the `plugin.wasm` member."""
    _, manifest = manifest_for(layout, tag)
    layer = manifest["layers"][-1]
    if layer["mediaType"] != MEDIA_LAYER:
        raise ValueError(f"layer media type {layer['mediaType']} (expected {MEDIA_LAYER})")
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(read_blob(layout, layer["digest"])))) as tar:
        for member in tar:
            if os.path.basename(member.name) == PLUGIN_FILE:
                return tar.extractfile(member).read()
    raise KeyError(f"{PLUGIN_FILE} not found in layer {layer['digest']}")


# ---------------------------------------------------------------------------------------------
# A local registry for the e2e suite: Debian's docker-registry (CNCF distribution 2.8)
# ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Registry:
    """`docker-registry serve` on 127.0.0.1, a kernel-chosen port, storage in a temp dir.

    distribution takes a fixed `http.addr`, so the port is picked by binding port 0 and
    released just before the registry binds it; the (unlikely) race is retried.
    """

    def __init__(self, workdir: Path, binary: str = "docker-registry", timeout: float = 30):
        self.workdir = Path(workdir)
        self.binary = binary
        self.proc: subprocess.Popen | None = None
        self.port = 0
        last = ""
        for _attempt in range(3):
            try:
                self._start(timeout)
                return
            except RuntimeError as exc:
                last = str(exc)
                if "address already in use" not in last:
                    raise
        raise RuntimeError(last)

    def _start(self, timeout: float):
        self.port = _free_port()
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yml"
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": "ma-gateway-e2e-only"},
            "health": {"storagedriver": {"enabled": False}},
        }))
        self.log_path = self.workdir / "registry.log"
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([self.binary, "serve", str(config)], stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry not ready after {timeout}s: {self.log()[-2000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def manifest(self, repo: str, reference: str) -> tuple[str, bytes]:
        """(Docker-Content-Digest, body) of a manifest, asking for OCI."""
        req = urllib.request.Request(f"{self.url}/v2/{repo}/manifests/{reference}",
                                     headers={"Accept": MEDIA_MANIFEST})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.headers["Docker-Content-Digest"], resp.read()

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# CLI: `make oci`
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.oci", description=__doc__.split("\n")[0])
    parser.add_argument("--wasm", type=Path, default=WASM)
    parser.add_argument("--out", type=Path, default=OUT, help="OCI layout directory (replaced)")
    parser.add_argument("--archive", type=Path, default=None, help="also write an oci-archive tar here")
    parser.add_argument("--version", default=None, help="default: Cargo.toml package.version")
    parser.add_argument("--revision", default=None, help="default: git rev-parse HEAD")
    parser.add_argument("--tag", default=None, help="default: the version")
    parser.add_argument("--digest-file", type=Path, default=None, help="write the manifest digest here")
    args = parser.parse_args(argv)

    if not args.wasm.exists():
        print(f"{args.wasm} is missing: run `make wasm`", file=sys.stderr)
        return 1
    version = args.version or cargo_version()
    image = build(args.wasm.read_bytes(), args.out, version=version,
                  revision=args.revision or git_revision(), epoch=source_date_epoch(),
                  tag=args.tag, archive=args.archive)
    if args.digest_file:
        args.digest_file.write_text(image.manifest_digest + "\n")
    labels = image.manifest["annotations"]
    print(f"OCI layout: {_rel(image.layout)} (tag {image.tag}; skopeo: oci:{_rel(image.layout)}:{image.tag})")
    if image.archive:
        print(f"oci-archive: {_rel(image.archive)} (skopeo: oci-archive:{_rel(image.archive)}:{image.tag})")
    print(f"version {labels['org.opencontainers.image.version']}, revision "
          f"{labels['org.opencontainers.image.revision']}, created {labels['org.opencontainers.image.created']}")
    print(f"size: plugin.wasm {args.wasm.stat().st_size} bytes, layer {image.layer_size} bytes, "
          f"all blobs {image.blobs_bytes} bytes")
    print(f"manifest digest: {image.manifest_digest}")
    print(f"pin as: oci://<registry>/{NAME}@{image.manifest_digest}  (Istio WasmPlugin url / "
          f"Envoy Gateway image url; or WasmPlugin sha256: {image.manifest_digest.split(':', 1)[1]})")
    return 0


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
