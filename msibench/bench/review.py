"""Review of reference candidates by eye, for anyone who builds MSIBench from a COCO root (``msibench bench review``).

``write_review_page`` writes one static, self-contained HTML page (images inlined, no server, no request leaves
it) of the pool members that the review file has not decided yet: per candidate its cut-out beside the same box
in its photo with the neighbouring instances outlined, the whole photo, and the reference rule's measurements next to
their thresholds. In the page the user accepts or rejects each one, with a reason, and exports a decisions file
(JSON, downloaded by the browser). ``apply_decisions`` (``msibench bench review apply``) merges that file into the
review JSON: every entry is validated first (a bad one names its field and nothing is written), decisions already in
the review are never replaced, and one that contradicts them is reported and left out.

A rejection changes the pool (the next candidate moves up), so a review is iterated: build the page, decide, apply,
and build the page again until it shows no candidate.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import numpy as np

from msibench.bench import quality as q
from msibench.bench.build import (
    REVIEW_FORMAT,
    BuildError,
    BuildParams,
    Review,
    load_review,
    reference_pools,
    require_photos,
)
from msibench.coco import CATEGORY_NAME, CocoSplit, decode_mask, load_split

logger = logging.getLogger(__name__)

DECISIONS_FORMAT = "msibench-review-decisions"
DECISIONS_VERSION = 1
DECISIONS = ("accept", "reject")

# Sizes on the page (px): the cut-out and its photo box are fitted into CUTOUT, the whole photo into PHOTO. The box
# in its photo is shown with CONTEXT_PAD of its size around it on every side, where neighbours are outlined.
CUTOUT = 288
PHOTO = 288
CONTEXT_PAD = 0.35
JPEG_QUALITY = 85
# Outline colours: the candidate, instances touching it that cover part of its box (the rule's occluders), instances
# cut out of its mask (contained), and any other instance in view.
COLOURS = {"self": (0, 200, 0), "occluder": (235, 30, 30), "subtracted": (230, 0, 230), "other": (255, 200, 0)}


class ReviewError(ValueError):
    """A decisions or review file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Candidate:
    """An unreviewed pool member: what the page shows of it."""

    quality: q.ReferenceQuality
    image_id: int
    segmentation: Any
    pool_rank: int  # 1-based position in its category's pool
    pool_size: int

    @property
    def ann_id(self) -> int:
        return self.quality.ann_id

    @property
    def category(self) -> str:
        return CATEGORY_NAME[self.quality.category_id]


def unreviewed_candidates(coco: CocoSplit, params: BuildParams, review: Review) -> list[Candidate]:
    """The pool members (as ``bench build`` with ``params`` forms the pools) that ``review`` has not decided yet,
    by category name, then pool rank."""
    pools, _ = reference_pools(coco, params, review)
    out = []
    for entries in pools.values():
        for rank, entry in enumerate(entries, start=1):
            if entry.ann_id in review.accepted or entry.ann_id in review.rejected:
                continue
            out.append(Candidate(entry.quality, entry.image_id, entry.segmentation, rank, len(entries)))
    return sorted(out, key=lambda c: (c.category, c.pool_rank, c.ann_id))


def write_review_page(
    coco_root: str | Path,
    out: str | Path,
    params: BuildParams | None = None,
    review: Review | None = None,
    categories: tuple[str, ...] = (),
) -> int:
    """Write the review page of the unreviewed pool candidates of ``coco_root`` to ``out`` (only those of
    ``categories``, COCO names, when given: a full COCO's first page holds up to 800); return how many."""
    from msibench.cache import atomic_write_bytes

    unknown = sorted(set(categories) - set(CATEGORY_NAME.values()))
    if unknown:
        raise ReviewError(f"--category {unknown[0]!r}: not a COCO category name (e.g. 'dining table')")
    params = params if params is not None else BuildParams()
    review = review if review is not None else load_review()
    if review.split != params.split:
        raise BuildError(f"{review.path}: reviews split {review.split}, the page is for {params.split}")
    coco = load_split(coco_root, params.split)
    candidates = unreviewed_candidates(coco, params, review)
    if categories:
        candidates = [c for c in candidates if c.category in categories]
    require_photos(coco, sorted({c.image_id for c in candidates}), "the review page")
    page = render_review_page(coco, candidates, review, params)
    atomic_write_bytes(Path(out), page.encode("utf-8"))
    return len(candidates)


