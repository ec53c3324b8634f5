"""Shared fixtures: the embedded Kafka-protocol broker (one per test session) and fresh topics."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stream_detector.devbroker import EmbeddedBroker, create_topics

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SD_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_dataset(name: str) -> Path:
    """Path of a dataset under ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data not available: {path} (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A Tansu broker on a free loopback port for the whole session, stopped at the end."""
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    broker = EmbeddedBroker(log_path=log).start()
    try:
        yield broker
    finally:
        broker.stop()


_counter = itertools.count()


@pytest.fixture
def make_topic(kafka_broker: EmbeddedBroker, request: pytest.FixtureRequest) -> Callable[..., str]:
    """Create a uniquely named topic for this test: ``make_topic(partitions=3) -> name``."""
    base = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]

    def make(partitions: int = 1, name: str | None = None) -> str:
        topic = name or f"{base}-{os.getpid()}-{next(_counter)}"
        create_topics(kafka_broker.bootstrap_servers, [topic], partitions)
        return topic

    return make
