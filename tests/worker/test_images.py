"""The one check every input image passes before a backend decodes or uploads it: an allowed format and a
pixel cap, read from the header alone. Against real files, the ComfyUI stand-in and the imageops backend."""

from __future__ import annotations

import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from gpuq.settings import SettingError
from tests.standins.comfyui import ComfyUIStandIn
from worker.backends.base import JobContext
from worker.backends.comfyui import ComfyUIBackend
from worker.backends.imageops import ImageOpsBackend
from worker.errors import ErrorCode, JobError
from worker.inputs import DEFAULT_IMAGE_LIMITS, IMAGE_MAX_PIXELS, ImageLimits, check_image

SIDE = 13_000  # 169 Mpx: about 2 GB as ComfyUI's float32 tensor


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(path: Path, side: int = SIDE) -> Path:
    """A valid 1-bit PNG of side x side pixels, all black: a few tens of KiB on disk."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte, then the packed bits
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    data = zlib.compress(row * side, 9)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
    )
    return path


def eps(path: Path) -> Path:
    """An EPS file: Pillow identifies it from its header, and decoding it runs Ghostscript."""
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nnewpath 0 0 moveto showpage\n%%EOF\n")
    return path


def job(tmp_path: Path, payload: dict[str, object]) -> JobContext:
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return JobContext(
        job_id=5,
        attempt=1,
        queue="images",
        payload=payload,
        workdir=workdir,
        deadline=time.monotonic() + 30,
        cancelled=threading.Event(),
        report_progress=lambda pct, msg: None,
        fetch_input=Path,  # payload paths are local files here
    )


def refused(path: Path, limits: ImageLimits = DEFAULT_IMAGE_LIMITS) -> str:
    with pytest.raises(JobError) as info:
        check_image(path, limits, "the image")
    assert info.value.code is ErrorCode.INPUT_INVALID
    return info.value.message


def test_a_small_file_declaring_169_megapixels_is_refused_from_its_header(tmp_path: Path) -> None:
    bomb = png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 160 * 1024
    with Image.open(bomb) as image:  # what the upload check did before: it passes
        image.verify()
    message = refused(bomb)
    assert "13000x13000, 169000000 pixels, over the limit of 40000000 (GPUQ_IMAGE_MAX_PIXELS)" in message


def test_formats_off_the_list_are_never_identified_so_eps_never_reaches_ghostscript(tmp_path: Path) -> None:
    path = eps(tmp_path / "photo.png")  # the name does not matter; the header does
    with Image.open(path) as image:
        assert image.format == "EPS"  # any-format Pillow would take it, and decode it with Ghostscript
    assert "not an image in an allowed format (PNG, JPEG, WEBP)" in refused(path)
    gif = tmp_path / "a.gif"
    Image.new("P", (4, 4)).save(gif)
    assert "allowed format" in refused(gif)
    assert check_image(gif, ImageLimits(("PNG", "GIF"), 100), "the image") == "GIF"


@pytest.mark.parametrize(("fmt", "suffix"), [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
def test_allowed_formats_within_the_cap_pass(tmp_path: Path, fmt: str, suffix: str) -> None:
    path = tmp_path / f"ok.{suffix}"
    Image.new("RGB", (64, 48), (1, 2, 3)).save(path, fmt)
    assert check_image(path, ImageLimits(), "the image") == fmt
    assert "64x48, 3072 pixels" in refused(path, ImageLimits(max_pixels=3071))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_every_frame_counts_toward_the_cap(tmp_path: Path, fmt: str) -> None:
    # ComfyUI's LoadImage decodes every frame of an animated image into one batch.
    path = tmp_path / f"anim.{fmt.lower()}"
    frames = [Image.new("RGB", (10, 10), (i * 20, 0, 0)) for i in range(12)]
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:])
    assert check_image(path, ImageLimits(max_pixels=1200), "the image") == fmt
    assert "10x10 x 12 frames, 1200 pixels" in refused(path, ImageLimits(max_pixels=1199))


def test_not_an_image_is_refused(tmp_path: Path) -> None:
    page = tmp_path / "page.png"
    page.write_text("<html>not found</html>")
    assert "not an image in an allowed format" in refused(page)


def test_limits_come_from_the_environment_and_bad_values_name_the_variable() -> None:
    assert ImageLimits.from_env({}) == ImageLimits(("PNG", "JPEG", "WEBP"), IMAGE_MAX_PIXELS)
    limits = ImageLimits.from_env({"GPUQ_IMAGE_FORMATS": " png, jpg ,Png", "GPUQ_IMAGE_MAX_PIXELS": "1000"})
    assert limits == ImageLimits(("PNG", "JPEG"), 1000)
    for env, needle in [
        ({"GPUQ_IMAGE_FORMATS": "png,heic9"}, "GPUQ_IMAGE_FORMATS must name image formats Pillow reads"),
        ({"GPUQ_IMAGE_FORMATS": ","}, "GPUQ_IMAGE_FORMATS"),
        ({"GPUQ_IMAGE_MAX_PIXELS": "0"}, "GPUQ_IMAGE_MAX_PIXELS must be at least 1"),
        ({"GPUQ_IMAGE_MAX_PIXELS": "lots"}, "GPUQ_IMAGE_MAX_PIXELS must be a whole number"),
    ]:
        with pytest.raises(SettingError, match=needle):
            ImageLimits.from_env(env)
    backend = ImageOpsBackend.from_env({"GPUQ_IMAGE_MAX_PIXELS": "77"})
    assert backend.image_limits.max_pixels == 77
    comfy = ComfyUIBackend.from_env({"COMFYUI_URL": "http://127.0.0.1:1", "GPUQ_IMAGE_FORMATS": "png"})
    assert comfy.image_limits.formats == ("PNG",)


# -- the backends ----------------------------------------------------------------------------------


@pytest.fixture
def comfyui(tmp_path: Path) -> Iterator[tuple[ComfyUIStandIn, ComfyUIBackend]]:
    with ComfyUIStandIn(tmp_path / "comfy") as server:
        backend = ComfyUIBackend(url=server.url, ready_timeout=15, request_timeout=5)
        backend.start()
        yield server, backend
        backend.close()


@pytest.mark.parametrize("make", [png_bomb, eps])
def test_comfyui_refuses_the_image_before_uploading_it(
    comfyui: tuple[ComfyUIStandIn, ComfyUIBackend], tmp_path: Path, make: object
) -> None:
    server, backend = comfyui
    bad = make(tmp_path / "in.png")  # type: ignore[operator]
    with pytest.raises(JobError) as info:
        backend.run(job(tmp_path, {"workflow": "image_invert", "image": str(bad)}))
    assert info.value.code is ErrorCode.INPUT_INVALID and "field 'image'" in info.value.message
    assert list((server.base_dir / "input").iterdir()) == []  # nothing reached ComfyUI
    assert server.history == {}


def test_imageops_refuses_the_image_before_decoding_it(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(JobError) as info:
        ImageOpsBackend().run(job(tmp_path, {"image": str(png_bomb(tmp_path / "in.png"))}))
    assert info.value.code is ErrorCode.INPUT_INVALID and "13000x13000" in info.value.message
    assert time.monotonic() - started < 5  # refused from the header, not decoded first
    with pytest.raises(JobError, match="allowed format"):
        ImageOpsBackend().run(job(tmp_path, {"image": str(eps(tmp_path / "in.eps"))}))
    small = tmp_path / "small.webp"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(small)
    result = ImageOpsBackend().run(job(tmp_path, {"image": str(small), "ops": [{"op": "invert"}]}))
    with Image.open(result.outputs[0].path) as out:
        assert out.getpixel((0, 0)) == (246, 246, 246)
