"""Model files that cannot run code, and the manifests that say a model folder is complete.

Why: pickle (and joblib, cloudpickle, MLflow's pickle flavours) runs code while it loads, so a
planted `kmeans.joblib` or `model.pkl` executes on `stm predict`. The fitted scikit-learn parts
(K-means, the GMM, the improved analysis' state) are stored here as arrays plus JSON instead, and
read back with `np.load(allow_pickle=False)`. The autoencoders keep their torch checkpoints,
which `models.autoencoder.load_checkpoint` reads with `torch.load(weights_only=True)`.

The safe format (`FORMAT`, version `FORMAT_VERSION`): one `.npz` (a zip of `.npy` members),
written byte-for-byte deterministically (fixed member order and timestamps), holding

* `__header__`: uint8, the UTF-8 bytes of one JSON document
  `{"format": FORMAT, "version": 1, "kind": "kmeans" | "gmm" | "improved", "tree": NODE}`;
* `a0`, `a1`, ...: the numpy arrays the tree refers to (never of object dtype).

A NODE is JSON, read as:

    null, true/false, an int, a str, a finite float     itself
    [NODE, ...]                                          a list
    {"$tuple": [NODE, ...]}                              a tuple
    {"$dict": {"key": NODE, ...}}                        a dict with str keys (order kept)
    {"$float": "nan" | "inf" | "-inf"}                   a non-finite float
    {"$scalar": "<f8", "value": V}                       a numpy bool/int/uint/float scalar
    {"$array": "a3"}                                     the array stored as member `a3`
    {"$estimator": "sklearn.cluster.KMeans",             an estimator of an allowed class,
     "state": NODE}                                      rebuilt the way pickle would rebuild it

An estimator's state is its `__getstate__()`: every parameter and fitted attribute
(`cluster_centers_`, `means_`, `covariances_`, `precisions_cholesky_`, `weights_`,
`covariance_type`, the MinMax scaler's `min_`/`scale_`, ...), so the rebuilt estimator predicts
exactly as the fitted one. Loading creates it with `cls.__new__(cls)` and `__setstate__(state)`,
as pickle does, but only for the classes of `allowed_estimators()`, looked up by the name in the
file: no name in a file ever imports a module or calls anything else. Sharing is kept: an array
referenced twice (e.g. `LatentKMeans.cluster_centers_` and its inner K-means') is stored once.

Manifests. Every model folder a stage writes (`models/{ae1,kmeans,ae2,gmm,improved}`) ends with
`manifest.json`, written last: `{"format": MANIFEST_FORMAT, "version": 1, "files": {name: sha256}}`.
`read_verified` reads a file only when the manifest lists it with the same sha256, so an
unfinished folder (no manifest), a file changed after training, or a planted file is refused.

Every refusal is a `ModelFileError` (a `StageError`: the CLI prints it as one line).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from stm_defects.errors import StageError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "MODEL_FILES",
    "ModelFileError",
    "ALLOWED_NAMES",
    "allowed_estimators",
    "check",
    "dumps",
    "file_sha256",
    "load",
    "loads",
    "read_verified",
    "save",
    "sha256_hex",
    "write_manifest",
]

FORMAT = "stm-defects/safe-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "stm-defects/model-folder"
MODEL_FILES = {"ae1": "model.pt", "kmeans": "kmeans.npz", "ae2": "model.pt", "gmm": "gmm.npz",
               "improved": "state.npz"}
"""The one file each model is stored in, in its folder and in its registry artifacts."""

KINDS = ("kmeans", "gmm", "improved")
_HEADER = "__header__"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)            # fixed member timestamps: same content, same bytes
_ARRAY_KINDS = set("biufcUS")                 # bool, ints, floats, complex, text: no objects
_SCALAR_KINDS = set("biuf")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class ModelFileError(StageError):
    """A model file or folder that may not be loaded: not in the safe format, of the wrong kind,
    changed since it was written (sha256 mismatch), or from an unfinished or older training."""


# ------------------------------------------------------------------------------ hashing
def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- estimators
ALLOWED_NAMES = ("sklearn.pipeline.Pipeline", "sklearn.preprocessing.MinMaxScaler", "sklearn.cluster.KMeans",
                 "sklearn.cluster.MiniBatchKMeans", "sklearn.mixture.GaussianMixture",
                 "stm_defects.models.cluster.LatentKMeans", "stm_defects.models.cluster.GMMSelector")
"""The estimator names a safe model file may hold (the keys of `allowed_estimators`)."""

_KIND_NAMES = {"kmeans": ("sklearn.pipeline.Pipeline", "sklearn.cluster.KMeans", "sklearn.cluster.MiniBatchKMeans",
                          "stm_defects.models.cluster.LatentKMeans"),
               "gmm": ("stm_defects.models.cluster.GMMSelector", "sklearn.mixture.GaussianMixture")}

_MIXTURE = "sklearn.mixture.GaussianMixture"


def allowed_estimators() -> dict[str, type]:
    """Name in the file -> class: the only classes a safe model file can rebuild."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.mixture import GaussianMixture
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import MinMaxScaler

    from stm_defects.models.cluster import GMMSelector, LatentKMeans

    return {
        "sklearn.pipeline.Pipeline": Pipeline,
        "sklearn.preprocessing.MinMaxScaler": MinMaxScaler,
        "sklearn.cluster.KMeans": KMeans,
        "sklearn.cluster.MiniBatchKMeans": MiniBatchKMeans,
        "sklearn.mixture.GaussianMixture": GaussianMixture,
        "stm_defects.models.cluster.LatentKMeans": LatentKMeans,
        "stm_defects.models.cluster.GMMSelector": GMMSelector,
    }


