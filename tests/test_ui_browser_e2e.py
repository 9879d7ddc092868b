"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright),
over a real ``tuneq ui`` process and two real workers: a job seen moving from waiting to
running to succeeded with its progress advancing and its loss curve, a sweep's comparison
filling in, a cancel refused without the token and obeyed with it, both workers listed, and
hostile text shown as text. Screenshots of the pages go to ``$UI_SCREENSHOTS`` (the README's
come from there) or to the test's folder."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import (
    invoke_cli,
    queue_name,
    score_args,
    scoring_input,
    synthetic_reviews,
    unavailable,
    write_csv,
)
from tuneq.worker.store import get_job
from tuneq.worker.store.db import get_engine

TOKEN = "browser-test-token"
HOSTILE = "<img src=x onerror=alert(1)>"
WAIT_S = 240  # the longest any one thing may take here (two cores, two workers, a browser)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def dashboard_url(env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """A ``tuneq ui`` process on a free port, with the test's token."""
    port = free_port()
    log = open(tmp_path / "ui.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "tuneq.cli", "ui", "--port", str(port)],
        env={**os.environ, **env, "TUNEQ_UI_TOKEN": TOKEN},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/workers", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp_path / "ui.log").read_text()) from None
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture
def browser_page() -> Iterator[Any]:
    """A page in headless Chromium; every JavaScript dialog it opens is recorded."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install -e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        unavailable("Debian's chromium is not installed (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.dialogs = []
        page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
        page.set_default_timeout(WAIT_S * 1000)
        yield page
        browser.close()


def screenshot_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("UI_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def shown_status(page: Any) -> str:
    return str(page.evaluate("document.querySelector('dl.kv .status')?.textContent || ''"))


def watch(page: Any, until: Callable[[], bool], every_s: float = 0.25) -> None:
    deadline = time.monotonic() + WAIT_S
    while not until():
        assert time.monotonic() < deadline, "the page did not get there in time"
        time.sleep(every_s)


def test_the_dashboard_shows_the_queue_live_and_guards_its_actions(
    env: dict[str, str],
    dashboard_url: str,
    browser_page: Any,
    start_worker: Callable[..., Any],
    tiny_model: Path,
    reviews_csv: Path,
    trained_tiny_model: Path,
    tmp_path: Path,
) -> None:
    page, queue = browser_page, queue_name()
    engine = get_engine(env["TUNEQ_DATABASE_URL"])
    shots = screenshot_dir(tmp_path)

    # Everything is queued before any worker starts, so the page sees the jobs wait.
    base = {"data": str(reviews_csv), "model": str(tiny_model), "queue": queue, "epochs": 20,
            "batch_size": 8, "checkpoint_steps": None, "name": "tiny-ui"}  # fmt: skip
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        yaml.safe_dump({"name": "ui-lr", "base": base, "grid": {"learning_rate": [2e-3, 1e-3]}})
    )
    swept = invoke_cli(env, "sweep", str(sweep_file))
    assert swept.exit_code == 0, swept.output
    group, first, second = swept.stdout.split()
    source = scoring_input(tmp_path / "in.csv", 3000)
    scored = invoke_cli(
        env,
        *score_args(
            trained_tiny_model, source, tmp_path / "out.csv", queue, "--shard-rows", "1000"
        ),
    )
    assert scored.exit_code == 0, scored.output
    scoring_job = scored.stdout.split()[0]
    hostile = invoke_cli(env, "finetune", "--data", str(tmp_path / f"{HOSTILE}.csv"),
                         "--model", str(tiny_model), "--queue", queue)  # fmt: skip
    assert hostile.exit_code == 0, hostile.output
    hostile_job = hostile.stdout.strip()

    page.goto(f"{dashboard_url}/jobs/{first}")
    page.evaluate("window.stillTheSamePage = true")
    page.wait_for_selector("dl.kv .status")
    assert shown_status(page) == "queued"

    workers = [start_worker(env, queue), start_worker(env, queue)]
    seen = [shown_status(page)]
    finished = ("succeeded", "failed", "cancelled")

    def status_moves() -> bool:
        if (status := shown_status(page)) != seen[-1]:
            seen.append(status)
        return status in finished

    watch(page, status_moves)
    assert seen == ["queued", "running", "succeeded"], (seen, get_job(engine, first).error)
    curve = page.locator("svg.chart polyline[data-series='training loss']")
    assert len((curve.get_attribute("points") or "").split()) >= 5
    assert page.evaluate("window.stillTheSamePage") is True  # never reloaded
    page.screenshot(path=str(shots / "job.png"), full_page=True)

    page.goto(f"{dashboard_url}/groups/{group}")
    rows = page.locator("#compare tbody tr")
    statuses = rows.locator(".status")
    watch(page, lambda: statuses.all_text_contents() == ["succeeded", "succeeded"])
    headers = page.locator("#compare thead th").all_text_contents()
    assert {"job", "learning_rate", "accuracy", "macro_f1"} <= set(headers)
    assert {rows.nth(i).get_attribute("data-job") for i in range(2)} == {first, second}
    assert page.locator("svg.chart polyline").count() == 2  # both runs' loss curves
    page.screenshot(path=str(shots / "group.png"), full_page=True)

    # A long fine-tune, cancelled from its page: refused without the token, then obeyed. Its
    # 5,000 rows make it last: 100 epochs of the 200 reviews could end before the cancel.
    many = write_csv(tmp_path / "many.csv", ["text", "label"], synthetic_reviews(5000))
    long_run = invoke_cli(env, "finetune", "--data", str(many), "--model", str(tiny_model),
                          "--queue", queue, "--epochs", "100", "--name", "long")  # fmt: skip
    assert long_run.exit_code == 0, long_run.output
    long_job = long_run.stdout.strip()
    page.goto(f"{dashboard_url}/")
    card = page.locator(f".card[data-job='{long_job}']")
    watch(page, lambda: card.count() == 1 and card.locator(".progress[data-done]").count() == 1)
    page.screenshot(path=str(shots / "queue.png"), full_page=True)

    page.goto(f"{dashboard_url}/workers")
    names = page.locator("#workers tbody tr")
    watch(page, lambda: names.count() == 2)
    listed = {names.nth(i).get_attribute("data-worker") for i in range(2)}
    assert all(w.process.pid and any(n.endswith(f":{w.process.pid}") for n in listed)
               for w in workers), listed  # fmt: skip
    holder = page.locator(f"#workers tbody tr:has(a[href='/jobs/{long_job}'])")
    watch(page, lambda: holder.count() == 1)  # the worker that runs it says so
    page.screenshot(path=str(shots / "workers.png"), full_page=True)

    # Its progress is seen to advance without a reload: this run lasts until it is cancelled,
    # so two polls fall inside it on any processor (the sweep's short runs can end between two).
    page.goto(f"{dashboard_url}/jobs/{long_job}")
    page.evaluate("window.stillTheSamePage = true")
    done: list[int] = []

    def progress_moves() -> bool:
        # One read of the page, so nothing vanishes between looking and reading.
        status, number = page.evaluate(
            "[document.querySelector('dl.kv .status')?.textContent,"
            " document.querySelector('.progress[data-done]')?.dataset.done]"
        )
        if status == "running" and number is not None and (not done or int(number) != done[-1]):
            done.append(int(number))
        return len(done) >= 3 or status in finished

    watch(page, progress_moves)
    assert len(done) >= 3 and done == sorted(done), f"progress seen: {done}"
    assert page.evaluate("window.stillTheSamePage") is True
    page.click("#cancel")
    page.wait_for_selector("#notice.error")
    assert "401" in (page.locator("#notice").text_content() or "")
    time.sleep(2)
    assert get_job(engine, long_job).status == "running"
    page.fill("#token", TOKEN)
    page.dispatch_event("#token", "change")
    page.click("#cancel")
    watch(page, lambda: shown_status(page) == "cancelled")
    assert get_job(engine, long_job).status == "cancelled"

    page.goto(f"{dashboard_url}/jobs/{scoring_job}")
    watch(page, lambda: shown_status(page) in finished)
    assert shown_status(page) == "succeeded"
    assert "3000" in (page.locator("main").text_content() or "")

    page.goto(f"{dashboard_url}/jobs/{hostile_job}")
    watch(page, lambda: shown_status(page) in finished)
    error = page.locator("#error").text_content() or ""
    assert HOSTILE in error and page.locator("main img").count() == 0
    assert page.dialogs == []
    # A page whose data no longer changes is not redrawn (an open traceback stays open).
    page.evaluate("document.querySelector('#content dl').dataset.mark = 'kept'")
    time.sleep(4)  # two polls
    assert page.evaluate("document.querySelector('#content dl').dataset.mark") == "kept"

    page.goto(f"{dashboard_url}/jobs")
    page.wait_for_selector("#jobs tbody tr")
    page.select_option("select[name=status]", "succeeded")
    watch(page, lambda: page.locator("#jobs tbody tr").count() == 3)  # the sweep and the scoring
    assert "status=succeeded" in page.url
    page.select_option("select[name=status]", "")
    page.screenshot(path=str(shots / "jobs.png"), full_page=True)
    page.goto(f"{dashboard_url}/models")
    page.wait_for_selector("#models tbody tr")
    page.screenshot(path=str(shots / "models.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    page.goto(f"{dashboard_url}/jobs/{first}")
    page.wait_for_selector("svg.chart")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390 + 1
    page.screenshot(path=str(shots / "phone.png"), full_page=True)

    states = json.loads(invoke_cli(env, "jobs", "--json").stdout)
    assert {job["id"]: job["status"] for job in states}[second] == "succeeded"
