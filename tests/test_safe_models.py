"""Model files that cannot run code (`io.safe_models`), manifests, and the registry's sha256 check.

Round trips: the rebuilt K-means, GMMs and improved state predict exactly as the fitted ones.
Planted pickles (a `__reduce__` that creates a marker file) in a `--models` folder and in a
registry version's artifacts must never run: the loaders either use the safe file beside them or
refuse with one clear line. Changed bytes (sha256 mismatch) are refused.
"""

from __future__ import annotations

import io
import json
import pathlib
import pickle
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from typer.testing import CliRunner

from stm_defects.cli import app
from stm_defects.io import safe_models
from stm_defects.io.model_files import load_model, load_models
from stm_defects.io.safe_models import ModelFileError
from stm_defects.results import Deferred
from tiny import tiny_improved_state, tiny_models, tiny_registry

REPO = Path(__file__).resolve().parents[1]
X = np.random.default_rng(1).normal(size=(200, 2))


class Planted:
    """Unpickling this creates `marker` (what a real attack would do with a shell command)."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def planted_pickle(marker: Path) -> bytes:
    return pickle.dumps({"model": Planted(marker)})


def planted_npz(marker: Path) -> bytes:
    """A valid .npz whose one member is an object array: loading it with pickle allowed runs it."""
    buf = io.BytesIO()
    np.savez(buf, __header__=np.array([Planted(marker)], dtype=object))
    return buf.getvalue()


def test_the_planted_payloads_are_live(tmp_path):
    """Guard against vacuous tests: with pickle allowed, both payloads do create the marker."""
    pickle.loads(planted_pickle(tmp_path / "a"))
    assert (tmp_path / "a").exists()
    np.load(io.BytesIO(planted_npz(tmp_path / "b")), allow_pickle=True)["__header__"]
    assert (tmp_path / "b").exists()


# ---------------------------------------------------------------------------- round trips
def roundtrip(obj, kind: str):
    data = safe_models.dumps(obj, kind)
    assert safe_models.dumps(obj, kind) == data           # deterministic bytes
    assert b"\x80" != data[:1] and data[:2] == b"PK"       # a zip, not a pickle
    return safe_models.loads(data, kind)


@pytest.mark.parametrize("minibatch", [False, True])
def test_kmeans_pipeline_predicts_identically(minibatch):
    from stm_defects.models.cluster import make_kmeans

    x = X.astype(np.float32)
    model = make_kmeans(3, seed=0, minibatch_threshold=50 if minibatch else None).fit(x)
    again = roundtrip(model, "kmeans")
    assert type(again["kmeans"].estimator_) is type(model["kmeans"].estimator_)
    assert np.array_equal(again.predict(x), model.predict(x))
    assert np.array_equal(again.transform(x), model.transform(x))
    assert np.array_equal(again[-1].cluster_centers_, model[-1].cluster_centers_)
    assert again[-1].n_clusters == 3 and again[-1].minibatch_ is minibatch


def test_plain_kmeans_predicts_identically():
    from sklearn.cluster import KMeans

    model = KMeans(4, n_init=2, random_state=0).fit(X)
    again = roundtrip(model, "kmeans")
    assert np.array_equal(again.predict(X), model.predict(X))
    assert np.array_equal(again.cluster_centers_, model.cluster_centers_)


@pytest.mark.parametrize("covariance", ["full", "diag", "tied", "spherical"])
def test_gaussian_mixture_predicts_identically(covariance):
    from sklearn.mixture import GaussianMixture

    model = GaussianMixture(3, covariance_type=covariance, random_state=0).fit(X)
    again = roundtrip(model, "gmm")
    assert again.covariance_type == covariance
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert np.array_equal(getattr(again, name), getattr(model, name)), name
    assert np.array_equal(again.predict(X), model.predict(X))
    assert np.array_equal(again.predict_proba(X), model.predict_proba(X))
    assert np.array_equal(again.score_samples(X), model.score_samples(X))


def test_gmm_selector_predicts_identically():
    from stm_defects.models.cluster import GMMSelector

    model = GMMSelector(k_values=(2, 3), covariance_types=("diag", "full"), random_state=0).fit(X)
    again = roundtrip(model, "gmm")
    assert again.grid_ == model.grid_ and again.k_values == (2, 3)
    assert (again.n_components_, again.covariance_type_) == (model.n_components_, model.covariance_type_)
    assert np.array_equal(again.predict(X), model.predict(X))
    assert np.array_equal(again.predict_proba(X), model.predict_proba(X))
    assert np.array_equal(again.score_samples(X), model.score_samples(X))


def test_improved_state_from_fit_classes_predicts_identically():
    from stm_defects.improved.classify import ClassifyConfig, fit_classes, predict_classes

    rng = np.random.default_rng(0)
    P = 15
    yy, xx = np.mgrid[0:P, 0:P] - 7.0
    shapes = [np.exp(-(xx ** 2 + yy ** 2) / 8), -np.exp(-(xx ** 2 / 30 + yy ** 2 / 3)),
              np.exp(-(xx ** 2 / 30 + yy ** 2 / 3))]
    patches = np.concatenate([s + 0.05 * rng.standard_normal((40, P, P)) for s in shapes]).astype(np.float32)
    classes = fit_classes(patches, ClassifyConfig(patch=P, k_range=(2, 4), n_boot=1, n_pca=4), seed=0)
    state = {"version": 1, "n_train_images": 3, "n_train_defects": len(patches), "classes": classes}
    again = roundtrip(state, "improved")
    assert list(again) == list(state) and list(again["classes"]) == list(classes)
    assert again["classes"]["selection"] == classes["selection"]
    for key in ("n_classes", "k", "loglik_threshold"):
        assert again["classes"][key] == classes[key] and type(again["classes"][key]) is type(classes[key])
    lab, prob = predict_classes(classes, patches)
    lab2, prob2 = predict_classes(again["classes"], patches)
    assert np.array_equal(lab, lab2) and np.array_equal(prob, prob2)


def test_improved_state_edge_values():
    state = tiny_improved_state()
    again = roundtrip(state, "improved")
    assert again["classes"]["loglik_threshold"] == float("-inf")
    assert roundtrip({"version": 1, "n_train_images": 1, "n_train_defects": 0, "classes": None},
                     "improved")["classes"] is None
    odd = {"t": (1, 2.5, "x"), "nan": float("nan"), "i8": np.int8(-3), "f32": np.float32(0.1),
           "b": np.bool_(True), "nested": [[np.zeros((0, 3))], {"e": []}]}
    back = roundtrip(odd, "improved")
    assert back["t"] == (1, 2.5, "x") and np.isnan(back["nan"])
    for key in ("i8", "f32", "b"):
        assert back[key] == odd[key] and back[key].dtype == odd[key].dtype
    assert back["nested"][0][0].shape == (0, 3) and back["nested"][1] == {"e": []}


def test_save_is_atomic_and_deterministic(tmp_path):
    state = tiny_improved_state()
    a = safe_models.save(tmp_path / "a" / "state.npz", state, "improved")
    b = safe_models.save(tmp_path / "b" / "state.npz", state, "improved")
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in a.parent.iterdir()) == ["state.npz"]      # no temporary left
    assert np.load(a, allow_pickle=False)["__header__"].dtype == np.uint8   # plain numpy reads it


def test_save_refuses_what_it_cannot_store_safely():
    from sklearn.linear_model import LinearRegression

    with pytest.raises(TypeError, match="LinearRegression"):
        safe_models.dumps({"m": LinearRegression()}, "improved")
    with pytest.raises(TypeError, match="object"):
        safe_models.dumps({"a": np.array([None], dtype=object)}, "improved")
    with pytest.raises(TypeError, match="not str"):
        safe_models.dumps({1: 2}, "improved")
    with pytest.raises(TypeError, match="not a kmeans"):
        safe_models.dumps({"a": 1}, "kmeans")
    with pytest.raises(TypeError):
        safe_models.dumps({"f": print}, "improved")


# ------------------------------------------------------------------------- refused files
def _with_header(header: dict, **arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, __header__=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
    return buf.getvalue()


def test_loads_refuses_anything_but_the_safe_format(tmp_path):
    marker = tmp_path / "ran"
    good = safe_models.dumps(tiny_improved_state(), "improved")
    header = {"format": safe_models.FORMAT, "version": 1, "kind": "improved"}
    buf = io.BytesIO()
    np.save(buf, np.zeros(3))
    cases = {
        "a pickle, refused": planted_pickle(marker),
        "Object arrays cannot be loaded": planted_npz(marker),
        "not a .npz archive": buf.getvalue(),
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "is not allowed": _with_header({**header, "tree": {"$estimator": "os.system", "state": {"$dict": {}}}}),
        "missing array": _with_header({**header, "tree": {"$array": "a0"}}),
        "unexpected node": _with_header({**header, "tree": {"$eval": "1"}}),
        "holds a 'gmm' model": _with_header({**header, "kind": "gmm", "tree": None}),
        "format version": _with_header({**header, "version": 99, "tree": None}),
    }
    for needle, data in cases.items():
        with pytest.raises(ModelFileError) as err:
            safe_models.loads(data, "improved", "state.npz")
        text = str(err.value)
        assert text.startswith("state.npz: ") and "\n" not in text, text
        if needle not in ("truncated", "empty"):
            assert needle in text, (needle, text)
    assert not marker.exists()


# -------------------------------------------------------------------------- --models DIR
def test_load_models_reads_the_safe_files(tmp_path):
    files = tiny_models(tmp_path / "models", config={"method": "improved", "x": 1})
    models = load_models(tmp_path / "models")
    ref = safe_models.load(files["kmeans"], "kmeans")
    x = X.astype(np.float32)
    assert isinstance(models.kmeans, Deferred) and isinstance(models.gmm, Deferred)   # the paper method's
    assert np.array_equal(models.estimator("kmeans").predict(x), ref.predict(x))
    assert np.array_equal(models.estimator("gmm").predict_proba(X),
                          safe_models.load(files["gmm"], "gmm").predict_proba(X))
    assert models.kmeans is models.estimator("kmeans")                    # built once, then kept
    assert models.improved["classes"]["n_classes"] == 2
    assert models.config == {"method": "improved", "x": 1}                # the verified improved/config.json
    assert models.calibration == {"error_threshold": 0.1}
    assert isinstance(models.ae1, Deferred)             # verified now, built on first use
    ae1 = models.autoencoder("ae1")
    assert ae1.cfg.latent == 2 and not ae1.training and models.ae1 is ae1
    assert set(models.versions) == {"ae1", "kmeans", "ae2", "gmm", "improved"}


def test_planted_files_beside_the_safe_ones_are_never_read(tmp_path):
    marker = tmp_path / "ran"
    tiny_models(tmp_path / "models")
    for key, name in (("kmeans", "kmeans.joblib"), ("kmeans", "model.pkl"), ("gmm", "gmm.joblib"),
                      ("improved", "state.joblib"), ("ae1", "model.pkl")):
        (tmp_path / "models" / key / name).write_bytes(planted_pickle(marker))
    models = load_models(tmp_path / "models")
    assert models.kmeans is not None and models.improved is not None
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")   # torch, on the planted .pt
@pytest.mark.parametrize("case", ["old_joblib_folder", "pickle_as_npz", "pickle_as_npz_rehashed",
                                  "object_npz_rehashed", "empty_improved", "flipped_byte", "pickle_as_model_pt"])
def test_planted_or_changed_model_files_are_refused(tmp_path, case):
    marker = tmp_path / "ran"
    d = tmp_path / "models"
    tiny_models(d)
    if case == "old_joblib_folder":           # a folder as older versions wrote it: pickle, no manifest
        for f in (d / "kmeans").iterdir():
            f.unlink()
        (d / "kmeans" / "kmeans.joblib").write_bytes(planted_pickle(marker))
        needle = "kmeans: no manifest.json"
    elif case == "pickle_as_npz":             # the manifest's hash no longer matches
        (d / "gmm" / "gmm.npz").write_bytes(planted_pickle(marker))
        needle = "gmm.npz: sha256"
    elif case == "pickle_as_npz_rehashed":    # the hash matches: the format check still refuses it
        (d / "gmm" / "gmm.npz").write_bytes(planted_pickle(marker))
        safe_models.write_manifest(d / "gmm", "gmm.npz")
        needle = "a pickle, refused"
    elif case == "object_npz_rehashed":
        (d / "improved" / "state.npz").write_bytes(planted_npz(marker))
        safe_models.write_manifest(d / "improved", "state.npz", "config.json")
        needle = "Object arrays cannot be loaded"
    elif case == "empty_improved":            # a training killed during fit_improved
        for f in (d / "improved").iterdir():
            f.unlink()
        needle = "improved: no manifest.json"
    elif case == "flipped_byte":
        data = bytearray((d / "kmeans" / "kmeans.npz").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (d / "kmeans" / "kmeans.npz").write_bytes(bytes(data))
        needle = "does not match"
    else:                                     # a full pickle as the checkpoint: weights_only refuses
        (d / "ae2" / "model.pt").write_bytes(planted_pickle(marker))
        safe_models.write_manifest(d / "ae2", "model.pt")
        needle = "not a readable autoencoder checkpoint"
    with pytest.raises(ModelFileError) as err:
        load_models(d)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not marker.exists()


def test_a_checkpoint_torch_refuses_is_refused_when_first_used_and_by_a_paper_prediction(tmp_path):
    """A zip archive with the manifest's hash that is no checkpoint: the default method never
    builds it; the first use is one ModelFileError naming the file; `stm predict` with the paper
    method refuses it before any scan."""
    import zipfile

    d = tmp_path / "models"
    tiny_models(d, config={"method": "paper"})
    with zipfile.ZipFile(d / "ae1" / "model.pt", "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle")
    safe_models.write_manifest(d / "ae1", "model.pt")
    models = load_models(d)
    with pytest.raises(ModelFileError) as err:
        models.autoencoder("ae1")
    text = str(err.value)
    assert text.startswith(str(d / "ae1" / "model.pt")) and "not a readable autoencoder checkpoint" in text, text
    np.save(tmp_path / "scan.npy", np.random.default_rng(0).normal(size=(64, 64)))
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "scan.npy"), "--models", str(d),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "not a readable autoencoder checkpoint" in lines[0], result.output
    assert not (tmp_path / "out" / "scan.json").exists()


def test_predict_with_a_planted_models_folder_is_one_line(tmp_path):
    marker = tmp_path / "ran"
    d = tmp_path / "models"
    tiny_models(d)
    (d / "kmeans" / "manifest.json").unlink()
    (d / "kmeans" / "kmeans.npz").unlink()
    (d / "kmeans" / "kmeans.joblib").write_bytes(planted_pickle(marker))
    np.save(tmp_path / "scan.npy", np.random.default_rng(0).normal(size=(64, 64)))
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "scan.npy"), "--models", str(d),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "no manifest.json" in lines[0] and "retrain" in lines[0], result.output
    assert not marker.exists()


def test_a_stage_reads_a_model_only_through_the_manifest(tmp_path):
    d = tmp_path / "models"
    tiny_models(d)
    assert load_model(d / "kmeans", "kmeans") is not None
    (d / "kmeans" / "kmeans.npz").write_bytes(safe_models.dumps(
        safe_models.load(d / "kmeans" / "kmeans.npz", "kmeans"), "kmeans") + b"\0")
    with pytest.raises(ModelFileError, match="does not match"):
        load_model(d / "kmeans", "kmeans")


# ------------------------------------------------------------------------------- registry
@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A SQLite store with a tiny model set (safe files) registered and in Production."""
    with tiny_registry(tmp_path_factory.mktemp("safe-registry"), "safe-registry-test") as reg:
        yield reg


