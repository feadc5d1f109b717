"""The F5-TTS backend's Spanish side: region (named or detected), a voice per region from voices.json,
text normalised before synthesis, output formats and sample rates, on test_f5tts's tiny random weights."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("f5_tts.api")

import numpy as np
import soundfile as sf
import torch

from scripts.bench_f5tts import build_random_assets
from tests.worker.test_f5tts import (
    REF_SAMPLES,
    REF_TEXT,
    SR,
    TINY_ARCH,
    VOCAB,
    chunk_samples,
    make_ctx,
)
from worker.backends import BACKENDS
from worker.backends.f5tts import F5TTSBackend
from worker.errors import ErrorCode, JobError
from worker.spanish.normalize import normalize

VOICES = {"rioplatense": "valentina", "mexican": "diego", "neutral": "lucia"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("f5tts-es")
    torch.manual_seed(0)
    paths = build_random_assets(root / "model", arch=TINY_ARCH, vocab=VOCAB)
    voices = root / "voices"
    voices.mkdir()
    # Same length and transcript for every voice, so that output lengths follow one rule; the recordings
    # differ (pitch), so the voice used shows in the audio.
    for i, name in enumerate(["valentina", "diego", "lucia", "camila"]):
        t = np.arange(REF_SAMPLES) / SR
        tone = 0.3 * np.sin(2 * np.pi * (180 + 40 * i) * t)
        sf.write(str(voices / f"{name}.wav"), tone.astype(np.float32), SR, subtype="PCM_16")
        (voices / f"{name}.txt").write_text(REF_TEXT)
    (voices / "voices.json").write_text(json.dumps(VOICES))
    return {**paths, "voices_dir": str(voices)}


@pytest.fixture(scope="module")
def backend(assets: dict[str, str]) -> Iterator[F5TTSBackend]:
    b = F5TTSBackend(**assets, device="cpu")
    b.start()
    yield b
    b.close()


def run(backend: F5TTSBackend, tmp_path: Path, payload: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    ctx, _ = make_ctx(tmp_path, {"nfe_step": 4, "seed": 5, **payload})
    result = backend.run(ctx)
    return result.outputs[0].path, result.metrics


def test_auto_detects_the_region_picks_its_voice_and_speaks_normalised_text(
    backend: F5TTSBackend, tmp_path: Path
) -> None:
    text = "Che boludo, ¿andás bien? Tengo 3 perros."
    out, m = run(backend, tmp_path, {"text": text, "region": "auto"})
    assert (m["region"], m["detected_region"], m["voice"]) == ("rioplatense", "rioplatense", "valentina")
    assert m["slang_markers"] == ["che", "boludo", "andás"]
    # The length follows the normalised text ("tres", not "3"): normalisation happened before synthesis.
    spoken = normalize(text, "rioplatense")
    assert "tres perros" in spoken and len(spoken.encode()) != len(text.encode())
    assert sf.info(str(out)).frames == chunk_samples(spoken, 1.0)

    # The same text with the voice named explicitly gives the same audio: the region chose valentina.
    same, _ = run(backend, tmp_path / "b", {"text": text, "region": "auto", "voice": "valentina"})
    np.testing.assert_array_equal(sf.read(str(out))[0], sf.read(str(same))[0])
    other, _ = run(backend, tmp_path / "c", {"text": text, "region": "auto", "voice": "camila"})
    assert not np.array_equal(sf.read(str(out))[0], sf.read(str(other))[0])


def test_no_markers_fall_back_to_the_default_region(assets: dict[str, str], tmp_path: Path) -> None:
    text = "Mañana tengo una reunión a las nueve con el equipo."
    for default, voice in (("neutral", "lucia"), ("mexican", "diego")):
        b = F5TTSBackend(**assets, device="cpu", default_region=default)
        b.start()
        _, m = run(b, tmp_path / default, {"text": text, "region": "auto"})
        assert (m["region"], m["detected_region"], m["slang_markers"], m["voice"]) == (
            default,
            "neutral",
            [],
            voice,
        )
        _, m = run(b, tmp_path / f"{default}-none", {"text": text})  # no region: the default too
        assert (m["region"], m["voice"]) == (default, voice)
        b.close()


def test_named_region_and_one_without_a_voice(backend: F5TTSBackend, tmp_path: Path) -> None:
    _, m = run(backend, tmp_path / "a", {"text": "Hola a todos.", "region": "mexican"})
    assert (m["region"], m["voice"]) == ("mexican", "diego")
    # voices.json names no chilean voice: the neutral one speaks, with Chilean text processing
    _, m = run(backend, tmp_path / "b", {"text": "Hola po, ¿cachai?", "region": "chilean"})
    assert (m["region"], m["detected_region"], m["voice"]) == ("chilean", "chilean", "lucia")


def test_operator_swaps_a_region_voice_without_code(
    assets: dict[str, str], backend: F5TTSBackend, tmp_path: Path
) -> None:
    voices_json = Path(assets["voices_dir"]) / "voices.json"
    try:
        voices_json.write_text(json.dumps({**VOICES, "rioplatense": "camila"}))
        _, m = run(backend, tmp_path, {"text": "Che, vení.", "region": "rioplatense"})
        assert m["voice"] == "camila"
    finally:
        voices_json.write_text(json.dumps(VOICES))


@pytest.mark.parametrize(
    ("fmt", "rate", "sf_format"),
    [
        ("wav", 16000, "WAV"),
        ("mp3", 44100, "MP3"),
        ("ogg", 48000, "OGG"),
        ("flac", 22050, "FLAC"),
        ("flac", 24000, "FLAC"),
    ],
)
def test_formats_and_sample_rates(
    backend: F5TTSBackend, tmp_path: Path, fmt: str, rate: int, sf_format: str
) -> None:
    out, m = run(
        backend, tmp_path, {"text": "Una prueba de formato.", "output_format": fmt, "sample_rate": rate}
    )
    info = sf.info(str(out))
    assert (out.suffix, info.format, info.samplerate, info.channels) == (f".{fmt}", sf_format, rate, 1)
    assert (m["format"], m["sample_rate"], m["channels"]) == (fmt, rate, 1)
    assert m["duration_seconds"] == pytest.approx(chunk_samples("Una prueba de formato.", 1.0) / SR, abs=1e-3)
    assert info.duration == pytest.approx(m["duration_seconds"], abs=0.08)  # codec padding


def test_resampling_is_band_limited(backend: F5TTSBackend, tmp_path: Path) -> None:
    """48 kHz output is the 24 kHz audio resampled (soxr), not samples repeated: nothing above 12 kHz."""
    text = "El mismo texto a dos frecuencias."
    base, _ = run(backend, tmp_path / "a", {"text": text})
    high, _ = run(backend, tmp_path / "b", {"text": text, "sample_rate": 48000})
    low_wave, _ = sf.read(str(base))
    high_wave, _ = sf.read(str(high))
    assert len(high_wave) == 2 * len(low_wave)
    spectrum = np.abs(np.fft.rfft(high_wave)) ** 2
    freqs = np.fft.rfftfreq(len(high_wave), 1 / 48000)
    assert spectrum[freqs > 12500].sum() < 1e-3 * spectrum.sum()
    # and it is the same signal: decimating it back gives the 24 kHz audio closely
    np.testing.assert_allclose(high_wave[::2][100:-100], low_wave[100:-100], atol=0.05)
    repeated = np.repeat(low_wave, 2)  # what naive upsampling would give: images above 12 kHz
    rep_spectrum = np.abs(np.fft.rfft(repeated)) ** 2
    assert rep_spectrum[freqs > 12500].sum() > 1e-2 * rep_spectrum.sum()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"region": "klingon"}, "region must be one of rioplatense, colombian"),
        ({"region": 3}, "region must be one of"),
        ({"output_format": "aiff"}, "output_format must be one of wav, mp3, ogg, flac"),
        ({"format": "mp3", "output_format": "wav"}, "format and output_format disagree"),
        ({"sample_rate": 8000}, "sample_rate must be one of 16000, 22050, 24000, 44100, 48000"),
        ({"sample_rate": "24000"}, "sample_rate must be one of"),
        ({"sample_rate": True}, "sample_rate must be one of"),
        ({"normalize": "yes"}, "normalize must be true or false"),
    ],
)
def test_invalid_input(backend: F5TTSBackend, tmp_path: Path, payload: dict[str, Any], message: str) -> None:
    ctx, _ = make_ctx(tmp_path, {"text": "Hola.", "voice": "lucia", **payload})
    with pytest.raises(JobError) as err:
        backend.run(ctx)
    assert err.value.code == ErrorCode.INPUT_INVALID and message in err.value.message


def test_default_region_setting(assets: dict[str, str]) -> None:
    b = BACKENDS["f5tts"]({"F5TTS_DEFAULT_REGION": "andean", "F5TTS_VOICES_DIR": assets["voices_dir"]})
    assert isinstance(b, F5TTSBackend) and b.default_region == "andean"
    with pytest.raises(ValueError, match="F5TTS_DEFAULT_REGION must be one of"):
        BACKENDS["f5tts"]({"F5TTS_DEFAULT_REGION": "martian"})


def test_a_long_id_is_spoken_digit_by_digit(backend: F5TTSBackend, tmp_path: Path) -> None:
    """A 40-digit order number (num2words cannot name it) succeeds, spoken as its digits."""
    text = f"Su pedido {'1234567890' * 4}."
    out, _ = run(backend, tmp_path, {"text": text, "region": "neutral"})
    spoken = normalize(text, "neutral")
    assert spoken.startswith("Su pedido uno dos tres") and spoken.count("cero") == 4
    assert sf.info(str(out)).frames == chunk_samples(spoken, 1.0)  # the length of the spoken digits


def test_text_too_long_once_normalised_is_invalid_input(assets: dict[str, str], tmp_path: Path) -> None:
    """The limit holds for the text the model reads: numbers written out can make it several times longer.
    Bad input, not a worker fault: the job is not retried."""
    b = F5TTSBackend(**assets, device="cpu", max_text_chars=100)
    b.start()
    try:
        text = "Pagué 123 456 789 012 y 345 678."  # 32 characters, 200 once written out
        assert len(text) <= 100 < len(normalize(text, "neutral"))
        ctx, _ = make_ctx(tmp_path, {"text": text, "voice": "lucia", "region": "neutral"})
        with pytest.raises(JobError) as err:
            b.run(ctx)
        assert err.value.code == ErrorCode.INPUT_INVALID and not err.value.retryable
        assert "characters once its numbers and symbols are written out in words" in err.value.message
        assert "limit of 100" in err.value.message
        # the same text unnormalised fits
        raw = {"text": text, "voice": "lucia", "normalize": False, "nfe_step": 4}
        ctx, _ = make_ctx(tmp_path / "raw", raw)
        assert b.run(ctx).outputs
    finally:
        b.close()
