"""params.yaml -> frozen dataclasses: the repo's file loads, typos fail loudly, profiles apply."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from stm_defects.config import ConfigError, Params, ScopedParams, load_params, resolve, section_types

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(PARAMS.read_text())


def fresh(raw: dict) -> dict:
    return copy.deepcopy(raw)


def test_repo_params_load(raw):
    p = load_params(PARAMS)
    assert isinstance(p, Params)
    assert p.profile == raw.get("profile", "default")
    assert p.seed == raw["seed"]
    # every section of the file is a built dataclass (not a leftover dict)
    for section in raw:
        if section in ("seed", "profile", "profiles"):
            continue
        assert dataclasses.is_dataclass(getattr(p, section)), section
    # lists become tuples (frozen, hashable), the values are the file's
    assert p.ae1.widths == tuple(raw["ae1"]["widths"])
    assert p.gmm.k_range == tuple(raw["gmm"]["k_range"])
    assert p.data.n_scans == raw["data"]["n_scans"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.data.n_scans = 1


def test_unknown_key_in_section_names_the_key(raw):
    bad = fresh(raw)
    bad["kmeans"]["k_rnage"] = [2, 5]
    with pytest.raises(ConfigError) as err:
        resolve(bad, "params.yaml")
    msg = str(err.value)
    assert "k_rnage" in msg
    assert "kmeans" in msg


def test_unknown_key_in_library_section_names_the_key(raw):
    bad = fresh(raw)
    bad["ae1"]["widht"] = [8]
    with pytest.raises(ConfigError, match="widht"):
        resolve(bad)


def test_unknown_section_raises(raw):
    bad = fresh(raw)
    bad["kmeanz"] = {"k": 3}
    with pytest.raises(ConfigError, match="kmeanz"):
        resolve(bad)


def test_paper_profile_applies_overrides(raw):
    p = resolve(fresh(raw), profile="paper")
    assert p.profile == "paper"
    assert p.ae1.widths == (128, 256, 512)
    assert p.gmm.k_range[1] == 30
    assert p.ae2.hidden == 256
    # values the profile does not touch stay as in the base file
    assert p.ae1.latent == raw["ae1"]["latent"]
    assert p.kmeans.k == raw["kmeans"]["k"]


def test_profile_key_in_file_selects_profile(raw, tmp_path):
    data = fresh(raw)
    data["profile"] = "paper"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    p = load_params(path)
    assert p.profile == "paper"
    assert p.ae1.widths == (128, 256, 512)
    assert p.gmm.k_range == (2, 30)


def test_unknown_profile_raises(raw):
    with pytest.raises(ConfigError, match="gpu-huge"):
        resolve(fresh(raw), profile="gpu-huge")
    data = fresh(raw)
    data["profile"] = "gpu-huge"
    with pytest.raises(ConfigError, match="gpu-huge"):
        resolve(data)


def test_digest_is_stable_and_changes_with_a_value(raw):
    a = resolve(fresh(raw)).digest()
    assert a == resolve(fresh(raw)).digest()
    changed = fresh(raw)
    changed["kmeans"]["k"] = raw["kmeans"]["k"] + 1
    assert resolve(changed).digest() != a
    nested = fresh(raw)
    nested["synth"]["snr"] = [9.0, 9.5]
    assert resolve(nested).digest() != a
    assert resolve(fresh(raw), profile="paper").digest() != a


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_params(bad)


# Sections sharing a dataclass: the class defaults follow the first of each pair.
_SECOND_OF_PAIR = {"ae2": "ae1", "ae2_train": "ae1_train", "synth_hard": "synth"}


def _differences(code, file, prefix: str) -> list[tuple[str, object, object]]:
    if dataclasses.is_dataclass(code) and dataclasses.is_dataclass(file):
        out = []
        for f in dataclasses.fields(code):
            out += _differences(getattr(code, f.name), getattr(file, f.name), f"{prefix}.{f.name}")
        return out
    return [] if code == file else [(prefix, code, file)]


@pytest.mark.parametrize(
    "section",
    [s for s in yaml.safe_load(PARAMS.read_text()) if s not in ("seed", "profile", "profiles", *_SECOND_OF_PAIR)],
)
def test_dataclass_defaults_equal_params_yaml(section):
    """A library function called without a config must behave as the pipeline (default profile) does."""
    cls = section_types()[section]
    from_file = getattr(load_params(PARAMS, profile="default"), section)
    assert type(from_file) is cls
    diffs = _differences(cls(), from_file, section)
    assert not diffs, "code default != params.yaml: " + "; ".join(
        f"{key}: {code!r} != {file!r}" for key, code, file in diffs
    )


def test_every_section_has_a_type_and_pairs_share_one(raw):
    types = section_types()
    assert set(raw) - {"seed", "profile", "profiles"} == set(types)
    for second, first in _SECOND_OF_PAIR.items():
        assert types[second] is types[first]


def test_scoped_params_and_flat(raw):
    p = resolve(fresh(raw))
    scoped = ScopedParams(p, ("kmeans", "prepare"), "cluster")
    assert scoped.kmeans is p.kmeans and scoped.profile == p.profile
    with pytest.raises(ConfigError, match="ae1"):
        _ = scoped.ae1                              # not declared by the stage
    assert scoped.replace(kmeans=dataclasses.replace(p.kmeans, k=3)).kmeans.k == 3
    with pytest.raises(ConfigError):
        scoped.replace(ae1=p.ae1)
    # the digest covers the declared sections only
    other = dataclasses.replace(p, ae1=dataclasses.replace(p.ae1, latent=p.ae1.latent + 1))
    assert ScopedParams(other, ("kmeans", "prepare"), "cluster").digest() == scoped.digest()
    changed = dataclasses.replace(p, kmeans=dataclasses.replace(p.kmeans, k=p.kmeans.k + 1))
    assert ScopedParams(changed, ("kmeans", "prepare"), "cluster").digest() != scoped.digest()

    flat = p.flat("kmeans", "improved")
    assert flat["kmeans.k"] == str(p.kmeans.k)
    assert flat["improved.anomaly.steps.sigma"] == str(p.improved.anomaly.steps.sigma)
    assert not any(k.startswith("ae1.") for k in flat)
    assert set(p.flat()) > set(flat)
