"""Settings: one frozen pydantic-settings root, read once at the edge (the CLI).

Environment variables use the prefix ``SD_`` and ``__`` between nested groups, e.g.
``SD_KAFKA__BOOTSTRAP_SERVERS=broker:9092`` or ``SD_DETECTOR__MAX_BATCH=512``. A ``.env`` file in
the working directory is read too. Nothing else in the package reads the environment.

Secrets (SASL password, SSL key password) are ``SecretStr``: they render as ``**********`` in
logs and reprs and are only unwrapped when the librdkafka dict is built.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from stream_detector.errors import ConfigError


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# what the brokers accept as a topic name (Kafka's Topic.validate); anything else, the empty
# name included, fails every produce or subscribe with "Broker: Invalid topic"
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")


# librdkafka properties that SD_KAFKA__EXTRA may not set: each has its own setting (named
# here), or the service's delivery guarantee depends on its value
_OWN_SETTING = {
    "bootstrap.servers": "SD_KAFKA__BOOTSTRAP_SERVERS",
    "group.id": "SD_KAFKA__GROUP_ID",
    "client.id": "SD_KAFKA__CLIENT_ID",
    "auto.offset.reset": "SD_KAFKA__AUTO_OFFSET_RESET",
    "session.timeout.ms": "SD_KAFKA__SESSION_TIMEOUT_MS",
    "heartbeat.interval.ms": "SD_KAFKA__HEARTBEAT_INTERVAL_MS",
    "partition.assignment.strategy": "SD_KAFKA__PARTITION_ASSIGNMENT_STRATEGY",
    "security.protocol": "SD_KAFKA__SECURITY_PROTOCOL",
    "sasl.mechanism": "SD_KAFKA__SASL_MECHANISM",
    "sasl.mechanisms": "SD_KAFKA__SASL_MECHANISM",
    "sasl.username": "SD_KAFKA__SASL_USERNAME",
    "sasl.password": "SD_KAFKA__SASL_PASSWORD",
    "ssl.ca.location": "SD_KAFKA__SSL_CA_LOCATION",
    "ssl.certificate.location": "SD_KAFKA__SSL_CERTIFICATE_LOCATION",
    "ssl.key.location": "SD_KAFKA__SSL_KEY_LOCATION",
    "ssl.key.password": "SD_KAFKA__SSL_KEY_PASSWORD",
    "metadata.broker.list": "SD_KAFKA__BOOTSTRAP_SERVERS",  # librdkafka's alias
}
_SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|sasl\.jaas|\.key\b|"
                         r"key\.pem|keystore|oauthbearer\.config", re.IGNORECASE)
_DELIVERY = ("enable.auto.offset.store", "enable.auto.commit", "enable.idempotence", "acks",
             "request.required.acks", "enable.partition.eof")
#: librdkafka's partition.assignment.strategy names
_STRATEGIES = ("cooperative-sticky", "range", "roundrobin")
# librdkafka's other names of the producer defaults that SD_KAFKA__EXTRA may change
_PRODUCER_ALIASES = {"linger.ms": "queue.buffering.max.ms", "compression.type": "compression.codec"}
#: The consumer's ``fetch.queue.backoff.ms`` unless SD_KAFKA__EXTRA sets it. librdkafka stops
#: fetching a partition while its local queue holds more than ``queued.min.messages`` (100,000)
#: or ``queued.max.messages.kbytes`` (64 MiB) and checks again after this many ms; its default,
#: 1,000 ms, left the loop waiting on an empty queue for most of each second whenever it caught
#: up on a backlog (after a restart or a rebalance): 110,000 readings/s end to end with a
#: zero-cost model against 220,000 with 10 ms (docs/benchmarks.md).
FETCH_QUEUE_BACKOFF_MS = 10
#: The producer's ``queue.buffering.max.kbytes`` unless SD_KAFKA__EXTRA / PRODUCER_EXTRA sets
#: it: what the records not yet acknowledged may take while the broker is slow or away (the
#: service then waits, consuming nothing more). librdkafka's default, 1 GiB, let a slow
#: dead-letter topic (records up to ~700 KB each) grow the process past the deployment's 2 GiB
#: memory limit (review: 2.1 GB resident). 128 MiB is over a second of score records at
#: 100,000 readings/s.
PRODUCER_QUEUE_KBYTES = 131_072
#: The most torch threads ``SD_SERVICE__TORCH_THREADS`` (and ``serve --threads``) take.
MAX_TORCH_THREADS = 256


class KafkaSettings(_Group):
    """Where to read readings from and write alerts to, and how to talk to the brokers."""

    # the names below cannot be empty: the brokers refuse an empty topic, group or client id,
    # and the service would stop on the first record (or at start) of every restart
    bootstrap_servers: str = Field(
        "127.0.0.1:9092", min_length=1, description="Kafka bootstrap servers."
    )
    input_topic: str = Field("sensor-readings", description="Topic of input readings.")
    alert_topic: str = Field("sensor-alerts", description="Topic alerts are published to.")
    score_topic: str = Field(
        "", description="Topic for every scored window (dashboards, replay parity); empty = off."
    )
    dead_letter_topic: str = Field(
        "sensor-readings-dlq", description="Topic for records that cannot be processed."
    )
    group_id: str = Field("stream-detector", min_length=1, description="Consumer group id.")
    client_id: str = Field("stream-detector", min_length=1, description="Client id prefix.")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a new group starts reading."
    )
    consume_batch: int = Field(1000, ge=1, le=100_000, description="Max messages per consume().")
    consume_timeout_s: float = Field(0.05, gt=0, le=10, description="consume() timeout, seconds.")
    session_timeout_ms: int = Field(10_000, ge=1000, description="Consumer session timeout.")
    heartbeat_interval_ms: int = Field(2_000, ge=100, description="Consumer heartbeat interval.")
    partition_assignment_strategy: str = Field(
        "cooperative-sticky",
        description="librdkafka partition.assignment.strategy: cooperative-sticky "
        "(incremental rebalances), or range / roundrobin (eager; comma-separated).",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str = Field("", description="e.g. PLAIN, SCRAM-SHA-512; empty = none.")
    sasl_username: str = ""
    sasl_password: SecretStr = SecretStr("")
    ssl_ca_location: str = ""
    ssl_certificate_location: str = ""
    ssl_key_location: str = ""
    ssl_key_password: SecretStr = SecretStr("")
    extra: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="Extra librdkafka properties for every client (JSON object in env).",
    )
    consumer_extra: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="Extra librdkafka properties for the consumer only, after "
        "SD_KAFKA__EXTRA (fetch.*, queued.*: the producer would log a CONFWARN for each).",
    )
    producer_extra: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="Extra librdkafka properties for the producer only, after "
        "SD_KAFKA__EXTRA (linger.ms, batch.size, compression.type, ...).",
    )

    @field_validator("extra", "consumer_extra", "producer_extra")
    @classmethod
    def _extra_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        # before, such a key was either silently overridden by the service's own value or
        # silently overrode the matching setting, depending on the key
        for key in value:
            if key in _OWN_SETTING:
                raise ValueError(f"{key!r} has its own setting: use {_OWN_SETTING[key]}")
            if key in _DELIVERY:
                raise ValueError(f"{key!r} is set by the service (at-least-once delivery: "
                                 "docs/messages.md) and cannot be changed")
        return value

    @field_validator("partition_assignment_strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        # the service picks incremental or eager assign() from this value: librdkafka took
        # " cooperative-sticky" (cooperative) while the service compared the raw string and
        # assigned eagerly, a fatal "Erroneous state" at the first assignment (review)
        parts = [p.strip() for p in value.split(",") if p.strip()]
        unknown = [p for p in parts if p not in _STRATEGIES]
        if not parts or unknown:
            raise ValueError(f"{value!r}: one or more of {', '.join(_STRATEGIES)}, "
                             "comma-separated")
        if "cooperative-sticky" in parts and len(parts) > 1:
            raise ValueError(f"{value!r}: cooperative-sticky cannot be combined with the eager "
                             "strategies (range, roundrobin)")
        return ",".join(parts)

    @field_validator("input_topic", "alert_topic", "dead_letter_topic", "score_topic")
    @classmethod
    def _topic_name(cls, value: str, info: ValidationInfo) -> str:
        if value == "" and info.field_name == "score_topic":
            return value  # empty = score records off
        if not _TOPIC_NAME.fullmatch(value) or value in (".", ".."):
            raise ValueError(f"{value!r} is not a Kafka topic name (1-249 characters of "
                             "a-z, A-Z, 0-9, '.', '_', '-')")
        return value

    @model_validator(mode="after")
    def _check(self) -> KafkaSettings:
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("SD_KAFKA__HEARTBEAT_INTERVAL_MS must be below "
                             "SD_KAFKA__SESSION_TIMEOUT_MS")
        topics = [self.input_topic, self.alert_topic, self.dead_letter_topic]
        if self.score_topic:
            topics.append(self.score_topic)
        if len(set(topics)) != len(topics):
            raise ValueError("SD_KAFKA__INPUT_TOPIC, __ALERT_TOPIC, __SCORE_TOPIC and "
                             f"__DEAD_LETTER_TOPIC must differ: {topics}")
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise ValueError("SD_KAFKA__SASL_MECHANISM is required with a SASL "
                             "SD_KAFKA__SECURITY_PROTOCOL")
        return self

    def __repr_args__(self) -> Any:
        # SD_KAFKA__EXTRA can carry secrets too (sasl.oauthbearer.client.secret, ...): shown
        # masked, like the SecretStr fields
        for name, value in super().__repr_args__():
            if name in ("extra", "consumer_extra", "producer_extra") and isinstance(value, dict):
                value = {k: "**********" if _SECRET_KEY.search(k) else v
                         for k, v in value.items()}
            yield name, value

    def common(self) -> dict[str, Any]:
        """librdkafka properties shared by every client (secrets unwrapped here only)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
            conf["sasl.username"] = self.sasl_username
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        for key, value in (
            ("ssl.ca.location", self.ssl_ca_location),
            ("ssl.certificate.location", self.ssl_certificate_location),
            ("ssl.key.location", self.ssl_key_location),
        ):
            if value:
                conf[key] = value
        if self.ssl_key_password.get_secret_value():
            conf["ssl.key.password"] = self.ssl_key_password.get_secret_value()
        conf.update(self.extra)
        return conf

    def consumer_config(self) -> dict[str, Any]:
        """Consumer properties. Offsets are stored by hand after alerts are acknowledged."""
        return {
            "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,  # SD_KAFKA__*EXTRA may change it
            **self.common(),
            **self.consumer_extra,
            "group.id": self.group_id,
            "client.id": f"{self.client_id}-consumer",
            "auto.offset.reset": self.auto_offset_reset,
            # At-least-once: we call store_offsets() only for readings whose alerts the broker
            # acknowledged; the background auto-commit then commits just those stored offsets.
            "enable.auto.offset.store": False,
            "enable.auto.commit": True,
            "auto.commit.interval.ms": 1000,
            "session.timeout.ms": self.session_timeout_ms,
            "heartbeat.interval.ms": self.heartbeat_interval_ms,
            "partition.assignment.strategy": self.partition_assignment_strategy,
            "enable.partition.eof": False,
        }

    def producer_config(self) -> dict[str, Any]:
        """Producer properties: idempotent, so retries never duplicate or reorder alerts.

        ``linger.ms``, ``compression.type`` and ``partitioner`` are defaults that
        SD_KAFKA__EXTRA or SD_KAFKA__PRODUCER_EXTRA may change. ``murmur2_random`` maps a key
        to the partition the Java client (Kafka Streams, ksqlDB, Kafka Connect) would choose,
        so a subscriber can join the alert topic with other topics keyed by sensor id;
        librdkafka's own default (``consistent_random``, CRC32) maps keys differently.
        """
        conf = {
            **self.common(),
            **self.producer_extra,
            "client.id": f"{self.client_id}-producer",
            "enable.idempotence": True,
            "acks": "all",
        }
        for key, value in (("linger.ms", 5), ("compression.type", "lz4"),
                           ("partitioner", "murmur2_random"),
                           ("queue.buffering.max.kbytes", PRODUCER_QUEUE_KBYTES)):
            if key not in conf and _PRODUCER_ALIASES.get(key) not in conf:
                conf[key] = value
        return conf


