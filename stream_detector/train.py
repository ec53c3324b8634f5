"""Offline trainer: dataset -> hybrid model -> artifact directory.

* Time-ordered split: per entity, the first ``1 - val_fraction`` of the train rows fit the model,
  the last ``val_fraction`` is validation (early stopping, error scales, thresholds). No
  shuffling across that boundary; windows are shuffled only within the fit part.
* The scaler (mean/std per feature) is fitted on the fit rows only.
* One model per dataset, shared by every entity with the same features, so the consumer can
  micro-batch windows of all sensors into one model call. Entities with different feature sets
  are refused with an error (train them as separate datasets / artifacts).
* Thresholds are calibrated on validation scores (no test labels): a high quantile or
  peaks-over-threshold, per sensor; sensors with fewer than ``min_sensor_windows`` (100)
  validation windows, and sensors never seen in training, get a global threshold fitted on all
  sensors.
* The score's long-term term (``long_term_alpha``, :class:`~stream_detector.manifest.LongTermSpec`)
  is calibrated on the same validation windows, started as a consumer starts a sensor.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import structlog
import torch
from tqdm.auto import tqdm

from stream_detector.datasets.base import Entity
from stream_detector.errors import ConfigError, DatasetError
from stream_detector.manifest import (
    SCHEMA_VERSION,
    Manifest,
    ScoreSpec,
    ThresholdSpec,
    repeated_names,
)
from stream_detector.model.artifact import write_artifact
from stream_detector.model.network import HybridModel
from stream_detector.scoring import ScoreFunction, fit_long_term, fit_threshold, smooth
from stream_detector.train_config import TrainConfig, config_from_overrides

__all__ = ["TrainConfig", "config_from_overrides", "train"]

log = structlog.get_logger(__name__)


@dataclass
class _Split:
    data: np.ndarray  # all entities' scaled rows, concatenated (float32)
    starts: np.ndarray  # window start rows that do not cross an entity boundary
    owner: np.ndarray  # entity index of each start
    names: list[str] = field(default_factory=list)


def _check_features(entities: list[Entity]) -> tuple[str, ...]:
    if not entities:
        raise DatasetError("no entities to train on")
    features = entities[0].features
    twice = sorted(repeated_names(features))
    if twice:  # the manifest maps names to columns: refused now, not after the training
        raise DatasetError(f"feature names {twice[:5]} appear more than once: each column "
                           "needs a name of its own")
    for e in entities[1:]:
        if e.features != features:
            raise DatasetError(
                f"entity {e.name} has {len(e.features)} features, {entities[0].name} has "
                f"{len(features)}: one model needs one feature set; train them separately"
            )
    # the command line refuses these; a direct caller's repeated entity name overwrote the
    # first one's scaler, error scales and threshold with the second's, and a column count
    # other than the names' failed inside torch
    twice = sorted(repeated_names([e.name for e in entities]))
    if twice:
        raise DatasetError(f"entity names {twice[:5]} appear more than once: each sensor's "
                           "scaler and threshold are stored under its name")
    for e in entities:
        if e.train.ndim != 2 or e.train.shape[1] != len(features):
            raise DatasetError(f"entity {e.name}: train is {e.train.shape}, expected (rows, "
                               f"{len(features)}) for its {len(features)} feature names")
        # the loaders refuse them; a direct caller's NaN made every score NaN and failed only
        # after the training ("cannot fit a threshold on zero finite scores")
        if not np.isfinite(e.train).all():
            row = int(np.argwhere(~np.isfinite(e.train))[0][0])  # as the loaders name it
            raise DatasetError(f"entity {e.name}: train row {row} holds NaN or an infinite "
                               "value; clean or drop it before training")
    return features


def _feature_weights(cfg: TrainConfig, entities: list[Entity],
                     features: tuple[str, ...]) -> tuple[float, ...]:
    """Weights of the score's mean over features: () = all equal (every feature scored)."""
    if not cfg.score_features:
        # the entities' own choice, which must be one choice: the score has one set of weights
        choices = {e.scored_features or () for e in entities}
        if len(choices) > 1:
            raise DatasetError(
                f"the entities score different features ({len(choices)} choices, e.g. "
                f"{sorted(choices)[:2]}): one model has one score; pass score_features")
    chosen = cfg.score_features or entities[0].scored_features or ()
    if not chosen or tuple(chosen) == ("all",):
        return ()
    unknown = [f for f in chosen if f not in features]
    if unknown:
        raise ConfigError(
            f"score_features {unknown} are not features of this dataset; known: "
            f"{list(features)[:12]}{' ...' if len(features) > 12 else ''}"
        )
    return tuple(1.0 if f in chosen else 0.0 for f in features)


