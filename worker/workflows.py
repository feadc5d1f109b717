"""ComfyUI workflow templates and their bindings: loading, checking, and filling them in for one job.

Each workflow is two files in `workflows/`:
  NAME.json          the graph in ComfyUI's API format (as "Export (API)" writes it)
  NAME.binding.json  which payload field feeds which node input, the output nodes, the models it needs:

    {
      "description": "…",
      "inputs": {
        "image":  {"type": "image", "required": true, "to": [["1", "image"]]},
        "radius": {"type": "int", "default": 4, "min": 1, "max": 31, "to": [["2", "blur_radius"]]},
        "prompt": {"type": "string", "required": true, "max_length": 2000, "to": [["6", "text"]]}
      },
      "outputs": ["9"],
      "models": [{"name": "x.safetensors", "path": "models/checkpoints/x.safetensors", "url": "https://…"}]
    }

Field types: image (a URL or path, fetched and uploaded by the backend), string (max_length, choices),
int and float (min, max). A field is either required or has a default. "to" lists the [node id, input
name] pairs it sets; one field may feed several inputs. Output nodes must have a `filename_prefix` input,
which the backend replaces with a prefix of the job's own.

A template or binding that is wrong is WORKFLOW_INVALID; a payload that does not fit is INPUT_INVALID.
Both messages name the field or node at fault.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.errors import ErrorCode, JobError

FIELD_TYPES = ("image", "string", "int", "float")
WORKFLOW_FIELD = "workflow"  # the payload field that names the workflow; never bound to a node
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
_FIELD_KEYS = {"type", "to", "required", "default", "min", "max", "max_length", "choices", "description"}

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "workflows"


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    targets: tuple[tuple[str, str], ...]
    required: bool
    default: Any = None
    min: float | None = None
    max: float | None = None
    max_length: int | None = None
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Model:
    name: str  # the file name the graph refers to
    path: str  # where it goes, relative to the ComfyUI directory: models/<folder>/<name>
    url: str  # where to download it from


@dataclass(frozen=True)
class Workflow:
    name: str
    description: str
    graph: dict[str, Any]
    fields: dict[str, Field]
    outputs: tuple[str, ...]
    models: tuple[Model, ...]

    def bound_inputs(self) -> dict[tuple[str, str], str]:
        """(node id, input name) -> the payload field that sets it."""
        return {target: f.name for f in self.fields.values() for target in f.targets}


def _invalid_workflow(name: str, message: str) -> JobError:
    return JobError(ErrorCode.WORKFLOW_INVALID, f"workflow {name!r}: {message}")


def _invalid_input(message: str) -> JobError:
    return JobError(ErrorCode.INPUT_INVALID, message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _check_value(field: Field, value: Any) -> str | None:
    """Why `value` does not fit `field`, or None when it does."""
    if field.type == "image":
        if not isinstance(value, str) or not value.strip():
            return "must be a URL or path (a non-empty string)"
    elif field.type == "string":
        if not isinstance(value, str):
            return "must be a string"
        if field.max_length is not None and len(value) > field.max_length:
            return f"is {len(value)} characters long; the limit is {field.max_length}"
        if field.choices is not None and value not in field.choices:
            return f"must be one of {list(field.choices)}, not {value!r}"
    elif field.type == "int":
        if not _is_int(value):
            return f"must be an integer, not {value!r}"
    elif field.type == "float" and not _is_number(value):
        return f"must be a number, not {value!r}"
    if field.type in ("int", "float"):
        if field.min is not None and value < field.min:
            return f"is {value}; the minimum is {field.min}"
        if field.max is not None and value > field.max:
            return f"is {value}; the maximum is {field.max}"
    return None


def _parse_field(wf: str, name: str, spec: Any, graph: dict[str, Any]) -> Field:
    where = f"input {name!r}"
    if not isinstance(spec, dict):
        raise _invalid_workflow(wf, f"{where} must be an object")
    unknown = set(spec) - _FIELD_KEYS
    if unknown:
        raise _invalid_workflow(wf, f"{where} has unknown keys {sorted(unknown)}")
    kind = spec.get("type")
    if kind not in FIELD_TYPES:
        raise _invalid_workflow(wf, f"{where} has type {kind!r}; expected one of {list(FIELD_TYPES)}")
    targets = spec.get("to")
    if not isinstance(targets, list) or not targets:
        raise _invalid_workflow(wf, f"{where} needs 'to': a list of [node id, input name] pairs")
    pairs: list[tuple[str, str]] = []
    for target in targets:
        if not (isinstance(target, list) and len(target) == 2 and all(isinstance(t, str) for t in target)):
            raise _invalid_workflow(wf, f"{where}: target {target!r} is not a [node id, input name] pair")
        node_id, input_name = target
        node = graph.get(node_id)
        if node is None:
            raise _invalid_workflow(wf, f"{where} feeds node {node_id!r}, which is not in the graph")
        if input_name not in node.get("inputs", {}):
            # The template must carry a placeholder, so a binding cannot name an input the node lacks.
            raise _invalid_workflow(
                wf,
                f"{where} feeds {node['class_type']} node {node_id!r} input {input_name!r}, which it has not",
            )
        pairs.append((node_id, input_name))

    required = spec.get("required", False)
    if not isinstance(required, bool):
        raise _invalid_workflow(wf, f"{where}: 'required' must be true or false")
    if required == ("default" in spec):
        raise _invalid_workflow(wf, f"{where} must be either required or have a default, not both or neither")

    def number(key: str) -> float | None:
        value = spec.get(key)
        if value is not None and not _is_number(value):
            raise _invalid_workflow(wf, f"{where}: {key!r} must be a number")
        return value

    max_length = spec.get("max_length")
    if max_length is not None and (not _is_int(max_length) or max_length < 0):
        raise _invalid_workflow(wf, f"{where}: 'max_length' must be a whole number")
    choices = spec.get("choices")
    if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
        raise _invalid_workflow(wf, f"{where}: 'choices' must be a list of strings")
    field = Field(
        name=name,
        type=kind,
        targets=tuple(pairs),
        required=required,
        default=spec.get("default"),
        min=number("min"),
        max=number("max"),
        max_length=max_length,
        choices=tuple(choices) if choices is not None else None,
    )
    if not required:
        if kind == "image":
            raise _invalid_workflow(wf, f"{where}: an image input cannot have a default")
        problem = _check_value(field, field.default)
        if problem:
            raise _invalid_workflow(wf, f"{where}: the default {problem}")
    return field


def _parse_model(wf: str, spec: Any) -> Model:
    if not isinstance(spec, dict) or not all(isinstance(spec.get(k), str) for k in ("name", "path", "url")):
        raise _invalid_workflow(wf, f"model {spec!r} needs string 'name', 'path' and 'url'")
    path = spec["path"]
    parts = Path(path).parts
    if not path.startswith("models/") or ".." in parts or Path(path).name != spec["name"]:
        raise _invalid_workflow(wf, f"model {spec['name']!r}: path {path!r} must be models/<folder>/<name>")
    return Model(name=spec["name"], path=path, url=spec["url"])


def parse_workflow(name: str, graph: Any, binding: Any) -> Workflow:
    """Check a template and its binding against each other; raise WORKFLOW_INVALID naming what is wrong."""
    if not isinstance(graph, dict) or not graph:
        raise _invalid_workflow(name, "the graph must be a non-empty object of nodes (ComfyUI's API format)")
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise _invalid_workflow(name, f"node {node_id!r} has no class_type (is this the API format?)")
        if not isinstance(node.get("inputs", {}), dict):
            raise _invalid_workflow(name, f"node {node_id!r} has inputs that are not an object")
        for input_name, value in node.get("inputs", {}).items():
            is_link = isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            if is_link and value[0] not in graph:
                raise _invalid_workflow(
                    name, f"node {node_id!r} input {input_name!r} links to missing node {value[0]!r}"
                )
    if not isinstance(binding, dict):
        raise _invalid_workflow(name, "the binding must be an object")
    inputs = binding.get("inputs", {})
    if not isinstance(inputs, dict):
        raise _invalid_workflow(name, "'inputs' must be an object of fields")
    if WORKFLOW_FIELD in inputs:
        raise _invalid_workflow(name, f"{WORKFLOW_FIELD!r} is reserved and cannot be an input")
    fields = {field_name: _parse_field(name, field_name, spec, graph) for field_name, spec in inputs.items()}
    seen: dict[tuple[str, str], str] = {}
    for field in fields.values():
        for target in field.targets:
            if target in seen:
                raise _invalid_workflow(
                    name,
                    f"node {target[0]!r} input {target[1]!r} is fed by both "
                    f"{seen[target]!r} and {field.name!r}",
                )
            seen[target] = field.name

    outputs = binding.get("outputs")
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
        raise _invalid_workflow(name, "'outputs' must list the id of at least one output node")
    for node_id in outputs:
        node = graph.get(node_id)
        if node is None:
            raise _invalid_workflow(name, f"output node {node_id!r} is not in the graph")
        if "filename_prefix" not in node.get("inputs", {}):
            raise _invalid_workflow(
                name, f"output node {node_id!r} ({node['class_type']}) has no filename_prefix"
            )
    models = binding.get("models", [])
    if not isinstance(models, list):
        raise _invalid_workflow(name, "'models' must be a list")
    description = binding.get("description", "")
    return Workflow(
        name=name,
        description=description if isinstance(description, str) else "",
        graph=graph,
        fields=fields,
        outputs=tuple(outputs),
        models=tuple(_parse_model(name, m) for m in models),
    )


def _read_json(wf: str, path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _invalid_workflow(wf, f"cannot read {path.name}: {exc}") from exc


def available(directory: Path = DEFAULT_DIR) -> list[str]:
    """Names of the workflows in `directory` (those with both files)."""
    return sorted(
        p.name.removesuffix(".binding.json")
        for p in directory.glob("*.binding.json")
        if (directory / (p.name.removesuffix(".binding.json") + ".json")).is_file()
    )


def load_workflow(name: Any, directory: Path = DEFAULT_DIR) -> Workflow:
    """Load one workflow by the name a payload gives; an unknown name is the payload's fault."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise _invalid_input(f"'workflow' must name a workflow (letters, digits, _ and -), not {name!r}")
    graph_path = directory / f"{name}.json"
    binding_path = directory / f"{name}.binding.json"
    if not graph_path.is_file() or not binding_path.is_file():
        raise _invalid_input(f"unknown workflow {name!r}; known: {available(directory)}")
    return parse_workflow(name, _read_json(name, graph_path), _read_json(name, binding_path))


