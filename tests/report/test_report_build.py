"""``msibench report`` without a browser: the page's content, its self-containment, the thumbnail cache, the
detection styles, unscored runs and bad input."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner

from msibench.bench.manifest import load_manifest
from msibench.coco import COCO_CATEGORIES
from msibench.records import read_records
from msibench.report.build import ReportError, build_report, classify_detections
from msibench.scoring.store import load_scores


class Page(HTMLParser):
    """Every tag with its attributes, and the text inside each ``article.task``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.articles: dict[str, dict[str, str]] = {}
        self.article_text: dict[str, list[str]] = {}
        self._current: str | None = None
        self._depth = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "article" and "task" in a.get("class", ""):
            self._current = a["data-id"]
            self.articles[a["data-id"]] = a
            self.article_text[a["data-id"]] = []
            self._depth = 0
        elif self._current is not None and tag == "article":
            self._depth += 1

    def handle_endtag(self, tag):
        if tag == "article" and self._current is not None:
            if self._depth == 0:
                self._current = None
            else:
                self._depth -= 1

    def handle_data(self, data):
        if self._current is not None and data.strip():
            self.article_text[self._current].append(data.strip())

    def text_of(self, task_id: str) -> str:
        return " ".join(self.article_text[task_id])


def build(runs, out, **kw):
    summary = build_report([str(r) for r in runs], out, workers=1, **kw)
    return summary, Page((out / "index.html").read_text())


def test_report_shows_table_tasks_images_scores_and_reasons(report_runs, tmp_path):
    runs = [report_runs["scored"], f"Limited={report_runs['limited']}", report_runs["unscored"]]
    out = tmp_path / "report"
    summary, page = build(runs, out)
    html = (out / "index.html").read_text()
    # Table I: the two scored runs, not the unscored one (named in a note instead)
    rows = [a for t, a in page.tags if t == "tr" and "data-method" in a]
    assert len(rows) == 2
    assert "Not scored (not in the table)" in html
    n_multi = sum(1 for t in load_manifest().tasks if t.track == "multi")
    limited_multi = [r for r in read_records(report_runs["limited"]) if r["track"] == "multi"]
    ok = sum(r["status"] == "ok" for r in limited_multi)
    expected = f"multi: {len({r['task_id'] for r in limited_multi})} of {n_multi} tasks, {ok} images, {ok} scored"
    assert expected in html
    # every task of the runs has a card with its prompt; every image reference is a file inside the folder
    tasks = {r["task_id"] for r in read_records(report_runs["scored"])}
    assert set(page.articles) == tasks and summary.tasks == len(tasks)
    manifest = load_manifest()
    for task_id in tasks:
        assert manifest.by_id[task_id].prompt in page.text_of(task_id)
    for _, attrs in page.tags:
        for key in ("src", "href"):
            if key in attrs:
                target = (out / attrs[key]).resolve()
                assert "://" not in attrs[key] and not attrs[key].startswith("/"), attrs[key]
                assert target.is_file() and out.resolve() in target.parents, attrs[key]
    imgs = [a for t, a in page.tags if t == "img"]
    assert len(imgs) >= summary.images
    # per-image scores and reasons of a scored sample are in its task's card
    header, scores = load_scores(report_runs["scored"])
    rec = next(r for r in scores if r["track"] == "multi" and r["k"] == 4)
    text = page.text_of(rec["task_id"])
    assert f"{rec['metrics']['yolo_subj']:.3f}" in text and "YOLO-Subj" in text
    assert rec["reason"].split(";")[0] in text and "expected" in rec["reason"]
    # failed and skipped samples of the limited run show their reasons
    limited = {r["task_id"]: r for r in read_records(report_runs["limited"])}
    failed = next(r for r in limited.values() if r["status"] == "failed")
    skipped = next(r for r in limited.values() if r["status"] == "skipped")
    assert "simulated out of memory" in page.text_of(failed["task_id"])
    assert "supports at most 3 subject(s)" in page.text_of(skipped["task_id"])
    # the sort values embedded for the page script are the per-task means of the score records
    runs_attr = json.loads(page.articles[rec["task_id"]]["data-runs"])
    assert runs_attr["0"]["v"]["yolo_subj"] == pytest.approx(rec["metrics"]["yolo_subj"])
    assert "failed" in json.loads(page.articles[failed["task_id"]]["data-runs"])["1"]["status"]
    assert "unscored" in runs_attr["2"]["status"]
    # metadata and the per-K figure with its CSV
    assert f"{header['scorer_hash']}" in html and (out / "assets" / "by_k.png").is_file()
    assert (out / "assets" / "by_k.csv").is_file() and (out / "assets" / "report.js").is_file()


