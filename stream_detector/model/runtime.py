"""Serve a TorchScript artifact: raw windows in, per-feature errors out.

Imports torch and the manifest only, never the training code: the scripted module carries its
own graph, so a serving process needs nothing from :mod:`stream_detector.model.network`.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import orjson
import structlog
import torch

from stream_detector.errors import ArtifactError
from stream_detector.manifest import MODEL_FILE, Manifest, read_artifact

log = structlog.get_logger(__name__)


#: Every model call is padded to a multiple of this many windows (copies of the last window;
#: their errors are dropped). On the x86 CPU we measured, torch picks its float32 kernels by the
#: call's size, and a window's errors then differ in the last bits with the call it lands in
#: (up to ~4e-6 absolute: calls of 1-2 windows for a 38-feature model; any size that is not a
#: multiple of 16 for a one-feature one). In calls of a multiple of 16 windows they were the
#: same, bit for bit, for the five datasets' artifacts, with one or two threads. So the
#: consumer's micro-batches, whatever their size, score a window as offline scoring does
#: (replay parity, rebuilt state). The full micro-batch (256) needs no padding.
CALL_MULTIPLE = 16


class _AsyncModel(torch.nn.Module):
    """``forward`` starts the model on torch's inter-op thread pool and returns its future at
    once. The task runs the TorchScript graph in C++ without the GIL, so Python work of the
    caller (decoding the next readings) overlaps with inference. The task also scales the raw
    windows (the same float32 operations as :meth:`TorchScorer.scale`, bit for bit), with the
    global scaler or, given ``rows``, each window's row of the scaler table. ``sizes`` splits
    the windows into consecutive model calls, one after the other in the same task: several
    queued micro-batches keep the model busy without the caller's help, each scored at its own
    size, so in the same model call as the synchronous path scores it (the model's float32
    results can differ in the last bits with the size of the call it is in).

    The task gets copies of the inputs, made on the caller's thread (``forward``). Since torch
    2.10 a tensor that has a Python object (every tensor made in Python, such as the windows
    handed in) takes the GIL whenever its C++ reference count goes from 1 to 2 or from 2 to 1,
    so the task would wait for the GIL when it drops the caller's tensors: up to the
    interpreter's switch interval (5 ms) each time the caller runs Python, which cut the
    model's rate under a busy loop to about 21,500 windows/s from 214,000-235,500 (batch 256, one
    thread, 2026-11-27; ``bench`` section 3 measures the service). A copy made in C++ has no
    Python object, and the task then never touches the GIL.
    """

    def __init__(self, model: torch.nn.Module, mean: np.ndarray, inv_std: np.ndarray,
                 clip: float) -> None:
        # mean, inv_std: the scaler table (rows, F); row 0 is the global scaler
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.from_numpy(mean.copy()))
        self.register_buffer("inv_std", torch.from_numpy(inv_std.copy()))
        self.clip = clip
        self.multiple = CALL_MULTIPLE

    @torch.jit.export
    def run(self, raw: torch.Tensor, rows: torch.Tensor,
            sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # No class-level annotations for the buffers to please mypy: TorchScript cannot resolve
        # them under postponed annotations, the wrapper then fails to script and scoring loses
        # its overlap with the loop (tests/test_model.py checks ``overlapped``).
        if rows.numel() == 0:  # every window: the global scaler
            mean, inv = self.mean[0], self.inv_std[0]  # type: ignore[index]
        else:
            mean = self.mean.index_select(0, rows).unsqueeze(1)  # type: ignore[operator]
            inv = self.inv_std.index_select(0, rows).unsqueeze(1)  # type: ignore[operator]
        x = torch.clamp((raw - mean) * inv, -self.clip, self.clip)
        recs: list[torch.Tensor] = []
        fcs: list[torch.Tensor] = []
        at = 0
        for size in sizes:
            part = x[at : at + size]
            pad = (self.multiple - size % self.multiple) % self.multiple
            if size > 0 and pad > 0:  # as TorchScorer.errors (CALL_MULTIPLE)
                part = torch.cat([part, part[-1:].expand(pad, -1, -1)])
            rec, fc = self.model(part)
            recs.append(rec[:size])
            fcs.append(fc[:size])
            at += size
        if len(recs) == 1:
            return recs[0], fcs[0]
        return torch.cat(recs), torch.cat(fcs)

    def forward(
        self, x: torch.Tensor, rows: torch.Tensor, sizes: list[int]
    ) -> torch.jit.Future[tuple[torch.Tensor, torch.Tensor]]:
        return torch.jit.fork(self.run, x.clone(), rows.clone(), sizes)


class PendingErrors:
    """Handle of :meth:`TorchScorer.errors_async`: ``done()`` and ``result()``."""

    __slots__ = ("_future", "_value")

    def __init__(self, future: torch.Future | None,
                 value: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self._future = future
        self._value = value

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """The errors, as :meth:`TorchScorer.errors` returns them (waits if not done)."""
        if self._value is None:
            assert self._future is not None
            rec, fc = self._future.wait()
            self._value = (rec.numpy().astype(np.float64), fc.numpy().astype(np.float64))
        return self._value


def call_sizes(n: int, chunk: int | Sequence[int]) -> list[int]:
    """The sizes of the model calls that score ``n`` windows: ``chunk`` windows at a time (0:
    one call), or ``chunk`` itself when it lists the sizes (they must add up to ``n``)."""
    if isinstance(chunk, int):
        if chunk <= 0 or n <= chunk:
            return [n]
        return [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
    sizes = [int(s) for s in chunk]
    if sum(sizes) != n or any(s <= 0 for s in sizes):
        raise ValueError(f"call sizes {sizes} do not split {n} windows")
    return sizes


def _check_rows(rows: np.ndarray, n: int) -> np.ndarray:
    """One scaler row per window (a short array would scale a whole batch by one row)."""
    rows = np.asarray(rows, dtype=np.intp)
    if rows.shape != (n,):
        raise ValueError(f"rows has shape {rows.shape}; one row per window ({n}) expected")
    return rows


def content_digest(model: torch.nn.Module, manifest: Manifest) -> str:
    """sha256 of what decides the artifact's scores and alerts: the weights (by name, dtype,
    shape and bytes) and the manifest's features, window, network, scalers, score and thresholds.

    The model version is derived from this, not from ``model.pt``'s checksum: the bytes
    ``torch.jit.save`` writes vary between processes (hash-seed dependent ordering and a
    serialization id), so the same training run in two processes would otherwise get two
    versions, and two sets of alert ids.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    # fields a schema added are absent when unused (Manifest.as_written): versions kept
    settings = {k: v for k, v in manifest.as_written().items()
                if k in ("features", "window", "network", "scaler_mean", "scaler_std", "clip",
                         "score", "thresholds", "scaler_per_sensor")}
    h.update(orjson.dumps(settings, option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY))
    return h.hexdigest()


