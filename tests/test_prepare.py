from __future__ import annotations

import io
import os
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msibench.bench.manifest import load_manifest
from msibench.bench.prepare import ChecksumError, PrepareError, prepare, reference_paths
from msibench.coco import decode_mask


def _mirror_coco(coco_plus_root, dst):
    """A COCO root of symlinks to the real slice, so single files can be replaced."""
    (dst / "val2017").mkdir(parents=True)
    os.symlink(coco_plus_root / "annotations", dst / "annotations")
    for f in (coco_plus_root / "val2017").iterdir():
        os.symlink(f, dst / "val2017" / f.name)
    return dst


def test_prepare_materializes_cutouts_with_white_background(coco_plus_root):
    manifest = load_manifest()
    tasks = manifest.select("multi", limit=2)
    assert prepare(manifest, coco_plus_root, tasks=tasks) > 0
    subject = tasks[0].subjects[0]
    source = manifest.sources[subject.reference.image_id]
    paths = reference_paths(subject.reference, source)
    cutout = np.asarray(Image.open(paths.image))
    mask = np.asarray(Image.open(paths.mask)) > 0
    x0, y0, x1, y1 = subject.reference.crop
    assert cutout.shape[:2] == (y1 - y0, x1 - x0)  # original pixels, no resizing
    original = np.asarray(Image.open(coco_plus_root / "val2017" / source.file_name).convert("RGB"))[y0:y1, x0:x1]
    full_mask = decode_mask(subject.reference.segmentation, source.height, source.width)[y0:y1, x0:x1] > 0
    assert np.array_equal(mask, full_mask)
    assert np.array_equal(cutout[mask], original[mask])
    assert (cutout[~mask] == 255).all()
    # Second call finds everything cached.
    assert prepare(manifest, coco_plus_root, tasks=tasks) == 0


def test_checksum_mismatch_is_detected(coco_plus_root, tmp_path):
    manifest = load_manifest()
    root = _mirror_coco(coco_plus_root, tmp_path / "coco")
    victim = manifest.sources[manifest.tasks[0].subjects[0].reference.image_id]
    path = root / "val2017" / victim.file_name
    path.unlink()
    data = bytearray((coco_plus_root / "val2017" / victim.file_name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as err:
        prepare(manifest, root)
    assert victim.file_name in str(err.value) and str(victim.image_id) in str(err.value)


def test_missing_source_names_the_file(coco_plus_root, tmp_path):
    manifest = load_manifest()
    root = _mirror_coco(coco_plus_root, tmp_path / "coco")
    victim = manifest.sources[manifest.tasks[0].subjects[0].reference.image_id]
    (root / "val2017" / victim.file_name).unlink()
    with pytest.raises(PrepareError, match=victim.file_name):
        prepare(manifest, root)


def test_offline_download_suggests_coco_root(monkeypatch):
    monkeypatch.delenv("MSIBENCH_COCO_ROOT", raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(PrepareError, match="--coco-root"):
        prepare(load_manifest())


def test_env_coco_root_is_used(coco_plus_root, monkeypatch):
    monkeypatch.setenv("MSIBENCH_COCO_ROOT", str(coco_plus_root))
    manifest = load_manifest()
    assert prepare(manifest, tasks=manifest.select("single", limit=1)) == 1


def test_download_path_verifies_checksum(coco_plus_root, monkeypatch):
    """Without a COCO root the exact images are fetched from coco_url into the cache and checked."""
    monkeypatch.delenv("MSIBENCH_COCO_ROOT", raising=False)
    manifest = load_manifest()
    task = manifest.select("single", limit=1)[0]
    source = manifest.sources[task.subjects[0].reference.image_id]
    fetched = []

    class _Response:
        def __init__(self, data):
            self.data = data

        def read(self):
            return self.data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_urlopen(url, timeout):
        fetched.append(url)
        return _Response((coco_plus_root / "val2017" / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    assert prepare(manifest, tasks=[task]) == 1
    assert fetched == [source.coco_url]
    shutil.rmtree(os.environ["MSIBENCH_CACHE"])
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: _Response(b"not a jpeg"))
    with pytest.raises(ChecksumError) as err:
        prepare(manifest, tasks=[task])
    # The message names the photo, both checksums, and writes nothing.
    message = str(err.value)
    assert f"COCO image {source.image_id} (val2017/{source.file_name})" in message and source.sha256 in message
    assert "confirmed" not in message  # a confirmed photo: no note
    assert not (Path(os.environ["MSIBENCH_CACHE"]) / "coco" / "val2017" / source.file_name).exists()


def test_download_mismatch_of_an_unconfirmed_photo_says_so(monkeypatch):
    """v3 pins two photos whose bytes only one source carried (289343, 340272): a mismatch on download names the
    photo and says its pinned bytes were not confirmed by a second source."""
    monkeypatch.delenv("MSIBENCH_COCO_ROOT", raising=False)
    manifest = load_manifest()
    unconfirmed = sorted(i for i, src in manifest.sources.items() if not src.bytes_confirmed)
    assert unconfirmed == [289343, 340272]
    task = next(
        t for t in manifest.tasks if t.track == "single" and t.subjects[0].reference.image_id == unconfirmed[0]
    )

    class _Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: _Response(b"the COCO original, say"))
    with pytest.raises(ChecksumError, match="COCO image 289343 .*no second source confirmed"):
        prepare(manifest, tasks=[task])
