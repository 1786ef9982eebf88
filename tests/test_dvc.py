"""DVC: data versioning round trip through a local remote, and the repo's dvc.yaml against the
code (stage commands are valid `stm` invocations, params exist, deps exist or come from a stage)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
import yaml

from stm_defects.cli import app

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


def test_stage_commands_are_valid_stm_invocations(stages):
    cli = typer.main.get_command(app)
    for name, stage in stages.items():
        args = shlex.split(stage["cmd"])
        assert args[0] == "stm", f"stage {name}: {stage['cmd']}"
        command = cli.commands.get(args[1])
        assert command is not None, f"stage {name}: no `stm {args[1]}` command"
        # parses options and arguments exactly as a run would (unknown or missing options raise)
        command.make_context(args[1], args[2:])
        for out in _paths(stage.get("outs")):
            assert out in stage["cmd"] or any(out.startswith(a.rstrip("/") + "/") for a in args[2:]), \
                f"stage {name}: output {out} is not written by its command"
