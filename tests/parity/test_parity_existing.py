"""The parity scripts of the existing methods (parity/*.py): their argument handling, and official values they
measured, written out. The comparisons themselves need the official checkouts and old pins, so they are not part
of the suite; docs/parity.md quotes what they print."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PARITY = Path(__file__).resolve().parents[2] / "parity"
SCRIPTS = ["clip_pixels.py", "customnet.py", "ssr_encoder.py", "ip_adapter.py", "lambda_eclipse.py"]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(PARITY / script), *args], capture_output=True, text=True, timeout=120, cwd=PARITY.parent
    )


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"parity_{name}", PARITY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_without_official_is_a_usage_error(script):
    done = _run(script)
    assert done.returncode == 2 and "--official" in done.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_missing_or_wrong_official_folder_is_named(script, tmp_path):
    done = _run(script, "--official", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "nowhere: not a folder" in done.stderr
    done = _run(script, "--official", str(tmp_path))
    assert done.returncode == 2 and f"--official {tmp_path}: has no " in done.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_says_how_to_run_it(script):
    done = _run(script, "--help")
    assert done.returncode == 0 and "--official" in done.stdout and "--tolerance" in done.stdout


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--decoder-steps", "0", "--decoder-steps 0: must be at least 1"),
        ("--decoder-resolution", "40", "--decoder-resolution 40: must be a positive multiple of 16"),
        ("--decoder-resolution", "0", "--decoder-resolution 0: must be a positive multiple of 16"),
        ("--decoder-steps", "two", "--decoder-steps: invalid int value"),
    ],
)
def test_lambda_eclipse_decoder_flags_are_checked_before_anything_runs(flag, value, says, tmp_path):
    done = _run("lambda_eclipse.py", "--official", str(tmp_path), flag, value)
    assert done.returncode == 2 and says in done.stderr


def test_lambda_eclipse_decoder_flags_are_documented():
    done = _run("lambda_eclipse.py", "--help")
    assert "--decoder-steps" in done.stdout and "--decoder-resolution" in done.stdout


def test_figures_fail_above_the_tolerance(capsys):
    figures = _module("_side_by_side").Figures(tolerance=1e-6)
    assert figures.compare("same", [1.0, 2.0], [1.0, 2.0]) == 0.0
    figures.exit()  # all within: returns
    figures.compare("off", [1.0, 2.0], [1.0, 2.5])
    assert "max-abs 0.5, rel 0.186" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        figures.exit()
    assert stop.value.code == 1


def test_clip_pixels_gives_transformers_4_46_3s_values():
    """Official values: transformers 4.46.3 ``CLIPImageProcessor()`` (models/clip/image_processing_clip.py:200
    ``preprocess``) on this 97 x 61 pattern, printed under /work/venvs/parity-old (transformers 4.46.3) and written
    out; transformers 5.25's own processor gives e.g. 0.0033438762 at [0, 0, 0] and a sum of 44416.508."""
    from baselines.clip_pixels import clip_pixels

    y, x = np.mgrid[0:61, 0:97]
    arr = np.stack([(x * 7 + y * 3) % 256, (x * y) % 256, (255 - x * 2) % 256], -1).astype(np.uint8)
    px = clip_pixels([Image.fromarray(arr)])[0].numpy()
    official = {
        (0, 0): [0.003343905322253704, -1.7520971298217773, 1.6481947898864746],
        (111, 57): [-0.8287663459777832, 1.6396584510803223, 1.207372784614563],
        (223, 223): [1.3755959272384644, -0.4764367938041687, -0.08665328472852707],
    }
    for (row, col), values in official.items():
        assert px[:, row, col].tolist() == values, (row, col)
    assert float(px.astype(np.float64).sum()) == pytest.approx(44417.66354003479, abs=1e-9)


def test_the_customnet_stand_in_denoiser_is_shared_and_our_schedule_is_the_officials():
    """parity/customnet.py printed (official DDIMSampler, customnet/ddim.py:134,149, t_start=-1): 49 timesteps
    961 ... 1, identical to ours; the script's stand-in depends on x, t and the layout latent."""
    import torch

    from mscustomnet.model.pipeline import ddim_timesteps

    steps = ddim_timesteps(50)
    assert len(steps) == 49 and steps[0] == 961 and steps[-1] == 1 and steps == list(range(961, 0, -20))
    eps = _module("customnet").stand_in_eps
    x, layout = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    t1, t2 = torch.tensor([1]), torch.tensor([961])
    assert not torch.equal(eps(x, t1, layout), eps(x, t2, layout))
    assert not torch.equal(eps(x, t1, layout), eps(x, t1, layout + 1))


def test_ssr_unipc_is_the_vendored_diffusers_0_23_1s():
    """Official values: the UniPCMultistepScheduler vendored in Xiaojiu-z/SSR_Encoder@7bb5f68
    (diffusers/schedulers/scheduling_unipc_multistep.py:210 set_timesteps, :251 the sigma_min ending; diffusers
    0.23.1) from the SD1.5 scheduler config, 30 steps
    (infer_text.py), printed under /work/venvs/parity-old: its timesteps, and its last sigma, sigma_min, not 0."""
    from baselines.sd15 import scheduler_from_config
    from baselines.ssr_encoder import UNIPC_OFFICIAL

    config = _module("ssr_encoder").SD15_SCHEDULER
    scheduler = scheduler_from_config("unipc", config, **UNIPC_OFFICIAL)
    scheduler.set_timesteps(30)
    assert scheduler.timesteps.tolist() == [
        999, 966, 932, 899, 866, 832, 799, 766, 733, 699, 666, 633, 599, 566, 533,
        499, 466, 433, 400, 366, 333, 300, 266, 233, 200, 166, 133, 100, 67, 33,
    ]  # fmt: skip
    assert float(scheduler.sigmas[-1]) == pytest.approx(0.02916753478348255, rel=1e-6)
    assert float(scheduler.sigmas[-2]) == pytest.approx(0.17925918102264404, rel=1e-6)
