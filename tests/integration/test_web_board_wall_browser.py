"""The status board as a department sees it, in a real headless Chromium (Debian's ``chromium``, driven by
Playwright) against a real ``broker run`` whose zone (Europe/Berlin) is not the browser's (New York):

* the wall view at 1920x1080 with a wall token: initials and last digits, never a full name; the clock
  and the day in the broker's zone; a column too long for the screen cycles its pages; a delay appears
  live when its time comes, without a reload; after the broker restarts the page reconnects by itself;
* the desk view on a phone (390x844) with a read token: full names, delay labels, the timeline opened from
  the keyboard, causes as people read them with the UID behind a details toggle;
* both pages pass axe-core's WCAG 2.1 A and AA rules (axe-core from tests/js, run in the page).

Screenshots are kept under ``tests/artifacts/`` (ignored by git).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep

from broker.hl7.mllp_client import MLLPClient
from tests.conftest import ROOT
from tests.events_support import mpps_create
from tests.integration.test_cli import broker_run, env_for, free_port
from tests.integration.test_web_board_api import order
from tests.integration.test_web_board_browser import ARTIFACTS, CHROMIUM

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed "
                                                                     "(make test installs it)")]
READ = "desk-reader-0123456789"
WALL = "corridor-wall-0123456789"
ZONE = ZoneInfo("Europe/Berlin")
BROWSER_ZONE = "America/New_York"
AXE = ROOT / "tests" / "js" / "node_modules" / "axe-core" / "axe.min.js"
WCAG_AA = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]


class Broker:
    """A ``broker run`` on fixed ports and one SQLite database, which a test may stop and start again."""

    def __init__(self, tmp: Path) -> None:
        self.hl7, self.dicom, self.http = free_port(), free_port(), free_port()
        self.env = env_for(f"sqlite:///{tmp / 'broker.db'}", BROKER_HL7_PORT=str(self.hl7),
                           BROKER_DICOM_PORT=str(self.dicom), BROKER_HTTP_PORT=str(self.http),
                           BROKER_HTTP_HOST="127.0.0.1", BROKER_API_TOKENS=f"{READ}:read,{WALL}:wall",
                           BROKER_TIMEZONE=ZONE.key, BROKER_BOARD_START_LATE_MINUTES="1")
        self._stack: ExitStack | None = None
        self.sent = 0

    def start(self) -> None:
        self._stack = ExitStack()
        self._stack.enter_context(broker_run(self.env, self.hl7, self.dicom, self.http, stderr=subprocess.DEVNULL))

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http}{path}"

    def send(self, start: datetime, **fields: Any) -> int:
        """Send an order scheduled at ``start`` (Berlin wall clock); its number (accession ACC8<nnnn>)."""
        self.sent += 1
        with MLLPClient("127.0.0.1", self.hl7) as client:
            assert b"MSA|AA" in client.send(order(self.sent, start.replace(tzinfo=None), **fields))
        return self.sent


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    running = Broker(tmp_path_factory.mktemp("board"))
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser: Any, width: int, height: int) -> Any:
    assert AXE.is_file(), "axe-core is missing: npm ci --prefix tests/js (tests/ensure_services.sh does it)"
    context = browser.new_context(viewport={"width": width, "height": height}, timezone_id=BROWSER_ZONE,
                                  locale="en-US")
    context.add_init_script(path=str(AXE))  # before the page's own scripts, outside its CSP
    return context.new_page()


def axe_violations(page: Any) -> list[str]:
    """axe-core's WCAG 2.1 A/AA violations on the page as it is now: rule id and the elements."""
    result = page.evaluate("tags => axe.run(document, {runOnly: {type: 'tag', values: tags}})", WCAG_AA)
    return [f"{v['id']}: {[n['target'] for n in v['nodes']][:3]}" for v in result["violations"]]


def berlin_now() -> datetime:
    return datetime.now(ZONE)


