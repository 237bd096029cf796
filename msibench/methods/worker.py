"""A method that runs in a worker process with its own interpreter (docs/environments.md).

Subclass :class:`WorkerMethod` with the method's name, its capabilities, the method the worker runs (``target``:
a registered name or ``module:Class`` importable in that environment) and the environment's name; register the
subclass like any method. The interpreter is ``-M python=PATH``, else ``$MSIBENCH_ENV_<NAME>``, else
``$MSIBENCH_CACHE/envs/<name>/bin/python``. The runner sees an ordinary method: it writes the images and records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from msibench.cache import cache_dir
from msibench.methods.base import Capabilities, GenerationRequest, Method

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)
STDERR_TAIL = 20


class WorkerError(RuntimeError):
    """The worker process failed to start, died, or broke the protocol; the message has its last stderr lines."""


class WorkerMethod(Method):
    #: What the worker runs, in its environment: a registered name or ``module:Class``.
    target: ClassVar[str] = ""
    #: The environment's name: ``$MSIBENCH_ENV_<NAME>`` or ``$MSIBENCH_CACHE/envs/<name>/bin/python``.
    environment: ClassVar[str] = ""
    declared_capabilities: ClassVar[Capabilities]

    def __init__(self, python: str = "", **options: Any) -> None:
        self.options = {k: str(v) for k, v in options.items()}
        self.python = self._interpreter(python)
        self._described: dict[str, Any] | None = None
        self._proc: subprocess.Popen | None = None
        self._device: str | None = None
        self._tmp = Path(tempfile.mkdtemp(prefix=f"msibench-worker-{self.name}-"))
        self._stderr_path = self._tmp / "worker.stderr"

    def _interpreter(self, python: str) -> str:
        variable = "MSIBENCH_ENV_" + self.environment.upper().replace("-", "_")
        candidates = [
            python,
            os.environ.get(variable, ""),
            str(cache_dir() / "envs" / self.environment / "bin" / "python"),
        ]
        for candidate in candidates:
            if candidate and Path(candidate).is_file():
                return str(Path(candidate).absolute())
        raise ValueError(
            f"{self.name}: no interpreter for its environment {self.environment!r}: pass -M python=PATH, set "
            f"{variable}, or create {candidates[-1]} (docs/environments.md)"
        )

    @property
    def capabilities(self) -> Capabilities:
        return self.declared_capabilities

    def _command(self, *extra: str) -> list[str]:
        options = [a for k, v in sorted(self.options.items()) for a in ("-M", f"{k}={v}")]
        return [self.python, "-m", "msibench.worker", "--method", self.target, *options, *extra]

    def _env(self) -> dict[str, str]:
        repo = str(Path(__file__).resolve().parents[2])  # the msibench checkout, importable by the worker
        return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}

    def config(self) -> dict[str, Any]:
        """The worker-side method's config and the environment's versions (asked of the interpreter once)."""
        if self._described is None:
            done = subprocess.run(self._command("--describe"), capture_output=True, text=True, env=self._env())
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise WorkerError(f"{self.name}: the worker could not describe {self.target}: {last}")
            self._described = json.loads(done.stdout.strip().splitlines()[-1])
        return {"target": self.target, "environment": self.environment, "python": self.python, **self._described}

    # ------------------------------------------------------------------------------------------ the process

    def setup(self, device: str) -> None:
        self._device = str(device)
        self._start()

    def _start(self) -> None:
        stderr = open(self._stderr_path, "ab")  # noqa: SIM115 - the worker holds it
        self._proc = subprocess.Popen(
            self._command("--device", self._device or "cpu"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=self._env(),
        )
        stderr.close()
        ready = self._read()
        if not ready.get("ready"):
            raise WorkerError(f"{self.name}: the worker's setup failed: {ready.get('error')}{self._tail()}")

    def _tail(self) -> str:
        try:
            lines = self._stderr_path.read_text(errors="replace").splitlines()[-STDERR_TAIL:]
        except OSError:
            return ""
        return ("\nworker stderr (last lines):\n" + "\n".join(lines)) if lines else ""

    def _read(self) -> dict[str, Any]:
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            self._proc = None
            raise WorkerError(f"{self.name}: the worker exited (code {code}){self._tail()}")
        try:
            return json.loads(line)
        except json.JSONDecodeError as err:
            raise WorkerError(f"{self.name}: protocol error, not JSON: {line[:200]!r}") from err

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._proc.stdin.write(json.dumps({"stop": True}) + "\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
        self._proc = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # ------------------------------------------------------------------------------------------ generation

    def _png(self, image: Image.Image, kind: str) -> str:
        import io

        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        path = self._tmp / f"{kind}-{hashlib.sha256(data).hexdigest()[:20]}.png"
        if not path.exists():
            path.write_bytes(data)
        return str(path)

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        from PIL import Image

        from msibench.worker import request_to_data

        if self._device is None:
            raise RuntimeError(f"{self.name}: setup(device) must be called before generate()")
        if self._proc is None or self._proc.poll() is not None:
            logger.warning("%s: (re)starting its worker", self.name)
            self._start()
        data = [
            request_to_data(r, [(self._png(s.reference, "ref"), self._png(s.mask, "mask")) for s in r.subjects])
            for r in requests
        ]
        out = [str(self._tmp / f"out-{os.getpid()}-{i}.png") for i in range(len(requests))]
        try:
            self._proc.stdin.write(json.dumps({"requests": data, "out": out}) + "\n")
            self._proc.stdin.flush()
        except OSError as err:  # the worker is gone; the next call restarts it
            self._proc = None
            raise WorkerError(f"{self.name}: the worker is not running: {err}{self._tail()}") from err
        reply = self._read()
        if not reply.get("ok"):
            raise WorkerError(f"{self.name}: {reply.get('error')}")
        images = []
        for path in out:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
            os.unlink(path)
        return images


__all__ = ["WorkerError", "WorkerMethod"]
