"""A local stand-in for ComfyUI's HTTP + websocket API, held to shared/reference/comfyui-api.md and to
what ComfyUI 0.3.64 (`main.py --cpu`) was seen to answer.

It is built on aiohttp, as ComfyUI is, and really runs the model-free nodes it knows (LoadImage,
ImageInvert, ImageBlur, ImageScale, EmptyImage, SaveImage, PreviewImage) with Pillow, so outputs are
real files. A few model nodes (CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage, KSampler,
VAEDecode) are known for validation only: with no model files, ComfyUI rejects their graphs at
validation too. Any other class is unknown, as on a ComfyUI without that node.

Like ComfyUI it validates a prompt before queueing it (same error types and shapes), runs one prompt at
a time on a worker thread, caches node outputs from the previous prompt, sends per-prompt events only to
the prompt's client_id, and writes history just before the final `executing {node: null}`.

Injected faults (`Faults`; in a separate process, a JSON file named by COMFY_STANDIN_FAULTS, re-read
for each prompt): an execution error in a node class (e.g. torch's CUDA out-of-memory), a socket that
stops delivering events after a given one (history still updates), a server that dies when a node
class starts, and slow node classes that report progress and can be interrupted.

Run on its own: python -m tests.standins.comfyui --listen 127.0.0.1 --port 8188 [--base-directory DIR]
(it takes, and mostly ignores, ComfyUI's other flags, so it can stand in as COMFYUI_DIR/main.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import hashlib
import heapq
import json
import logging
import os
import struct
import sys
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from PIL import Image, ImageFile, ImageFilter, ImageOps
from PIL.PngImagePlugin import PngInfo

log = logging.getLogger("comfyui-standin")

VERSION = "0.3.64-standin"
MAX_RESOLUTION = 16384
OOM_TIPS = (
    "This error means you ran out of memory on your GPU.\n\nTIPS: If the workflow worked before you might "
    "have accidentally set the batch_size to a large number."
)
# Real torch's message for a CUDA OOM, for use as Faults.error_message.
CUDA_OOM_MESSAGE = (
    "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 23.64 GiB of which "
    "3.06 MiB is free. Of the allocated memory 22.87 GiB is allocated by PyTorch, and 381.77 MiB is reserved "
    "by PyTorch but unallocated."
)
SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "ddim"]
SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal"]


@dataclass
class Faults:
    error_in: str | None = None  # class_type whose execution raises
    error_type: str = "RuntimeError"  # as ComfyUI reports it: full type name, e.g. "torch.OutOfMemoryError"
    error_message: str = "stand-in failure"
    stall_after: str | None = None  # after sending this event type, the socket delivers nothing more
    die_in: str | None = None  # class_type at whose start the server dies
    slow: dict[str, float] = field(default_factory=dict)  # class_type -> seconds, sent as 10 progress steps

    @classmethod
    def from_file(cls, path: str | Path) -> Faults:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except FileNotFoundError:
            return cls()

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)))


class Interrupted(Exception):
    pass


# class_type -> (required inputs {name: (type, options)}, RETURN_TYPES, OUTPUT_NODE); a type given as a
# list is a combo; "@input", "@checkpoints" are filled in from the directories at validation time.
NODES: dict[str, tuple[dict[str, tuple[Any, dict[str, Any]]], tuple[str, ...], bool]] = {
    "LoadImage": ({"image": ("@input", {"image_upload": True})}, ("IMAGE", "MASK"), False),
    "ImageInvert": ({"image": ("IMAGE", {})}, ("IMAGE",), False),
    "ImageBlur": (
        {
            "image": ("IMAGE", {}),
            "blur_radius": ("INT", {"default": 1, "min": 1, "max": 31, "step": 1}),
            "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}),
        },
        ("IMAGE",),
        False,
    ),
    "ImageScale": (
        {
            "image": ("IMAGE", {}),
            "upscale_method": (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"], {}),
            "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "crop": (["disabled", "center"], {}),
        },
        ("IMAGE",),
        False,
    ),
    "EmptyImage": (
        {
            "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
            "color": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"}),
        },
        ("IMAGE",),
        False,
    ),
    "SaveImage": ({"images": ("IMAGE", {}), "filename_prefix": ("STRING", {"default": "ComfyUI"})}, (), True),
    "PreviewImage": ({"images": ("IMAGE", {})}, (), True),
    # Known for validation only.
    "CheckpointLoaderSimple": ({"ckpt_name": ("@checkpoints", {})}, ("MODEL", "CLIP", "VAE"), False),
    "CLIPTextEncode": (
        {"text": ("STRING", {"multiline": True}), "clip": ("CLIP", {})},
        ("CONDITIONING",),
        False,
    ),
    "EmptyLatentImage": (
        {
            "width": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
            "height": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
        },
        ("LATENT",),
        False,
    ),
    "KSampler": (
        {
            "model": ("MODEL", {}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (SAMPLERS, {}),
            "scheduler": (SCHEDULERS, {}),
            "positive": ("CONDITIONING", {}),
            "negative": ("CONDITIONING", {}),
            "latent_image": ("LATENT", {}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        },
        ("LATENT",),
        False,
    ),
    "VAEDecode": ({"samples": ("LATENT", {}), "vae": ("VAE", {})}, ("IMAGE",), False),
}
CUSTOM_VALIDATION = {"LoadImage": "image"}


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


# ComfyUI holds images as float32 in 0..1 and SaveImage truncates 255 * x to uint8, so its inversion of
# v is not always 255 - v (200 becomes 54): the same arithmetic, value by value.
INVERT_LUT = [
    int(_f32(255.0 * _f32(1.0 - _f32(v / 255.0)))) for v in range(256)
]  # classes with VALIDATE_INPUTS, and the input it checks


def _err(kind: str, message: str, details: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra or {}}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _full_type_name(klass: type) -> str:
    """As ComfyUI's execution.full_type_name: "PIL.UnidentifiedImageError", "ValueError"."""
    if klass.__module__ == "builtins":
        return klass.__qualname__
    return f"{klass.__module__}.{klass.__qualname__}"