def render_review_page(coco: CocoSplit, candidates: list[Candidate], review: Review, params: BuildParams) -> str:
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in coco.annotations:
        by_image.setdefault(ann["image_id"], []).append(ann)
    cards = [_card(c, coco, by_image[c.image_id]) for c in candidates]
    meta = {
        "format": DECISIONS_FORMAT,
        "version": DECISIONS_VERSION,
        "split": params.split,
        "review_file": Path(review.path).name,
        "review_sha256": review.sha256,
        "quality_version": q.QUALITY_VERSION,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "candidates": [c.ann_id for c in candidates],
    }
    empty = "" if cards else '<p class="done">Every pool member is reviewed: nothing to decide.</p>'
    template = Template((resources.files("msibench.bench") / "templates" / "review.html").read_text("utf-8"))
    return template.substitute(
        title=html.escape(f"MSIBench reference review: {len(candidates)} candidates of {params.split}"),
        summary=html.escape(
            f"{len(candidates)} pool members of {coco.split} (COCO root {coco.root}) are not in "
            f"{review.path} ({len(review.accepted)} accepted, {len(review.rejected)} rejected there)."
        ),
        rule=html.escape(_rule_text()),
        cards="\n".join(cards) + empty,
        meta=json.dumps(meta).replace("</", "<\\/"),
    )


def _rule_text() -> str:
    return (
        f"Rule (quality_version {q.QUALITY_VERSION}): short side >= {q.MIN_SIDE_PX} px, fill >= {q.MIN_FILL}, "
        f"occlusion <= {q.MAX_OCCLUSION}, contained <= {q.MAX_CONTAINED_FRACTION} (cut out of the mask), main part "
        f">= {q.MIN_MAIN_PART}, thickness >= {q.MIN_THICKNESS_PX} px and >= {q.MIN_THICKNESS_RATIO} of the long side, "
        f"not running along an image edge for more than {q.MAX_BORDER_RUN} of the box side."
    )


def _data_uri(image, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buf, format=fmt, optimize=True)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fit(image, side: int):
    """Scale so the longer edge is ``side`` (up or down: a small reference is shown as large as the encoders see
    it, blur included)."""
    from PIL import Image

    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS), scale


def _outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    from scipy import ndimage

    inner = ndimage.binary_erosion(mask, iterations=width, border_value=0)
    return mask & ~inner


