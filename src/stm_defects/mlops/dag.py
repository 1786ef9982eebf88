"""The pipeline's stages, in order: the one home of what runs, on what, and with which params.

`dvc.yaml` is generated from this table (`python -m stm_defects.mlops.dag > dvc.yaml`; a test
keeps them equal), `stm train` runs the same stages on a user's folder, and the tests and
benchmarks run them through `mlops.run.run_stage`. Each stage names:

* `entry`: the function `module:name` the runner calls as `fn(params, deps, outs, tracker, progress)`;
* `deps` / `outs`: role -> path, relative to the project root;
* `params`: the params.yaml sections the stage reads. The runner hands the stage a view of the
  params that refuses every other section, so this list cannot be short;
* `truth`: the stage needs the synthetic ground truth (not run by `stm train`).

The code dependencies in `dvc.yaml` are not written by hand: `code_deps` follows the imports of
the runner and the stage's module (including imports inside functions) through the package, so
editing any module reruns exactly the stages that can reach it.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "stm_defects"
RAW = "data/raw/synthetic"          # the input data: replaced by the user's folder in `stm train`
PREDICT = ("preprocess", "prepare", "maps", "mask", "defect_patches", "detector", "improved")


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str
    deps: dict[str, str] = field(default_factory=dict)
    outs: dict[str, str] = field(default_factory=dict)
    params: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()          # roles of `outs` that are DVC metrics (not cached)
    plain: tuple[str, ...] = ()            # roles of `outs` kept in git, not the DVC cache
    truth: bool = False

    @property
    def module(self) -> str:
        return self.entry.split(":")[0]


S = f"{PACKAGE}.mlops.stages"
STAGES: tuple[Stage, ...] = (
    Stage("synth", f"{S}.data:synth", outs={"raw": RAW},
          params=("seed", "data", "synth", "synth_hard"), truth=True),
    Stage("validate", f"{S}.data:validate", deps={"raw": RAW}, outs={"validated": "data/validated"},
          params=("validate", "scan_calibration")),
    Stage("prepare", f"{S}.data:prepare",
          deps={"raw": RAW, "summary": "data/validated/summary.json"}, outs={"prepared": "data/prepared"},
          params=("seed", "prepare", "preprocess", "scan_calibration")),
    Stage("tune_ae1", "stm_defects.mlops.tuning:stage",
          deps={"patches": "data/prepared/train_patches.npz"}, outs={"tuning": "tuning/ae1"},
          params=("seed", "tune", "ae1", "ae1_train")),
    Stage("train_ae1", f"{S}.autoencoders:train_ae1",
          deps={"patches": "data/prepared/train_patches.npz", "tuned": "tuning/ae1/tuned.json"},
          outs={"model": "models/ae1"}, params=("seed", "tune", "ae1", "ae1_train")),
    Stage("kmeans", f"{S}.paper:kmeans",
          deps={"ae1": "models/ae1/model.pt", "patches": "data/prepared/train_patches.npz"},
          outs={"model": "models/kmeans"}, params=("seed", "kmeans")),
    Stage("defects", f"{S}.paper:defects",
          deps={"raw": RAW, "manifest": "data/prepared/manifest.json", "ae1": "models/ae1/model.pt",
                "kmeans": "models/kmeans"},
          outs={"defects": "data/defects", "calibration": "models/calibration.json"},
          params=("seed", "preprocess", "prepare", "maps", "mask", "kmeans", "defect_patches",
                  "scan_calibration")),
    Stage("train_ae2", f"{S}.autoencoders:train_ae2",
          deps={"patches": "data/defects/patches.npz", "ae1": "models/ae1/model.pt"},
          outs={"model": "models/ae2"}, params=("seed", "ae2", "ae2_train")),
    Stage("gmm", f"{S}.paper:gmm",
          deps={"ae2": "models/ae2/model.pt", "patches": "data/defects/patches.npz",
                "ae1": "models/ae1/model.pt", "kmeans": "models/kmeans/kmeans.npz",
                "calibration": "models/calibration.json"},
          outs={"model": "models/gmm"}, params=("seed", "gmm")),
    Stage("select_clusterers", f"{S}.select:select_clusterers",
          deps={"ae1": "models/ae1/model.pt", "patches": "data/prepared/train_patches.npz",
                "ae2": "models/ae2/model.pt", "defects": "data/defects/patches.npz", "gmm": "models/gmm",
                "raw": RAW, "manifest": "data/prepared/manifest.json"},
          outs={"reports": "reports/select_clusterers"}, params=("seed", "kmeans", "select_clusterers"),
          truth=True),
    Stage("fit_improved", f"{S}.improved:fit_improved",
          deps={"raw": RAW, "manifest": "data/prepared/manifest.json"}, outs={"model": "models/improved"},
          params=("seed", *PREDICT, "scan_calibration")),
    Stage("evaluate", f"{S}.evaluate:evaluate",
          deps={"raw": RAW, "manifest": "data/prepared/manifest.json", "ae1": "models/ae1",
                "kmeans": "models/kmeans", "calibration": "models/calibration.json", "ae2": "models/ae2",
                "gmm": "models/gmm", "improved": "models/improved"},
          outs={"metrics": "reports/evaluation.json", "ablation": "reports/ablation.json",
                "per_scan": "reports/evaluation_per_scan.json", "ablation_md": "reports/ablation.md"},
          params=("evaluate",), metrics=("metrics", "ablation"), plain=("per_scan", "ablation_md"),
          truth=True),
)

METRICS = ("tuning/ae1/metrics.json", "models/ae1/metrics.json", "models/kmeans/metrics.json",
           "data/defects/metrics.json", "models/ae2/metrics.json", "models/gmm/metrics.json",
           "models/improved/metrics.json", "reports/select_clusterers/metrics.json")
PLOTS = [
    {"AE1 loss": {"template": "linear", "x": "epoch",
                  "y": {"models/ae1/history.csv": ["train_loss", "val_loss"]}}},
    {"AE2 loss": {"template": "linear", "x": "epoch",
                  "y": {"models/ae2/history.csv": ["train_loss", "val_loss"]}}},
    {"GMM BIC": {"template": "scatter", "x": "k", "y": {"models/gmm/grid.csv": "bic"}}},
    {"reports/evaluation_per_scan.json": {"template": "bar_horizontal", "x": "f1", "y": "scan"}},
]


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")


# ------------------------------------------------------------------------------ code deps
def package_dir() -> Path:
    return Path(__file__).resolve().parents[1]


def _module_file(module: str) -> Path | None:
    base = package_dir().parent / Path(*module.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _imports(module: str) -> set[str]:
    """Package modules imported anywhere in `module` (top level and inside functions)."""
    path = _module_file(module)
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:                       # relative: resolve against this module
                parts = module.split(".")
                base = parts if is_pkg else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names = [stem] + [f"{stem}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n == PACKAGE or n.startswith(PACKAGE + "."):
                # a name may be a module or an attribute of one: keep the longest that is a module
                parts = n.split(".")
                while parts and _module_file(".".join(parts)) is None:
                    parts.pop()
                if parts:
                    found.add(".".join(parts))
                    for i in range(1, len(parts)):          # importing a.b.c runs a/__init__, a/b/__init__
                        found.add(".".join(parts[:i]))
    return found


def module_closure(*roots: str) -> set[str]:
    """Every package module reachable by imports from `roots`."""
    seen: set[str] = set()
    todo = [".".join(r.split(".")[:i]) for r in roots for i in range(1, r.count(".") + 2)]
    while todo:
        m = todo.pop()
        if m in seen or _module_file(m) is None:
            continue
        seen.add(m)
        todo.extend(_imports(m) - seen)
    return seen


RUNNER = f"{PACKAGE}.mlops.run"


FOLDER_PACKAGES = ("analysis", "data", "image", "improved", "io", "models", "paper")


def code_deps(st: Stage) -> list[str]:
    """The source a stage runs, relative to the project root, sorted: the whole folder of each
    library package it reaches (`FOLDER_PACKAGES`), single files elsewhere (top-level modules,
    `mlops`), so that the stages' own modules stay apart."""
    root = package_dir().parent.parent
    deps = set()
    for m in module_closure(RUNNER, st.module):
        parts = m.split(".")
        if len(parts) >= 2 and parts[1] in FOLDER_PACKAGES:
            deps.add((package_dir() / parts[1]).relative_to(root).as_posix())
        else:
            deps.add(_module_file(m).resolve().relative_to(root).as_posix())
    return sorted(deps)