def _pillow(fn: Any, arg: Any) -> Any:
    """As ComfyUI's node_helpers.pillow: on a Pillow error, once more with truncated images allowed."""
    try:
        return fn(arg)
    except (OSError, ValueError):  # UnidentifiedImageError is an OSError
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            return fn(arg)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


class ComfyUIStandIn:
    def __init__(
        self,
        base_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults | None = None,
        faults_file: str | None = None,
        exit_on_die: bool = False,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.dirs = {name: self.base_dir / name for name in ("input", "output", "temp")}
        self.checkpoints_dir = self.base_dir / "models" / "checkpoints"
        for d in [*self.dirs.values(), self.checkpoints_dir]:
            d.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port
        self.faults = faults or Faults()
        self.faults_file = faults_file
        self.exit_on_die = exit_on_die
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.client_id: str | None = None  # the running prompt's client, as in ComfyUI's server
        self.last_node_id: str | None = None
        self.number = 0
        self.mutex = threading.RLock()
        self.not_empty = threading.Condition(self.mutex)
        self.queue: list[tuple[Any, ...]] = []
        self.running: dict[int, tuple[Any, ...]] = {}
        self.task_counter = 0
        self.history: dict[str, dict[str, Any]] = {}
        self.interrupt_flag = threading.Event()
        self.cache: dict[str, dict[str, Any]] = {}  # signature -> {"outputs": tuple, "ui": dict | None}
        self.stalled = False
        self.dead = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._messages: asyncio.Queue[tuple[str, Any, str | None]] | None = None
        self._publisher: asyncio.Task[None]
        self._ready = threading.Event()

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ComfyUIStandIn:
        self._thread = threading.Thread(target=self._serve, name="comfyui-standin", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("stand-in did not start")
        self._worker = threading.Thread(
            target=self._prompt_worker, name="comfyui-standin-worker", daemon=True
        )
        self._worker.start()
        return self

    def stop(self) -> None:
        self.dead.set()
        with self.not_empty:
            self.not_empty.notify_all()
        if self.loop is not None and self._runner is not None and self.loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> ComfyUIStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _shutdown(self) -> None:
        for ws in list(self.sockets.values()):
            with contextlib.suppress(Exception):
                await ws.close()
        assert self._runner is not None
        await self._runner.cleanup()
        self._publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._publisher
        asyncio.get_running_loop().call_soon(asyncio.get_running_loop().stop)

    def _serve(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self._messages = asyncio.Queue()
        app = web.Application(client_max_size=100 * 1024 * 1024)
        routes = self._routes()
        app.add_routes(routes)
        api = web.Application(client_max_size=100 * 1024 * 1024)
        api.add_routes(routes)
        app.add_subapp("/api", api)  # ComfyUI serves every route under /api/ as well
        self._runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, self.host, self.port)
        self.loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        self._publisher = self.loop.create_task(self._publish_loop())
        self._ready.set()
        self.loop.run_forever()
        self.loop.close()

    def _die(self) -> None:
        """The server goes away mid-job: connections drop, nothing answers, nothing more runs."""
        log.warning("stand-in dying (injected fault)")
        if self.exit_on_die:
            os._exit(1)
        self.dead.set()
        assert self.loop is not None
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)

    # -- messages ---------------------------------------------------------------------------------

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        if self.stalled or self.dead.is_set() or self.loop is None or self._messages is None:
            return
        self.loop.call_soon_threadsafe(self._messages.put_nowait, (event, data, sid))
        if event == self.faults.stall_after:
            self.stalled = True

    async def _publish_loop(self) -> None:
        assert self._messages is not None
        while True:
            event, data, sid = await self._messages.get()
            targets = list(self.sockets.values()) if sid is None else [self.sockets.get(sid)]
            for ws in targets:
                if ws is None:
                    continue
                with contextlib.suppress(Exception):
                    await ws.send_json({"type": event, "data": data})

    def queue_info(self) -> dict[str, Any]:
        with self.mutex:
            return {"exec_info": {"queue_remaining": len(self.queue) + len(self.running)}}

    def queue_updated(self) -> None:
        self.send_sync("status", {"status": self.queue_info()})

    # -- HTTP -------------------------------------------------------------------------------------

    def _routes(self) -> web.RouteTableDef:
        routes = web.RouteTableDef()

        @routes.get("/ws")
        async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            sid = request.rel_url.query.get("clientId", "") or uuid.uuid4().hex
            self.sockets.pop(sid, None)  # reusing a client id replaces the old socket
            self.sockets[sid] = ws
            try:
                if not self.stalled:
                    await ws.send_json({"type": "status", "data": {"status": self.queue_info(), "sid": sid}})
                    if self.client_id == sid and self.last_node_id is not None:
                        await ws.send_json({"type": "executing", "data": {"node": self.last_node_id}})
                async for msg in ws:
                    if msg.type == WSMsgType.ERROR:
                        break
            finally:
                if self.sockets.get(sid) is ws:
                    self.sockets.pop(sid, None)
            return ws

        @routes.get("/")
        async def root(request: web.Request) -> web.Response:
            return web.Response(text="<html><body>ComfyUI stand-in</body></html>", content_type="text/html")

        @routes.get("/system_stats")
        async def system_stats(request: web.Request) -> web.Response:
            return web.json_response(
                {
                    "system": {
                        "os": os.name,
                        "ram_total": 0,
                        "ram_free": 0,
                        "comfyui_version": VERSION,
                        "python_version": sys.version,
                        "pytorch_version": "none (stand-in)",
                        "embedded_python": False,
                        "argv": sys.argv,
                    },
                    "devices": [
                        {
                            "name": "cpu",
                            "type": "cpu",
                            "index": None,
                            "vram_total": 0,
                            "vram_free": 0,
                            "torch_vram_total": 0,
                            "torch_vram_free": 0,
                        }
                    ],
                }
            )

        @routes.get("/prompt")
        async def get_prompt(request: web.Request) -> web.Response:
            return web.json_response(self.queue_info())

        @routes.post("/prompt")
        async def post_prompt(request: web.Request) -> web.Response:
            data = await request.json()
            if "number" in data:
                number: float = float(data["number"])
            else:
                number = self.number
                if data.get("front"):
                    number = -number
                self.number += 1
            if "prompt" not in data:
                error = _err("no_prompt", "No prompt provided", "No prompt provided")
                return web.json_response({"error": error, "node_errors": {}}, status=400)
            prompt = data["prompt"]
            prompt_id = str(data.get("prompt_id", uuid.uuid4()))
            valid, error, outputs, node_errors = self.validate_prompt(prompt)
            extra_data = data.get("extra_data", {})
            if "client_id" in data:
                extra_data["client_id"] = data["client_id"]
            if not valid:
                return web.json_response({"error": error, "node_errors": node_errors}, status=400)
            with self.not_empty:
                heapq.heappush(self.queue, (number, prompt_id, prompt, extra_data, outputs))
                self.queue_updated()
                self.not_empty.notify()
            return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

        @routes.get("/queue")
        async def get_queue(request: web.Request) -> web.Response:
            with self.mutex:
                running, pending = list(self.running.values()), list(self.queue)
            return web.json_response({"queue_running": running, "queue_pending": pending})

        @routes.post("/queue")
        async def post_queue(request: web.Request) -> web.Response:
            data = await request.json()
            with self.mutex:
                if data.get("clear"):
                    self.queue.clear()
                for prompt_id in data.get("delete", []):
                    self.queue = [item for item in self.queue if item[1] != prompt_id]
                    heapq.heapify(self.queue)
                self.queue_updated()
            return web.Response(status=200)

        @routes.post("/interrupt")
        async def post_interrupt(request: web.Request) -> web.Response:
            try:
                data = await request.json()
            except json.JSONDecodeError:
                data = {}
            prompt_id = data.get("prompt_id")
            if prompt_id:
                with self.mutex:
                    if any(item[1] == prompt_id for item in self.running.values()):
                        self.interrupt_flag.set()
            else:
                self.interrupt_flag.set()
            return web.Response(status=200)

        @routes.post("/free")
        async def post_free(request: web.Request) -> web.Response:
            await request.json()
            return web.Response(status=200)

        @routes.get("/history")
        async def get_history(request: web.Request) -> web.Response:
            with self.mutex:
                return web.json_response(copy.deepcopy(self.history))

        @routes.get("/history/{prompt_id}")
        async def get_history_prompt(request: web.Request) -> web.Response:
            prompt_id = request.match_info["prompt_id"]
            with self.mutex:
                entry = self.history.get(prompt_id)
                return web.json_response({prompt_id: copy.deepcopy(entry)} if entry else {})

        @routes.post("/history")
        async def post_history(request: web.Request) -> web.Response:
            data = await request.json()
            with self.mutex:
                if data.get("clear"):
                    self.history.clear()
                for prompt_id in data.get("delete", []):
                    self.history.pop(prompt_id, None)
            return web.Response(status=200)

        @routes.post("/upload/image")
        async def upload_image(request: web.Request) -> web.Response:
            post = await request.post()
            image = post.get("image")
            if not isinstance(image, web.FileField) or not image.filename:
                return web.Response(status=400)
            upload_type = str(post.get("type") or "input")
            upload_dir = self.dirs.get(upload_type, self.dirs["input"])
            subfolder = str(post.get("subfolder", ""))
            folder = (upload_dir / os.path.normpath(subfolder)).resolve()
            filename = image.filename
            path = (folder / filename).resolve()
            if os.path.commonpath((upload_dir.resolve(), path)) != str(upload_dir.resolve()):
                return web.Response(status=400)
            folder.mkdir(parents=True, exist_ok=True)
            body = image.file.read()
            if str(post.get("overwrite")) not in ("true", "1"):
                stem, suffix = os.path.splitext(filename)
                i = 1
                # A clashing name gets " (1)", unless the bytes are the same (then the file is reused).
                while path.exists() and path.read_bytes() != body:
                    filename = f"{stem} ({i}){suffix}"
                    path = folder / filename
                    i += 1
            path.write_bytes(body)
            return web.json_response({"name": filename, "subfolder": subfolder, "type": upload_type})

        @routes.get("/view")
        async def view(request: web.Request) -> web.StreamResponse:
            query = request.rel_url.query
            filename = query.get("filename")
            if filename is None:
                return web.Response(status=404)
            if not filename or filename[0] == "/" or ".." in filename:
                return web.Response(status=400)
            base = self.dirs.get(query.get("type", "output"))
            if base is None:
                return web.Response(status=400)
            folder = base
            if "subfolder" in query:
                folder = (base / query["subfolder"]).resolve()
                if os.path.commonpath((str(folder), str(base.resolve()))) != str(base.resolve()):
                    return web.Response(status=403)
            path = folder / os.path.basename(filename)
            if not path.is_file():
                return web.Response(status=404)
            return web.FileResponse(path, headers={"Content-Disposition": f'filename="{path.name}"'})

        return routes

    # -- validation (mirrors execution.validate_prompt / validate_inputs) ---------------------------

    def _input_spec(self, class_type: str) -> dict[str, tuple[Any, dict[str, Any]]]:
        spec = {}
        for name, (kind, options) in NODES[class_type][0].items():
            if kind == "@input":
                kind = sorted(p.name for p in self.dirs["input"].iterdir() if p.is_file())
            elif kind == "@checkpoints":
                kind = sorted(p.name for p in self.checkpoints_dir.iterdir() if p.is_file())
            spec[name] = (kind, options)
        return spec

    def validate_prompt(self, prompt: Any) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
        outputs: list[str] = []
        for node_id, node in prompt.items():
            if "class_type" not in node:
                error = _err(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'",
                )
                return False, error, [], {}
            if node["class_type"] not in NODES:
                error = _err(
                    "invalid_prompt",
                    f"Cannot execute because node {node['class_type']} does not exist.",
                    f"Node ID '#{node_id}'",
                )
                return False, error, [], {}
            if NODES[node["class_type"]][2]:
                outputs.append(node_id)
        if not outputs:
            return False, _err("prompt_no_outputs", "Prompt has no outputs", ""), [], {}
        good: list[str] = []
        output_errors: list[dict[str, Any]] = []
        node_errors: dict[str, Any] = {}
        validated: dict[str, tuple[bool, list[dict[str, Any]]]] = {}
        for output in outputs:
            try:
                ok, reasons = self._validate_inputs(prompt, output, validated)
            except Exception as exc:
                ok = False
                reasons = [
                    _err(
                        "exception_during_validation",
                        "Exception when validating node",
                        str(exc),
                        {
                            "exception_type": _full_type_name(type(exc)),
                            "traceback": traceback.format_tb(exc.__traceback__),
                        },
                    )
                ]
                validated[output] = (False, reasons)
            if ok:
                good.append(output)
                continue
            output_errors += reasons
            for node_id, (node_ok, node_reasons) in validated.items():
                # Nodes downstream of a bad one are invalid without reasons of their own: not reported.
                if not node_ok and node_reasons:
                    entry = node_errors.setdefault(
                        node_id,
                        {
                            "errors": node_reasons,
                            "dependent_outputs": [],
                            "class_type": prompt[node_id]["class_type"],
                        },
                    )
                    entry["dependent_outputs"].append(output)
        if not good:
            details = "\n".join(f"{e['message']}: {e['details']}" for e in output_errors)
            error = _err("prompt_outputs_failed_validation", "Prompt outputs failed validation", details)
            return False, error, [], node_errors
        return True, None, good, node_errors

    def _validate_inputs(
        self, prompt: dict[str, Any], node_id: str, validated: dict[str, tuple[bool, list[dict[str, Any]]]]
    ) -> tuple[bool, list[dict[str, Any]]]:
        if node_id in validated:
            return validated[node_id]
        node = prompt[node_id]
        inputs = node.get("inputs", {})
        class_type = node["class_type"]
        errors: list[dict[str, Any]] = []
        valid = True
        custom = CUSTOM_VALIDATION.get(class_type)
        for name, (kind, options) in self._input_spec(class_type).items():
            info = [kind, options]
            if name not in inputs:
                errors.append(
                    _err("required_input_missing", "Required input is missing", name, {"input_name": name})
                )
                continue
            value = inputs[name]
            if isinstance(value, list):
                if len(value) != 2:
                    errors.append(
                        _err(
                            "bad_linked_input",
                            "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                            name,
                            {"input_name": name, "input_config": info, "received_value": value},
                        )
                    )
                    continue
                source_id, slot = value
                received = NODES[prompt[source_id]["class_type"]][1][slot]
                if received != kind and "*" not in (received, kind):
                    errors.append(
                        _err(
                            "return_type_mismatch",
                            "Return type mismatch between linked nodes",
                            f"{name}, received_type({received}) mismatch input_type({kind})",
                            {
                                "input_name": name,
                                "input_config": info,
                                "received_type": received,
                                "linked_node": value,
                            },
                        )
                    )
                    continue
                if not self._validate_inputs(prompt, source_id, validated)[0]:
                    valid = False
                continue
            try:
                if kind == "INT":
                    value = int(value)
                elif kind == "FLOAT":
                    value = float(value)
                elif kind == "STRING":
                    value = str(value)
                inputs[name] = value
            except (TypeError, ValueError) as exc:
                errors.append(
                    _err(
                        "invalid_input_type",
                        f"Failed to convert an input value to a {kind} value",
                        f"{name}, {value}, {exc}",
                        {
                            "input_name": name,
                            "input_config": info,
                            "received_value": value,
                            "exception_message": str(exc),
                        },
                    )
                )
                continue
            if name == custom:
                continue  # VALIDATE_INPUTS takes over the range and list checks for this input
            extra = {"input_name": name, "input_config": info, "received_value": value}
            if "min" in options and value < options["min"]:
                errors.append(
                    _err(
                        "value_smaller_than_min",
                        f"Value {value} smaller than min of {options['min']}",
                        name,
                        extra,
                    )
                )
                continue
            if "max" in options and value > options["max"]:
                errors.append(
                    _err(
                        "value_bigger_than_max",
                        f"Value {value} bigger than max of {options['max']}",
                        name,
                        extra,
                    )
                )
                continue
            if isinstance(kind, list) and value not in kind:
                listing = f"(list of length {len(kind)})" if len(kind) > 20 else str(kind)
                errors.append(
                    _err(
                        "value_not_in_list", "Value not in list", f"{name}: '{value}' not in {listing}", extra
                    )
                )
                continue
        image = inputs.get("image")
        if (
            class_type == "LoadImage"
            and isinstance(image, str)
            and not (self.dirs["input"] / image).is_file()
        ):
            errors.append(
                _err(
                    "custom_validation_failed",
                    "Custom validation failed for node",
                    f"image - Invalid image file: {inputs['image']}",
                    {"input_name": "image"},
                )
            )
        result = (not errors and valid, errors)
        validated[node_id] = result
        return result

    # -- execution (mirrors main.prompt_worker and execution.PromptExecutor) -------------------------

    def _prompt_worker(self) -> None:
        while not self.dead.is_set():
            with self.not_empty:
                while not self.queue and not self.dead.is_set():
                    self.not_empty.wait(0.5)
                if self.dead.is_set():
                    return
                item = heapq.heappop(self.queue)
                item_id = self.task_counter
                self.task_counter += 1
                self.running[item_id] = copy.deepcopy(item)
                self.queue_updated()
            number, prompt_id, prompt, extra_data, outputs = item
            if self.faults_file:
                self.faults = Faults.from_file(self.faults_file)
            self.stalled = False
            success, history_result, messages = self._execute(prompt, prompt_id, extra_data, outputs)
            if self.dead.is_set():
                return
            with self.mutex:
                self.running.pop(item_id)
                self.history[prompt_id] = {
                    "prompt": [number, prompt_id, prompt, extra_data, outputs],
                    "outputs": history_result["outputs"],
                    "status": {
                        "status_str": "success" if success else "error",
                        "completed": success,
                        "messages": messages,
                    },
                    "meta": history_result["meta"],
                }
                self.queue_updated()
            if self.client_id is not None:
                self.send_sync("executing", {"node": None, "prompt_id": prompt_id}, self.client_id)

    def _signature(self, prompt: dict[str, Any], node_id: str) -> str:
        node = prompt[node_id]
        parts: dict[str, Any] = {"class_type": node["class_type"]}
        for name, value in sorted(node.get("inputs", {}).items()):
            if isinstance(value, list) and len(value) == 2:
                parts[name] = [self._signature(prompt, value[0]), value[1]]
            else:
                parts[name] = value
        if node["class_type"] == "LoadImage":  # IS_CHANGED: the file's hash
            path = self.dirs["input"] / str(node["inputs"].get("image"))
            parts["changed"] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def _order(self, prompt: dict[str, Any], outputs: list[str]) -> list[str]:
        order: list[str] = []

        def visit(node_id: str) -> None:
            if node_id in order:
                return
            for value in prompt[node_id].get("inputs", {}).values():
                if isinstance(value, list) and len(value) == 2:
                    visit(value[0])
            order.append(node_id)

        for output in outputs:
            visit(output)
        return order

    def _execute(
        self, prompt: dict[str, Any], prompt_id: str, extra_data: dict[str, Any], outputs: list[str]
    ) -> tuple[bool, dict[str, Any], list[list[Any]]]:
        self.interrupt_flag.clear()
        self.client_id = extra_data.get("client_id")
        messages: list[list[Any]] = []

        def add_message(event: str, data: dict[str, Any], broadcast: bool) -> None:
            data = {**data, "timestamp": _now_ms()}
            messages.append([event, data])
            if self.client_id is not None or broadcast:
                self.send_sync(event, data, self.client_id)

        add_message("execution_start", {"prompt_id": prompt_id}, broadcast=False)
        order = self._order(prompt, outputs)
        signatures = {node_id: self._signature(prompt, node_id) for node_id in order}
        cached = [
            node_id for node_id in prompt if node_id in signatures and signatures[node_id] in self.cache
        ]
        add_message("execution_cached", {"nodes": cached, "prompt_id": prompt_id}, broadcast=False)
        results: dict[str, dict[str, Any]] = {}
        ui_outputs: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        executed: list[str] = []
        states: dict[str, dict[str, Any]] = {}
        success = True
        for node_id in order:
            class_type = prompt[node_id]["class_type"]
            cached_result = self.cache.get(signatures[node_id])
            if cached_result is not None:
                results[node_id] = cached_result
                if cached_result["ui"] is not None and self.client_id is not None:
                    self.send_sync(
                        "executed",
                        {
                            "node": node_id,
                            "display_node": node_id,
                            "output": cached_result["ui"],
                            "prompt_id": prompt_id,
                        },
                        self.client_id,
                    )
            else:
                try:
                    if self.interrupt_flag.is_set():
                        raise Interrupted()
                    states[node_id] = self._state(node_id, prompt_id, 0.0, "running")
                    self.send_sync(
                        "progress_state",
                        {"prompt_id": prompt_id, "nodes": copy.deepcopy(states)},
                        self.client_id,
                    )
                    self.last_node_id = node_id
                    self.send_sync(
                        "executing",
                        {"node": node_id, "display_node": node_id, "prompt_id": prompt_id},
                        self.client_id,
                    )
                    results[node_id] = self._run_node(prompt, node_id, results, prompt_id)
                    if self.dead.is_set():
                        return False, {"outputs": {}, "meta": {}}, messages
                except Interrupted:
                    add_message(
                        "execution_interrupted",
                        {
                            "prompt_id": prompt_id,
                            "node_id": node_id,
                            "node_type": class_type,
                            "executed": executed,
                        },
                        broadcast=True,
                    )
                    success = False
                    break
                except Exception as exc:
                    exception_type = getattr(exc, "comfy_type", None) or _full_type_name(type(exc))
                    tips = OOM_TIPS if exception_type.endswith("OutOfMemoryError") else ""
                    add_message(
                        "execution_error",
                        {
                            "prompt_id": prompt_id,
                            "node_id": node_id,
                            "node_type": class_type,
                            "executed": executed,
                            "exception_message": f"{exc}\n{tips}",
                            "exception_type": exception_type,
                            "traceback": traceback.format_tb(exc.__traceback__),
                            "current_inputs": {},
                            "current_outputs": list(results),
                        },
                        broadcast=False,
                    )
                    success = False
                    break
                if results[node_id]["ui"] is not None:
                    self.send_sync(
                        "executed",
                        {
                            "node": node_id,
                            "display_node": node_id,
                            "output": results[node_id]["ui"],
                            "prompt_id": prompt_id,
                        },
                        self.client_id,
                    )
                states[node_id] = self._state(node_id, prompt_id, 1.0, "finished")
                self.send_sync(
                    "progress_state", {"prompt_id": prompt_id, "nodes": copy.deepcopy(states)}, self.client_id
                )
                executed.append(node_id)
            if results[node_id]["ui"] is not None:
                ui_outputs[node_id] = results[node_id]["ui"]
                meta[node_id] = {
                    "node_id": node_id,
                    "display_node": node_id,
                    "parent_node": None,
                    "real_node_id": node_id,
                }
        else:
            add_message("execution_success", {"prompt_id": prompt_id}, broadcast=False)
        # Keep what this prompt used, as ComfyUI's classic cache does after clean_unused().
        self.cache = {signatures[n]: results[n] for n in results}
        self.last_node_id = None
        return success, {"outputs": ui_outputs, "meta": meta}, messages

    @staticmethod
    def _state(node_id: str, prompt_id: str, value: float, state: str) -> dict[str, Any]:
        return {
            "value": value,
            "max": 1.0,
            "state": state,
            "node_id": node_id,
            "prompt_id": prompt_id,
            "display_node_id": node_id,
            "parent_node_id": None,
            "real_node_id": node_id,
        }

    def _run_node(
        self, prompt: dict[str, Any], node_id: str, results: dict[str, dict[str, Any]], prompt_id: str
    ) -> dict[str, Any]:
        node = prompt[node_id]
        class_type = node["class_type"]
        args: dict[str, Any] = {}
        for name, value in node.get("inputs", {}).items():
            if isinstance(value, list) and len(value) == 2:
                args[name] = results[value[0]]["outputs"][value[1]]
            else:
                args[name] = value
        faults = self.faults
        if faults.die_in == class_type:
            self._die()
            return {"outputs": (), "ui": None}
        seconds = faults.slow.get(class_type, 0.0)
        if seconds:
            steps = 10
            for step in range(1, steps + 1):
                # Like a sampler: interrupts are noticed between steps, and each step reports progress.
                if self.interrupt_flag.wait(seconds / steps):
                    raise Interrupted()
                progress = {"value": step, "max": steps, "prompt_id": prompt_id, "node": node_id}
                self.send_sync("progress", progress, self.client_id)
        if faults.error_in == class_type:
            exc = RuntimeError(faults.error_message)
            exc.comfy_type = faults.error_type  # type: ignore[attr-defined]
            raise exc
        images: list[Image.Image] = args.get("image") or args.get("images") or []
        ui = None
        if class_type == "LoadImage":
            img = _pillow(Image.open, self.dirs["input"] / args["image"])  # a bad file raises, as in ComfyUI
            img = _pillow(ImageOps.exif_transpose, img)  # reads the pixels: a truncated file loads
            outputs: tuple[Any, ...] = ([img.convert("RGB")], None)
        elif class_type == "ImageInvert":
            outputs = ([i.point(INVERT_LUT * len(i.getbands())) for i in images],)
        elif class_type == "ImageBlur":
            outputs = ([i.filter(ImageFilter.GaussianBlur(radius=args["sigma"])) for i in images],)
        elif class_type == "ImageScale":
            outputs = ([i.resize((args["width"] or i.width, args["height"] or i.height)) for i in images],)
        elif class_type == "EmptyImage":
            c = args["color"]
            color = ((c >> 16) & 0xFF, (c >> 8) & 0xFF, c & 0xFF)
            outputs = (
                [Image.new("RGB", (args["width"], args["height"]), color) for _ in range(args["batch_size"])],
            )
        elif class_type in ("SaveImage", "PreviewImage"):
            kind = "output" if class_type == "SaveImage" else "temp"
            prefix = args.get("filename_prefix", "ComfyUI")
            if kind == "temp":
                prefix += "_temp_" + uuid.uuid4().hex[:5]
            ui = {"images": self._save(images, prefix, kind, prompt)}
            outputs = ()
        else:
            raise RuntimeError(f"the ComfyUI stand-in cannot run {class_type} (no models here)")
        return {"outputs": outputs, "ui": ui}

    def _save(
        self, images: list[Image.Image], prefix: str, kind: str, prompt: dict[str, Any]
    ) -> list[dict[str, str]]:
        """SaveImage's naming: subfolder from the prefix, then NAME_00001_.png counting up."""
        base = self.dirs[kind]
        subfolder = os.path.dirname(os.path.normpath(prefix))
        name = os.path.basename(os.path.normpath(prefix))
        folder = (base / subfolder).resolve()
        if os.path.commonpath((str(base.resolve()), str(folder))) != str(base.resolve()):
            raise Exception("**** ERROR: Saving image outside the output folder is not allowed.")
        folder.mkdir(parents=True, exist_ok=True)
        counters = [
            int(p.name[len(name) + 1 :].split("_")[0])
            for p in folder.iterdir()
            if p.name.startswith(name + "_") and p.name[len(name) + 1 :].split("_")[0].isdigit()
        ]
        counter = max(counters, default=0) + 1
        pnginfo = PngInfo()  # SaveImage embeds the graph in the PNG
        pnginfo.add_text("prompt", json.dumps(prompt))
        saved = []
        for image in images:
            filename = f"{name}_{counter:05}_.png"
            image.save(folder / filename, pnginfo=pnginfo, compress_level=4)
            saved.append({"filename": filename, "subfolder": subfolder, "type": kind})
            counter += 1
        return saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--base-directory", default=None)
    args, _ignored = parser.parse_known_args(argv)  # ComfyUI's other flags (--cpu, ...) mean nothing here
    logging.basicConfig(level=logging.INFO)
    base = Path(args.base_directory or os.getcwd())
    standin = ComfyUIStandIn(
        base, args.listen, args.port, faults_file=os.environ.get("COMFY_STANDIN_FAULTS"), exit_on_die=True
    )
    standin.start()
    print(f"To see the GUI go to: {standin.url}", flush=True)
    try:
        while not standin.dead.wait(1):
            pass
    except KeyboardInterrupt:
        pass
    standin.stop()


if __name__ == "__main__":
    main()
