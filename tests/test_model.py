"""The hybrid network, the trainer and the artifact contract (TorchScript + manifest).

Everything here is CPU-only and tiny: 4 features, windows of 8, hidden size 16, a few hundred
windows per epoch. One artifact is trained per module (``artifact`` fixture) and shared; tests
that damage it work on a copy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from stream_detector.datasets.base import Entity
from stream_detector.datasets.synthetic import generate
from stream_detector.errors import ArtifactError, ConfigError, StreamDetectorError
from stream_detector.manifest import MANIFEST_FILE, MODEL_FILE, SCHEMA_VERSION, read_manifest
from stream_detector.model.network import ENCODERS, HybridModel, default_latent
from stream_detector.model.runtime import TorchScorer
from stream_detector.offline import batch_score
from stream_detector.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]

CFG = TrainConfig(
    window=8, hidden=16, epochs=3, batch_size=64, max_windows_per_epoch=600, patience=5,
    smoothing=2, seed=0, threads=1, progress=False,
)


def _entities() -> list[Entity]:
    return generate(n_sensors=2, n_features=4, train_rows=600, test_rows=300, seed=0)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("artifact")
    entities = _entities()
    manifest = train(entities, CFG, out, dataset="synthetic")
    return out, manifest, entities


def _copy(artifact_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(artifact_dir, dst)
    return dst


def _edit_manifest(root: Path, **changes) -> None:
    path = root / MANIFEST_FILE
    raw = orjson.loads(path.read_bytes())
    raw.update(changes)
    path.write_bytes(orjson.dumps(raw))


# ----------------------------------------------------------------------------- network


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
@pytest.mark.parametrize(("batch", "window", "features"), [(3, 8, 4), (1, 5, 7)])
def test_forward_shapes_and_non_negative_errors(encoder, batch, window, features) -> None:
    torch.manual_seed(0)
    model = HybridModel(features, window, hidden=8, encoder=encoder).eval()
    x = torch.randn(batch, window, features)
    with torch.no_grad():
        rec, fc = model(x)
        out = model.encoder(x)
    assert rec.shape == (batch, features)
    assert fc.shape == (batch, features)
    assert out.shape == (batch, window, 8)  # encoder keeps one state per step
    for err in (rec, fc):
        assert torch.isfinite(err).all()
        assert (err >= 0).all()
    assert model.latent == default_latent(features) < max(features, 3)


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_forecast_path_is_causal(encoder) -> None:
    """The forecast of the newest reading must not have seen it."""
    torch.manual_seed(1)
    model = HybridModel(4, 8, hidden=8, encoder=encoder).eval()
    x1 = torch.randn(5, 8, 4)
    x2 = x1.clone()
    x2[:, -1, :] += 3.0 * torch.randn(5, 4)  # differ only in the newest reading
    ctx = model.context
    assert ctx == 7
    with torch.no_grad():
        out1, out2 = model.encoder(x1), model.encoder(x2)
        # every state up to the last context step is blind to the newest reading
        torch.testing.assert_close(out1[:, :ctx], out2[:, :ctx], rtol=0, atol=0)
        pred1 = x1[:, ctx - 1] + model.forecast(out1[:, ctx - 1])
        pred2 = x2[:, ctx - 1] + model.forecast(out2[:, ctx - 1])
        torch.testing.assert_close(pred1, pred2, rtol=0, atol=0)
        rec1, fc1 = model(x1)
        rec2, fc2 = model(x2)
    # forward's forecast error is exactly (prediction - newest reading)^2 ...
    torch.testing.assert_close(fc1, (pred1 - x1[:, -1]).pow(2))
    torch.testing.assert_close(fc2, (pred2 - x2[:, -1]).pow(2))
    # ... so it changes only through the target, and the reconstruction does see the reading
    assert not torch.allclose(fc1, fc2)
    assert not torch.allclose(rec1, rec2)


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_scripted_model_matches_eager_and_training_loss_matches_forward(encoder) -> None:
    torch.manual_seed(2)
    model = HybridModel(3, 6, hidden=8, encoder=encoder).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(4, 6, 3)
    with torch.no_grad():
        rec, fc = model(x)
        rec_s, fc_s = scripted(x)
        torch.testing.assert_close(rec_s, rec)
        torch.testing.assert_close(fc_s, fc)
        # lambda weighs exactly the forecast MSE of forward()
        diff = model.training_loss(x, 1.0) - model.training_loss(x, 0.0)
        torch.testing.assert_close(diff, fc.mean())
        torch.testing.assert_close(scripted.training_loss(x, 0.5), model.training_loss(x, 0.5))


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
@pytest.mark.parametrize("window", [3, 8, 16, 17, 32])
def test_both_decoders_see_the_whole_window(encoder, window) -> None:
    """The reconstruction decoder's state depends on every reading of the window and the
    forecasting decoder's on every context reading (a TCN as deep as the trainer's default of
    one layer saw only the last 3)."""
    torch.manual_seed(0)
    model = HybridModel(3, window, hidden=8, encoder=encoder).eval()
    x = torch.randn(2, window, 3, requires_grad=True)
    out = model.encoder(x)
    (grad_last,) = torch.autograd.grad(out[:, -1, :].sum(), x, retain_graph=True)
    (grad_ctx,) = torch.autograd.grad(out[:, window - 2, :].sum(), x)
    seen_last = grad_last.abs().sum(dim=(0, 2)) > 0
    seen_ctx = grad_ctx.abs().sum(dim=(0, 2)) > 0
    assert seen_last.all(), f"state after the newest reading ignores rows {(~seen_last).nonzero()}"
    assert seen_ctx[: window - 1].all() and not seen_ctx[window - 1]  # causal


def test_network_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="window"):
        HybridModel(4, 2)
    with pytest.raises(ValueError, match="unknown encoder 'transformer'"):
        HybridModel(4, 8, encoder="transformer")
    assert HybridModel(4, 8, latent=3).latent == 3


# ----------------------------------------------------------------------------- training


def test_validation_loss_falls(artifact) -> None:
    _, manifest, _ = artifact
    history = manifest.training["history"]
    assert len(history) == CFG.epochs
    assert manifest.training["stopped_by"] == "epoch_cap"
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert manifest.training["best_val_loss"] == min(h["val_loss"] for h in history)


def test_early_stopping_ends_training_when_validation_loss_stops_falling(tmp_path) -> None:
    # lr 0: the weights never move, so the validation loss is the same every epoch and the
    # patience (2 epochs without improvement) runs out at epoch 3 of the 10 allowed
    cfg = dataclasses.replace(CFG, lr=0.0, epochs=10, patience=2)
    manifest = train(_entities(), cfg, tmp_path / "a", dataset="synthetic")
    history = manifest.training["history"]
    assert len(history) == 3
    assert manifest.training["stopped_by"] == "early_stopping"
    assert manifest.training["best_val_loss"] == history[0]["val_loss"]


def test_manifest_describes_the_training(artifact) -> None:
    root, manifest, entities = artifact
    assert manifest.schema_version == 3  # the lowest that holds it: no long-term term (4)
    assert manifest.features == entities[0].features
    assert manifest.window == CFG.window
    assert manifest.network["encoder"] == "lstm"
    assert manifest.network["latent"] == default_latent(4)
    assert manifest.model_version.startswith("synthetic-")
    assert set(manifest.thresholds.per_sensor) == {e.name for e in entities}
    assert manifest.thresholds.default > 0
    assert manifest.training["entities"] == [e.name for e in entities]
    assert "progress" not in manifest.training["config"]
    assert {"torch", "numpy", "stream_detector"} <= set(manifest.versions)
    assert read_manifest(root) == manifest
    assert not list(root.glob("*.tmp"))


def test_sensors_with_few_validation_windows_get_the_global_threshold_and_scales(tmp_path):
    """A 99.5 % quantile of a few dozen windows is just their maximum: a sensor with fewer
    than min_sensor_windows validation windows gets the global threshold and scales."""
    a, b = _entities()
    b = dataclasses.replace(b, train=b.train[:400])  # 80 validation rows, 73 windows of 8
    cfg = dataclasses.replace(CFG, epochs=1, min_sensor_windows=100)
    manifest = train([a, b], cfg, tmp_path / "a", dataset="synthetic")
    assert set(manifest.thresholds.per_sensor) == {a.name}  # a: 120 rows, 113 windows
    assert set(manifest.score.per_sensor) == {a.name}
    assert manifest.thresholds.for_sensor(b.name) == manifest.thresholds.default
    manifest = train([a, b], dataclasses.replace(cfg, min_sensor_windows=50), tmp_path / "b",
                     dataset="synthetic")
    assert set(manifest.thresholds.per_sensor) == set(manifest.score.per_sensor) == {a.name,
                                                                                       b.name}


def test_trainer_refuses_mixed_feature_sets_and_short_entities(tmp_path) -> None:
    from stream_detector.errors import DatasetError

    a = _entities()[0]
    b = dataclasses.replace(a, name="other", features=("x", "y", "z", "w"))
    with pytest.raises(DatasetError, match="one model needs one feature set"):
        train([a, b], CFG, tmp_path / "a")
    short = dataclasses.replace(a, train=a.train[:20])
    with pytest.raises(DatasetError, match="too few"):
        train([short], CFG, tmp_path / "b")
    with pytest.raises(DatasetError, match="no entities"):
        train([], CFG, tmp_path / "c")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_thresholds_ignore_test_labels_and_same_seed_is_deterministic(artifact, tmp_path) -> None:
    """Retrain with every test label flipped and the test values moved: the trainer never
    looks at the test part, so thresholds (and the whole model) come out identical."""
    root, manifest, entities = artifact
    changed = [
        dataclasses.replace(e, labels=(1 - e.labels).astype(np.int8), test=e.test + 100.0)
        for e in entities
    ]
    again = train(changed, CFG, tmp_path / "again", dataset="synthetic")
    assert again.thresholds == manifest.thresholds
    assert again.score == manifest.score
    assert again.scaler_mean == manifest.scaler_mean
    # same seed and data -> bit-identical TorchScript file -> same model_version
    assert again.sha256 == manifest.sha256
    assert again.model_version == manifest.model_version
    s1 = TorchScorer.load(root)
    s2 = TorchScorer.load(tmp_path / "again")
    for e in entities:
        a, b = batch_score(s1, s1.manifest, e), batch_score(s2, s2.manifest, e)
        np.testing.assert_array_equal(a.score, b.score)
        np.testing.assert_array_equal(a.contributions, b.contributions)


def test_other_seed_gives_other_model_version(artifact, tmp_path) -> None:
    _, manifest, entities = artifact
    other = train(entities, dataclasses.replace(CFG, seed=1, epochs=1), tmp_path / "o",
                  dataset="synthetic")
    assert other.model_version != manifest.model_version


# ----------------------------------------------------------------------------- serving

_SUBPROCESS = r"""
import json, sys
import numpy as np
from stream_detector.datasets.base import Entity
from stream_detector.model.runtime import TorchScorer
from stream_detector.offline import batch_score