def _kind_ok(kind: str, obj: Any, classes: dict[str, type] | None = None) -> bool:
    """Whether `obj` (the decoded tree) is what a model of `kind` must be. ``classes``
    (`allowed_estimators`) is looked up only for a built estimator."""
    if kind == "improved":
        return isinstance(obj, dict)
    if isinstance(obj, _Unbuilt):
        return obj.name in _KIND_NAMES[kind]
    if isinstance(obj, (dict, list, tuple, str, int, float)) or obj is None:
        return False
    classes = classes if classes is not None else allowed_estimators()
    return type(obj) in {classes[n] for n in _KIND_NAMES[kind]}


class _Unbuilt:
    """An estimator node checked (allowed name, well-formed state) but not built (`check`): the
    decoder builds the subclass `_Classes` makes for its ``name``, whose state it drops."""

    name = ""

    def __setstate__(self, state: dict) -> None:
        pass


class _Classes:
    """The classes a decoder builds, by name, importing scikit-learn only when a name needs it:
    in the default method's state (kind ``improved``) a GaussianMixture is rebuilt as
    `models.mixture.FittedGaussianMixture` (the same predictions), so loading that state imports
    no scikit-learn; with ``build=False`` nothing is built (`check`)."""

    def __init__(self, kind: str, build: bool = True):
        self.kind, self.build = kind, build
        self._all: dict[str, type] | None = None

    def get(self, name: str):
        if name not in ALLOWED_NAMES:
            return None
        if not self.build:
            return type("_Unbuilt", (_Unbuilt,), {"name": name})
        if self.kind == "improved" and name == _MIXTURE:
            from stm_defects.models.mixture import FittedGaussianMixture

            return FittedGaussianMixture
        if self._all is None:
            self._all = allowed_estimators()
        return self._all.get(name)


# ------------------------------------------------------------------------------ encoding
class _Encoder:
    def __init__(self, classes: dict[str, type]):
        self.names = {cls: name for name, cls in classes.items()}
        self.arrays: dict[str, np.ndarray] = {}
        self._seen: dict[int, str] = {}
        self._keep: list[np.ndarray] = []    # keeps ids valid while encoding

    def array(self, a: np.ndarray) -> dict:
        if id(a) not in self._seen:
            if a.dtype.kind not in _ARRAY_KINDS or a.dtype.fields is not None:
                raise TypeError(f"cannot store an array of dtype {a.dtype} safely")
            name = f"a{len(self.arrays)}"
            self.arrays[name] = a
            self._seen[id(a)] = name
            self._keep.append(a)
        return {"$array": self._seen[id(a)]}

    def __call__(self, v: Any) -> Any:
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int) and not isinstance(v, np.generic):
            return int(v)
        if isinstance(v, float) and not isinstance(v, np.generic):
            return v if math.isfinite(v) else {"$float": repr(float(v))}
        if isinstance(v, np.ndarray):
            return self.array(v)
        if isinstance(v, np.generic):
            if v.dtype.kind not in _SCALAR_KINDS:
                raise TypeError(f"cannot store a numpy scalar of dtype {v.dtype} safely")
            x = v.item()
            if isinstance(x, float) and not math.isfinite(x):
                x = repr(x)
            return {"$scalar": v.dtype.str, "value": x}
        if isinstance(v, list):
            return [self(x) for x in v]
        if isinstance(v, tuple):
            return {"$tuple": [self(x) for x in v]}
        if isinstance(v, dict):
            bad = [k for k in v if not isinstance(k, str)]
            if bad:
                raise TypeError(f"cannot store dict keys that are not str: {bad[:3]!r}")
            return {"$dict": {k: self(x) for k, x in v.items()}}
        name = self.names.get(type(v))
        if name is None:
            raise TypeError(f"cannot store a {type(v).__module__}.{type(v).__qualname__} safely "
                            "(not in safe_models.allowed_estimators)")
        state = v.__getstate__()
        if not isinstance(state, dict):
            raise TypeError(f"{name}: unexpected state {type(state).__name__}")
        return {"$estimator": name, "state": self(state)}


