"""The F5-TTS backend on the real f5-tts and vocos code, with a tiny random-weight model built here.

Nothing is downloaded (HF_HUB_OFFLINE=1). Output lengths are checked against f5-tts's own duration
rule (f5_tts/infer/utils_infer.py, infer_batch_process): a chunk gets
    duration = ref_frames + int(ref_frames / ref_text_bytes * chunk_bytes / speed)
mel frames of 256 samples, of which the reference's are cut off, and Vocos's "center" ISTFT turns
n frames into (n - 1) * 256 samples; chunks are joined with a 0.15 s cross-fade.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: any download attempt fails

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("f5_tts.api")

import numpy as np  # after the skip: without the F5-TTS runtime numpy may be absent too
import soundfile as sf
import torch
import torchaudio
from f5_tts.api import F5TTS
from f5_tts.infer import utils_infer

from scripts.bench_f5tts import build_random_assets
from worker.backends.base import JobContext
from worker.backends.f5tts import F5TTSBackend, model_config_arg
from worker.errors import ErrorCode, JobError

SR = 24000
HOP = 256
REF_SAMPLES = 48080
# preprocess_ref_audio_text trims silent edges (a steady tone has none) and appends 50 ms of silence.
# 48080 + 1200 samples is 192.5 frames: pydub's rounding of those 50 ms cannot move it off 192.
REF_FRAMES = (REF_SAMPLES + 1200) // HOP
REF_TEXT = "This is the voice of Ana."
TINY_ARCH = {"dim": 64, "depth": 2, "heads": 2, "ff_mult": 2, "text_dim": 32, "conv_layers": 1}
VOCAB = [" ", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZáéíóúñ.,;:!?'-"]


def write_tone(path: Path, samples: int, **kwargs: Any) -> None:
    t = np.arange(samples) / SR
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), SR, **kwargs)


def processed_ref_text(text: str) -> str:
    """The transcript as infer_batch_process sees it: ". " appended, then one more space."""
    text = text if text.endswith(". ") else (text + " " if text.endswith(".") else text + ". ")
    return text + " "


def chunk_samples(chunk: str, speed: float) -> int:
    ref_bytes = len(processed_ref_text(REF_TEXT).encode())
    speed = 0.3 if len(chunk.encode()) < 10 else speed
    duration = REF_FRAMES + int(REF_FRAMES / ref_bytes * len(chunk.encode()) / speed)
    return (duration - REF_FRAMES - 1) * HOP


def expected_chunks(text: str, speed: float) -> list[str]:
    ref_text = REF_TEXT + " "  # what infer_process sees, before infer_batch_process adds a space
    ref_seconds = (REF_SAMPLES + 1200) / SR
    max_chars = int(len(ref_text.encode()) / ref_seconds * (22 - ref_seconds) * speed)
    return utils_infer.chunk_text(text, max_chars=max_chars)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("f5tts")
    torch.manual_seed(0)
    paths = build_random_assets(root / "model", arch=TINY_ARCH, vocab=VOCAB)
    voices = root / "voices"
    voices.mkdir()
    write_tone(voices / "ana.wav", REF_SAMPLES, subtype="PCM_16")
    (voices / "ana.txt").write_text(REF_TEXT + "\n")
    write_tone(voices / "mute.wav", REF_SAMPLES, subtype="PCM_16")
    (voices / "mute.txt").write_text("  \n")
    write_tone(voices / "short.wav", SR // 2, subtype="PCM_16")
    (voices / "short.txt").write_text("Too short.")
    return {**paths, "voices_dir": str(voices)}


@pytest.fixture(scope="module")
def backend(assets: dict[str, str]) -> Iterator[F5TTSBackend]:
    b = F5TTSBackend(
        **assets, device="cpu", max_batch=1
    )  # one chunk after another (test_f5tts_batch: batched)
    b.start()
    assert b.healthy()
    yield b
    b.close()
    assert not b.healthy()


Progress = list[tuple[int, str | None]]


def make_ctx(
    workdir: Path,
    payload: dict[str, Any],
    *,
    inputs: dict[str, Path] | None = None,
    on_progress: Callable[[int, JobContext], None] | None = None,
    deadline_s: float = 600,
) -> tuple[JobContext, Progress]:
    progress: Progress = []
    fetched: dict[str, Path] = inputs or {}

    def report(percent: int, message: str | None) -> None:
        progress.append((percent, message))
        if on_progress:
            on_progress(percent, ctx)

    def fetch(ref: str) -> Path:
        if ref not in fetched:
            raise JobError(ErrorCode.INPUT_FETCH_FAILED, f"no such input {ref}")
        return fetched[ref]

    workdir.mkdir(parents=True, exist_ok=True)
    ctx = JobContext(
        job_id=1,
        attempt=1,
        queue="tts",
        payload=payload,
        workdir=workdir,
        deadline=time.monotonic() + deadline_s,
        cancelled=threading.Event(),
        report_progress=report,
        fetch_input=fetch,
    )
    return ctx, progress


def test_wav_length_follows_f5tts_duration_rule(backend: F5TTSBackend, tmp_path: Path) -> None:
    text = "Hello there, this is a short test."
    ctx, progress = make_ctx(
        tmp_path, {"text": text, "voice": "ana", "nfe_step": 6, "speed": 1.25, "seed": 3}
    )
    result = backend.run(ctx)

    assert len(result.outputs) == 1
    out = result.outputs[0]
    assert (out.name, out.content_type) == ("speech.wav", "audio/wav")
    info = sf.info(str(out.path))
    assert (info.samplerate, info.channels, info.subtype) == (SR, 1, "PCM_16")
    assert info.frames == chunk_samples(text, 1.25)
    wave, _ = sf.read(str(out.path))
    assert np.abs(wave).max() > 0.01  # a signal, not silence

    m = result.metrics
    assert m["sample_rate"] == SR and m["chunks"] == 1 and m["nfe_step"] == 6 and m["seed"] == 3
    assert m["audio_seconds"] == pytest.approx(info.frames / SR, abs=1e-3)
    assert m["inference_seconds"] > 0
    assert m["rtf"] == pytest.approx(m["inference_seconds"] / m["audio_seconds"], rel=1e-2)
    assert m["ref_audio_seconds"] == pytest.approx((REF_SAMPLES + 1200) / SR, abs=0.01)
    percents = [p for p, _ in progress]
    assert percents == sorted(percents) and percents[0] == 0 and percents[-1] == 95
    # the phases the old workers reported: text processed, inference, post-processing, upload
    messages = [m or "" for _, m in progress]
    for phase in ("text processed", "inference", "post-processing", "uploading"):
        assert any(m.startswith(phase) or phase in m for m in messages), (phase, messages)


def test_same_waveform_as_f5tts_infer(
    backend: F5TTSBackend, assets: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend's step-by-step path gives F5TTS.infer's output for the same seed."""

    # F5TTS.infer reads the reference with torchaudio.load, which needs torchcodec + FFmpeg (a
    # CUDA-only wheel on PyPI); the backend reads with soundfile, so the test gives infer the same.
    def load(path: str, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, int]:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        return torch.from_numpy(data.T.copy()), sr

    monkeypatch.setattr(torchaudio, "load", load)
    direct = F5TTS(
        model=model_config_arg(assets["model"]),
        ckpt_file=assets["ckpt_file"],
        vocab_file=assets["vocab_file"],
        vocoder_local_path=assets["vocoder_dir"],
        device="cpu",
    )
    text = "The same seed gives the same speech."
    expected, sr, _ = direct.infer(
        str(Path(assets["voices_dir"]) / "ana.wav"),
        REF_TEXT,
        text,
        show_info=lambda *a: None,
        progress=None,
        nfe_step=5,
        seed=11,
    )
    ctx, _ = make_ctx(tmp_path, {"text": text, "voice": "ana", "nfe_step": 5, "seed": 11})
    got, got_sr = sf.read(str(backend.run(ctx).outputs[0].path), dtype="float32")

    assert got_sr == sr == SR
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, np.clip(expected, -1, 1), atol=1e-4)  # 16-bit quantisation
    assert np.abs(got).max() > 0.01


