"""F5-TTS speech synthesis: the `f5-tts` package's public `F5TTS` loader and its inference utilities.

Models (the flow-matching model and the Vocos vocoder) are loaded once in start() and kept warm.
A job names a voice, that is a reference recording and its transcript, either from the voices
directory (`<name>.wav` + `<name>.txt`) or in the payload, and the text to speak:

    {"text": "...", "voice": "name" | {"ref_audio": url, "ref_text": "..."},
     "region": "rioplatense" | "colombian" | "mexican" | "chilean" | "caribbean" | "andean" | "neutral"
               | "auto",
     "nfe_step": 32, "speed": 1.0, "cfg_strength": 2.0, "seed": 1,
     "output_format": "wav" | "mp3" | "ogg" | "flac", "sample_rate": 24000, "normalize": true}

The region (the worker's F5TTS_DEFAULT_REGION when the job names none; `auto` detects it from the text's
voseo and slang, falling back to that default) chooses the voice when the job names none, through the voices
directory's voices.json ({"rioplatense": "valentina", "neutral": "lucia", ...}), and the text normalisation
(worker/spanish/normalize.py): numbers, money, dates and times are spoken out before synthesis.

The generation follows `F5TTS.infer` step by step (reference preprocessing, text chunking by the
reference's pace, one forward pass per chunk, cross-fade) but runs the chunks one after another so
that a cancelled job stops between chunks, and reads audio with soundfile rather than
`torchaudio.load`, which needs torchcodec and FFmpeg.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.backends.base import BackendResult, JobContext, OutputFile
from worker.backends.f5tts_batch import Batcher
from worker.backends.model_files import DEADLINE_S as MODEL_DOWNLOAD_TIMEOUT_S
from worker.backends.model_files import MAX_BYTES as MODEL_MAX_BYTES
from worker.backends.model_files import ModelFiles
from worker.errors import ErrorCode, JobError
from worker.spanish.normalize import normalize
from worker.spanish.regions import NEUTRAL, REGIONS, detect

if TYPE_CHECKING:
    from f5_tts.api import F5TTS

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000  # every F5-TTS config and the Vocos mel-24khz vocoder
CROSS_FADE_SECONDS = 0.15  # f5-tts's default between chunks
MAX_TEXT_CHARS = 5000
MAX_REF_TEXT_CHARS = 1000
MIN_REF_SECONDS = 1.0
NFE_RANGE = (4, 64)
SPEED_RANGE = (0.5, 2.0)
CFG_RANGE = (0.0, 10.0)
VOICE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
VOICE_AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")
# format -> (soundfile format, subtype, content type); libsndfile >= 1.1 writes MP3 and Ogg itself.
FORMATS = {
    "wav": ("WAV", "PCM_16", "audio/wav"),
    "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg"),
    "ogg": ("OGG", "VORBIS", "audio/ogg"),
    "flac": ("FLAC", "PCM_16", "audio/flac"),
}
SAMPLE_RATES = (16000, 22050, 24000, 44100, 48000)  # all of them MPEG rates too, so every format takes them
VOICES_FILE = "voices.json"  # region -> voice name, in the voices directory


@dataclass
class _Request:
    text: str
    ref_audio: Path
    ref_text: str
    one_off_ref: bool  # a payload reference, not a voices-directory one: forget its preprocessed copy
    nfe_step: int
    speed: float
    cfg_strength: float
    seed: int
    format: str
    sample_rate: int
    region: str  # the one used: for the voice (when the job names none) and the text normalisation
    detected_region: str  # what detection found in the text (NEUTRAL when it found no markers)
    slang_markers: list[str]
    voice: str  # the voice's name, or "payload" for a reference sent with the job


@dataclass
class _Prepared:
    """A job ready for inference: its reference (as infer_batch_process takes it) and its text chunks."""

    audio: Any  # torch tensor, channels x samples
    sr: int
    ref_text: str
    ref_seconds: float
    chunks: list[str]


def _invalid(message: str) -> JobError:
    return JobError(ErrorCode.INPUT_INVALID, message)


def _number(payload: dict[str, Any], key: str, default: float, lo: float, hi: float, *, integer: bool) -> Any:
    value = payload.get(key, default)
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _invalid(f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not lo <= value <= hi:
        raise _invalid(f"{key} must be between {lo} and {hi}, got {value}")
    return value


def model_config_arg(model: str) -> str:
    """The `model` argument for F5TTS, which only reads `f5_tts/configs/<model>.yaml`.

    A name ("F5TTS_v1_Base", "F5TTS_Base") is passed through; a path to a YAML file of the same
    shape (a fine-tune with its own architecture) becomes a path relative to that folder.
    """
    if not model.endswith((".yaml", ".yml")):
        return model
    path = Path(model).resolve()
    if not path.is_file():
        raise JobError(ErrorCode.BACKEND_UNAVAILABLE, f"F5-TTS model config {model} does not exist")
    configs = Path(str(files("f5_tts").joinpath("configs")))
    return os.path.relpath(path.with_suffix(""), configs)


def check_stop(ctx: JobContext, where: str) -> None:
    """Raise CANCELLED or TIMEOUT when the job was told to stop or ran out of time."""
    if ctx.cancelled.is_set():
        raise JobError(ErrorCode.CANCELLED, f"cancelled {where}")
    if time.monotonic() > ctx.deadline:
        raise JobError(ErrorCode.TIMEOUT, f"timed out {where}")


def _cross_fade(waves: list[np.ndarray], samples: int) -> np.ndarray:
    """Join chunk waveforms the way f5-tts's infer_batch_process does: a linear cross-fade."""
    out = waves[0]
    for wave in waves[1:]:
        n = min(samples, len(out), len(wave))
        if n <= 0:
            out = np.concatenate([out, wave])
            continue
        faded = out[-n:] * np.linspace(1, 0, n) + wave[:n] * np.linspace(0, 1, n)
        out = np.concatenate([out[:-n], faded, wave[n:]])
    return out