class DetectorSettings(_Group):
    """Micro-batching, alerting and input policy of the detector core."""

    max_batch: int = Field(256, ge=1, le=65_536, description="Windows per model call, at most.")
    max_wait_ms: float = Field(
        20.0, ge=0, le=60_000, description="Oldest ready window waits at most this long."
    )
    dispatch_when_idle: bool = Field(
        True,
        description="When the consumer has read everything buffered and the model is free, "
        "score the windows waiting now instead of at max_wait_ms (a batch then holds what "
        "arrived while the model was busy: short waits at low rates, full batches under load; "
        "a scorer without a model thread is always free).",
    )
    warning_ratio: float = Field(
        1.0, gt=0, description="Score/threshold ratio that opens an episode at level warning."
    )
    critical_ratio: float = Field(
        2.0, gt=0, description="Score/threshold ratio at which an episode escalates to critical."
    )
    clear_ratio: float = Field(
        0.8, gt=0, description="Score/threshold ratio below which the episode may resolve."
    )
    clear_after: int = Field(
        10, ge=1, description="Consecutive windows below clear_ratio before a resolve event."
    )
    update_interval_s: float = Field(
        60.0, ge=0, description="At most one 'update' alert per episode per this many seconds."
    )
    top_features: int = Field(5, ge=1, le=64, description="Contributing features named per alert.")
    long_term_tolerance: float = Field(
        1e-4, ge=1e-9, le=1,
        description="Only for artifacts trained with the long-term score term (long_term_alpha "
        "> 0, off by default); others ignore it. After a restart or rebalance, a rebuilt sensor "
        "counts as exact once its long-term term can differ from an uninterrupted consumer's "
        "by at most this fraction of its threshold (the term forgets its start geometrically: "
        "at 1e-4 and alpha 0.05, 186-238 windows on the shipped datasets; each tenfold smaller "
        "adds about 45) (docs/messages.md).",
    )
    max_sensors: int = Field(
        200_000, ge=1, description="Hard cap on tracked sensors (memory guard)."
    )
    late_policy: Literal["drop", "dead_letter"] = Field(
        "dead_letter", description="What to do with readings at or before the last timestamp."
    )
    max_future_s: float = Field(
        31_536_000.0, ge=0,
        description="Readings with ts more than this many seconds ahead of the consumer's clock "
                    "are dead-lettered as bad_timestamp (default 365 days: catches micro- or "
                    "nanosecond timestamps); 0 = no limit.",
    )

    @model_validator(mode="after")
    def _check(self) -> DetectorSettings:
        if not self.clear_ratio < self.warning_ratio <= self.critical_ratio:
            raise ValueError(
                "need SD_DETECTOR__CLEAR_RATIO < __WARNING_RATIO <= __CRITICAL_RATIO, got "
                f"{self.clear_ratio} / {self.warning_ratio} / {self.critical_ratio}"
            )
        return self


