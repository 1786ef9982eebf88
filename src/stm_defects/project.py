"""Where the project is: its root, its params.yaml and its MLflow store. One documented place.

The root is, in this order:
1. `--project DIR` on the command line (the CLI sets `STM_PROJECT` from it),
2. the `STM_PROJECT` environment variable (`STM_REPO_ROOT` is accepted as an older name),
3. the nearest folder at or above the current one that holds a `dvc.yaml` next to a `params.yaml`.

The MLflow store is `MLFLOW_TRACKING_URI` when set, else `sqlite:///<root>/mlruns/mlflow.db` with
artifacts in `<root>/mlruns/artifacts`. A command run outside any project, with neither variable
set, stops with one line saying so: it never creates a store in the folder it was run in.
"""

from __future__ import annotations

import os
from pathlib import Path

from stm_defects.errors import StageError

ENV_PROJECT = "STM_PROJECT"
_ENV_OLD = "STM_REPO_ROOT"


def find_project(start: str | Path | None = None) -> Path | None:
    """The project root by the rules above, or None when there is none."""
    for var in (ENV_PROJECT, _ENV_OLD):
        if os.environ.get(var):
            root = Path(os.environ[var]).expanduser().resolve()
            if not root.is_dir():
                raise StageError(f"{var}={os.environ[var]}: not a folder")
            return root
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").is_file() and (d / "params.yaml").is_file():
            return d
    return None


def project_root(start: str | Path | None = None) -> Path:
    """The project root; a `StageError` naming the ways to give one when there is none."""
    root = find_project(start)
    if root is None:
        raise StageError(f"no stm-defects project at or above {Path(start or Path.cwd()).resolve()}: "
                         f"run inside the project, pass --project DIR or set {ENV_PROJECT}")
    return root


def params_path(root: Path | None = None) -> Path:
    return (root or project_root()) / "params.yaml"


def tracking_uri(root: Path | None = None) -> str:
    """The MLflow store (see the module docstring); creates `<root>/mlruns/` when needed."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = root or project_root()
    (root / "mlruns").mkdir(exist_ok=True)
    return f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
