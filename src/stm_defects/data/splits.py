"""Splitting scans (never patches) into train/test/predict."""

from __future__ import annotations

import numpy as np

from stm_defects.errors import StageError


def split_scans(names: list[str], fractions, seed: int) -> dict[str, list[str]]:
    """Seeded split by scan into train/test/predict (each list sorted).

    `fractions` are (train, test, predict); test gets round(f_test * n) scans, predict at least one
    when there are 3 scans or more, train the rest. Fewer than one training scan is an error.
    """
    rng = np.random.default_rng(seed)
    order = [names[i] for i in rng.permutation(len(names))]
    n = len(order)
    n_test = int(round(fractions[1] * n))
    n_predict = max(1, int(round(fractions[2] * n))) if n >= 3 else 0
    n_train = n - n_test - n_predict
    if n_train < 1:
        raise StageError(f"{n} scans are too few to split into train/test/predict")
    return {"train": sorted(order[:n_train]),
            "test": sorted(order[n_train:n_train + n_test]),
            "predict": sorted(order[n_train + n_test:])}
