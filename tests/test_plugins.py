"""Methods from outside the package: ``--method path/to/file.py:Class``, ``--method package.module:Class`` and the
``msibench.methods`` entry points of installed distributions (a tmp dist-info folder on sys.path here); ``ls`` lists
them with their capabilities; ``run.json`` records where the class came from; bad plugins are named, exit 2."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from msibench import exitcodes, registry
from msibench.cli import main

TOY = """
from PIL import Image

from msibench.methods.base import Capabilities, Method


class ToyMethod(Method):
    name = "{name}"

    def __init__(self, shade="40"):
        self.shade = int(shade)

    @property
    def capabilities(self):
        return Capabilities(max_subjects=3, uses_layout=True, uses_zorder=False)

    def config(self):
        return {{"shade": self.shade}}

    def setup(self, device):
        pass

    def generate(self, requests):
        return [Image.new("RGB", (32, 32), (self.shade, r.seed % 256, 0)) for r in requests]


class NotAMethod:
    name = "nope"
"""


def _toy(folder: Path, file: str = "toy_method.py", name: str = "toy") -> Path:
    path = folder / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TOY.format(name=name))
    return path


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _run_args(method: str, run_dir: Path, coco_root: Path) -> list[str]:
    return ["run", "--method", method, "-M", "shade=90", "--track", "single", "--limit", "1", "--run-dir",
            str(run_dir), "--coco-root", str(coco_root), "--device", "cpu", "--no-progress"]  # fmt: skip


def _fake_distribution(site: Path, dist: str, version: str, entries: dict[str, str], package: str | None) -> None:
    """An installed distribution as pip leaves it: NAME-VERSION.dist-info with METADATA and entry_points.txt."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entries.items())
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{lines}")
    if package:
        (info / "top_level.txt").write_text(package + "\n")


def test_a_method_from_a_file_runs_and_run_json_records_file_and_sha256(tmp_path, coco_root):
    plugin = _toy(tmp_path / "plugins")
    spec = f"{plugin}:ToyMethod"
    res = _run(*_run_args(spec, tmp_path / "run", coco_root))
    assert res.exit_code == 0, res.output
    assert "1 generated, 0 failed" in res.output
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["method"] == "toy" and info["fingerprint"]["config"] == {"shade": 90}
    source = info["method_source"]
    assert source["kind"] == "file" and source["file"] == str(plugin.resolve())
    assert source["sha256"] == hashlib.sha256(plugin.read_bytes()).hexdigest()
    assert source["target"] == f"{plugin.resolve()}:ToyMethod"

    # ls lists it with its capabilities, beside the built-ins; weights ls accepts it (it declares no files)
    res = _run("ls", "--method", spec)
    assert res.exit_code == 0, res.output
    line = next(line for line in res.output.splitlines() if line.startswith(spec))
    assert line.split()[1:5] == ["3", "yes", "no", "single,multi"] and "file " in line
    assert any(line.startswith("paste ") for line in res.output.splitlines())
    res = _run("weights", "ls", "--method", spec)
    assert res.exit_code == 0 and "nothing declared" in res.output