# ------------------------------------------------------------------------------ dvc.yaml
def _profile_params(sections: tuple[str, ...], raw: dict) -> list[str]:
    """`profile` and every `profiles.<name>.<section>` override of the stage's sections."""
    keys = []
    for name, over in sorted((raw.get("profiles") or {}).items()):
        keys += [f"profiles.{name}.{s}" for s in sections if s in (over or {})]
    return ["profile", *keys] if keys else []


def dvc_yaml(raw_params: dict) -> dict:
    """The `dvc.yaml` document of `STAGES` (`raw_params`: params.yaml as loaded by YAML)."""
    stages = {}
    for st in STAGES:
        entry: dict = {"cmd": f"python -m {RUNNER} {st.name}"}
        deps = sorted(set(st.deps.values())) + code_deps(st)
        if deps:
            entry["deps"] = deps
        entry["params"] = [*st.params, *_profile_params(st.params, raw_params)]
        outs, metrics = [], []
        for role, path in st.outs.items():
            if role in st.metrics:
                metrics.append({path: {"cache": False}})
            elif role in st.plain:
                outs.append({path: {"cache": False}})
            else:
                outs.append(path)
        if outs:
            entry["outs"] = outs
        if metrics:
            entry["metrics"] = metrics
        stages[st.name] = entry
    return {"stages": stages, "metrics": list(METRICS), "plots": PLOTS}


HEADER = """\
# GENERATED from src/stm_defects/mlops/dag.py: edit the stage table there, then run
#   python -m stm_defects.mlops.dag > dvc.yaml
# (a test fails while the two differ). Paths live here; numbers in params.yaml; code deps are
# every module a stage's imports can reach. `dvc exp run -S profile=paper` runs the report's models.
"""


def render(raw_params: dict) -> str:
    import yaml

    return HEADER + yaml.safe_dump(dvc_yaml(raw_params), sort_keys=False, width=110)


if __name__ == "__main__":  # pragma: no cover - `python -m stm_defects.mlops.dag > dvc.yaml`
    import yaml

    params_file = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("params.yaml")
    sys.stdout.write(render(yaml.safe_load(params_file.read_text())))