def _card(c: Candidate, coco: CocoSplit, annotations: list[dict[str, Any]]) -> str:
    from PIL import Image, ImageDraw

    from msibench.bench.prepare import cut_out

    image_info = coco.images[c.image_id]
    h, w = image_info["height"], image_info["width"]
    with Image.open(coco.image_path(c.image_id)) as photo_file:
        photo = photo_file.convert("RGB")
    x0, y0, x1, y1 = c.quality.box
    cutout, _ = cut_out(photo, c.segmentation, c.quality.box)
    cutout_view, _ = _fit(cutout, CUTOUT)

    # The box in its photo, padded, with the candidate and its neighbours outlined.
    pad_x, pad_y = round((x1 - x0) * CONTEXT_PAD), round((y1 - y0) * CONTEXT_PAD)
    cx0, cy0, cx1, cy1 = max(x0 - pad_x, 0), max(y0 - pad_y, 0), min(x1 + pad_x, w), min(y1 + pad_y, h)
    context, scale = _fit(photo.crop((cx0, cy0, cx1, cy1)), CUTOUT)
    canvas = np.asarray(context).copy()
    labels = []
    relation = {a: "occluder" for a in c.quality.occluders} | {a: "subtracted" for a in c.quality.subtracted}
    neighbours = []
    for ann in sorted(annotations, key=lambda a: a["id"]):
        if ann["id"] == c.ann_id:
            continue
        mask = decode_mask(ann["segmentation"], h, w).astype(bool)[cy0:cy1, cx0:cx1]
        if not mask.any():
            continue
        kind = relation.get(ann["id"], "other")
        neighbours.append((kind, ann))
        labels.append((kind, ann, mask))
    own = decode_mask(c.segmentation, h, w).astype(bool)[cy0:cy1, cx0:cx1]
    # Others first, the candidate last (on top).
    order = {"other": 0, "subtracted": 1, "occluder": 2}
    for kind, _, mask in sorted(labels, key=lambda t: order[t[0]]):
        small = np.asarray(Image.fromarray(mask).resize(context.size, Image.Resampling.NEAREST))
        canvas[_outline(small)] = COLOURS[kind]
    small_own = np.asarray(Image.fromarray(own).resize(context.size, Image.Resampling.NEAREST))
    canvas[_outline(small_own)] = COLOURS["self"]
    context = Image.fromarray(canvas)
    draw = ImageDraw.Draw(context)
    bx = [round((x0 - cx0) * scale), round((y0 - cy0) * scale), round((x1 - cx0) * scale) - 1]
    bx.append(round((y1 - cy0) * scale) - 1)
    draw.rectangle(bx, outline=(255, 255, 255))
    for kind, ann, mask in labels:
        ys, xs = np.nonzero(mask)
        tx, ty = int(xs.min() * scale) + 2, int(ys.min() * scale) + 1
        name = "crowd" if ann.get("iscrowd") else CATEGORY_NAME.get(ann["category_id"], "?")
        draw.text((tx + 1, ty + 1), name, fill=(0, 0, 0))
        draw.text((tx, ty), name, fill=COLOURS[kind])

    whole, wscale = _fit(photo, PHOTO)
    ImageDraw.Draw(whole).rectangle(
        [round(x0 * wscale), round(y0 * wscale), round(x1 * wscale) - 1, round(y1 * wscale) - 1],
        outline=COLOURS["self"],
        width=2,
    )
    neighbour_text = ", ".join(
        f'<span class="n-{kind}">{html.escape(CATEGORY_NAME.get(a["category_id"], "?"))} {a["id"]}</span>'
        for kind, a in neighbours
    )
    return f"""<article class="cand" id="a{c.ann_id}" data-ann="{c.ann_id}" data-image="{c.image_id}"
 data-category="{html.escape(c.category)}">
<h3>{html.escape(c.category)} <code>{c.ann_id}</code> <span class="note">photo {c.image_id}
 ({html.escape(image_info["file_name"])}), pool rank {c.pool_rank} of {c.pool_size}</span></h3>
<div class="views">
<figure><img class="cutout" alt="cut-out" src="{_data_uri(cutout_view)}"><figcaption>cut-out
 ({x1 - x0}x{y1 - y0} px, shown x{CUTOUT / max(x1 - x0, y1 - y0):.2f})</figcaption></figure>
<figure><img class="context" alt="in its photo" src="{_data_uri(context)}"><figcaption>in its photo: box white,
 this instance green, occluders red, cut out magenta, others yellow</figcaption></figure>
<figure><img class="photo" alt="whole photo" src="{_data_uri(whole)}"><figcaption>whole photo
 {w}x{h}</figcaption></figure>
{_measurements(c.quality)}
</div>
<p class="inview">in view: {neighbour_text or "no other instance"}</p>
<div class="decide">
<label><input type="radio" name="d{c.ann_id}" value="accept"> accept</label>
<label><input type="radio" name="d{c.ann_id}" value="reject"> reject</label>
<input type="text" class="reason" placeholder="reason (needed to reject)" size="60">
<span class="state"></span>
</div>
</article>"""


