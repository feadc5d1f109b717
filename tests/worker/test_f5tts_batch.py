"""Batching F5-TTS across jobs (worker/backends/f5tts_batch.py) on test_f5tts's tiny random weights: a job's
audio in a batch equals its audio alone, and cancel and timeout still act on each job of a batch."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("f5_tts.api")

import numpy as np
import soundfile as sf
import torch

from gpuq.client import Client
from scripts.bench_f5tts import build_random_assets
from tests.worker.test_f5tts import REF_SAMPLES, REF_TEXT, SR, TINY_ARCH, VOCAB, expected_chunks, make_ctx
from tests.worker.test_worker import WorkerProc, output_file, start_worker  # noqa: F401 (a fixture)
from worker.backends.base import BackendResult, JobContext
from worker.backends.f5tts import F5TTSBackend
from worker.errors import ErrorCode, JobError

LONG = " ".join(["Una frase que se repite hasta que el texto necesita más de un trozo de voz."] * 5)
JOBS = [
    {"text": "Hola, esta es la primera prueba.", "voice": "ana", "seed": 1},
    {"text": "Otra voz, otra semilla y otra velocidad.", "voice": "beto", "seed": 2, "speed": 1.3},
    {"text": LONG, "voice": "ana", "seed": 3},  # several chunks
    {"text": "Corto.", "voice": "beto", "seed": 4},  # under 10 bytes: f5-tts's slow-speed rule
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("f5tts-batch")
    torch.manual_seed(0)
    paths = build_random_assets(root / "model", arch=TINY_ARCH, vocab=VOCAB)
    voices = root / "voices"
    voices.mkdir()
    rng = np.random.default_rng(0)
    for name, samples in (("ana", REF_SAMPLES), ("beto", REF_SAMPLES + 20000)):  # references of two lengths
        t = np.arange(samples) / SR
        wave = 0.3 * np.sin(2 * np.pi * (150 + 100 * rng.random()) * t) + 0.01 * rng.standard_normal(samples)
        sf.write(str(voices / f"{name}.wav"), wave.astype(np.float32), SR, subtype="PCM_16")
        (voices / f"{name}.txt").write_text(REF_TEXT)
    return {**paths, "voices_dir": str(voices)}


@pytest.fixture(scope="module")
def alone(assets: dict[str, str]) -> Iterator[F5TTSBackend]:
    b = F5TTSBackend(**assets, device="cpu", max_batch=1)
    b.start()
    yield b
    b.close()


@pytest.fixture(scope="module")
def batched(assets: dict[str, str]) -> Iterator[F5TTSBackend]:
    b = F5TTSBackend(**assets, device="cpu", max_batch=8, batch_window_ms=50)
    b.start()
    yield b
    b.close()


def wave_of(result: BackendResult) -> np.ndarray:
    return sf.read(str(result.outputs[0].path))[0]


def assert_same_audio(got: np.ndarray, want: np.ndarray) -> None:
    """Equal to 3 steps of 16 bits: a batch's matrix products add up in another order than one row's
    (about 1e-7 apart in float32), which moves a few samples by one step after rounding."""
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 3 / 32768


def run_together(
    backend: F5TTSBackend,
    tmp_path: Path,
    payloads: list[dict[str, Any]],
    *,
    rows: int,
    deadlines: list[float] | None = None,
    during: Callable[[list[JobContext]], None] | None = None,
) -> list[BackendResult | JobError]:
    """Run the payloads from one thread each, as the worker's slots do, and release the model only once
    `rows` chunks wait for it, so that they all go into one forward pass (up to max_batch)."""
    ctxs = [
        make_ctx(tmp_path / str(i), {"nfe_step": 6, **p}, deadline_s=(deadlines or [600] * len(payloads))[i])[
            0
        ]
        for i, p in enumerate(payloads)
    ]
    results: list[BackendResult | JobError | None] = [None] * len(payloads)

    def one(i: int) -> None:
        try:
            results[i] = backend.run(ctxs[i])
        except JobError as exc:
            results[i] = exc

    batcher = backend._batcher
    assert batcher is not None
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(payloads))]
    with backend._lock:  # the model is busy: the jobs queue up behind it
        for t in threads:
            t.start()
        waited = time.monotonic()
        while batcher.pending_rows() < rows and time.monotonic() - waited < 60:
            time.sleep(0.01)
        assert batcher.pending_rows() == rows
        if during:
            during(ctxs)
    for t in threads:
        t.join(120)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def test_batched_jobs_equal_each_job_alone(
    alone: F5TTSBackend, batched: F5TTSBackend, tmp_path: Path
) -> None:
    expected = [
        wave_of(alone.run(make_ctx(tmp_path / f"a{i}", {"nfe_step": 6, **p})[0])) for i, p in enumerate(JOBS)
    ]
    rows = 3 + len(expected_chunks(LONG, 1.0))
    assert rows >= 5
    results = run_together(batched, tmp_path / "b", JOBS, rows=rows)
    for want, got in zip(expected, results, strict=True):
        assert isinstance(got, BackendResult)
        assert got.metrics["batch_size"] == rows  # every chunk of every job in one forward pass
        assert np.abs(want).max() > 0.01
        assert_same_audio(wave_of(got), want)
    assert batched._batcher is not None and batched._batcher.batches[-1]["jobs"] == len(JOBS)


def test_base_architecture_batched_equals_alone(assets: dict[str, str], tmp_path: Path) -> None:
    """F5TTS_Base (what the Spanish fine-tune uses: no text padding mask, one positional attention head)."""
    torch.manual_seed(1)
    base = build_random_assets(tmp_path / "base", base="F5TTS_Base", arch=TINY_ARCH, vocab=VOCAB)
    backends = [
        F5TTSBackend(**base, voices_dir=assets["voices_dir"], device="cpu", max_batch=n) for n in (1, 8)
    ]
    for b in backends:
        b.start()
    try:
        payloads = JOBS[:2] + JOBS[3:]
        expected = [
            wave_of(backends[0].run(make_ctx(tmp_path / f"a{i}", {"nfe_step": 6, **p})[0]))
            for i, p in enumerate(payloads)
        ]
        results = run_together(backends[1], tmp_path / "b", payloads, rows=len(payloads))
        for want, got in zip(expected, results, strict=True):
            assert isinstance(got, BackendResult) and got.metrics["batch_size"] == len(payloads)
            assert_same_audio(wave_of(got), want)
    finally:
        for b in backends:
            b.close()


def test_a_rows_text_embedding_does_not_depend_on_the_other_rows(
    alone: F5TTSBackend, batched: F5TTSBackend, tmp_path: Path
) -> None:
    """The text blocks' GRN normalises over the whole sequence, so text embedded for the padded batch would
    change with the longest row's length. The random model is too insensitive for that to show in its audio
    (3 steps of 16 bits), so this compares the embeddings the model works from, as it caches them."""
    captured: dict[str, list[torch.Tensor]] = {"alone": [], "batched": []}

    def capture(into: list[torch.Tensor]) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            if module.text_cond is not None and not any(t is module.text_cond for t in into):
                into.append(module.text_cond)

        return hook

    payloads = [JOBS[0], JOBS[3], {**JOBS[1], "text": JOBS[1]["text"] * 3}]  # very different lengths
    hooks = [
        b._tts.ema_model.transformer.register_forward_hook(capture(captured[name]))  # type: ignore[union-attr]
        for name, b in (("alone", alone), ("batched", batched))
    ]
    try:
        for i, p in enumerate(payloads):
            alone.run(make_ctx(tmp_path / f"a{i}", {"nfe_step": 4, **p})[0])
        run_together(batched, tmp_path / "b", [{**p, "nfe_step": 4} for p in payloads], rows=len(payloads))
    finally:
        for h in hooks:
            h.remove()
    [together] = captured["batched"]
    assert len(captured["alone"]) == len(payloads) and together.shape[0] == len(payloads)
    # The rows are in the order the jobs were handed over, not the payloads' order: each job's embedding
    # alone must be one row's, with zeros after it, and each row must be one job's.
    matched = []
    for single in captured["alone"]:
        n = single.shape[1]
        matched += [
            i
            for i in range(len(payloads))
            if torch.allclose(together[i, :n], single[0], atol=1e-6, rtol=0) and not together[i, n:].any()
        ]
    assert sorted(matched) == list(range(len(payloads)))


def test_max_batch_and_settings_split_batches(
    assets: dict[str, str], alone: F5TTSBackend, tmp_path: Path
) -> None:
    b = F5TTSBackend(**assets, device="cpu", max_batch=2)
    b.start()
    payloads = [{**JOBS[0], "seed": s} for s in (1, 2, 3)] + [{**JOBS[1], "nfe_step": 8}]
    results = run_together(b, tmp_path, payloads, rows=4)
    sizes = [r.metrics["batch_size"] for r in results if isinstance(r, BackendResult)]
    # two of the NFE-6 jobs share a pass (max_batch 2), the third runs alone, and so does the NFE-8 one
    assert sorted(sizes[:3]) == [1, 2, 2] and sizes[3] == 1
    for i, got in enumerate(results):
        assert isinstance(got, BackendResult)
        want = wave_of(alone.run(make_ctx(tmp_path / f"a{i}", {"nfe_step": 6, **payloads[i]})[0]))
        assert_same_audio(wave_of(got), want)
    b.close()


def test_cancel_inside_a_running_batch_stops_only_that_job(
    alone: F5TTSBackend, batched: F5TTSBackend, tmp_path: Path
) -> None:
    """Job 1 is cancelled while the batch's forward pass runs: it ends at once, the others are unchanged."""
    ctxs: list[JobContext] = []
    ended: dict[int, float] = {}

    def keep(c: list[JobContext]) -> None:
        ctxs.extend(c)

    def cancel_then_slow(module: Any, args: Any) -> None:
        if not ctxs[1].cancelled.is_set():
            ctxs[1].cancelled.set()
            time.sleep(0.5)  # the forward pass is still running when job 1 gives up

    model = batched._tts.ema_model.transformer  # type: ignore[union-attr]
    hook = model.register_forward_pre_hook(cancel_then_slow)
    try:
        started = time.monotonic()
        results = run_together(
            batched, tmp_path, JOBS[:3], rows=2 + len(expected_chunks(LONG, 1.0)), during=keep
        )
    finally:
        hook.remove()
    ended[0] = time.monotonic() - started
    assert isinstance(results[1], JobError) and results[1].code == ErrorCode.CANCELLED
    assert "in a batch" in results[1].message
    for i in (0, 2):
        got = results[i]
        assert isinstance(got, BackendResult)
        want = wave_of(alone.run(make_ctx(tmp_path / f"a{i}", {"nfe_step": 6, **JOBS[i]})[0]))
        assert_same_audio(wave_of(got), want)


