"""Message schemas on the wire (readings, alerts, score and dead-letter records) and settings."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import orjson
import pytest
import structlog
from pydantic import SecretStr

from stream_detector.config import KafkaSettings, Settings, load_settings
from stream_detector.errors import ConfigError
from stream_detector.records import (
    REASONS,
    SCHEMA_VERSION,
    Alert,
    BadRecord,
    ReadingDecoder,
    ScoreRecord,
    alert_id,
    dead_letter,
    encode_reading,
)

REPO = Path(__file__).resolve().parents[1]
FEATURES = ("temperature", "pressure", "vibration")


@pytest.fixture
def decoder() -> ReadingDecoder:
    return ReadingDecoder(FEATURES, max_bytes=512)


def _msg(**fields) -> bytes:
    base = {"schema_version": 1, "sensor": "m-1", "ts": 1_700_000_000_000,
            "values": [1.0, 2.0, 3.0]}
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not _DROP})


_DROP = object()


# ----------------------------------------------------------------------------- readings


def test_decodes_list_values_in_manifest_order(decoder) -> None:
    r = decoder.decode(_msg(values=[1, 2.5, -3e5]), ref=("t", 0, 7))
    assert r.sensor == "m-1"
    assert r.ts_ms == 1_700_000_000_000
    assert r.values.dtype == np.float32
    np.testing.assert_array_equal(r.values, np.array([1, 2.5, -3e5], np.float32))
    assert r.ref == ("t", 0, 7)


def test_object_values_in_any_order_give_manifest_order(decoder) -> None:
    raw = (b'{"sensor":"m-1","ts":5,"values":'
           b'{"vibration":3,"temperature":1,"pressure":2}}')  # schema_version defaults to 1
    r = decoder.decode(raw)
    np.testing.assert_array_equal(r.values, [1.0, 2.0, 3.0])
    assert r.ts_ms == 5


def test_encode_reading_round_trip(decoder) -> None:
    values = np.array([0.1, -2.0, 3.5e10], np.float32)
    raw = encode_reading("pump-7", 42, values)
    obj = orjson.loads(raw)
    assert obj == {"schema_version": SCHEMA_VERSION, "sensor": "pump-7", "ts": 42,
                   "values": values.tolist()}
    r = decoder.decode(raw)
    assert (r.sensor, r.ts_ms) == ("pump-7", 42)
    np.testing.assert_array_equal(r.values, values)  # float32 survives the JSON round trip
    assert decoder.decode(encode_reading("s", np.int64(3), [1, 2, 3])).ts_ms == 3


# Each REASON the decoder can produce, with a crafted payload. late_or_duplicate and
# internal_error come from the window store / the consumer, not from the decoder.
BAD = [
    ("oversized", _msg(sensor="x" * 600)),
    ("malformed_json", b'{"sensor": "m-1", "ts": 1, "values": [1,2,3]'),
    ("malformed_json", b"\xff\xfe not utf-8"),
    ("malformed_json", b""),
    ("malformed_json", None),  # tombstone
    # the non-standard NaN / Infinity tokens are not JSON
    ("malformed_json", b'{"sensor":"m-1","ts":1,"values":[NaN,1,2]}'),
    ("malformed_json", b'{"sensor":"m-1","ts":1,"values":[Infinity,1,2]}'),
    ("malformed_json", b'{"sensor":"m-1","ts":1,"values":[NaN,1,1e400]}'),
    ("malformed_json", b'{"sensor":"m-1","ts":1,"values":[1,2,1e400]'),  # cut short
    ("not_an_object", b"[1, 2, 3]"),
    ("not_an_object", b'"a string"'),
    ("not_an_object", b"null"),
    ("unknown_schema_version", _msg(schema_version=2)),
    ("unknown_schema_version", _msg(schema_version="1")),
    # True == 1.0 == 1 in Python, but neither is schema version 1
    ("unknown_schema_version", _msg(schema_version=True)),
    ("unknown_schema_version", b'{"schema_version":1.0,"sensor":"m-1","ts":1,"values":[1,2,3]}'),
    ("unknown_schema_version", b'{"schema_version":2,"sensor":"m-1","ts":1,"values":[1e400,1,2]}'),
    ("missing_field", _msg(sensor=_DROP)),
    ("missing_field", _msg(ts=_DROP)),
    ("missing_field", _msg(values=_DROP)),
    ("bad_sensor", _msg(sensor="")),
    ("bad_sensor", _msg(sensor=17)),
    ("bad_sensor", _msg(sensor=None)),
    ("bad_sensor", _msg(sensor="s" * 257)),
    ("bad_timestamp", _msg(ts=-1)),
    ("bad_timestamp", _msg(ts=1.5)),
    ("bad_timestamp", _msg(ts="1700000000000")),
    ("bad_timestamp", _msg(ts=True)),
    ("bad_timestamp", _msg(ts=None)),
    ("bad_timestamp", b'{"sensor":"m-1","ts":1e400,"values":[1,2,3]}'),
    ("wrong_value_count", _msg(values=[1.0, 2.0])),
    ("wrong_value_count", _msg(values=[1.0, 2.0, 3.0, 4.0])),
    ("wrong_value_count", _msg(values=[])),
    ("wrong_value_count", _msg(values={"temperature": 1, "pressure": 2})),
    ("unknown_feature", _msg(values={"temperature": 1, "pressure": 2, "vibraton": 3})),
    ("non_numeric", _msg(values=[1.0, "2.0", 3.0])),
    ("non_numeric", _msg(values=[1.0, True, 3.0])),
    ("non_numeric", _msg(values=[1.0, None, 3.0])),
    ("non_numeric", _msg(values=[1.0, [2.0], 3.0])),
    ("non_numeric", _msg(values={"temperature": 1, "pressure": False, "vibration": 3})),
    ("non_numeric", _msg(values="1,2,3")),
    # quotes written as \u0022 in the sensor do not hide a string value from the batch path
    ("non_numeric", b'{"sensor":"m\\u0022\\u0022","ts":5,"values":[1,"2",3]}'),
    ("non_numeric", _msg(values=3.0)),
    ("non_finite", _msg(values=[1.0, 1e39, 3.0])),  # finite double, overflows float32
    ("non_finite", _msg(values=[1.0, -1e39, 3.0])),
    # a big JSON integer: orjson turns it into a double, 1e40 overflows float32
    ("non_finite", b'{"sensor":"m-1","ts":1,"values":[1,2,1' + b"0" * 40 + b"]}"),
    # beyond double range: valid JSON, which orjson and msgspec refuse to parse
    ("non_finite", b'{"sensor":"m-1","ts":1,"values":[1e400,1,2]}'),
    ("non_finite", b'{"sensor":"m-1","ts":1,"values":[1,2,-1e400]}'),
    ("non_finite", b'{"sensor":"m-1","ts":1,"values":[1,2,1' + b"0" * 400 + b"]}"),
    ("non_finite",
     b'{"sensor":"m-1","ts":1,"values":{"temperature":1,"pressure":2,"vibration":1e400}}'),
    ("non_finite", b'{"sensor":"m-1","ts":1,"values":[1,2,3],"note":1e400}'),  # anywhere
]


@pytest.mark.parametrize(("reason", "raw"), BAD, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BAD)])
def test_bad_readings_raise_bad_record_with_reason(decoder, reason, raw) -> None:
    assert reason in REASONS
    with pytest.raises(BadRecord) as info:
        decoder.decode(raw)
    assert info.value.reason == reason, info.value.detail
    assert str(info.value).startswith(f"{reason}: ")
    assert info.value.detail


@pytest.mark.parametrize("seed", range(4))
def test_decode_many_matches_decode_record_by_record(decoder, seed) -> None:
    """The batch decoder (what the consumer uses) against the one-record decoder: the same
    readings, the same reasons, at the same positions, for batches mixing good and bad."""
    rng = np.random.default_rng(seed)
    good = [_msg(sensor=f"m-{i}", ts=i, values=rng.normal(0, 1e3, 3).tolist()) for i in range(40)]
    good += [_msg(values={"vibration": 3, "temperature": 1, "pressure": 2.5}),
             _msg(values=[1, 2, 3]), _msg(schema_version=_DROP)]
    pool = good + [raw for _, raw in BAD]
    batches = [good[:20]]  # an all-good batch takes the column-wise path
    batches += [[pool[i] for i in rng.integers(0, len(pool), int(rng.integers(1, 60)))]
                for _ in range(30)]
    for raws in batches:
        got = decoder.decode_many(raws)
        want_good, want_bad = [], []
        for i, raw in enumerate(raws):
            try:
                want_good.append((i, decoder.decode(raw)))
            except BadRecord as exc:
                want_bad.append((i, exc.reason))
        assert [(i, b.reason) for i, b in got.bad] == want_bad
        assert got.index == [i for i, _ in want_good]
        assert got.sensors == [r.sensor for _, r in want_good]
        assert got.ts_ms == [r.ts_ms for _, r in want_good]
        assert got.values.dtype == np.float32
        want_values = [r.values for _, r in want_good]
        np.testing.assert_array_equal(got.values, np.reshape(want_values, (-1, 3)))
    assert decoder.decode_many([]).values.shape == (0, 3)


# One odd record alone in a clean batch: the column-wise path checks a batch all or nothing,
# so a single odd record must send it down the general path with the same result as decode().
# Odd but valid records here; the bad ones come from BAD.
ODD_GOOD = [
    _msg(sensor='m"1'),  # an escaped quote in the sensor: an extra quote byte
    b'{"sensor":"m\\u00221","ts":5,"values":[1,2,3]}',  # a quote written as \u0022
    _msg(sensor="true-1"), _msg(sensor="false"), _msg(sensor="null"),
    _msg(unit="C"),  # an extra string field
    _msg(meta={"site": "north", "ok": True}),  # an extra nested field
    _msg(values=[1, 2**63, -(2**62)]),  # big JSON integers
    _msg(schema_version=_DROP),
]


@pytest.mark.parametrize("odd", ODD_GOOD + [raw for _, raw in BAD])
def test_decode_many_one_odd_record_in_a_clean_batch(decoder, odd) -> None:
    rng = np.random.default_rng(7)
    clean = [_msg(sensor=f"m-{i}", ts=i, values=rng.normal(0, 10, 3).tolist()) for i in range(12)]
    for pos in (0, 5, 12):
        raws = clean[:pos] + [odd] + clean[pos:]
        got = decoder.decode_many(raws)
        try:
            want = decoder.decode(odd)
        except BadRecord as exc:
            assert [(i, b.reason) for i, b in got.bad] == [(pos, exc.reason)]
            assert got.index == [i for i in range(13) if i != pos]
            continue
        assert got.bad == [] and got.index == list(range(13))
        assert got.sensors[pos] == want.sensor and got.ts_ms[pos] == want.ts_ms
        np.testing.assert_array_equal(got.values[pos], want.values)


def test_clean_batches_of_either_shape_take_the_batch_path(decoder, monkeypatch) -> None:
    values = [[1.0, 2.5, -3.0], [4.0, 5.0, 6.25]]
    as_list = [_msg(sensor=f"m-{i}", ts=i, values=v) for i, v in enumerate(values)]
    keyed = [_msg(sensor=f"m-{i}", ts=i, values=dict(reversed(list(zip(FEATURES, v, strict=True)))))
             for i, v in enumerate(values)]  # names in another order than the manifest's

    calls = []
    one_by_one = decoder.decode
    monkeypatch.setattr(decoder, "decode", lambda raw: calls.append(raw) or one_by_one(raw))
    for raws in (as_list, keyed, [as_list[0], keyed[1]]):
        got = decoder.decode_many(raws)
        np.testing.assert_array_equal(got.values, np.asarray(values, dtype=np.float32))
        assert got.sensors == ["m-0", "m-1"] and got.ts_ms == [0, 1] and got.bad == []
    assert calls == [keyed[1]]  # only the mixed batch needed the per-record decoder


@pytest.mark.parametrize("keyed", [False, True], ids=["list", "keyed"])
def test_decode_many_agrees_with_decode_on_mutated_bytes(decoder, keyed) -> None:
    """Fuzz: a valid reading with one byte changed, deleted or a JSON token spliced in, alone
    in a clean batch. The batch path (msgspec, typed) and decode() (orjson, then checks) are
    different parsers; they must agree on every record."""
    rng = np.random.default_rng(11)
    values = [1.5, -2, 3e3]
    clean = [_msg(sensor=f"m-{i}", ts=i, values=dict(zip(FEATURES, values, strict=True))
                  if keyed else values) for i in range(4)]
    tokens = [b"true", b"null", b'"x"', b"[1]", b"{}", b"1e999", b"1e39", b"-", b".", b",",
              b"\\u0022", b"NaN", b"9" * 25, b" ", b"\xff", b"\x00"]
    values = [0.25, 1, -3.5e-7]
    base = _msg(sensor="pump-7", ts=1_700_000_000_000,
                values=dict(zip(FEATURES, values, strict=True)) if keyed else values)
    seen = set()
    for _ in range(400):
        raw = bytearray(base)
        pos = int(rng.integers(0, len(raw)))
        kind = int(rng.integers(0, 4))
        if kind == 3:  # a token in place of the second value
            start = raw.index(b"{" if keyed else b"[", raw.index(b'"values"')) + 1
            pos = raw.index(b",", start) + 1
            if keyed:
                pos = raw.index(b":", pos) + 1
            end = raw.index(b",", pos)
            raw[pos:end] = tokens[int(rng.integers(0, len(tokens)))]
        elif kind == 0:
            raw[pos] = int(rng.integers(32, 127))
        elif kind == 1:
            del raw[pos]
        else:
            raw[pos:pos] = tokens[int(rng.integers(0, len(tokens)))]
        odd = bytes(raw)
        got = decoder.decode_many([clean[0], clean[1], odd, clean[2]])
        try:
            want = decoder.decode(odd)
        except BadRecord as exc:
            assert [(i, b.reason) for i, b in got.bad] == [(2, exc.reason)], odd
            seen.add(exc.reason)
            continue
        seen.add("ok")
        assert got.bad == [] and got.index == [0, 1, 2, 3], odd
        assert got.sensors[2] == want.sensor and got.ts_ms[2] == want.ts_ms, odd
        np.testing.assert_array_equal(got.values[2], want.values)
    assert {"ok", "malformed_json", "non_numeric", "non_finite", "bad_timestamp"} <= seen, seen


def test_every_decoder_reason_is_covered() -> None:
    covered = {r for r, _ in BAD}
    # the others come from the consumer's state, not the record (tested in test_service_units)
    assert covered == set(REASONS) - {"late_or_duplicate", "sensor_limit", "internal_error"}


def test_limits_are_inclusive(decoder) -> None:
    f32_max = float(np.finfo(np.float32).max)
    r = decoder.decode(_msg(values=[f32_max, -f32_max, 0], sensor="s" * 256))
    assert np.isfinite(r.values).all()
    raw = _msg(values=[1, 2, 3])
    assert decoder.decode(raw + b" " * (512 - len(raw))).sensor == "m-1"  # exactly max_bytes
    assert decoder.decode(_msg(ts=0)).ts_ms == 0


# ----------------------------------------------------------------------------- outputs


def test_alert_id_is_deterministic_and_distinguishes_episodes() -> None:
    a = alert_id("m-1", 1000, "smd-abc")
    assert a == alert_id("m-1", 1000, "smd-abc")
    assert re.fullmatch(r"[0-9a-f]{24}", a)
    others = {alert_id("m-2", 1000, "smd-abc"), alert_id("m-1", 1001, "smd-abc"),
              alert_id("m-1", 1000, "smd-abd")}
    assert a not in others and len(others) == 3
    # the separator keeps field boundaries: ("m-1", 11) is not ("m-11", 1)
    assert alert_id("m-1", 11, "v") != alert_id("m-11", 1, "v")


def _alert(**changes) -> Alert:
    fields = dict(
        alert_id=alert_id("m-1", 1000, "v1"), event="open", sensor="m-1", level="critical",
        score=4.5, peak_score=4.5, threshold=1.5, reconstruction_error=3.0, forecast_error=6.0,
        top_features=(("pressure", 2.5), ("temperature", 1.0)), episode_start_ms=1000,
        window_start_ms=1000 - 7000, window_end_ms=1000, model_version="v1",
        detected_at_ms=1234,
    )
    fields.update(changes)
    return Alert(**fields)


def test_alert_json() -> None:
    a = _alert()
    obj = orjson.loads(a.to_json())
    assert obj["schema_version"] == SCHEMA_VERSION
    assert obj["type"] == "alert"
    assert obj["alert_id"] == a.alert_id
    assert obj["event_id"] == f"{a.alert_id}:open:1000" == a.event_id
    assert obj["top_features"] == [{"feature": "pressure", "contribution": 2.5},
                                   {"feature": "temperature", "contribution": 1.0}]
    assert {"event", "sensor", "level", "score", "peak_score", "threshold",
            "reconstruction_error", "forecast_error", "episode_start", "window_start",
            "window_end", "model_version", "detected_at"} <= set(obj)
    assert obj["episode_start"] == 1000 and obj["detected_at"] == 1234
    # events of one episode share alert_id, but differ in event_id
    resolve = _alert(event="resolve", window_end_ms=9000)
    assert resolve.alert_id == a.alert_id and resolve.event_id != a.event_id


def test_score_record_json() -> None:
    rec = ScoreRecord("m-1", 1000, 8000, 0.5, 0.25, 0.75, 1.5, "normal", "v1")
    obj = orjson.loads(rec.to_json())
    assert obj == {
        "schema_version": SCHEMA_VERSION, "type": "score", "sensor": "m-1",
        "window_start": 1000, "window_end": 8000, "score": 0.5,
        "reconstruction_error": 0.25, "forecast_error": 0.75, "threshold": 1.5,
        "level": "normal", "model_version": "v1",
    }


def test_dead_letter_keeps_original_bytes() -> None:
    raw = b"\x00\xffnot json at all\n"
    obj = orjson.loads(dead_letter("malformed_json", "detail", raw, "readings", 3, 12345))
    assert obj["schema_version"] == SCHEMA_VERSION
    assert obj["type"] == "dead_letter"
    assert obj["reason"] == "malformed_json" and obj["detail"] == "detail"
    assert (obj["topic"], obj["partition"], obj["offset"]) == ("readings", 3, 12345)
    assert base64.b64decode(obj["original_b64"]) == raw
    tomb = orjson.loads(dead_letter("malformed_json", "tombstone", None, "readings", 0, 1))
    assert tomb["original_b64"] == ""
    assert tomb["original_timestamp"] is None and tomb["original_headers"] == []
    both = orjson.loads(dead_letter("malformed_json", "d", raw, "readings", 0, 1, 1_700_000_000_123,
                                    [("trace", b"\x01\xfe"), ("empty", None), ("trace", b"2")]))
    assert both["original_timestamp"] == 1_700_000_000_123
    assert [(h["key"], h["value_b64"] and base64.b64decode(h["value_b64"]))
            for h in both["original_headers"]] == [("trace", b"\x01\xfe"), ("empty", None),
                                                   ("trace", b"2")]


# the kind of a docs/messages.md example: from the nearest heading above it that names one
_DOC_KINDS = (("dead_letter", "dead"), ("alert", "alert"), ("score", "score"),
              ("reading", "reading"))


def _doc_examples() -> dict[str, list[dict]]:
    """The ```json examples of docs/messages.md, parsed, by kind (``reading``, ``alert``,
    ``score``, ``dead_letter``; ``other`` for one under no such heading)."""
    doc = REPO / "docs" / "messages.md"
    assert doc.is_file(), "docs/messages.md documents the message schemas"
    text = doc.read_text(encoding="utf-8")
    headings = [(m.start(), m.group(1).lower())
                for m in re.finditer(r"^#{1,6}\s+(.+)$", text, re.M)]
    out: dict[str, list[dict]] = {}
    blocks = list(re.finditer(r"```json[^\n]*\n(.*?)```", text, re.S))
    assert blocks, "docs/messages.md has no ```json blocks"
    for m in blocks:
        block = m.group(1)
        try:
            obj = json.loads(block)
        except json.JSONDecodeError as exc:  # pragma: no cover - the failure message
            pytest.fail(f"bad JSON example in docs/messages.md: {exc}\n{block}")
        above = [title for at, title in headings if at < m.start()]
        kind = next((k for title in reversed(above) for k, word in _DOC_KINDS if word in title),
                    "other")
        out.setdefault(kind, []).append(obj)
    return out


