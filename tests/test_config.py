"""params.yaml -> frozen dataclasses: the repo's file loads, typos fail loudly, profiles apply."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from stm_defects.config import ConfigError, Params, load_params, resolve

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