art, npz, name = sys.argv[1], sys.argv[2], sys.argv[3]
scorer = TorchScorer.load(art, expect_features=tuple(sys.argv[4].split(",")),
                          expect_window=int(sys.argv[5]), threads=1)
d = np.load(npz)
e = Entity(name, d["train"], d["test"], d["labels"], scorer.manifest.features)
s = batch_score(scorer, scorer.manifest, e)
assert "stream_detector.train" not in sys.modules, "training code was imported"
assert "stream_detector.model.network" not in sys.modules, "network module was imported"
print(json.dumps({
    "model_version": scorer.manifest.model_version,
    "threshold": s.threshold,
    "score": s.score.tolist(),
    "reconstruction": s.reconstruction.tolist(),
    "forecast": s.forecast.tolist(),
    "contributions": s.contributions.tolist(),
}))
"""


def test_artifact_round_trip_in_a_fresh_process(artifact, tmp_path) -> None:
    root, manifest, entities = artifact
    entity = entities[1]
    local = batch_score(TorchScorer.load(root), manifest, entity)
    assert local.score.shape == (len(entity.test),)
    assert local.contributions.shape == (len(entity.test), manifest.n_features)
    npz = tmp_path / "entity.npz"
    np.savez(npz, train=entity.train, test=entity.test, labels=entity.labels)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS, str(root), str(npz), entity.name,
         ",".join(manifest.features), str(manifest.window)],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = json.loads(proc.stdout.strip().splitlines()[-1])
    assert remote["model_version"] == manifest.model_version
    assert remote["threshold"] == manifest.thresholds.for_sensor(entity.name)
    for key in ("score", "reconstruction", "forecast", "contributions"):
        np.testing.assert_allclose(np.asarray(remote[key]), getattr(local, key), atol=1e-6,
                                   rtol=0, err_msg=key)


_WRITE_SUBPROCESS = r"""
import dataclasses, json, sys
import torch
from stream_detector.manifest import read_manifest
from stream_detector.model.artifact import write_artifact
from stream_detector.model.network import HybridModel

