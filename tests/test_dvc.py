"""DVC: data versioning round trip through a local remote, and the repo's dvc.yaml against the
code: it is exactly what `mlops.dag` generates, every stage command names a stage of the runner,
params exist, deps exist or come from an earlier stage, and editing a module makes `dvc status`
report exactly the stages whose code can reach it."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from stm_defects.mlops import dag

REPO = Path(__file__).resolve().parents[1]
DVC = Path(sys.executable).parent / "dvc"

pytestmark = pytest.mark.skipif(not DVC.is_file(), reason=f"no dvc executable beside {sys.executable}")


def run(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org")
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, f"{' '.join(map(str, args))}:\n{result.stdout}\n{result.stderr}"
    return result


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_dvc_push_then_pull_restores_data(tmp_path):
    repo, remote = tmp_path / "repo", tmp_path / "remote"
    repo.mkdir()
    run("git", "init", "-q", cwd=repo)
    run(DVC, "init", "-q", cwd=repo)
    data = repo / "data"
    (data / "scans").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(data / "scans" / f"scan_{i}.npy", rng.normal(size=(16, 16)).astype(np.float32))
    (data / "notes.json").write_text('{"n_scans": 3}\n')
    before = snapshot(data)

    run(DVC, "add", "-q", "data", cwd=repo)
    assert (repo / "data.dvc").is_file()
    assert "/data" in (repo / ".gitignore").read_text()
    run(DVC, "remote", "add", "-d", "local", remote, cwd=repo)
    run(DVC, "push", "-q", cwd=repo)
    assert any(p.is_file() for p in remote.rglob("*")), "nothing reached the remote"

    shutil.rmtree(data)
    shutil.rmtree(repo / ".dvc" / "cache")
    run(DVC, "pull", "-q", cwd=repo)
    assert snapshot(data) == before
    status = run(DVC, "status", cwd=repo)
    assert "up to date" in status.stdout.lower() or status.stdout.strip() == "", status.stdout


# ------------------------------------------------------------------------------ the repo's dvc.yaml
@pytest.fixture(scope="module")
def stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _paths(entries) -> list[str]:
    """dvc.yaml lists entries as strings or {path: options}."""
    out = []
    for e in entries or []:
        out.extend([e] if isinstance(e, str) else list(e))
    return out


def test_dvc_stage_list_parses_the_pipeline(tmp_path, stages):
    # a copy, so as not to take DVC's lock in the repo while someone runs `dvc repro` there
    work = tmp_path / "copy"
    work.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copyfile(REPO / name, work / name)
    run(DVC, "init", "-q", "--no-scm", cwd=work)
    listed = run(DVC, "stage", "list", cwd=work).stdout
    names = [line.split()[0] for line in listed.splitlines() if line.strip()]
    assert names == list(stages)


def test_stage_deps_exist_or_come_from_an_earlier_stage(stages):
    produced: list[str] = []
    for name, stage in stages.items():
        for dep in _paths(stage.get("deps")):
            if dep.startswith("src/"):
                assert (REPO / dep).exists(), f"stage {name}: dependency {dep} does not exist"
            else:
                assert any(dep == o or dep.startswith(o.rstrip("/") + "/") for o in produced), \
                    f"stage {name}: {dep} is neither a source file nor an output of an earlier stage"
        produced += _paths(stage.get("outs")) + _paths(stage.get("metrics"))


def test_stage_params_exist_in_params_yaml(stages):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, stage in stages.items():
        for entry in _paths(stage.get("params")):
            node = params
            for part in entry.split("."):
                assert isinstance(node, dict) and part in node, f"stage {name}: params.yaml has no {entry}"
                node = node[part]


def test_dvc_yaml_is_generated_from_the_stage_table():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert (REPO / "dvc.yaml").read_text() == dag.render(raw), \
        "dvc.yaml is stale: run `python -m stm_defects.mlops.dag > dvc.yaml`"


def test_stage_commands_run_a_stage_of_the_runner(stages):
    assert list(stages) == [s.name for s in dag.STAGES]
    for name, stage in stages.items():
        assert shlex.split(stage["cmd"]) == ["python", "-m", dag.RUNNER, name]


def test_every_module_a_stage_can_import_is_a_dependency(stages):
    for st in dag.STAGES:
        deps = _paths(stages[st.name].get("deps"))
        for module in dag.module_closure(dag.RUNNER, st.module):
            rel = dag._module_file(module).relative_to(REPO).as_posix()
            assert any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps), (st.name, rel)
    # and the closure follows imports inside functions (the stages import lazily)
    assert "stm_defects.improved.anomaly" in dag.module_closure(dag.RUNNER, dag.stage("fit_improved").module)
    assert "stm_defects.improved.anomaly" not in dag.module_closure("stm_defects.mlops.stages.autoencoders")


def _expected(stages: dict, rel: str) -> set[str]:
    return {name for name, st in stages.items()
            if any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in _paths(st.get("deps")))}


def test_editing_a_module_makes_dvc_status_report_the_stages_that_use_it(tmp_path, stages):
    """A copy of the project with placeholder outputs, committed as up to date; then edit one
    module at a time and ask DVC which stages changed."""
    work = tmp_path / "copy"
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copyfile(REPO / name, work / name)
    run(DVC, "init", "-q", "--no-scm", cwd=work)
    for st in stages.values():
        for out in _paths(st.get("outs")) + _paths(st.get("metrics")):
            path = work / out
            if path.suffix:                      # a file output
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}\n")
            else:
                path.mkdir(parents=True, exist_ok=True)
                (path / "placeholder").write_text("x\n")
    for st in stages.values():                   # deps inside an output folder (e.g. models/ae1/model.pt)
        for dep in _paths(st.get("deps")):
            path = work / dep
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("x\n")
    run(DVC, "commit", "-f", "-q", cwd=work)
    assert json.loads(run(DVC, "status", "--json", cwd=work).stdout or "{}") == {}
    for rel in ("src/stm_defects/image/robust.py", "src/stm_defects/improved/anomaly.py",
                "src/stm_defects/mlops/stages/evaluate.py", "src/stm_defects/models/training.py"):
        target = work / rel
        original = target.read_text()
        target.write_text(original + "\n# edited\n")
        changed = set(json.loads(run(DVC, "status", "--json", cwd=work).stdout or "{}"))
        target.write_text(original)
        expected = _expected(stages, rel)
        assert expected, rel
        assert changed == expected, (rel, sorted(changed), sorted(expected))
