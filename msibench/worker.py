"""A method served in its own environment: ``python -m msibench.worker --method NAME [-M key=value ...]``.

Run by :class:`msibench.methods.worker.WorkerMethod` with the method's own interpreter (see docs/environments.md).
It builds the method, calls ``setup(device)`` once and answers one JSON line per JSON line on stdin:

- first, unasked: ``{"ready": true, "config": ..., "versions": ...}`` (or ``{"ready": false, "error": ...}``);
- per ``{"requests": [...], "out": [png paths]}``: each image written to its path (temp file + ``os.replace``),
  then ``{"ok": true}``; or ``{"ok": false, "error": ...}``.

Everything else (logs, library chatter) goes to stderr. The worker writes no records: the runner in the calling
process does, as for every method. Only msibench's light modules are imported here (no torch unless the method
imports it).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
import traceback
from typing import Any

from msibench.bench.manifest import Reference, Subject, Task
from msibench.methods.base import GenerationRequest, SubjectInput


def task_to_data(task: Task) -> dict[str, Any]:
    return dataclasses.asdict(task)


def task_from_data(data: dict[str, Any]) -> Task:
    subjects = []
    for s in data["subjects"]:
        ref = s["reference"]
        reference = Reference(**{**ref, "crop": tuple(ref["crop"])})
        subjects.append(Subject(**{**s, "box": tuple(s["box"]), "reference": reference}))
    return Task(**{**data, "subjects": tuple(subjects)})


def request_to_data(request: GenerationRequest, reference_paths: list[tuple[str, str]]) -> dict[str, Any]:
    """A request as JSON: the subjects' pixels travel as PNG paths (reference, mask), one pair per subject."""
    return {
        "task": task_to_data(request.task),
        "sample_index": request.sample_index,
        "seed": request.seed,
        "subjects": [
            {
                "category": s.category,
                "category_id": s.category_id,
                "box": list(s.box),
                "z": s.z,
                "reference": ref,
                "mask": mask,
            }  # fmt: skip
            for s, (ref, mask) in zip(request.subjects, reference_paths, strict=True)
        ],
    }


def request_from_data(data: dict[str, Any]) -> GenerationRequest:
    from PIL import Image

    subjects = []
    for s in data["subjects"]:
        with Image.open(s["reference"]) as ref, Image.open(s["mask"]) as mask:
            reference, mask_l = ref.convert("RGB"), mask.convert("L")
        subjects.append(SubjectInput(s["category"], s["category_id"], tuple(s["box"]), s["z"], reference, mask_l))
    return GenerationRequest(task_from_data(data["task"]), data["sample_index"], data["seed"], tuple(subjects))


def versions() -> dict[str, str]:
    """The interpreter and the libraries that decide a method's numbers, as this environment has them."""
    from importlib import metadata

    out = {"python": sys.version.split()[0], "executable": sys.executable}
    for name in ("torch", "diffusers", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def resolve_method(spec: str):
    """A registered name or a ``module:Class`` path."""
    if ":" in spec:
        module, _, name = spec.partition(":")
        return getattr(importlib.import_module(module), name)
    from msibench import registry

    return registry.resolve(spec)


def _send(stream, message: dict[str, Any]) -> None:
    stream.write(json.dumps(message, default=str) + "\n")
    stream.flush()


def _write_png(image, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}.png"
    image.convert("RGB").save(tmp, format="PNG")
    os.replace(tmp, path)


def serve(method, device: str, stdin, stdout) -> None:
    try:
        method.setup(device)
    except Exception as err:
        _send(stdout, {"ready": False, "error": f"{type(err).__name__}: {err}"})
        raise
    _send(stdout, {"ready": True, "config": method.config(), "versions": versions()})
    for line in stdin:
        if not line.strip():
            continue
        message = json.loads(line)
        if message.get("stop"):
            break
        try:
            requests = [request_from_data(r) for r in message["requests"]]
            images = method.generate(requests)
            if len(images) != len(requests):
                raise RuntimeError(f"generate returned {len(images)} images for {len(requests)} requests")
            for image, path in zip(images, message["out"], strict=True):
                _write_png(image, path)
            _send(stdout, {"ok": True})
        except Exception as err:  # the request fails; the worker serves the next one
            traceback.print_exc(file=sys.stderr)
            _send(stdout, {"ok": False, "error": f"{type(err).__name__}: {err}"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msibench.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True, help="registered name or module:Class")
    p.add_argument("-M", dest="options", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="cpu")
    p.add_argument("--describe", action="store_true", help="print the method's config and versions, then exit")
    args = p.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    options = dict(o.split("=", 1) for o in args.options)
    # The protocol owns stdout: anything a library prints goes to stderr instead.
    protocol, sys.stdout = sys.stdout, sys.stderr
    method = resolve_method(args.method)(**options)
    if args.describe:
        _send(protocol, {"config": method.config(), "versions": versions()})
        return 0
    serve(method, args.device, sys.stdin, protocol)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "request_from_data", "request_to_data", "serve", "task_from_data", "task_to_data"]