manifest = dataclasses.replace(read_manifest(sys.argv[1]), model_version="")
torch.manual_seed(0)
model = HybridModel(manifest.n_features, manifest.window, hidden=8)
out = write_artifact(sys.argv[2], model, manifest)
print(json.dumps({"version": out.model_version, "sha256": out.sha256}))
"""


def test_model_version_is_the_same_for_the_same_training_in_another_process(artifact, tmp_path):
    """The version (and so every alert id) depends on the weights and the scoring settings,
    not on the bytes torch.jit.save writes, which differ between processes."""
    root, manifest, _ = artifact
    runs = []
    for seed in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", _WRITE_SUBPROCESS, str(root), str(tmp_path / seed)],
            capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0]["version"] == runs[1]["version"]
    assert runs[0]["version"].startswith(manifest.dataset + "-")
    assert runs[0]["version"] != manifest.model_version  # other weights, other version
    # the scoring settings are part of it: another threshold is another version
    from stream_detector.model.artifact import content_digest
    from stream_detector.model.network import HybridModel

    torch.manual_seed(0)
    model = HybridModel(manifest.n_features, manifest.window, hidden=8)
    same = content_digest(model, manifest)
    assert runs[0]["version"] == f"{manifest.dataset}-{same[:12]}"
    other = dataclasses.replace(manifest, thresholds=dataclasses.replace(
        manifest.thresholds, default=manifest.thresholds.default * 2))
    assert content_digest(model, other) != same


def test_entity_too_short_for_a_context_is_refused_clearly(artifact) -> None:
    """Fewer than W-1 train rows: the first test rows cannot complete a window. Before, the
    context silently came from the wrong rows and only the last scores were returned."""
    from stream_detector.errors import DatasetError

    root, manifest, entities = artifact
    e = entities[0]
    ok = dataclasses.replace(e, train=e.train[-(manifest.window - 1):])
    assert batch_score(TorchScorer.load(root), manifest, ok).score.shape == (len(e.test),)
    short = dataclasses.replace(e, train=e.train[: manifest.window - 2])
    with pytest.raises(DatasetError, match=rf"{e.name} has {manifest.window - 2} train rows"):
        batch_score(TorchScorer.load(root), manifest, short)


def test_scorer_scales_and_clips_like_training(artifact) -> None:
    root, manifest, _ = artifact
    scorer = TorchScorer.load(root)
    mean = np.asarray(manifest.scaler_mean, np.float32)
    std = np.asarray(manifest.scaler_std, np.float32)
    w = np.tile(mean, (2, manifest.window, 1))
    w[1, -1, 0] = mean[0] + 1e6 * std[0]  # far beyond the clip
    x = scorer.scale(w)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x[0], 0.0, atol=1e-6)
    assert x[1, -1, 0] == pytest.approx(manifest.clip)
    rec, fc = scorer.errors(w)
    assert rec.dtype == fc.dtype == np.float64
    assert rec.shape == fc.shape == (2, manifest.n_features)
    r0, f0 = scorer.errors_batched(np.zeros((0, manifest.window, manifest.n_features)))
    assert r0.shape == f0.shape == (0, manifest.n_features)
    # chunking changes nothing beyond float32 rounding (kernels depend on the batch size)
    rb, fb = scorer.errors_batched(np.concatenate([w] * 3), batch=4)
    assert rb.shape == fb.shape == (6, manifest.n_features)
    np.testing.assert_allclose(rb, np.concatenate([rec] * 3), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fb, np.concatenate([fc] * 3), rtol=1e-4, atol=1e-6)


def test_async_scoring_scales_in_the_task_and_scores_chunk_by_chunk(artifact) -> None:
    """The consumer's path (errors_async: scaling and chunking inside the forked TorchScript
    task) gives the numbers of errors() on the same chunks. Not bit for bit: the task runs on
    another thread, whose kernels may round the last float32 bit differently."""
    root, manifest, _ = artifact
    scorer = TorchScorer.load(root)
    # the wrapper scripts, so the model runs off the caller's thread (a wrapper that fails to
    # script falls back to scoring in line: same numbers, no overlap, ~30 % less throughput)
    assert scorer.overlapped
    rng = np.random.default_rng(3)
    mean = np.asarray(manifest.scaler_mean, np.float32)
    std = np.asarray(manifest.scaler_std, np.float32)
    w = (mean + std * rng.normal(0, 3, (10, manifest.window, manifest.n_features))).astype(
        np.float32)
    w[4, -1, 1] = mean[1] + 1e6 * std[1]  # clipped
    whole = scorer.errors_async(w).result()
    for got, want in zip(whole, scorer.errors(w), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    chunked = scorer.errors_async(w, 4).result()
    parts = [scorer.errors(w[i : i + 4]) for i in (0, 4, 8)]
    for k in range(2):
        np.testing.assert_allclose(chunked[k], np.concatenate([p[k] for p in parts]),
                                   rtol=1e-6, atol=1e-7)


def test_async_scoring_finishes_while_the_caller_holds_the_gil(artifact) -> None:
    """The forked task never needs the GIL: it finishes while the calling thread runs Python
    without letting go of it (switch interval raised to 60 s). Before the task got copies of
    the inputs it dropped the caller's tensors itself, which takes the GIL (torch >= 2.10), so
    it waited for the caller's next pause: here, the end of the loop (done() stayed False),
    in the service up to its 0.5 ms switch interval per task while the loop decoded."""
    root, manifest, _ = artifact
    scorer = TorchScorer.load(root)
    assert scorer.overlapped
    w = np.tile(np.asarray(manifest.scaler_mean, np.float32), (64, manifest.window, 1))
    for rows in (None, np.zeros(64, dtype=np.intp)):
        old = sys.getswitchinterval()
        sys.setswitchinterval(60.0)
        try:
            pending = scorer.errors_async(w, 16, rows)
            finished = False
            for _ in range(20_000_000):  # pure Python, never blocks: seconds at most
                if pending.done():
                    finished = True
                    break
        finally:
            sys.setswitchinterval(old)
        assert finished, "the scoring task waited for the GIL"
        rec, fc = pending.result()
        assert rec.shape == fc.shape == (64, manifest.n_features)


# ----------------------------------------------------------------------------- refusals


def test_tampered_model_file_is_refused(artifact, tmp_path) -> None:
    root = _copy(artifact[0], tmp_path)
    model = root / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch") as info:
        TorchScorer.load(root)
    assert "tampered" in str(info.value)


def _other_artifact(artifact, root: Path):
    """A second valid artifact of the same shape (other weights), written by write_artifact."""
    from stream_detector.model.artifact import write_artifact

    m = artifact[1]
    torch.manual_seed(7)
    net = HybridModel(m.n_features, m.window, hidden=m.network["hidden"],
                      encoder=m.network["encoder"], layers=m.network["layers"],
                      latent=m.network["latent"])
    return write_artifact(root, net, dataclasses.replace(m, model_version=""))


def test_an_artifact_replaced_while_it_is_read_is_read_again(artifact, tmp_path,
                                                             monkeypatch) -> None:
    """The trainer replaces model.pt, then manifest.json (two renames). A reader that read the
    old manifest and then the new model refused the artifact ("checksum mismatch": a pod
    starting while the training Job wrote restarted), and the scorer loaded model.pt a second
    time after its checksum was verified. Now it reads again once the files settle, and loads
    the very bytes it verified."""
    import stream_detector.manifest as manifest_mod

    root = _copy(artifact[0], tmp_path)
    new = _other_artifact(artifact, tmp_path / "new")
    assert new.model_version != artifact[1].model_version
    parse, sleep = manifest_mod._parse_manifest, manifest_mod.time.sleep
    steps: list[str] = []

    def parse_then_writer_renames_model(path):
        m = parse(path)
        if not steps:  # the writer's first rename lands after the reader's manifest read
            shutil.copy(tmp_path / "new" / MODEL_FILE, root / "m.tmp")
            os.replace(root / "m.tmp", root / MODEL_FILE)
        steps.append(m.model_version)
        return m

    def pause_then_writer_renames_manifest(seconds):
        shutil.copy(tmp_path / "new" / MANIFEST_FILE, root / "j.tmp")
        os.replace(root / "j.tmp", root / MANIFEST_FILE)
        sleep(0)

    monkeypatch.setattr(manifest_mod, "_parse_manifest", parse_then_writer_renames_model)
    monkeypatch.setattr(manifest_mod.time, "sleep", pause_then_writer_renames_manifest)
    scorer = TorchScorer.load(root)
    assert steps == [artifact[1].model_version, new.model_version]  # read twice
    assert scorer.manifest.model_version == new.model_version and scorer.version_verified
    expect = TorchScorer.load(tmp_path / "new")
    x = np.random.default_rng(0).normal(size=(3, new.window, new.n_features)).astype(np.float32)
    for a, b in zip(scorer.errors(x), expect.errors(x), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_training_that_stopped_between_its_renames_is_refused_with_the_reason(
        artifact, tmp_path, monkeypatch) -> None:
    """New model, old manifest, nothing writing any more: refused after one pause, and the
    message says what may have happened."""
    import stream_detector.manifest as manifest_mod

    root = _copy(artifact[0], tmp_path)
    _other_artifact(artifact, tmp_path / "new")
    shutil.copy(tmp_path / "new" / MODEL_FILE, root / MODEL_FILE)
    pauses: list[float] = []
    monkeypatch.setattr(manifest_mod.time, "sleep", pauses.append)
    with pytest.raises(ArtifactError, match="checksum mismatch.*stopped while it replaced"):
        TorchScorer.load(root)
    assert pauses == [manifest_mod.REREAD_PAUSE_S]


@pytest.mark.parametrize("edit", ["threshold", "scaler", "weight"])
def test_an_edited_manifest_is_refused(artifact, tmp_path, edit: str) -> None:
    """A manifest edited after training (a threshold halved, a scaler or a score weight
    changed) loaded and kept its model_version, so its alerts reused the original's ids."""
    root = _copy(artifact[0], tmp_path)
    raw = orjson.loads((root / MANIFEST_FILE).read_bytes())
    if edit == "threshold":
        raw["thresholds"]["default"] /= 2
    elif edit == "scaler":
        raw["scaler_mean"][0] += 1.0
    else:
        raw["score"]["w_rec"] = 0.7
    (root / MANIFEST_FILE).write_bytes(orjson.dumps(raw))
    with pytest.raises(ArtifactError, match=r"does not match its contents .* changed after "
                                            r"training"):
        TorchScorer.load(root)
    assert TorchScorer.load(artifact[0]).manifest.model_version == artifact[1].model_version


