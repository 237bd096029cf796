"""A contact sheet of a manifest's references: every distinct reference cut-out, grouped by category, on one PNG, so
that anyone can judge them by eye (``msibench bench contact-sheet``)."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from msibench.bench.manifest import Manifest, Reference
from msibench.bench.prepare import prepare, reference_paths

TILE = 160
LABEL = 13


def references_by_category(manifest: Manifest) -> dict[str, list[tuple[Reference, int]]]:
    """Distinct references per category (by annotation id) with how many subjects use each, categories by name."""
    uses: Counter[int] = Counter()
    refs: dict[int, tuple[str, Reference]] = {}
    for task in manifest.tasks:
        for subject in task.subjects:
            uses[subject.reference.annotation_id] += 1
            refs.setdefault(subject.reference.annotation_id, (subject.category, subject.reference))
    grouped: dict[str, list[tuple[Reference, int]]] = defaultdict(list)
    for ann_id, (category, ref) in sorted(refs.items()):
        grouped[category].append((ref, uses[ann_id]))
    return dict(sorted(grouped.items()))


def render_contact_sheet(manifest: Manifest, coco_root: str | Path | None = None, columns: int = 12, tile: int = TILE):
    """The sheet as a PIL image: every distinct reference fitted into a ``tile`` square on white, categories in name
    order, labelled with the category, the annotation id and how many subjects use it."""
    from PIL import Image, ImageDraw

    prepare(manifest, coco_root, verify_all=False)
    cells = [(category, ref, n) for category, refs in references_by_category(manifest).items() for ref, n in refs]
    cell_h = tile + 2 * LABEL
    rows = max(1, -(-len(cells) // columns))
    sheet = Image.new("RGB", (columns * tile, rows * cell_h), (72, 72, 72))
    draw = ImageDraw.Draw(sheet)
    for i, (category, ref, n) in enumerate(cells):
        x, y = (i % columns) * tile, (i // columns) * cell_h
        with Image.open(reference_paths(ref, manifest.sources[ref.image_id]).image) as image:
            thumb = image.convert("RGB")
        thumb.thumbnail((tile - 4, tile - 4), Image.Resampling.LANCZOS)
        sheet.paste((255, 255, 255), (x + 1, y + 1, x + tile - 1, y + tile - 1))
        sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
        draw.text((x + 3, y + tile), category, fill=(255, 255, 255))
        draw.text((x + 3, y + tile + LABEL - 2), f"{ref.annotation_id} x{n}", fill=(255, 255, 160))
    return sheet


__all__ = ["references_by_category", "render_contact_sheet"]