class F5TTSBackend:
    name = "f5tts"

    def __init__(
        self,
        *,
        model: str = "F5TTS_v1_Base",
        ckpt_file: str = "",
        vocab_file: str = "",
        vocoder_dir: str | None = None,
        voices_dir: str | None = None,
        device: str | None = None,
        max_text_chars: int = MAX_TEXT_CHARS,
        default_region: str = NEUTRAL,
        ckpt_sha256: str | None = None,
        vocab_sha256: str | None = None,
        vocoder_sha256: str | None = None,
        cache_dir: str | None = None,
        s3_endpoint_url: str | None = None,
        model_max_bytes: int = MODEL_MAX_BYTES,
        model_download_timeout_s: float = MODEL_DOWNLOAD_TIMEOUT_S,
        max_batch: int = 8,
        batch_window_ms: float = 50,
    ) -> None:
        """`model`: a config name (F5TTS_v1_Base; F5TTS_Base for the Spanish fine-tune) or a config
        YAML path. An empty `ckpt_file`/`vocoder_dir` makes f5-tts download the default weights from
        the Hugging Face hub; `vocab_file` "" is the package's own vocabulary. `device` None picks
        CUDA when present. The checkpoint, vocab file and vocoder may also be http(s) or s3:// URLs (the
        vocoder then a .tar/.tar.gz of its folder), fetched into `cache_dir` and checked against their
        sha256 (worker/backends/model_files.py), each at most `model_max_bytes` and fetched within
        `model_download_timeout_s`. `default_region`: a job's region when it names none, and
        `auto`'s answer for a text without markers. `max_batch` > 1 runs the chunks of jobs that arrive
        together (GPUQ_CONCURRENCY f5tts > 1) in one forward pass (worker/backends/f5tts_batch.py)."""
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"F5TTS_MAX_BATCH must be a whole number of at least 1, got {max_batch!r}")
        if not 0 <= batch_window_ms <= 10_000:
            raise ValueError(f"F5TTS_BATCH_WINDOW_MS must be between 0 and 10000, got {batch_window_ms!r}")
        if model_max_bytes < 1:
            raise ValueError(f"F5TTS_MODEL_MAX_BYTES must be at least 1, got {model_max_bytes!r}")
        if not 0 < model_download_timeout_s <= 86400:
            raise ValueError(
                "F5TTS_MODEL_DOWNLOAD_TIMEOUT_S must be above 0 and at most 86400, "
                f"got {model_download_timeout_s!r}"
            )
        self.max_batch = max_batch
        self.batch_window_s = batch_window_ms / 1000
        self._batcher: Batcher | None = None
        self._prep_lock = threading.Lock()  # f5-tts's reference cache is module-level and not thread-safe
        if default_region not in (*REGIONS, NEUTRAL):
            raise ValueError(f"F5TTS_DEFAULT_REGION must be one of {', '.join((*REGIONS, NEUTRAL))}")
        self.default_region = default_region
        self.model = model
        self.ckpt_file = ckpt_file
        self.vocab_file = vocab_file
        self.vocoder_dir = vocoder_dir
        self.voices_dir = Path(voices_dir) if voices_dir else None
        self.device = device
        self.sha256 = {"checkpoint": ckpt_sha256, "vocab file": vocab_sha256, "vocoder": vocoder_sha256}
        self.cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "gpuq" / "f5tts"
        self.s3_endpoint_url = s3_endpoint_url
        self.model_max_bytes = model_max_bytes
        self.model_download_timeout_s = model_download_timeout_s
        self.max_text_chars = max_text_chars
        self._tts: F5TTS | None = None
        self._lock = threading.Lock()  # one generation at a time: the model is shared

    # -- lifecycle

    def start(self) -> None:
        if self._tts is not None:
            return
        files = ModelFiles(
            self.cache_dir,
            s3_endpoint_url=self.s3_endpoint_url,
            max_bytes=self.model_max_bytes,
            deadline_s=self.model_download_timeout_s,
        )
        fetched = time.monotonic()
        ckpt_file = (
            str(files.file("checkpoint", self.ckpt_file, self.sha256["checkpoint"])) if self.ckpt_file else ""
        )
        vocab_file = (
            str(files.file("vocab file", self.vocab_file, self.sha256["vocab file"]))
            if self.vocab_file
            else ""
        )
        vocoder_dir = (
            str(files.vocoder_dir(self.vocoder_dir, self.sha256["vocoder"])) if self.vocoder_dir else None
        )
        log.info("F5-TTS model files ready in %.1f s", time.monotonic() - fetched)
        started = time.monotonic()
        try:
            from f5_tts.api import F5TTS

            self._tts = F5TTS(
                model=model_config_arg(self.model),
                ckpt_file=ckpt_file,
                vocab_file=vocab_file,
                vocoder_local_path=vocoder_dir,
                device=self.device,
            )
        except JobError:
            raise
        except Exception as exc:
            raise JobError(ErrorCode.BACKEND_UNAVAILABLE, f"F5-TTS failed to load: {exc!r}") from exc
        log.info("F5-TTS %s loaded on %s in %.1f s", self.model, self._tts.device, time.monotonic() - started)
        if self.max_batch > 1:
            self._batcher = Batcher(
                self._tts, self._lock, max_batch=self.max_batch, window_s=self.batch_window_s
            )

    def healthy(self) -> bool:
        return self._tts is not None and (self._batcher is None or self._batcher.alive())

    def close(self) -> None:
        if self._tts is None:
            return
        cuda = str(self._tts.device).startswith("cuda")
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None
        self._tts = None
        if cuda:
            import torch

            torch.cuda.empty_cache()

    # -- one job

    def run(self, ctx: JobContext) -> BackendResult:
        if self._tts is None:
            raise JobError(ErrorCode.BACKEND_UNAVAILABLE, "F5-TTS is not started")
        if self._batcher is not None:
            return self._run_batched(ctx, self._batcher)
        req = self._parse(ctx)
        with self._lock:
            return self._generate(ctx, req)

    def _run_batched(self, ctx: JobContext, batcher: Batcher) -> BackendResult:
        started = time.monotonic()

        def prepare() -> tuple[_Request, _Prepared]:
            req = self._parse(ctx)
            with self._prep_lock:
                return req, self._prepare(ctx, req)

        req, prep, waves, batch_sizes = batcher.run(ctx, prepare)
        result = self._finish(ctx, req, prep, waves, started, time.monotonic() - started)
        result.metrics["batch_size"] = max(batch_sizes)
        return result

    def _parse(self, ctx: JobContext) -> _Request:
        payload = ctx.payload
        text = payload.get("text")
        if not isinstance(text, str) or not text.strip():
            raise _invalid("text is missing or empty")
        text = text.strip()
        if len(text) > self.max_text_chars:
            raise _invalid(f"text has {len(text)} characters, more than the limit of {self.max_text_chars}")

        nfe_step = _number(payload, "nfe_step", 32, *NFE_RANGE, integer=True)
        speed = float(_number(payload, "speed", 1.0, *SPEED_RANGE, integer=False))
        cfg_strength = float(_number(payload, "cfg_strength", 2.0, *CFG_RANGE, integer=False))
        seed = random.randint(0, 2**31 - 1)
        if payload.get("seed") is not None:
            seed = _number(payload, "seed", 0, 0, 2**63 - 1, integer=True)
        fmt = payload.get("output_format", payload.get("format", "wav"))
        if "format" in payload and "output_format" in payload and payload["format"] != fmt:
            raise _invalid("format and output_format disagree: give output_format only")
        if fmt not in FORMATS:
            raise _invalid(f"output_format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        sample_rate = payload.get("sample_rate", SAMPLE_RATE)
        if isinstance(sample_rate, bool) or sample_rate not in SAMPLE_RATES:
            rates = ", ".join(map(str, SAMPLE_RATES))
            raise _invalid(f"sample_rate must be one of {rates}, got {sample_rate!r}")
        normalize_text = payload.get("normalize", True)
        if not isinstance(normalize_text, bool):
            raise _invalid(f"normalize must be true or false, got {normalize_text!r}")

        region = payload.get("region", self.default_region)
        if region != "auto" and region not in (*REGIONS, NEUTRAL):
            raise _invalid(f"region must be one of {', '.join((*REGIONS, NEUTRAL))} or auto, got {region!r}")
        detection = detect(text)
        if region == "auto":
            region = self.default_region if detection.region == NEUTRAL else detection.region
        if normalize_text:
            text = normalize(text, region)
            # Numbers written out grow the text (a 15-digit number becomes ~30 words): check it again.
            if len(text) > self.max_text_chars:
                raise _invalid(
                    f"text has {len(text)} characters once its numbers and symbols are written out in words,"
                    f" more than the limit of {self.max_text_chars}: shorten it"
                )

        # The voice last: a payload reference is fetched, so check everything cheap first.
        voice = payload.get("voice")
        if voice is None:
            voice = self._voice_of_region(region)
        voice_name = "payload"
        if isinstance(voice, str):
            ref_audio, ref_text = self._voice_from_dir(voice)
            voice_name, one_off = voice, False
        elif isinstance(voice, dict):
            ref_text = voice.get("ref_text")
            # An empty transcript would make f5-tts transcribe the reference with Whisper (a download).
            if not isinstance(ref_text, str) or not ref_text.strip():
                raise _invalid("voice.ref_text is missing or empty: give the reference audio's transcript")
            source = voice.get("ref_audio")
            if not isinstance(source, str) or not source:
                raise _invalid("voice.ref_audio is missing: a URL or path of the reference recording")
            ref_audio, one_off = ctx.fetch_input(source), True
        else:
            raise _invalid("voice must be a voice name or an object {ref_audio, ref_text}")
        ref_text = ref_text.strip()
        if len(ref_text) > MAX_REF_TEXT_CHARS:
            raise _invalid(f"ref_text has more than {MAX_REF_TEXT_CHARS} characters")

        return _Request(
            text=text,
            ref_audio=ref_audio,
            ref_text=ref_text,
            one_off_ref=one_off,
            nfe_step=nfe_step,
            speed=speed,
            cfg_strength=cfg_strength,
            seed=seed,
            format=fmt,
            sample_rate=sample_rate,
            region=region,
            detected_region=detection.region,
            slang_markers=detection.markers,
            voice=voice_name,
        )

    def _voice_of_region(self, region: str) -> str:
        """The voice voices.json gives the region, else the one it gives `neutral`."""
        path = self.voices_dir / VOICES_FILE if self.voices_dir else None
        if path is None or not path.is_file():
            raise _invalid("voice is missing: a voice name or {ref_audio, ref_text}")
        try:
            voices = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise JobError(ErrorCode.BACKEND_UNAVAILABLE, f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(voices, dict):
            raise JobError(ErrorCode.BACKEND_UNAVAILABLE, f"{path} must map region names to voice names")
        voice = voices.get(region, voices.get(NEUTRAL))
        if not isinstance(voice, str):
            raise _invalid(
                f"voice is missing and {VOICES_FILE} names no voice for region {region!r} or neutral"
            )
        return voice

    def _voice_from_dir(self, name: str) -> tuple[Path, str]:
        if self.voices_dir is None:
            raise _invalid(f"unknown voice {name!r}: this worker has no voices directory")
        if not VOICE_NAME.match(name):
            raise _invalid(f"voice name {name!r} may hold only letters, digits, '_' and '-'")
        transcript = self.voices_dir / f"{name}.txt"
        candidates = [self.voices_dir / f"{name}{suffix}" for suffix in VOICE_AUDIO_SUFFIXES]
        audio = next((p for p in candidates if p.is_file()), None)
        if audio is None or not transcript.is_file():
            known = sorted(p.stem for p in self.voices_dir.glob("*.txt"))
            raise _invalid(f"unknown voice {name!r}; known voices: {', '.join(known) or 'none'}")
        text = transcript.read_text(encoding="utf-8").strip()
        if not text:
            raise _invalid(f"voice {name!r} has an empty transcript {transcript.name}")
        return audio, text

    def _generate(self, ctx: JobContext, req: _Request) -> BackendResult:
        started = time.monotonic()
        prep = self._prepare(ctx, req)
        gen_started = time.monotonic()
        waves = self._infer_chunks(ctx, req, prep)
        return self._finish(ctx, req, prep, waves, started, time.monotonic() - gen_started)

    def _prepare(self, ctx: JobContext, req: _Request) -> _Prepared:
        """Read and preprocess the reference, split the text: everything before the model runs."""
        import soundfile as sf
        import torch
        from f5_tts.infer import utils_infer

        ctx.report_progress(0, "preparing the reference audio")
        # Re-encode the reference as 16-bit WAV: pydub (inside f5-tts) reads that without FFmpeg.
        try:
            data, sr = sf.read(str(req.ref_audio), dtype="float32", always_2d=True)
        except Exception as exc:
            raise _invalid(f"ref_audio is not a readable audio file: {exc}") from exc
        ref_wav = ctx.workdir / "ref.wav"
        sf.write(str(ref_wav), data, sr, subtype="PCM_16")

        # Trims silence, clips to ~12 s and ends the transcript with ". "; the transcript is never
        # empty here, so f5-tts never reaches for Whisper.
        processed, ref_text = utils_infer.preprocess_ref_audio_text(
            str(ref_wav), req.ref_text, show_info=log.debug
        )
        try:
            data, sr = sf.read(processed, dtype="float32", always_2d=True)
        finally:
            if req.one_off_ref:
                self._forget_reference(processed)
        ref_seconds = len(data) / sr
        if ref_seconds < MIN_REF_SECONDS:
            raise _invalid(
                f"the reference audio holds {ref_seconds:.2f} s of sound, less than {MIN_REF_SECONDS} s"
            )
        audio = torch.from_numpy(data.T.copy())

        # Chunk as infer_process does: each chunk plus the reference fits about 22 s at the reference's pace.
        max_chars = int(len(ref_text.encode("utf-8")) / ref_seconds * (22 - ref_seconds) * req.speed)
        chunks = utils_infer.chunk_text(req.text, max_chars=max_chars)
        if not chunks:
            raise _invalid("text has nothing to speak")
        ctx.report_progress(
            10, f"text processed: region {req.region}, {len(req.text)} characters in {len(chunks)} chunk(s)"
        )
        return _Prepared(audio=audio, sr=sr, ref_text=ref_text, ref_seconds=ref_seconds, chunks=chunks)

    def _infer_chunks(self, ctx: JobContext, req: _Request, prep: _Prepared) -> list[np.ndarray]:
        """One forward pass per chunk, one chunk after another: a cancelled job stops between chunks."""
        import torch
        from f5_tts.infer import utils_infer
        from f5_tts.model.utils import seed_everything

        assert self._tts is not None
        tts = self._tts
        chunks = prep.chunks
        seed_everything(req.seed)
        ctx.report_progress(20, f"inference: {len(chunks)} chunk(s)")
        waves: list[np.ndarray] = []
        for i, chunk in enumerate(chunks):
            check_stop(ctx, f"after {i} of {len(chunks)} chunks")
            try:
                wave, _, _ = next(
                    utils_infer.infer_batch_process(
                        (prep.audio, prep.sr),
                        prep.ref_text,
                        [chunk],
                        tts.ema_model,
                        tts.vocoder,
                        mel_spec_type=tts.mel_spec_type,
                        progress=None,
                        cross_fade_duration=CROSS_FADE_SECONDS,
                        nfe_step=req.nfe_step,
                        cfg_strength=req.cfg_strength,
                        speed=req.speed,
                        device=tts.device,
                    )
                )
            except torch.cuda.OutOfMemoryError as exc:
                torch.cuda.empty_cache()
                raise JobError(
                    ErrorCode.GPU_OOM, f"CUDA out of memory on chunk {i + 1}/{len(chunks)}"
                ) from exc
            except Exception as exc:
                raise JobError(ErrorCode.BACKEND_ERROR, f"F5-TTS failed on chunk {i + 1}: {exc!r}") from exc
            waves.append(wave)
            ctx.report_progress(
                20 + 60 * (i + 1) // len(chunks), f"inference: chunk {i + 1}/{len(chunks)} done"
            )
        return waves

    def _finish(
        self,
        ctx: JobContext,
        req: _Request,
        prep: _Prepared,
        waves: list[np.ndarray],
        started: float,
        inference_seconds: float,
    ) -> BackendResult:
        """Join, resample and encode the chunks; the metrics the result carries."""
        import soundfile as sf

        ctx.report_progress(85, "post-processing")
        wave = _cross_fade(waves, int(CROSS_FADE_SECONDS * SAMPLE_RATE))
        if req.sample_rate != SAMPLE_RATE:
            import soxr

            wave = soxr.resample(wave.astype(np.float32), SAMPLE_RATE, req.sample_rate, quality="HQ")
        wave = np.clip(wave, -1.0, 1.0)
        fmt, subtype, content_type = FORMATS[req.format]
        out = ctx.workdir / f"speech.{req.format}"
        sf.write(str(out), wave, req.sample_rate, format=fmt, subtype=subtype)
        info = sf.info(str(out))
        ctx.report_progress(95, "post-processing done; uploading")

        audio_seconds = len(wave) / req.sample_rate
        return BackendResult(
            outputs=[OutputFile(path=out, content_type=content_type, name=out.name)],
            metrics={
                "duration_seconds": round(audio_seconds, 3),
                "sample_rate": req.sample_rate,
                "channels": info.channels,
                "format": req.format,
                "region": req.region,
                "detected_region": req.detected_region,
                "slang_markers": req.slang_markers,
                "voice": req.voice,
                "audio_seconds": round(audio_seconds, 3),
                "inference_seconds": round(inference_seconds, 3),
                "rtf": round(inference_seconds / audio_seconds, 4) if audio_seconds else None,
                "total_seconds": round(time.monotonic() - started, 3),
                "chunks": len(prep.chunks),
                "ref_audio_seconds": round(prep.ref_seconds, 3),
                "nfe_step": req.nfe_step,
                "seed": req.seed,
                "model": self.model,
            },
        )

    @staticmethod
    def _forget_reference(processed: str) -> None:
        """f5-tts keeps every preprocessed reference as a temp file in a module-level cache for
        the life of the process; for one-off payload references that grows without bound."""
        from f5_tts.infer import utils_infer

        for key in [k for k, v in utils_infer._ref_audio_cache.items() if v == processed]:
            del utils_infer._ref_audio_cache[key]
        Path(processed).unlink(missing_ok=True)