def test_whole_number_float_options_and_older_artifacts_load(artifact, tmp_path) -> None:
    """`--set clip=5` trained an artifact whose version hashed the int 5 while the loader reads
    5.0: the new check refused an artifact nobody had edited. And an artifact without the
    rule's marker (written before the check) whose version is not the digest (the sha256 of
    model.pt before 2026-11-26) loads with a warning instead of being refused."""
    from tests.kafka_helpers import train_tiny

    art = train_tiny(tmp_path / "ints", clip=5, w_rec=1, w_fc=0)
    raw = orjson.loads((art / MANIFEST_FILE).read_bytes())
    assert raw["clip"] == 5 and raw["score"]["w_rec"] == 1
    assert TorchScorer.load(art).version_verified
    root = _copy(artifact[0], tmp_path)
    raw = orjson.loads((root / MANIFEST_FILE).read_bytes())
    del raw["versions"]["model_version_rule"]
    raw["model_version"] = "tiny-" + raw["sha256"][:12]  # as builds before 2026-11-26 wrote it
    (root / MANIFEST_FILE).write_bytes(orjson.dumps(raw))
    old = TorchScorer.load(root)
    assert not old.version_verified and old.manifest.model_version == raw["model_version"]


def test_changed_schema_version_is_refused(artifact, tmp_path) -> None:
    root = _copy(artifact[0], tmp_path)
    _edit_manifest(root, schema_version=SCHEMA_VERSION + 1)
    with pytest.raises(ArtifactError, match=r"schema_version 5; this build reads 1, 2, 3, 4"):
        TorchScorer.load(root)
    _edit_manifest(root, schema_version=None)
    with pytest.raises(ArtifactError, match="schema_version None"):
        read_manifest(root)


def test_feature_mismatch_says_which_features_differ(artifact) -> None:
    root, manifest, _ = artifact
    feats = list(manifest.features)
    wrong = (*feats[:-1], "humidity_typo")
    with pytest.raises(ArtifactError, match="feature mismatch") as info:
        TorchScorer.load(root, expect_features=wrong)
    msg = str(info.value)
    assert "'humidity_typo'" in msg and f"'{feats[-1]}'" in msg
    with pytest.raises(ArtifactError, match="same names in another order"):
        TorchScorer.load(root, expect_features=tuple(reversed(feats)))
    with pytest.raises(ArtifactError, match="expected 3 features, artifact has 4"):
        TorchScorer.load(root, expect_features=tuple(feats[:3]))
    assert TorchScorer.load(root, expect_features=tuple(feats)).manifest == manifest


def test_window_mismatch_is_refused(artifact) -> None:
    root, manifest, _ = artifact
    with pytest.raises(ArtifactError, match=r"window mismatch: expected 16, artifact has 8"):
        TorchScorer.load(root, expect_window=16)
    assert TorchScorer.load(root, expect_window=manifest.window).manifest.window == 8


def test_missing_files_are_refused_clearly(artifact, tmp_path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        TorchScorer.load(tmp_path / "nowhere")
    (tmp_path / "model.pt").write_bytes(b"x")  # a file passed for the directory
    with pytest.raises(ArtifactError, match="is a file; an artifact is the directory"):
        TorchScorer.load(tmp_path / "model.pt")
    root = _copy(artifact[0], tmp_path)
    (root / MODEL_FILE).unlink()
    with pytest.raises(ArtifactError, match="has no model.pt"):
        TorchScorer.load(root)
    (root / MANIFEST_FILE).unlink()
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        TorchScorer.load(root)


def test_corrupted_manifest_is_refused_clearly(artifact, tmp_path) -> None:
    root = _copy(artifact[0], tmp_path)
    path = root / MANIFEST_FILE
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ArtifactError, match="is not valid JSON"):
        TorchScorer.load(root)
    path.write_bytes(b"[1, 2]")
    with pytest.raises(ArtifactError, match="must hold a JSON object"):
        TorchScorer.load(root)
    raw = orjson.loads(good)
    del raw["scaler_std"]
    path.write_bytes(orjson.dumps(raw))
    with pytest.raises(ArtifactError, match="malformed.*scaler_std"):
        TorchScorer.load(root)
    raw = orjson.loads(good)
    raw["score"]["fc_scale"] = raw["score"]["fc_scale"][:2]
    path.write_bytes(orjson.dumps(raw))
    with pytest.raises(ArtifactError, match="score.fc_scale has 2 values but there are 4"):
        TorchScorer.load(root)


def test_per_sensor_scales_and_feature_weights_are_checked(artifact, tmp_path) -> None:
    root = _copy(artifact[0], tmp_path)
    path = root / MANIFEST_FILE
    good = orjson.loads(path.read_bytes())
    sensor = next(iter(good["score"]["per_sensor"]))
    raw = orjson.loads(path.read_bytes())
    raw["score"]["per_sensor"][sensor]["fc"] = [1.0]
    path.write_bytes(orjson.dumps(raw))
    with pytest.raises(ArtifactError, match=rf"per_sensor\['{sensor}'\].fc has 1 values"):
        TorchScorer.load(root)
    raw = dict(good, score=dict(good["score"], feature_weights=[1.0, -1.0, 0.0, 0.0]))
    path.write_bytes(orjson.dumps(raw))
    with pytest.raises(ArtifactError, match="feature_weights must be finite, non-negative"):
        TorchScorer.load(root)


def _set_path(raw: dict, path: tuple, value) -> None:
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


_FIRST = "<first sensor>"
_THR = ("thresholds", "per_sensor", _FIRST)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        # values the consumer divides by or compares with: alert on everything or nothing
        (_THR, None, r"thresholds.per_sensor\['.+'\] must be a number"),
        (_THR, 0, r"thresholds.per_sensor\['.+'\] must be finite and > 0"),
        (_THR, -1.0, r"per_sensor\['.+'\] must be finite and > 0, got -1"),
        (("thresholds", "default"), -1.0, r"thresholds.default must be finite and > 0"),
        (("thresholds", "default"), "3.0", r"thresholds.default must be a number, got '3.0'"),
        (("score", "rec_scale", 1), -0.5, r"score.rec_scale\[1\] must be finite and > 0"),
        (("score", "per_sensor", _FIRST, "fc", 0), 0.0, r"\['.+'\].fc\[0\] must be finite"),
        (("score", "per_sensor", _FIRST), {"rec": [1.0] * 4},
         r"score.per_sensor\['.+'\] has no 'fc'"),
        (("score", "per_sensor", _FIRST), {"fc": [1.0] * 4},
         r"score.per_sensor\['.+'\] has no 'rec'"),
        (("score", "per_sensor", _FIRST), 2.0, r"score.per_sensor\['.+'\] must be a JSON object"),
        (("score", "w_rec"), -1.0, r"score weights must be finite, non-negative"),
        (("score", "smoothing"), 2.5, r"score.smoothing must be an integer, got 2.5"),
        (("clip",), 0.0, r"clip must be finite and > 0"),
        (("window",), "16", r"window must be an integer, got '16'"),
        (("sha256",), 123, r"sha256 must be a string"),
        (("scaler_std", 0), None, r"scaler_std\[0\] must be a number, got None"),
        (("scaler_mean", 2), True, r"scaler_mean\[2\] must be a number, got True"),
        (("features", 1), "x0", r"features has duplicate names \['x0'\]"),
        (("features",), "x0,x1", r"features must be a list"),
        (("thresholds", "per_sensor"), [1.0], r"thresholds.per_sensor must be a JSON object"),
        (("scaler_per_sensor", _FIRST, "std", 1), 0.0,
         r"scaler_per_sensor\['.+'\].std\[1\] must be finite and > 0, got 0"),
        (("scaler_per_sensor", _FIRST, "mean", 0), "1", r"\['.+'\].mean\[0\] must be a number"),
        (("scaler_per_sensor", _FIRST, "mean"), [1.0], r"\['.+'\].mean has 1 values but there"),
        (("scaler_per_sensor", _FIRST), {"mean": [0.0] * 4},
         r"scaler_per_sensor\['.+'\] has no 'std'"),
        (("scaler_per_sensor", _FIRST), [0.0], r"scaler_per_sensor\['.+'\] must be a JSON object"),
        (("scaler_per_sensor",), [], r"scaler_per_sensor must be a JSON object"),
    ],
)
def test_manifest_values_are_checked_and_named(artifact, tmp_path, path, value, message) -> None:
    """A manifest edited by hand (or written by another tool) must not load with a threshold or
    scale that would alert on every window or on none; the error names the field."""
    root = _copy(artifact[0], tmp_path)
    mpath = root / MANIFEST_FILE
    raw = orjson.loads(mpath.read_bytes())
    first = next(iter(raw["thresholds"]["per_sensor"]))
    path = tuple(first if k == _FIRST else k for k in path)
    if path == ("features", 1):
        value = raw["features"][0]
        message = message.replace("x0", value)
    _set_path(raw, path, value)
    mpath.write_bytes(orjson.dumps(raw))
    with pytest.raises(ArtifactError, match=message):
        TorchScorer.load(root)


