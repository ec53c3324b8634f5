"""Download SMD from the OmniAnomaly repository into the standard layout.

``download_smd(to)`` fetches ``train/``, ``test/``, ``test_label/`` and ``interpretation_label/``
``<machine>.txt`` for each machine (all 28 by default) from
``https://raw.githubusercontent.com/NetManAIOps/OmniAnomaly/master/ServerMachineDataset``, then
loads every machine with the SMD loader to check it (column counts, label length, label values).

- Each file is written to ``<file>.part`` and renamed into place, so an interrupted run never
  leaves a truncated file that looks complete; rerunning resumes.
- A file already present with non-zero size (as ``.txt`` or ``.txt.gz``) is not fetched again
  (one damaged by other means fails the load check, whose error says what to delete).
- Network errors, timeouts and HTTP 5xx/408/429 are retried (3 attempts, exponential backoff);
  any other HTTP error fails at once. Failures raise DatasetError naming the URL.
- The train/test files are 4-10 MB each (about 0.9 GB for all 28 machines).
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from stream_detector.datasets.smd import KINDS, SMDLoader, find_file
from stream_detector.errors import DatasetError

SMD_BASE_URL = (
    "https://raw.githubusercontent.com/NetManAIOps/OmniAnomaly/master/ServerMachineDataset"
)
SMD_MACHINES: tuple[str, ...] = (
    *(f"machine-1-{i}" for i in range(1, 9)),
    *(f"machine-2-{i}" for i in range(1, 10)),
    *(f"machine-3-{i}" for i in range(1, 12)),
)
SMD_COLUMNS = 38
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_CHUNK = 1 << 16


def _fetch(url: str, dest: Path, *, retries: int, backoff: float, timeout: float) -> int:
    """Download ``url`` to ``dest`` atomically; returns the byte count."""
    part = dest.with_name(dest.name + ".part")
    last: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            size = 0
            with urllib.request.urlopen(url, timeout=timeout) as resp, part.open("wb") as out:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    size += len(chunk)
            if size == 0:
                raise DatasetError(f"download failed: {url} returned an empty file")
            os.replace(part, dest)
            return size
        except urllib.error.HTTPError as exc:
            exc.close()
            last = exc
            if exc.code not in _RETRY_STATUS:
                break
        except OSError as exc:  # URLError, timeouts, resets, disk errors
            last = exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        if attempt < retries:
            time.sleep(backoff * 2 ** (attempt - 1))
    if isinstance(last, urllib.error.HTTPError):
        raise DatasetError(f"download failed: HTTP {last.code} {last.reason} for {url}")
    raise DatasetError(f"download failed after {retries} attempt(s) for {url}: {last}")


def download_smd(
    to: str | Path,
    machines: Sequence[str] | None = None,
    base_url: str = SMD_BASE_URL,
    progress: bool = True,
    *,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 60.0,
    expected_columns: int | None = SMD_COLUMNS,
) -> Path:
    """Fetch SMD ``machines`` (default all 28) into ``to`` and verify them; returns ``to``.

    ``expected_columns`` (38 for SMD; None skips the check) is verified on every machine after
    the download, together with what the SMD loader checks.
    """
    names = list(machines) if machines else list(SMD_MACHINES)
    unknown = [m for m in names if m not in SMD_MACHINES]
    if unknown:
        raise DatasetError(
            f"unknown SMD machine(s) {unknown}; known: machine-1-1..1-8, 2-1..2-9, 3-1..3-11"
        )
    if retries < 1:
        raise DatasetError(f"retries must be >= 1, got {retries}")
    root = Path(to).expanduser()
    if root.exists() and not root.is_dir():
        raise DatasetError(f"--to {to} is an existing file, not a directory: pass the "
                           "directory to download SMD into")
    base = base_url.rstrip("/")

    # the folders this call creates, removed again if it fails and leaves them empty (an
    # empty layout would later read as "no entities: is that the smd data directory?")
    created = [d for d in (*reversed(root.parents), root, *(root / k for k in KINDS))
               if not d.exists()]
    try:
        return _download(root, names, base, retries, backoff, timeout, progress,
                         expected_columns)
    except BaseException:
        for d in reversed(created):
            with contextlib.suppress(OSError):  # not empty (a file came), or gone
                d.rmdir()
        raise


def _download(root: Path, names: list[str], base: str, retries: int, backoff: float,
              timeout: float, progress: bool, expected_columns: int | None) -> Path:
    todo: list[tuple[str, Path]] = []
    for machine in names:
        for kind in KINDS:
            try:
                (root / kind).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatasetError(f"cannot create {root / kind} for the download: "
                                   f"{exc.strerror or exc}") from None
            present = find_file(root, kind, machine)
            if present is not None and present.stat().st_size > 0:
                continue
            todo.append((f"{base}/{kind}/{machine}.txt", root / kind / f"{machine}.txt"))

    with tqdm(total=len(todo), unit="file", desc="SMD", disable=not progress or not todo) as bar:
        for url, dest in todo:
            bar.set_postfix_str(f"{dest.parent.name}/{dest.name}", refresh=False)
            _fetch(url, dest, retries=retries, backoff=backoff, timeout=timeout)
            bar.update(1)

    loader = SMDLoader()
    for machine in names:
        try:
            entity = loader.load_entity(root, machine)
        except DatasetError as exc:
            # a damaged file already there is not fetched again: say which to delete (review)
            raise DatasetError(f"downloaded SMD machine {machine} does not load: {exc}; delete "
                               f"its files under {root} (train/, test/, test_label/, "
                               f"interpretation_label/ {machine}.*) and run the download "
                               "again") from exc
        if expected_columns is not None and entity.train.shape[1] != expected_columns:
            raise DatasetError(
                f"downloaded SMD machine {machine} has {entity.train.shape[1]} columns, "
                f"expected {expected_columns}"
            )
    return root