@pytest.fixture()
def fresh_kmeans(registry, monkeypatch):
    """A new stm-kmeans version (the same safe file) promoted to Production, for a test to tamper
    with; the original version is promoted back afterwards."""
    import mlflow

    from stm_defects.mlops.tracking import Tracker, promote

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    monkeypatch.setenv("STM_PIPELINE_RUN", "safe-registry-test")
    monkeypatch.chdir(registry["root"])
    with Tracker(registry["params"], "kmeans") as tr:
        version = tr.register("kmeans", registry["files"]["kmeans"])
    promote({"kmeans": version}, "Production", force=True)
    mv = mlflow.MlflowClient(registry["uri"]).get_model_version("stm-kmeans", str(version))
    yield {"version": version, "folder": Path(unquote(urlparse(mv.source).path))}
    promote({"kmeans": registry["versions"]["kmeans"]}, "Production", force=True)


def test_load_registered_reads_the_safe_files(registry, monkeypatch):
    from stm_defects.mlops.tracking import load_registered

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    monkeypatch.chdir(registry["root"])
    models = load_registered("Production")
    local = load_models(registry["root"] / "models")
    x = X.astype(np.float32)
    assert np.array_equal(models.estimator("kmeans").predict(x), local.estimator("kmeans").predict(x))
    assert np.array_equal(models.estimator("gmm").predict_proba(X), local.estimator("gmm").predict_proba(X))
    assert models.improved["classes"]["k"] == 2
    assert models.autoencoder("ae1").cfg.latent == 2 and not models.ae1.training
    assert models.calibration == {"error_threshold": 0.1}


