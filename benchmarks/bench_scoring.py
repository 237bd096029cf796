"""Benchmark: the scorer against three baselines and against the bound set by its own kernels.

The networks are the real YOLO11x-seg, DINO ViT-S/16 and OpenAI CLIP ViT-B/32 architectures with random weights
(built offline; the cost of a forward pass does not depend on the weights). Every contender scores the same
``paste`` images (512 px, the multi-subject track) with the same definitions (layout-free crop, Z-Acc pairs from
the manifest, collapse) and its values are checked against ours:

  ours         the Scorer as score_run drives it per batch (class Ours; score_run's per-run fixed costs left
               out): one batched YOLO11x-seg pass per batch of images serves detection,
               matching and masks; every crop of a batch goes through DINO, and crops + whole images through CLIP,
               in one call each; reference features come from the on-disk cache (filled once before timing: the
               references are the same for every method's run); background texts are encoded once per run.
  per-metric   one scorer per metric, as separate metric scripts would run: its own detector pass for each of
               YOLO-Subj, YOLO-L, Z-Acc, DINO-I and CLIP-I (5 passes), one encoder call per crop and per
               reference, CLIP-B on its own.
  3-scripts    three scripts (detector metrics / identity / CLIP-B): the first runs one segmentation pass for
               YOLO-Subj, YOLO-L and Z-Acc; the second its own detector pass and each image's crops batched
               through DINO and CLIP, references encoded once per script run; the third CLIP-B, each text encoded
               once per run.
  single-pass  one plain script: one segmentation pass per image serving every metric, crops encoded one at a
               time, the references and the background text re-encoded for every image.
  bound        the kernels alone: the detector module, DINO and CLIP forwards (and the text tower) replayed on
               exactly the input tensors ours gave them in that chunk, with nothing else, right after ours; ours
               is reported as (bound time) / (our time), the fraction of its own kernel bound it reaches. Beside
               it, the share of ours' own time spent inside those calls (measured in the same run, so immune to
               load changing between ours and the replay).

The machine may be shared, so the contenders run interleaved in equal chunks (every contender scores every image
of a chunk, in an order rotated from chunk to chunk). Ours reads reference features from the disk cache (filled
once before timing, as every method's run shares them); the time that took is printed too.

Detector passes (what each track needs, see msibench/scoring/scorer.py): the single track is also scored, in
equal interleaved chunks, under three configurations: the default (the layout-free crop must find the subject:
one detector pass), ``--identity-crop full`` and ``--metrics clip_b`` (no pass): the saving where no requested
metric needs the detector.

Usage: python benchmarks/bench_scoring.py [--threads 2] [--limit 24] [--chunk 4] [--batch-size 8]
           [--single-limit 16] [--coco-root ../shared/data/coco2017-mini] [--json-out F]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = ("ours", "per-metric", "3-scripts", "single-pass")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--limit", type=int, default=24, help="multi-subject images to score")
    p.add_argument("--single-limit", type=int, default=16, help="single-subject images (detector-pass section)")
    p.add_argument("--chunk", type=int, default=4, help="images per interleaved chunk")
    p.add_argument("--batch-size", type=int, default=8, help="our scorer's images per batch")
    p.add_argument("--detector", default="yolo11x-seg.yaml", help="YOLO11 architecture yaml (random weights)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--resolution", type=int, default=512, help="paste image size")
    p.add_argument("--coco-root", type=Path, default=REPO.parent / "shared" / "data" / "coco2017-mini")
    p.add_argument("--workdir", type=Path, default=None, help="where the runs and cache go (default: a temp dir)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json-out", type=Path, default=None)
    return p.parse_args(argv)


# -------------------------------------------------------------------------------------------- the baselines


class Baselines:
    """The three baselines over the same random-weight modules as ours (so every value can be compared)."""

    def __init__(self, scorer, manifest, run_dir, device) -> None:
        from msibench.bench.prepare import reference_paths
        from msibench.scoring.detect import YoloDetector

        d = scorer.detector
        # unbatched: a script scores one image at a time
        self.det = YoloDetector(d.model, conf=d.conf, iou=d.iou, imgsz=d.imgsz, max_det=d.max_det, batch_size=1)
        self.dino, self.clip = scorer.dino, scorer.clip
        self.manifest, self.run_dir = manifest, run_dir
        self.ref_paths = {
            t.id: [reference_paths(s.reference, manifest.sources[s.reference.image_id]).image for s in t.subjects]
            for t in manifest.tasks
        }
        self.script_refs: dict[tuple[str, str], object] = {}  # the 3-scripts identity script's in-memory refs
        self.script_texts: dict[str, object] = {}

    def load(self, rec):
        from PIL import Image

        task = self.manifest.by_id[rec["task_id"]]
        with Image.open(self.run_dir / rec["image"]) as im:
            return task, im.convert("RGB")

    @staticmethod
    def _ref(path):
        from PIL import Image

        with Image.open(path) as im:
            return im.convert("RGB")

    def detector_metrics(self, task, image, seg, out):
        from msibench.scoring.match import match_targets
        from msibench.scoring.metrics import yolo_l, yolo_subj, z_order_pairs

        boxes, cats = [s.box for s in task.subjects], [s.category_id for s in task.subjects]
        matches = match_targets(boxes, cats, seg)
        out["yolo_subj"] = yolo_subj(Counter(cats), seg.counts()).value
        out["yolo_l"] = yolo_l(matches).value
        masks = [seg.mask(m.detection) if m.matched else None for m in matches]
        pairs = z_order_pairs(boxes, [s.z for s in task.subjects], cats, masks, image.size)
        out["z_correct"] = sum(p.correct for p in pairs)
        out["z_pairs"] = len(pairs)

    @staticmethod
    def crops(task, image, det):
        from msibench.scoring.identity import crop
        from msibench.scoring.match import find_subjects

        found = find_subjects([s.box for s in task.subjects], [s.category_id for s in task.subjects], det)
        return [crop(image, det.boxes[f.detection] if f.found else None) for f in found]

    @staticmethod
    def identity(task, crop_feats, ref_feats, out, key):
        from msibench.scoring.identity import cosine
        from msibench.scoring.metrics import collapse

        k = len(task.subjects)
        sims = [[cosine(crop_feats[j], ref_feats[r]) for r in range(k)] for j in range(k)]
        out[key] = statistics.fmean(sims[j][j] for j in range(k))
        if key == "dino_i":
            out["collapse_confused"] = collapse(sims, [s.category_id for s in task.subjects]).n_confused

    def forget(self) -> None:
        """Start a new "script run": the 3-scripts baseline encodes each reference and text once per run."""
        self.script_refs.clear()
        self.script_texts.clear()

    def per_metric(self, records) -> dict[str, dict]:
        return {rec["task_id"]: self._per_metric(rec) for rec in records}

    def three_scripts(self, records) -> dict[str, dict]:
        return {rec["task_id"]: self._three_scripts(rec) for rec in records}

    def single_pass(self, records) -> dict[str, dict]:
        return {rec["task_id"]: self._single_pass(rec) for rec in records}

    def _per_metric(self, rec):
        from msibench.scoring.identity import cosine

        task, image = self.load(rec)
        out = {}
        self.detector_metrics(task, image, self.det([image])[0], {})  # YOLO-Subj script's pass
        self.detector_metrics(task, image, self.det([image])[0], {})  # YOLO-L script's pass
        self.detector_metrics(task, image, self.det([image])[0], out)  # Z-Acc script's pass (values kept)
        for key, encoder in (("dino_i", self.dino), ("clip_i", self.clip.image)):
            crops = self.crops(task, image, self.det([image])[0])  # each identity script's own pass
            feats = [encoder.encode([c])[0] for c in crops]
            refs = [encoder.encode([self._ref(p)])[0] for p in self.ref_paths[task.id]]
            self.identity(task, feats, refs, out, key)
        out["clip_b"] = cosine(self.clip.image.encode([image])[0], self.clip.text.encode([task.background])[0])
        return out

    def _three_scripts(self, rec):
        from msibench.scoring.identity import cosine

        task, image = self.load(rec)
        out = {}
        self.detector_metrics(task, image, self.det([image])[0], out)  # script 1
        crops = self.crops(task, image, self.det([image])[0])  # script 2: its own detector pass
        for key, encoder in (("dino_i", self.dino), ("clip_i", self.clip.image)):
            feats = encoder.encode(crops)
            refs = []
            for p in self.ref_paths[task.id]:
                if (key, str(p)) not in self.script_refs:
                    self.script_refs[(key, str(p))] = encoder.encode([self._ref(p)])[0]
                refs.append(self.script_refs[(key, str(p))])
            self.identity(task, feats, refs, out, key)
        if task.background not in self.script_texts:  # script 3
            self.script_texts[task.background] = self.clip.text.encode([task.background])[0]
        out["clip_b"] = cosine(self.clip.image.encode([image])[0], self.script_texts[task.background])
        return out

    def _single_pass(self, rec):
        from msibench.scoring.identity import cosine

        task, image = self.load(rec)
        out = {}
        seg = self.det([image])[0]
        self.detector_metrics(task, image, seg, out)
        crops = self.crops(task, image, seg)
        for key, encoder in (("dino_i", self.dino), ("clip_i", self.clip.image)):
            feats = [encoder.encode([c])[0] for c in crops]
            refs = [encoder.encode([self._ref(p)])[0] for p in self.ref_paths[task.id]]
            self.identity(task, feats, refs, out, key)
        out["clip_b"] = cosine(self.clip.image.encode([image])[0], self.clip.text.encode([task.background])[0])
        return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class Ours:
    """The scorer as :func:`msibench.scoring.score.score_run` drives it, batch by batch: load each image and
    hash it, find its references (hashed once), ``Scorer.score_batch``. The per-run fixed costs of ``score_run``
    (reading run.json and the records, the scores header, the final aggregate with its bootstrap: 1-2 s per call
    on this machine) are left out, as the baselines have none and the interleaved chunks would multiply them."""

    def __init__(self, scorer, manifest, run_dir, batch_size) -> None:
        from msibench.bench.prepare import reference_paths

        self.scorer, self.manifest, self.run_dir, self.batch_size = scorer, manifest, run_dir, batch_size
        self.reference_paths = reference_paths
        self.ref_sha: dict[Path, str] = {}

    def _references(self, task):
        out = []
        for s in task.subjects:
            path = self.reference_paths(s.reference, self.manifest.sources[s.reference.image_id]).image
            if path not in self.ref_sha:
                self.ref_sha[path] = hashlib.sha256(path.read_bytes()).hexdigest()
            out.append((self.ref_sha[path], path))
        return out

    def score(self, records) -> dict[str, dict]:
        from PIL import Image

        from msibench.scoring.scorer import ScoreItem

        out = {}
        for b in range(0, len(records), self.batch_size):
            items = []
            for rec in records[b : b + self.batch_size]:
                task = self.manifest.by_id[rec["task_id"]]
                path = self.run_dir / rec["image"]
                sha = hashlib.sha256(path.read_bytes()).hexdigest()
                with Image.open(path) as im:
                    image = im.convert("RGB")
                items.append(ScoreItem(task, rec, image, sha, self._references(task)))
            for rec in self.scorer.score_batch(items):
                out[rec["task_id"]] = rec["metrics"]
        return out


# ----------------------------------------------------------------------------------------------- the bound


class KernelRecorder:
    """Records the input tensors of the detector module, the image towers and the texts of the text tower while
    ours scores a chunk, and the time ours spends inside those calls (``inside``); :meth:`replay` then runs the
    exact inputs through the kernels alone."""

    def __init__(self, scorer, device) -> None:
        self.scorer, self.device = scorer, device
        self.calls: list[tuple[str, object]] = []
        self.active = False
        self.inside = 0.0
        self._started = 0.0
        module = scorer.detector.model.module
        module.register_forward_pre_hook(self._pre_hook)
        module.register_forward_hook(self._post_hook)
        for name, encoder in (("dino", scorer.dino), ("clip", scorer.clip.image)):
            encoder.encode_batch = self._wrap(name, encoder.encode_batch)
        scorer.clip.text.encode = self._wrap("text", scorer.clip.text.encode)

    def _pre_hook(self, module, args):
        if self.active:
            self.calls.append(("detector", args[0]))
            self._started = time.perf_counter()

    def _post_hook(self, module, args, output):
        if self.active:
            _sync(self.device)
            self.inside += time.perf_counter() - self._started

    def _wrap(self, name, fn):
        def wrapped(x):
            if not self.active:
                return fn(x)
            self.calls.append((name, x))
            start = time.perf_counter()
            try:
                return fn(x)  # returns numpy: already synchronised
            finally:
                self.inside += time.perf_counter() - start

        return wrapped

    def replay(self) -> float:
        import torch

        s = self.scorer
        run = {
            "detector": s.detector.model.module,
            "dino": lambda x: s.dino.forward(x.to(self.device)),
            "clip": lambda x: s.clip.image.forward(x.to(self.device)),
            "text": lambda texts: s.clip.text.forward(list(texts)),
        }
        start = time.perf_counter()
        with torch.inference_mode():
            for name, x in self.calls:
                run[name](x)
        _sync(self.device)
        seconds = time.perf_counter() - start
        self.calls = []
        return seconds


# ------------------------------------------------------------------------------------------------------ main


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scoring_"))
    os.environ["MSIBENCH_CACHE"] = str(workdir / "cache")

    import torch

    from msibench.bench.manifest import load_manifest
    from msibench.methods.paste import PasteMethod
    from msibench.records import read_records
    from msibench.runner import run_method
    from msibench.scoring.scorer import Scorer, ScorerConfig

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    print(f"threads {torch.get_num_threads()}, device {args.device}, load average {load_start}, workdir {workdir}")

    run_dir = workdir / "paste-run"
    # every task (paste takes seconds), then the first --limit of them taken K by K in turn: the manifest lists the
    # multi-subject tasks K-sorted, so a plain prefix would hold K = 2 only
    run_method(PasteMethod(resolution=args.resolution), run_dir=run_dir, coco_root=args.coco_root, track="all",
               progress=False)  # fmt: skip
    manifest = load_manifest()
    records = sorted(read_records(run_dir / "records.jsonl"), key=lambda r: (r["task_id"], r["sample_index"]))
    multi = _spread_over_k([r for r in records if r["track"] == "multi"])[: args.limit]
    single = [r for r in records if r["track"] == "single"][: args.single_limit]
    print(f"{len(multi)} multi-subject images (mean K {statistics.fmean(r['k'] for r in multi):.2f}) and "
          f"{len(single)} single-subject images at {args.resolution} px")  # fmt: skip

    def config(**kw):
        return ScorerConfig(detector=args.detector, dino="random", clip="random", imgsz=args.imgsz,
                            batch_size=args.batch_size, **kw)  # fmt: skip

    scorer = Scorer(config(), device=args.device)
    scorer.setup()
    # the reference features, once, before timing (the usual case: every method's run shares them)
    from msibench.bench.prepare import reference_paths

    refs = {}
    for r in multi + single:
        for s in manifest.by_id[r["task_id"]].subjects:
            path = reference_paths(s.reference, manifest.sources[s.reference.image_id]).image
            refs[hashlib.sha256(path.read_bytes()).hexdigest()] = path
    t0 = time.perf_counter()
    scorer.warm_references(refs)
    refs_seconds = time.perf_counter() - t0
    print(f"{len(refs)} reference features computed and cached in {refs_seconds:.1f} s (once per machine)")

    baselines = Baselines(scorer, manifest, run_dir, args.device)
    ours = Ours(scorer, manifest, run_dir, args.batch_size)
    fns = {"ours": ours.score, "per-metric": baselines.per_metric, "3-scripts": baselines.three_scripts,
           "single-pass": baselines.single_pass}  # fmt: skip
    # warm-up, untimed, on a whole chunk: first calls at a new batch shape pay one-off costs (allocator, oneDNN
    # kernel selection) that belong to no contender
    for name in CONTENDERS:
        fns[name](multi[: args.chunk])
    baselines.forget()
    recorder = KernelRecorder(scorer, args.device)
    seconds: Counter[str] = Counter()
    values: dict[str, dict[str, dict]] = {name: {} for name in CONTENDERS}
    chunks = [multi[i : i + args.chunk] for i in range(0, len(multi), args.chunk)]
    ratios: dict[str, list[float]] = {name: [] for name in CONTENDERS[1:]}
    for c, chunk in enumerate(chunks):
        order = CONTENDERS[c % 4 :] + CONTENDERS[: c % 4]
        chunk_seconds: dict[str, float] = {}
        for name in order:
            recorder.active = name == "ours"
            start = time.perf_counter()
            values[name].update(fns[name](chunk))
            chunk_seconds[name] = time.perf_counter() - start
            seconds[name] += chunk_seconds[name]
            recorder.active = False
            if name == "ours":  # right after ours, under the same load
                seconds["bound"] += recorder.replay()
        seconds["inside"] = recorder.inside
        for name in ratios:
            ratios[name].append(chunk_seconds[name] / chunk_seconds["ours"])
        done = sum(len(x) for x in chunks[: c + 1])
        line = ", ".join(f"{k} {seconds[k]:.1f} s" for k in (*CONTENDERS, "bound"))
        print(f"  {done:>3}/{len(multi)} images: {line}", flush=True)

    max_diff = 0.0
    for name in CONTENDERS[1:]:
        for task_id, vals in values[name].items():
            for key, v in vals.items():
                max_diff = max(max_diff, abs(float(v) - float(values["ours"][task_id][key])))

    # what each track needs: detector passes on the single track under three configurations
    single_cfgs = {"default (category crop)": config(), "--identity-crop full": config(identity_crop="full"),
                   "--metrics clip_b": config(metrics=("clip_b",))}  # fmt: skip
    passes: Counter[str] = Counter()
    single_seconds: Counter[str] = Counter()
    single_ours = {}
    for label, cfg in single_cfgs.items():
        calls: list[int] = []
        s = Scorer(cfg, detector=_Counting(scorer.detector, calls), dino=scorer.dino, clip=scorer.clip,
                   device=args.device)  # fmt: skip
        single_ours[label] = (Ours(s, manifest, run_dir, args.batch_size), calls)
        single_ours[label][0].score(single[:1])  # warm-up
        calls.clear()
    for c in range(0, len(single), args.chunk):
        labels = list(single_cfgs)
        k = (c // args.chunk) % len(labels)
        for label in labels[k:] + labels[:k]:
            scorer_of, calls = single_ours[label]
            start = time.perf_counter()
            scorer_of.score(single[c : c + args.chunk])
            single_seconds[label] += time.perf_counter() - start
    for label, (_, calls) in single_ours.items():
        passes[label] = sum(calls)

    load_end = os.getloadavg()
    n = len(multi)
    rate = {name: n / seconds[name] for name in CONTENDERS}
    result = {
        "threads": args.threads,
        "device": args.device,
        "detector": args.detector,
        "batch_size": args.batch_size,
        "images": n,
        "mean_k": statistics.fmean(r["k"] for r in multi),
        "load_average_start": load_start,
        "load_average_end": load_end,
        "img_per_s": rate,
        "speedup": {name: rate["ours"] / rate[name] for name in CONTENDERS[1:]},
        # robust to a load spike hitting one contender: the median over chunks of that chunk's time ratio
        "speedup_median_over_chunks": {name: statistics.median(r) for name, r in ratios.items()},
        "speedup_per_chunk": ratios,
        "bound_s_per_image": seconds["bound"] / n,
        "ours_s_per_image": seconds["ours"] / n,
        "fraction_of_kernel_bound": seconds["bound"] / seconds["ours"],
        "kernel_share_inside_ours": seconds["inside"] / seconds["ours"],
        "reference_features_once_s": round(refs_seconds, 1),
        "reference_features": len(refs),
        "max_abs_diff_baselines_vs_ours": max_diff,
        "single_track": {
            label: {
                "img_per_s": len(single) / single_seconds[label],
                "detector_passes_per_image": passes[label] / len(single),
            }
            for label in single_cfgs
        },
    }
    print(f"\nmulti-subject track, {n} images, {args.threads} threads (load average {load_start[0]:.2f} at the "
          f"start, {load_end[0]:.2f} at the end):")  # fmt: skip
    for name in CONTENDERS:
        extra = (
            ""
            if name == "ours"
            else (
                f"   ours is {result['speedup'][name]:.2f}x faster (median over chunks "
                f"{result['speedup_median_over_chunks'][name]:.2f}x)"
            )
        )
        print(f"  {name:<12} {rate[name]:.3f} img/s{extra}")
    bound, share = 100 * result["fraction_of_kernel_bound"], 100 * result["kernel_share_inside_ours"]
    print(f"  bound        {1 / result['bound_s_per_image']:.3f} img/s (the kernels alone on ours' inputs, replayed "
          f"right after ours): ours reaches {bound:.0f} % of it; inside ours' own run, {share:.0f} % of its time is "
          "spent in those kernels")  # fmt: skip
    print(f"  (ours reads reference features from the disk cache; computing the {len(refs)} references of these "
          f"images once took {refs_seconds:.0f} s)")  # fmt: skip
    print(f"  max |baseline - ours| over every metric: {max_diff:.1e}")
    print(f"single-subject track, {len(single)} images: what skipping the detector saves")
    for label, r in result["single_track"].items():
        passes_per_image = r["detector_passes_per_image"]
        print(f"  {label:<26} {r['img_per_s']:.3f} img/s, {passes_per_image:.0f} detector pass(es) per image")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _spread_over_k(records):
    """Records reordered K by K in turn (2, 3, 4, 5, 2, 3, ...), so any prefix mixes every subject count."""
    by_k: dict[int, list] = {}
    for r in records:
        by_k.setdefault(int(r["k"]), []).append(r)
    out = []
    while any(by_k.values()):
        for k in sorted(by_k):
            if by_k[k]:
                out.append(by_k[k].pop(0))
    return out


class _Counting:
    """A detector proxy counting the images it is asked to detect."""

    def __init__(self, detector, calls) -> None:
        self.detector, self.calls = detector, calls
        self.identity, self.has_masks = detector.identity, detector.has_masks

    def config(self):
        return self.detector.config()

    def __call__(self, images):
        self.calls.append(len(images))
        return self.detector(images)


if __name__ == "__main__":
    main()