def load_all(directory: Path = DEFAULT_DIR) -> dict[str, Workflow]:
    return {name: load_workflow(name, directory) for name in available(directory)}


def validate_payload(wf: Workflow, payload: Any) -> dict[str, Any]:
    """The value of every field (defaults filled in) for a job's payload; INPUT_INVALID names the field."""
    if not isinstance(payload, dict):
        raise _invalid_input("the payload must be a JSON object")
    unknown = sorted(set(payload) - set(wf.fields) - {WORKFLOW_FIELD})
    if unknown:
        raise _invalid_input(
            f"unknown field(s) {unknown} for workflow {wf.name!r}; it takes {sorted(wf.fields)}"
        )
    values: dict[str, Any] = {}
    for field in wf.fields.values():
        if field.name not in payload or payload[field.name] is None:
            if field.required:
                raise _invalid_input(
                    f"field {field.name!r} ({field.type}) is required by workflow {wf.name!r}"
                )
            values[field.name] = field.default
            continue
        value = payload[field.name]
        problem = _check_value(field, value)
        if problem:
            raise _invalid_input(f"field {field.name!r} {problem}")
        values[field.name] = float(value) if field.type == "float" else value
    return values


def build_prompt(wf: Workflow, values: dict[str, Any], output_prefix: str) -> dict[str, Any]:
    """The graph to submit: a copy of the template with the field values set and each output node
    writing under `output_prefix` (image fields must already hold the uploaded file's name)."""
    graph = copy.deepcopy(wf.graph)
    for field in wf.fields.values():
        for node_id, input_name in field.targets:
            graph[node_id]["inputs"][input_name] = values[field.name]
    for i, node_id in enumerate(wf.outputs):
        # One subfolder per job; a suffix per output node so two nodes never share file names.
        graph[node_id]["inputs"]["filename_prefix"] = f"{output_prefix}/out{i if len(wf.outputs) > 1 else ''}"
    return graph