class ServiceSettings(_Group):
    """Process-level settings: health/metrics server, logging, shutdown."""

    http_host: str = Field(
        "0.0.0.0",
        description="Bind address of health + metrics server (IPv4; '::' for IPv6-only and "
        "dual-stack clusters).",
    )
    http_port: int = Field(8000, ge=0, le=65535, description="Port of /healthz /readyz /metrics.")
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    grace_period_s: float = Field(20.0, gt=0, description="SIGTERM drain budget, seconds.")
    max_message_bytes: int = Field(65_536, ge=64, description="Larger readings are dead-lettered.")
    startup_retries: int = Field(
        10, ge=0, description="Retries of the broker connection at start, after the first "
        "attempt (0 = one attempt; the default 10 gives up after about 4 minutes).")
    startup_backoff_s: float = Field(1.0, gt=0, description="First retry delay (doubles, max 30s).")
    rebuild_windows: bool = Field(
        True,
        description="On partition assignment, re-read recent records to rebuild windows.",
    )
    rebuild_lookback: int = Field(
        10_000, ge=0, le=100_000_000,
        description="Records re-read per assigned partition to rebuild windows, smoothing and "
        "alert state: sensors per partition x (window + smoothing) readings covers every "
        "sensor's window in one pass (sensors x 265 with a long-term artifact). The rebuild "
        "doubles it while a sensor's alert state is "
        "not yet exact, up to SD_SERVICE__REBUILD_MAX_LOOKBACK (docs/messages.md).",
    )
    rebuild_max_lookback: int = Field(
        500_000, ge=0, le=100_000_000,
        description="Largest look-back the rebuild deepens to (doubling from "
        "SD_SERVICE__REBUILD_LOOKBACK) while a sensor of the partition has an alert state that "
        "earlier records could change (an episode open since before the look-back, fewer "
        "calm windows than SD_DETECTOR__CLEAR_AFTER) or no full window though one would fit. "
        "At or below the look-back: no deepening (docs/messages.md).",
    )
    torch_threads: int = Field(
        1, ge=0, le=MAX_TORCH_THREADS,
        description="Torch intra-op threads of the model (0 = torch's default, one per core). "
        "The model runs beside the consumer loop (one core of Python) and librdkafka's "
        "threads; 1 keeps them from competing for cores (docs/benchmarks.md).",
    )
    gc_threshold: int = Field(
        50_000, ge=0, le=10_000_000,
        description="Allocations between young-generation runs of Python's cycle collector "
        "while the service runs (0 = Python's default, 700). Each consume() batch allocates "
        "thousands of short-lived objects; at 700 they trigger collections that cost up to a "
        "third of the loop (docs/benchmarks.md).",
    )
    gc_freeze: bool = Field(
        True,
        description="After start-up, move every object then alive (torch, the model, the "
        "settings) out of the cycle collector's reach (gc.freeze), so a full collection scans "
        "only the service's own objects: about 10 ms instead of about 100.",
    )


