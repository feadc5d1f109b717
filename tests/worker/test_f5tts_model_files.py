"""F5-TTS model files from an http(s) URL (a local HTTP server) or s3:// (moto's server), checked by sha256,
cached on disk and loaded once; the tiny random-weight model of test_f5tts."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import shutil
import tarfile
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("f5_tts.api")

import boto3
import soundfile as sf
import torch

from scripts.bench_f5tts import build_random_assets
from tests.worker.test_f5tts import REF_SAMPLES, REF_TEXT, TINY_ARCH, VOCAB, make_ctx, write_tone
from worker.backends import BACKENDS
from worker.backends.f5tts import F5TTSBackend
from worker.backends.model_files import VOCODER_FILES, ModelFiles, sha256_of
from worker.errors import ErrorCode, JobError


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The model files as an operator publishes them: checkpoint, vocab, vocoder archive, and their sha256."""
    root = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    local = build_random_assets(root / "local", arch=TINY_ARCH, vocab=VOCAB)
    site = root / "site"
    site.mkdir()
    shutil.copy(local["ckpt_file"], site / "model.safetensors")
    shutil.copy(local["vocab_file"], site / "vocab.txt")
    with tarfile.open(site / "vocos.tar.gz", "w:gz") as tar:
        for name in ("config.yaml", "pytorch_model.bin"):
            tar.add(Path(local["vocoder_dir"]) / name, arcname=f"vocos/{name}")
    voices = root / "voices"
    voices.mkdir()
    write_tone(voices / "ana.wav", REF_SAMPLES, subtype="PCM_16")
    (voices / "ana.txt").write_text(REF_TEXT)
    sha = {name: sha256_of(site / name) for name in ("model.safetensors", "vocab.txt", "vocos.tar.gz")}
    return {"local": local, "site": site, "sha": sha, "voices_dir": str(voices)}


@pytest.fixture(scope="module")
def http_site(published: dict[str, Any]) -> Iterator[tuple[str, list[str]]]:
    """The published folder over HTTP; the list collects every path requested."""
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(published["site"])))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()


def remote_backend(base: str, published: dict[str, Any], cache: Path, **overrides: Any) -> F5TTSBackend:
    sha = published["sha"]
    kwargs: dict[str, Any] = {
        "model": published["local"]["model"],
        "ckpt_file": f"{base}/model.safetensors",
        "ckpt_sha256": sha["model.safetensors"],
        "vocab_file": f"{base}/vocab.txt",
        "vocab_sha256": sha["vocab.txt"],
        "vocoder_dir": f"{base}/vocos.tar.gz",
        "vocoder_sha256": sha["vocos.tar.gz"],
        "cache_dir": str(cache),
        "voices_dir": published["voices_dir"],
        "device": "cpu",
    }
    return F5TTSBackend(**{**kwargs, **overrides})


def speak(backend: F5TTSBackend, workdir: Path) -> Any:
    ctx, _ = make_ctx(
        workdir, {"text": "The same words, seed seven.", "voice": "ana", "nfe_step": 4, "seed": 7}
    )
    return sf.read(str(backend.run(ctx).outputs[0].path))[0]


def test_http_files_are_checked_cached_and_loaded_once(
    published: dict[str, Any], http_site: tuple[str, list[str]], tmp_path: Path
) -> None:
    base, requests = http_site
    requests.clear()
    cache = tmp_path / "cache"
    backend = remote_backend(base, published, cache)
    backend.start()
    assert sorted(requests) == ["/model.safetensors", "/vocab.txt", "/vocos.tar.gz"]
    backend.start()  # loaded once: a second start does nothing
    assert len(requests) == 3
    got = speak(backend, tmp_path / "a")
    backend.close()

    # The same files from local paths speak the same: what was downloaded is what was published.
    local = F5TTSBackend(**published["local"], voices_dir=published["voices_dir"], device="cpu")
    local.start()
    assert (got == speak(local, tmp_path / "b")).all()
    local.close()

    # A new worker process on the same disk downloads nothing.
    again = remote_backend(base, published, cache)
    again.start()
    assert len(requests) == 3 and again.healthy()

    # A damaged cached file is noticed and fetched again.
    cached = cache / published["sha"]["vocab.txt"] / "vocab.txt"
    cached.write_text("damaged\n")
    remote_backend(base, published, cache).start()
    assert requests[3:] == ["/vocab.txt"] and sha256_of(cached) == published["sha"]["vocab.txt"]