def test_schema_version_1_manifest_still_loads_with_global_scales(artifact, tmp_path) -> None:
    """Artifacts written before per-sensor scales: read as global scales, equal weights."""
    root = _copy(artifact[0], tmp_path)
    raw = orjson.loads((root / MANIFEST_FILE).read_bytes())
    raw["schema_version"] = 1
    del raw["score"]["per_sensor"], raw["score"]["feature_weights"]
    raw["score"].pop("long_term", None)
    del raw["versions"]["model_version_rule"]  # not written then: the version is not checked
    (root / MANIFEST_FILE).write_bytes(orjson.dumps(raw))
    scorer = TorchScorer.load(root)
    assert scorer.manifest.score.per_sensor == {} and scorer.manifest.score.feature_weights == ()
    entity = artifact[2][0]
    old = batch_score(scorer, scorer.manifest, entity)
    new = batch_score(TorchScorer.load(artifact[0]), artifact[1], entity)
    # same errors, other scales: the scores differ, the model outputs do not
    assert not np.allclose(old.score, new.score)
    # the old scores are exactly the current artifact's with its global scales only
    global_only = dataclasses.replace(
        artifact[1], score=dataclasses.replace(artifact[1].score, per_sensor={},
                                               feature_weights=(), long_term=None))
    expected = batch_score(TorchScorer.load(artifact[0]), global_only, entity)
    np.testing.assert_allclose(old.score, expected.score, rtol=1e-12)


def test_trainer_writes_per_sensor_scales_from_validation_rows(artifact) -> None:
    from numpy.lib.stride_tricks import sliding_window_view

    root, manifest, entities = artifact
    spec = manifest.score
    assert set(spec.per_sensor) == {e.name for e in entities}
    a, b = (np.asarray(spec.per_sensor[e.name]["rec"]) for e in entities)
    assert not np.allclose(a, b)  # two sensors, two noise levels
    assert spec.feature_weights == ()  # synthetic: every feature is scored
    # recomputed here: the mean error per feature over the sensor's own validation windows
    # (the last val_fraction of its train rows), floored at scale_floor_ratio x their mean
    scorer = TorchScorer.load(root)
    w = manifest.window
    for e in entities:
        val = e.train[int(round(len(e.train) * (1 - CFG.val_fraction))):]
        windows = np.ascontiguousarray(sliding_window_view(val, w, axis=0).transpose(0, 2, 1))
        rec, fc = scorer.errors(windows, np.full(len(windows), manifest.scaler_row(e.name)))
        for kind, err in (("rec", rec), ("fc", fc)):
            mean = err.mean(axis=0)
            expected = np.maximum(mean, CFG.scale_floor_ratio * mean.mean() + 1e-12)
            np.testing.assert_allclose(spec.per_sensor[e.name][kind], expected, rtol=1e-4,
                                       err_msg=f"{e.name} {kind}")


