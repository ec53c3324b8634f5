"""Write an artifact directory: TorchScript model + manifest.json with its sha256."""

from __future__ import annotations

import os
import platform
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import sklearn
import torch

from stream_detector import __version__
from stream_detector.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, sha256_file
from stream_detector.model.runtime import (
    VERIFIED_VERSION_KEY,
    VERIFIED_VERSION_RULE,
    content_digest,
)


def library_versions() -> dict[str, str]:
    return {
        "stream_detector": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "python": platform.python_version(),
    }


def write_artifact(out_dir: str | Path, model: torch.nn.Module, manifest: Manifest) -> Manifest:
    """Script ``model``, save it and the manifest (with the file's sha256) into ``out_dir``.

    Files are written to temporary names and renamed, so a crash never leaves a half artifact
    that passes the checksum.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    scripted = torch.jit.script(model)
    tmp_model = root / (MODEL_FILE + ".tmp")
    torch.jit.save(scripted, str(tmp_model))
    digest = sha256_file(tmp_model)
    # the digest of the manifest as it reads back (a whole-number float option such as
    # `--set clip=5` is 5 in memory and 5.0 once read), the form the consumer verifies
    read_back = Manifest.from_dict(orjson.loads(manifest.to_json()))
    version = (manifest.model_version
               or f"{manifest.dataset}-{content_digest(model, read_back)[:12]}")
    final = replace(
        manifest,
        sha256=digest,
        model_version=version,
        versions={**library_versions(), VERIFIED_VERSION_KEY: VERIFIED_VERSION_RULE},
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    final.validate()
    tmp_manifest = root / (MANIFEST_FILE + ".tmp")
    tmp_manifest.write_bytes(final.to_json())
    os.replace(tmp_model, root / MODEL_FILE)
    os.replace(tmp_manifest, root / MANIFEST_FILE)
    return final