def test_message_examples_in_docs_parse() -> None:
    """Every JSON example parses, and matches what the code reads and writes."""
    examples = _doc_examples()
    for kind, _ in _DOC_KINDS:
        assert examples.get(kind), f"docs/messages.md shows no {kind} example"

    # input readings: each decodes with a decoder for the features the example itself uses
    for ex in examples["reading"]:
        values = ex.get("values")
        assert isinstance(values, list | dict), f"reading example without values: {ex}"
        # keyed by name: those names; a list: one (any) name per value
        features = (tuple(values) if isinstance(values, dict)
                    else tuple(f"f{i}" for i in range(len(values))))
        raw = json.dumps(ex).encode()
        try:
            r = ReadingDecoder(features).decode(raw)
        except BadRecord as exc:  # pragma: no cover - the failure message
            pytest.fail(f"reading example in docs/messages.md is refused ({exc}): {ex}")
        assert (r.sensor, r.ts_ms, r.values.shape) == (ex["sensor"], ex["ts"], (len(features),))
        batch = ReadingDecoder(features).decode_many([raw])  # the consumer's batch path
        assert not batch.bad and batch.sensors == [ex["sensor"]], batch.bad

    # records the consumer writes: the same fields (and type) as the code's
    produced = {
        "alert": orjson.loads(_alert().to_json()),
        "score": orjson.loads(
            ScoreRecord("m-1", 1000, 8000, 0.5, 0.25, 0.75, 1.5, "normal", "v1").to_json()),
        "dead_letter": orjson.loads(
            dead_letter("wrong_value_count", "got 2 values, expected 3", b"{}",
                        "sensor-readings", 3, 1841)),
    }
    for kind, code in produced.items():
        for ex in examples[kind]:
            assert set(ex) == set(code), (
                f"{kind} example in docs/messages.md: missing {sorted(set(code) - set(ex))}, "
                f"not written by the code {sorted(set(ex) - set(code))}")
            assert ex["type"] == code["type"], f"{kind} example has type {ex['type']!r}"
            assert ex["schema_version"] == SCHEMA_VERSION
    for ex in examples["alert"]:
        assert ex["event"] in ("open", "update", "resolve")
        assert ex["top_features"], "the alert example names its top features"
        for item in ex["top_features"]:
            assert set(item) == set(produced["alert"]["top_features"][0])
    for ex in examples["dead_letter"]:
        assert ex["reason"] in REASONS
        base64.b64decode(ex["original_b64"], validate=True)


