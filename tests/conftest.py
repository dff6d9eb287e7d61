"""Shared fixtures: real databases (SQLite file and a fresh PostgreSQL database) and a real listener."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from broker.mapping.rules import MappingSet, load_mappings
from broker.outbound.requestor_responses import keep_responses_for_the_caller
from broker.store import migrate
from broker.store.session import make_engine, make_session_factory
from tests.tls_support import Pki, make_pki

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "hl7"
POSTGRES_ADMIN_URL = os.environ.get("BROKER_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def pytest_configure(config: pytest.Config) -> None:
    # pynetdicom's reactor can take and drop the response a send_* call waits for
    # (broker.outbound.requestor_responses): the tests' pynetdicom clients keep their responses,
    # as the broker's own requestors do.
    keep_responses_for_the_caller()
    # In-process listeners log to structlog's default printer, and their threads may log between two
    # tests, outside pytest's capture: keep the run's output to the dots. Tests that read log events
    # use structlog.testing.capture_logs, which does not go through the logger factory.
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())


def sample(name: str) -> bytes:
    """A sample message from ``samples/hl7/``, as bytes on the wire."""
    return (SAMPLES / name).read_bytes()


@pytest.fixture(scope="session")
def mappings() -> MappingSet:
    return load_mappings(ROOT / "mappings")


def _postgres_database() -> Iterator[str]:
    name = f"broker_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def module_database(backend: str, tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[str]:
    """A fresh database of ``backend`` for a module-scoped fixture (several tests share its data); the
    PostgreSQL one is dropped when the generator is exhausted."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp(name) / 'broker.db'}"
    else:
        yield from _postgres_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'broker.db'}"
    else:
        yield from _postgres_database()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An engine on a fresh database migrated to the newest schema."""
    eng = make_engine(database_url)
    migrate.upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture
def listener(engine: Engine, mappings: MappingSet) -> Iterator[int]:
    """The real HL7 listener (MLLP over TCP on 127.0.0.1) on a free port, backed by ``sessions``."""
    from broker.hl7.mllp import MLLPServer, run_in_thread
    from broker.intake.service import Intake

    server = MLLPServer(Intake(engine, mappings), host="127.0.0.1", port=0, workers=4, idle_timeout=30)
    thread = run_in_thread(server)
    try:
        yield thread.port
    finally:
        thread.stop()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA with the broker's, the clients' and bad certificates (tests/tls_support.py), one per session."""
    return make_pki(tmp_path_factory.mktemp("pki"))
