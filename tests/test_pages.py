"""The leaderboard page: server-side HTML + inline SVG, checked in headless Chromium (Playwright)
against a seeded catalog served by uvicorn; the screenshot is kept under test-artifacts/."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from modelfactory.catalog import MetricRecord, open_catalog
from modelfactory.interfaces.server import create_app
from modelfactory.interfaces.server.plot import nice_ticks
from modelfactory.testing.browser import open_browser, screenshot_path
from modelfactory.testing.catalog import BASE_A, seed, start
from modelfactory.testing.server import catalog_app_env, serve_catalog


@pytest.fixture
def seeded_url(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    with open_catalog(url) as cat:
        yield url, seed(cat)


def test_leaderboard_in_chromium(seeded_url) -> None:
    url, seeded = seeded_url
    with serve_catalog(url) as base_url, open_browser() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        page.goto(f"{base_url}/leaderboard")
        assert page.title() == "modelfactory leaderboard"
        boards = page.locator("section.board")
        assert boards.count() == 2
        board_a = page.locator(f'section.board[data-base="{BASE_A}"]')
        rows = board_a.locator("table.leaderboard tbody tr")
        assert rows.count() == 6  # finished builds of base A: 5 passed + 1 rejected (failed runs are not builds)
        assert rows.nth(0).get_attribute("data-run") == seeded.ids["a-3g128"]
        assert "★" in rows.nth(0).inner_text() and "best" in rows.nth(0).get_attribute("class")
        assert rows.nth(5).locator("td.status").inner_text() == "rejected"
        plot = board_a.locator('svg.plot[data-plot="ppl"]')  # perplexity increase vs speed-up
        assert plot.is_visible() and plot.bounding_box()["width"] > 300
        assert plot.locator("circle.point.pass").count() == 5 and plot.locator("path.point.fail").count() == 1
        assert plot.locator("circle.best").count() == 1
        best_point = plot.locator(f'circle.point[data-run="{seeded.ids["a-3g128"]}"]')
        assert "ppl +2.5%" in best_point.locator("title").text_content()
        page.screenshot(path=str(screenshot_path("leaderboard.png")), full_page=True)

        kld = board_a.locator('svg.plot[data-plot="kld"]')  # size ratio against KL divergence from fp16
        assert kld.is_visible() and "KL divergence from fp16" in kld.text_content()
        assert kld.locator("circle.point.pass").count() == 5 and kld.locator("path.point.fail").count() == 1
        assert "KL 0.2" in kld.locator(f'path.point[data-run="{seeded.ids["a-2g64"]}"] title').text_content()
        assert "100.2" in rows.nth(4).inner_text()  # a-8g128's task recovery column

        page.goto(f"{base_url}/?x=size")  # the same page at /, size ratio on the x axis
        assert "disk size ratio" in page.locator("section.board svg").first.text_content()
        page.screenshot(path=str(screenshot_path("leaderboard-size.png")), full_page=True)
    assert screenshot_path("leaderboard.png").stat().st_size > 10_000


def test_leaderboard_html_without_browser(seeded_url) -> None:
    url, _seeded = seeded_url
    with catalog_app_env(url), TestClient(create_app()) as client:
        html = client.get("/leaderboard", params={"base": BASE_A}).text
        assert html.count('<section class="board"') == 1 and "<script" not in html and "http" not in html.split(
            "<body>")[1].replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched from elsewhere
        assert client.get("/leaderboard", params={"base": "org/none"}).status_code == 404
        assert client.get("/leaderboard", params={"x": "ppl"}).status_code == 422
        assert html.count('data-plot="kld"') == 1 and "<th>KL</th><th>top-1 %</th><th>recovery %</th>" in html


def test_kld_plot_only_for_builds_that_measured_it() -> None:
    from datetime import UTC, datetime

    from modelfactory.catalog.records import Board, RunRow
    from modelfactory.interfaces.server.pages import kld_plot

    def row(name: str, kld: float | None, status: str = "passed") -> RunRow:
        return RunRow(id=f"{name}-0000", name=name, status=status, run_key="k", base_uri="org/b", base_sha="s" * 40,
                      started_at=datetime(2026, 1, 1, tzinfo=UTC), finished_at=None, error=None, config="c", bits=4,
                      group_size=128, desc_act=False, adapters=(), ppl_increase_pct=1.0, decode_speedup=1.2,
                      size_ratio=0.3, memory_ratio=0.3, kld_mean=kld)

    old = Board(base_uri="org/b", base_sha="s" * 40, runs=1, rows=(row("old", None),))
    assert kld_plot(old, None) == ""  # runs recorded before KL divergence existed: no second plot
    svg = kld_plot(Board(base_uri="org/b", base_sha="s" * 40, runs=3, rows=(
        row("a", 0.02), row("b", 0.31, "rejected"), row("old", None))), best_id="a-0000")
    assert svg.count('class="point') == 2 and 'class="best"' in svg and "KL 0.31 (rejected)" in svg
    assert "disk size ratio" in svg and "KL divergence from fp16, mean" in svg


def test_every_value_on_the_page_is_escaped(tmp_path: Path) -> None:
    """Run names, base URIs and adapters come from specs people write: the templates escape them
    (Jinja2 autoescape) in the table, the headings, the attributes and the plots' tooltips alike."""
    hostile = '<img src=x onerror="alert(1)">'
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    with open_catalog(url) as cat:
        run_id = start(cat, name=hostile)
        cat.set_sources(run_id=run_id, base_uri=f"org/{hostile}", base_sha="f" * 40,
                        adapters=[{"uri": hostile, "sha": "e" * 40, "weight": 1.0}])
        cat.record_metrics(run_id=run_id, metrics=[
            MetricRecord(name, "delta", value, unit) for name, value, unit in (
                ("ppl_increase_pct", 1.0, "%"), ("decode_speedup", 1.5, "x"), ("size_ratio", 0.3, "x"),
                ("memory_ratio", 0.3, "x"), ("kld_mean", 0.02, "nats"))])
        cat.finish_run(run_id=run_id, status="passed")
    with catalog_app_env(url), TestClient(create_app()) as client:
        html = client.get("/leaderboard").text
    escaped = "&lt;img src=x onerror="
    assert "<img" not in html and 'onerror="' not in html
    assert html.count(escaped) >= 6  # name and adapter cells, base in data-base / h2, both plots' tooltips
    assert html.count(f"<title>{run_id[:8]} {escaped}") == 2


def test_empty_catalog_page(tmp_path: Path) -> None:
    with catalog_app_env(f"sqlite:///{tmp_path / 'new' / 'catalog.db'}"), TestClient(create_app()) as client:
        page = client.get("/")  # a brand-new embedded catalog is created, not refused
        assert page.status_code == 200 and "No finished builds" in page.text


def test_nice_ticks() -> None:
    assert nice_ticks(0.9, 2.1) == [0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25]
    assert nice_ticks(0, 9) == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(1.0, 1.0) == [1.0, 1.2, 1.4, 1.6, 1.8, 2.0]  # a single value gets a unit range
