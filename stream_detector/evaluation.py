"""``stream-detector evaluate``: batch-score a dataset's test data and compare with baselines.

For every entity (machine, channel, stream) and the mean over entities, for the model and for
each baseline computed in the same run:

* ``best_f1``: the best F1 over all thresholds, **no point adjustment**;
* ``f1_at_threshold``: F1 at the label-free threshold (the model's from its manifest, calibrated
  on validation scores; a baseline's from the same quantile of its scores on the last
  ``val_fraction`` of the train rows, fitted on the rest, and applied to the test scores of
  that same fit: :func:`baseline_label_free`);
* ``auc_pr``: average precision;
* ``pa_best_f1``: best F1 *with point adjustment*, labelled as such and shown next to the
  random baseline's, because random scores already reach 0.76-0.96 with it. The random baseline
  is therefore always computed, whatever ``baselines`` lists.

Test labels are used only to compute these metrics, never to choose a threshold.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import structlog
from tqdm.auto import tqdm

from stream_detector.datasets.base import Entity
from stream_detector.scoring import long_term_words

log = structlog.get_logger(__name__)

METRICS = ["best_f1", "f1_at_threshold", "auc_pr", "pa_best_f1"]


@dataclass
class EvaluationResult:
    out_dir: Path
    markdown: str
    rows: list[dict[str, Any]]
    summary: dict[str, dict[str, float]]
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def baseline_label_free(entity: Entity, name: str, q: float, val_fraction: float,
                        seed: int = 0, method: str = "quantile", margin: float = 1.0,
                        **kwargs: Any) -> tuple[float, np.ndarray | None]:
    """A baseline's label-free operating point, as the model's is made: the baseline fitted on
    the first ``1 - val_fraction`` of the train rows scores the rest of them and then the test
    rows; the threshold is the artifact's rule (:func:`~stream_detector.scoring.fit_threshold`
    with its ``method``, ``q`` and ``margin``) on its scores on those held-out train rows, and
    it is applied to the test scores *of that same fit*. Returns (threshold, those test
    scores); NaN and None when too few rows are left to fit.

    (The test scores of the baseline fitted on all train rows, which its best-F1 and AUC-PR
    use, are not comparable with a threshold taken from another fit: IsolationForest's scale,
    for one, moves with its training set.) ``kwargs`` go to the baseline (``ridge_matched``'s
    ``smoothing``).
    """
    from stream_detector.baselines import run_baselines
    from stream_detector.scoring import fit_threshold

    n_val = max(1, int(len(entity.train) * val_fraction))
    fit, val = entity.train[:-n_val], entity.train[-n_val:]
    if len(fit) < 50:
        return float("nan"), None
    after = np.concatenate([val, entity.test])
    proxy = Entity(entity.name, fit, after, np.zeros(len(after), np.int8), entity.features)
    s = run_baselines(proxy, [name], seed, **kwargs)[name]
    return fit_threshold(s[:n_val], method, q, margin), s[n_val:]


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``"1 feature"``, ``"38 features"``: a count with its noun (``plural``, default the noun
    with an ``s``, for any other count)."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


#: Directories :func:`prepare_out_dir` created in this process, parents first.
_CREATED: list[Path] = []


def prepare_out_dir(path: Path, option: str = "--out", what: str = "report") -> Path:
    """Create the ``what`` directory ``path`` (and its parents); a ConfigError (the CLI exits
    2) when it cannot be one: an existing file, a file on its path, no permission. The
    directories it creates are remembered, so that a command that then fails can remove them
    again while they are empty (:func:`remove_created_out_dirs`)."""
    from stream_detector.errors import ConfigError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is an existing file, not a directory: pass a "
                          f"directory for the {what}")
    # absolute and normalised: `missing/../existing` must not count `existing` as created
    full = Path(os.path.abspath(path))
    new = [p for p in (full, *full.parents) if not p.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot create the {what} directory "
                          f"({exc.strerror or exc})") from None
    _CREATED.extend(new)
    # an existing directory this user cannot write into (a shared volume whose owner the pod's
    # fsGroup did not change, a read-only mount) failed only at the first write: for train,
    # after the whole training
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".sd-write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot write into the {what} directory "
                          f"({exc.strerror or exc})") from None
    return path


def forget_created_out_dirs() -> None:
    """Start a command afresh: directories an earlier command created are not removed."""
    _CREATED.clear()


def remove_created_out_dirs() -> None:
    """Remove the directories :func:`prepare_out_dir` created that are still empty, deepest
    first (a command that failed before writing into them leaves nothing behind)."""
    while _CREATED:
        with contextlib.suppress(OSError):  # not empty (or gone): keep it
            _CREATED.pop().rmdir()


def with_random(baselines: list[str] | None) -> list[str]:
    """``baselines`` with ``random`` first when it is missing: point-adjusted F1 is never
    reported without the random baseline's."""
    chosen = list(dict.fromkeys(baselines or []))
    return chosen if "random" in chosen else ["random", *chosen]


