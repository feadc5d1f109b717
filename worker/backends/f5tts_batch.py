"""Batching F5-TTS across jobs: the chunks of several jobs go through the model in one forward pass.

f5-tts's PyTorch API generates one request at a time; batched serving is its TensorRT-LLM/Triton path. Here
the worker's slot threads (GPUQ_CONCURRENCY f5tts=N) each hand their job to one `Batcher` thread, which
waits up to F5TTS_BATCH_WINDOW_MS for other jobs (only while other jobs are still being prepared, so a job
alone waits for nothing), then runs up to F5TTS_MAX_BATCH chunks, of one or several jobs, together.

Each chunk gets what `infer_batch_process` gives it when run alone: the same reference processing, text,
duration rule and vocoder, and the same starting noise, drawn from a generator seeded with its job's seed in
the order the job's chunks come (what `seed_everything(seed)` and one chunk after another give). f5-tts
1.1.22's DiT keeps each row of a batch to its own length (`audio_mask`, text masked per row), so a chunk's
result in a batch equals its result alone; for `F5TTS_Base` (no text padding mask) only nearly.

Cancel and timeout act per job: the job's own thread watches them while it waits, and raises CANCELLED or
TIMEOUT at once (within POLL_S); the rest of its batch goes on unchanged, its rows are dropped from the ones
not yet run, and a batch whose jobs have all stopped is abandoned between two ODE steps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.backends.base import JobContext
from worker.errors import ErrorCode, JobError

if TYPE_CHECKING:
    from f5_tts.api import F5TTS

    from worker.backends.f5tts import _Prepared, _Request

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often a waiting job looks at its cancel flag and deadline
TARGET_RMS = 0.1  # infer_batch_process's default
SWAY_SAMPLING_COEF = -1.0  # infer_batch_process's default
HOP_LENGTH = 256
TARGET_SAMPLE_RATE = 24000


class _Abandoned(Exception):
    """Every job of a batch stopped: no one is waiting for its result."""


@dataclass
class _Job:
    ctx: JobContext
    req: _Request
    prep: _Prepared
    waves: list[np.ndarray | None] = field(default_factory=list)
    rows_done: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # rows in each forward pass its chunks ran in
    error: JobError | None = None
    stopped: bool = False  # its thread gave up (cancel, timeout): drop its rows
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Row:
    """One chunk of one job, ready for the model."""

    job: _Job
    index: int
    key: tuple[int, float]  # rows run together only with the same steps and guidance
    cond: Any  # mel of the reference, 1 x n x d
    text: list[str]  # the characters (or pinyin) of reference transcript + chunk
    duration: int  # frames, reference included
    ref_frames: int
    rms: float
    noise: Any  # duration x d


class Batcher:
    def __init__(self, tts: F5TTS, lock: threading.Lock, *, max_batch: int, window_s: float) -> None:
        self.tts = tts
        self.lock = lock  # the backend's model lock: one forward pass at a time
        self.max_batch = max_batch
        self.window_s = window_s
        self._cond = threading.Condition()
        self._pending: list[_Row] = []
        self._arrived: float | None = None  # when the oldest pending row came
        self._preparing = 0  # jobs in run() that have not yet been handed over
        self._closed = False
        # The latest forward passes (rows, jobs, steps run, abandoned): bounded, a worker runs for weeks.
        self.batches: deque[dict[str, Any]] = deque(maxlen=100)
        # The packaged configs turn the attention mask off (it costs memory with torch's attention): without
        # it a short row attends to the padding after it. Batches of several rows need it; one row has none.
        for block in tts.ema_model.transformer.transformer_blocks:
            block.attn.processor.attn_mask_enabled = True
        self._thread = threading.Thread(target=self._loop, name="gpuq-f5tts-batcher", daemon=True)
        self._thread.start()

    # -- the jobs' side

    def run(
        self, ctx: JobContext, prepare: Callable[[], tuple[_Request, _Prepared]]
    ) -> tuple[_Request, _Prepared, list[np.ndarray], list[int]]:
        """Prepare the job (in this, its own thread), hand its chunks over, wait for their waveforms.

        Returns the request, its preparation, the chunk waveforms in order and the sizes of the batches
        they ran in. Raises the job's JobError, or CANCELLED/TIMEOUT as soon as the job is told to stop.
        """
        from worker.backends.f5tts import check_stop

        with self._cond:
            self._preparing += 1  # the window waits for jobs only while some are being prepared
        try:
            req, prep = prepare()
            job = _Job(ctx=ctx, req=req, prep=prep, waves=[None] * len(prep.chunks))
            rows = self._rows(job)  # text and starting noise of each chunk
        except BaseException:
            with self._cond:
                self._preparing -= 1
                self._cond.notify_all()
            raise
        n = len(rows)
        with self._cond:
            self._preparing -= 1
            if self._closed:
                raise JobError(ErrorCode.BACKEND_UNAVAILABLE, "F5-TTS is closing")
            self._pending.extend(rows)
            self._arrived = self._arrived or time.monotonic()
            self._cond.notify_all()
        ctx.report_progress(20, f"inference: {n} chunk(s), batched with other jobs")
        reported = 0
        try:
            while not job.done.wait(POLL_S):
                check_stop(ctx, f"after {job.rows_done} of {n} chunks, in a batch")
                if job.rows_done > reported:
                    reported = job.rows_done
                    ctx.report_progress(20 + 60 * reported // n, f"inference: chunk {reported}/{n} done")
        except JobError:
            self._stop(job)
            raise
        if job.error is not None:
            raise job.error
        if reported < n:
            ctx.report_progress(80, f"inference: chunk {n}/{n} done")
        return req, prep, [w for w in job.waves if w is not None], job.batch_sizes

    def _stop(self, job: _Job) -> None:
        with self._cond:
            job.stopped = True
            self._pending = [r for r in self._pending if r.job is not job]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for row in self._pending:
                row.job.error = JobError(ErrorCode.BACKEND_UNAVAILABLE, "F5-TTS closed before the job ran")
                row.job.done.set()
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join(30)

    # -- preparing rows (as infer_batch_process's _infer_basic and CFM.sample do for one chunk)

    def _rows(self, job: _Job) -> list[_Row]:
        import torch
        import torchaudio
        from f5_tts.model.utils import convert_char_to_pinyin

        model = self.tts.ema_model
        req, prep = job.req, job.prep
        audio = prep.audio
        if audio.shape[0] > 1:
            audio = torch.mean(audio, dim=0, keepdim=True)
        rms = float(torch.sqrt(torch.mean(torch.square(audio))))
        if rms < TARGET_RMS:
            audio = audio * TARGET_RMS / rms
        if prep.sr != TARGET_SAMPLE_RATE:
            audio = torchaudio.transforms.Resample(prep.sr, TARGET_SAMPLE_RATE)(audio)
        param = next(model.parameters())
        audio = audio.to(param.device)
        with torch.inference_mode():
            cond = model.mel_spec(audio).permute(0, 2, 1).to(param.dtype)
        ref_text = prep.ref_text
        if len(ref_text[-1].encode("utf-8")) == 1:
            ref_text = ref_text + " "
        ref_frames = audio.shape[-1] // HOP_LENGTH
        generator = torch.Generator(device=param.device).manual_seed(req.seed)
        rows = []
        for i, chunk in enumerate(prep.chunks):
            speed = 0.3 if len(chunk.encode("utf-8")) < 10 else req.speed
            text = convert_char_to_pinyin([ref_text + chunk])[0]
            duration = ref_frames + int(
                ref_frames / len(ref_text.encode("utf-8")) * len(chunk.encode("utf-8")) / speed
            )
            # CFM.sample: at least the text or the reference plus one frame
            duration = min(max(max(len(text), cond.shape[1]) + 1, duration), 65536)
            noise = torch.randn(
                duration, model.num_channels, device=param.device, dtype=param.dtype, generator=generator
            )
            rows.append(
                _Row(
                    job=job,
                    index=i,
                    key=(req.nfe_step, req.cfg_strength),
                    cond=cond,
                    text=text,
                    duration=duration,
                    ref_frames=ref_frames,
                    rms=rms,
                    noise=noise,
                )
            )
        return rows

    # -- the batcher thread

    def alive(self) -> bool:
        return self._thread.is_alive()

    def pending_rows(self) -> int:
        with self._cond:
            return len(self._pending)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                # Wait for more jobs while some are being prepared, up to the window, or until full.
                assert self._arrived is not None
                while (
                    not self._closed
                    and self._preparing > 0
                    and len(self._pending) < self.max_batch
                    and time.monotonic() < self._arrived + self.window_s
                ):
                    self._cond.wait(max(0.0, self._arrived + self.window_s - time.monotonic()))
            # The batch is chosen once the model is free: what arrived meanwhile joins it.
            with self.lock:
                with self._cond:
                    if self._closed or not self._pending:
                        continue
                    key = self._pending[0].key
                    batch = [r for r in self._pending if r.key == key][: self.max_batch]
                    self._pending = [r for r in self._pending if all(r is not b for b in batch)]
                    self._arrived = time.monotonic() if self._pending else None
                self._run(batch)

    def _run(self, rows: list[_Row]) -> None:
        """One forward pass (the model lock held), its waveforms or its error handed to each job."""
        import torch

        jobs = list({id(r.job): r.job for r in rows}.values())
        record: dict[str, Any] = {"rows": len(rows), "jobs": len(jobs), "steps": 0, "abandoned": False}
        started = time.monotonic()
        try:
            waves = self._forward(rows, record)
            record["seconds"] = round(time.monotonic() - started, 4)
        except _Abandoned:
            record["abandoned"] = True
            self.batches.append(record)
            return
        except Exception as exc:
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
                error = JobError(ErrorCode.GPU_OOM, f"CUDA out of memory in a batch of {len(rows)} chunks")
            else:
                error = JobError(ErrorCode.BACKEND_ERROR, f"F5-TTS failed in a batch of {len(rows)}: {exc!r}")
            log.exception("F5-TTS batch of %d chunks failed", len(rows))
            self.batches.append(record)
            with self._cond:
                for job in jobs:
                    job.error = error
                    self._pending = [r for r in self._pending if r.job is not job]
                    job.done.set()
            return
        self.batches.append(record)
        with self._cond:
            for row, wave in zip(rows, waves, strict=True):
                job = row.job
                job.waves[row.index] = wave
                job.rows_done += 1
                job.batch_sizes.append(len(rows))
                if job.rows_done == len(job.waves):
                    job.done.set()

    def _row_text_embeddings(self, rows: list[_Row], transformer: Any) -> None:
        """Fill the DiT's text cache row by row, each row at its own length, zeros after it.

        DiT embeds the text for the whole batch at once, through ConvNeXt blocks whose GRN normalises over
        the whole (padded) sequence: a short row's text embedding would depend on the longest row's length.
        Embedded alone, each row gets what it gets when it is the only one.
        """
        from f5_tts.model.utils import list_str_to_idx, list_str_to_tensor
        from torch.nn.utils.rnn import pad_sequence

        vocab = self.tts.ema_model.vocab_char_map
        device = next(transformer.parameters()).device
        embedded: dict[bool, list[Any]] = {False: [], True: []}
        for row in rows:
            text = (
                list_str_to_idx([row.text], vocab) if vocab is not None else list_str_to_tensor([row.text])
            ).to(device)
            for drop_text in (False, True):
                embedded[drop_text].append(transformer.text_embed(text, row.duration, drop_text=drop_text)[0])
        transformer.text_cond = pad_sequence(embedded[False], batch_first=True, padding_value=0.0)
        transformer.text_uncond = pad_sequence(embedded[True], batch_first=True, padding_value=0.0)

    def _forward(self, rows: list[_Row], record: dict[str, Any]) -> list[np.ndarray]:
        """`_sample`, with the DiT's text cache holding this batch's text only: emptied first (in case an
        earlier pass failed before clearing it) and cleared afterwards, whichever step fails."""
        transformer = self.tts.ema_model.transformer
        transformer.clear_cache()
        try:
            return self._sample(rows, record)
        finally:
            transformer.clear_cache()

    def _sample(self, rows: list[_Row], record: dict[str, Any]) -> list[np.ndarray]:
        """CFM.sample for a batch whose rows each bring their own reference, text, length and noise."""
        import torch
        import torch.nn.functional as F
        from f5_tts.model.utils import get_epss_timesteps, lens_to_mask, list_str_to_idx, list_str_to_tensor
        from torch.nn.utils.rnn import pad_sequence
        from torchdiffeq import odeint

        model = self.tts.ema_model
        model.eval()  # as CFM.sample does: f5-tts loads the model in training mode, dropout on
        nfe_step, cfg_strength = rows[0].key
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        with torch.inference_mode():
            lens = torch.tensor([r.cond.shape[1] for r in rows], device=device, dtype=torch.long)
            duration = torch.tensor([r.duration for r in rows], device=device, dtype=torch.long)
            max_duration = int(duration.max())
            cond = pad_sequence([r.cond[0] for r in rows], batch_first=True, padding_value=0.0)
            cond = F.pad(cond, (0, 0, 0, max_duration - cond.shape[1]), value=0.0)
            texts = [r.text for r in rows]
            if model.vocab_char_map is not None:
                text = list_str_to_idx(texts, model.vocab_char_map).to(device)
            else:
                text = list_str_to_tensor(texts).to(device)
            cond_mask = lens_to_mask(lens, length=max_duration).unsqueeze(-1)
            step_cond = torch.where(cond_mask, cond, torch.zeros_like(cond))
            # No padding, no mask: one row (as CFM.sample), or rows all of one length, which keeps torch's
            # attention on its fast kernel. Rows of different lengths need the mask and their own text.
            mask = None
            if len({r.duration for r in rows}) > 1:
                mask = lens_to_mask(duration)
                self._row_text_embeddings(rows, model.transformer)
            jobs = {id(r.job): r.job for r in rows}.values()

            def fn(t: Any, x: Any) -> Any:
                if all(job.stopped for job in jobs):
                    raise _Abandoned
                record["steps"] += 1
                if cfg_strength < 1e-5:
                    return model.transformer(
                        x=x,
                        cond=step_cond,
                        text=text,
                        time=t,
                        mask=mask,
                        drop_audio_cond=False,
                        drop_text=False,
                        cache=True,
                    )
                pred_cfg = model.transformer(
                    x=x, cond=step_cond, text=text, time=t, mask=mask, cfg_infer=True, cache=True
                )
                pred, null_pred = torch.chunk(pred_cfg, 2, dim=0)
                return pred + (pred - null_pred) * cfg_strength

            y0 = pad_sequence([r.noise for r in rows], padding_value=0, batch_first=True)
            t = get_epss_timesteps(nfe_step, device=device, dtype=dtype)
            t = t + SWAY_SAMPLING_COEF * (torch.cos(torch.pi / 2 * t) - 1 + t)
            ode_started = time.monotonic()
            trajectory = odeint(fn, y0, t, **model.odeint_kwargs)
            record["ode_seconds"] = round(time.monotonic() - ode_started, 4)
            out = torch.where(cond_mask, cond, trajectory[-1])

            waves = []
            for i, row in enumerate(rows):
                generated = out[i : i + 1, : row.duration].to(torch.float32)
                generated = generated[:, row.ref_frames :, :].permute(0, 2, 1)
                if self.tts.mel_spec_type == "vocos":
                    wave = self.tts.vocoder.decode(generated)
                else:
                    wave = self.tts.vocoder(generated)
                if row.rms < TARGET_RMS:
                    wave = wave * row.rms / TARGET_RMS
                waves.append(wave.squeeze().cpu().numpy())
            return waves