#: ``manifest.versions`` key of artifacts whose model version the consumer can verify (written
#: since 2026-11-27 10:35, commit 56a7260: the digest of the manifest as it reads back).
#: Older artifacts may hold a version derived otherwise (before 2026-11-26: the sha256 of
#: model.pt; a whole-number float option hashed as an int), so a mismatch there is logged,
#: not refused.
VERIFIED_VERSION_KEY = "model_version_rule"
VERIFIED_VERSION_RULE = "content-digest-2"


def verify_model_version(manifest: Manifest, module: torch.nn.Module,
                         artifact_dir: str | Path) -> bool:
    """Recompute the model version from the weights and the manifest: True when it matches.
    A mismatch is an ArtifactError for an artifact that declares the rule (the manifest or the
    weights were changed after training: its alerts would reuse the original's ids), and a
    warning for an older one, whose version may have been derived otherwise."""
    expected = f"{manifest.dataset}-{content_digest(module, manifest)[:12]}"
    if manifest.model_version == expected:
        return True
    if manifest.versions.get(VERIFIED_VERSION_KEY) == VERIFIED_VERSION_RULE:
        raise ArtifactError(
            f"artifact {artifact_dir}: model_version {manifest.model_version!r} does not match "
            f"its contents ({expected!r}): the manifest (thresholds, scalers, score settings) "
            "or the weights were changed after training. Alert ids derive from the model "
            "version, so an edited artifact would reuse the original's; train a new artifact "
            "(train --set KEY=VALUE) instead")
    log.warning("model version not verifiable: the artifact predates the check, and its "
                "version is not the digest of its contents (written by an older build, or "
                "edited since)", artifact=str(artifact_dir), model_version=manifest.model_version)
    return False