def run_evaluation(
    dataset: str,
    data_dir: Path | None,
    entities: list[str] | None,
    artifact_dir: Path,
    out_dir: Path,
    baselines: list[str] | None = None,
    plots: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> EvaluationResult:
    from stream_detector.baselines import BASELINES, SMOOTHED_LIKE_MODEL, run_baselines
    from stream_detector.datasets import load_dataset
    from stream_detector.errors import ConfigError
    from stream_detector.manifest import read_manifest
    from stream_detector.metrics import entity_metrics, summarize

    t0 = time.time()
    unknown = sorted(set(baselines or []) - set(BASELINES))
    if unknown:
        raise ConfigError(f"unknown baseline(s) {unknown}; known: {', '.join(BASELINES)}")
    baselines = with_random(baselines)
    out_dir = prepare_out_dir(out_dir)
    read_manifest(artifact_dir)  # a missing or broken artifact is named before torch's import
    from stream_detector.model.runtime import TorchScorer
    from stream_detector.offline import batch_score

    scorer = TorchScorer.load(artifact_dir, expect_features=None)
    manifest = scorer.manifest
    data = load_dataset(dataset, data_dir, entities)
    trained = manifest.training.get("config", {})
    q = float(trained.get("threshold_q", 0.995))
    val_fraction = float(trained.get("val_fraction", 0.2))
    # the baselines' label-free thresholds follow the artifact's rule (a pot artifact's
    # baselines got the quantile before); artifacts without the keys were quantile, margin 1
    method = str(trained.get("threshold_method", "quantile"))
    margin = float(trained.get("threshold_margin", 1.0))
    options = {b: {"smoothing": manifest.score.smoothing} for b in SMOOTHED_LIKE_MODEL}

    rows: list[dict[str, Any]] = []
    per_method: dict[str, list[dict[str, Any]]] = {"model": [], **{b: [] for b in baselines}}
    kept: dict[str, dict[str, np.ndarray]] = {}
    for e in tqdm(data, desc="evaluate", unit="entity", disable=not progress):
        if tuple(e.features) != tuple(manifest.features):
            raise_features(e, manifest)
        ref = batch_score(scorer, manifest, e)
        m = entity_metrics(ref.score, e.labels, ref.threshold)
        row: dict[str, Any] = {"entity": e.name, "rows": len(e.test),
                               "anomaly_rows": int(e.labels.sum()), **m}
        per_method["model"].append({"entity": e.name, **m})
        scores = {"model": ref.score}
        bs = {b: run_baselines(e, [b], seed, **options.get(b, {}))[b] for b in baselines}
        for b in baselines:
            if b == "random":
                # uniform scores: quantile q of their distribution is q itself (and so is the
                # peaks-over-threshold fit of a uniform tail, near enough)
                bm = entity_metrics(bs[b], e.labels, q * margin)
            else:
                thr, held_out_fit = baseline_label_free(e, b, q, val_fraction, seed, method,
                                                        margin, **options.get(b, {}))
                bm = entity_metrics(bs[b], e.labels, thr, threshold_scores=held_out_fit)
            per_method[b].append({"entity": e.name, **bm})
            for k in METRICS:
                row[f"{b}_{k}"] = bm[k]
            scores[b] = bs[b]
        rows.append(row)
        kept[e.name] = scores

    summary = {meth: summarize(r) for meth, r in per_method.items()}
    md = _markdown(dataset, manifest, rows, summary, baselines, time.time() - t0)
    # the plots of an earlier run into the same folder (other entities) would sit beside this
    # report as if they were its own, with plots on or off
    for old in (*out_dir.glob("best-*.png"), *out_dir.glob("worst-*.png")):
        old.unlink()
    if plots:
        md += _plots(out_dir, data, rows, kept, manifest, baselines)
    (out_dir / "evaluation.md").write_text(md)
    (out_dir / "evaluation.json").write_bytes(orjson.dumps(
        {"dataset": dataset, "model_version": manifest.model_version,
         "summary": summary, "entities": rows},
        option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return EvaluationResult(out_dir, md, rows, summary, kept)


def raise_features(e: Entity, manifest: Any) -> None:
    from stream_detector.errors import ArtifactError

    raise ArtifactError(
        f"entity {e.name} has {len(e.features)} features {list(e.features)[:4]}..., the artifact "
        f"was trained on {manifest.n_features} {list(manifest.features)[:4]}...: evaluate it on "
        "the dataset it was trained for"
    )


def baseline_title(name: str, manifest: Any) -> str:
    """What a baseline row is, for the report (``ridge_matched`` with the artifact's k)."""
    from stream_detector.baselines import BASELINE_TITLES, SMOOTHED_LIKE_MODEL

    title = BASELINE_TITLES.get(name, name)
    if name in SMOOTHED_LIKE_MODEL:
        title += f" (trailing mean of {manifest.score.smoothing}"
        if manifest.score.long_term is not None:
            title += "; without the artifact's long-term term"
        title += ")"
    return title


def _fmt(x: Any) -> str:
    if isinstance(x, float | np.floating):
        return "n/a" if not np.isfinite(x) else f"{x:.3f}"
    return str(x)


#: Under every report on the datasets the project ships loaders for: the defaults were chosen
#: with their test labels (pre-registered rules, but the same test sets).
SELECTION_NOTE = (
    "Training, thresholds and baselines use no test labels. The project's default "
    "configuration (window, input scaling, scoring) was chosen by studies that scored the test "
    "labels of SMD, SMAP, MSL, NAB and the synthetic data (docs/evaluation.md), so on these "
    "datasets the figures are not a blind test of the defaults.")


def _markdown(dataset: str, manifest: Any, rows: list[dict[str, Any]],
              summary: dict[str, dict[str, float]], baselines: list[str], seconds: float) -> str:
    lines = [
        f"# Evaluation: {dataset}",
        "",
        f"Model `{manifest.model_version}` ({manifest.network.get('encoder', '?')} encoder, "
        f"window {manifest.window}, {counted(manifest.n_features, 'feature')}, "
        f"{long_term_words(manifest)}), {counted(len(rows), 'entity', 'entities')}, "
        f"{seconds:.0f} s.",
        "",
        "## Mean over entities",
        "",
        "| method | best-F1 | F1 @ label-free threshold | AUC-PR | PA best-F1 (point-adjusted) |",
        "|---|---|---|---|---|",
    ]
    for meth, s in summary.items():
        lines.append(f"| {meth} | " + " | ".join(_fmt(s.get(k, float('nan'))) for k in METRICS)
                     + " |")
    lines += [
        "",
        "best-F1 and AUC-PR are computed without point adjustment. PA best-F1 credits a whole "
        "labelled segment when any point in it is flagged; compare it with the random row, "
        "never alone.",
        "",
        SELECTION_NOTE,
        "",
        "Baselines (fitted on each entity's train rows, random scores on nothing; no labels): "
        + "; ".join(f"{b}: {baseline_title(b, manifest)}" for b in baselines) + ".",
        "",
        "## Per entity (model)",
        "",
        "| entity | rows | anomaly rows | best-F1 | F1 @ threshold | AUC-PR | PA best-F1 | "
        "random PA best-F1 |" + "".join(f" {b} best-F1 |" for b in baselines),
        "|---|---|---|---|---|---|---|---|" + "---|" * len(baselines),
    ]
    for r in rows:
        lines.append(
            f"| {r['entity']} | {r['rows']} | {r['anomaly_rows']} | "
            + " | ".join(_fmt(r[k]) for k in METRICS) + " |"
            + f" {_fmt(r.get('random_pa_best_f1', float('nan')))} |"
            + "".join(f" {_fmt(r.get(f'{b}_best_f1', float('nan')))} |" for b in baselines)
        )
    return "\n".join(lines) + "\n"


def plot_file_name(entity: str, prefix: str = "") -> str:
    """A PNG file name for an entity's plot: characters other than letters, digits, ``-_.``
    become ``_`` (entity names are machine ids, channel names, NAB file paths)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in entity)
    return f"{prefix}{safe}.png"


def plot_choice(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The entities to plot: up to two ``best`` (highest best-F1 first) and up to two ``worst``
    (lowest first), never one entity in both. The better half of the entities (the larger half
    when their number is odd) can be ``best``, the rest ``worst``: one entity is only ``best``,
    two are one of each. Entities without a best-F1 (no labelled anomaly) are left out."""
    ranked = sorted((r for r in rows if np.isfinite(r["best_f1"])), key=lambda r: r["best_f1"])
    n_best = min(2, (len(ranked) + 1) // 2)
    n_worst = min(2, len(ranked) - n_best)
    chosen = {"worst": ranked[:n_worst], "best": ranked[len(ranked) - n_best:][::-1]}
    return {kind: rs for kind, rs in chosen.items() if rs}


def _plots(out_dir: Path, data: list[Entity], rows: list[dict[str, Any]],
           kept: dict[str, dict[str, np.ndarray]], manifest: Any, baselines: list[str]) -> str:
    from stream_detector.plots import plot_entity

    chosen = plot_choice(rows)
    by_name = {e.name: e for e in data}
    lines = ["", "## Plots", ""]
    for kind, rs in chosen.items():
        for r in rs:
            e = by_name[r["entity"]]
            path = out_dir / plot_file_name(e.name, f"{kind}-")
            plot_entity(path, e.name, kept[e.name]["model"], e.labels,
                        manifest.thresholds.for_sensor(e.name), signal=e.test,
                        feature_names=list(e.features),
                        # random is noise; the matched ridge would repeat the ridge's line
                        baselines={b: kept[e.name][b] for b in baselines
                                   if b not in ("random", "ridge_matched")},
                        title=f"{e.name} ({kind}): best-F1 {r['best_f1']:.3f}")
            lines.append(f"![{e.name}]({path.name})")
    return "\n".join(lines) + "\n"