def test_thumbnails_are_made_once_and_keyed_by_content_and_size(report_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(report_runs["unscored"], run)
    first, _ = build([run], tmp_path / "a")
    assert first.thumbnails_made > 0
    again, _ = build([run], tmp_path / "b")  # another report folder: every thumbnail comes from the cache
    assert again.thumbnails_made == 0 and again.thumbnails_cached == first.thumbnails_made
    rebuilt, _ = build([run], tmp_path / "a")  # the same folder: already there
    assert rebuilt.thumbnails_made == 0
    # a changed image gets a new thumbnail, and only it; the old one leaves the report folder
    image = sorted((run / "images").glob("*.png"))[0]
    from PIL import Image

    with Image.open(image) as im:
        im.rotate(90).save(image)
    changed, _ = build([run], tmp_path / "a")
    assert changed.thumbnails_made == 1
    assert len(list((tmp_path / "a" / "assets" / "thumbs").glob("*.jpg"))) == first.thumbnails_made
    smaller, page = build([run], tmp_path / "c", thumb_size=64)
    assert smaller.thumbnails_made == first.thumbnails_made  # the size is part of the key
    sizes = [int(a["width"]) for t, a in page.tags if t == "img" and "thumbs" in a.get("src", "")]
    assert sizes and max(sizes) <= 64


def test_unscored_run_alone_renders_images_and_layout(report_runs, tmp_path):
    summary, page = build([report_runs["unscored"]], tmp_path / "r")
    html = (tmp_path / "r" / "index.html").read_text()
    assert "No run is scored yet" in html and not (tmp_path / "r" / "assets" / "by_k.png").exists()
    assert summary.images == len(read_records(report_runs["unscored"]))
    assert any("bx layout" in a.get("class", "") for t, a in page.tags)


def test_detections_are_classified_matched_unmatched_or_wrong():
    task = next(t for t in load_manifest().tasks if t.track == "multi" and t.k == 2)
    a, b = task.subjects
    # a category the task does not ask for
    wrong_id, wrong = next((cid, name) for cid, name in COCO_CATEGORIES if cid not in {a.category_id, b.category_id})
    rec = {
        "detections": [
            {"box": [0, 0, 0.5, 0.5], "category_id": a.category_id, "category": a.category, "score": 0.9,
             "subject": 0},
            {"box": [0.5, 0, 1, 0.5], "category_id": b.category_id, "category": b.category, "score": 0.5,
             "subject": None},
            {"box": [0, 0.5, 0.5, 1], "category_id": wrong_id, "category": wrong, "score": 0.4, "subject": None},
        ],
        "subjects": [{"category": a.category, "matched": True}, {"category": b.category, "matched": False}],
    }  # fmt: skip
    dets, full = classify_detections(task, rec)
    assert full and [d["kind"] for d in dets] == ["matched", "unmatched", "wrong"]
    # records of scorers without the full detector output: the matched detections of ``subjects`` only
    old = {"subjects": [{"category": a.category, "matched": True, "detection": {"box": [0, 0, 1, 1], "score": 0.8}},
                        {"category": b.category, "matched": False, "detection": None}]}  # fmt: skip
    dets, full = classify_detections(task, old)
    assert not full and [(d["kind"], d["subject"]) for d in dets] == [("matched", 0)]


def test_detections_of_a_score_record_are_drawn_in_their_styles(report_runs, tmp_path):
    """A scored run whose records carry the full detector output (``detections``): one box per detection."""
    run = tmp_path / "run"
    shutil.copytree(report_runs["scored"], run)
    lines = [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]
    target = next(r for r in lines if r["track"] == "multi" and r["status"] == "ok")
    task = load_manifest().by_id[target["task_id"]]
    if "detections" not in target:  # scorer versions before the full output: add it as the scorer would
        target["detections"] = [
            {"box": s["box"], "category_id": s["category_id"], "category": s["category"], "score": 0.9, "subject": j}
            for j, s in enumerate(target["subjects"])
        ] + [{"box": [0.0, 0.0, 0.1, 0.1], "category_id": 90, "category": "toothbrush", "score": 0.3, "subject": None}]
    (run / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    _, page = build([run], tmp_path / "r")
    html = (tmp_path / "r" / "index.html").read_text()
    card = html[html.index(f'data-id="{task.id}"') :]
    card = card[: card.index("</article>")]
    kinds = [d["kind"] for d in classify_detections(task, target)[0]]
    for kind in set(kinds):
        assert card.count(f'class="bx det {kind}"') == kinds.count(kind)


def test_bad_input_names_the_folder(report_runs, tmp_path):
    with pytest.raises(ReportError, match="no such run folder"):
        build_report([str(tmp_path / "nope")], tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="run.json"):
        build_report([str(tmp_path / "empty")], tmp_path / "r")
    other = tmp_path / "other"
    shutil.copytree(report_runs["unscored"], other)
    info = json.loads((other / "run.json").read_text())
    info["manifest_sha256"] = "0" * 64
    (other / "run.json").write_text(json.dumps(info))
    with pytest.raises(ReportError, match="manifest"):
        build_report([str(report_runs["unscored"]), str(other)], tmp_path / "r")


def test_cli_report(report_runs, tmp_path):
    from msibench.cli import main

    out = tmp_path / "rep"
    res = CliRunner().invoke(main, ["report", f"P={report_runs['scored']}", "--out", str(out), "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and (out / "index.html").is_file()
    res = CliRunner().invoke(main, ["report", str(tmp_path / "missing"), "--out", str(out)])
    assert res.exit_code != 0 and "no such run folder" in res.output


def test_table_html_is_the_table_module_rendering(report_runs):
    from msibench.scoring.table import COLUMNS, load_run, render_table

    # a --limit run: the report shows it, marked with its coverage, as `table --allow-partial` does
    html = render_table([load_run(str(report_runs["scored"]))], "html", ci=True, allow_partial=True)
    md = render_table([load_run(str(report_runs["scored"]))], "md", allow_partial=True)
    column = 2 + COLUMNS.index(("multi", "yolo_subj"))  # after the empty cell left of "|" and the method
    cell = md.splitlines()[2].split("|")[column].strip()  # multi YOLO-Subj of the first row
    assert f'<td data-col="multi_yolo_subj">{cell}<span class="ci">' in html


def test_scores_of_an_earlier_image_are_flagged(report_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(report_runs["scored"], run)
    rec = next(r for r in read_records(run) if r["status"] == "ok")
    from PIL import Image

    with Image.open(run / rec["image"]) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(run / rec["image"])
    _, page = build([run], tmp_path / "r")
    assert "these scores are of an earlier image" in page.text_of(rec["task_id"])
    others = [t for t in page.articles if t != rec["task_id"]]
    assert all("earlier image" not in page.text_of(t) for t in others)


def test_a_damaged_image_is_shown_as_such_and_the_report_still_builds(report_runs, tmp_path):
    """One image that does not decode (a torn copy, a disk error) does not stop the report: its card says which
    file and why; an image changed since generation is flagged against the sha256 of its record. With
    ultralytics imported (``msibench eval`` scores in the same process) ``PIL.Image.open`` is wrapped and raises
    ModuleNotFoundError (pi_heif) for such a file: still a card, not a traceback."""
    import ultralytics.utils.patches  # noqa: F401  (it wraps PIL.Image.open)

    from msibench.cli import main

    run = tmp_path / "run"
    shutil.copytree(report_runs["unscored"], run)
    ok = [r for r in read_records(run) if r["status"] == "ok"]
    damaged, changed = ok[0], ok[1]
    (run / damaged["image"]).write_bytes(b"not a png")
    from PIL import Image

    with Image.open(run / changed["image"]) as im:
        im.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(run / changed["image"])
    res = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / "r"), "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "1 images could not be read" in res.output
    page = Page((tmp_path / "r" / "index.html").read_text())
    text = page.text_of(damaged["task_id"])
    assert "image unreadable" in text and f"{damaged['image']} cannot be read (not a readable image" in text
    assert "differs from the image recorded at generation" in page.text_of(changed["task_id"])
    untouched = {r["task_id"] for r in ok[2:]} - {damaged["task_id"], changed["task_id"]}
    assert all("unreadable" not in page.text_of(t) and "differs" not in page.text_of(t) for t in untouched)


def test_an_unwritable_out_is_a_clear_error(report_runs, tmp_path):
    from msibench.cli import main

    (tmp_path / "afile").write_text("")
    res = CliRunner().invoke(main, ["report", str(report_runs["unscored"]), "--out", str(tmp_path / "afile" / "r")])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.exception  # no traceback
    assert "cannot build the report in --out" in res.output and "Not a directory" in res.output


def test_a_second_report_into_one_out_is_refused_naming_the_holder(report_runs, tmp_path):
    from msibench import exitcodes
    from msibench.cli import main
    from msibench.records import exclusive_or_busy

    out = tmp_path / "rep"
    with exclusive_or_busy(out / ".report.lock", "a report", "wait"):
        res = CliRunner().invoke(main, ["report", str(report_runs["scored"]), "--out", str(out), "--workers", "1"])
    assert res.exit_code == exitcodes.BUSY and "is being written by pid" in res.output
    assert not (out / "index.html").exists()


def test_the_report_names_each_runs_scorer_weights(report_runs, tmp_path):
    build([report_runs["scored"]], tmp_path / "r")
    html = (tmp_path / "r" / "index.html").read_text()
    # the fakes of the test scorer are not the pinned default weights: the page says so beside the run
    assert "by scorer" in html and "(NOT the pinned scorers)" in html