class Settings(BaseSettings):
    """Root settings. Build with :func:`load_settings` to get errors that name the field."""

    model_config = SettingsConfigDict(
        env_prefix="SD_",
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    artifact_dir: Path = Field(Path("artifacts/model"), description="Model artifact directory.")
    kafka: KafkaSettings = KafkaSettings()
    detector: DetectorSettings = DetectorSettings()
    service: ServiceSettings = ServiceSettings()


#: ``SD_`` variables that are not settings: the dev broker's binary and the tests' data.
OTHER_SD_VARIABLES = frozenset({"SD_TANSU_BIN", "SD_SHARED_DATA"})


def _groups() -> list[tuple[str, type[BaseModel]]]:
    """The setting groups (``kafka``, ``detector``, ``service``) and their models."""
    return [(field, info.annotation) for field, info in Settings.model_fields.items()
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)]


def _object_fields(model: type[BaseModel]) -> list[str]:
    """The fields of a group that hold an object (``extra``, ``consumer_extra``, ...)."""
    return [f for f, info in model.model_fields.items()
            if str(info.annotation).startswith("dict")]


def _env_sources(env_file: Any = "default") -> list[tuple[str, dict[str, str | None]]]:
    """Where settings come from, in order: the environment, then the env file (``env_file``
    as Settings' ``_env_file`` takes it; the configured one by default), each named."""
    import os

    from dotenv import dotenv_values

    if env_file == "default":
        env_file = Settings.model_config.get("env_file")
    files = [env_file] if isinstance(env_file, str | Path) else list(env_file or ())
    sources: list[tuple[str, dict[str, str | None]]] = [("environment", dict(os.environ))]
    return sources + [(str(f), dotenv_values(f)) for f in files if os.path.isfile(f)]


