"""The decision log's writer: off the request path, bounded, its records unchanged.

Real logging handlers and the real writer thread. The one stand-in: a writer that cannot
keep up is made by holding its lock (a stalled disk or a blocked stderr pipe cannot be
made on cue), and it is named where it is done.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.pipeline.decide import log_decision
from gateway.pipeline.decision_log import DecisionLog, flush_decisions
from gateway.policy.engine import InferDecision, decision_record
from gateway.policy.facts import IdentityFacts
from gateway.telemetry import DECISIONS_LOGGER, PROCESS_METRICS, JsonFormatter, Telemetry

WHO = IdentityFacts("spiffe://ztgate.test/client/demo", "demo", "", "", "CN=client CA", "1f")


def allowed(decision_id: str = "d" * 32) -> InferDecision:
    return InferDecision(
        decision_id,
        True,
        ("none",),
        {"none": ("n1",)},
        None,
        ("apps-call-iris",),
        (),
        "h" * 64,
        "allowed by apps-call-iris",
        {},
    )


class Lines(logging.Handler):
    """The decision logger's records as the JSON formatter writes them, and by thread."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, object]] = []
        self.threads: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))
        self.threads.add(record.threadName or "")


@pytest.fixture
def lines() -> Iterator[Lines]:
    logger = logging.getLogger(DECISIONS_LOGGER)
    handler, level = Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    flush_decisions()  # nothing an earlier test queued lands here
    handler.lines.clear()
    try:
        yield handler
    finally:
        flush_decisions()
        logger.removeHandler(handler)
        logger.setLevel(level)


def dropped() -> float:
    value = PROCESS_METRICS.registry.get_sample_value("ztgate_decision_log_dropped_total")
    return value or 0.0


def test_a_record_is_written_by_the_writer_thread_unchanged_with_its_request_id(
    lines: Lines,
) -> None:
    with Telemetry().request("r" * 32, "infer", {}):
        log_decision(allowed(), WHO, "iris", "none")
    flush_decisions()
    [line] = lines.lines
    # The request's envelope, though written after the request's scope ended.
    assert line.pop("request_id") == "r" * 32 and line.pop("level") == "info"
    assert line.pop("logger") == DECISIONS_LOGGER
    # The record is decision_record's, at the time of the decision.
    when = dt.datetime.fromisoformat(str(line["time"]))
    assert line == decision_record(allowed(), WHO, "iris", "none", now=when)
    assert line["result"] == "allow" and line["nodes"] == ["n1"]


def test_the_request_path_only_queues_the_record(lines: Lines) -> None:
    writer = DecisionLog()
    assert all(writer.put(allowed(), WHO, "iris", "none") for _ in range(50))
    # No flush: the writer thread writes them, not the thread that queued them.
    pause = threading.Event()
    for _ in range(3000):  # a bound on a wait, not an assertion on time
        if len(lines.lines) == 50:
            break
        pause.wait(0.01)
    assert len(lines.lines) == 50 and lines.threads == {"ztgate-decision-log"}


def test_a_full_queue_drops_and_counts_and_never_blocks(lines: Lines) -> None:
    writer = DecisionLog(capacity=3)
    before = dropped()
    # The stand-in for a writer that cannot keep up: its lock is held, so it drains nothing.
    with writer._writing:
        queued = [writer.put(allowed(f"{i:032x}"), WHO, "iris", "none") for i in range(5)]
        assert queued == [True, True, True, False, False]
        assert dropped() == before + 2 and len(writer) == 3
    writer.flush()
    # The records that fitted are written, in order, and nothing else.
    assert [line["decision_id"] for line in lines.lines] == [f"{i:032x}" for i in range(3)]
    # Control: with room again, nothing is dropped.
    assert writer.put(allowed(), WHO, "iris", "none") and dropped() == before + 2
    writer.flush()
    assert len(lines.lines) == 4


def test_an_exit_flush_gives_up_on_a_stalled_writer_instead_of_hanging(lines: Lines) -> None:
    writer = DecisionLog()
    writer.put(allowed(), WHO, "iris", "none")
    held = threading.Event()
    release = threading.Event()

    def stalled_sink() -> None:  # the stand-in for a writer blocked on a full pipe or disk
        with writer._writing:
            held.set()
            release.wait(30)

    t = threading.Thread(target=stalled_sink)
    t.start()
    try:
        assert held.wait(30)
        assert writer.flush(timeout_s=0.1) is False and len(writer) == 1
    finally:
        release.set()
        t.join(30)
    # Control: the same flush with the writer free writes the record.
    assert writer.flush(timeout_s=0.1) is True and len(writer) == 0
    assert len(lines.lines) == 1


def test_a_disabled_decision_log_queues_nothing() -> None:
    logger = logging.getLogger(DECISIONS_LOGGER)
    level = logger.level
    logger.setLevel(logging.WARNING)
    handler = Lines()
    logger.addHandler(handler)
    try:
        log_decision(allowed(), WHO, "iris", "none")
        flush_decisions()
        assert handler.lines == []
        logger.setLevel(logging.INFO)  # control: the same call, enabled, is written
        log_decision(allowed(), WHO, "iris", "none")
        flush_decisions()
        assert len(handler.lines) == 1
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_bad_record_does_not_stop_the_writer(lines: Lines) -> None:
    writer = DecisionLog()
    stream = io.StringIO()
    broken = IdentityFacts(object(), "x")  # type: ignore[arg-type]  # not JSON-able
    quiet = logging.getLogger("gateway.pipeline.decision_log")
    handler = logging.StreamHandler(stream)
    quiet.addHandler(handler)
    quiet.propagate = False
    try:
        with writer._writing:  # both queued before either is written
            writer.put(allowed(), broken, "iris", "none")
            writer.put(allowed(), WHO, "iris", "none")
        writer.flush()
    finally:
        quiet.removeHandler(handler)
        quiet.propagate = True
    assert [line["decision_id"] for line in lines.lines] == ["d" * 32]
    assert "could not be written" in stream.getvalue()


EXIT_SCRIPT = """
import logging, sys
from gateway.pipeline.decide import log_decision
from gateway.telemetry import configure_logging
from tests.test_decision_log import WHO, allowed
configure_logging("info")
for i in range(int(sys.argv[1])):
    log_decision(allowed(f"{i:032x}"), WHO, "iris", "none")
"""  # and exits at once, with records still queued


def test_records_queued_at_exit_are_written() -> None:
    count = 2000
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(count)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ids = [json.loads(line)["decision_id"] for line in done.stderr.splitlines()]
    assert ids == [f"{i:032x}" for i in range(count)]  # all of them, in order
