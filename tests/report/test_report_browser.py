"""The report in a real browser: Debian's headless Chromium driven by playwright (no browser download).

It opens the report of real paste runs from disk, checks that Table I, the images and the per-task scores render,
that filtering and sorting work, and that no request leaves the report's folder (every request is intercepted;
one that would leave is aborted and fails the test).

The browser fixture (tests/conftest.py) skips when playwright or Chromium is missing, unless
MSIBENCH_REQUIRE_BROWSER=1 (set by .ci/run, which installs both), where it fails instead.
MSIBENCH_REPORT_SCREENSHOT=PATH saves the screenshots the docs show (PATH: a task card; PATH with "-top" before
".png": the top of the page).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from msibench.records import read_records
from msibench.report.build import build_report
from msibench.scoring.aggregate import task_values
from msibench.scoring.store import load_scores
from msibench.scoring.table import COLUMNS, load_run, render_table


@pytest.fixture(scope="module")
def report(report_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("browser") / "report"
    runs = [f"Paste={report_runs['scored']}", f"Limited={report_runs['limited']}", f"White={report_runs['unscored']}"]
    build_report(runs, out, workers=1)
    return out


def open_report(browser, report: Path):
    """A page on ``report/index.html`` whose every request is intercepted: inside the folder it goes on, anything
    else is aborted and recorded."""
    folder = report.resolve()
    seen, outside, errors = [], [], []
    page = browser.new_page(viewport={"width": 1400, "height": 1000})

    def route(r):
        url = r.request.url
        seen.append(url)
        parsed = urlparse(url)
        path = Path(unquote(parsed.path)).resolve() if parsed.scheme == "file" else None
        if path is not None and (path == folder or folder in path.parents):
            r.continue_()
        else:
            outside.append(url)
            r.abort()

    page.route("**/*", route)
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto((folder / "index.html").as_uri())
    page.wait_for_selector("body[data-ready='1']")
    return page, seen, outside, errors


def visible_ids(page) -> list[str]:
    return page.eval_on_selector_all("article.task:not([hidden])", "els => els.map(e => e.dataset.id)")


def test_report_renders_filters_sorts_and_stays_in_its_folder(browser, report, report_runs):
    page, seen, outside, errors = open_report(browser, report)
    n_tasks = len({r["task_id"] for r in read_records(report_runs["scored"])})

    # Table I: one row per scored run, the numbers of the table module
    rows = page.locator("table.table1 tbody tr")
    assert rows.count() == 2
    scored = [load_run(f"Paste={report_runs['scored']}")]
    md = render_table(scored, "md", allow_partial=True).splitlines()[2].split("|")  # a --limit run, as the report
    expected = dict(zip([f"{t}_{m}" for t, m in COLUMNS], [c.strip() for c in md[2:-1]], strict=True))
    for col in ("single_dino_i", "multi_yolo_subj", "multi_yolo_l", "multi_z_acc"):
        text = rows.first.locator(f"td[data-col='{col}']").inner_text()
        assert text.split()[0] == expected[col] and text.count("[") == 1  # mean and its 95 % interval

    # images: scroll every one into view (they load lazily), then each has decoded pixels
    images = page.locator("img")
    assert images.count() > 20
    for i in range(images.count()):
        images.nth(i).scroll_into_view_if_needed()
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    broken = page.eval_on_selector_all("img", "els => els.filter(e => !(e.naturalWidth > 0)).map(e => e.src)")
    assert broken == []

    # per-task scores of a scored sample are rendered in its card
    _, scores = load_scores(report_runs["scored"])
    rec = next(r for r in scores if r["track"] == "multi" and r["k"] == 3)
    card = page.locator(f"article.task[data-id='{rec['task_id']}']")
    cell = card.locator(".col.run[data-run='0'] table.scores tr[data-metric='yolo_subj'] td")
    assert cell.inner_text() == f"{rec['metrics']['yolo_subj']:.3f}"
    assert card.locator(".col.run[data-run='0'] .bx.det").count() >= 1
    assert "expected" in card.locator(".col.run[data-run='0'] p.reason").first.inner_text()

    # filtering: track, K, category, status and method
    page.select_option("#f-track", "single")
    single = visible_ids(page)
    assert single and all(i.startswith("single") for i in single)
    assert page.inner_text("#count") == f"{len(single)} of {n_tasks} tasks"
    page.select_option("#f-track", "")
    page.select_option("#f-k", "3")
    assert {page.get_attribute(f"article.task[data-id='{i}']", "data-k") for i in visible_ids(page)} == {"3"}
    page.select_option("#f-k", "")
    category = rec["subjects"][0]["category"]
    page.select_option("#f-cat", category)
    shown = visible_ids(page)
    assert rec["task_id"] in shown and len(shown) < n_tasks
    for task_id in shown:
        assert category in page.locator(f"article.task[data-id='{task_id}'] .refs").inner_text()
    page.select_option("#f-cat", "")
    page.select_option("#f-status", "failed")
    failed = {r["task_id"] for r in read_records(report_runs["limited"]) if r["status"] == "failed"}
    assert set(visible_ids(page)) == failed
    page.select_option("#f-status", "")
    page.uncheck(".f-run[value='1']")
    assert page.locator(".col.run[data-run='1']:visible").count() == 0
    assert page.locator(".col.run[data-run='0']:visible").count() == n_tasks
    page.check(".f-run[value='1']")

    # sorting by a metric of a run, worst first then best first; tasks without the metric go last
    means = {tid: row["yolo_subj"] for (_, tid), row in task_values(scores).items() if "yolo_subj" in row}
    page.select_option("#s-run", "0")
    page.select_option("#s-metric", "yolo_subj")
    order = visible_ids(page)
    assert [means[t] for t in order[: len(means)]] == sorted(means.values())
    assert set(order[len(means) :]) == {t for t in order if t not in means}
    page.select_option("#s-order", "desc")
    order = visible_ids(page)
    assert [means[t] for t in order[: len(means)]] == sorted(means.values(), reverse=True)
    # identity collapse: lower is better, so its worst first is the highest rate first
    collapse = {tid: row["collapse"] for (_, tid), row in task_values(scores).items() if "collapse" in row}
    assert len(set(collapse.values())) > 1  # the order below can tell the directions apart
    page.select_option("#s-metric", "collapse")
    page.select_option("#s-order", "asc")  # "worst first"
    order = visible_ids(page)
    assert [collapse[t] for t in order[: len(collapse)]] == sorted(collapse.values(), reverse=True)
    page.select_option("#s-order", "desc")  # "best first"
    order = visible_ids(page)
    assert [collapse[t] for t in order[: len(collapse)]] == sorted(collapse.values())
    page.select_option("#s-metric", "yolo_subj")

    screenshot = os.environ.get("MSIBENCH_REPORT_SCREENSHOT")
    page.select_option("#s-order", "asc")
    page.evaluate(
        "window.scrollTo(0, document.querySelector('article.task:not([hidden])').getBoundingClientRect().top"
        " + window.scrollY - document.getElementById('controls').offsetHeight - 8)"
    )
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    page.screenshot(path=screenshot or str(report.parent / "report.png"))
    # The top of the page (Table I, the per-K figure, run metadata): README's second picture.
    page.evaluate("window.scrollTo(0, 0)")
    top = Path(screenshot).with_name(Path(screenshot).stem + "-top.png") if screenshot else report.parent / "top.png"
    page.screenshot(path=str(top))

    assert errors == []
    assert outside == [], f"requests left the report folder: {outside}"
    assert any(u.endswith("/assets/report.js") for u in seen) and any("/assets/thumbs/" in u for u in seen)
    page.close()


def test_report_pages_and_sorts_by_the_difference_of_two_runs(browser, report, report_runs):
    page, _, outside, errors = open_report(browser, report)
    n_tasks = len({r["task_id"] for r in read_records(report_runs["scored"])})
    assert page.inner_text("#p-info") == "page 1 of 1" and len(visible_ids(page)) == n_tasks  # 25 per page

    # B - A: sort by the scored run's YOLO-Subj minus the limited run's, on the tasks both scored
    values = [{tid: row["yolo_subj"] for (_, tid), row in task_values(load_scores(report_runs[name])[1]).items()
               if "yolo_subj" in row} for name in ("scored", "limited")]  # fmt: skip
    diff = {t: values[0][t] - values[1][t] for t in values[0].keys() & values[1].keys()}
    assert len(set(diff.values())) > 1  # the order can tell
    page.select_option("#s-metric", "yolo_subj")
    page.select_option("#s-run", "0")
    page.select_option("#s-base", "1")
    page.select_option("#s-order", "desc")
    order = visible_ids(page)
    assert [diff[t] for t in order[: len(diff)]] == sorted(diff.values(), reverse=True)
    assert set(order[len(diff) :]) == {t for t in order if t not in diff}  # without both values: last
    assert page.get_attribute("body", "data-sorted") == "yolo_subj:0-1:desc"

    # paging keeps the sorted order across pages: 3 per page
    page.evaluate("document.getElementById('p-size').add(new Option('3', '3'))")
    page.select_option("#p-size", "3")
    pages = -(-n_tasks // 3)
    assert page.inner_text("#p-info") == f"page 1 of {pages}" and visible_ids(page) == order[:3]
    assert page.is_disabled("#p-prev")
    seen = list(visible_ids(page))
    for i in range(1, pages):
        page.click("#p-next")
        assert page.inner_text("#p-info") == f"page {i + 1} of {pages}"
        seen += visible_ids(page)
    assert seen == order and page.is_disabled("#p-next")
    page.click("#p-prev")
    assert visible_ids(page) == order[3 * (pages - 2) : 3 * (pages - 1)]
    page.select_option("#f-track", "single")  # a filter starts again at page 1
    assert page.inner_text("#p-info").startswith("page 1 of")
    assert errors == [] and outside == []
    page.close()


def test_a_request_leaving_the_folder_is_caught(browser, report, tmp_path):
    """The interception above can fail: a copy of the report with one remote image records that request."""
    copy = tmp_path / "copy"
    shutil.copytree(report, copy)
    index = copy / "index.html"
    index.write_text(index.read_text().replace("</main>", '<img src="https://example.invalid/x.png"></main>'))
    page, _, outside, _ = open_report(browser, copy)
    page.wait_for_timeout(200)
    assert outside == ["https://example.invalid/x.png"]
    page.close()