def test_long_text_is_chunked_cross_faded_and_reports_progress(backend: F5TTSBackend, tmp_path: Path) -> None:
    sentence = "This sentence is one of several that together are far too long for a single pass."
    text = " ".join([sentence] * 5)
    chunks = expected_chunks(text, 1.0)
    assert len(chunks) >= 2
    ctx, progress = make_ctx(tmp_path, {"text": text, "voice": "ana", "nfe_step": 4, "seed": 1})
    result = backend.run(ctx)

    lengths = [chunk_samples(c, 1.0) for c in chunks]
    assert sf.info(str(result.outputs[0].path)).frames == sum(lengths) - (len(chunks) - 1) * int(0.15 * SR)
    assert result.metrics["chunks"] == len(chunks)
    chunk_reports = [p for p, msg in progress if msg and msg.startswith("inference: chunk ")]
    assert len(chunk_reports) == len(chunks) and chunk_reports[-1] == 80
    assert all(20 < p <= 80 for p in chunk_reports)


def test_cancel_stops_between_chunks(backend: F5TTSBackend, tmp_path: Path) -> None:
    text = " ".join(["A sentence that repeats until the text needs more than one chunk of speech."] * 6)
    assert len(expected_chunks(text, 1.0)) >= 2

    def cancel_after_first_chunk(percent: int, ctx: JobContext) -> None:
        if 20 < percent < 85:
            ctx.cancelled.set()

    ctx, progress = make_ctx(
        tmp_path, {"text": text, "voice": "ana", "nfe_step": 4}, on_progress=cancel_after_first_chunk
    )
    with pytest.raises(JobError) as err:
        backend.run(ctx)
    assert err.value.code == ErrorCode.CANCELLED and not err.value.retryable
    assert [m for _, m in progress if m and m.startswith("inference: chunk ")] == [
        f"inference: chunk 1/{len(expected_chunks(text, 1.0))} done"
    ]