class TorchScorer:
    """Implements the :class:`stream_detector.detector.Scorer` protocol with a TorchScript model.

    ``errors(windows, rows=None)`` takes raw (unscaled) windows ``(B, W, F)`` and returns
    ``(rec_err, fc_err)``, float64 ``(B, F)``. Scaling and clipping follow the manifest, exactly
    as in training: ``rows[i]`` is the row of the scaler table for window ``i``'s sensor
    (:meth:`Manifest.scaler_row`); without ``rows`` every window is scaled globally.
    """

    def __init__(self, manifest: Manifest, module: torch.jit.ScriptModule, threads: int = 0):
        self.manifest = manifest
        #: the model version was recomputed from the weights and manifest and matched (load)
        self.version_verified = False
        self._module = module
        self._means, self._inv_stds = manifest.scaler_table()
        self._mean, self._inv_std = self._means[0], self._inv_stds[0]
        self._clip = np.float32(manifest.clip)
        self._no_rows = torch.zeros(0, dtype=torch.int64)
        if threads > 0:
            torch.set_num_threads(threads)
        try:
            self._async: torch.jit.ScriptModule | None = torch.jit.script(
                _AsyncModel(module, self._means, self._inv_stds, float(self._clip)))
        except Exception as exc:  # noqa: BLE001 - a module that cannot be wrapped is scored in line
            self._async = None
            log.warning("model cannot run off the loop's thread; scoring in line (slower)",
                        error=str(exc)[:300])

    @property
    def overlapped(self) -> bool:
        """Whether :meth:`errors_async` runs the model on torch's thread pool, overlapped with
        the caller (False: the wrapper could not be scripted and it scores in line)."""
        return self._async is not None

    @classmethod
    def load(
        cls,
        artifact_dir: str | Path,
        *,
        expect_features: tuple[str, ...] | None = None,
        expect_window: int | None = None,
        threads: int = 0,
    ) -> TorchScorer:
        manifest, model_bytes = read_artifact(
            artifact_dir, expect_features=expect_features, expect_window=expect_window
        )
        path = Path(artifact_dir) / MODEL_FILE
        try:  # the bytes the checksum was verified on: the file may have been replaced since
            module = torch.jit.load(io.BytesIO(model_bytes), map_location="cpu")
        except Exception as exc:  # torch raises RuntimeError subclasses with long C++ traces
            raise ArtifactError(f"cannot load TorchScript model {path}: {str(exc)[:300]}") from None
        module.eval()
        scorer = cls(manifest, module, threads)
        scorer._check_shape()
        scorer.version_verified = verify_model_version(manifest, module, artifact_dir)
        return scorer

    def _check_shape(self) -> None:
        m = self.manifest
        try:
            probe = np.tile(np.asarray(m.scaler_mean, dtype=np.float32), (1, m.window, 1))
            rec, fc = self.errors(probe)
        except Exception as exc:
            raise ArtifactError(
                f"model does not accept windows of shape (B, {m.window}, {m.n_features}) "
                f"declared by the manifest: {str(exc)[:200]}"
            ) from None
        if rec.shape != (1, m.n_features) or fc.shape != (1, m.n_features):
            raise ArtifactError(
                f"model returns errors of shapes {rec.shape}/{fc.shape}, "
                f"manifest declares {m.n_features} features"
            )

    def scale(self, windows: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        if rows is None:
            mean, inv = self._mean, self._inv_std
        else:
            rows = _check_rows(rows, len(windows))
            mean, inv = self._means[rows][:, None, :], self._inv_stds[rows][:, None, :]
        x = (np.asarray(windows, dtype=np.float32) - mean) * inv
        np.clip(x, -self._clip, self._clip, out=x)
        return x

    def errors(self, windows: np.ndarray,
               rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(self.scale(windows, rows)))
        n = x.size(0)
        pad = -n % CALL_MULTIPLE
        if n and pad:  # see CALL_MULTIPLE: the same kernels whatever the call's size
            x = torch.cat([x, x[-1:].expand(pad, -1, -1)])
        with torch.inference_mode():
            rec, fc = self._module(x)
        return rec[:n].numpy().astype(np.float64), fc[:n].numpy().astype(np.float64)

    def errors_async(self, windows: np.ndarray, chunk: int | Sequence[int] = 0,
                     rows: np.ndarray | None = None) -> PendingErrors:
        """Start :meth:`errors` on torch's inter-op thread pool; same numbers, returns at once.
        ``chunk``: the model is called on ``chunk`` windows at a time, or, given a list, on
        consecutive calls of those sizes (the detector passes its queued micro-batches' sizes
        when it hands over several at once, so that each is scored in a call of its own, as
        :meth:`errors` on each would).

        Falls back to scoring in line (a finished handle) when the module cannot be wrapped.
        """
        sizes = call_sizes(len(windows), chunk)
        if self._async is None:
            return PendingErrors(None, self.errors_batched(windows, sizes, rows))
        raw = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32))
        idx = (self._no_rows if rows is None
               else torch.from_numpy(_check_rows(rows, len(windows)).astype(np.int64)))
        with torch.inference_mode():
            return PendingErrors(self._async(raw, idx, sizes))

    def errors_batched(
        self, windows: np.ndarray, batch: int | Sequence[int] = 4096,
        rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`errors` for many windows, in calls of ``batch`` windows (offline
        scoring) or of the sizes ``batch`` lists (:func:`call_sizes`)."""
        recs, fcs = [], []
        at = 0
        for size in call_sizes(len(windows), batch) if len(windows) else []:
            r, f = self.errors(windows[at : at + size],
                               None if rows is None else rows[at : at + size])
            recs.append(r)
            fcs.append(f)
            at += size
        if not recs:
            n = self.manifest.n_features
            return np.zeros((0, n)), np.zeros((0, n))
        return np.concatenate(recs), np.concatenate(fcs)