class _Decoder:
    def __init__(self, arrays, classes: dict[str, type]):
        self.arrays, self.classes = arrays, classes
        self._cache: dict[str, np.ndarray] = {}

    def array(self, name: Any) -> np.ndarray:
        if not isinstance(name, str) or name == _HEADER or name not in self.arrays.files:
            raise ModelFileError(f"refers to a missing array {name!r}")
        if name not in self._cache:
            a = self.arrays[name]                   # np.load(allow_pickle=False): never an object
            if not isinstance(a, np.ndarray) or a.dtype.kind not in _ARRAY_KINDS:
                raise ModelFileError(f"array {name!r} is not plain data")
            self._cache[name] = a
        return self._cache[name]

    def __call__(self, v: Any) -> Any:
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            return v
        if isinstance(v, list):
            return [self(x) for x in v]
        if not isinstance(v, dict) or len(v) not in (1, 2):
            raise ModelFileError(f"unexpected node {str(v)[:80]!r}")
        tag = next(iter(v))
        if tag == "$tuple" and len(v) == 1 and isinstance(v[tag], list):
            return tuple(self(x) for x in v[tag])
        if tag == "$dict" and len(v) == 1 and isinstance(v[tag], dict):
            return {str(k): self(x) for k, x in v[tag].items()}
        if tag == "$float" and len(v) == 1 and v[tag] in _NONFINITE:
            return _NONFINITE[v[tag]]
        if tag == "$array" and len(v) == 1:
            return self.array(v[tag])
        if tag == "$scalar" and set(v) == {"$scalar", "value"}:
            try:
                dt = np.dtype(v["$scalar"])
            except TypeError:
                raise ModelFileError(f"unknown scalar dtype {v['$scalar']!r}") from None
            x = v["value"]
            if dt.kind not in _SCALAR_KINDS or not isinstance(x, (bool, int, float, str)):
                raise ModelFileError(f"bad scalar {str(v)[:80]!r}")
            if isinstance(x, str):
                if x not in _NONFINITE:
                    raise ModelFileError(f"bad scalar {str(v)[:80]!r}")
                x = _NONFINITE[x]
            return np.array(x, dtype=dt)[()]
        if tag == "$estimator" and set(v) == {"$estimator", "state"}:
            cls = self.classes.get(v["$estimator"]) if isinstance(v["$estimator"], str) else None
            if cls is None:
                raise ModelFileError(f"class {str(v['$estimator'])[:80]!r} is not allowed in a model file")
            state = self(v["state"])
            if not isinstance(state, dict):
                raise ModelFileError(f"{v['$estimator']}: its state is not a dict")
            obj = cls.__new__(cls)
            obj.__setstate__(state)
            return obj
        raise ModelFileError(f"unexpected node {str(v)[:80]!r}")