def test_deadline_passed_is_timeout(backend: F5TTSBackend, tmp_path: Path) -> None:
    ctx, _ = make_ctx(tmp_path, {"text": "Too late for this one.", "voice": "ana"}, deadline_s=-1)
    with pytest.raises(JobError) as err:
        backend.run(ctx)
    assert err.value.code == ErrorCode.TIMEOUT and err.value.retryable


@pytest.mark.parametrize(
    ("fmt", "sf_format", "content_type"), [("mp3", "MP3", "audio/mpeg"), ("ogg", "OGG", "audio/ogg")]
)
def test_payload_reference_and_compressed_output(
    backend: F5TTSBackend, tmp_path: Path, fmt: str, sf_format: str, content_type: str
) -> None:
    ref = tmp_path / "ref.flac"  # any format libsndfile reads; not WAV, to show the re-encoding
    write_tone(ref, REF_SAMPLES)
    cached_before = dict(utils_infer._ref_audio_cache)
    text = "A voice sent along with the job."
    payload = {
        "text": text,
        "voice": {"ref_audio": "https://x/ref.flac", "ref_text": REF_TEXT},
        "format": fmt,
    }
    ctx, _ = make_ctx(tmp_path / "job", {**payload, "nfe_step": 4}, inputs={"https://x/ref.flac": ref})
    out = backend.run(ctx).outputs[0]

    assert (out.name, out.content_type) == (f"speech.{fmt}", content_type)
    info = sf.info(str(out.path))
    assert (info.format, info.samplerate) == (sf_format, SR)
    assert info.duration == pytest.approx(chunk_samples(text, 1.0) / SR, abs=0.08)  # codec padding
    # A one-off reference leaves nothing behind in f5-tts's module-level cache.
    assert utils_infer._ref_audio_cache == cached_before


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"voice": "ana"}, "text is missing or empty"),
        ({"text": "   ", "voice": "ana"}, "text is missing or empty"),
        ({"text": "x" * 5001, "voice": "ana"}, "more than the limit of 5000"),
        ({"text": "Hi there all.", "voice": "bob"}, "unknown voice 'bob'; known voices: ana, mute, short"),
        ({"text": "Hi there all.", "voice": "../ana"}, "may hold only letters"),
        ({"text": "Hi there all.", "voice": "mute"}, "empty transcript"),
        ({"text": "Hi there all."}, "voice is missing"),
        ({"text": "Hi there all.", "voice": 7}, "voice must be"),
        (
            {"text": "Hi there all.", "voice": {"ref_audio": "https://x/r.wav"}},
            "ref_text is missing or empty",
        ),
        (
            {"text": "Hi.", "voice": {"ref_audio": "https://x/r.wav", "ref_text": " "}},
            "ref_text is missing or empty",
        ),
        ({"text": "Hi there all.", "voice": {"ref_text": "Words."}}, "ref_audio is missing"),
        ({"text": "Hi there all.", "voice": "ana", "nfe_step": 0}, "nfe_step must be between 4 and 64"),
        ({"text": "Hi there all.", "voice": "ana", "nfe_step": 65}, "nfe_step must be between 4 and 64"),
        ({"text": "Hi there all.", "voice": "ana", "nfe_step": "32"}, "nfe_step must be an integer"),
        ({"text": "Hi there all.", "voice": "ana", "nfe_step": True}, "nfe_step must be an integer"),
        ({"text": "Hi there all.", "voice": "ana", "speed": 3}, "speed must be between"),
        ({"text": "Hi there all.", "voice": "ana", "cfg_strength": -1}, "cfg_strength must be between"),
        ({"text": "Hi there all.", "voice": "ana", "seed": -5}, "seed must be between"),
        ({"text": "Hi there all.", "voice": "ana", "format": "aiff"}, "output_format must be one of"),
        ({"text": "Hi there all.", "voice": "short"}, "holds 0.55 s of sound, less than 1.0 s"),
    ],
)
def test_invalid_input(backend: F5TTSBackend, tmp_path: Path, payload: dict[str, Any], message: str) -> None:
    ctx, _ = make_ctx(tmp_path, payload)  # no inputs: a fetch would fail as INPUT_FETCH_FAILED instead
    with pytest.raises(JobError) as err:
        backend.run(ctx)
    assert err.value.code == ErrorCode.INPUT_INVALID and not err.value.retryable
    assert message in err.value.message


