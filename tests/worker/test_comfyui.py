"""The ComfyUI backend and the workflow bindings, against the local stand-in of ComfyUI
(tests/standins/comfyui.py) and, when COMFYUI_URL is set, against a real ComfyUI."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from tests.standins.comfyui import CUDA_OOM_MESSAGE, ComfyUIStandIn, Faults
from worker import workflows
from worker.backends.base import JobContext
from worker.backends.comfyui import ComfyUIBackend
from worker.errors import ErrorCode, JobError

REPO = Path(__file__).resolve().parents[2]
FAST = {
    "stall_timeout": 0.5,
    "poll_interval": 0.1,
    "unavailable_timeout": 1.5,
    "cancel_grace": 5.0,
    "progress_interval": 0.0,
    "request_timeout": 5.0,
    "ready_timeout": 15.0,
}


class Job:
    """A JobContext as the worker would build it, recording the progress it is told."""

    def __init__(
        self, tmp_path: Path, payload: dict[str, Any], job_id: int = 1, timeout: float = 30.0
    ) -> None:
        self.progress: list[tuple[int, str | None]] = []
        workdir = tmp_path / f"job{job_id}"
        workdir.mkdir()
        self.ctx = JobContext(
            job_id=job_id,
            attempt=1,
            queue="images",
            payload=payload,
            workdir=workdir,
            deadline=time.monotonic() + timeout,
            cancelled=threading.Event(),
            report_progress=lambda pct, msg: self.progress.append((pct, msg)),
            fetch_input=self.fetch,
        )

    @staticmethod
    def fetch(ref: str) -> Path:
        path = Path(ref)
        if not path.is_file():
            raise JobError(ErrorCode.INPUT_FETCH_FAILED, f"no such input {ref}")
        return path


def make_png(
    path: Path, color: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (16, 12)
) -> Path:
    image = Image.new("RGB", size, color)
    image.putpixel((0, 0), (200, 100, 0))
    image.save(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_error(backend: ComfyUIBackend, job: Job) -> JobError:
    with pytest.raises(JobError) as info:
        backend.run(job.ctx)
    return info.value


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[ComfyUIStandIn]:
    with ComfyUIStandIn(tmp_path / "comfy") as server:
        yield server


@pytest.fixture
def backend(standin: ComfyUIStandIn) -> Iterator[ComfyUIBackend]:
    b = ComfyUIBackend(url=standin.url, **FAST)
    b.start()
    yield b
    b.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_png(tmp_path / "in.png")


# -- a job that works -------------------------------------------------------------------------------


def test_invert_uploads_runs_and_fetches_a_real_output(
    backend: ComfyUIBackend, standin: ComfyUIStandIn, image: Path, tmp_path: Path
) -> None:
    job = Job(tmp_path, {"workflow": "image_invert", "image": str(image)}, job_id=42)
    result = backend.run(job.ctx)

    assert len(result.outputs) == 1
    out = result.outputs[0]
    assert out.content_type == "image/png"
    assert out.path.parent == job.ctx.workdir and out.path.name == out.name
    with Image.open(out.path) as img:
        assert img.size == (16, 12)
        assert img.getpixel((0, 0)) == (54, 155, 255)
        assert img.getpixel((5, 5)) == (245, 235, 225)
    # The upload and the outputs are named after the job, under a folder of its own.
    uploads = [p.name for p in (standin.base_dir / "input").iterdir()]
    assert len(uploads) == 1 and uploads[0].startswith("gpuq-42-1-") and uploads[0].endswith("-image.png")
    saved = list((standin.base_dir / "output" / "gpuq").rglob("*.png"))
    assert [p.parent.name for p in saved] == [uploads[0].removesuffix("-image.png")]
    assert result.metrics["workflow"] == "image_invert"
    assert 0 <= result.metrics["queue_seconds"] < 5 and 0 <= result.metrics["inference_seconds"] < 5
    percents = [p for p, _ in job.progress]
    assert percents == sorted(percents) and percents[0] == 1 and percents[-1] == 100
    assert any(msg and "ImageInvert" in msg for _, msg in job.progress)
    assert standin.history == {}  # the backend removed its prompt from ComfyUI's in-memory history


def test_same_input_twice_gives_each_job_its_own_files(
    backend: ComfyUIBackend, standin: ComfyUIStandIn, image: Path, tmp_path: Path
) -> None:
    for job_id in (1, 2):
        result = backend.run(
            Job(tmp_path, {"workflow": "image_invert", "image": str(image)}, job_id=job_id).ctx
        )
        with Image.open(result.outputs[0].path) as img:
            assert img.getpixel((5, 5)) == (245, 235, 225)
    # Identical graphs would be served from ComfyUI's cache with the old file names: each job has its own.
    folders = sorted(p.parent.name for p in (standin.base_dir / "output" / "gpuq").rglob("*.png"))
    assert len(folders) == 2 and folders[0].startswith("gpuq-1-1-") and folders[1].startswith("gpuq-2-1-")


def test_with_the_servers_base_dir_each_jobs_files_are_removed(
    standin: ComfyUIStandIn, image: Path, tmp_path: Path
) -> None:
    # As on a rented machine: onstart starts ComfyUI and tells the worker its URL and base directory.
    env = {"COMFYUI_URL": standin.url, "COMFYUI_BASE_DIR": str(standin.base_dir)}
    backend = ComfyUIBackend.from_env(env, **FAST)
    try:
        for job_id in (1, 2):
            job = Job(tmp_path, {"workflow": "image_invert", "image": str(image)}, job_id=job_id)
            result = backend.run(job.ctx)
            assert result.outputs[0].path.is_file()  # the worker's copy, in the job's workdir
        assert list((standin.base_dir / "input").iterdir()) == []
        assert not list((standin.base_dir / "output" / "gpuq").rglob("*"))
    finally:
        backend.close()


def test_a_truncated_jpeg_loads_as_in_comfyui(backend: ComfyUIBackend, tmp_path: Path) -> None:
    # ComfyUI loads a truncated image (node_helpers.pillow retries with LOAD_TRUNCATED_IMAGES), and so
    # does the worker's check before upload: the job succeeds.
    full = tmp_path / "full.jpg"
    Image.effect_noise((64, 64), 40).convert("RGB").save(full, quality=90)
    data = full.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(OSError, match="truncated"):
        Image.open(cut).load()
    result = backend.run(Job(tmp_path, {"workflow": "image_invert", "image": str(cut)}, job_id=7).ctx)
    with Image.open(result.outputs[0].path) as img:
        assert img.size == (64, 64)


def test_standin_names_exception_types_as_comfyui_does(standin: ComfyUIStandIn) -> None:
    # Recorded from ComfyUI 0.3.64: LoadImage on a file that is not an image fails the prompt with
    # exception_type "PIL.UnidentifiedImageError" (execution.full_type_name), which the backend reads.
    up = requests.post(
        standin.url + "/upload/image", files={"image": ("notes.png", b"not an image", "image/png")}, timeout=5
    )
    name = up.json()["name"]
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"}},
    }
    prompt_id = requests.post(standin.url + "/prompt", json={"prompt": graph}, timeout=5).json()["prompt_id"]
    deadline = time.monotonic() + 10
    while not (entry := requests.get(f"{standin.url}/history/{prompt_id}", timeout=5).json()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    messages = dict(entry[prompt_id]["status"]["messages"])
    assert messages["execution_error"]["exception_type"] == "PIL.UnidentifiedImageError"


def test_blur_fields_reach_the_graph(backend: ComfyUIBackend, tmp_path: Path) -> None:
    src = Image.new("RGB", (20, 20), (0, 0, 0))
    src.putpixel((10, 10), (255, 255, 255))
    src.save(tmp_path / "dot.png")
    light = backend.run(
        Job(tmp_path, {"workflow": "image_blur", "image": str(tmp_path / "dot.png"), "sigma": 0.1}, 1).ctx
    )
    heavy = backend.run(
        Job(tmp_path, {"workflow": "image_blur", "image": str(tmp_path / "dot.png"), "sigma": 3.0}, 2).ctx
    )
    with Image.open(light.outputs[0].path) as a, Image.open(heavy.outputs[0].path) as b:
        assert a.getpixel((10, 10))[0] > b.getpixel((10, 10))[0]  # more blur spreads the dot further
        assert b.getpixel((12, 10))[0] > 0


# -- the payload and the bindings -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"workflow": "image_blur"}, "'image'"),
        ({"workflow": "image_blur", "image": "x.png", "colour": 1}, "'colour'"),
        ({"workflow": "image_blur", "image": "x.png", "radius": "3"}, "'radius'"),
        ({"workflow": "image_blur", "image": "x.png", "radius": True}, "'radius'"),
        ({"workflow": "image_blur", "image": "x.png", "radius": 32}, "maximum is 31"),
        ({"workflow": "image_blur", "image": "x.png", "sigma": 0.0}, "minimum is 0.1"),
        ({"workflow": "image_blur", "image": ""}, "'image'"),
        ({"workflow": "sdxl_text_to_image", "prompt": "x" * 4001}, "limit is 4000"),
        ({"workflow": "no_such_flow", "image": "x.png"}, "unknown workflow 'no_such_flow'"),
        ({"workflow": "../image_blur"}, "'workflow' must name"),
        ({"image": "x.png"}, "'workflow' must name"),
    ],
)
def test_bad_payloads_fail_before_anything_is_sent(
    payload: dict[str, Any], needle: str, tmp_path: Path
) -> None:
    # Nothing listens here: a payload error must be found without the server.
    backend = ComfyUIBackend(url=f"http://127.0.0.1:{free_port()}", **FAST)
    err = run_error(backend, Job(tmp_path, payload))
    assert err.code is ErrorCode.INPUT_INVALID and not err.retryable
    assert needle in err.message


def test_validate_payload_fills_defaults_and_build_prompt_sets_every_target() -> None:
    wf = workflows.load_workflow("looks_tryon")
    values = workflows.validate_payload(
        wf, {"workflow": "looks_tryon", "avatar": "a", "garment": "g", "prompt": "p", "width": 640}
    )
    assert values["height"] == 1248 and values["steps"] == 20 and values["guidance"] == 4.0
    graph = workflows.build_prompt(wf, values | {"avatar": "up-a.png", "garment": "up-g.png"}, "gpuq/job7")
    assert graph["10"]["inputs"]["image"] == "up-a.png" and graph["20"]["inputs"]["image"] == "up-g.png"
    assert graph["43"]["inputs"]["width"] == 640 and graph["44"]["inputs"]["width"] == 640
    assert graph["30"]["inputs"]["text"] == "p"
    assert graph["50"]["inputs"]["filename_prefix"] == "gpuq/job7/out"
    assert wf.graph["43"]["inputs"]["width"] == 832  # the template itself is untouched


def test_shipped_workflows_are_valid_and_say_what_they_need() -> None:
    loaded = workflows.load_all()
    assert {"image_invert", "image_blur", "sdxl_text_to_image", "looks_tryon"} <= set(loaded)
    assert loaded["image_invert"].models == () and loaded["image_blur"].models == ()
    for name in ("sdxl_text_to_image", "looks_tryon"):
        models = loaded[name].models
        assert models and all(m.url.startswith("https://") and m.path.startswith("models/") for m in models)
        used = json.dumps(loaded[name].graph)
        assert all(f'"{m.name}"' in used for m in models)  # every listed model is one the graph loads
    tryon = loaded["looks_tryon"]
    assert {f.name for f in tryon.fields.values() if f.type == "image"} == {"avatar", "garment"}
    assert tryon.fields["prompt"].required


GRAPH = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
    "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "t"}},
}


@pytest.mark.parametrize(
    ("binding", "needle"),
    [
        (
            {"inputs": {"r": {"type": "int", "default": 1, "to": [["9", "blur_radius"]]}}, "outputs": ["3"]},
            "node '9'",
        ),
        (
            {"inputs": {"r": {"type": "int", "default": 1, "to": [["2", "radius"]]}}, "outputs": ["3"]},
            "'radius'",
        ),
        (
            {
                "inputs": {
                    "r": {"type": "int", "required": True, "default": 1, "to": [["2", "blur_radius"]]}
                },
                "outputs": ["3"],
            },
            "'r'",
        ),
        (
            {
                "inputs": {"r": {"type": "int", "default": 50, "max": 31, "to": [["2", "blur_radius"]]}},
                "outputs": ["3"],
            },
            "the default",
        ),
        (
            {
                "inputs": {"r": {"type": "complex", "default": 1, "to": [["2", "blur_radius"]]}},
                "outputs": ["3"],
            },
            "'complex'",
        ),
        (
            {
                "inputs": {"workflow": {"type": "string", "default": "", "to": [["3", "filename_prefix"]]}},
                "outputs": ["3"],
            },
            "reserved",
        ),
        ({"inputs": {}, "outputs": ["2"]}, "filename_prefix"),
        ({"inputs": {}, "outputs": []}, "'outputs'"),
        (
            {"inputs": {}, "outputs": ["3"], "models": [{"name": "m.bin", "path": "/etc/m.bin", "url": "u"}]},
            "m.bin",
        ),
    ],
)
def test_bad_bindings_are_workflow_invalid(binding: dict[str, Any], needle: str) -> None:
    with pytest.raises(JobError) as info:
        workflows.parse_workflow("t", json.loads(json.dumps(GRAPH)), binding)
    assert info.value.code is ErrorCode.WORKFLOW_INVALID and needle in info.value.message


def test_a_payload_image_that_is_not_an_image_is_input_invalid(
    backend: ComfyUIBackend, tmp_path: Path
) -> None:
    (tmp_path / "page.png").write_text("<html>not found</html>")
    err = run_error(backend, Job(tmp_path, {"workflow": "image_invert", "image": str(tmp_path / "page.png")}))
    assert err.code is ErrorCode.INPUT_INVALID and "'image'" in err.message


# -- ComfyUI's validation errors (HTTP 400) ---------------------------------------------------------


def write_workflow(directory: Path, name: str, graph: dict[str, Any], binding: dict[str, Any]) -> None:
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(graph))
    (directory / f"{name}.binding.json").write_text(json.dumps(binding))


@pytest.fixture
def custom_backend(standin: ComfyUIStandIn, tmp_path: Path) -> ComfyUIBackend:
    flows = tmp_path / "flows"
    image_in = {"type": "image", "required": True, "to": [["1", "image"]]}
    # Our binding allows more than the node does: ComfyUI's own check must catch it.
    loose = {"type": "int", "default": 1, "min": 1, "max": 100, "to": [["2", "blur_radius"]]}
    write_workflow(flows, "loose", GRAPH, {"inputs": {"image": image_in, "radius": loose}, "outputs": ["3"]})
    broken = json.loads(json.dumps(GRAPH))
    broken["2"]["inputs"]["sigma"] = 50.0  # a template value out of range, fed by no field
    write_workflow(flows, "broken", broken, {"inputs": {"image": image_in}, "outputs": ["3"]})
    alien = json.loads(json.dumps(GRAPH))
    alien["2"]["class_type"] = "NoSuchNode"
    write_workflow(flows, "alien", alien, {"inputs": {"image": image_in}, "outputs": ["3"]})
    for path in workflows.DEFAULT_DIR.glob("sdxl_text_to_image*.json"):
        (flows / path.name).write_text(path.read_text())
    return ComfyUIBackend(url=standin.url, workflows_dir=flows, **FAST)


def test_rejected_bound_input_is_input_invalid(
    custom_backend: ComfyUIBackend, image: Path, tmp_path: Path
) -> None:
    err = run_error(custom_backend, Job(tmp_path, {"workflow": "loose", "image": str(image), "radius": 50}))
    assert err.code is ErrorCode.INPUT_INVALID
    assert "field 'radius'" in err.message and "bigger than max of 31" in err.message
    assert "2" in err.details["node_errors"]


def test_rejected_template_value_is_workflow_invalid(
    custom_backend: ComfyUIBackend, image: Path, tmp_path: Path
) -> None:
    err = run_error(custom_backend, Job(tmp_path, {"workflow": "broken", "image": str(image)}))
    assert err.code is ErrorCode.WORKFLOW_INVALID and not err.retryable
    assert "ImageBlur node 2 input sigma" in err.message


def test_unknown_node_class_is_workflow_invalid(
    custom_backend: ComfyUIBackend, image: Path, tmp_path: Path
) -> None:
    err = run_error(custom_backend, Job(tmp_path, {"workflow": "alien", "image": str(image)}))
    assert err.code is ErrorCode.WORKFLOW_INVALID and "NoSuchNode does not exist" in err.message


def test_missing_model_file_is_backend_unavailable(custom_backend: ComfyUIBackend, tmp_path: Path) -> None:
    err = run_error(custom_backend, Job(tmp_path, {"workflow": "sdxl_text_to_image", "prompt": "a red fox"}))
    assert err.code is ErrorCode.BACKEND_UNAVAILABLE and err.retryable  # another worker may have it
    assert "models/checkpoints/sd_xl_base_1.0.safetensors" in err.message


# -- errors while running ---------------------------------------------------------------------------


def test_execution_error_is_backend_error(
    backend: ComfyUIBackend, standin: ComfyUIStandIn, image: Path, tmp_path: Path
) -> None:
    standin.faults = Faults(error_in="ImageInvert", error_type="ValueError", error_message="bad tensor shape")
    err = run_error(backend, Job(tmp_path, {"workflow": "image_invert", "image": str(image)}))
    assert err.code is ErrorCode.BACKEND_ERROR
    assert "ImageInvert (node 2)" in err.message and "bad tensor shape" in err.message


def test_cuda_out_of_memory_is_gpu_oom(
    backend: ComfyUIBackend, standin: ComfyUIStandIn, image: Path, tmp_path: Path
) -> None:
    standin.faults = Faults(
        error_in="ImageInvert", error_type="torch.OutOfMemoryError", error_message=CUDA_OOM_MESSAGE
    )
    err = run_error(backend, Job(tmp_path, {"workflow": "image_invert", "image": str(image)}))
    assert err.code is ErrorCode.GPU_OOM and err.retryable
    assert "CUDA out of memory" in err.message


def test_stalled_socket_falls_back_to_history(
    backend: ComfyUIBackend, standin: ComfyUIStandIn, image: Path, tmp_path: Path
) -> None:
    standin.faults = Faults(stall_after="execution_start", slow={"ImageInvert": 0.3})
    job = Job(tmp_path, {"workflow": "image_invert", "image": str(image)})
    result = backend.run(job.ctx)
    with Image.open(result.outputs[0].path) as img:
        assert img.getpixel((5, 5)) == (245, 235, 225)
    assert not any(msg and "ImageInvert" in msg for _, msg in job.progress)  # the socket said nothing more
    assert result.metrics["inference_seconds"] >= 0.3  # from ComfyUI's own timestamps


def test_server_that_dies_mid_job_is_backend_unavailable(
    backend: ComfyUIBackend, standin: ComfyUIStandIn, image: Path, tmp_path: Path
) -> None:
    standin.faults = Faults(die_in="ImageInvert")
    started = time.monotonic()
    err = run_error(backend, Job(tmp_path, {"workflow": "image_invert", "image": str(image)}))
    assert err.code is ErrorCode.BACKEND_UNAVAILABLE and err.retryable
    assert time.monotonic() - started < 10
    assert not backend.healthy()


def test_server_down_from_the_start(image: Path, tmp_path: Path) -> None:
    backend = ComfyUIBackend(url=f"http://127.0.0.1:{free_port()}", **(FAST | {"ready_timeout": 0.5}))
    with pytest.raises(JobError) as info:
        backend.start()
    assert info.value.code is ErrorCode.BACKEND_UNAVAILABLE
    assert not backend.healthy()
    err = run_error(backend, Job(tmp_path, {"workflow": "image_invert", "image": str(image)}))
    assert err.code is ErrorCode.BACKEND_UNAVAILABLE


def test_prompt_forgotten_by_the_server_is_backend_unavailable(
    backend: ComfyUIBackend, standin: ComfyUIStandIn, image: Path, tmp_path: Path
) -> None:
    # Another job keeps ComfyUI busy; ours waits in the queue, and then the queue is wiped (as a restart
    # would): the backend must notice that the prompt is gone rather than wait for ever.
    standin.faults = Faults(slow={"ImageInvert": 3.0})
    other = threading.Thread(
        target=lambda: run_quietly(
            backend, Job(tmp_path, {"workflow": "image_invert", "image": str(image)}, 1)
        )
    )
    other.start()
    wait_for(lambda: standin.running)
    threading.Timer(
        0.3, lambda: requests.post(standin.url + "/queue", json={"clear": True}, timeout=5)
    ).start()
    err = run_error(backend, Job(tmp_path, {"workflow": "image_invert", "image": str(image)}, 2))
    assert err.code is ErrorCode.BACKEND_UNAVAILABLE and "lost the prompt" in err.message
    other.join(10)


# -- cancel and timeout -----------------------------------------------------------------------------


def run_quietly(backend: ComfyUIBackend, job: Job, box: dict[str, Any] | None = None) -> None:
    try:
        result = backend.run(job.ctx)
        if box is not None:
            box["result"] = result
    except JobError as exc:
        if box is not None:
            box["error"] = exc


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_cancel_interrupts_the_running_prompt(
    backend: ComfyUIBackend, standin: ComfyUIStandIn, image: Path, tmp_path: Path
) -> None:
    standin.faults = Faults(slow={"ImageInvert": 20.0})
    job = Job(tmp_path, {"workflow": "image_invert", "image": str(image)})
    box: dict[str, Any] = {}
    thread = threading.Thread(target=run_quietly, args=(backend, job, box))
    thread.start()
    wait_for(lambda: any(msg and "step" in msg for _, msg in job.progress))  # the slow node reports steps
    job.ctx.cancelled.set()
    thread.join(5)
    assert not thread.is_alive()
    assert box["error"].code is ErrorCode.CANCELLED
    (entry,) = standin.history.values()
    assert [kind for kind, _ in entry["status"]["messages"]][-1] == "execution_interrupted"


def test_cancel_of_a_queued_job_leaves_the_running_one_alone(
    backend: ComfyUIBackend, standin: ComfyUIStandIn, image: Path, tmp_path: Path
) -> None:
    standin.faults = Faults(slow={"ImageInvert": 1.5})
    first, second = (
        Job(tmp_path, {"workflow": "image_invert", "image": str(image)}, 1),
        Job(tmp_path, {"workflow": "image_invert", "image": str(image)}, 2),
    )
    boxes: list[dict[str, Any]] = [{}, {}]
    threads = [
        threading.Thread(target=run_quietly, args=(backend, j, b))
        for j, b in zip((first, second), boxes, strict=True)
    ]
    threads[0].start()
    wait_for(lambda: standin.running)
    threads[1].start()
    wait_for(lambda: standin.queue)  # the second waits behind the first
    second.ctx.cancelled.set()
    for t in threads:
        t.join(10)
    assert boxes[1]["error"].code is ErrorCode.CANCELLED
    assert "result" in boxes[0], boxes[0]  # a global interrupt would have killed the first job
    assert standin.queue == []


def test_deadline_interrupts_and_times_out(
    backend: ComfyUIBackend, standin: ComfyUIStandIn, image: Path, tmp_path: Path
) -> None:
    standin.faults = Faults(slow={"ImageInvert": 20.0})
    started = time.monotonic()
    err = run_error(backend, Job(tmp_path, {"workflow": "image_invert", "image": str(image)}, timeout=1.0))
    assert err.code is ErrorCode.TIMEOUT and err.retryable
    assert time.monotonic() - started < 5


def test_someone_elses_global_interrupt_is_a_retryable_backend_error(
    backend: ComfyUIBackend, standin: ComfyUIStandIn, image: Path, tmp_path: Path
) -> None:
    standin.faults = Faults(slow={"ImageInvert": 20.0})
    threading.Timer(0.5, lambda: requests.post(standin.url + "/interrupt", timeout=5)).start()
    err = run_error(backend, Job(tmp_path, {"workflow": "image_invert", "image": str(image)}))
    assert err.code is ErrorCode.BACKEND_ERROR and err.retryable


# -- a ComfyUI the backend starts and supervises ----------------------------------------------------


def test_supervised_server_is_restarted_after_it_dies(
    tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    comfy_dir = tmp_path / "ComfyUI"
    comfy_dir.mkdir()
    # The stand-in plays ComfyUI's main.py, taking the same flags and using the same folders.
    (comfy_dir / "main.py").write_text(
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\nfrom tests.standins.comfyui import main\nmain()\n"
    )
    faults_file = tmp_path / "faults.json"
    Faults(die_in="ImageInvert").write(faults_file)
    monkeypatch.setenv("COMFY_STANDIN_FAULTS", str(faults_file))
    backend = ComfyUIBackend.from_env(
        {
            "COMFYUI_DIR": str(comfy_dir),
            "COMFYUI_PORT": str(free_port()),
            "COMFYUI_PYTHON": sys.executable,
            "COMFYUI_ARGS": "--cpu",
        },
        **{k: v for k, v in FAST.items() if k != "ready_timeout"},
    )
    try:
        backend.start()
        assert backend.healthy()
        err = run_error(backend, Job(tmp_path, {"workflow": "image_invert", "image": str(image)}, 1))
        assert err.code is ErrorCode.BACKEND_UNAVAILABLE and "exited" in err.message

        Faults().write(faults_file)
        assert backend.healthy()  # found it dead and started a new one
        assert backend.restarts == 1
        result = backend.run(Job(tmp_path, {"workflow": "image_invert", "image": str(image)}, 2).ctx)
        with Image.open(result.outputs[0].path) as img:
            assert img.getpixel((5, 5)) == (245, 235, 225)
        # Its own ComfyUI's disk is kept clean: the job's upload and outputs are gone.
        assert not list((comfy_dir / "input").glob("gpuq-2-*"))
        assert not list((comfy_dir / "output" / "gpuq").glob("gpuq-2-*"))
        assert "--cpu" in (comfy_dir / "gpuq-comfyui.log").read_text() or backend.process is not None
    finally:
        process = backend.process
        backend.close()
    assert process is not None and process.poll() is not None


def test_from_env_needs_a_url_or_a_directory() -> None:
    with pytest.raises(ValueError):
        ComfyUIBackend.from_env({})
    assert ComfyUIBackend.from_env({"COMFYUI_URL": "http://127.0.0.1:8188/"}).url == "http://127.0.0.1:8188"


# -- a real ComfyUI -----------------------------------------------------------------------------------


@pytest.mark.skipif(
    not os.environ.get("COMFYUI_URL"), reason="COMFYUI_URL not set (see README: ComfyUI on CPU)"
)
def test_real_comfyui(tmp_path: Path) -> None:
    backend = ComfyUIBackend.from_env(
        os.environ, ready_timeout=60.0, stall_timeout=5.0, poll_interval=0.5, progress_interval=0.0
    )
    backend.start()
    try:
        image = make_png(tmp_path / "in.png")
        job = Job(tmp_path, {"workflow": "image_invert", "image": str(image)})
        result = backend.run(job.ctx)
        with Image.open(result.outputs[0].path) as img:
            assert img.getpixel((0, 0)) == (54, 155, 255) and img.getpixel((5, 5)) == (245, 235, 225)
        assert result.metrics["inference_seconds"] >= 0
        assert any(msg and "ImageInvert" in msg for _, msg in job.progress)

        err = run_error(
            backend, Job(tmp_path, {"workflow": "image_blur", "image": str(image), "radius": 0}, 2)
        )
        assert err.code is ErrorCode.INPUT_INVALID  # ours, before ComfyUI
        blurred = backend.run(
            Job(tmp_path, {"workflow": "image_blur", "image": str(image), "radius": 2}, 3).ctx
        )
        assert blurred.outputs[0].content_type == "image/png"
    finally:
        backend.close()