def setting_variables() -> set[str]:
    """Every environment variable that names a setting (``SD_KAFKA`` for a whole group as JSON
    and ``SD_KAFKA__BOOTSTRAP_SERVERS`` for one field)."""
    names = {f"SD_{field.upper()}" for field in Settings.model_fields}
    for group, model in _groups():
        names.update(f"SD_{group.upper()}__{sub.upper()}" for sub in model.model_fields)
    return names


def _unknown_variables(env_file: Any = "default") -> list[str]:
    """``SD_*`` variables (environment, then the env file, see :func:`_env_sources`) that are
    no setting: a mistyped name would otherwise leave its setting at the default without a word
    (the groups refuse unknown fields, the top level ignored them). An object setting's keys
    set one by one with the nested delimiter (``SD_KAFKA__CONSUMER_EXTRA__fetch.max.bytes``)
    are settings."""
    import difflib

    known = setting_variables()
    objects = tuple(f"SD_{group.upper()}__{field.upper()}__" for group, model in _groups()
                    for field in _object_fields(model))
    found: dict[str, str] = {}
    for where, values in _env_sources(env_file):
        for var in values:
            name = var.upper()
            if (name.startswith("SD_") and name not in known and name not in OTHER_SD_VARIABLES
                    and not name.startswith(objects) and name not in found):
                found[name] = where
    problems = []
    for name, where in sorted(found.items()):
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
        hint = f"; did you mean {close[0]}?" if close else ""
        problems.append(f"  {name} ({where}): not a setting{hint} (`stream-detector config` "
                        "lists them)")
    return problems


