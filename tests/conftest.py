from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests never touch the network or a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
# Session- and module-scoped fixtures run before the per-test cache below: give them a private cache too, so a
# test run never reads or writes the user's ~/.cache/msibench.
os.environ["MSIBENCH_CACHE"] = tempfile.mkdtemp(prefix="msibench-test-cache-")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("MSIBENCH_SHARED_DIR", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DIR} (set MSIBENCH_SHARED_DIR)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def coco_root(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The coco2017-mini slice (its annotations, train2017 and val2017: the data the MSI and v1/v2 tests count on) as
    a COCO root whose val2017/ also holds the photos of coco2017-val-plus, which the default manifest (v3) cuts
    references out of. val-plus carries every val2017 photo of the mini slice with the same bytes, so everything
    the mini annotations name reads as before; the extra photos are files no mini annotation lists."""
    mini = shared_dir / "data" / "coco2017-mini"
    if not (mini / "annotations" / "instances_val2017.json").is_file():
        pytest.skip(f"COCO slice not found at {mini}")
    plus = shared_dir / "data" / "coco2017-val-plus" / "val2017"
    if not plus.is_dir():
        return mini
    root = tmp_path_factory.mktemp("coco-root")
    for name in ("annotations", "train2017"):
        os.symlink(mini / name, root / name)
    (root / "val2017").mkdir()
    for photo in sorted(plus.iterdir()):
        os.symlink(photo, root / "val2017" / photo.name)
    return root


@pytest.fixture(scope="session")
def coco_plus_root(shared_dir: Path) -> Path:
    """The 212-photo val2017 slice MSIBench v3 (the default manifest) is built from: the references of the default
    manifest are cut out of its photos. It holds every val2017 photo of coco2017-mini (same bytes and annotations),
    but no train2017 (the MSI tests keep ``coco_root``)."""
    root = shared_dir / "data" / "coco2017-val-plus"
    if not (root / "annotations" / "instances_val2017.json").is_file():
        pytest.skip(f"COCO val-plus slice not found at {root}")
    return root


@pytest.fixture(scope="session")
def dinov2_dir(shared_dir: Path) -> Path:
    path = shared_dir / "models" / "dinov2-s14-imgfocus"
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"offline DINOv2 folder not found at {path}")
    return path


@pytest.fixture(scope="session")
def checkpoint_keys_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "checkpoint-keys"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own MSIBENCH_CACHE so nothing leaks between tests or into ~/.cache."""
    monkeypatch.setenv("MSIBENCH_CACHE", str(tmp_path_factory.mktemp("msibench_cache")))


@pytest.fixture(scope="session")
def manifest():
    """MSIBench v1, loaded by name: the runner tests count its tasks (200, 25 per K) and name them."""
    from msibench.bench.manifest import load_manifest

    return load_manifest("v1")


@pytest.fixture(scope="session")
def prepared_cache(coco_root, manifest, tmp_path_factory):
    """References materialized once per session; each test gets its own copy (tests corrupt files)."""
    from msibench.bench.prepare import prepare

    cache = tmp_path_factory.mktemp("prepared_cache")
    old = os.environ.get("MSIBENCH_CACHE")
    os.environ["MSIBENCH_CACHE"] = str(cache)
    try:
        prepare(manifest, coco_root, verify_all=False)
    finally:
        os.environ["MSIBENCH_CACHE"] = old or ""
    return cache


@pytest.fixture
def prepared(manifest, prepared_cache):
    """The packaged manifest with every reference already in this test's MSIBENCH_CACHE."""
    shutil.copytree(prepared_cache / "references", Path(os.environ["MSIBENCH_CACHE"]) / "references")
    return manifest


# ---------------------------------------------------------------------------------------------- the browser
# Debian's headless Chromium driven by playwright (no browser download): the report, leaderboard and review-page
# tests. Skipped when playwright or Chromium is missing, unless MSIBENCH_REQUIRE_BROWSER=1 (set by .ci/run, which
# installs both), where it fails instead. MSIBENCH_CHROMIUM names another binary.
CHROMIUM = os.environ.get("MSIBENCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def need_browser(condition: bool, what: str) -> None:
    if condition:
        return
    if os.environ.get("MSIBENCH_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{what} (MSIBENCH_REQUIRE_BROWSER=1: .ci/run installs it)")
    pytest.skip(what)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need_browser(False, "playwright is not installed (pip install playwright)")
    need_browser(Path(CHROMIUM).is_file(), f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()