# ----------------------------------------------------------------------------- settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No SD_* variables from the outside and no repository .env (cwd is a temp dir)."""
    import os

    for key in list(os.environ):
        if key.upper().startswith("SD_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults_without_env(clean_env) -> None:
    s = load_settings()
    assert s.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert s.detector.max_batch == 256
    assert s.service.http_port == 8000
    assert s.artifact_dir == Path("artifacts/model")


def test_env_vars_with_prefix_and_nested_delimiter(clean_env, monkeypatch) -> None:
    monkeypatch.setenv("SD_ARTIFACT_DIR", "/models/x")
    monkeypatch.setenv("SD_KAFKA__BOOTSTRAP_SERVERS", "b1:9092,b2:9092")
    monkeypatch.setenv("SD_KAFKA__INPUT_TOPIC", "in")
    monkeypatch.setenv("SD_DETECTOR__MAX_BATCH", "512")
    monkeypatch.setenv("SD_DETECTOR__LATE_POLICY", "drop")
    monkeypatch.setenv("SD_SERVICE__HTTP_PORT", "9100")
    monkeypatch.setenv("SD_SERVICE__REBUILD_WINDOWS", "false")
    monkeypatch.setenv("MAX_BATCH", "1")  # no prefix: ignored
    s = load_settings()
    assert s.artifact_dir == Path("/models/x")
    assert s.kafka.bootstrap_servers == "b1:9092,b2:9092"
    assert s.kafka.input_topic == "in"
    assert s.kafka.alert_topic == "sensor-alerts"  # untouched fields keep their defaults
    assert s.detector.max_batch == 512
    assert s.detector.late_policy == "drop"
    assert s.service.http_port == 9100
    assert s.service.rebuild_windows is False
    assert s.kafka.consumer_config()["bootstrap.servers"] == "b1:9092,b2:9092"


def test_dotenv_in_cwd_is_read_and_env_wins(clean_env, monkeypatch) -> None:
    (clean_env / ".env").write_text(
        "SD_DETECTOR__MAX_BATCH=64\nSD_KAFKA__GROUP_ID=from-dotenv\n", encoding="utf-8"
    )
    monkeypatch.setenv("SD_DETECTOR__MAX_BATCH", "32")
    s = load_settings()
    assert s.kafka.group_id == "from-dotenv"
    assert s.detector.max_batch == 32
    assert load_settings(detector={"max_batch": 8}).detector.max_batch == 8  # overrides win


@pytest.mark.parametrize(
    ("env", "value", "names"),
    [
        ("SD_DETECTOR__MAX_BATCH", "0", ["detector.max_batch", "SD_DETECTOR__MAX_BATCH"]),
        ("SD_DETECTOR__MAX_BATCH", "many", ["detector.max_batch", "integer"]),
        ("SD_KAFKA__SECURITY_PROTOCOL", "BOGUS",
         ["kafka.security_protocol", "SD_KAFKA__SECURITY_PROTOCOL", "SASL_SSL"]),
        ("SD_SERVICE__HTTP_PORT", "70000", ["service.http_port", "SD_SERVICE__HTTP_PORT"]),
        ("SD_SERVICE__LOG_FORMAT", "xml", ["service.log_format"]),
        ("SD_DETECTOR__LATE_POLICY", "keep", ["detector.late_policy"]),
        # a JSON value that does not parse fails before validation (pydantic-settings
        # SettingsError); load_settings turns that into a ConfigError naming the variable
        ("SD_KAFKA__EXTRA", "not json", ["kafka.extra (env SD_KAFKA__EXTRA)", "not valid JSON"]),
        ("SD_KAFKA__PRODUCER_EXTRA", "{x",
         ["kafka.producer_extra (env SD_KAFKA__PRODUCER_EXTRA)", "not valid JSON"]),
        ("SD_KAFKA__EXTRA", '["a"]', ["kafka.extra", "SD_KAFKA__EXTRA"]),
        ("SD_KAFKA__TYPO_FIELD", "1", ["SD_KAFKA__TYPO_FIELD (environment): not a setting"]),
        # a mistyped group or top-level name was ignored without a word (the groups refused
        # unknown fields, the top level did not): the setting kept its default
        ("SD_ARTIFACT_DIRR", "x", ["SD_ARTIFACT_DIRR", "did you mean SD_ARTIFACT_DIR?"]),
        ("SD_SERVCE__HTTP_PORT", "1", ["did you mean SD_SERVICE__HTTP_PORT?"]),
        ("SD_KAFKA__BOOTSTRAP_SERVER", "x", ["did you mean SD_KAFKA__BOOTSTRAP_SERVERS?"]),
        # the brokers refuse these empty ("Broker: Invalid topic" on the first record)
        *[(f"SD_KAFKA__{name.upper()}", "", [f"kafka.{name}", f"SD_KAFKA__{name.upper()}"])
          for name in ("input_topic", "alert_topic", "dead_letter_topic", "bootstrap_servers",
                       "group_id", "client_id")],
        ("SD_KAFKA__ALERT_TOPIC", "sensor alerts",
         ["SD_KAFKA__ALERT_TOPIC", "'sensor alerts' is not a Kafka topic name"]),
        ("SD_KAFKA__SCORE_TOPIC", " ", ["SD_KAFKA__SCORE_TOPIC", "not a Kafka topic name"]),
    ],
)
def test_invalid_value_names_the_field(clean_env, monkeypatch, env, value, names) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    msg = str(info.value)
    assert msg.startswith("invalid settings:")
    for name in names:
        assert name in msg, msg


def test_unknown_variables_in_the_env_file_are_refused_too(clean_env, monkeypatch) -> None:
    """The env file is read like the environment; SD_ variables that are not settings but the
    project's own (the dev broker's binary, the tests' data) are allowed."""
    monkeypatch.setenv("SD_TANSU_BIN", "/bin/true")
    monkeypatch.setenv("sd_shared_data", "/tmp")
    (clean_env / ".env").write_text("SD_KAFKA__GROUP_ID=g\nOTHER=1\n")
    assert load_settings().kafka.group_id == "g"
    (clean_env / ".env").write_text("SD_DETECTOR__MAX_BATCHES=8\n")
    with pytest.raises(ConfigError, match=r"SD_DETECTOR__MAX_BATCHES \(\.env\): not a setting; "
                                          r"did you mean SD_DETECTOR__MAX_BATCH\?"):
        load_settings()
    # an env file named by the caller is the one checked (None: none)
    assert load_settings(_env_file=None).kafka.group_id == "stream-detector"
    (clean_env / "other.env").write_text("SD_KAFKA__GROUP_IDD=x\n")
    with pytest.raises(ConfigError, match=r"SD_KAFKA__GROUP_IDD \(other\.env\)"):
        load_settings(_env_file="other.env")
    # an object setting's keys one by one, with the nested delimiter, are settings
    (clean_env / ".env").unlink()
    monkeypatch.setenv("SD_KAFKA__CONSUMER_EXTRA__fetch.max.bytes", "1000")
    assert load_settings().kafka.consumer_extra == {"fetch.max.bytes": "1000"}


def test_empty_score_topic_means_off(clean_env, monkeypatch) -> None:
    monkeypatch.setenv("SD_KAFKA__SCORE_TOPIC", "")
    assert load_settings().kafka.score_topic == ""
    monkeypatch.setenv("SD_KAFKA__SCORE_TOPIC", "sensor-scores.v1_a")
    assert load_settings().kafka.score_topic == "sensor-scores.v1_a"


@pytest.mark.parametrize("value", ["[1]", "null", '{"x": 1}'])
def test_bad_extra_value_names_the_real_env_variable_once(clean_env, monkeypatch, value) -> None:
    """A bad value inside SD_KAFKA__EXTRA: one line, naming SD_KAFKA__EXTRA and the key, not
    four lines with made-up names built from the key and the union's branches."""
    monkeypatch.setenv("SD_KAFKA__EXTRA", f'{{"fetch.max.bytes": {value}, "debug": "all"}}')
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value) == (
        "invalid settings:\n  kafka.extra (env SD_KAFKA__EXTRA): "
        "value of 'fetch.max.bytes' must be a string, number or boolean")