def test_wall_view_privacy_pages_and_a_delay_that_appears_live(broker: Broker, browser: Any) -> None:
    from playwright.sync_api import expect

    now = berlin_now()
    early = max(now - timedelta(minutes=40), now.replace(hour=0, minute=1))
    broker.send(early)  # MÜLLER^ERIKA^A: late already
    broker.send(early, name=b"SCHMIDT^KARL", modality=b"MR")
    for minutes in range(1, 15):  # more CT than fit in one column: its pages cycle
        broker.send(min(now + timedelta(minutes=10 * minutes), now.replace(hour=23, minute=59)),
                    name=b"BECKER^ANNA")
    page = open_page(browser, 1920, 1080)
    page.goto(broker.url(f"/board?wall=1#token={WALL}"))
    expect(page.locator("#conn")).to_have_text("Live")
    assert "token" not in page.url  # taken from the fragment, kept in this browser only
    ct = page.locator('.column[data-key="CT"]')
    expect(ct.locator(".item")).to_have_count(15)
    expect(page.locator('.column[data-key="MR"] .patient')).to_have_text("S.K. ·0002")
    text = page.locator("body").inner_text()
    for name in ("MÜLLER", "ERIKA", "SCHMIDT", "BECKER", "1962"):
        assert name not in text
    assert "M.E.A. ·0001" in text
    expect(page.locator("#wall-date")).to_have_text(berlin_now().date().isoformat())
    expect(page.locator("#zone")).to_have_text(ZONE.key)  # the browser's zone differs: the zone is named
    assert page.locator("#clock").inner_text() in {f"{berlin_now() - timedelta(minutes=m):%H:%M}" for m in (0, 1)}
    if now - early >= timedelta(minutes=2):
        expect(ct.locator(".item").first.locator(".flag")).to_contain_text("Late: not started")
    expect(ct.locator(".page")).to_have_text("page 1/2")
    page.evaluate("window.notReloaded = true")
    page.screenshot(path=str(ARTIFACTS / "board-wall-1920x1080.png"))
    assert axe_violations(page) == []

    # Due in 4 s: one minute (BROKER_BOARD_START_LATE_MINUTES) after a start 56 s ago.
    soon = broker.send(berlin_now().replace(microsecond=0) - timedelta(seconds=56), name=b"WAGNER^PETRA")
    item = ct.locator(f'.item[data-id="{soon + 0}"]')
    expect(item).to_have_count(1)
    expect(item).not_to_have_class("item s-SCHEDULED flagged")
    expect(item).to_have_class("item s-SCHEDULED flagged", timeout=15_000)
    expect(item.locator(".flag")).to_contain_text("Late: not started")
    expect(page.locator("#wall-alerts")).to_contain_text("delayed")
    expect(ct.locator(".page")).to_have_text("page 2/2", timeout=10_000)  # the column's pages turn
    assert page.evaluate("window.notReloaded") is True


def test_desk_on_a_phone_keyboard_timeline_and_contrast(broker: Broker, browser: Any) -> None:
    from playwright.sync_api import expect

    number = broker.send(berlin_now(), name=b"KLEIN^JONAS")
    start_procedure(broker.dicom, number)
    page = open_page(browser, 390, 844)
    page.goto(broker.url("/board"))
    page.fill("#token", READ)
    page.click("#token-form button")
    expect(page.locator("#live")).to_have_text("live")
    expect(page.locator("#f-date")).to_have_value(berlin_now().date().isoformat())  # the broker's today
    expect(page.locator("#zone-note")).to_have_text(f"times: {ZONE.key}")
    card = page.locator(f'.card[data-accession="ACC8{number:04d}"]')
    expect(card).to_have_attribute("data-state", "STARTED")
    expect(card).to_contain_text("KLEIN, JONAS")  # the desk keeps full names for token holders
    expect(page.locator('#modalities tr[data-modality="CT"]')).to_be_visible()

    page.locator("#f-patient").focus()  # from the last filter, Tab reaches the cards
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.dataset.accession") == f"ACC8{number:04d}":
            break
    else:
        raise AssertionError("Tab never reached the card")
    page.keyboard.press("Enter")
    timeline = page.locator("#detail-body")
    expect(timeline).to_contain_text("MPPS from CT01: in progress")
    assert "1.2.826" not in timeline.inner_text()  # the UID is behind the details toggle
    timeline.locator("details summary").first.click()
    expect(timeline.locator("details code").first).to_contain_text("mpps 1.2.")
    page.screenshot(path=str(ARTIFACTS / "board-desk-390x844.png"), full_page=True)
    assert axe_violations(page) == []
    metrics = httpx.get(broker.url("/metrics"), headers={"Authorization": f"Bearer {READ}"}).text
    assert 'broker_board_delays{modality="CT",rule="not_started"}' in metrics  # registered in broker run too


def test_the_wall_reconnects_by_itself_after_the_broker_restarts(broker: Broker, browser: Any) -> None:
    from playwright.sync_api import expect

    page = open_page(browser, 1920, 1080)
    page.goto(broker.url(f"/board?wall=1#token={WALL}"))
    expect(page.locator("#conn")).to_have_text("Live")
    page.evaluate("window.notReloaded = true")
    broker.stop()
    expect(page.locator("#conn")).to_have_text("Offline — reconnecting")
    broker.start()
    expect(page.locator("#conn")).to_have_text("Live", timeout=30_000)
    number = broker.send(berlin_now() + timedelta(minutes=1), name=b"NEU^NACH", modality=b"US")
    expect(page.locator(f'.column[data-key="US"] .item[data-id="{number}"]')).to_have_count(1)
    assert page.evaluate("window.notReloaded") is True


def start_procedure(dicom_port: int, number: int) -> None:
    """An MPPS N-CREATE (IN PROGRESS) from modality CT01 for order ``number``."""
    ae = AE(ae_title="CT01")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", dicom_port, ae_title="BROKER")
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_create(mpps_create(f"1.2.826.0.1.3680043.10.543.8{number:04d}", f"SPS8{number:04d}"),
                                        ModalityPerformedProcedureStep, generate_uid())
        assert status and status.Status == 0x0000
    finally:
        assoc.release()
