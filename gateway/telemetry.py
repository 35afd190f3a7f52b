"""Observability in one place: traces (OpenTelemetry), the request path's metrics, log format.

Traces. Off unless the standard ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``,
``console``, or any installed ``opentelemetry_traces_exporter`` entry point); the SDK then
reads the rest of its ``OTEL_*`` variables itself (``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_EXPORTER_OTLP_*``,
``OTEL_BSP_*``); ``OTEL_SDK_DISABLED=true`` wins. Off, a stage costs one global lookup and
a timer: no tracer, no context, no SDK call (bench/telemetry.py). On, each request is one
trace: a root span per API request (the client's W3C ``traceparent`` is its parent), a
span per pipeline stage, and a child of ``verify`` per node attempt the router makes.

What a span may carry is fixed here (`Attr`, `_failed`): ids the gateway made, names from
configuration (model, mode, node, region, provider, policy ids), counts and problem types.
Never payloads, tensors, salts, keys, exception messages (they may quote client text) or
client headers. Node channels are not instrumented and nodes get no trace context: one
trace id on every copy of a request would let colluding nodes recognise the copies. The
provider is this module's own, never the process-global one, so nothing that reads the
global provider (an instrumented gRPC channel, say) can start propagating ours.

Logs. `configure_logging` sets one format for every logger: JSON lines with ``time``,
``level``, ``logger``, ``message``, ``request_id`` and ``trace_id`` (while a request is in
progress), or text. Decision-log records (already JSON objects) keep their fields and
gain the same envelope keys, so every line on the stream is one JSON object.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib.metadata import entry_points
from types import TracebackType
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.protocol.problems import PROBLEM_BASE, Overloaded, Problem, RateLimited

if TYPE_CHECKING:
    from collections.abc import Callable

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

    from gateway.receipts.service import ReceiptService

__all__ = [
    "PROCESS_METRICS",
    "Children",
    "CountOf",
    "ReceiptMetrics",
    "RequestScope",
    "Stage",
    "Telemetry",
    "configure_logging",
    "current_request",
    "enable_tracing",
    "note",
    "problem_slug",
    "setup_tracing",
    "shutdown_tracing",
    "span",
    "timed",
    "tracing_enabled",
]

log = logging.getLogger(__name__)

Attr = str | int | float | bool

# None: tracing off (the default). Set only by `setup_tracing` / `enable_tracing`.
_tracer: Tracer | None = None
_provider: TracerProvider | None = None

STAGE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
LIMIT_STAGES = frozenset({"admission", "rate_limit"})
SLOW_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


# --- tracing setup ---------------------------------------------------------------------
def tracing_enabled() -> bool:
    return _tracer is not None


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "none").split(",")]
    return [n for n in names if n and n != "none"]


def _exporter(name: str, environ: Mapping[str, str]) -> SpanExporter:
    if name == "otlp":  # the spec's name; the protocol picks the package's entry point
        protocol = environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        )
        name = "otlp_proto_http" if protocol.startswith("http") else "otlp_proto_grpc"
    found = list(entry_points(group="opentelemetry_traces_exporter", name=name))
    if not found:
        raise ValueError(f"OTEL_TRACES_EXPORTER: no trace exporter {name!r} is installed")
    made: SpanExporter = found[0].load()()
    return made


def setup_tracing(environ: Mapping[str, str] | None = None) -> bool:
    """Tracing as the standard OTEL_* variables say; off (and nothing imported from the
    SDK) unless OTEL_TRACES_EXPORTER names an exporter. True if tracing is on."""
    env = os.environ if environ is None else environ
    names = _exporter_names(env)
    if not names:
        return False
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    enable_tracing([BatchSpanProcessor(_exporter(n, env)) for n in names])
    log.info("tracing on: exporters %s", ", ".join(names))
    return True


def enable_tracing(processors: Iterable[Any]) -> TracerProvider:
    """Turn tracing on with these span processors (tests: a SimpleSpanProcessor around an
    InMemorySpanExporter). Replaces any provider set before."""
    global _tracer, _provider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    shutdown_tracing()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "ztgate"}), shutdown_on_exit=False
    )
    for p in processors:
        provider.add_span_processor(p)
    _provider, _tracer = provider, provider.get_tracer("ztgate")
    return provider


def shutdown_tracing() -> None:
    """Flush and stop the exporters; tracing is off afterwards."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