@pytest.mark.parametrize("key, says", [
    ("group.id", "use SD_KAFKA__GROUP_ID"),  # was silently replaced by the setting's value
    ("bootstrap.servers", "use SD_KAFKA__BOOTSTRAP_SERVERS"),  # silently beat the setting
    ("sasl.password", "use SD_KAFKA__SASL_PASSWORD"),
    ("enable.auto.offset.store", "set by the service (at-least-once delivery"),
    ("acks", "set by the service (at-least-once delivery"),
    ("metadata.broker.list", "use SD_KAFKA__BOOTSTRAP_SERVERS"),  # librdkafka's aliases too
    ("request.required.acks", "set by the service (at-least-once delivery"),
])
def test_extra_cannot_set_what_has_its_own_setting_or_guards_delivery(clean_env, monkeypatch,
                                                                      key, says) -> None:
    monkeypatch.setenv("SD_KAFKA__EXTRA", f'{{"{key}": "x"}}')
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "SD_KAFKA__EXTRA" in str(info.value) and says in str(info.value)


def test_extra_tunes_the_producer_defaults_and_keys_map_like_the_java_client(clean_env,
                                                                              monkeypatch) -> None:
    p = load_settings().kafka.producer_config()
    assert (p["linger.ms"], p["compression.type"], p["partitioner"]) == (5, "lz4",
                                                                          "murmur2_random")
    monkeypatch.setenv("SD_KAFKA__EXTRA", '{"linger.ms": 0, "compression.type": "zstd"}')
    p = load_settings().kafka.producer_config()  # the extras were overridden before
    assert (p["linger.ms"], p["compression.type"], p["partitioner"]) == (0, "zstd",
                                                                          "murmur2_random")
    assert p["enable.idempotence"] is True and p["acks"] == "all"
    # the same through librdkafka's other names (the defaults were set beside them and won)
    monkeypatch.setenv("SD_KAFKA__EXTRA", '{"queue.buffering.max.ms": 0, '
                       '"compression.codec": "zstd"}')
    p = load_settings().kafka.producer_config()
    assert "linger.ms" not in p and "compression.type" not in p
    assert (p["queue.buffering.max.ms"], p["compression.codec"]) == (0, "zstd")


