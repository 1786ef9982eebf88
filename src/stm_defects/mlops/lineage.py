"""Hashes and lineage tags for registered model versions (no MLflow import at module level)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from stm_defects.io.safe_models import file_sha256

__all__ = ["data_version", "file_sha256", "lineage_tags"]


def data_version(path: str | Path) -> str:
    """A content hash of a data file or folder (names and bytes of every file in it)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path).as_posix() if path.is_dir() else f.name).encode())
        h.update(file_sha256(f).encode())
    return f"sha256:{h.hexdigest()[:16]}"


def lineage_tags(tracker, upstream: dict, data: str | Path) -> dict:
    """Tags naming the data version and the registered versions a model was built on (`<key>_version`:
    the version whose file hash is the upstream file's, preferring one of this pipeline run)."""
    tags = {"data_version": data_version(data)}
    if not tracker.enabled:
        return tags
    from stm_defects.mlops.tracking import version_by_sha

    for key, path in upstream.items():
        if path is not None:
            tags[f"{key}_version"] = version_by_sha(key, file_sha256(path), tracker.parent_id)
    return tags