def test_planted_registry_artifacts_are_never_read(fresh_kmeans, tmp_path):
    from stm_defects.mlops.tracking import load_registered

    marker = tmp_path / "ran"
    folder = fresh_kmeans["folder"]
    assert (folder / "kmeans.npz").is_file()
    (folder / "model.pkl").write_bytes(planted_pickle(marker))
    (folder / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: mlflow.sklearn\n")
    models = load_registered("Production")
    assert models.versions["kmeans"]["version"] == fresh_kmeans["version"]
    assert not marker.exists()


def test_registry_sha256_mismatch_is_refused(fresh_kmeans, tmp_path):
    import mlflow

    from stm_defects.mlops.tracking import TrackingError, load_registered

    marker = tmp_path / "ran"
    v = fresh_kmeans["version"]
    (fresh_kmeans["folder"] / "kmeans.npz").write_bytes(planted_pickle(marker))
    with pytest.raises(TrackingError) as err:
        load_registered("Production")
    text = str(err.value)
    assert f"stm-kmeans v{v}" in text and "kmeans.npz" in text and "sha256" in text and "refusing" in text
    assert "\n" not in text

    # a matching tag (the attacker also rewrote it): the model set's sha256 pin no longer holds
    client = mlflow.MlflowClient()
    planted = safe_models.file_sha256(fresh_kmeans["folder"] / "kmeans.npz")
    client.set_model_version_tag("stm-kmeans", str(v), "sha256", planted)
    with pytest.raises(TrackingError, match=rf"stm-kmeans v{v}: its sha256 tag is not the one stm-set v\d+ pinned"):
        load_registered("Production")
    # and with the set's pin rewritten as well, the safe reader still refuses the pickle
    served = client.get_model_version_by_alias("stm-set", "production")
    client.set_model_version_tag("stm-set", served.version, "kmeans_sha256", planted)
    with pytest.raises(ModelFileError, match=rf"stm-kmeans v{v} kmeans.npz: a pickle, refused"):
        load_registered("Production")
    assert not marker.exists()


def test_registry_version_in_the_old_pickle_format_is_refused(fresh_kmeans, tmp_path):
    import mlflow

    from stm_defects.mlops.tracking import TrackingError, load_registered

    marker = tmp_path / "ran"
    folder = fresh_kmeans["folder"]
    (folder / "model.pkl").write_bytes(planted_pickle(marker))
    mlflow.MlflowClient().delete_model_version_tag("stm-kmeans", str(fresh_kmeans["version"]), "file")
    with pytest.raises(TrackingError, match="old pickle-based format"):
        load_registered("Production")
    assert not marker.exists()


def test_registry_missing_file_is_one_line(fresh_kmeans):
    from stm_defects.mlops.tracking import TrackingError, load_registered

    (fresh_kmeans["folder"] / "kmeans.npz").unlink()
    with pytest.raises(TrackingError, match=rf"stm-kmeans v{fresh_kmeans['version']}: kmeans.npz is missing"):
        load_registered("Production")
