"""A rented machine installs exactly the manager's gpuq, by hash, and only models pinned by sha256.

Real pip in a fresh venv runs scripts/onstart.sh against real HTTP servers on 127.0.0.1 (moto's S3 and the
Supabase Storage stand-in, where the manager puts its wheel, and a plain file server). Dependencies are not
installed (PIP_NO_DEPS, PIP_NO_INDEX: the tests stay offline); gpuq itself is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest

import manager.bootstrap
from manager.bootstrap import (
    SCRIPT,
    LaunchRefused,
    ModelError,
    PinnedModel,
    fetch_model,
    install_env,
    unpinned_models,
    workflow_models,
)
from manager.config import ManagerSettings, from_dict
from manager.wheel import ROOT, build_wheel
from tests.standins.supabase_storage import SupabaseStorageStandIn
from worker import workflows


class _Files(SimpleHTTPRequestHandler):
    """Serves a directory; honours Range (as Hugging Face's CDN does); may drop one response midway."""

    cut_once: dict[str, int] = {}  # noqa: RUF012  (path -> bytes to send before dropping the connection)
    requests: list[tuple[str, str | None]] = []  # noqa: RUF012

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.requests.append((self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        if path.is_dir():  # a listing of links, what pip reads an index page for (--find-links)
            super().do_GET()
            return
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if (rng := self.headers.get("Range")) and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        cut = self.cut_once.pop(self.path, None)
        self.wfile.write(data[start : start + cut] if cut is not None else data[start:])
        if cut is not None:
            self.close_connection = True


@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, directory) of a file server on 127.0.0.1."""
    root = tmp_path / "served"
    root.mkdir()
    _Files.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Files, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manager.bootstrap, "_served", {})  # each test publishes and checks anew


def onstart(workspace: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """scripts/onstart.sh as a host runs it, with real pip, offline; the worker command a no-op."""
    base = {
        "PATH": os.environ["PATH"],
        "HOME": str(workspace),
        "GPUQ_WORKSPACE": str(workspace),
        "GPUQ_PYTHON": sys.executable,  # a venv of the interpreter running the tests
        "DATABASE_URL": "postgresql://gpuq_worker@db.invalid/app",
        "GPUQ_QUEUES": "demo=imageops",
        "GPUQ_BACKENDS": "imageops",
        "GPUQ_WORKER_CMD": "true",
        "PIP_NO_INDEX": "1",
        "PIP_NO_DEPS": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_CACHE_DIR": "1",
    }
    done = subprocess.run(
        ["bash", str(SCRIPT)], env={**base, **env}, capture_output=True, text=True, timeout=240
    )
    log = workspace / "gpuq" / "onstart.log"
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout + done.stderr, str(log))


def site_packages(workspace: Path) -> Path:
    (found,) = (workspace / "gpuq" / "venv" / "lib").glob("python3*/site-packages")
    return found


def assert_installed_is_the_running_tree(workspace: Path) -> None:
    site = site_packages(workspace)
    record = (site / "gpuq-0.1.0.dist-info" / "RECORD").read_text()
    names = [line.split(",")[0] for line in record.splitlines()]
    for name in ("manager/bootstrap.py", "worker/inputs.py", "gpuq/cli.py", "workflows/looks_tryon.json"):
        assert name in names
        assert (site / name).read_bytes() == (ROOT / name).read_bytes()  # the manager's own code
    assert not (site / "gpuq" / "gpu.py").exists()  # PyPI's unrelated "gpuq" would have this shape


def test_the_wheel_is_the_running_tree_and_reproducible(tmp_path: Path) -> None:
    first, second = build_wheel(tmp_path / "a"), build_wheel(tmp_path / "b")
    assert first.name == "gpuq-0.1.0-py3-none-any.whl"
    assert first.sha256 == second.sha256 == hashlib.sha256(first.path.read_bytes()).hexdigest()
    with zipfile.ZipFile(first.path) as zf:
        names = zf.namelist()
        assert zf.read("manager/wheel.py") == (ROOT / "manager" / "wheel.py").read_bytes()
        metadata = zf.read("gpuq-0.1.0.dist-info/METADATA").decode()
    assert {"workflows/image_invert.json", "workflows/looks_tryon.binding.json"} <= set(names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "Requires-Dist: psycopg[binary]>=3.2,<4" in metadata


# --- the manager's wheel, through the configured bucket -------------------------------------------


@pytest.fixture
def public_bucket(moto_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAMANAGERMOTO00001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "manager-moto-secret-0123456789")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("GPUQ_S3_ENDPOINT_URL", moto_url)
    name = f"gpuq-wheels-{os.urandom(4).hex()}"
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
    s3.create_bucket(Bucket=name)
    read = {
        "Effect": "Allow",
        "Principal": "*",
        "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{name}/*",
    }
    s3.put_bucket_policy(Bucket=name, Policy=json.dumps({"Version": "2012-10-17", "Statement": [read]}))
    return name


def rented_settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> ManagerSettings:
    monkeypatch.setenv("GPUQ_WORKER_DATABASE_URL", "postgresql://looks_worker:w@db.invalid/app")
    for name in ("GPUQ_INSTALL_SPEC", "GPUQ_INSTALL_URL", "GPUQ_INSTALL_SHA256", "GPUQ_STORAGE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return from_dict({"queues": {"q": {"provider": "vast", "backend": "imageops"}}})


def test_onstart_installs_the_managers_own_wheel_by_hash_with_real_pip(
    monkeypatch: pytest.MonkeyPatch, public_bucket: str, moto_url: str, tmp_path: Path
) -> None:
    ms = rented_settings(monkeypatch, GPUQ_INSTALL_STORAGE_URL=f"s3://{public_bucket}/gpuq?public=true")
    env = install_env(ms)
    sha = build_wheel(tmp_path / "w").sha256
    assert env == {
        "GPUQ_INSTALL_URL": f"{moto_url}/{public_bucket}/gpuq/gpuq-install/{sha}/gpuq-0.1.0-py3-none-any.whl",
        "GPUQ_INSTALL_SHA256": sha,
    }
    assert len(env["GPUQ_INSTALL_URL"]) <= 256  # Vast's limit on an env value
    assert "AKIAMANAGER" not in env["GPUQ_INSTALL_URL"]  # unsigned: no key id in what hosts get

    workspace = tmp_path / "ws"
    done = onstart(workspace, **env)
    assert done.returncode == 0, done.stdout
    assert_installed_is_the_running_tree(workspace)
    assert (workspace / "gpuq" / "venv" / "installed").read_text().strip() == sha
    again = onstart(workspace, **env)  # a resumed instance: installed already, nothing fetched
    assert again.returncode == 0 and "installing gpuq" not in again.stdout


def test_a_wheel_whose_hash_differs_is_never_installed(files: tuple[str, Path], tmp_path: Path) -> None:
    base, root = files
    wheel = build_wheel(tmp_path / "w")
    # the same wheel with one module swapped: a valid wheel pip would install, but not the manager's
    with zipfile.ZipFile(wheel.path) as src, zipfile.ZipFile(root / wheel.name, "w") as out:
        for info in src.infolist():
            data = src.read(info)
            out.writestr(
                info, b"import os  # sends the environment away\n" if info.filename == "gpuq/db.py" else data
            )
    workspace = tmp_path / "ws"
    done = onstart(workspace, GPUQ_INSTALL_URL=f"{base}/{wheel.name}", GPUQ_INSTALL_SHA256=wheel.sha256)
    assert done.returncode != 0
    assert f"sha256 is not {wheel.sha256}" in done.stdout
    assert not list(site_packages(workspace).glob("gpuq*"))  # pip never saw it
    assert not (workspace / "gpuq" / "run" / wheel.name).exists()
    assert not (workspace / "gpuq" / "run" / "worker.pid").exists()  # and no worker started


def test_a_release_pinned_with_its_hash_installs_and_a_wrong_pin_does_not(
    files: tuple[str, Path], tmp_path: Path
) -> None:
    base, root = files
    wheel = build_wheel(root)  # the index: a directory of files pip finds links in
    links = {"PIP_FIND_LINKS": f"{base}/"}
    good = onstart(tmp_path / "a", GPUQ_INSTALL_SPEC=f"gpuq==0.1.0 --hash=sha256:{wheel.sha256}", **links)
    assert good.returncode == 0, good.stdout
    assert_installed_is_the_running_tree(tmp_path / "a")
    bad = onstart(tmp_path / "b", GPUQ_INSTALL_SPEC="gpuq==0.1.0 --hash=sha256:" + "0" * 64, **links)
    assert bad.returncode != 0 and "THESE PACKAGES DO NOT MATCH THE HASHES" in bad.stdout
    assert not list(site_packages(tmp_path / "b").glob("gpuq*"))


@pytest.mark.parametrize(
    "env",
    [
        {"GPUQ_INSTALL_SPEC": "gpuq"},  # PyPI's "gpuq" is another project
        {"GPUQ_INSTALL_SPEC": "gpuq==0.1.0"},
        {"GPUQ_INSTALL_URL": "http://127.0.0.1:9/gpuq-0.1.0-py3-none-any.whl"},
        {},
    ],
)
def test_onstart_refuses_anything_unpinned(tmp_path: Path, env: dict[str, str]) -> None:
    done = onstart(tmp_path / "ws", **env)
    assert done.returncode == 1 and "refusing to install gpuq unpinned" in done.stdout
    assert not (tmp_path / "ws" / "gpuq" / "venv").exists()  # refused before anything was made


def test_the_manager_publishes_only_to_public_unsigned_urls(
    monkeypatch: pytest.MonkeyPatch, public_bucket: str, moto_url: str
) -> None:
    closed = f"gpuq-closed-{os.urandom(4).hex()}"  # ?public=true, but the bucket lets nobody read
    boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1").create_bucket(Bucket=closed)
    unreadable = rented_settings(monkeypatch, GPUQ_STORAGE_URL=f"s3://{closed}/out?public=true")
    with pytest.raises(LaunchRefused, match=r"cannot fetch the gpuq wheel at .* as a host would.*403"):
        install_env(unreadable)
    signed = rented_settings(monkeypatch, GPUQ_STORAGE_URL=f"s3://{public_bucket}/out")
    with pytest.raises(LaunchRefused, match=r"gives signed URLs; .* add \?public=true"):
        install_env(signed)
    # a directory on the manager's disk is no place a host can fetch from; nor is nowhere
    for storage in ("/srv/outputs", "file:///srv/outputs", None):
        ms = rented_settings(monkeypatch, **({"GPUQ_STORAGE_URL": storage} if storage else {}))
        for resolve in (True, False):  # the check at start finds it too, sending nothing
            with pytest.raises(
                LaunchRefused,
                match="rented hosts must install exactly this gpuq: set GPUQ_INSTALL_STORAGE_URL",
            ):
                install_env(ms, resolve=resolve)


def test_the_manager_publishes_to_a_public_supabase_bucket(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with SupabaseStorageStandIn() as supa:
        supa.create_bucket("releases", public=True)
        supa.create_bucket("private")
        monkeypatch.setenv("SUPABASE_URL", supa.url)
        monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", supa.service_role_key)  # the manager's, kept here
        ms = rented_settings(monkeypatch, GPUQ_INSTALL_STORAGE_URL="supabase://releases/gpuq?public=true")
        env = install_env(ms)
        sha = build_wheel(tmp_path / "w").sha256
        assert env["GPUQ_INSTALL_URL"] == (
            f"{supa.url}/storage/v1/object/public/releases/gpuq/gpuq-install/{sha}/gpuq-0.1.0-py3-none-any.whl"
        )
        assert supa.service_role_key not in json.dumps(env)
        private = rented_settings(monkeypatch, GPUQ_INSTALL_STORAGE_URL="supabase://private/gpuq")
        with pytest.raises(LaunchRefused, match="gives signed URLs"):
            install_env(private)


def test_a_configured_wheel_url_must_serve_the_configured_hash(
    monkeypatch: pytest.MonkeyPatch, files: tuple[str, Path], tmp_path: Path
) -> None:
    base, root = files
    wheel = build_wheel(root)
    url = f"{base}/{wheel.name}"
    right = rented_settings(monkeypatch, GPUQ_INSTALL_URL=url, GPUQ_INSTALL_SHA256=wheel.sha256)
    assert install_env(right) == {"GPUQ_INSTALL_URL": url, "GPUQ_INSTALL_SHA256": wheel.sha256}
    wrong = rented_settings(monkeypatch, GPUQ_INSTALL_URL=url, GPUQ_INSTALL_SHA256="1" * 64)
    fetched = len(_Files.requests)
    install_env(wrong, resolve=False)  # the check at start (every cron tick) fetches nothing
    assert len(_Files.requests) == fetched
    with pytest.raises(LaunchRefused, match=f"serves a file with sha256 {wheel.sha256}, not 1111"):
        install_env(wrong)  # a rent does, and refuses


# --- models ---------------------------------------------------------------------------------------


def test_every_model_the_shipped_workflows_name_is_pinned() -> None:
    names = tuple(workflows.available())
    assert unpinned_models(names) == []
    assert {m.sha256 for m in workflow_models("sdxl_text_to_image")} == {
        "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b"
    }


def model_at(base: str, root: Path, data: bytes, sha256: str | None = None) -> PinnedModel:
    (root / "m.safetensors").write_bytes(data)
    pin = hashlib.sha256(data).hexdigest() if sha256 is None else sha256
    return PinnedModel("m.safetensors", "models/checkpoints/m.safetensors", f"{base}/m.safetensors", pin)


def test_a_model_is_downloaded_resumed_and_checked(files: tuple[str, Path], tmp_path: Path) -> None:
    base, root = files
    data = os.urandom(300_000)
    model = model_at(base, root, data)
    _Files.cut_once["/m.safetensors"] = 100_000  # the connection drops a third of the way
    comfy = tmp_path / "comfy"
    assert fetch_model(model, comfy, chunk=4096, retry_pause_s=0)
    dest = comfy / "models" / "checkpoints" / "m.safetensors"
    assert dest.read_bytes() == data
    (_, first), (path, resumed) = _Files.requests  # resumed where the dropped response ended
    assert first is None and path == "/m.safetensors"
    assert resumed is not None and 90_000 < int(resumed.removeprefix("bytes=").rstrip("-")) <= 100_000
    assert not fetch_model(model, comfy)  # there and noted: not fetched again
    assert len(_Files.requests) == 2


def test_a_model_with_the_wrong_hash_or_no_pin_is_refused(files: tuple[str, Path], tmp_path: Path) -> None:
    base, root = files
    comfy = tmp_path / "comfy"
    wrong = model_at(base, root, b"weights", sha256="2" * 64)
    with pytest.raises(ModelError, match="not the pinned 2222"):
        fetch_model(wrong, comfy, attempts=1)
    folder = comfy / "models" / "checkpoints"
    assert list(folder.iterdir()) == []  # neither the file nor its partial download is left
    unpinned = model_at(base, root, b"weights", sha256="")
    unpinned = PinnedModel(unpinned.name, unpinned.path, unpinned.url, None)
    requests_before = len(_Files.requests)
    with pytest.raises(ModelError, match="has no sha256 in its workflow binding"):
        fetch_model(unpinned, comfy)
    assert len(_Files.requests) == requests_before  # refused without a request
    # a file already in place that is not the pinned one is replaced
    folder.joinpath("m.safetensors").write_bytes(b"something else")
    right = model_at(base, root, b"weights")
    assert fetch_model(right, comfy, attempts=1)
    assert folder.joinpath("m.safetensors").read_bytes() == b"weights"


def test_onstarts_model_step_reads_the_pins_from_the_bindings(
    files: tuple[str, Path], tmp_path: Path
) -> None:
    base, root = files
    (root / "m.safetensors").write_bytes(b"weights")
    flows = tmp_path / "flows"
    flows.mkdir()
    for suffix in (".json", ".binding.json"):
        src = workflows.DEFAULT_DIR / f"image_invert{suffix}"
        (flows / f"pinned{suffix}").write_text(src.read_text())
    binding = json.loads((flows / "pinned.binding.json").read_text())
    model = {
        "name": "m.safetensors",
        "path": "models/checkpoints/m.safetensors",
        "url": f"{base}/m.safetensors",
    }
    binding["models"] = [{**model, "sha256": hashlib.sha256(b"weights").hexdigest()}]
    (flows / "pinned.binding.json").write_text(json.dumps(binding))
    run = partial(
        subprocess.run,
        env={**os.environ, "GPUQ_WORKFLOWS_DIR": str(flows)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    comfy = tmp_path / "comfy"
    done = run([sys.executable, "-m", "manager.bootstrap", "models", str(comfy), "pinned"])
    assert done.returncode == 0, done.stderr
    assert (comfy / "models" / "checkpoints" / "m.safetensors").read_bytes() == b"weights"
    binding["models"] = [model]  # the pin removed
    (flows / "pinned.binding.json").write_text(json.dumps(binding))
    with contextlib.suppress(FileNotFoundError):
        (comfy / "models" / "checkpoints" / "m.safetensors").unlink()
    refused = run([sys.executable, "-m", "manager.bootstrap", "models", str(comfy), "pinned"])
    assert refused.returncode == 1 and "has no sha256 in its workflow binding" in refused.stderr
    assert not (comfy / "models" / "checkpoints" / "m.safetensors").exists()