def test_a_batch_whose_jobs_all_stopped_is_abandoned_between_ode_steps(
    batched: F5TTSBackend, tmp_path: Path
) -> None:
    ctxs: list[JobContext] = []

    def cancel_all(module: Any, args: Any) -> None:
        for ctx in ctxs:
            ctx.cancelled.set()
        time.sleep(1.0)  # time for the jobs' threads to notice (every 50 ms) and give up

    model = batched._tts.ema_model.transformer  # type: ignore[union-attr]
    hook = model.register_forward_pre_hook(cancel_all)
    try:
        results = run_together(batched, tmp_path, JOBS[:2], rows=2, during=ctxs.extend)
    finally:
        hook.remove()
    assert all(isinstance(r, JobError) and r.code == ErrorCode.CANCELLED for r in results), results
    batcher = batched._batcher
    assert batcher is not None
    waited = time.monotonic()  # the jobs ended at once; the batcher notices at its next step
    while not (batcher.batches and batcher.batches[-1]["jobs"] == 2) and time.monotonic() - waited < 30:
        time.sleep(0.01)
    last = batcher.batches[-1]
    # of 6 steps: dropped at the first step after its jobs gave up (the first, unless a thread was slow)
    assert last["abandoned"] and last["steps"] < 6


def test_timeout_and_cancel_while_waiting_for_the_model(batched: F5TTSBackend, tmp_path: Path) -> None:
    def cancel_second(ctxs: list[JobContext]) -> None:
        ctxs[1].cancelled.set()
        # the first job's deadline passes while the model is still busy
        time.sleep(max(0.0, ctxs[0].deadline - time.monotonic()) + 0.5)

    results = run_together(
        batched,
        tmp_path,
        [JOBS[0], JOBS[1], JOBS[3]],
        rows=3,
        deadlines=[5, 600, 600],  # room to be prepared and handed over first, even on a busy machine
        during=cancel_second,
    )
    assert isinstance(results[0], JobError) and results[0].code == ErrorCode.TIMEOUT
    assert isinstance(results[1], JobError) and results[1].code == ErrorCode.CANCELLED
    assert isinstance(results[2], BackendResult) and results[2].metrics["batch_size"] == 1  # ran alone


