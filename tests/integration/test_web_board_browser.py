"""The status board in a real headless Chromium (Debian's ``chromium``, driven by Playwright): a real
``broker run`` on free ports; an HL7 order over MLLP appears on the open page, and an MPPS N-CREATE
from a pynetdicom modality turns it STARTED live, without a reload. A screenshot of the board is saved
as ``tests/artifacts/status-board.png`` (the directory's contents are ignored by git)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep

from broker.hl7.mllp_client import MLLPClient
from tests.conftest import ROOT, sample
from tests.events_support import mpps_create
from tests.integration.test_cli import broker_run, env_for, free_port

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts"
TOKEN = "board-reader-0123456789"
STUDY_UID = "1.2.826.0.1.3680043.10.543.77001"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[int, int, int]]:
    """(HL7 port, DICOM port, HTTP port) of a running ``broker run`` on a fresh SQLite database."""
    ports = free_port(), free_port(), free_port()
    env = env_for(f"sqlite:///{tmp_path / 'broker.db'}", BROKER_HL7_PORT=str(ports[0]),
                  BROKER_DICOM_PORT=str(ports[1]), BROKER_HTTP_PORT=str(ports[2]), BROKER_HTTP_HOST="127.0.0.1",
                  BROKER_API_TOKENS=f"{TOKEN}:read")
    with broker_run(env, *ports, stderr=subprocess.DEVNULL):
        yield ports


def todays_order() -> bytes:
    """The sample order, scheduled today at 09:30 (the board shows today)."""
    return sample("orm_o01_new.hl7").replace(b"20261123093000", date.today().strftime("%Y%m%d").encode() + b"093000")


def start_procedure(dicom_port: int) -> None:
    ae = AE(ae_title="CT01")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", dicom_port, ae_title="BROKER")
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_create(mpps_create(STUDY_UID, "SPS77001"), ModalityPerformedProcedureStep,
                                        generate_uid())
        assert status and status.Status == 0x0000
    finally:
        assoc.release()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (make test installs it)")
def test_board_shows_an_order_and_its_status_live(broker: tuple[int, int, int]) -> None:
    from playwright.sync_api import expect, sync_playwright

    hl7_port, dicom_port, http_port = broker
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"http://127.0.0.1:{http_port}/board")
            expect(page.locator("#groups")).to_contain_text("Enter an API token")
            page.fill("#token", TOKEN)
            page.click("#token-form button")
            expect(page.locator("#live")).to_have_text("live")
            expect(page.locator("#groups")).to_contain_text("No procedures")
            page.evaluate("window.notReloaded = true")

            with MLLPClient("127.0.0.1", hl7_port) as client:
                assert b"MSA|AA" in client.send(todays_order())
            card = page.locator('.card[data-accession="ACC77001"]')
            expect(card).to_have_attribute("data-state", "SCHEDULED")
            expect(card).to_contain_text("LLER, ERIKA")
            expect(page.locator('.group[data-group="CT"]')).to_be_visible()

            start_procedure(dicom_port)
            expect(card).to_have_attribute("data-state", "STARTED")
            expect(card.locator(".state")).to_have_text("STARTED")
            assert page.evaluate("window.notReloaded") is True  # changed live, the page was not reloaded
            expect(page.locator('#turnaround dd[data-figure="order_to_start"]')).to_contain_text("(1)")
            expect(page.locator("#chart svg rect.bar-total")).to_have_count(1)

            page.select_option("#f-group", "room")  # the EPICRIS mapping assigns CT orders to station CT01
            expect(page.locator('.group[data-group="CT01"] .card[data-accession="ACC77001"]')).to_be_visible()
            page.select_option("#f-group", "modality")
            page.select_option("#f-status", "COMPLETED")
            expect(card).to_have_count(0)
            page.select_option("#f-status", "STARTED")
            expect(card).to_have_count(1)

            card.click()
            expect(page.locator("#detail-body")).to_contain_text("STARTED")
            expect(page.locator("#detail-body")).to_contain_text("MPPS")
            page.screenshot(path=str(ARTIFACTS / "status-board.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "status-board.png").stat().st_size > 10_000