def test_the_producer_queue_is_bounded_for_the_pod_unless_extra_says_otherwise(
        clean_env, monkeypatch) -> None:
    """librdkafka's default queue (1 GiB) let a slow dead-letter topic grow the service past
    the deployment's 2 GiB limit (review); the producer's default is 128 MiB, and the extras
    may set another. librdkafka accepts the value."""
    from confluent_kafka import Producer

    p = load_settings().kafka.producer_config()
    assert p["queue.buffering.max.kbytes"] == 131_072
    assert "queue.buffering.max.kbytes" not in load_settings().kafka.consumer_config()
    Producer({**p, "bootstrap.servers": "127.0.0.1:1"}).flush(0)  # no "invalid value"
    monkeypatch.setenv("SD_KAFKA__PRODUCER_EXTRA", '{"queue.buffering.max.kbytes": 524288}')
    assert load_settings().kafka.producer_config()["queue.buffering.max.kbytes"] == 524_288


def test_consumer_checks_its_full_fetch_queue_again_soon_unless_extra_says_otherwise(
        clean_env, monkeypatch) -> None:
    """librdkafka's fetch.queue.backoff.ms (1,000 ms by default) stalled a consumer catching up
    on a backlog for most of each second (docs/benchmarks.md); the consumer sets 10 ms, and
    SD_KAFKA__EXTRA may set another value (the producer gets none: it is a consumer property)."""
    from stream_detector.config import FETCH_QUEUE_BACKOFF_MS

    k = load_settings().kafka
    assert FETCH_QUEUE_BACKOFF_MS == 10
    assert k.consumer_config()["fetch.queue.backoff.ms"] == 10
    assert "fetch.queue.backoff.ms" not in k.producer_config()
    monkeypatch.setenv("SD_KAFKA__EXTRA", '{"fetch.queue.backoff.ms": 250}')
    assert load_settings().kafka.consumer_config()["fetch.queue.backoff.ms"] == 250
    from confluent_kafka import Consumer

    Consumer(k.consumer_config()).close()  # a property this librdkafka knows, in its range


