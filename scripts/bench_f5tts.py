"""Benchmark the F5-TTS backend against calling `F5TTS.infer` directly, on random weights.

    python scripts/bench_f5tts.py                 # full-size F5TTS_v1_Base (~337 M parameters), GPU
    python scripts/bench_f5tts.py --arch tiny     # a tiny DiT, runs in seconds on a CPU
    python scripts/bench_f5tts.py --batch 8       # sequential jobs vs 8 jobs at once, batched

Random weights give real timings: the work per job depends on the architecture and the lengths of
text and reference, not on the weights' values. Nothing is downloaded (HF_HUB_OFFLINE=1): the
checkpoint and the Vocos vocoder are built from their configs. For each NFE (16, 32 by default) it
runs the same jobs through `F5TTSBackend.run` and through `F5TTS.infer(file_wave=...)`, and prints
jobs/s and the real-time factor (wall seconds per second of audio) of each path, plus the largest
difference between the two paths' waveforms for the same seed.

With --batch N it compares instead a backend that runs jobs one after another (F5TTS_MAX_BATCH=1, the
jobs submitted one by one) with one that batches across jobs (F5TTS_MAX_BATCH=N, N jobs submitted at once
from N threads, as a worker's slots do with GPUQ_CONCURRENCY f5tts=N): jobs/s, aggregate real-time factor
(wall seconds per second of audio produced), the speed-up, the batch sizes the jobs ran in, and the largest
difference between a job's batched audio and its sequential audio (same seed). The jobs alternate between
the text and its first sentence, so batches hold rows of different lengths (--same-text: all the text).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import soundfile as sf
import torch
import yaml

SAMPLE_RATE = 24000
TINY_ARCH = {"dim": 64, "depth": 2, "heads": 2, "ff_mult": 2, "text_dim": 32, "conv_layers": 1}
# charactr/vocos-mel-24khz's config.yaml, the vocoder every F5-TTS vocos config uses.
VOCOS_CONFIG = {
    "feature_extractor": {
        "class_path": "vocos.feature_extractors.MelSpectrogramFeatures",
        "init_args": {
            "sample_rate": 24000,
            "n_fft": 1024,
            "hop_length": 256,
            "n_mels": 100,
            "padding": "center",
        },
    },
    "backbone": {
        "class_path": "vocos.models.VocosBackbone",
        "init_args": {"input_channels": 100, "dim": 512, "intermediate_dim": 1536, "num_layers": 8},
    },
    "head": {
        "class_path": "vocos.heads.ISTFTHead",
        "init_args": {"dim": 512, "n_fft": 1024, "hop_length": 256, "padding": "center"},
    },
}
REF_TEXT = "This is a reference recording of the voice, about five seconds of clear speech."
GEN_TEXT = (
    "Hola, esta es una prueba del servicio de voz. Cada trabajo llega desde la base de datos, "
    "se genera en la GPU y se sube como un archivo de audio."
)


def build_random_assets(
    out_dir: Path,
    *,
    base: str = "F5TTS_v1_Base",
    arch: dict[str, Any] | None = None,
    vocab: list[str] | None = None,
) -> dict[str, str]:
    """Write a random-weight F5-TTS checkpoint and Vocos vocoder under out_dir.

    `base` is a packaged config; `arch` overrides some of its architecture (a tiny model), in which
    case the config is written as out_dir/model.yaml. `vocab` None keeps the package's vocabulary.
    Returns the F5TTSBackend arguments: model, ckpt_file, vocab_file, vocoder_dir.
    """
    from f5_tts.model import CFM, DiT
    from safetensors.torch import save_file
    from vocos import Vocos

    out_dir.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(files("f5_tts").joinpath(f"configs/{base}.yaml").read_text())
    model = base
    if arch:
        config["model"]["arch"].update(arch)
        model = str(out_dir / "model.yaml")
        Path(model).write_text(yaml.safe_dump(config))

    vocab_file = ""
    if vocab is None:
        n_vocab = len(files("f5_tts").joinpath("infer/examples/vocab.txt").read_text().splitlines())
    else:
        vocab_file = str(out_dir / "vocab.txt")
        Path(vocab_file).write_text("".join(f"{token}\n" for token in vocab), encoding="utf-8")
        n_vocab = len(vocab)

    mel = config["model"]["mel_spec"]
    cfm = CFM(
        transformer=DiT(**config["model"]["arch"], text_num_embeds=n_vocab, mel_dim=mel["n_mel_channels"]),
        mel_spec_kwargs={
            "n_fft": mel["n_fft"],
            "hop_length": mel["hop_length"],
            "win_length": mel["win_length"],
            "n_mel_channels": mel["n_mel_channels"],
            "target_sample_rate": mel["target_sample_rate"],
            "mel_spec_type": mel["mel_spec_type"],
        },
    )
    # DiT zero-initialises its output projection and adaLN layers, so a fresh model predicts a flow of 0
    # and "speaks" its starting noise whatever the text and reference. Random values there make the output
    # depend on both, as a trained model's does (and make the tests that compare outputs mean something).
    with torch.no_grad():
        for param in cfm.parameters():
            if param.numel() and not param.any():
                param.normal_(0.0, 0.05)
    ckpt_file = str(out_dir / "model.safetensors")
    save_file(cfm.state_dict(), ckpt_file)  # loaded as EMA weights, as the released .safetensors are

    vocoder_dir = out_dir / "vocos"
    vocoder_dir.mkdir(exist_ok=True)
    (vocoder_dir / "config.yaml").write_text(yaml.safe_dump(VOCOS_CONFIG))
    vocos = Vocos.from_hparams(str(vocoder_dir / "config.yaml"))
    torch.save(vocos.state_dict(), vocoder_dir / "pytorch_model.bin")
    return {"model": model, "ckpt_file": ckpt_file, "vocab_file": vocab_file, "vocoder_dir": str(vocoder_dir)}


def write_reference(path: Path, seconds: float, *, seed: int = 0) -> None:
    """A voice-like reference: a wobbling 150-300 Hz tone with some noise, 16-bit 24 kHz WAV."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 220 + 60 * np.sin(2 * np.pi * 3 * t)
    wave = 0.3 * np.sin(2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE) + 0.02 * rng.standard_normal(len(t))
    sf.write(str(path), wave.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")


def _ensure_torchaudio_load() -> None:
    """F5TTS.infer reads the reference with torchaudio.load, which needs a torchcodec built for this
    torch (the PyPI one is CUDA-only) and FFmpeg. Where that fails (CPU-only torch), read with
    soundfile instead so that the direct path can still be timed; the backend never calls it."""
    import torchaudio

    probe = Path(tempfile.mkdtemp()) / "probe.wav"
    write_reference(probe, 0.1)
    try:
        torchaudio.load(str(probe))
    except Exception as exc:
        print(
            f"note: torchaudio.load fails here ({type(exc).__name__}); the direct path reads with soundfile"
        )

        def load(path: str, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, int]:
            data, sr = sf.read(str(path), dtype="float32", always_2d=True)
            return torch.from_numpy(data.T.copy()), sr

        torchaudio.load = load


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _row(path: str, nfe: int, jobs: int, elapsed: float, audio_s: float) -> dict[str, object]:
    return {
        "path": path,
        "nfe_step": nfe,
        "jobs": jobs,
        "jobs_per_s": jobs / elapsed,
        "rtf": elapsed / audio_s,
        "audio_s_per_job": audio_s / jobs,
    }


def _report(args: argparse.Namespace, results: list[dict], **extra: object) -> None:
    """The results as a table, and as JSON when --json names a file."""
    print(f"\n{'path':<12} {'nfe':>4} {'jobs':>5} {'jobs/s':>8} {'RTF':>8} {'audio s/job':>12}")
    for r in results:
        print(
            f"{r['path']:<12} {r['nfe_step']:>4} {r['jobs']:>5} {r['jobs_per_s']:>8.3f}"
            f" {r['rtf']:>8.4f} {r['audio_s_per_job']:>12.2f}"
        )
    if args.json:
        body = {"arch": args.arch, "device": args.device, **extra, "results": results}
        args.json.write_text(json.dumps(body, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--nfe", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--jobs", type=int, default=5, help="timed jobs per path and NFE (after one warm-up)")
    parser.add_argument("--text", default=GEN_TEXT)
    parser.add_argument("--ref-seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--batch", type=int, metavar="N", help="sequential vs N jobs at once, batched")
    parser.add_argument(
        "--same-text", action="store_true", help="with --batch: every job speaks --text (rows of one length)"
    )
    args = parser.parse_args()

    from f5_tts.api import F5TTS

    from worker.backends.base import JobContext
    from worker.backends.f5tts import F5TTSBackend, model_config_arg

    _ensure_torchaudio_load()
    work = Path(tempfile.mkdtemp(prefix="bench-f5tts-"))
    started = time.monotonic()
    assets = build_random_assets(work / "model", arch=TINY_ARCH if args.arch == "tiny" else None)
    print(f"built random {args.arch} weights in {time.monotonic() - started:.1f} s under {work}")
    voices = work / "voices"
    voices.mkdir()
    write_reference(voices / "bench.wav", args.ref_seconds)
    (voices / "bench.txt").write_text(REF_TEXT)

    if args.batch:
        bench_batch(args, assets, voices, work)
        return
    backend = F5TTSBackend(**assets, voices_dir=str(voices), device=args.device, max_batch=1)
    started = time.monotonic()
    backend.start()
    print(f"backend start (model load): {time.monotonic() - started:.1f} s")
    direct = F5TTS(
        model=model_config_arg(assets["model"]),
        ckpt_file=assets["ckpt_file"],
        vocab_file=assets["vocab_file"],
        vocoder_local_path=assets["vocoder_dir"],
        device=args.device,
    )
    params = list(direct.ema_model.parameters())
    n_params = sum(p.numel() for p in params)
    print(f"device {args.device}, {n_params / 1e6:.1f} M parameters, dtype {params[0].dtype}")

    def backend_job(nfe: int, seed: int, job_dir: Path) -> Path:
        ctx = JobContext(
            job_id=seed,
            attempt=1,
            queue="bench",
            payload={"text": args.text, "voice": "bench", "nfe_step": nfe, "seed": seed},
            workdir=job_dir,
            deadline=time.monotonic() + 3600,
            cancelled=threading.Event(),
            report_progress=lambda percent, message: None,
            fetch_input=Path,
        )
        return backend.run(ctx).outputs[0].path

    def direct_job(nfe: int, seed: int, job_dir: Path) -> Path:
        out = job_dir / "speech.wav"
        direct.infer(
            str(voices / "bench.wav"),
            REF_TEXT,
            args.text,
            show_info=lambda *a: None,
            progress=None,
            nfe_step=nfe,
            seed=seed,
            file_wave=str(out),
        )
        return out

    paths = {"backend": backend_job, "F5TTS.infer": direct_job}
    results = []
    for nfe in args.nfe:
        job_dirs = {path: work / f"{path}-{nfe}" for path in paths}
        waves = {}
        for path, job in paths.items():
            job_dirs[path].mkdir()
            # A warm-up job, kept for the same-seed comparison below.
            waves[path] = sf.read(str(job(nfe, 0, job_dirs[path])), dtype="float32")[0]
        n = min(len(w) for w in waves.values())
        diff = float(np.max(np.abs(waves["backend"][:n] - waves["F5TTS.infer"][:n])))
        lengths = " vs ".join(str(len(w)) for w in waves.values())
        print(f"nfe {nfe}: seed-0 waveforms {lengths} samples, max |difference| {diff:.2e} (both 16-bit WAV)")

        # Alternate the two paths job by job, so that a busy machine slows both alike.
        elapsed = dict.fromkeys(paths, 0.0)
        audio_seconds = dict.fromkeys(paths, 0.0)
        for seed in range(1, args.jobs + 1):
            for path, job in paths.items():
                _sync(args.device)
                started = time.monotonic()
                out = job(nfe, seed, job_dirs[path])
                _sync(args.device)
                elapsed[path] += time.monotonic() - started
                audio_seconds[path] += sf.info(str(out)).duration
        for path in paths:
            results.append(_row(path, nfe, args.jobs, elapsed[path], audio_seconds[path]))

    _report(args, results)
    backend.close()


def bench_batch(args: argparse.Namespace, assets: dict[str, str], voices: Path, work: Path) -> None:
    from worker.backends.base import BackendResult, JobContext
    from worker.backends.f5tts import F5TTSBackend

    texts = [args.text, args.text if args.same_text else args.text.split(". ")[0] + "."]
    backends = {
        "sequential": F5TTSBackend(**assets, voices_dir=str(voices), device=args.device, max_batch=1),
        "batched": F5TTSBackend(**assets, voices_dir=str(voices), device=args.device, max_batch=args.batch),
    }
    for b in backends.values():
        b.start()
    params = list(next(iter(backends.values()))._tts.ema_model.parameters())  # type: ignore[union-attr]
    n_params = sum(p.numel() for p in params)
    print(f"device {args.device}, {n_params / 1e6:.1f} M parameters, dtype {params[0].dtype}")

    def job(backend: F5TTSBackend, nfe: int, seed: int, job_dir: Path) -> BackendResult:
        ctx = JobContext(
            job_id=seed,
            attempt=1,
            queue="bench",
            payload={"text": texts[seed % 2], "voice": "bench", "nfe_step": nfe, "seed": seed},
            workdir=job_dir,
            deadline=time.monotonic() + 3600,
            cancelled=threading.Event(),
            report_progress=lambda percent, message: None,
            fetch_input=Path,
        )
        job_dir.mkdir(parents=True, exist_ok=True)
        return backend.run(ctx)

    def at_once(backend: F5TTSBackend, nfe: int, seeds: list[int], root: Path) -> list[BackendResult]:
        results: list[BackendResult | None] = [None] * len(seeds)

        def one(i: int) -> None:
            results[i] = job(backend, nfe, seeds[i], root / str(seeds[i]))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(seeds))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r is not None for r in results), "a job failed"
        return results  # type: ignore[return-value]

    n = args.batch * max(1, args.jobs // args.batch)  # whole batches
    results = []
    for nfe in args.nfe:
        at_once(
            backends["batched"], nfe, list(range(1000, 1000 + args.batch)), work / f"warm-{nfe}"
        )  # warm-up
        job(backends["sequential"], nfe, 999, work / f"warm-seq-{nfe}")
        seeds = list(range(1, n + 1))
        outputs: dict[str, dict[int, Path]] = {"sequential": {}, "batched": {}}
        elapsed = {}
        audio = dict.fromkeys(outputs, 0.0)
        sizes: list[int] = []
        _sync(args.device)
        started = time.monotonic()
        for seed in seeds:
            r = job(backends["sequential"], nfe, seed, work / f"seq-{nfe}" / str(seed))
            outputs["sequential"][seed] = r.outputs[0].path
            audio["sequential"] += r.metrics["duration_seconds"]
        _sync(args.device)
        elapsed["sequential"] = time.monotonic() - started
        started = time.monotonic()
        for i in range(0, n, args.batch):
            for seed, r in zip(
                seeds[i : i + args.batch],
                at_once(backends["batched"], nfe, seeds[i : i + args.batch], work / f"bat-{nfe}"),
                strict=True,
            ):
                outputs["batched"][seed] = r.outputs[0].path
                audio["batched"] += r.metrics["duration_seconds"]
                sizes.append(r.metrics["batch_size"])
        _sync(args.device)
        elapsed["batched"] = time.monotonic() - started
        diff = max(
            float(
                np.max(
                    np.abs(sf.read(str(outputs["batched"][s]))[0] - sf.read(str(outputs["sequential"][s]))[0])
                )
            )
            for s in seeds
        )
        for path in outputs:
            results.append(_row(path, nfe, n, elapsed[path], audio[path]))
        speedup = elapsed["sequential"] / elapsed["batched"]
        print(
            f"nfe {nfe}: batched {speedup:.2f}x sequential; batch sizes {sorted(set(sizes))};"
            f" max |batched - sequential| {diff:.2e} (16-bit WAV, same seeds)"
        )
    _report(args, results, batch=args.batch)
    for b in backends.values():
        b.close()


if __name__ == "__main__":
    main()
