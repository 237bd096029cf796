from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from baselines.uno import FLUX_ENV, LORA_ENV, UNOMethod
from msibench.methods.base import GenerationRequest, SubjectInput, WeightsUnavailableError
from msibench.records import read_records
from msibench.runner import run_method

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = {"resolution": 32, "steps": 2, "ref_long_side_single": 64, "ref_long_side_multi": 48, "dtype": "float32"}


@pytest.fixture(autouse=True)
def _no_weights_env(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv(FLUX_ENV, raising=False)
    monkeypatch.delenv(LORA_ENV, raising=False)
    # A hub cache of our own: a machine holding the real 24 GB FLUX.1-dev must not load it in a unit test.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The four hub repositories, laid out as on the hub, with tiny random weights in the official layouts."""
    from baselines.testing import tiny_uno_folders

    return tiny_uno_folders(tmp_path_factory.mktemp("uno-hub"), seed=0)


@pytest.fixture(scope="module")
def method(folders) -> UNOMethod:
    sources = {"flux": "flux", "lora": "uno", "t5": "t5", "clip": "clip"}
    m = UNOMethod(**{option: str(folders[name]) for option, name in sources.items()}, **TINY)
    m.setup("cpu")
    return m


def _subject(color, size=(50, 40)) -> SubjectInput:
    from PIL import Image

    image = Image.new("RGB", size, (255, 255, 255))
    image.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), color), (size[0] // 4, size[1] // 4))
    return SubjectInput("dog", 18, (0.1, 0.1, 0.6, 0.6), 0, image, image.convert("L"))


def _request(subjects, seed=5, task_id="t0") -> GenerationRequest:
    task = SimpleNamespace(id=task_id, prompt="a photo of a dog on the table", background="")
    return GenerationRequest(task, 0, seed, tuple(subjects))


# ----------------------------------------------------------------------------------------------- light


def test_listing_builds_the_method_without_torch():
    code = (
        "import sys; from msibench import registry; m = registry.build('uno'); c = m.capabilities; "
        "caps = (c.max_subjects, c.uses_layout, c.uses_zorder, c.tracks); "
        "assert caps == (4, False, False, ('single', 'multi')), caps; "
        "f = m.config()['flux']; assert f == {'source': 'black-forest-labs/FLUX.1-dev', 'revision': 'main'}, f; "
        "heavy = [n for n in ('torch', 'diffusers', 'transformers') if n in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_official_defaults_and_fingerprint(folders):
    cfg = UNOMethod().config()
    # bytedance/UNO@d305981 inference.py:43-61: 512 px, 25 steps, guidance 4, bfloat16 (pipeline.py:255-258).
    assert (cfg["steps"], cfg["guidance"], cfg["resolution"], cfg["dtype"]) == (25, 4.0, 512, "bfloat16")
    # inference.py:94-95: 512 px long side for one reference, 320 for more.
    assert cfg["reference_long_side"] == {"one": 512, "more": 320}
    assert cfg["lora"] == {"source": "bytedance-research/UNO", "revision": "main"}

    variants = [{}, {"steps": "20"}, {"guidance": "3.5"}, {"resolution": "704"}, {"dtype": "float32"}]
    variants += [{"ref_long_side_multi": "384"}, {"lora_revision": "abc"}]
    assert len({UNOMethod(**v).fingerprint_hash() for v in variants}) == len(variants)
    # A local LoRA is identified by its content.
    local = UNOMethod(lora=str(folders["uno"])).config()["lora"]
    assert local["source"] == str(folders["uno"].resolve()) and len(local["sha256"]) == 64

    with pytest.raises(ValueError, match="multiple of 16"):
        UNOMethod(resolution=520)
    with pytest.raises(ValueError, match="dtype"):
        UNOMethod(dtype="float8")
    with pytest.raises(ValueError, match="unknown option 'step'"):
        UNOMethod(step=3)


def test_missing_weights_name_what_to_get(tmp_path, monkeypatch, folders):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as err:
        UNOMethod().setup("cpu")
    message = str(err.value)
    for needed in ("black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors", "msibench weights fetch --method uno"):
        assert needed in message, (needed, message)
    assert "-M flux=DIR" in message and FLUX_ENV in message

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsUnavailableError, match=r"empty/dit_lora\.safetensors does not exist.*-M lora=DIR"):
        UNOMethod(flux=str(folders["flux"]), lora=str(empty))._files()
    with pytest.raises(WeightsUnavailableError, match=r"empty/flux1-dev\.safetensors does not exist.*-M flux=DIR"):
        UNOMethod(flux=str(empty))._files()


def test_weights_are_declared_for_fetch():
    files = {(w.repo_id, f) for w in UNOMethod.weights for f in w.files}
    for needed in [
        ("black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors"),
        ("black-forest-labs/FLUX.1-dev", "ae.safetensors"),
        ("bytedance-research/UNO", "dit_lora.safetensors"),
        ("openai/clip-vit-large-patch14", "model.safetensors"),
    ]:
        assert needed in files
    assert any(w.repo_id == "xlabs-ai/xflux_text_encoders" for w in UNOMethod.weights)


# ---------------------------------------------------------------------------------------- key mapping


def test_real_size_layouts_map_onto_our_transformer():
    """The FLUX.1-dev + rank-512 LoRA key list (12.86 G parameters, checked against the official modules by
    parity/uno.py) maps onto every parameter of our transformer with the same element count, on meta tensors."""
    import math

    import torch

    from baselines import uno_modules as m

    config = m.FLUX_DEV_TRANSFORMER
    shapes = {**m.official_flux_shapes(config), **m.official_lora_shapes(config, 512)}
    assert len(shapes) == 1084
    assert sum(math.prod(s) for s in shapes.values()) == 12_857_709_632
    flux = {k: torch.empty(s, device="meta") for k, s in m.official_flux_shapes(config).items()}
    lora = {k: torch.empty(s, device="meta") for k, s in m.official_lora_shapes(config, 512).items()}
    mapped = m.transformer_state_dict(flux, lora, config["num_layers"], config["num_single_layers"])
    ours = m.build_transformer(config, 512).state_dict()
    assert set(mapped) == set(ours)
    assert all(tuple(mapped[k].shape) == tuple(v.shape) for k, v in ours.items())


def test_a_missing_or_extra_key_is_named():
    import torch

    from baselines import uno_modules as m

    config = m.tiny_transformer_config()
    flux = {k: torch.zeros(s) for k, s in m.official_flux_shapes(config).items()}
    lora = {k: torch.zeros(s) for k, s in m.official_lora_shapes(config, 4).items()}
    broken = dict(lora)
    del broken["single_blocks.0.processor.proj_lora.up.weight"]
    with pytest.raises(KeyError, match="single_blocks.0.processor.proj_lora.up.weight"):
        m.transformer_state_dict(flux, broken, 1, 1)
    with pytest.raises(KeyError, match="not used.*double_blocks.7"):
        m.transformer_state_dict({**flux, "double_blocks.7.img_mod.lin.weight": torch.zeros(1)}, lora, 1, 1)


def test_reference_positions_follow_unope():
    from baselines import uno_modules as m

    # 512 px image: a 32 x 32 token grid; references of 20 x 16 and 10 x 20 tokens.
    first, second = m.reference_ids((32, 32), [(20, 16), (10, 20)])
    assert first[0].tolist() == [0, 32, 32] and first[-1].tolist() == [0, 51, 47]
    assert second[0].tolist() == [0, 52, 48] and second[-1].tolist() == [0, 61, 67]
    # UNO's schedule argument (pipeline.py:261) is 16 at 512 px, so mu = 0.459: t_1 = e^mu / (e^mu + 1/0.96 - 1).
    t = m.schedule(25, 512, 512)
    assert t[0] == 1.0 and t[-1] == 0.0 and len(t) == 26
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (16 - 256)
    assert t[1] == pytest.approx(2.718281828**mu / (2.718281828**mu + 1 / 0.96 - 1), abs=1e-6)
    assert t[1] != pytest.approx(m.schedule(25, 512 * 16, 512 * 16)[1], abs=1e-3)  # the length matters


# ------------------------------------------------------------------------------------------ generation


def test_generation_depends_on_each_reference_and_is_deterministic(method):
    one = method.generate([_request([_subject((200, 30, 30))])])[0]
    assert one.size == (32, 32) and one.mode == "RGB"
    again = method.generate([_request([_subject((200, 30, 30))])])[0]
    assert list(one.getdata()) == list(again.getdata())
    other_ref = method.generate([_request([_subject((30, 30, 200))])])[0]
    assert list(one.getdata()) != list(other_ref.getdata())
    two = method.generate([_request([_subject((200, 30, 30)), _subject((30, 200, 30))])])[0]
    two_changed = method.generate([_request([_subject((200, 30, 30)), _subject((30, 30, 200))])])[0]
    assert list(two.getdata()) != list(two_changed.getdata())


def test_reference_size_is_decided_per_task(method, monkeypatch):
    from baselines import uno_modules as m

    seen = []
    original = m.preprocess_reference

    def spy(image, long_side):
        seen.append(long_side)
        return original(image, long_side)

    monkeypatch.setattr(m, "preprocess_reference", spy)
    method.generate([_request([_subject((1, 2, 3)), _subject((4, 5, 6))], task_id="two")])
    method.generate([_request([_subject((1, 2, 3))], task_id="one")])
    # The official script would keep the first task's 320-class size for the single-reference task.
    assert seen == [48, 48, 64]


def test_a_reference_too_thin_for_the_network_is_named(method):
    with pytest.raises(ValueError, match=r"task thin, subject 0 \(dog\).*under the 16 px"):
        method.generate([_request([_subject((1, 2, 3), size=(300, 12))], task_id="thin")])


def test_runner_generates_from_hub_layout_folders(tmp_path, folders, coco_root):
    options = {"flux": str(folders["flux"]), "lora": str(folders["uno"]), "t5": str(folders["t5"])}
    options |= {"clip": str(folders["clip"]), **TINY}
    run_dir = tmp_path / "run"
    summary = run_method(
        UNOMethod(**options), run_dir=run_dir, track="all", limit=2, coco_root=coco_root, progress=False
    )
    assert (summary.ok, summary.failed) == (4, 0), summary.failures
    records = [r for r in read_records(run_dir) if r["status"] == "ok"]
    assert {r["track"] for r in records} == {"single", "multi"}
    from PIL import Image

    for record in records:
        with Image.open(run_dir / record["image"]) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