def load_settings(**overrides: Any) -> Settings:
    """Read settings from env/.env plus ``overrides``; raise :class:`ConfigError` naming fields
    (and any ``SD_`` variable that names no setting)."""
    try:
        unknown = _unknown_variables(overrides.get("_env_file", "default"))
        if unknown:
            raise ConfigError("invalid settings:\n" + "\n".join(unknown))
        return Settings(**overrides)
    except UnicodeDecodeError as exc:
        # an env file in another encoding (PowerShell's `echo ... > .env` writes UTF-16)
        raise ConfigError(f"the env file (.env) is not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start}); save it as UTF-8") from None
    except ValidationError as exc:
        raise ConfigError("invalid settings:\n" + "\n".join(_problems(exc))) from None
    except SettingsError as exc:
        # raised before validation when a value that must be JSON (an object such as
        # SD_KAFKA__EXTRA, or a whole group such as SD_KAFKA) does not parse
        found = re.search(r'field "([^"]+)"', str(exc))
        name = found.group(1) if found else "?"
        env = "SD_" + name.upper()
        where = f"{name} (env {env} or {env}__*)"
        culprit = _bad_json_variable(name, overrides.get("_env_file", "default"))
        if culprit is not None:
            where = f"{name}.{culprit[len(env) + 2:].lower()} (env {culprit})"
        raise ConfigError(
            f"invalid settings:\n  {where}: value is not valid JSON "
            f"({exc.__cause__ or exc}); objects are JSON, e.g. "
            "SD_KAFKA__CONSUMER_EXTRA='{\"fetch.max.bytes\": 52428800}'"
        ) from None


def _bad_json_variable(group: str, env_file: Any = "default") -> str | None:
    """The ``SD_<GROUP>__*`` variable of an object setting of ``group`` (environment first,
    then the env file Settings reads: ``env_file`` as :func:`_env_sources` takes it) whose
    value is not JSON, to name it; None when none."""
    import json

    model = dict(_groups()).get(group)
    objects = sorted(f"SD_{group.upper()}__{field.upper()}"
                     for field in (_object_fields(model) if model is not None else ()))
    for _, values in _env_sources(env_file):
        for var in objects:
            value = values.get(var)
            if value is None:
                continue
            try:
                json.loads(value)
            except ValueError:
                return var
    return None


