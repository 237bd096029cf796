"""msibench leaderboard: every scored run under the folders, one board per manifest and scorer, sortable, with a
corrected pairwise significance matrix and links to each run's report; checked in real Chromium."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_report_browser import open_report

from msibench.present.leaderboard import LeaderboardError, build_leaderboard, find_runs
from msibench.scoring.aggregate import compare
from msibench.scoring.store import load_scores


@pytest.fixture(scope="module")
def runs_folder(report_runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("board") / "runs"
    for name in ("scored", "limited", "unscored"):
        shutil.copytree(report_runs[name], root / name)
    return root


@pytest.fixture(scope="module")
def board(runs_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("board_out") / "site"
    summary = build_leaderboard([runs_folder], out)
    assert summary.runs == 2 and summary.boards == 1
    assert any("unscored" in s and "not scored" in s for s in summary.skipped)
    return out


def _rows(page) -> list[str]:
    return page.eval_on_selector_all(
        "table.board tbody tr", "els => els.map(e => e.cells[0].innerText.split('\\n')[0])"
    )


def test_leaderboard_sorts_compares_and_links_reports(browser, board, runs_folder):
    page, _, outside, errors = open_report(browser, board)
    assert not errors and not outside
    # two paste configurations: the method's label and each one's fingerprint
    expected = {f"Paste (oracle) ({_fp(runs_folder / name)})": name for name in ("scored", "limited")}
    assert sorted(_rows(page)) == sorted(expected)

    # the limited run declares 3 subjects: its multi cells are marked as a subset, as in the tables
    limited = page.locator("table.board tbody tr", has_text=_fp(runs_folder / "limited"))
    assert "†" in limited.locator("td[data-col='multi_yolo_subj']").inner_text()
    assert "†" not in limited.locator("td[data-col='single_dino_i']").inner_text()
    assert "K ≤ 3" in page.inner_text("p.subset")
    assert "NOT the pinned default scorers" in page.inner_text("p.scorer")

    # sort by multi YOLO-Subj: the limited run skips K = 4, 5 and fails a task; clicking twice reverses the order
    head = page.locator("table.board th[data-sort='multi_yolo_subj']")
    head.click()
    first = _rows(page)
    head.click()
    assert _rows(page) == list(reversed(first))
    values = page.eval_on_selector_all(
        "table.board tbody td[data-col='multi_yolo_subj']", "els => els.map(e => parseFloat(e.dataset.value))"
    )
    assert values == sorted(values)  # second click: ascending (higher is better, so descending came first)

    # the significance matrix of the chosen metric, the numbers of msibench compare at the corrected level
    page.select_option("section.significance select.metric", "single_dino_i")
    visible = page.locator("table.matrix:not([hidden])")
    assert visible.count() == 1 and visible.get_attribute("data-matrix") == "single_dino_i"
    cell = visible.locator("tbody tr").nth(0).locator("td").nth(1)
    (_, ra), (_, rb) = load_scores(runs_folder / "scored"), load_scores(runs_folder / "limited")
    diff = next(d for d in compare(ra, rb, confidence=0.95) if (d.track, d.metric) == ("single", "dino_i"))
    a_first = expected[visible.locator("tbody tr").nth(0).locator("th").inner_text()] == "scored"
    shown = float(cell.inner_text().split()[0])
    assert shown == pytest.approx(diff.diff if a_first else -diff.diff, abs=1e-3)
    assert "Bonferroni correction over the 1 pairs" in page.inner_text("section.significance")
    if os.environ.get("MSIBENCH_LEADERBOARD_SCREENSHOT"):  # the picture docs/cluster.md shows
        page.screenshot(path=os.environ["MSIBENCH_LEADERBOARD_SCREENSHOT"], full_page=True)

    # each run links to its own report, written beside the page
    for link in page.eval_on_selector_all("table.board a", "els => els.map(e => e.getAttribute('href'))"):
        report = board / link
        assert report.is_file()
        rpage, _, out2, err2 = open_report(browser, report.parent)
        assert not err2 and not out2 and rpage.locator("article.task").count() > 0
        rpage.close()
    page.close()


def _fp(run: Path) -> str:
    return json.loads((run / "run.json").read_text())["fingerprint_hash"]


def test_runs_of_other_manifests_or_scorers_get_boards_of_their_own(runs_folder, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(runs_folder / "limited", other)
    header = json.loads((other / "scores.json").read_text())
    scores = (other / "scores.jsonl").read_text().replace(header["scorer_hash"], "feedfacecafe")
    (other / "scores.jsonl").write_text(scores)
    (other / "results.json").unlink(missing_ok=True)
    header["scorer_hash"] = "feedfacecafe"
    (other / "scores.json").write_text(json.dumps(header))
    summary = build_leaderboard([runs_folder, other], tmp_path / "site", reports=False)
    assert summary.boards == 2 and summary.runs == 3
    page = (tmp_path / "site/index.html").read_text()
    assert page.count("<table class='board'>") == 2 and "feedfacecafe" in page


def test_nothing_to_rank_is_a_clear_error(tmp_path, runs_folder):
    with pytest.raises(LeaderboardError, match="no such folder"):
        build_leaderboard([tmp_path / "nowhere"], tmp_path / "site")
    with pytest.raises(LeaderboardError, match=r"no scored run under .* \(1 unscored"):
        build_leaderboard([runs_folder / "unscored"], tmp_path / "site")
    found, skipped = find_runs([runs_folder, runs_folder / "scored"])
    assert len(found) == 2 and len(skipped) == 1  # each run once