# --- spans -----------------------------------------------------------------------------
def problem_slug(exc: BaseException) -> str:
    """The short problem type (``rate-limited``), or ``internal`` for anything else."""
    if isinstance(exc, Problem):
        return exc.type.removeprefix(PROBLEM_BASE)
    return "internal"


def _failed(span: Span, exc: BaseException) -> None:
    """A span that ended in an error: the problem's type and fixed title, never its detail
    (which may quote client text) nor a stack trace."""
    from opentelemetry.trace import Status, StatusCode

    if isinstance(exc, Problem):
        span.set_attribute("ztgate.problem_type", problem_slug(exc))
        decision_id = exc.extra.get("decision_id")
        if isinstance(decision_id, str):
            span.set_attribute("ztgate.decision_id", decision_id)
        span.set_status(Status(StatusCode.ERROR, exc.title))
    else:
        span.set_attribute("error.type", type(exc).__qualname__)
        span.set_status(Status(StatusCode.ERROR))


class Stage:
    """One timed step: observes `seconds` (if given) and, with tracing on, is a span.

    ``with telemetry.stage("policy") as s: ...; s.set(decision_id=...)``. Attributes are
    named ``ztgate.<key>``; None values are left out."""

    __slots__ = ("_attrs", "_cm", "_limited", "_name", "_seconds", "_start", "span")

    def __init__(
        self,
        name: str,
        seconds: Any,  # a Histogram child, or None
        attrs: dict[str, Attr | None],
        limited: Any = None,  # a Counter child: refusals by a rate or concurrency limit
    ) -> None:
        self._name = name
        self._seconds = seconds
        self._attrs = attrs
        self._limited = limited
        self._cm: Any = None
        self._start = 0.0
        self.span: Span | None = None

    def __enter__(self) -> Stage:
        self._start = time.perf_counter()
        tracer = _tracer
        if tracer is not None:
            self._cm = tracer.start_as_current_span(
                f"ztgate.{self._name}",
                attributes=_clean(self._attrs),
                record_exception=False,
                set_status_on_exception=False,
            )
            self.span = self._cm.__enter__()
        return self

    def set(self, **attrs: Attr | None) -> None:
        if self.span is not None:
            self.span.set_attributes(_clean(attrs))

    def __exit__(
        self,
        et: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._seconds is not None:
            self._seconds.observe(time.perf_counter() - self._start)
        if self._limited is not None and isinstance(exc, RateLimited | Overloaded):
            self._limited.inc()
        if self._cm is not None:
            if exc is not None and self.span is not None:
                _failed(self.span, exc)
            self._cm.__exit__(et, exc, tb)


def _clean(attrs: Mapping[str, Attr | None]) -> dict[str, Attr]:
    return {f"ztgate.{k}": v for k, v in attrs.items() if v is not None}


def span(name: str, **attrs: Attr | None) -> Stage:
    """A span without a latency histogram (a node attempt)."""
    return Stage(name, None, attrs)


def timed(name: str, seconds: Histogram, **attrs: Attr | None) -> Stage:
    """A span that also observes `seconds` (a proof check, an MPC inference)."""
    return Stage(name, seconds, attrs)


# --- the request in progress -----------------------------------------------------------
class RequestScope:
    """One API request: its root span, its id for log lines, and what the stages learnt
    about it (model, mode) for the request counter."""

    __slots__ = ("_counter", "_token", "mode", "model", "request_id", "route", "stage")

    def __init__(
        self, request_id: str, route: str, stage: Stage, counter: Children | None = None
    ) -> None:
        self.request_id = request_id
        self.route = route
        self.stage = stage
        self._counter = counter  # ztgate_infer_requests_total's children, for inferences
        self.model = ""  # a registered model's name, never the client's path text
        self.mode = ""
        self._token: contextvars.Token[RequestScope | None] | None = None

    def __enter__(self) -> RequestScope:
        self._token = _CURRENT.set(self)
        self.stage.__enter__()
        return self

    def __exit__(
        self,
        et: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stage.set(model=self.model or None, mode=self.mode or None)
        self.stage.__exit__(et, exc, tb)
        if self._token is not None:
            _CURRENT.reset(self._token)
        if self._counter is not None:
            outcome = "ok" if exc is None else problem_slug(exc)
            self._counter(self.model, self.mode, outcome).inc()


_CURRENT: contextvars.ContextVar[RequestScope | None] = contextvars.ContextVar(
    "ztgate_request", default=None
)


def current_request() -> RequestScope | None:
    return _CURRENT.get()


def note(*, model: str | None = None, mode: str | None = None) -> None:
    """What a stage learnt about the request in progress (a registered model's name, the
    mode chosen), for its root span and the request counter."""
    scope = _CURRENT.get()
    if scope is not None:
        if model is not None:
            scope.model = model
        if mode is not None:
            scope.mode = mode


def _parent(headers: Mapping[str, str]) -> Any:
    """The client's W3C trace context (traceparent, tracestate), nothing else: no baggage."""
    if "traceparent" not in headers:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(headers)


# --- metrics ---------------------------------------------------------------------------
class Children:
    """A labelled metric's children, each looked up once: `.labels()` validates and joins
    its values on every call (~1.5 us), a dict hit costs ~0.1 us, and the request path
    makes three such look-ups per request. Label values here come from small sets
    (routes, status codes, registered models, modes, problem types); past `MAX` keys a
    look-up is simply not remembered, so a surprise cannot grow the dict."""

    __slots__ = ("_children", "_metric")
    MAX = 4096

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._metric.labels(*values)
            if len(self._children) < self.MAX:
                self._children[values] = child
        return child


class ProcessMetrics(Collector):
    """Counted where no gateway object is at hand (a mode, the decision log): one set per
    process, which is one replica. Every gateway registers it on its own registry."""

    def __init__(self) -> None:
        reg = CollectorRegistry(auto_describe=True)
        self.registry = reg
        self.proof_seconds = Histogram(
            "ztgate_zk_proof_verify_seconds",
            "Time to verify one zk proof on the gateway (worker process included)",
            registry=reg,
            buckets=SLOW_BUCKETS,
        )
        self.mpc_seconds = Histogram(
            "ztgate_mpc_inference_seconds",
            "Time of one MPC inference across the parties",
            registry=reg,
            buckets=SLOW_BUCKETS,
        )
        self.denials = Counter(
            "ztgate_policy_denials",
            "Inference requests denied, by determining policy id (default-deny: no permit matched)",
            ["policy"],
            registry=reg,
        )
        self.decision_log_dropped = Counter(
            "ztgate_decision_log_dropped",
            "Decision-log records dropped because the log's writer queue was full",
            registry=reg,
        )

    def collect(self) -> Iterator[Any]:
        return iter(self.registry.collect())

    def denied(self, policies: Sequence[str]) -> None:
        for p in policies or ("default-deny",):
            self.denials.labels(p).inc()


PROCESS_METRICS = ProcessMetrics()


class Telemetry:
    """A gateway's request-path metrics (on its registry) and its span helpers."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.stage_seconds = Histogram(
            "ztgate_stage_duration_seconds",
            "Time spent in each request pipeline stage",
            ["stage"],
            registry=registry,
            buckets=STAGE_BUCKETS,
        )
        self.infer_requests = Counter(
            "ztgate_infer_requests",
            "Inference requests by model, mode and outcome (ok or the problem type)",
            ["model", "mode", "outcome"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "ztgate_rate_limit_rejections",
            "Requests refused by a rate or concurrency limit, by stage (admission, rate_limit)",
            ["stage"],
            registry=registry,
        )
        self._children: dict[str, tuple[Any, Any]] = {}
        self._infer_counts = Children(self.infer_requests)
        if registry is not None:
            registry.register(PROCESS_METRICS)

    def stage(self, name: str, **attrs: Attr | None) -> Stage:
        children = self._children.get(name)
        if children is None:
            limited = self.rate_limited.labels(name) if name in LIMIT_STAGES else None
            children = self._children[name] = (self.stage_seconds.labels(name), limited)
        return Stage(name, children[0], attrs, children[1])

    def request(self, request_id: str, route: str, headers: Mapping[str, str]) -> RequestScope:
        """The root of a request's trace (a child of the client's W3C traceparent, if it
        sent one), its id for log lines; an inference is counted by model, mode, outcome."""
        attrs: dict[str, Attr | None] = {"request_id": request_id, "route": route}
        stage = Stage("request", None, attrs)
        if _tracer is not None:
            stage = _RootStage(_parent(headers), attrs)
        counter = self._infer_counts if route in ("infer", "generate") else None
        return RequestScope(request_id, route, stage, counter)


class ReceiptMetrics(Collector):
    """The receipt log's health, read at scrape time: entries not yet under a signed
    checkpoint, the checkpoint's age, and per witness the entries it has not cosigned yet
    and the pushes that failed."""

    def __init__(self, service: ReceiptService) -> None:
        self.service = service

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        receipt_log = self.service.log
        try:
            size, checkpointed = receipt_log.size, receipt_log.head()[1]
            cosigned = {w.name: receipt_log.witness_size(w.name) for w in self.service.witnesses}
        except Exception:  # a closed or damaged log: the scrape still answers, without these
            return
        pending = GaugeMetricFamily(
            "ztgate_receipts_pending",
            "Receipts in the log that no signed checkpoint covers yet",
        )
        pending.add_metric([], size - checkpointed)
        yield pending
        checkpointer = self.service.checkpointer
        at = checkpointer.last_checkpoint_at
        if at is not None:
            age = GaugeMetricFamily(
                "ztgate_receipt_checkpoint_age_seconds",
                "Seconds since the checkpoint loop last signed the log's head",
            )
            age.add_metric([], max(0.0, time.time() - at))
            yield age
        lag = GaugeMetricFamily(
            "ztgate_witness_lag_entries",
            "Log entries the witness has not cosigned yet",
            labels=["witness"],
        )
        failures = CounterMetricFamily(
            "ztgate_witness_failures",
            "Checkpoint pushes to the witness that failed (refused or unreachable)",
            labels=["witness"],
        )
        for w in checkpointer.witnesses:
            lag.add_metric([w.name], size - cosigned.get(w.name, size))
            failures.add_metric([w.name], checkpointer.push_failures.get(w.name, 0))
        yield lag
        yield failures


class CountOf(Collector):
    """A counter whose value is kept elsewhere (an int that only grows), read at scrape."""

    def __init__(self, name: str, doc: str, value: Callable[[], float]) -> None:
        self.name, self.doc, self.value = name, doc, value

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.doc, value=self.value())


class _RootStage(Stage):
    """A root stage whose parent is the client's trace context."""

    __slots__ = ("_parent",)

    def __init__(self, parent: Any, attrs: dict[str, Attr | None]) -> None:
        super().__init__("request", None, attrs)
        self._parent = parent

    def __enter__(self) -> Stage:
        from opentelemetry.trace import SpanKind

        self._start = time.perf_counter()
        assert _tracer is not None
        self._cm = _tracer.start_as_current_span(
            f"ztgate.{self._name}",
            context=self._parent,
            kind=SpanKind.SERVER,
            attributes=_clean(self._attrs),
            record_exception=False,
            set_status_on_exception=False,
        )
        self.span = self._cm.__enter__()
        return self


# --- logs ------------------------------------------------------------------------------
DECISIONS_LOGGER = "ztgate.decisions"


def _trace_id() -> str | None:
    if _tracer is None:
        return None
    from opentelemetry.trace import get_current_span

    ctx = get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, trace_id."""

    def format(self, record: logging.LogRecord) -> str:
        scope = _CURRENT.get()
        envelope: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if scope is not None:
            envelope["request_id"] = scope.request_id
        trace_id = _trace_id()
        if trace_id is not None:
            envelope["trace_id"] = trace_id
        message = record.getMessage()
        if record.name == DECISIONS_LOGGER and message.startswith("{") and message.endswith("}"):
            # Already a JSON object (the decision record, which has its own time): its
            # fields stay at the top level, the envelope's are added beside them.
            envelope.pop("time")
            extra = json.dumps(envelope)[1:-1]
            return f"{message[:-1]}, {extra}}}" if message != "{}" else "{" + extra + "}"
        envelope["message"] = message
        if record.exc_info:
            envelope["exception"] = self.formatException(record.exc_info)
        return json.dumps(envelope)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "info", fmt: str = "json") -> logging.Handler:
    """One handler on the root logger, to stderr, in `fmt`, at `level` (replaces the
    handlers set before, `logging.basicConfig`'s included)."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