def test_ratio_ordering_is_validated(clean_env, monkeypatch) -> None:
    monkeypatch.setenv("SD_DETECTOR__CLEAR_RATIO", "1.2")
    with pytest.raises(ConfigError,
                       match=r"detector.*SD_DETECTOR__CLEAR_RATIO < __WARNING_RATIO") as info:
        load_settings()
    assert "1.2 / 1.0 / 2.0" in str(info.value)
    monkeypatch.setenv("SD_DETECTOR__CLEAR_RATIO", "0.5")
    monkeypatch.setenv("SD_DETECTOR__WARNING_RATIO", "3")
    with pytest.raises(ConfigError, match="__WARNING_RATIO <= __CRITICAL_RATIO"):
        load_settings()
    monkeypatch.setenv("SD_DETECTOR__CRITICAL_RATIO", "3")  # equal is allowed
    assert load_settings().detector.critical_ratio == 3.0


def test_kafka_consistency_checks(clean_env) -> None:
    with pytest.raises(ConfigError,
                       match="SD_KAFKA__HEARTBEAT_INTERVAL_MS must be below SD_KAFKA__SESSION"):
        load_settings(kafka={"session_timeout_ms": 6000, "heartbeat_interval_ms": 6000})
    # cross-field errors name the variables (they named only the group, SD_KAFKA)
    with pytest.raises(ConfigError, match="SD_KAFKA__INPUT_TOPIC, __ALERT_TOPIC.* must differ"):
        load_settings(kafka={"alert_topic": "sensor-readings"})
    with pytest.raises(ConfigError, match="must differ"):
        load_settings(kafka={"score_topic": "sensor-alerts"})
    with pytest.raises(ConfigError, match="SD_KAFKA__SASL_MECHANISM is required"):
        load_settings(kafka={"security_protocol": "SASL_SSL"})


