"""Backends run one job's inference on this machine. One file per backend, each a `Backend`."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from worker.backends.base import Backend


def _comfyui(env: Mapping[str, str]) -> Backend:
    from worker.backends.comfyui import ComfyUIBackend

    return ComfyUIBackend.from_env(env)


def _f5tts(env: Mapping[str, str]) -> Backend:
    # imported here: f5tts pulls in torch, which a worker serving only images must not pay for
    from worker.backends.f5tts import F5TTSBackend

    return F5TTSBackend(
        model=env.get("F5TTS_MODEL") or "F5TTS_v1_Base",
        ckpt_file=env.get("F5TTS_CKPT_FILE") or "",
        vocab_file=env.get("F5TTS_VOCAB_FILE") or "",
        vocoder_dir=env.get("F5TTS_VOCODER_DIR") or None,
        voices_dir=env.get("F5TTS_VOICES_DIR") or None,
        device=env.get("F5TTS_DEVICE") or None,
        default_region=env.get("F5TTS_DEFAULT_REGION") or "neutral",
        ckpt_sha256=env.get("F5TTS_CKPT_SHA256") or None,
        vocab_sha256=env.get("F5TTS_VOCAB_SHA256") or None,
        vocoder_sha256=env.get("F5TTS_VOCODER_SHA256") or None,
        cache_dir=env.get("F5TTS_MODEL_CACHE") or None,
        s3_endpoint_url=env.get("F5TTS_S3_ENDPOINT_URL") or env.get("GPUQ_S3_ENDPOINT_URL") or None,
        max_batch=_whole_number(env, "F5TTS_MAX_BATCH", 8),
        batch_window_ms=_whole_number(env, "F5TTS_BATCH_WINDOW_MS", 50),
        model_max_bytes=_whole_number(env, "F5TTS_MODEL_MAX_BYTES", 20 * 10**9),
        model_download_timeout_s=_whole_number(env, "F5TTS_MODEL_DOWNLOAD_TIMEOUT_S", 7200),
    )


def _whole_number(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name) or str(default)
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from None


def _imageops(env: Mapping[str, str]) -> Backend:
    from worker.backends.imageops import ImageOpsBackend

    return ImageOpsBackend.from_env(env)


# name (as in GPUQ_QUEUES) -> factory that builds the backend from the environment
BACKENDS: dict[str, Callable[[Mapping[str, str]], Backend]] = {
    "comfyui": _comfyui,
    "f5tts": _f5tts,
    "imageops": _imageops,
}