def test_a_lone_job_does_not_wait_for_the_window(assets: dict[str, str], tmp_path: Path) -> None:
    b = F5TTSBackend(**assets, device="cpu", max_batch=8, batch_window_ms=10_000)
    b.start()
    started = time.monotonic()
    result = b.run(make_ctx(tmp_path, {"nfe_step": 4, **JOBS[0]})[0])
    assert result.metrics["batch_size"] == 1
    assert time.monotonic() - started < 9  # no other job was being prepared: it did not wait the 10 s
    b.close()


def test_batch_settings_are_checked() -> None:
    from worker.backends import BACKENDS

    with pytest.raises(ValueError, match="F5TTS_MAX_BATCH must be a whole number"):
        BACKENDS["f5tts"]({"F5TTS_MAX_BATCH": "lots"})
    with pytest.raises(ValueError, match="F5TTS_MAX_BATCH must be a whole number of at least 1"):
        BACKENDS["f5tts"]({"F5TTS_MAX_BATCH": "0"})
    with pytest.raises(ValueError, match="F5TTS_BATCH_WINDOW_MS must be between"):
        BACKENDS["f5tts"]({"F5TTS_BATCH_WINDOW_MS": "-1"})
    # The model download limits are read from the environment and checked the same way.
    assert BACKENDS["f5tts"]({"F5TTS_MODEL_MAX_BYTES": "5000"}).model_max_bytes == 5000
    assert BACKENDS["f5tts"]({"F5TTS_MODEL_DOWNLOAD_TIMEOUT_S": "30"}).model_download_timeout_s == 30
    with pytest.raises(ValueError, match="F5TTS_MODEL_MAX_BYTES must be at least 1"):
        BACKENDS["f5tts"]({"F5TTS_MODEL_MAX_BYTES": "0"})
    with pytest.raises(ValueError, match="F5TTS_MODEL_DOWNLOAD_TIMEOUT_S must be above 0"):
        BACKENDS["f5tts"]({"F5TTS_MODEL_DOWNLOAD_TIMEOUT_S": "-3"})


