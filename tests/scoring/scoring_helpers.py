"""Helpers shared by the scoring tests (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib


def stats_encoder(name: str = "test-stats-v1"):
    """A cheap deterministic identity backbone: per-channel mean and std of the preprocessed crop."""
    from msibench.scoring.backbones import image_encoder_from_callable

    def fn(x):
        import torch

        flat = x.flatten(2)
        return torch.cat([flat.mean(-1), flat.std(-1)], dim=1)

    return image_encoder_from_callable(fn, name=name)


def write_scored_run(path, records, method="paste", scorer_hash="abc", manifest_tasks=None):
    """A run folder holding exactly ``records`` as scores, with the run.json, generation records and manifest they
    belong to: the manifest has one task per task id of ``records`` (a packaged task of the same track and K, renamed),
    plus ``manifest_tasks`` more of each track when given (then the run covers only part of its manifest)."""
    import json
    from pathlib import Path

    from msibench.bench.manifest import default_manifest_path

    path = Path(path)
    path.mkdir(parents=True)
    raw = json.loads(default_manifest_path().read_text())
    pool = list(raw["tasks"])
    tasks = []
    for task_id, track, k in dict.fromkeys((r["task_id"], r["track"], r["k"]) for r in records):
        source = next(t for t in pool if t["track"] == track and len(t["subjects"]) == k)
        pool.remove(source)
        tasks.append({**source, "id": task_id})
    for track, extra in (manifest_tasks or {}).items():
        tasks += [t for t in pool if t["track"] == track][:extra]
    blob = manifest_with_tasks(path / "manifest.json", tasks)
    sha = hashlib.sha256(blob).hexdigest()
    info = {"method": method, "fingerprint_hash": "fp", "manifest_sha256": sha, "base_seed": 0}
    info["manifest"] = {"path": str(path / "manifest.json"), "sha256": sha}
    (path / "run.json").write_text(json.dumps(info))
    header = {"format": "msibench-scores", "scorer_hash": scorer_hash, "scorer": {}, "run": {"method": method}}
    (path / "scores.json").write_text(json.dumps(header))
    with open(path / "scores.jsonl", "w") as scores, open(path / "records.jsonl", "w") as generated:
        for r in records:
            scores.write(json.dumps({**r, "scorer": scorer_hash, "fingerprint": "fp"}) + "\n")
            status = r["status"] if r["status"] == "skipped" or r.get("stage") == "generation" else "ok"
            gen = {k: r[k] for k in ("task_id", "track", "k", "sample_index")}
            generated.write(json.dumps({**gen, "status": status, "fingerprint": "fp"}) + "\n")
    return path


def manifest_with_tasks(path, tasks):
    """Write the packaged manifest restricted to ``tasks`` (raw task dicts, or packaged task ids) and its sources."""
    import json
    from pathlib import Path

    from msibench.bench.manifest import default_manifest_path, dumps

    raw = json.loads(default_manifest_path().read_text())
    by_id = {t["id"]: t for t in raw["tasks"]}
    tasks = [by_id[t] if isinstance(t, str) else t for t in tasks]
    used = {s["reference"]["image_id"] for t in tasks for s in t["subjects"]}
    raw.update(tasks=tasks, sources=[s for s in raw["sources"] if s["image_id"] in used])
    blob = dumps(raw)
    Path(path).write_bytes(blob)
    return blob
