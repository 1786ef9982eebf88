"""Orientation-free defect features and stable, mergeable classes, as pure functions.

Features.  Each defect is resampled from the lattice-free residual on a square grid aligned
with the local dimer rows (u along the rows, v across), the row direction coming from the
structure tensor of the removed lattice around the defect.  The patch is then flipped so
that its first moments along u and v are >= 0, which leaves it unchanged by any of the 8
symmetries of the square (rotating the scan by 90 degrees turns the rows by 90 degrees and
the grid with them).  Heights are in units of the scan's lattice corrugation (std of the
removed lattice), so scans normalised differently stay comparable.

The classes look at each patch averaged over its four flips along and across the rows
(``features`` "symmetric"), the same for every pose of a defect. The canonical flip is a guess
where a first moment is near zero (a round defect, a centre that fell on the middle of a pair),
so in the canonical patches one kind comes in mirror poses, and a kind could take two mixture
components, or a defect change class when its centre moved by 0.15 nm (9-53% of the training
defects on the nine Si(001)-shift dev draws; 4-8% with flip-averaged patches).  What the
averaging loses is which side of a defect is which, not its shape: a one-sided defect still
differs from a symmetric one.  ``features`` "canonical" is the earlier rule.

Classes.  PCA of those patches, then Gaussian mixtures for k in ``k_range``; for each
k the stability is the mean ARI between mixtures fitted on disjoint random halves (both
predicting all samples).  The chosen k has the lowest BIC among the stable ones (stability
>= ``stability_min``; the most stable k if none is).  Components whose posteriors overlap
(mean cross-posterior >= ``merge_overlap``) are merged into one class.  A defect whose
log-likelihood is below the ``unknown_quantile`` of the training defects is "unknown" (-1).

Split.  The scan-wide principal components follow what varies most among all defects (big
clusters against small dots), so two kinds that differ in a finer way (a round dangling bond
and an adsorbate bar, under noise) can share one component.  So each class of at least
``split_min`` training defects is looked at in its own principal components: it is split in
two when a two-component mixture there has a lower BIC than one Gaussian, each part holds at
least ``split_min_share`` of the class, and the parts do not overlap by the rule that merges
components (mean cross-posterior < ``merge_overlap``).  ``split_min`` 0: never.

The split is to be one of kinds, not of poses: a canonical flip is a guess where a first
moment is near zero, so one kind comes in mirror poses, and those are the clearest two clusters
a class's own components show.  With ``split_features`` "symmetric" the class is looked at in
its patches averaged over the four flips along and across the rows, which are the same for
every pose of a defect, so only a difference of shape (round or long, one blob or two) can
split it, and its parts must overlap less than ``split_max_overlap`` (mean cross-posterior;
never more than ``merge_overlap`` allows), a stricter rule than the merge's: a large class of
one kind whose shape varies continuously (dangling bonds of different widths) is no Gaussian
either, and two Gaussians fit it better by BIC, but their parts overlap (0.08-0.10 on the
Si(001)-shift dev draws, where dangling bonds against adsorbates gave 0.02).  With "canonical"
(the earlier rule) the canonical patches are used, parts may overlap up to ``merge_overlap``,
and a split is refused when flipping the class's patches moves more than ``split_max_flip`` of
them from one part to the other; under noise that refusal also turned down the split of
dangling bonds from adsorbates, whose two-part mixture in canonical patches follows poses.

All randomness comes from the ``seed`` argument; the fitted state is a plain dict of numpy
arrays, numbers and strings (and GaussianMixtures: the classes' and one per split), which
`io.safe_models` stores without pickle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from stm_defects.errors import StageError
from stm_defects.models import mixture

__all__ = [
    "ClassifyConfig",
    "canonical_patches",
    "fit_classes",
    "classify_patches",
    "predict_classes",
    "row_angles",
]

UNKNOWN = -1
FEATURES = ("symmetric", "canonical")


@dataclass(frozen=True)
class ClassifyConfig:
    patch: int = 25                 # px, side of the canonical patch
    smooth: float = 1.0             # Gaussian sigma (px) on the residual before resampling
    orient_window: int = 24         # px, half width of the structure-tensor window
    n_pca: int = 6
    k_range: tuple[int, int] = (2, 9)
    covariance: str = "full"
    n_boot: int = 3                 # random half splits per k for the stability
    stability_min: float = 0.8
    merge_overlap: float = 0.12
    unknown_quantile: float = 0.005
    max_samples: int = 4000
    n_init: int = 3                 # EM restarts of each mixture (the best likelihood is kept)
    split_min: int = 100            # a class of this many training defects may be split in two (0: never)
    split_min_share: float = 0.1    # ... when each part holds this share of it (see "Split" above)
    split_max_flip: float = 0.05    # ... and flipped patches change part at most this often ("canonical")
    split_features: str = "symmetric"   # the split looks at patches averaged over flips | "canonical"
    split_max_overlap: float = 0.05     # ... and its parts overlap less than this ("symmetric")
    features: str = "symmetric"     # the classes see patches averaged over flips | "canonical" (see "Features")

    def __post_init__(self):
        for name in ("features", "split_features"):
            if getattr(self, name) not in FEATURES:
                raise ValueError(f"{name} must be one of {FEATURES}, not {getattr(self, name)!r}")


def _windows(a: np.ndarray, centres: np.ndarray, half: int) -> np.ndarray:
    p = np.pad(a, half, mode="reflect")
    n = 2 * half + 1
    out = np.empty((len(centres), n, n), np.float32)
    for i, (y, x) in enumerate(np.rint(centres).astype(int)):
        y = min(max(y, 0), a.shape[0] - 1)
        x = min(max(x, 0), a.shape[1] - 1)
        out[i] = p[y:y + n, x:x + n]
    return out


def row_angles(lattice: np.ndarray, centres_yx, window: int = 24) -> np.ndarray:
    """Row direction (radians, [0, pi), from the x axis towards +y) of the periodic lattice
    around each (y, x) centre: perpendicular to the dominant gradient of the structure
    tensor, Gaussian-weighted over a (2*window+1)^2 window."""
    c = np.asarray(centres_yx, np.float64).reshape(-1, 2)
    if len(c) == 0:
        return np.zeros(0)
    lat = np.asarray(lattice, np.float32)
    gy, gx = np.gradient(lat)
    yy, xx = np.mgrid[-window:window + 1, -window:window + 1]
    g = np.exp(-(yy ** 2 + xx ** 2) / (2 * (window / 2.0) ** 2)).astype(np.float32)
    Wy, Wx = _windows(gy, c, window), _windows(gx, c, window)
    jxx = (Wx * Wx * g).sum(axis=(1, 2))
    jyy = (Wy * Wy * g).sum(axis=(1, 2))
    jxy = (Wx * Wy * g).sum(axis=(1, 2))
    grad = 0.5 * np.arctan2(2 * jxy, jxx - jyy)      # dominant gradient direction = across rows
    return np.mod(grad + np.pi / 2, np.pi)


def canonical_patches(residual: np.ndarray, lattice: np.ndarray, centres_yx, cfg: ClassifyConfig,
                      unit: float | None = None, step: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(N, P, P) patches in the rows' frame, D4-canonical, in lattice-corrugation units; and
    the row angle of each defect.

    ``step`` is the spacing of the patch grid in image pixels (and scales ``smooth`` and
    ``orient_window``, which are in patch pixels): with step = (patch pixel in nm) / (image
    pixel in nm), a patch covers the same nm on every scan, so a defect imaged at 0.2 nm/px
    gives the patch it gives at 0.1 nm/px."""
    c = np.asarray(centres_yx, np.float64).reshape(-1, 2)
    P = int(cfg.patch)
    if len(c) == 0:
        return np.zeros((0, P, P), np.float32), np.zeros(0)
    step = float(step)
    r = np.asarray(residual, np.float32)
    if cfg.smooth:
        r = ndi.gaussian_filter(r, cfg.smooth * step)
    if unit is None:
        unit = float(np.std(lattice)) or 1.0
    window = max(2, min(int(round(cfg.orient_window * step)), min(r.shape) // 2))   # bounded memory
    ang = row_angles(lattice, c, window)
    h = (P - 1) / 2.0
    u, v = np.meshgrid(np.arange(P) - h, np.arange(P) - h)       # u along rows (cols), v across
    u, v = u * step, v * step
    out = np.empty((len(c), P, P), np.float32)
    for i, ((y, x), a) in enumerate(zip(c, ang)):
        ca, sa = np.cos(a), np.sin(a)
        xs = x + u * ca - v * sa
        ys = y + u * sa + v * ca
        out[i] = ndi.map_coordinates(r, [ys, xs], order=1, mode="reflect")
    out /= unit
    # D2 canonical flips (a rotation by pi is both): first moments along u and v >= 0
    mu = (out * u).sum(axis=(1, 2))
    mv = (out * v).sum(axis=(1, 2))
    out[mu < 0] = out[mu < 0][:, :, ::-1]
    out[mv < 0] = out[mv < 0][:, ::-1, :]
    return out, ang


def _features(patches: np.ndarray) -> np.ndarray:
    """Flattened patch with a signed-sqrt compression of the amplitude (big clusters do not
    dominate the PCA)."""
    x = patches.reshape(len(patches), -1).astype(np.float64)
    return np.sign(x) * np.sqrt(np.abs(x))


def _flip_averaged(patches: np.ndarray) -> np.ndarray:
    """Each patch averaged over the four flips along and across the rows: the same for every
    pose of a defect (see "Split")."""
    return 0.25 * (patches + patches[:, :, ::-1] + patches[:, ::-1, :] + patches[:, ::-1, ::-1])


def _features_of(patches: np.ndarray, how: str) -> np.ndarray:
    """Features of ``patches`` by ``how``: "symmetric" (flip-averaged) or "canonical"; the
    classes' own (``features``) and a split's (``split_features``)."""
    if how not in FEATURES:
        raise StageError(f"the classes were fitted on unknown features {how!r} (a model from a newer "
                         f"release?); this one knows {FEATURES}")
    return _features(_flip_averaged(patches) if how == "symmetric" else patches)


def _pca_fit(X: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = X.mean(axis=0)
    _, _, Vt = np.linalg.svd(X - mean, full_matrices=False)
    comps = Vt[:n]
    Z = (X - mean) @ comps.T
    scale = Z.std(axis=0) + 1e-9
    return mean, comps, scale


def _project(pca: dict, X: np.ndarray) -> np.ndarray:
    """Features ``X`` (`_features_of` by the state's or the split's features) in the scaled principal
    components of ``pca`` (a state, or a split: ``pca_mean``, ``pca_components``, ``pca_scale``)."""
    return (X - pca["pca_mean"]) @ pca["pca_components"].T / pca["pca_scale"]


def _gmm(k: int, cfg: ClassifyConfig, seed: int):
    from sklearn.mixture import GaussianMixture  # fitting only: predicting needs no scikit-learn

    return GaussianMixture(k, covariance_type=cfg.covariance, n_init=int(cfg.n_init), random_state=seed,
                           reg_covar=1e-3, max_iter=300)


def _merge_map(post: np.ndarray, thr: float) -> np.ndarray:
    """Component -> class by union of pairs whose mean cross-posterior reaches ``thr``."""
    k = post.shape[1]
    hard = post.argmax(axis=1)
    parent = list(range(k))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(k):
        sel = hard == i
        if not sel.any():
            continue
        m = post[sel].mean(axis=0)
        for j in range(k):
            if j != i and m[j] >= thr:
                parent[find(i)] = find(j)
    roots = sorted({find(i) for i in range(k)})
    return np.array([roots.index(find(i)) for i in range(k)], np.int64)


def fit_classes(patches: np.ndarray, cfg: ClassifyConfig = ClassifyConfig(), seed: int = 0) -> dict:
    """Fit PCA + stable GMM classes on canonical training patches; returns a plain dict."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):   # small matrices: BLAS threads only oversubscribe the CPU
        return _fit_classes(patches, cfg, seed)


def _fit_classes(patches: np.ndarray, cfg: ClassifyConfig, seed: int) -> dict:
    from sklearn.metrics import adjusted_rand_score  # fitting only: predicting needs no scikit-learn

    rng = np.random.default_rng(seed)
    if len(patches) > cfg.max_samples:
        patches = patches[np.sort(rng.choice(len(patches), cfg.max_samples, replace=False))]
    X = _features_of(patches, cfg.features)
    n_pca = int(min(cfg.n_pca, X.shape[1], max(len(X) - 1, 1)))
    mean, comps, scale = _pca_fit(X, n_pca)
    state = {"features": cfg.features, "pca_mean": mean, "pca_components": comps, "pca_scale": scale}
    Z = _project(state, X)
    n = len(Z)
    table = []
    for k in range(cfg.k_range[0], cfg.k_range[1] + 1):
        if k * 5 > n:
            break
        g = _gmm(k, cfg, seed).fit(Z)
        bic = float(g.bic(Z))
        stab = []
        for b in range(cfg.n_boot):
            perm = rng.permutation(n)
            a_idx, b_idx = perm[: n // 2], perm[n // 2:]
            ga = _gmm(k, cfg, seed + 1 + 2 * b).fit(Z[a_idx])
            gb = _gmm(k, cfg, seed + 2 + 2 * b).fit(Z[b_idx])
            stab.append(adjusted_rand_score(ga.predict(Z), gb.predict(Z)))
        table.append({"k": k, "bic": bic, "stability": float(np.mean(stab))})
        table[-1]["_model"] = g
    stable = [t for t in table if t["stability"] >= cfg.stability_min]
    pick = min(stable, key=lambda t: t["bic"]) if stable else max(table, key=lambda t: t["stability"])
    g = pick["_model"]
    post = g.predict_proba(Z)
    cmap = _merge_map(post, cfg.merge_overlap)
    ll = g.score_samples(Z)
    n_base = int(cmap.max() + 1)
    nearest = _class_posteriors(post, cmap, n_base).argmax(axis=1)
    splits = _splits(X, patches, nearest, n_base, cfg, seed) if cfg.split_min else []
    state.update({
        "gmm": g, "component_class": cmap, "n_classes": n_base + len(splits), "n_base_classes": n_base,
        "splits": splits,
        "loglik_threshold": float(np.quantile(ll, cfg.unknown_quantile)) if cfg.unknown_quantile else -np.inf,
        # the training defects' log-likelihoods at every percentile: a new defect's typicality
        "loglik_quantiles": np.quantile(ll, np.linspace(0.0, 1.0, 101)),
        "k": int(pick["k"]),
        "selection": [{k: v for k, v in t.items() if k != "_model"} for t in table],
    })
    return state


def _class_posteriors(post: np.ndarray, cmap: np.ndarray, n_classes: int) -> np.ndarray:
    """Component posteriors (N, k) -> class posteriors (N, n_classes) by `component_class`."""
    cp = np.zeros((len(post), n_classes))
    for comp, cls in enumerate(cmap):
        cp[:, cls] += post[:, comp]
    return cp


def _splits(X: np.ndarray, patches: np.ndarray, nearest: np.ndarray, n_classes: int, cfg: ClassifyConfig,
            seed: int) -> list[dict]:
    """The classes to split in two (see "Split" in the module's docstring): per class split, its
    id, its own PCA and the two-component mixture; the second part becomes class
    ``n_classes + j`` for the j-th split. ``X``: the classes' features of ``patches`` (``features``),
    replaced by those the split looks at (``split_features``) where the two differ."""
    out = []
    how = cfg.split_features
    if how != cfg.features:
        X = _features_of(patches, how)
    for c in range(n_classes):
        sel = nearest == c
        n = int(sel.sum())
        if n < max(int(cfg.split_min), 10):
            continue
        mean, comps, scale = _pca_fit(X[sel], int(min(cfg.n_pca, X.shape[1], n - 1)))
        split = {"class": c, "features": how, "pca_mean": mean, "pca_components": comps, "pca_scale": scale}
        Z = _project(split, X[sel])
        one, two = _gmm(1, cfg, seed).fit(Z), _gmm(2, cfg, seed).fit(Z)
        if two.bic(Z) >= one.bic(Z) or two.weights_.min() < cfg.split_min_share:
            continue
        post = two.predict_proba(Z)
        hard = post.argmax(axis=1)
        overlap = max(post[hard == i, 1 - i].mean() if (hard == i).any() else 1.0 for i in (0, 1))
        if how == "symmetric":          # flipped patches have the same features: never poses
            if overlap < min(cfg.split_max_overlap, cfg.merge_overlap):
                out.append({**split, "gmm": two})
            continue
        if overlap >= cfg.merge_overlap:
            continue
        p = patches[sel]
        moved = max(float(np.mean(two.predict(_project(split, _features(f))) != hard))
                    for f in (p[:, :, ::-1], p[:, ::-1, :], p[:, ::-1, ::-1]))
        if moved > cfg.split_max_flip:
            continue          # the parts are poses of one kind
        out.append({**split, "gmm": two})
    return out


def predict_classes(state: dict, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class per patch, -1 for unknown; probability of the most probable class)."""
    got = classify_patches(state, patches)
    return got["label"], got["nearest_probability"]


def classify_patches(state: dict, patches: np.ndarray) -> dict[str, np.ndarray]:
    """Per patch: ``label`` (class, -1 for unknown), ``nearest`` (the most probable class, also
    for unknown ones), ``nearest_probability`` (its posterior among the classes) and
    ``typicality`` (the fraction of the training defects that the model finds less likely than
    this one: ~0 far from every class, 0.5 a median defect; NaN for a state fitted before it was
    recorded). A defect is unknown when its typicality is under the fitted ``unknown_quantile``,
    so for unknown defects the typicality, not a class posterior, is the number that means
    something."""
    n = len(patches)
    if n == 0:
        return {"label": np.zeros(0, np.int64), "nearest": np.zeros(0, np.int64),
                "nearest_probability": np.zeros(0), "typicality": np.zeros(0)}
    main = state.get("features", "canonical")     # a state fitted before "features": canonical
    X = _features_of(patches, main)
    Z = _project(state, X)
    g = state["gmm"]      # a fitted scikit-learn mixture, or as `io.safe_models` loads one
    post = mixture.predict_proba(g, Z)
    cp = _class_posteriors(post, state["component_class"], int(state.get("n_base_classes", state["n_classes"])))
    nearest = cp.argmax(axis=1)
    prob = cp[np.arange(len(Z)), nearest]
    splits = state.get("splits") or []
    by_how = {main: X}
    for j, sp in enumerate(splits):        # a split class's second part is a class of its own
        sel = np.flatnonzero(nearest == sp["class"])
        if len(sel):
            how = sp.get("features", "canonical")     # a split fitted before "features": canonical
            if how not in by_how:
                by_how[how] = _features_of(patches, how)
            sub = mixture.predict_proba(sp["gmm"], _project(sp, by_how[how][sel]))
            part = sub.argmax(axis=1)
            nearest[sel[part == 1]] = int(state["n_base_classes"]) + j
            prob[sel] *= sub[np.arange(len(sel)), part]
    ll = mixture.score_samples(g, Z)
    unknown = ll < state["loglik_threshold"]
    q = state.get("loglik_quantiles")
    typ = (np.interp(ll, np.asarray(q, np.float64), np.linspace(0.0, 1.0, len(q)))
           if q is not None else np.full(n, np.nan))
    return {"label": np.where(unknown, UNKNOWN, nearest).astype(np.int64),
            "nearest": nearest.astype(np.int64), "nearest_probability": prob, "typicality": typ}