def test_s3_files(published: dict[str, Any], moto_url: str, aws_env: None, tmp_path: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_url)
    s3.create_bucket(Bucket="models")
    for name in ("model.safetensors", "vocab.txt", "vocos.tar.gz"):
        s3.upload_file(str(published["site"] / name), "models", f"f5-spanish/{name}")
    env = {
        "F5TTS_MODEL": published["local"]["model"],
        "F5TTS_CKPT_FILE": "s3://models/f5-spanish/model.safetensors",
        "F5TTS_CKPT_SHA256": published["sha"]["model.safetensors"],
        "F5TTS_VOCAB_FILE": "s3://models/f5-spanish/vocab.txt",
        "F5TTS_VOCAB_SHA256": published["sha"]["vocab.txt"],
        "F5TTS_VOCODER_DIR": "s3://models/f5-spanish/vocos.tar.gz",
        "F5TTS_VOCODER_SHA256": published["sha"]["vocos.tar.gz"],
        "F5TTS_MODEL_CACHE": str(tmp_path / "cache"),
        "GPUQ_S3_ENDPOINT_URL": moto_url,
        "F5TTS_VOICES_DIR": published["voices_dir"],
        "F5TTS_DEVICE": "cpu",
    }
    backend = BACKENDS["f5tts"](env)  # configured the way `gpuq worker` configures it
    backend.start()
    assert backend.healthy()
    assert isinstance(backend, F5TTSBackend) and speak(backend, tmp_path / "job").size > 0
    assert (tmp_path / "cache" / published["sha"]["vocos.tar.gz"] / "vocoder" / "pytorch_model.bin").is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ckpt_sha256": "0" * 64}, "has sha256"),
        ({"vocab_sha256": None}, "its sha256 must be configured too"),
        ({"vocab_sha256": "abc"}, "must be 64 hex digits"),
        ({"ckpt_file": "{base}/nothing.safetensors"}, "cannot download the F5-TTS checkpoint"),
        ({"vocoder_dir": "{base}/vocab.txt", "vocoder_sha256": None}, "must be a directory or a .tar"),
    ],
)
def test_bad_model_files_stop_the_start(
    published: dict[str, Any],
    http_site: tuple[str, list[str]],
    tmp_path: Path,
    overrides: dict[str, Any],
    message: str,
) -> None:
    base, _ = http_site
    overrides = {k: v.format(base=base) if isinstance(v, str) else v for k, v in overrides.items()}
    backend = remote_backend(base, published, tmp_path / "cache", **overrides)
    with pytest.raises(JobError) as err:
        backend.start()
    assert err.value.code == ErrorCode.BACKEND_UNAVAILABLE and message in err.value.message
    assert not backend.healthy()
    # nothing unchecked is left in the cache for a later start to trust: every file is under its own sha256
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file():
            assert sha256_of(path) == path.parent.name, path


