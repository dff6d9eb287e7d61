"""Runs the HL7 intake in worker processes, so that message processing uses every core.

Python runs one thread at a time; an order costs a few milliseconds of CPU (decode, map, a dozen
statements), so a single process saturates one core long before the database does. The listener
keeps its connections in its event loop and hands each frame to this pool; a connection still waits
for the reply to one message before the next is processed, so order per connection is unchanged.

A worker process that dies (killed, out of memory) breaks a ``ProcessPoolExecutor``; the pool is
then replaced and the frame retried once: the intake recognises the repeat by MSH-10, so a frame
whose first attempt was committed is answered with the stored ACK, not applied twice.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import structlog

from broker.config import Settings

log = structlog.get_logger(__name__)

_intake = None  # the Intake of this worker process, built by _initialise


def _initialise(settings_json: str) -> None:
    global _intake
    # A terminal's Ctrl-C reaches the whole process group; the listener process decides when the
    # workers stop (after in-flight messages are answered), so they ignore SIGINT themselves.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from broker import logs
    from broker.runtime import build_intake

    settings = Settings.model_validate_json(settings_json)
    logs.configure(settings.log_format, settings.log_level, settings.log_patient_data)
    _intake = build_intake(settings, pool_size=2)


def _handle(raw: bytes, peer: tuple[str, int]) -> list[bytes]:
    assert _intake is not None, "worker process not initialised"
    return _intake(raw, peer)


class IntakeProcessPool:
    """A :data:`~broker.hl7.mllp.MessageHandler` that processes each message in a worker process."""

    def __init__(self, settings: Settings, processes: int) -> None:
        self._settings_json = settings.model_dump_json()
        self._processes = processes
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the listener has threads and an event loop that a fork would copy.
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(self._processes, mp_context=context, initializer=_initialise,
                                   initargs=(self._settings_json,))

    def warm_up(self) -> None:
        """Start every worker now (and fail now on a bad configuration), not on the first message."""
        futures = [self._pool.submit(_noop) for _ in range(self._processes)]
        for future in futures:
            future.result()

    def __call__(self, raw: bytes, peer: tuple[str, int]) -> list[bytes]:
        for attempt in (1, 2):
            pool = self._pool
            try:
                return pool.submit(_handle, raw, peer).result()
            except BrokenProcessPool:
                log.error("hl7.worker_process_died", attempt=attempt)
                with self._lock:
                    if self._pool is pool:
                        self._pool = self._new_pool()
        raise RuntimeError("HL7 worker processes keep dying")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)


def _noop() -> None:
    return None
