"""structlog setup: JSON lines (orjson) in production, a readable console locally.

Logs go to the process's *current* ``sys.stderr``, looked up at every call rather than bound
when logging is configured, so redirecting or replacing stderr later (test runners, embedding
the service) never leaves a logger writing to a closed stream.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import structlog


class _StderrLogger:
    """Minimal structlog logger: one line per event on the current ``sys.stderr``."""

    def __init__(self, binary: bool) -> None:
        self.binary = binary

    def msg(self, message: str | bytes) -> None:
        stream = sys.stderr
        if self.binary and isinstance(message, bytes):
            buffer = getattr(stream, "buffer", None)
            if buffer is not None:
                buffer.write(message + b"\n")
                buffer.flush()
                return
            message = message.decode()
        print(message, file=stream, flush=True)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _factory(binary: bool) -> Any:
    def make(*_args: Any) -> _StderrLogger:
        return _StderrLogger(binary)

    return make


def configure_logging(fmt: str = "console", level: str = "INFO") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ]
        factory = _factory(binary=True)
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
        factory = _factory(binary=False)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )


#: librdkafka repeats a failure line for every reconnection attempt (about 20 a second while a
#: broker is unreachable, measured against the embedded broker): a line is passed on once per
#: this many seconds per distinct text, the next one saying how many were held back.
REPEAT_WINDOW_S = 60.0
# the parts of a librdkafka line that change between repeats of the same failure
_VARYING = re.compile(r"\(after \d+ms|,? ?\d+ identical error\(s\) suppressed")


class _ToStructlog(logging.Handler):
    """Hands stdlib log records (librdkafka's, through confluent-kafka's ``logger``) to
    structlog, so they come out as the same JSON lines as the service's own; repeats of a
    line within ``REPEAT_WINDOW_S`` are counted, not written (``repeated`` on the next one)."""

    def __init__(self, window_s: float = REPEAT_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s, self.clock = window_s, clock
        # key -> [since, held back, the last held-back record]
        self._seen: dict[tuple[str, int, str], list[Any]] = {}
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno < logging.INFO:  # debugging output: passed on, not remembered
                structlog.get_logger(record.name).log(record.levelno, message)
                return
            key = (record.name, record.levelno, _VARYING.sub("", message))
            now = self.clock()
            with self._guard:
                seen = self._seen.get(key)
                if seen is not None and now - seen[0] < self.window_s:
                    seen[1] += 1
                    seen[2] = record
                    return
                held = int(seen[1]) if seen is not None else 0
                if len(self._seen) > 1000:  # texts with ids in them: forget the oldest
                    for old in sorted(self._seen, key=lambda k: self._seen[k][0])[:500]:
                        del self._seen[old]
                self._seen[key] = [now, 0, None]
            extra = {"repeated": held} if held else {}
            structlog.get_logger(record.name).log(record.levelno, message, **extra)
        except Exception:  # noqa: BLE001 - a log line must never break a Kafka callback
            self.handleError(record)

    def flush(self) -> None:
        """Write the last held-back occurrence of each line, with ``repeated`` = how many were
        held back before it (as on every other line) and ``last_at``, and forget them: the
        service calls it as it stops (logging's exit hook too), so a failure that went on
        until then is not left counted as one line."""
        with self._guard:
            held = [(int(n), rec) for _, n, rec in self._seen.values() if n]
            self._seen.clear()
        for n, rec in sorted(held, key=lambda x: x[1].created):
            try:
                extra: dict[str, Any] = {"repeated": n - 1} if n > 1 else {}
                extra["last_at"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(rec.created))
                structlog.get_logger(rec.name).log(rec.levelno, rec.getMessage(), **extra)
            except Exception:  # noqa: BLE001 - as in emit: a log line never breaks a stop
                self.handleError(rec)


def flush_kafka_log() -> None:
    """Write the librdkafka lines held back as repeats (see :meth:`_ToStructlog.flush`)."""
    for handler in logging.getLogger("librdkafka").handlers:
        handler.flush()


def kafka_logger() -> logging.Logger:
    """The logger handed to every librdkafka client of the service (config key ``logger``):
    without one, librdkafka prints its own plain-text lines on stderr (over a thousand a minute
    while a broker is unreachable), outside the JSON log. Repeats are held back (above)."""
    logger = logging.getLogger("librdkafka")
    if not any(isinstance(h, _ToStructlog) for h in logger.handlers):
        logger.addHandler(_ToStructlog())
        logger.propagate = False
        logger.setLevel(logging.DEBUG)  # structlog's level filter decides
    return logger
