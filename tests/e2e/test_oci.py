"""Distribution: the filter as a reproducible OCI image (`make oci`), pushed to and pulled back
from a real registry, and Envoy loading the module from a remote HTTP source pinned by sha256.

- The image is built by `python -m tests.harness.oci` (what `make oci` runs) twice from the same
  inputs: every byte of the layout and of the oci-archive is identical, so is the digest.
- The registry is Debian's `docker-registry` (CNCF distribution 2.8, the reference
  implementation behind most registries) on 127.0.0.1 and a free port, storage in a temp dir;
  `skopeo` pushes and pulls, `umoci` unpacks as a third, independent reader.
- Remote code is how Envoy Gateway hands Wasm to Envoy (an HTTP URL plus the module's sha256);
  a wrong sha256 makes Envoy refuse the module, and the gateway then fails closed.

Tools missing: skipped when not root (nothing can install them); as root, `make e2e` installs
them first (DEBIAN_PACKAGES via the venv's `debs` prerequisite), so missing tools fail.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import http.server
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from tests.e2e.conftest import KEYS, MANAGED_AGENTS_BETA
from tests.harness import oci, stack

VERSION = oci.cargo_version()
REVISION = "0123456789abcdef0123456789abcdef01234567"
EPOCH = 1700000000
TOOLS = ("skopeo", "docker-registry", "umoci")


@pytest.fixture(scope="module")
def wasm_copy(tmp_path_factory) -> Path:
    """A snapshot of the built module: a concurrent `make wasm` cannot change it mid-test."""
    if not stack.WASM.exists():
        pytest.fail(f"{stack.WASM} is missing: run the suite through `make test` (it builds first)")
    path = tmp_path_factory.mktemp("wasm") / "ma_gateway.wasm"
    shutil.copyfile(stack.WASM, path)
    return path


@pytest.fixture(scope="module")
def oci_tools():
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        if os.geteuid() != 0:
            pytest.skip(f"{', '.join(missing)} not installed and not root: "
                        f"apt-get install umoci skopeo docker-registry (or run `make e2e` as root)")
        pytest.fail(f"{', '.join(missing)} missing although running as root: "
                    f"`make e2e` installs them (DEBIAN_PACKAGES); run `make debs`")


def build_cli(wasm: Path, workdir: Path, *, revision: str = REVISION, epoch: int = EPOCH):
    """Runs the builder exactly as `make oci` does; returns (printed digest, layout, archive)."""
    out, archive, digest_file = workdir / "oci", workdir / "ma-gateway.oci.tar", workdir / "digest"
    result = subprocess.run(
        [sys.executable, "-m", "tests.harness.oci", "--wasm", str(wasm), "--out", str(out),
         "--archive", str(archive), "--revision", revision, "--digest-file", str(digest_file)],
        cwd=stack.ROOT, env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch)},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    printed = re.search(r"^manifest digest: (sha256:[0-9a-f]{64})$", result.stdout, re.M)
    assert printed, result.stdout
    assert digest_file.read_text().strip() == printed.group(1)
    return printed.group(1), out, archive


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------------------------

def test_image_is_reproducible_and_in_the_compat_layout(wasm_copy, tmp_path):
    digest_a, layout_a, archive_a = build_cli(wasm_copy, tmp_path / "a")

    # Same inputs, different everything else: another file (other mtime, other mode), another
    # directory, another wall-clock time, a stale layout to replace.
    other = tmp_path / "elsewhere" / "module.wasm"
    other.parent.mkdir()
    shutil.copyfile(wasm_copy, other)
    os.utime(other, (EPOCH + 12345, EPOCH + 12345))
    other.chmod(0o600)
    (tmp_path / "b" / "oci" / "blobs" / "sha256").mkdir(parents=True)
    (tmp_path / "b" / "oci" / "blobs" / "sha256" / "stale").write_bytes(b"old")
    digest_b, layout_b, archive_b = build_cli(other, tmp_path / "b")

    assert digest_a == digest_b
    assert tree(layout_a) == tree(layout_b), "layouts differ byte for byte"
    assert archive_a.read_bytes() == archive_b.read_bytes(), "oci-archives differ"

    # Inputs do matter: another revision is another image.
    digest_c, _, _ = build_cli(wasm_copy, tmp_path / "c", revision="f" * 40)
    assert digest_c != digest_a

    # The layout: oci-layout, index.json -> one image manifest (not an index) tagged with the version.
    assert json.loads((layout_a / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    files = tree(layout_a)
    assert sorted(files) == sorted(["oci-layout", "index.json"] + [f"blobs/sha256/{h}" for h in (
        digest_a.split(":")[1],
        oci.manifest_for(layout_a, VERSION)[1]["config"]["digest"].split(":")[1],
        oci.manifest_for(layout_a, VERSION)[1]["layers"][0]["digest"].split(":")[1])])
    index = json.loads(files["index.json"])
    assert [m["mediaType"] for m in index["manifests"]] == [oci.MEDIA_MANIFEST]
    digest, manifest = oci.manifest_for(layout_a, VERSION)
    assert digest == digest_a == oci.sha256_digest(files["blobs/sha256/" + digest_a.split(":")[1]])

    # Compat variant: exactly one tar+gzip layer and the variant annotation; labels everywhere.
    assert manifest["mediaType"] == oci.MEDIA_MANIFEST
    assert [layer["mediaType"] for layer in manifest["layers"]] == ["application/vnd.oci.image.layer.v1.tar+gzip"]
    expected_labels = {
        "module.wasm.image/variant": "compat",
        "org.opencontainers.image.version": VERSION,
        "org.opencontainers.image.revision": REVISION,
        "org.opencontainers.image.created": "2023-11-14T22:13:20Z",
    }
    assert expected_labels.items() <= manifest["annotations"].items()
    config = json.loads(oci.read_blob(layout_a, manifest["config"]["digest"]))
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert config["config"]["Labels"] == manifest["annotations"]
    assert (config["os"], config["architecture"], config["created"]) == ("wasip1", "wasm", "2023-11-14T22:13:20Z")

    # The layer: gzip with no name and mtime 0; a tar with plugin.wasm at its root, nothing else,
    # owned by 0:0 without names, mtime SOURCE_DATE_EPOCH; diff_id is the tar's digest.
    layer = oci.read_blob(layout_a, manifest["layers"][0]["digest"])
    assert layer[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff", layer[:10]
    layer_tar = gzip.decompress(layer)
    assert config["rootfs"] == {"type": "layers", "diff_ids": [oci.sha256_digest(layer_tar)]}
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as tar:
        members = tar.getmembers()
        assert [(m.name, m.type, m.mode, m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members] == [
            ("plugin.wasm", tarfile.REGTYPE, 0o644, 0, 0, "", "", EPOCH)]
        assert tar.extractfile(members[0]).read() == wasm_copy.read_bytes()
    assert oci.extract_plugin_wasm(layout_a, VERSION) == wasm_copy.read_bytes()


def test_defaults_label_cargo_version_and_git_head(wasm_copy, tmp_path):
    """Without overrides (as `make oci` runs): version from Cargo.toml, revision = HEAD."""
    before = subprocess.run(["git", "rev-parse", "HEAD"], cwd=stack.ROOT, capture_output=True, text=True).stdout.strip()
    result = subprocess.run(
        [sys.executable, "-m", "tests.harness.oci", "--wasm", str(wasm_copy), "--out", str(tmp_path / "oci")],
        cwd=stack.ROOT, capture_output=True, text=True, timeout=120)
    after = subprocess.run(["git", "rev-parse", "HEAD"], cwd=stack.ROOT, capture_output=True, text=True).stdout.strip()
    assert result.returncode == 0, result.stdout + result.stderr
    _, manifest = oci.manifest_for(tmp_path / "oci", VERSION)
    assert manifest["annotations"]["org.opencontainers.image.version"] == VERSION
    assert manifest["annotations"]["org.opencontainers.image.revision"] in (before, after)
    assert re.fullmatch(r"[0-9a-f]{40}", manifest["annotations"]["org.opencontainers.image.revision"])


# ---------------------------------------------------------------------------------------------
# Registry round trip
# ---------------------------------------------------------------------------------------------

def skopeo(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"skopeo {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result


def test_push_to_registry_and_pull_back_by_digest(wasm_copy, tmp_path, oci_tools):
    digest, layout, archive = build_cli(wasm_copy, tmp_path / "build")
    registry = oci.Registry(tmp_path / "registry")
    try:
        tag = f"{VERSION}-e2e"
        ref = f"{registry.host}/ma-gateway"

        # Push the layout; the registry stores the manifest under the very digest we print.
        pushed_digest_file = tmp_path / "pushed-digest"
        skopeo("copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
               "--digestfile", str(pushed_digest_file), f"oci:{layout}:{VERSION}", f"docker://{ref}:{tag}")
        assert pushed_digest_file.read_text().strip() == digest
        served_digest, served_manifest = registry.manifest("ma-gateway", tag)
        assert served_digest == digest
        assert oci.sha256_digest(served_manifest) == digest
        assert json.loads(served_manifest)["annotations"]["module.wasm.image/variant"] == "compat"

        # The oci-archive is the same image.
        skopeo("copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
               f"oci-archive:{archive}:{VERSION}", f"docker://{ref}:{tag}-archive")
        assert registry.manifest("ma-gateway", f"{tag}-archive")[0] == digest

        # What a consumer sees: labels, platform.
        inspected = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{ref}:{tag}").stdout)
        assert inspected["Digest"] == digest
        assert inspected["Labels"]["org.opencontainers.image.version"] == VERSION
        assert inspected["Labels"]["org.opencontainers.image.revision"] == REVISION

        # Pull by digest (the pinned form) into a fresh layout; plugin.wasm is the built module.
        fresh = tmp_path / "pulled"
        skopeo("copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}@{digest}", f"oci:{fresh}:pinned")
        pulled_digest, _ = oci.manifest_for(fresh, "pinned")
        assert pulled_digest == digest
        assert oci.extract_plugin_wasm(fresh, "pinned") == wasm_copy.read_bytes()

        # An independent reader of the pulled layout: umoci unpacks the layer to plugin.wasm at /.
        rootfs = tmp_path / "rootfs"
        unpack = subprocess.run(["umoci", "raw", "unpack", "--rootless", "--image", f"{fresh}:pinned", str(rootfs)],
                                capture_output=True, text=True, timeout=120)
        assert unpack.returncode == 0, unpack.stdout + unpack.stderr
        assert sorted(p.name for p in rootfs.iterdir()) == ["plugin.wasm"]
        assert (rootfs / "plugin.wasm").read_bytes() == wasm_copy.read_bytes()
    finally:
        registry.stop()


# ---------------------------------------------------------------------------------------------
# Envoy: the module from a remote HTTP source, pinned by sha256
# ---------------------------------------------------------------------------------------------

NUM_RETRIES = 2


class FileServer:
    """http.server on 127.0.0.1:0 in a thread, serving one directory; counts GETs per path."""

    def __init__(self, directory: Path):
        hits: dict[str, int] = {}
        lock = threading.Lock()

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                with lock:
                    hits[self.path] = hits.get(self.path, 0) + 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.hits = hits
        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def wasm_server(wasm_copy):
    server = FileServer(wasm_copy.parent)
    yield server
    server.stop()


def remote_config(emulator: stack.Emulator, server: FileServer, sha256: str) -> tuple[dict, str]:
    """The shipped config with `vm_config.code` remote (filter and reconciler alike)."""
    config = stack.render_envoy_config(
        upstream=emulator.upstream,
        listen_port=0, admin_port=0, gateway_keys=KEYS)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filter_vm = next(f for f in hcm["http_filters"] if f["name"] == "ma_gateway")["typed_config"]["config"]["vm_config"]
    service_vm = next(e for e in config["bootstrap_extensions"]
                      if e["name"] == "envoy.bootstrap.wasm")["typed_config"]["config"]["vm_config"]
    uri = f"http://127.0.0.1:{server.port}/ma_gateway.wasm"
    code = {"remote": {
        "http_uri": {"uri": uri, "cluster": "wasm_fileserver", "timeout": "10s"},
        "sha256": sha256,
        "retry_policy": {"retry_back_off": {"base_interval": "0.1s", "max_interval": "0.5s"},
                         "num_retries": NUM_RETRIES},
    }}
    # One YAML anchor (&ma_gateway_vm): the same dict in both places; set both regardless.
    for vm in (filter_vm, service_vm):
        vm["code"] = code
    assert "local" not in json.dumps([filter_vm["code"], service_vm["code"]])
    config["static_resources"]["clusters"].append({
        "name": "wasm_fileserver",
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {"cluster_name": "wasm_fileserver", "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": server.port}}}}]}]},
    })
    return config, uri


def stats(envoy: stack.Envoy, prefix: str) -> dict[str, int]:
    out = {}
    for line in envoy.admin("/stats").splitlines():
        name, _, value = line.partition(": ")
        if name.startswith(prefix) and value.strip().isdigit():
            out[name] = int(value)
    return out


def probe(gateway_port: int, token: str, key: str | None = KEYS["alice"]):
    conn = http.client.HTTPConnection("127.0.0.1", gateway_port, timeout=30)
    headers = {"anthropic-version": "2023-06-01", "anthropic-beta": MANAGED_AGENTS_BETA, "x-oci-probe": token}
    if key:
        headers["x-api-key"] = key
    try:
        conn.request("GET", "/v1/agents", headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def reached_upstream(emulator: stack.Emulator, token: str) -> list[dict]:
    return [r for r in emulator.requests() if ["x-oci-probe", token] in r["headers"]]


def test_envoy_loads_the_filter_from_remote_http_pinned_by_sha256(emulator, wasm_server, wasm_copy):
    sha = hashlib.sha256(wasm_copy.read_bytes()).hexdigest()
    config, uri = remote_config(emulator, wasm_server, sha)
    envoy = stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key)).start(timeout=60)
    try:
        token = secrets.token_hex(8)
        status, _, body = probe(envoy.listen_port, token)
        assert status == 200, body
        assert isinstance(json.loads(body)["data"], list)
        # Through the filter: the upstream key was injected, the client's gateway key removed.
        [seen] = reached_upstream(emulator, token)
        assert ["x-api-key", emulator.api_key] in seen["headers"]
        assert ["x-api-key", KEYS["alice"]] not in seen["headers"]
        # And the filter decides: no gateway key, no upstream call.
        status, _, body = probe(envoy.listen_port, token + "-nokey", key=None)
        assert status == 401, body
        assert json.loads(body)["error"]["type"] == "authentication_error"
        assert not reached_upstream(emulator, token + "-nokey")

        # Both consumers (the HTTP filter and the reconciler service) fetched and verified it.
        wasm_stats = stats(envoy, "wasm.remote_load_fetch_")
        assert wasm_stats == {"wasm.remote_load_fetch_successes": 2, "wasm.remote_load_fetch_failures": 0}, wasm_stats
        assert wasm_server.hits == {"/ma_gateway.wasm": 2}
        assert re.search(r"wasm log ma_gateway_reconciler ma_gateway: #\d+ background service", envoy.log())
    finally:
        envoy.stop()


def test_envoy_refuses_a_remote_module_whose_sha256_differs(emulator, wasm_server, wasm_copy):
    wrong = hashlib.sha256(wasm_copy.read_bytes() + b"\0").hexdigest()
    config, uri = remote_config(emulator, wasm_server, wrong)
    # debug: the sha256 verdict is logged at debug by Envoy's remote data fetcher.
    envoy = stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key), log_level="debug").start(timeout=60)
    try:
        # Envoy starts (its listener's init target completes, with a failure), but no VM exists.
        log = envoy.log()
        attempts = 2 * (1 + NUM_RETRIES)  # filter and reconciler, first try plus retries each
        assert log.count(f"fetch remote data [uri = {uri}]: data is invalid") == attempts, log[-3000:]
        assert log.count("Retry limit exceeded for fetching data from remote data source.") == 2
        assert "Plugin ma_gateway failed to load" in log
        assert "Plugin ma_gateway_reconciler failed to load" in log
        assert "wasm log ma_gateway" not in log  # the module never ran
        assert wasm_server.hits == {"/ma_gateway.wasm": attempts}  # downloaded, then refused
        assert stats(envoy, "wasm.remote_load_fetch_") == {
            "wasm.remote_load_fetch_successes": 0, "wasm.remote_load_fetch_failures": 2}

        # Fail closed: the route answers 503 from the Wasm filter, nothing reaches upstream.
        token = secrets.token_hex(8)
        status, _, body = probe(envoy.listen_port, token)
        # envoy.yaml's local_reply_config gives Envoy's empty 503 the Anthropic envelope.
        assert status == 503, body
        assert json.loads(body)["error"] == {
            "type": "api_error", "message": "the gateway filter failed on this request; retry"}
        assert not reached_upstream(emulator, token)
        stack._wait_until(lambda: '"details":"wasm_fail_stream"' in envoy.log(), 10, "the access log line")
    finally:
        envoy.stop()