@pytest.fixture
def endless_site() -> Iterator[str]:
    """A server whose /drip/N sends N KB a chunk at a time, 20 ms apart, and whose /big/N sends N KB at once,
    both without a Content-Length (the length is known only at the end, as with a proxy or chunked body)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            kind, kb = self.path.strip("/").split("/")
            self.send_response(200)
            self.end_headers()  # HTTP/1.0: the body ends when the connection closes
            try:
                for _ in range(int(kb)):
                    self.wfile.write(b"x" * 1024)
                    if kind == "drip":
                        self.wfile.flush()
                        time.sleep(0.02)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def files_in(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file()]


def test_a_file_over_the_byte_cap_is_refused_before_reading(
    published: dict[str, Any], http_site: tuple[str, list[str]], tmp_path: Path
) -> None:
    base, _ = http_site
    size = (published["site"] / "model.safetensors").stat().st_size
    backend = remote_backend(base, published, tmp_path / "cache", model_max_bytes=size - 1)
    with pytest.raises(JobError) as err:
        backend.start()
    assert err.value.code == ErrorCode.BACKEND_UNAVAILABLE
    assert f"refused to download the F5-TTS checkpoint from {base}/model.safetensors" in err.value.message
    assert (
        f"it is {size} bytes, more than the limit of {size - 1} (F5TTS_MODEL_MAX_BYTES)" in err.value.message
    )
    assert files_in(tmp_path / "cache") == []
    # at the cap exactly (the largest file's size: the cap is per file), everything is fetched
    largest = max(p.stat().st_size for p in published["site"].iterdir())
    remote_backend(base, published, tmp_path / "cache", model_max_bytes=largest).start()


def test_a_body_without_length_is_stopped_at_the_byte_cap(endless_site: str, tmp_path: Path) -> None:
    files = ModelFiles(tmp_path / "cache", max_bytes=100_000)
    with pytest.raises(JobError) as err:
        files.file("checkpoint", f"{endless_site}/big/4096", "0" * 64)  # 4 MB
    assert err.value.code == ErrorCode.BACKEND_UNAVAILABLE
    assert "more than the limit of 100000 bytes (F5TTS_MODEL_MAX_BYTES); stopped there" in err.value.message
    assert files_in(tmp_path / "cache") == []


def test_a_download_over_its_deadline_is_stopped(endless_site: str, tmp_path: Path) -> None:
    """Every read comes well within requests' per-read timeout; the total deadline still ends it."""
    files = ModelFiles(tmp_path / "cache", timeout_s=60, deadline_s=0.5)
    started = time.monotonic()
    with pytest.raises(JobError) as err:
        files.file("vocab file", f"{endless_site}/drip/100000", "0" * 64)  # 100 MB at 50 KB/s: 30 min
    assert time.monotonic() - started < 10
    assert "it took more than 0.5 s (F5TTS_MODEL_DOWNLOAD_TIMEOUT_S)" in err.value.message
    assert files_in(tmp_path / "cache") == []


def test_s3_file_over_the_byte_cap(
    published: dict[str, Any], moto_url: str, aws_env: None, tmp_path: Path
) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_url)
    s3.create_bucket(Bucket="capped")
    s3.upload_file(str(published["site"] / "vocab.txt"), "capped", "vocab.txt")
    size = (published["site"] / "vocab.txt").stat().st_size
    files = ModelFiles(tmp_path / "cache", s3_endpoint_url=moto_url, max_bytes=size - 1)
    with pytest.raises(JobError) as err:
        files.file("vocab file", "s3://capped/vocab.txt", published["sha"]["vocab.txt"])
    assert f"it is {size} bytes, more than the limit of {size - 1}" in err.value.message
    assert files_in(tmp_path / "cache") == []
    files.max_bytes, files.deadline_s = size, 0.0  # the deadline holds for S3 too
    with pytest.raises(JobError) as err:
        files.file("vocab file", "s3://capped/vocab.txt", published["sha"]["vocab.txt"])
    assert "it took more than 0 s (F5TTS_MODEL_DOWNLOAD_TIMEOUT_S)" in err.value.message
    assert files_in(tmp_path / "cache") == []
    files.deadline_s = 60
    assert (
        sha256_of(files.file("vocab file", "s3://capped/vocab.txt", published["sha"]["vocab.txt"]))
        == (published["sha"]["vocab.txt"])
    )


def test_processes_sharing_a_cache_unpack_the_vocoder_at_once(
    published: dict[str, Any], http_site: tuple[str, list[str]], tmp_path: Path
) -> None:
    """Several workers starting on one disk unpack the same vocoder together: each writes a file of its own
    and renames it into place, so none fails and the files are whole."""
    base, _ = http_site
    source, sha = f"{base}/vocos.tar.gz", published["sha"]["vocos.tar.gz"]
    ModelFiles(tmp_path / "cache").file("vocoder", source, sha)  # the archive in the cache
    want = {name: sha256_of(Path(published["local"]["vocoder_dir"]) / name) for name in VOCODER_FILES}
    for _ in range(3):
        shutil.rmtree(tmp_path / "cache" / sha / "vocoder", ignore_errors=True)
        barrier = threading.Barrier(4)
        errors: list[BaseException] = []
        dirs: list[Path] = []

        def unpack(barrier: threading.Barrier, dirs: list[Path], errors: list[BaseException]) -> None:
            files = ModelFiles(tmp_path / "cache")  # each its own, as separate processes have
            barrier.wait()
            try:
                dirs.append(files.vocoder_dir(source, sha))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=unpack, args=(barrier, dirs, errors)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        [target] = set(dirs)
        assert {name: sha256_of(target / name) for name in VOCODER_FILES} == want
        assert sorted(p.name for p in target.iterdir()) == sorted(VOCODER_FILES)  # no temporary files left