def _floored(scale: np.ndarray, ratio: float) -> np.ndarray:
    """Raise each feature's typical error to at least ``ratio`` x the mean over features, so a
    feature that hardly varied in validation cannot blow the score up on its first change."""
    return np.maximum(scale, ratio * scale.mean() + 1e-12)


def _split_rows(e: Entity, val_fraction: float, window: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(e.train)
    cut = int(round(n * (1.0 - val_fraction)))
    if cut < window or n - cut < window:
        raise DatasetError(
            f"entity {e.name}: {n} train rows are too few for window {window} with "
            f"val_fraction {val_fraction}"
        )
    return e.train[:cut], e.train[cut:]


def _make_split(parts: list[np.ndarray], names: list[str], means: list[np.ndarray],
                stds: list[np.ndarray], clip: float, window: int) -> _Split:
    scaled = [np.clip((p - m) / sd, -clip, clip).astype(np.float32)
              for p, m, sd in zip(parts, means, stds, strict=True)]
    data = np.concatenate(scaled)
    starts, owner, offset = [], [], 0
    for i, p in enumerate(scaled):
        n = len(p) - window + 1
        starts.append(offset + np.arange(n))
        owner.append(np.full(n, i))
        offset += len(p)
    return _Split(data, np.concatenate(starts), np.concatenate(owner), names)


def _input_scalers(cfg: TrainConfig, fit_parts: list[np.ndarray]):
    """``(mean, std, means, stds, own)``: the scaler of sensors without their own (and of
    sensors unseen in training), then each entity's scaler, all fitted on fit rows only, and
    whether it is the entity's own (the manifest keeps only those).

    ``global``: one mean / std over all fit rows. ``per_sensor``: an entity with at least
    ``min_sensor_windows`` fit rows is standardised by its own mean / std, the others by those
    of all fit rows; a second stage, fitted on all standardised rows, follows (it centres and
    scales features that are constant within sensors). The two affine stages are folded into
    one mean / std per entity, which is what the manifest keeps."""
    parts = [p.astype(np.float64) for p in fit_parts]
    fit_all = np.concatenate(parts)
    mean = fit_all.mean(axis=0)
    std = np.maximum(fit_all.std(axis=0), cfg.std_floor)
    if cfg.input_scaling == "global":
        return mean, std, [mean] * len(parts), [std] * len(parts), [False] * len(parts)
    own = [len(p) >= cfg.min_sensor_windows for p in parts]
    first = [(p.mean(axis=0), np.maximum(p.std(axis=0), cfg.std_floor)) if mine
             else (mean, std) for p, mine in zip(parts, own, strict=True)]
    z = np.concatenate([(p - m) / sd for p, (m, sd) in zip(parts, first, strict=True)])
    z_mean = z.mean(axis=0)
    z_std = np.maximum(z.std(axis=0), cfg.std_floor)
    floor = cfg.std_floor if cfg.final_std_floor else 0.0
    means = [m + z_mean * sd for m, sd in first]
    stds = [np.maximum(sd * z_std, floor) for _, sd in first]
    return mean + z_mean * std, np.maximum(std * z_std, floor), means, stds, own


def _gather(split: _Split, idx: np.ndarray, window: int) -> torch.Tensor:
    rows = split.starts[idx][:, None] + np.arange(window)
    return torch.from_numpy(split.data[rows])


def _errors(model: HybridModel, split: _Split, window: int, batch: int = 4096):
    recs, fcs = [], []
    with torch.inference_mode():
        for i in range(0, len(split.starts), batch):
            idx = np.arange(i, min(i + batch, len(split.starts)))
            r, f = model(_gather(split, idx, window))
            recs.append(r.numpy())
            fcs.append(f.numpy())
    return np.concatenate(recs).astype(np.float64), np.concatenate(fcs).astype(np.float64)


def train(
    entities: list[Entity], config: TrainConfig, out_dir: str | Path, dataset: str = "custom"
) -> Manifest:
    """Train one hybrid model on ``entities`` and write the artifact to ``out_dir``."""
    t0 = time.monotonic()
    features = _check_features(entities)
    cfg = config
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    fit_parts, val_parts = zip(
        *(_split_rows(e, cfg.val_fraction, cfg.window) for e in entities), strict=True
    )
    names = [e.name for e in entities]
    mean, std, means, stds, own = _input_scalers(cfg, list(fit_parts))
    fit_views = list(zip(fit_parts, names, means, stds, strict=True))
    if cfg.fleet_view:  # each sensor's fit rows again, as an unseen sensor's are scaled (a
        # sensor without its own scaler has one view)
        fit_views += [(p, n, mean, std)
                      for p, n, mine in zip(fit_parts, names, own, strict=True) if mine]
    fit = _make_split([v[0] for v in fit_views], [v[1] for v in fit_views],
                      [v[2] for v in fit_views], [v[3] for v in fit_views], cfg.clip, cfg.window)
    val = _make_split(list(val_parts), names, means, stds, cfg.clip, cfg.window)
    scaler_per_sensor = {
        name: {"mean": tuple(m.tolist()), "std": tuple(sd.tolist())}
        for name, m, sd, mine in zip(names, means, stds, own, strict=True) if mine
    }

    model = HybridModel(len(features), cfg.window, cfg.hidden, cfg.encoder, cfg.layers,
                        cfg.latent)
    weights = _feature_weights(cfg, list(entities), features)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1)
    val_idx = np.arange(len(val.starts))
    if len(val_idx) > 50_000:
        val_idx = np.sort(rng.choice(val_idx, 50_000, replace=False))
    best, best_state, bad, history = float("inf"), None, 0, []
    stopped_by = "epoch_cap"
    per_epoch = min(cfg.max_windows_per_epoch, len(fit.starts))
    steps = (per_epoch + cfg.batch_size - 1) // cfg.batch_size
    for epoch in range(cfg.epochs):
        model.train()
        order = rng.choice(len(fit.starts), per_epoch, replace=False)
        total = 0.0
        bar = tqdm(
            range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress,
            leave=False, unit="batch",
        )
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            loss = model.training_loss(_gather(fit, idx, cfg.window), cfg.lambda_fc)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += loss.item()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{total / (step + 1):.4f}")
        model.eval()
        with torch.inference_mode():
            parts = []
            for i in range(0, len(val_idx), 4096):
                chunk = val_idx[i : i + 4096]
                loss_v = model.training_loss(_gather(val, chunk, cfg.window), cfg.lambda_fc)
                parts.append(float(loss_v) * len(chunk))
        val_loss = sum(parts) / len(val_idx)
        sched.step(val_loss)
        history.append({"epoch": epoch + 1, "train_loss": total / steps, "val_loss": val_loss})
        log.info("epoch", epoch=epoch + 1, train_loss=round(total / steps, 5),
                 val_loss=round(val_loss, 5))
        if val_loss < best - 1e-5:
            best, bad = val_loss, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                stopped_by = "early_stopping"
                break
    if stopped_by == "epoch_cap" and len(history) > 1 and bad == 0:
        # a budget, not a fault: the shipped datasets detect no better when trained to
        # convergence (docs/evaluation.md); said so the user knows where training ended
        log.info("validation loss still falling at the last epoch; --set epochs=N trains longer",
                 epochs=cfg.epochs, val_loss=round(best, 5))
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()

    # Error scales and thresholds come from validation windows only.
    rec, fc = _errors(model, val, cfg.window)
    rec_scale = _floored(rec.mean(axis=0), cfg.scale_floor_ratio)
    fc_scale = _floored(fc.mean(axis=0), cfg.scale_floor_ratio)
    per_sensor_scale: dict[str, dict[str, tuple[float, ...]]] = {}
    if cfg.per_sensor_scales:
        for i, name in enumerate(names):
            mine = val.owner == i
            if mine.sum() >= cfg.min_sensor_windows:
                per_sensor_scale[name] = {
                    "rec": tuple(_floored(rec[mine].mean(axis=0), cfg.scale_floor_ratio).tolist()),
                    "fc": tuple(_floored(fc[mine].mean(axis=0), cfg.scale_floor_ratio).tolist()),
                }
    score_spec = ScoreSpec(
        w_rec=cfg.w_rec, w_fc=cfg.w_fc, rec_scale=tuple(rec_scale.tolist()),
        fc_scale=tuple(fc_scale.tolist()), smoothing=cfg.smoothing, per_sensor=per_sensor_scale,
        feature_weights=weights,
    )
    score_fn = ScoreFunction(score_spec)
    sensor_rows = np.array([score_fn.row(name) for name in names], dtype=np.intp)
    raw = score_fn(rec, fc, sensor_rows[val.owner]).score
    per_sensor: dict[str, float] = {}
    smoothed_all = []
    for i, name in enumerate(names):
        s = smooth(raw[val.owner == i], cfg.smoothing)
        smoothed_all.append(s)
        # a 99.5 % quantile of a few dozen windows is their maximum: such a sensor gets the
        # threshold fitted on all sensors, as it gets the global error scales
        if cfg.per_sensor_thresholds and s.size >= cfg.min_sensor_windows:
            per_sensor[name] = fit_threshold(
                s, cfg.threshold_method, cfg.threshold_q, cfg.threshold_margin
            )
    pooled = np.concatenate(smoothed_all)
    needed = int(np.ceil(1.0 / (1.0 - cfg.threshold_q)))
    if pooled.size < needed:  # trainer review: one validation window made a threshold too
        log.warning("few validation windows: the default threshold is about their maximum",
                    windows=int(pooled.size), quantile=cfg.threshold_q, needed=needed,
                    remedy="more train rows or a larger val_fraction")
    default = fit_threshold(
        pooled, cfg.threshold_method, cfg.threshold_q, cfg.threshold_margin
    )
    thresholds = ThresholdSpec(
        method=cfg.threshold_method, default=default, per_sensor=per_sensor,
        params={"q": cfg.threshold_q, "margin": cfg.threshold_margin},
    )
    if cfg.long_term_alpha > 0:
        # every validation row closes one window, as every test row does in a replay: the
        # first W - 1 windows reach back into the fit rows (the validation split's own windows
        # start W - 1 rows later)
        bridge = _make_split(
            [np.concatenate([f[len(f) - (cfg.window - 1):], v[: cfg.window - 1]])
             for f, v in zip(fit_parts, val_parts, strict=True)],
            names, means, stds, cfg.clip, cfg.window)
        b_rec, b_fc = _errors(model, bridge, cfg.window)
        b_raw = score_fn(b_rec, b_fc, sensor_rows[bridge.owner]).score
        score_spec = replace(score_spec, long_term=fit_long_term(
            {name: np.concatenate([b_raw[bridge.owner == i], raw[val.owner == i]])
             for i, name in enumerate(names)},
            {name: thresholds.for_sensor(name) for name in names},
            # own figures where the sensor has its own threshold's count of windows (the
            # validation split's, W - 1 fewer than these)
            cfg.long_term_alpha, cfg.long_term_q, cfg.min_sensor_windows + cfg.window - 1,
            default))
    manifest = Manifest(
        # the lowest schema that holds the artifact, so older builds serve what they can:
        # 4 with a long-term term, 3 with per-sensor input scalers
        schema_version=(SCHEMA_VERSION if score_spec.long_term is not None
                        else 3 if scaler_per_sensor else 2),
        model_version="",
        dataset=dataset,
        features=features,
        window=cfg.window,
        network={"encoder": cfg.encoder, "hidden": cfg.hidden, "layers": model.layers,
                 "latent": model.latent},
        scaler_mean=tuple(mean.tolist()),
        scaler_std=tuple(std.tolist()),
        scaler_per_sensor=scaler_per_sensor,
        clip=cfg.clip,
        score=score_spec,
        thresholds=thresholds,
        sha256="",
        training={
            "config": {k: list(v) if isinstance(v, tuple) else v
                       for k, v in asdict(cfg).items() if k != "progress"},
            "entities": names,
            "fit_windows": int(len(fit.starts)),
            "val_windows": int(len(val.starts)),
            "best_val_loss": best,
            "stopped_by": stopped_by,
            "history": history,
            "seconds": round(time.monotonic() - t0, 1),
        },
    )
    result = write_artifact(out_dir, model, manifest)
    log.info("artifact written", path=str(out_dir), model_version=result.model_version,
             seconds=result.training["seconds"])
    return result
