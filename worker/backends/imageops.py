"""Image operations with Pillow: a real backend that needs no model and no GPU.

It is what the demo and the fast tests run on a machine without ComfyUI. Payload:

    {"image": "https://… | s3://… | /abs/path",
     "ops": [{"op": "invert"} | {"op": "grayscale"} | {"op": "blur", "radius": 2}
             | {"op": "resize", "width": 64, "height": 64} | {"op": "sleep", "seconds": 1.5}],
     "format": "png" | "jpeg"}

`sleep` stands in for inference time (demos, drain and cancel tests); it stops early when the job is
cancelled, as a real backend would between steps.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from worker.backends.base import BackendResult, JobContext, OutputFile
from worker.errors import ErrorCode, JobError
from worker.inputs import DEFAULT_IMAGE_LIMITS, ImageLimits, check_image

FORMATS = {"png": ("PNG", "image/png", "png"), "jpeg": ("JPEG", "image/jpeg", "jpg")}
MAX_OPS = 32
MAX_SIDE = 8192
MAX_SLEEP_SECONDS = 3600.0
MAX_BLUR_RADIUS = 100.0


def _invalid(message: str) -> JobError:
    return JobError(ErrorCode.INPUT_INVALID, message)


def _number(op: Mapping[str, Any], i: int, key: str, lo: float, hi: float, *, integer: bool) -> float:
    value = op.get(key)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not isinstance(value, int))
    ):
        kind = "a whole number" if integer else "a number"
        raise _invalid(f"ops[{i}] ({op.get('op')}): {key} must be {kind}, got {value!r}")
    if not lo <= value <= hi:
        raise _invalid(f"ops[{i}] ({op.get('op')}): {key} must be between {lo:g} and {hi:g}, got {value}")
    return value


def parse_ops(raw: Any) -> list[dict[str, Any]]:
    """Check the ops list; answers it with defaults filled in. Raises INPUT_INVALID naming the op."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _invalid(f"ops must be a list of operations, got {type(raw).__name__}")
    if len(raw) > MAX_OPS:
        raise _invalid(f"ops has {len(raw)} operations; at most {MAX_OPS}")
    ops = []
    for i, op in enumerate(raw):
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            raise _invalid(f"ops[{i}] must be an object with an 'op' name, got {op!r}"[:300])
        name = op["op"]
        allowed = {"op"}
        if name in ("invert", "grayscale"):
            ops.append({"op": name})
        elif name == "blur":
            allowed.add("radius")
            radius = _number(op, i, "radius", 0, MAX_BLUR_RADIUS, integer=False) if "radius" in op else 2
            ops.append({"op": name, "radius": radius})
        elif name == "resize":
            allowed |= {"width", "height"}
            w = int(_number(op, i, "width", 1, MAX_SIDE, integer=True))
            h = int(_number(op, i, "height", 1, MAX_SIDE, integer=True))
            ops.append({"op": name, "width": w, "height": h})
        elif name == "sleep":
            allowed.add("seconds")
            ops.append(
                {"op": name, "seconds": _number(op, i, "seconds", 0, MAX_SLEEP_SECONDS, integer=False)}
            )
        else:
            raise _invalid(f"ops[{i}]: unknown op {name!r}; known: invert, grayscale, blur, resize, sleep")
        extra = set(op) - allowed
        if extra:
            raise _invalid(f"ops[{i}] ({name}): unknown field(s) {', '.join(sorted(extra))}")
    return ops


class ImageOpsBackend:
    name = "imageops"

    def __init__(self, image_limits: ImageLimits = DEFAULT_IMAGE_LIMITS) -> None:
        self.image_limits = image_limits

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ImageOpsBackend:
        """GPUQ_IMAGE_FORMATS and GPUQ_IMAGE_MAX_PIXELS: what an input image may be."""
        return cls(ImageLimits.from_env(env))

    def start(self) -> None:
        pass

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def run(self, ctx: JobContext) -> BackendResult:
        payload = ctx.payload
        ref = payload.get("image")
        if not isinstance(ref, str) or not ref.strip():
            raise _invalid("image is required: a URL or an absolute path of the input image")
        fmt = payload.get("format", "png")
        if fmt not in FORMATS:
            raise _invalid(f"format must be 'png' or 'jpeg', got {fmt!r}")
        ops = parse_ops(payload.get("ops"))
        extra = set(payload) - {"image", "ops", "format"}
        if extra:
            raise _invalid(f"unknown payload field(s): {', '.join(sorted(extra))}")

        source = ctx.fetch_input(ref)
        started = time.monotonic()
        check_image(source, self.image_limits, "the input image")  # format and pixels, before decoding
        try:
            with Image.open(source, formats=self.image_limits.formats) as opened:
                image = opened.convert("RGBA" if opened.mode in ("RGBA", "LA", "P") else "RGB")
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise _invalid(f"the input is not an image Pillow can read: {exc}") from exc

        for i, op in enumerate(ops):
            self._check(ctx)
            ctx.report_progress(int(100 * i / max(len(ops), 1)), f"{op['op']} ({i + 1}/{len(ops)})")
            image = self._apply(ctx, image, op)
        self._check(ctx)

        pil_format, content_type, ext = FORMATS[fmt]
        if pil_format == "JPEG" and image.mode != "RGB":
            image = image.convert("RGB")  # JPEG has no alpha
        out = ctx.workdir / f"output.{ext}"
        image.save(out, pil_format)
        return BackendResult(
            outputs=[OutputFile(out, content_type, out.name)],
            metrics={
                "width": image.width,
                "height": image.height,
                "ops": len(ops),
                "backend_seconds": round(time.monotonic() - started, 4),
            },
        )

    @staticmethod
    def _check(ctx: JobContext) -> None:
        if time.monotonic() > ctx.deadline:
            raise JobError(ErrorCode.TIMEOUT, "the job ran past its timeout")
        if ctx.cancelled.is_set():
            raise JobError(ErrorCode.CANCELLED, "the job was stopped")

    def _apply(self, ctx: JobContext, image: Image.Image, op: dict[str, Any]) -> Image.Image:
        name = op["op"]
        if name == "invert":
            if image.mode == "RGBA":  # keep the alpha channel as it is
                r, g, b, a = image.split()
                rgb = ImageOps.invert(Image.merge("RGB", (r, g, b)))
                return Image.merge("RGBA", (*rgb.split(), a))
            return ImageOps.invert(image)
        if name == "grayscale":
            return ImageOps.grayscale(image).convert(image.mode)
        if name == "blur":
            return image.filter(ImageFilter.GaussianBlur(op["radius"]))
        if name == "resize":
            return image.resize((op["width"], op["height"]), Image.Resampling.LANCZOS)
        if name == "sleep":
            # wait in short steps so a cancel or timeout stops the job within a fraction of a second
            end = time.monotonic() + op["seconds"]
            while (left := end - time.monotonic()) > 0:
                if ctx.cancelled.wait(min(left, 0.05)):
                    break
                if time.monotonic() > ctx.deadline:
                    break
            return image
        raise AssertionError(f"unchecked op {name}")