def test_a_worker_runs_its_queued_tts_jobs_as_one_batch(
    client: Client,
    request: pytest.FixtureRequest,
    assets: dict[str, str],
    alone: F5TTSBackend,
    tmp_path: Path,
) -> None:
    """The real worker process on real Postgres: four queued TTS jobs, claimed together by four slots,
    share forward passes, and each job's stored audio is its audio alone."""
    start: Callable[..., WorkerProc] = request.getfixturevalue("start_worker")  # test_worker's fixture
    payloads = [{"nfe_step": 6, **p} for p in JOBS]
    ids = [client.enqueue("tts", p) for p in payloads]  # queued before the worker starts: claimed at once
    w = start(
        "tts=f5tts",
        GPUQ_CONCURRENCY="f5tts=4",
        F5TTS_MODEL=assets["model"],
        F5TTS_CKPT_FILE=assets["ckpt_file"],
        F5TTS_VOCAB_FILE=assets["vocab_file"],
        F5TTS_VOCODER_DIR=assets["vocoder_dir"],
        F5TTS_VOICES_DIR=assets["voices_dir"],
        F5TTS_DEVICE="cpu",
        F5TTS_MAX_BATCH="8",
        HF_HUB_OFFLINE="1",
    )
    sizes = []
    for job_id, payload in zip(ids, payloads, strict=True):
        job = client.wait(job_id, timeout=120)
        assert job.status == "succeeded", (job.error_code, job.error_message, w.log)
        assert job.result is not None
        [out] = job.result["outputs"]
        sizes.append(job.result["metrics"]["batch_size"])
        want = wave_of(alone.run(make_ctx(tmp_path / f"alone-{job_id}", payload)[0]))
        assert_same_audio(sf.read(str(output_file(out["url"])))[0], want)
    assert max(sizes) > 1, sizes  # jobs shared a forward pass


def test_a_batch_that_fails_after_embedding_its_text_leaves_no_text_for_the_next(
    alone: F5TTSBackend, batched: F5TTSBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of different lengths have their text embedded before the ODE starts. A pass that fails after
    that (here f5-tts's timesteps, once; on a GPU, say, out of memory for the starting noise) must not leave
    those embeddings for the next pass, which would reuse them (DiT's cache) for another job's text."""
    import f5_tts.model.utils

    real = f5_tts.model.utils.get_epss_timesteps
    failed: list[bool] = []

    def fail_once(*args: Any, **kwargs: Any) -> Any:
        if not failed:
            failed.append(True)
            raise RuntimeError("injected failure after the text was embedded")
        return real(*args, **kwargs)

    monkeypatch.setattr(f5_tts.model.utils, "get_epss_timesteps", fail_once)
    first = run_together(batched, tmp_path / "b", [JOBS[0], JOBS[3]], rows=2)  # two lengths: row embeddings
    assert failed and all(isinstance(r, JobError) and r.code == ErrorCode.BACKEND_ERROR for r in first)
    # The next pass has rows of one length only: it embeds its text through the DiT's cache.
    got = batched.run(make_ctx(tmp_path / "next", {"nfe_step": 6, **JOBS[1]})[0])
    assert got.metrics["batch_size"] == 1
    want = alone.run(make_ctx(tmp_path / "alone", {"nfe_step": 6, **JOBS[1]})[0])
    assert_same_audio(wave_of(got), wave_of(want))