# ------------------------------------------------------------------------------ writing
def dumps(obj: Any, kind: str) -> bytes:
    """The safe-format bytes of `obj`, a fitted model of `kind` ("kmeans", "gmm", "improved").

    Deterministic: the same model gives the same bytes. Raises TypeError for anything the format
    cannot hold (an estimator class outside `allowed_estimators`, object arrays, a callable).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(KINDS)}")
    classes = allowed_estimators()
    if not _kind_ok(kind, obj, classes):
        raise TypeError(f"a {type(obj).__name__} is not a {kind} model")
    from stm_defects.models.mixture import FittedGaussianMixture

    enc = _Encoder({**classes, "stm_defects.models.mixture.FittedGaussianMixture": FittedGaussianMixture})
    enc.names[FittedGaussianMixture] = _MIXTURE        # stored as the GaussianMixture it was read from
    header = {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind, "tree": enc(obj)}
    text = json.dumps(header, allow_nan=False, separators=(",", ":"))
    members = {_HEADER: np.frombuffer(text.encode("utf-8"), np.uint8), **enc.arrays}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in members.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


def save(path: str | Path, obj: Any, kind: str) -> Path:
    """Write `obj` (see `dumps`) to `path` (a `.npz`) atomically: a temporary file, then a rename."""
    path = Path(path)
    data = dumps(obj, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------ reading
def loads(data: bytes, kind: str, where: str = "model file", *, build: bool = True) -> Any:
    """The model of `kind` stored in `data` (safe-format bytes). Never unpickles anything.

    `where` names the source in error messages (a path, or a registry model and version).
    Raises ModelFileError for anything else: a pickle, a plain `.npy`, a truncated zip, another
    kind of model, an unknown class, object arrays. ``build=False`` (`check`) makes every one of
    these checks and builds no estimator (returns None).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(KINDS)}")
    hint = f"{where}: not a {kind} model in the safe stm-defects format"
    if data[:1] == b"\x80":
        raise ModelFileError(f"{where}: a pickle, refused (loading a pickle can run code); retrain to write "
                             "the safe format")
    if data[:2] != b"PK":
        raise ModelFileError(f"{hint} (not a .npz archive); retrain to write one")
    try:
        arrays = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(arrays, np.lib.npyio.NpzFile) or _HEADER not in arrays.files:
            raise ModelFileError("no header")
        raw = arrays[_HEADER]
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise ModelFileError("bad header")
        header = json.loads(raw.tobytes().decode("utf-8"))
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ModelFileError("bad header")
        if header.get("version") != FORMAT_VERSION:
            raise ModelFileError(f"format version {header.get('version')!r}, this software reads "
                                 f"{FORMAT_VERSION}")
        if header.get("kind") != kind:
            raise ModelFileError(f"it holds a {header.get('kind')!r} model")
        classes = _Classes(kind, build)
        obj = _Decoder(arrays, classes)(header.get("tree"))
        if not _kind_ok(kind, obj):
            held = obj.name.rsplit(".", 1)[-1] if isinstance(obj, _Unbuilt) else type(obj).__name__
            raise ModelFileError(f"it holds a {held}")
        return obj if build else None
    except ModelFileError as err:
        raise ModelFileError(f"{hint} ({err})") from None
    except Exception as err:  # noqa: BLE001 - any failure to parse untrusted bytes is the same refusal
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise ModelFileError(f"{hint} ({reason})") from None


def check(data: bytes, kind: str, where: str = "model file") -> None:
    """Every check of `loads` on `data`, without building its estimators (no scikit-learn import):
    what a loader runs on a model it builds only when first used (`results.Deferred`)."""
    loads(data, kind, where, build=False)


def load(path: str | Path, kind: str) -> Any:
    """The model of `kind` in the safe-format file `path` (no hash check: see `read_verified`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ModelFileError(f"{path}: cannot read it ({err.strerror or err})") from None
    return loads(data, kind, str(path))


# ----------------------------------------------------------------------------- manifests
def write_manifest(folder: str | Path, *names: str) -> Path:
    """Record the sha256 of `folder`'s files `names` in `folder/manifest.json`, atomically.

    Write it last: its presence says the folder is complete, and `read_verified` loads only the
    files it lists, with these exact bytes.
    """
    folder = Path(folder)
    files = {name: file_sha256(folder / name) for name in names}
    doc = {"format": MANIFEST_FORMAT, "version": 1, "files": files}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def _manifest(folder: Path) -> dict[str, str]:
    path = folder / MANIFEST
    if not path.is_file():
        raise ModelFileError(f"{folder}: no {MANIFEST}, so the folder is unfinished (training stopped "
                             "before the end) or was written by an older version; retrain it "
                             "(`stm train`, or `make run` for models/)")
    try:
        doc = json.loads(path.read_text())
        files = doc["files"] if isinstance(doc, dict) and doc.get("format") == MANIFEST_FORMAT else None
    except (OSError, ValueError, KeyError):
        files = None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ModelFileError(f"{path}: not a model folder manifest; retrain the folder")
    return files


def read_verified(folder: str | Path, name: str) -> bytes:
    """The bytes of `folder/name`, after checking them against `folder/manifest.json`.

    Refused (ModelFileError): no manifest, `name` not listed, the file missing, or its sha256
    differs from the manifest's. The bytes returned are the ones hashed (no second read).
    """
    folder = Path(folder)
    files = _manifest(folder)
    if name not in files:
        raise ModelFileError(f"{folder / name}: not listed in {folder / MANIFEST}; retrain the folder")
    try:
        data = (folder / name).read_bytes()
    except OSError as err:
        raise ModelFileError(f"{folder / name}: listed in {MANIFEST} but cannot be read "
                             f"({err.strerror or err}); retrain the folder") from None
    actual = sha256_hex(data)
    if actual != files[name]:
        raise ModelFileError(f"{folder / name}: sha256 {actual[:12]}... does not match "
                             f"{files[name][:12]}... in {MANIFEST} (changed after training); refusing to "
                             "load it")
    return data