SECRET = "hunter2-Secret-Value"
KEY_SECRET = "key-pass-Value-9"


def _sasl_settings(monkeypatch) -> Settings:
    monkeypatch.setenv("SD_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("SD_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("SD_KAFKA__SASL_USERNAME", "detector")
    monkeypatch.setenv("SD_KAFKA__SASL_PASSWORD", SECRET)
    monkeypatch.setenv("SD_KAFKA__SSL_CA_LOCATION", "/etc/ca.pem")
    monkeypatch.setenv("SD_KAFKA__SSL_KEY_PASSWORD", KEY_SECRET)
    monkeypatch.setenv(
        "SD_KAFKA__EXTRA",
        '{"fetch.max.bytes": 52428800, "socket.keepalive.enable": true, "debug": "broker"}',
    )
    return load_settings()


def test_secrets_are_hidden_everywhere_but_the_client_config(clean_env, monkeypatch) -> None:
    s = _sasl_settings(monkeypatch)
    assert isinstance(s.kafka.sasl_password, SecretStr)
    rendered = [
        repr(s), str(s), repr(s.kafka), str(s.kafka), s.model_dump_json(),
        str(s.model_dump()), json.dumps(s.model_dump(mode="json")),
        structlog.processors.JSONRenderer()(None, "info", {"event": "settings", "settings": s}),
        structlog.processors.JSONRenderer(serializer=orjson.dumps)(
            None, "info", {"event": "settings", "settings": s.model_dump(mode="json")}
        ).decode(),
        structlog.dev.ConsoleRenderer(colors=False)(
            None, "info", {"event": "settings", "settings": s, "kafka": s.kafka}
        ),
    ]
    for text in rendered:
        assert SECRET not in text and KEY_SECRET not in text, text
    assert "**********" in repr(s)
    for conf in (s.kafka.consumer_config(), s.kafka.producer_config()):
        assert conf["sasl.password"] == SECRET
        assert conf["ssl.key.password"] == KEY_SECRET
        assert conf["sasl.username"] == "detector"
        assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
        assert conf["security.protocol"] == "SASL_SSL"
        assert conf["ssl.ca.location"] == "/etc/ca.pem"


def test_secrets_passed_through_extra_are_masked_in_reprs(clean_env, monkeypatch) -> None:
    """SD_KAFKA__EXTRA is the way to pass any librdkafka property, secret ones included; its
    values were shown in full by repr(settings) (and so by any log of the settings)."""
    monkeypatch.setenv("SD_KAFKA__EXTRA", '{"sasl.oauthbearer.client.secret": "Extra456", '
                       '"ssl.keystore.password": "Store789", "fetch.max.bytes": 52428800}')
    s = load_settings()
    for text in (repr(s), str(s), repr(s.kafka), str(s.kafka)):
        assert "Extra456" not in text and "Store789" not in text, text
        assert "52428800" in text  # the others stay readable
    conf = s.kafka.consumer_config()
    assert conf["sasl.oauthbearer.client.secret"] == "Extra456"  # the clients get the value
    assert conf["ssl.keystore.password"] == "Store789"


def test_client_specific_extras_reach_only_their_client(clean_env, monkeypatch) -> None:
    """SD_KAFKA__EXTRA goes to every client, so a consumer-only property made the producer log
    a CONFWARN (the replay and the benchmark did so on every run). The client-specific extras
    reach one client, after SD_KAFKA__EXTRA, with the same refusals and masking."""
    monkeypatch.setenv("SD_KAFKA__EXTRA", '{"fetch.max.bytes": 1000, "linger.ms": 7}')
    monkeypatch.setenv("SD_KAFKA__CONSUMER_EXTRA", '{"fetch.max.bytes": 2000, '
                       '"fetch.wait.max.ms": 10, "fetch.queue.backoff.ms": 50}')
    monkeypatch.setenv("SD_KAFKA__PRODUCER_EXTRA", '{"linger.ms": 20, "batch.size": 65536, '
                       '"sasl.oauthbearer.client.secret": "Prod123"}')
    s = load_settings()
    c, p = s.kafka.consumer_config(), s.kafka.producer_config()
    assert (c["fetch.max.bytes"], c["fetch.wait.max.ms"], c["fetch.queue.backoff.ms"]) == (
        2000, 10, 50)
    assert "batch.size" not in c and c["linger.ms"] == 7  # EXTRA still reaches both
    assert (p["linger.ms"], p["batch.size"], p["fetch.max.bytes"]) == (20, 65536, 1000)
    assert "fetch.wait.max.ms" not in p and "fetch.queue.backoff.ms" not in p
    assert p["enable.idempotence"] is True and p["acks"] == "all"
    assert "Prod123" not in repr(s) and p["sasl.oauthbearer.client.secret"] == "Prod123"
    for var, key in (("SD_KAFKA__CONSUMER_EXTRA", "enable.auto.commit"),
                     ("SD_KAFKA__PRODUCER_EXTRA", "acks"),
                     ("SD_KAFKA__CONSUMER_EXTRA", "group.id")):
        monkeypatch.setenv(var, f'{{"{key}": "x"}}')
        with pytest.raises(ConfigError) as info:
            load_settings()
        assert var in str(info.value) and key in str(info.value)
        monkeypatch.setenv(var, "{}")


def test_extra_librdkafka_properties_pass_through(clean_env, monkeypatch) -> None:
    s = _sasl_settings(monkeypatch)
    for conf in (s.kafka.consumer_config(), s.kafka.producer_config()):
        assert conf["fetch.max.bytes"] == 52428800
        assert conf["socket.keepalive.enable"] is True
        assert conf["debug"] == "broker"


def test_client_configs_without_security(clean_env) -> None:
    k = KafkaSettings()
    c, p = k.consumer_config(), k.producer_config()
    assert not any(key.startswith(("sasl.", "ssl.")) for key in {**c, **p})
    assert c["enable.auto.offset.store"] is False  # offsets are stored by hand
    assert c["group.id"] == "stream-detector"
    assert c["client.id"] == "stream-detector-consumer"
    assert p["enable.idempotence"] is True and p["acks"] == "all"
    assert p["client.id"] == "stream-detector-producer"
    assert "group.id" not in p


def test_settings_are_frozen(clean_env) -> None:
    from pydantic import ValidationError

    s = load_settings()
    with pytest.raises(ValidationError):
        s.detector.max_batch = 3  # type: ignore[misc]


def test_timestamp_beyond_int64_is_a_bad_timestamp() -> None:
    from stream_detector.records import BadRecord, ReadingDecoder

    dec = ReadingDecoder(("a",))
    with pytest.raises(BadRecord) as info:
        dec.decode(b'{"sensor": "s", "ts": 18446744073709551615, "values": [1.0]}')
    assert info.value.reason == "bad_timestamp"


def test_every_setting_is_documented_in_the_readme_and_the_env_file() -> None:
    """The README's settings table and the repository's .env name every setting the code has."""
    from stream_detector.config import settings_reference

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    env_file = (root / ".env").read_text(encoding="utf-8")
    names = [env for env, *_ in settings_reference()]
    assert len(names) > 30
    assert [n for n in names if f"`{n}`" not in readme] == []
    assert [n for n in names if f"\n{n}=" not in env_file] == []


def test_bad_json_in_a_named_env_file_is_named(clean_env) -> None:
    """The variable whose value is not JSON is looked up in the env file the caller passed,
    not the default one: a caller's file with a bad SD_KAFKA__EXTRA used to be reported as
    ``kafka (env SD_KAFKA or SD_KAFKA__*)`` while a good default .env was searched."""
    (clean_env / ".env").write_text('SD_KAFKA__EXTRA={"acks": "all"}\n')
    (clean_env / "other.env").write_text("SD_KAFKA__PRODUCER_EXTRA={oops\n")
    with pytest.raises(ConfigError,
                       match=r"kafka\.producer_extra \(env SD_KAFKA__PRODUCER_EXTRA\)"):
        load_settings(_env_file="other.env")