_TYPE_WORDS = {str: "string", int: "number", float: "number", bool: "boolean"}


def _problems(exc: ValidationError) -> list[str]:
    """One line per setting at fault, naming its env variable.

    A pydantic error location is the path of model fields (``kafka``, ``extra``), then, inside
    a field's value, dict keys or list positions and the union branch tried (``str``,
    ``int``...). Only the field path makes the env name (``SD_KAFKA__EXTRA``); the key is
    named in the message, and the errors of the union branches of one value make one line."""
    grouped: dict[tuple[tuple[str, ...], str | None], list[str]] = {}
    inner_types: dict[tuple[str, ...], Any] = {}
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        fields: list[str] = []
        model: Any = Settings
        for part in loc:
            if model is None:
                break
            fields.append(part)
            info = model.model_fields.get(part)
            if info is None:  # not a field of the group (extra_forbidden): its own env name
                model = None
                break
            ann = info.annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            if model is None:
                inner_types[tuple(fields)] = ann
        path = tuple(fields)
        inner = loc[len(path):]
        # inside a dict or list the first part is the key / position; the rest are branches
        key = inner[0] if inner and get_origin(inner_types.get(path)) in (dict, list) else None
        grouped.setdefault((path, key), []).append(err["msg"])
    problems = []
    for (path, key), msgs in grouped.items():
        name = ".".join(path)
        env = "SD_" + "__".join(path).upper()
        if key is None:
            text = "; ".join(msgs)
        else:
            args = get_args(inner_types[path])
            allowed = _type_words(args[-1]) if args else None
            if len(msgs) > 1 and allowed:
                text = f"value of {key!r} must be {allowed}"
            else:
                text = f"value of {key!r}: " + "; ".join(msgs)
        problems.append(f"  {name} (env {env}): {text}")
    return problems


def _type_words(tp: Any) -> str | None:
    """``str | int | float | bool`` -> "a string, number or boolean" (None if not plain)."""
    members = get_args(tp) if get_origin(tp) in (Union, UnionType) else (tp,)
    words = list(dict.fromkeys(_TYPE_WORDS.get(m, "") for m in members))
    if "" in words:
        return None
    return "a " + (", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0])


def settings_reference() -> list[tuple[str, str, str, str]]:
    """(env var, type, default, description) for every setting; used to render the docs."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            ann = info.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name.upper()}__")
                continue
            default = info.get_default(call_default_factory=True)
            if isinstance(default, SecretStr):
                default = ""
            type_name = getattr(ann, "__name__", str(ann)).replace("typing.", "")
            rows.append(
                (f"{prefix}{name.upper()}", type_name, str(default), info.description or "")
            )

    walk(Settings, "SD_")
    return rows


def effective_settings(settings: Settings) -> list[tuple[str, str, bool]]:
    """(env var, value, differs from the default) for every setting of ``settings``: what a
    process started with this environment runs with. Secrets print as ``**********`` when set,
    and so do the values of secret-looking keys in ``SD_KAFKA__EXTRA``."""
    rows: list[tuple[str, str, bool]] = []
    for env, _, default, _ in settings_reference():
        value: Any = settings
        for name in env.removeprefix("SD_").lower().split("__"):  # SD_GROUP__FIELD
            value = getattr(value, name)
        if isinstance(value, SecretStr):
            raw = value.get_secret_value()
            rows.append((env, "**********" if raw else "", bool(raw)))
        elif isinstance(value, dict):  # JSON, as the variable takes it
            shown = {k: "**********" if _SECRET_KEY.search(k) else v for k, v in value.items()}
            rows.append((env, orjson.dumps(shown).decode(), str(value) != default))
        else:
            rows.append((env, str(value), str(value) != default))
    return rows