def test_unreadable_payload_reference(backend: F5TTSBackend, tmp_path: Path) -> None:
    bogus = tmp_path / "ref.wav"
    bogus.write_text("not audio")
    payload = {"text": "Hi there all.", "voice": {"ref_audio": "https://x/ref.wav", "ref_text": REF_TEXT}}
    ctx, _ = make_ctx(tmp_path / "job", payload, inputs={"https://x/ref.wav": bogus})
    with pytest.raises(JobError) as err:
        backend.run(ctx)
    assert err.value.code == ErrorCode.INPUT_INVALID and "not a readable audio file" in err.value.message


def test_start_fails_clearly_on_missing_files(assets: dict[str, str], tmp_path: Path) -> None:
    cases = [
        ({**assets, "ckpt_file": str(tmp_path / "none.safetensors")}, "checkpoint"),
        ({**assets, "vocab_file": str(tmp_path / "none.txt")}, "vocab file"),
        ({**assets, "vocoder_dir": str(tmp_path)}, "no Vocos vocoder"),
        ({**assets, "model": str(tmp_path / "none.yaml")}, "model config"),
    ]
    for kwargs, message in cases:
        b = F5TTSBackend(**kwargs, device="cpu")
        with pytest.raises(JobError) as err:
            b.start()
        assert err.value.code == ErrorCode.BACKEND_UNAVAILABLE and message in err.value.message
        assert not b.healthy()


def test_run_before_start_is_unavailable(assets: dict[str, str], tmp_path: Path) -> None:
    ctx, _ = make_ctx(tmp_path, {"text": "Hi there all.", "voice": "ana"})
    with pytest.raises(JobError) as err:
        F5TTSBackend(**assets).run(ctx)
    assert err.value.code == ErrorCode.BACKEND_UNAVAILABLE