def _measurements(v: q.ReferenceQuality) -> str:
    x0, y0, x1, y1 = v.box
    long_side = max(x1 - x0, y1 - y0)
    rows = [
        ("short side", f"{v.min_side} px", f">= {q.MIN_SIDE_PX}"),
        ("mask area", f"{v.mask_area} px", ""),
        ("fill", f"{v.fill:.3f}", f">= {q.MIN_FILL}"),
        ("occlusion", f"{v.occlusion:.3f}", f"<= {q.MAX_OCCLUSION}"),
        ("contained", f"{v.contained_fraction:.3f}", f"<= {q.MAX_CONTAINED_FRACTION}"),
        ("main part", f"{v.main_part:.3f}", f">= {q.MIN_MAIN_PART}"),
        ("thickness", f"{v.thickness:.1f} px", f">= {max(q.MIN_THICKNESS_PX, q.MIN_THICKNESS_RATIO * long_side):.1f}"),
        ("cut by frame", "yes" if v.truncated else "no", "no"),
        ("score", f"{v.score:.1f}", "ranks the pool"),
        ("cut out of mask", ", ".join(map(str, v.subtracted)) or "-", ""),
    ]
    body = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(val)}</td><td class='thr'>{html.escape(t)}</td></tr>"
        for k, val, t in rows
    )
    verdict = "clean" if v.clean else ", ".join(v.causes)
    return f'<table class="meas">{body}<tr><th>verdict</th><td colspan="2">{verdict}</td></tr></table>'


# ------------------------------------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Decision:
    annotation_id: int
    decision: str  # "accept" or "reject"
    reason: str


@dataclass
class ApplyResult:
    accepted: list[int] = field(default_factory=list)  # newly accepted
    rejected: list[int] = field(default_factory=list)  # newly rejected
    unchanged: list[int] = field(default_factory=list)  # already so in the review
    conflicts: list[str] = field(default_factory=list)  # contradict the review: not applied, the review keeps its own
    notes: list[str] = field(default_factory=list)  # same decision, another reason: the review keeps its reason


def load_decisions(path: str | Path, split: str | None = None) -> list[Decision]:
    """The decisions of an exported file, every entry validated (a bad one raises :class:`ReviewError` naming the
    file and the field); ``split``, when given, must be the file's."""
    path = Path(path)
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, json.JSONDecodeError) as err:
        raise ReviewError(f"{path}: cannot read the decisions file: {err}") from err
    if not isinstance(raw, dict):
        raise ReviewError(f"{path}: expected a JSON object exported by the review page")
    if raw.get("format") != DECISIONS_FORMAT:
        raise ReviewError(f"{path}: field 'format': expected {DECISIONS_FORMAT!r}, got {raw.get('format')!r}")
    if raw.get("version") != DECISIONS_VERSION:
        raise ReviewError(f"{path}: field 'version': expected {DECISIONS_VERSION}, got {raw.get('version')!r}")
    if split is not None and raw.get("split") != split:
        raise ReviewError(
            f"{path}: field 'split': the decisions are for {raw.get('split')!r}, the review for {split!r}"
        )
    entries = raw.get("decisions")
    if not isinstance(entries, list):
        raise ReviewError(f"{path}: field 'decisions': expected a list")
    out: list[Decision] = []
    first: dict[int, int] = {}
    for i, entry in enumerate(entries):
        where = f"{path}: decisions[{i}]"
        if not isinstance(entry, dict):
            raise ReviewError(f"{where}: expected an object")
        ann_id = entry.get("annotation_id")
        if isinstance(ann_id, bool) or not isinstance(ann_id, int) or ann_id <= 0:
            raise ReviewError(f"{where}.annotation_id: expected a positive integer, got {ann_id!r}")
        decision = entry.get("decision")
        if decision not in DECISIONS:
            raise ReviewError(f"{where}.decision: expected 'accept' or 'reject', got {decision!r}")
        reason = entry.get("reason", "")
        if not isinstance(reason, str):
            raise ReviewError(f"{where}.reason: expected a string, got {type(reason).__name__}")
        reason = " ".join(reason.split())
        if decision == "reject" and not reason:
            raise ReviewError(f"{where}.reason: a rejection needs a reason (annotation {ann_id})")
        if ann_id in first:
            earlier = out[first[ann_id]]
            if (earlier.decision, earlier.reason) != (decision, reason):
                raise ReviewError(
                    f"{where}.annotation_id: {ann_id} is decided twice, differently (decisions[{first[ann_id]}])"
                )
            continue
        first[ann_id] = len(out)
        out.append(Decision(ann_id, decision, reason))
    return out