def test_a_relative_file_path_and_a_module_path(tmp_path, coco_root, monkeypatch):
    _toy(tmp_path / "pkg_toy", "method.py")
    (tmp_path / "pkg_toy" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    cls, source = registry.resolve_source("pkg_toy.method:ToyMethod")
    assert cls.name == "toy" and source.kind == "module" and source.target == "pkg_toy.method:ToyMethod"
    assert source.sha256 == hashlib.sha256((tmp_path / "pkg_toy" / "method.py").read_bytes()).hexdigest()
    assert source.distribution is None  # importable, not installed

    monkeypatch.chdir(tmp_path)
    cls_file = registry.resolve("pkg_toy/method.py:ToyMethod")
    assert cls_file is not cls  # the file is its own module, not the package's
    res = _run(*_run_args("pkg_toy.method:ToyMethod", tmp_path / "run", coco_root))
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["method_source"]["kind"] == "module"


@pytest.mark.parametrize(
    ("body", "cls", "what"),
    [
        (TOY.format(name="toy"), "NotAMethod", "'NotAMethod' is not a Method subclass"),
        (TOY.format(name="toy"), "Missing", "has no class 'Missing'; Method classes there: ToyMethod"),
        ("import not_a_module_anywhere\n", "ToyMethod", "import failed: ModuleNotFoundError"),
        ("def broken(:\n", "ToyMethod", "import failed: SyntaxError"),
        (TOY.format(name="paste"), "ToyMethod", "has the name 'paste', a duplicate name: the built-in method"),
        (TOY.format(name="toy").replace('    name = "toy"\n', ""), "ToyMethod", "keeps the base name 'method'"),
        (TOY.format(name="toy").replace("def generate", "def _generate"), "ToyMethod", "does not implement generate"),
    ],
)
def test_a_bad_plugin_file_is_named_with_its_class_and_what_is_wrong(tmp_path, body, cls, what):
    plugin = tmp_path / "bad_plugin.py"
    plugin.write_text(body)
    spec = f"{plugin}:{cls}"
    commands = (["run", "--method", spec], ["eval", "--method", spec], ["ls", "--method", spec])
    for args in (*commands, ["weights", "ls", "--method", spec], ["weights", "fetch", "--method", spec]):
        res = _run(*args)
        assert res.exit_code == exitcodes.USAGE, (args, res.output)
        assert str(plugin) in res.output and what in res.output, (args, res.output)
    with pytest.raises(registry.PluginError, match=what.replace("(", r"\(")[:30]):
        registry.resolve(spec)


def test_a_missing_file_or_module_and_an_unknown_name_are_usage_errors(tmp_path):
    res = _run("run", "--method", f"{tmp_path}/nope.py:X")
    assert res.exit_code == exitcodes.USAGE and "nope.py: no such file" in res.output
    res = _run("run", "--method", "no_such_pkg.sub:X")
    assert res.exit_code == exitcodes.USAGE and "module no_such_pkg.sub: import failed" in res.output
    res = _run("run", "--method", "pastee")
    assert res.exit_code == exitcodes.USAGE and "Did you mean: paste" in res.output
    assert "file.py:Class" in res.output  # says how to name a class of one's own


def test_an_installed_entry_point_is_listed_run_and_recorded_with_its_distribution(tmp_path, coco_root, monkeypatch):
    site = tmp_path / "site"
    _toy(site / "toy_plugin", "method.py")
    (site / "toy_plugin" / "__init__.py").write_text("")
    _fake_distribution(site, "toy-plugin", "1.2.3", {"toy": "toy_plugin.method:ToyMethod"}, "toy_plugin")
    monkeypatch.syspath_prepend(str(site))

    res = _run("ls")
    assert res.exit_code == 0, res.output
    line = next(line for line in res.output.splitlines() if line.startswith("toy "))
    assert line.split()[1:5] == ["3", "yes", "no", "single,multi"]
    assert "entry point msibench.methods:toy (toy-plugin 1.2.3: toy_plugin.method:ToyMethod)" in line

    res = _run(*_run_args("toy", tmp_path / "run", coco_root))
    assert res.exit_code == 0, res.output
    source = json.loads((tmp_path / "run" / "run.json").read_text())["method_source"]
    assert source["kind"] == "entry-point" and source["entry_point"] == "msibench.methods:toy"
    assert (source["distribution"], source["version"]) == ("toy-plugin", "1.2.3")
    assert source["target"] == "toy_plugin.method:ToyMethod"


def test_entry_points_with_a_taken_name_are_refused_naming_both(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _toy(site / "toy_plugin", "method.py")
    (site / "toy_plugin" / "__init__.py").write_text("")
    _fake_distribution(site, "toy-plugin", "1.0", {"toy": "toy_plugin.method:ToyMethod"}, "toy_plugin")
    _fake_distribution(site, "other-plugin", "2.0", {"toy": "toy_plugin.method:ToyMethod"}, None)
    _fake_distribution(site, "greedy-plugin", "0.1", {"paste": "toy_plugin.method:ToyMethod"}, None)
    monkeypatch.syspath_prepend(str(site))

    res = _run("run", "--method", "toy")
    assert res.exit_code == exitcodes.USAGE
    assert "duplicate name: 2 installed entry points" in res.output
    assert "toy-plugin 1.0" in res.output and "other-plugin 2.0" in res.output
    res = _run("weights", "ls", "--method", "paste")
    assert res.exit_code == exitcodes.USAGE
    assert "duplicate name" in res.output and "greedy-plugin 0.1" in res.output
    # ls still lists everything, marking the conflicts
    res = _run("ls")
    assert "toy" in res.output and "duplicate name" in res.output


def test_a_class_handed_to_the_api_directly_gets_its_origin_from_its_module():
    from msibench.methods.paste import PasteMethod

    assert registry.origin(PasteMethod).to_json() == {
        "kind": "builtin",
        "spec": "paste",
        "target": "msibench.methods.paste:PasteMethod",
    }
    here = registry.origin(type("Local", (), {"__module__": __name__}))
    assert here.kind == "module" and here.file == __file__


def test_ls_with_a_plugin_file_imports_no_torch(tmp_path):
    import subprocess
    import sys

    plugin = tmp_path / "light.py"
    plugin.write_text(textwrap.dedent(TOY.format(name="light")))
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom msibench.cli import main\n"
        f"res = CliRunner().invoke(main, ['ls', '--method', {str(plugin) + ':ToyMethod'!r}])\n"
        "assert res.exit_code == 0, res.output\nassert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