def test_trainer_writes_each_sensors_input_scaler_from_its_fit_rows(artifact, tmp_path) -> None:
    """input_scaling=per_sensor (the default): each training sensor is standardised by its own
    fit rows, then by one second stage over all of them, folded into one mean / std per
    sensor; scoring a sensor's windows uses its row, an unseen sensor the global one."""
    root, manifest, entities = artifact
    assert manifest.schema_version == 3  # per-sensor scalers; no long-term term (4)
    assert list(manifest.scaler_per_sensor) == [e.name for e in entities]
    fits = [e.train[: int(round(len(e.train) * (1 - CFG.val_fraction)))].astype(np.float64)
            for e in entities]
    z = np.concatenate([(f - f.mean(0)) / np.maximum(f.std(0), CFG.std_floor) for f in fits])
    zm, zs = z.mean(0), np.maximum(z.std(0), CFG.std_floor)
    for e, f in zip(entities, fits, strict=True):
        own = manifest.scaler_per_sensor[e.name]
        m, sd = f.mean(0), np.maximum(f.std(0), CFG.std_floor)
        np.testing.assert_allclose(own["mean"], m + zm * sd, rtol=1e-12)
        np.testing.assert_allclose(own["std"], sd * zs, rtol=1e-12)
    every = np.concatenate(fits)
    gm, gs = every.mean(0), np.maximum(every.std(0), CFG.std_floor)
    np.testing.assert_allclose(manifest.scaler_mean, gm + zm * gs, rtol=1e-12)
    np.testing.assert_allclose(manifest.scaler_std, gs * zs, rtol=1e-12)
    assert [manifest.scaler_row(e.name) for e in entities] == [1, 2]
    assert manifest.scaler_row("never-seen") == 0

    scorer = TorchScorer.load(root)
    w = np.ascontiguousarray(np.stack([entities[0].test[:8], entities[1].test[:8]]))
    rows = np.array([1, 2])
    means, inv = manifest.scaler_table()
    x = scorer.scale(w, rows)
    np.testing.assert_array_equal(
        x, np.clip((w - means[rows][:, None]) * inv[rows][:, None], -manifest.clip, manifest.clip))
    assert not np.allclose(x, scorer.scale(w))  # the global scaler differs
    np.testing.assert_array_equal(scorer.scale(w, np.array([0, 0])), scorer.scale(w))
    for short in (np.array([1]), np.array([[1, 2]])):  # not one row per window: refused
        with pytest.raises(ValueError, match="one row per window"):
            scorer.scale(w, short)
        with pytest.raises(ValueError, match="one row per window"):
            scorer.errors_async(w, 0, short)
    # the consumer's async path applies the same rows inside the task
    for got, want in zip(scorer.errors_async(w, 1, rows).result(), scorer.errors(w, rows),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # offline scoring uses each entity's row
    e = entities[1]
    ref = batch_score(scorer, manifest, e)
    from numpy.lib.stride_tricks import sliding_window_view

    from stream_detector.offline import stream_rows
    from stream_detector.scoring import ScoreFunction, smooth, with_long_term

    data, _ = stream_rows(e, manifest.window)
    wins = np.ascontiguousarray(sliding_window_view(data, manifest.window, axis=0)
                                .transpose(0, 2, 1))
    fn = ScoreFunction(manifest.score)
    mine = fn(*scorer.errors(wins, np.full(len(wins), 2)), fn.row(e.name)).score
    np.testing.assert_array_equal(ref.score, with_long_term(
        smooth(mine, manifest.score.smoothing), mine, manifest.thresholds.for_sensor(e.name),
        manifest.score.long_term, e.name))

    # global: no per-sensor scalers, the fit rows' mean / std; a sensor with fewer fit rows
    # than min_sensor_windows gets none either
    g = train(entities, dataclasses.replace(CFG, epochs=1, input_scaling="global"),
              tmp_path / "g")
    assert g.scaler_per_sensor == {} and g.scaler_row(entities[0].name) == 0
    assert g.score.long_term is None
    assert g.schema_version == 2  # builds that read only 1 and 2 can serve it
    np.testing.assert_allclose(g.scaler_mean, gm, rtol=1e-12)
    few = [entities[0], dataclasses.replace(entities[1], train=entities[1].train[:100])]
    m2 = train(few, dataclasses.replace(CFG, epochs=1), tmp_path / "few")
    assert list(m2.scaler_per_sensor) == [entities[0].name]  # 80 fit rows < 100
    with pytest.raises(ValueError, match="input_scaling must be 'per_sensor' or 'global'"):
        TrainConfig(input_scaling="per-sensor")


def test_fleet_view_fits_the_network_on_rows_scaled_as_an_unseen_sensors_too(
        artifact, tmp_path, monkeypatch) -> None:
    """fleet_view: the network's fit pool holds each sensor's fit rows twice, scaled by its own
    scaler and by the one a sensor unseen in training gets (the manifest's global row);
    validation, the per-sensor scalers and everything the consumer reads stay the own view's."""
    import stream_detector.train as trainer

    _, _, entities = artifact
    calls: list[tuple[int, list[np.ndarray], list[np.ndarray]]] = []
    real = trainer._make_split

    def spy(parts, names, means, stds, clip, window):
        calls.append((len(parts), [np.array(m) for m in means], [np.array(sd) for sd in stds]))
        return real(parts, names, means, stds, clip, window)

    monkeypatch.setattr(trainer, "_make_split", spy)
    cfg = dataclasses.replace(CFG, epochs=1)
    base = train(entities, dataclasses.replace(cfg, fleet_view=False), tmp_path / "base")
    fv = train(entities, cfg, tmp_path / "fv")  # the default
    assert [c[0] for c in calls] == [2, 2, 4, 2]  # fit, validation; fit (both views), validation
    _, fit_means, fit_stds = calls[2]
    for e, m, sd in zip(entities, fit_means[:2], fit_stds[:2], strict=True):
        np.testing.assert_array_equal(m, fv.scaler_per_sensor[e.name]["mean"])
        np.testing.assert_array_equal(sd, fv.scaler_per_sensor[e.name]["std"])
    for m, sd in zip(fit_means[2:], fit_stds[2:], strict=True):
        np.testing.assert_array_equal(m, fv.scaler_mean)
        np.testing.assert_array_equal(sd, fv.scaler_std)
    for m in calls[3][1]:  # validation: the own view only
        assert not np.array_equal(m, fv.scaler_mean)
    assert fv.training["fit_windows"] == 2 * base.training["fit_windows"]
    assert fv.training["val_windows"] == base.training["val_windows"]
    assert fv.scaler_per_sensor == base.scaler_per_sensor
    assert fv.training["config"]["fleet_view"] is True
    assert fv.model_version != base.model_version  # another network
    assert TrainConfig().fleet_view is True
    # global: every sensor has the scaler an unseen one gets, so there is one view; so has a
    # sensor with too few fit rows for its own scaler
    calls.clear()
    train(entities, dataclasses.replace(cfg, input_scaling="global"), tmp_path / "g")
    few = [entities[0], dataclasses.replace(entities[1], train=entities[1].train[:100])]
    mixed = train(few, cfg, tmp_path / "few")
    assert list(mixed.scaler_per_sensor) == [entities[0].name]
    assert [c[0] for c in calls] == [2, 2, 3, 2]
    np.testing.assert_array_equal(calls[2][1][1], mixed.scaler_mean)  # the one without, once
    np.testing.assert_array_equal(calls[2][1][2], mixed.scaler_mean)  # the one with: 2nd view


@pytest.mark.parametrize("overlapped", [True, False])
def test_detector_scales_each_sensor_by_its_own_row(artifact, overlapped) -> None:
    """The Detector (serve and replay) hands the scorer each window's scaler row, on the
    async path (several queued batches in one task) and in line: its scores are the offline
    ones; scaled globally they are not."""
    from stream_detector.config import DetectorSettings
    from stream_detector.detector import Detector
    from stream_detector.offline import stream_rows

    root, manifest, entities = artifact
    scorer = TorchScorer.load(root)
    if not overlapped:
        scorer._async = None
    det = Detector(manifest, scorer, DetectorSettings(max_batch=7, max_sensors=10))
    streams = {e.name: stream_rows(e, manifest.window)[0] for e in entities}
    n = len(next(iter(streams.values())))
    for i in range(0, n, 50):  # both sensors interleaved, 50 rows of each per batch
        names = [name for name in streams for _ in range(i, min(i + 50, n))]
        ts = [t for _ in streams for t in range(i, min(i + 50, n))]
        values = np.concatenate([rows[i : i + 50] for rows in streams.values()])
        det.submit_many(names, ts, values)
    got: dict[str, list[float]] = {e.name: [] for e in entities}
    for b in det.poll_batches() + det.flush_batches():
        for name, score in zip(b.sensors, b.score, strict=True):
            got[name].append(score)
    for e in entities:
        ref = batch_score(scorer, manifest, e).score
        np.testing.assert_allclose(got[e.name], ref, rtol=1e-5, atol=1e-6)
        glob = dataclasses.replace(manifest, scaler_per_sensor={})
        assert np.abs(batch_score(scorer, glob, e).score - ref).max() > 1e-2


def test_sensors_without_a_trained_scaler_are_counted(artifact) -> None:
    """A sensor that joins after training is scaled by the global scaler; operators see how
    many such sensors a replica holds (sd_sensors_untrained) and know to retrain."""
    from stream_detector.config import Settings
    from stream_detector.consumer import DetectorService
    from stream_detector.detector import Detector

    root, manifest, entities = artifact
    scorer = TorchScorer.load(root)
    settings = Settings(kafka={"input_topic": "readings", "score_topic": ""})
    service = DetectorService(settings, manifest, scorer, serve_http=False)
    det = service.detector = Detector(manifest, scorer, settings.detector)
    rows = entities[0].test[:3]
    for i, name in enumerate([entities[0].name, entities[1].name, "new-1", "new-2"]):
        det.submit_many([name] * 3, [i * 10, i * 10 + 1, i * 10 + 2], rows)
    service._on_stats("{}")
    assert det.untrained() == 2 and service.metrics.sensors_untrained._value.get() == 2
    det.forget(["new-1", entities[1].name])
    det.submit_many([entities[1].name], [100], rows[:1])  # its slot reused by a trained sensor
    assert det.untrained() == 1
    glob = Detector(dataclasses.replace(manifest, scaler_per_sensor={}), scorer)
    glob.submit_many(["new-1"], [0], rows[:1])
    assert glob.untrained() == 0  # every sensor is scaled globally: nothing to retrain for


def test_score_features_select_what_is_scored(tmp_path) -> None:
    entities = [dataclasses.replace(e, scored_features=(e.features[0],)) for e in _entities()]
    cfg = dataclasses.replace(CFG, epochs=1)
    m = train(entities, cfg, tmp_path / "a", dataset="synthetic")
    assert m.score.feature_weights == (1.0, 0.0, 0.0, 0.0)
    every = train(entities, dataclasses.replace(cfg, score_features="all"), tmp_path / "b")
    assert every.score.feature_weights == ()
    two = TrainConfig(score_features="f2, f1")
    assert two.score_features == ("f2", "f1")
    with pytest.raises(ConfigError, match=r"score_features \['nope'\] are not features"):
        train(entities, dataclasses.replace(cfg, score_features="nope"), tmp_path / "c")


def test_checksum_valid_but_unloadable_or_mismatched_model_is_refused(artifact, tmp_path):
    from stream_detector.manifest import sha256_file

    root = _copy(artifact[0], tmp_path)
    model = root / MODEL_FILE
    good_model = model.read_bytes()
    # a "model" whose checksum was updated too: loading fails with a short, clear message
    model.write_bytes(b"not a torchscript archive")
    _edit_manifest(root, sha256=sha256_file(model))
    with pytest.raises(ArtifactError, match="cannot load TorchScript model"):
        TorchScorer.load(root)
    # a consistent manifest that declares fewer features than the model takes
    model.write_bytes(good_model)
    raw = orjson.loads((root / MANIFEST_FILE).read_bytes())
    n = 3
    raw.update(
        sha256=sha256_file(model), features=raw["features"][:n],
        scaler_mean=raw["scaler_mean"][:n], scaler_std=raw["scaler_std"][:n],
    )
    raw["score"].update(rec_scale=raw["score"]["rec_scale"][:n],
                        fc_scale=raw["score"]["fc_scale"][:n])
    for sc in raw["score"]["per_sensor"].values():
        sc.update(rec=sc["rec"][:n], fc=sc["fc"][:n])
    for sc in raw["scaler_per_sensor"].values():
        sc.update(mean=sc["mean"][:n], std=sc["std"][:n])
    (root / MANIFEST_FILE).write_bytes(orjson.dumps(raw))
    with pytest.raises(ArtifactError, match=r"does not accept windows of shape \(B, 8, 3\)"):
        TorchScorer.load(root)


def test_artifact_errors_are_package_errors() -> None:
    assert issubclass(ArtifactError, StreamDetectorError)


def test_trainer_calibrates_the_long_term_term_on_every_validation_row(artifact,
                                                                       tmp_path) -> None:
    """long_term_alpha > 0 (off by default): score.long_term holds per sensor the mean of its
    clipped validation window scores (start) and the quantile of the level started there
    (level), over one window per validation row, the first W - 1 reaching back into the fit
    rows, as a replay scores every test row; recomputed here with the TorchScript model. The
    network, scales and thresholds are those of the same training without the term."""
    from numpy.lib.stride_tricks import sliding_window_view

    from stream_detector.offline import stream_rows
    from stream_detector.scoring import ScoreFunction, long_term, smooth, with_long_term

    base_root, base, entities = artifact
    assert base.score.long_term is None and CFG.long_term_alpha == 0.0
    root = tmp_path / "lt"
    manifest = train(entities, dataclasses.replace(CFG, long_term_alpha=0.05), root,
                     dataset="synthetic")
    assert manifest.schema_version == 4  # older builds would score without the term
    assert manifest.sha256 == base.sha256 and manifest.thresholds == base.thresholds
    assert dataclasses.replace(manifest.score, long_term=None) == base.score
    assert manifest.model_version != base.model_version  # other scores, other alert ids
    lt = manifest.score.long_term
    assert lt is not None and lt.alpha == 0.05
    assert lt.quantile == CFG.long_term_q == 0.995
    assert set(lt.per_sensor) == {e.name for e in entities}
    scorer, fn, w = TorchScorer.load(root), ScoreFunction(manifest.score), manifest.window
    levels, clipped = [], []
    for e in entities:
        cut = int(round(len(e.train) * (1 - CFG.val_fraction)))
        rows = e.train[cut - (w - 1):]
        wins = np.ascontiguousarray(sliding_window_view(rows, w, axis=0).transpose(0, 2, 1))
        assert len(wins) == len(e.train) - cut  # one per validation row
        raw = fn(*scorer.errors(wins, np.full(len(wins), manifest.scaler_row(e.name))),
                 fn.row(e.name)).score
        thr = manifest.thresholds.for_sensor(e.name)
        own = lt.per_sensor[e.name]
        assert own["start"] == pytest.approx(np.minimum(raw, thr).mean(), rel=1e-4)
        level = long_term(raw, thr, lt.alpha, own["start"])
        assert own["level"] == pytest.approx(np.quantile(level, lt.quantile), rel=1e-4)
        levels.append(level)
        clipped.append(np.minimum(raw, thr))
    assert lt.start == pytest.approx(np.concatenate(clipped).mean(), rel=1e-4)
    assert lt.level == pytest.approx(np.quantile(np.concatenate(levels), lt.quantile), rel=1e-4)
    # offline scoring adds the term to the smoothed scores of the same network
    for e in entities:
        with_lt = batch_score(scorer, manifest, e)
        plain = batch_score(TorchScorer.load(base_root), base, e)
        np.testing.assert_array_equal(with_lt.reconstruction, plain.reconstruction)
        thr = manifest.thresholds.for_sensor(e.name)
        data, _ = stream_rows(e, w)
        wins = np.ascontiguousarray(sliding_window_view(data, w, axis=0).transpose(0, 2, 1))
        raw = fn(*scorer.errors(wins, np.full(len(wins), manifest.scaler_row(e.name))),
                 fn.row(e.name)).score
        np.testing.assert_array_equal(with_lt.score, with_long_term(
            smooth(raw, manifest.score.smoothing), raw, thr, lt, e.name))
        assert (with_lt.score > plain.score).any() and (with_lt.score >= plain.score).all()
    # own figures exactly where the sensor has its own threshold: 520 train rows give 104
    # validation rows, 97 validation windows (window 8) < min_sensor_windows (100)
    few = [entities[0], dataclasses.replace(entities[1], train=entities[1].train[:520])]
    m2 = train(few, dataclasses.replace(CFG, epochs=1, long_term_alpha=0.05), tmp_path / "few")
    assert set(m2.thresholds.per_sensor) == set(m2.score.long_term.per_sensor) == {
        entities[0].name}
    with pytest.raises(ValueError, match=r"long_term_alpha must be in \[0, 1\]"):
        TrainConfig(long_term_alpha=1.5)
    with pytest.raises(ValueError, match=r"long_term_q must be in \[0.5, 1\)"):
        TrainConfig(long_term_q=1.0)


def test_async_model_calls_follow_the_given_sizes_bit_for_bit(artifact) -> None:
    """errors_async with a list of sizes makes one model call per size, so each window's
    errors are those errors() gives it in a call of that size, exactly; a chunk size splits
    differently and (with this model, on CPU) need not match them in the last bits."""
    root, manifest, _ = artifact
    scorer = TorchScorer.load(root)
    assert scorer.overlapped
    rng = np.random.default_rng(3)
    w = (np.asarray(manifest.scaler_mean, np.float32)
         + rng.normal(0, 1, (17, manifest.window, manifest.n_features))).astype(np.float32)
    rows = np.zeros(17, dtype=np.intp)
    got = scorer.errors_async(w, [1, 8, 8], rows).result()
    parts = [scorer.errors(w[a:b], rows[a:b]) for a, b in ((0, 1), (1, 9), (9, 17))]
    for k in range(2):
        assert np.array_equal(got[k], np.concatenate([p[k] for p in parts]))
    with pytest.raises(ValueError, match="do not split 17 windows"):
        scorer.errors_async(w, [8, 8], rows)


@pytest.mark.parametrize(("changes", "message"), [
    ({"window": 10**10}, r"window must be in \[3, 10,000\], got 10000000000"),
    ({"window": 2**70}, r"window must be an integer"),  # beyond 64 bits: read as a float
])
def test_an_absurd_window_is_refused_not_a_memory_error(artifact, tmp_path, changes,
                                                        message) -> None:
    """A manifest edited to a huge window ran into numpy's MemoryError or OverflowError while
    building the load's shape probe: a traceback, not a refusal (found in review)."""
    import json

    root = _copy(artifact[0], tmp_path)
    raw = json.loads((root / MANIFEST_FILE).read_text())
    raw.update(changes)
    (root / MANIFEST_FILE).write_text(json.dumps(raw))  # json: orjson stops at 64 bits
    with pytest.raises(ArtifactError, match=message):
        TorchScorer.load(root)


def test_a_window_scores_alike_in_a_model_call_of_any_size(artifact) -> None:
    """torch picks its CPU kernels by the call's size, and a window's float32 errors differed
    in the last bits with the micro-batch it landed in (up to ~4e-6; found in review). Every
    call is padded to a multiple of CALL_MULTIPLE windows, so a window scores alike alone, in
    a short call or in a long one, bit for bit, sync and async."""
    from stream_detector.model.runtime import CALL_MULTIPLE

    root, manifest, _ = artifact
    scorer = TorchScorer.load(root, threads=1)
    rng = np.random.default_rng(5)
    n = 2 * CALL_MULTIPLE + 8
    w = (np.asarray(manifest.scaler_mean, np.float32)
         + rng.normal(0, 1, (n, manifest.window, manifest.n_features))).astype(np.float32)
    rows = np.zeros(n, dtype=np.intp)
    among = scorer.errors(w, rows)  # one call of n
    for size in (1, 2, 3, 5, 8, 20):
        starts = range(0, n, size)
        alone = [scorer.errors(w[i : i + size], rows[i : i + size]) for i in starts]
        for k in range(2):
            assert np.array_equal(np.concatenate([a[k] for a in alone]), among[k]), size
        sizes = [min(size, n - i) for i in starts]
        pending = scorer.errors_async(w, sizes, rows).result()
        for k in range(2):
            assert np.array_equal(pending[k], among[k]), size


def test_the_options_name_the_encoders_the_network_builds() -> None:
    """train_config names the encoders without importing torch; the network's registry is the
    one that builds them: the two lists must not drift apart."""
    from stream_detector.model.network import ENCODERS
    from stream_detector.train_config import ENCODER_NAMES

    assert sorted(ENCODER_NAMES) == sorted(ENCODERS)


def test_tied_validation_scores_put_the_threshold_just_above_them() -> None:
    """A quantile of tied scores is the tied score, and a window alerts at score >= threshold:
    a sensor idle for its whole validation period alerted on every window that behaved exactly
    as in training. Continuous scores keep their quantile unchanged."""
    from stream_detector.scoring import TIE_STEP, fit_threshold

    flat = np.full(1000, 0.5)
    for method in ("quantile", "pot"):
        thr = fit_threshold(flat, method)
        assert 0.5 < thr <= 0.5 * (1 + TIE_STEP), method
    assert fit_threshold(np.zeros(500)) > 0
    tail = np.concatenate([np.linspace(0, 1, 990), np.full(10, 2.0)])  # 1 % tie at the top
    assert fit_threshold(tail) > 2.0
    rng = np.random.default_rng(0)
    for n in (200, 201, 1000, 1001):  # (n - 1) q whole or not: never moved
        s = rng.random(n)
        assert fit_threshold(s) == float(np.quantile(s, 0.995)), n
        assert fit_threshold(s, margin=1.5) == float(np.quantile(s, 0.995)) * 1.5, n


def test_a_sensor_constant_in_training_does_not_alert_when_it_stays_so(tmp_path: Path) -> None:
    """End to end: an entity whose train rows are all the same value, scored on test rows
    that are the same again: no window reaches the threshold (every one did before)."""
    values = np.full((600, 3), 3.0)
    ent = [Entity("idle", values, values[:300].copy(), np.zeros(300, np.int8), ("a", "b", "c"))]
    cfg = TrainConfig(window=8, hidden=8, epochs=1, max_windows_per_epoch=500, progress=False,
                      threads=1, min_sensor_windows=50)
    train(ent, cfg, tmp_path / "art", dataset="idle")
    scorer = TorchScorer.load(tmp_path / "art")
    ref = batch_score(scorer, scorer.manifest, ent[0])
    assert np.all(ref.score < ref.threshold), (ref.score.max(), ref.threshold)


def test_final_std_floor_keeps_constant_features_at_std_floor(tmp_path: Path) -> None:
    """per_sensor scaling floors each stage's std at std_floor, so a feature constant in every
    sensor's fit rows ends at std_floor**2 (1e-4: its smallest change stands out, the default,
    kept by a pre-registered backtest); final_std_floor floors the folded std too, as global
    scaling does. Features that vary are scaled alike either way."""
    rng = np.random.default_rng(0)
    ents = []
    for i in range(2):
        x = rng.normal(size=(400, 3))
        x[:, 1] = 5.0  # constant in every sensor
        x[:, 2] = 5.0 + 0.5 * rng.normal(size=400) * i  # constant in sensor 0 only
        ents.append(Entity(f"s{i}", x, x[:50], np.zeros(50, np.int8), ("a", "b", "c")))
    cfg = TrainConfig(window=8, hidden=8, epochs=1, progress=False, threads=1,
                      min_sensor_windows=50)
    off = train(ents, cfg, tmp_path / "off")
    on = train(ents, dataclasses.replace(cfg, final_std_floor=True), tmp_path / "on")
    floor = cfg.std_floor
    for m in (off, on):
        assert m.training["config"]["final_std_floor"] is (m is on)
    std_off = {n: np.array(sc["std"]) for n, sc in off.scaler_per_sensor.items()}
    std_on = {n: np.array(sc["std"]) for n, sc in on.scaler_per_sensor.items()}
    assert std_off["s0"][1] == pytest.approx(floor * floor)
    assert std_off["s0"][2] < floor  # floor x the second stage's std (< 1)
    assert std_on["s0"][1] == std_on["s0"][2] == floor
    assert off.scaler_std[1] == pytest.approx(floor * floor) and on.scaler_std[1] == floor
    for n in ("s0", "s1"):  # the varying feature: the same scaler
        assert std_on[n][0] == std_off[n][0] > floor
    assert std_on["s1"][2] == std_off["s1"][2] > floor


def test_train_refuses_non_finite_rows_and_repeated_feature_names(tmp_path: Path) -> None:
    """The loaders refuse both; train() called directly failed only after the training (a
    NaN made every score NaN; a repeated name was refused when the artifact was written)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2))
    bad = x.copy()
    bad[123, 1] = np.nan
    cfg = TrainConfig(window=8, epochs=1, progress=False)
    with pytest.raises(StreamDetectorError, match="entity e: train row 123 holds NaN"):
        train([Entity("e", bad, x[:50], np.zeros(50, np.int8), ("a", "b"))], cfg, tmp_path / "a")
    with pytest.raises(StreamDetectorError, match=r"feature names \['a'\] appear more than once"):
        train([Entity("e", x, x[:50], np.zeros(50, np.int8), ("a", "a"))], cfg, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_train_refuses_repeated_entities_wrong_widths_and_mixed_scored_features(
        tmp_path: Path) -> None:
    """Direct train() callers (the command line refuses the first): a repeated entity name
    overwrote the first sensor's scaler and threshold with the second's; a column count other
    than the names' failed inside torch; entities choosing different scored features were
    scored by the first one's choice."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2))
    y = np.zeros(50, np.int8)
    cfg = TrainConfig(window=8, epochs=1, progress=False)
    with pytest.raises(StreamDetectorError, match=r"entity names \['e'\] appear more than once"):
        train([Entity("e", x, x[:50], y, ("a", "b")), Entity("e", x, x[:50], y, ("a", "b"))],
              cfg, tmp_path / "a")
    with pytest.raises(StreamDetectorError, match=r"entity f: train is \(300, 3\), expected "
                                                  r"\(rows, 2\)"):
        train([Entity("e", x, x[:50], y, ("a", "b")),
               Entity("f", rng.normal(size=(300, 3)), x[:50], y, ("a", "b"))], cfg, tmp_path / "b")
    mixed = [Entity("e", x, x[:50], y, ("a", "b"), scored_features=("a",)),
             Entity("f", x, x[:50], y, ("a", "b"))]
    with pytest.raises(StreamDetectorError, match="the entities score different features"):
        train(mixed, cfg, tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")
    # an explicit choice settles it
    m = train(mixed, dataclasses.replace(cfg, score_features=("b",)), tmp_path / "d")
    assert m.score.feature_weights == (0.0, 1.0)


def test_few_validation_windows_are_named_in_a_warning(tmp_path: Path) -> None:
    """One validation window made the 99.5 % threshold without a word (trainer review: 95 % of
    normal test rows then alerted); now a warning says how many there were and how many the
    quantile needs."""
    from structlog.testing import capture_logs

    rng = np.random.default_rng(0)
    x = np.sin(np.arange(120)[:, None] / 5.0) + 0.1 * rng.normal(size=(120, 2))
    cfg = TrainConfig(window=8, hidden=8, epochs=1, progress=False, threads=1)
    with capture_logs() as logs:
        train([Entity("e", x, x[:40], np.zeros(40, np.int8), ("a", "b"))], cfg, tmp_path / "a")
    few = [e for e in logs if e["event"].startswith("few validation windows")]
    assert len(few) == 1 and few[0]["needed"] == 200 and few[0]["windows"] < 200, few