def apply_decisions(decisions_path: str | Path, review_path: str | Path | None = None) -> ApplyResult:
    """Merge an exported decisions file into the review JSON (default: the packaged one); see the module doc."""
    from msibench.bench.build import default_review_path
    from msibench.cache import atomic_write_bytes

    review_path = Path(review_path) if review_path is not None else default_review_path()
    try:
        review = load_review(review_path)  # validates the review file before anything is decided
    except BuildError as err:
        raise ReviewError(str(err)) from err
    decisions = load_decisions(decisions_path, split=review.split)
    raw = json.loads(review_path.read_bytes())
    result = ApplyResult()
    new_accepted: dict[int, str] = {}
    new_rejected: dict[int, str] = {}
    for d in decisions:
        if d.decision == "accept":
            if d.annotation_id in review.rejected:
                result.conflicts.append(
                    f"annotation {d.annotation_id}: the review rejects it ({review.rejected[d.annotation_id]!r}), "
                    "the file accepts it"
                )
            elif d.annotation_id in review.accepted:
                result.unchanged.append(d.annotation_id)
            else:
                new_accepted[d.annotation_id] = d.reason
        elif d.annotation_id in review.accepted:
            result.conflicts.append(
                f"annotation {d.annotation_id}: the review accepts it, the file rejects it ({d.reason!r})"
            )
        elif d.annotation_id in review.rejected:
            result.unchanged.append(d.annotation_id)
            if review.rejected[d.annotation_id] != d.reason:
                result.notes.append(
                    f"annotation {d.annotation_id}: rejected already, the review keeps its reason "
                    f"({review.rejected[d.annotation_id]!r}, the file says {d.reason!r})"
                )
        else:
            new_rejected[d.annotation_id] = d.reason
    if new_accepted or new_rejected:
        if isinstance(raw["accepted"], dict):
            raw["accepted"] = _sorted_ids({**raw["accepted"], **{str(k): v for k, v in new_accepted.items()}})
        else:
            raw["accepted"] = sorted({int(v) for v in raw["accepted"]} | set(new_accepted))
            reasons = {k: v for k, v in new_accepted.items() if v}
            if reasons or "accepted_reasons" in raw:
                raw["accepted_reasons"] = _sorted_ids({**raw.get("accepted_reasons", {}), **reasons})
        raw["rejected"] = _sorted_ids({**raw["rejected"], **{str(k): v for k, v in new_rejected.items()}})
        blob = (json.dumps(raw, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
        atomic_write_bytes(review_path, blob)
        try:
            merged = load_review(review_path)
        except BuildError as err:  # cannot happen for a review that loaded above; checked all the same
            raise ReviewError(f"{review_path}: the merged review does not load: {err}") from err
        assert merged.accepted >= review.accepted and set(merged.rejected) >= set(review.rejected)
    result.accepted, result.rejected = sorted(new_accepted), sorted(new_rejected)
    return result


def _sorted_ids(mapping: dict[Any, str]) -> dict[str, str]:
    return {str(k): mapping[k] for k in sorted(mapping, key=int)}


__all__ = [
    "DECISIONS_FORMAT",
    "REVIEW_FORMAT",
    "ApplyResult",
    "Candidate",
    "Decision",
    "ReviewError",
    "apply_decisions",
    "load_decisions",
    "render_review_page",
    "unreviewed_candidates",
    "write_review_page",
]
