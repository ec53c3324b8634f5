"""structlog setup: JSON lines (orjson) in production, a readable console locally.

Logs go to the process's *current* ``sys.stderr``, looked up at every call rather than bound
when logging is configured, so redirecting or replacing stderr later (test runners, embedding
the service) never leaves a logger writing to a closed stream.
"""

from __future__ import annotations

import logging
import sys
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


class _ToStructlog(logging.Handler):
    """Hands stdlib log records (librdkafka's, through confluent-kafka's ``logger``) to
    structlog, so they come out as the same JSON lines as the service's own."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            structlog.get_logger(record.name).log(record.levelno, record.getMessage())
        except Exception:  # noqa: BLE001 - a log line must never break a Kafka callback
            self.handleError(record)


def kafka_logger() -> logging.Logger:
    """The logger handed to every librdkafka client of the service (config key ``logger``):
    without one, librdkafka prints its own plain-text lines on stderr (hundreds a minute while
    a broker is unreachable), outside the JSON log."""
    logger = logging.getLogger("librdkafka")
    if not any(isinstance(h, _ToStructlog) for h in logger.handlers):
        logger.addHandler(_ToStructlog())
        logger.propagate = False
        logger.setLevel(logging.DEBUG)  # structlog's level filter decides
    return logger
