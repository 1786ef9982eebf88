"""Neural network models (`autoencoder`, `training`, `dense`, `distributed`) and the clusterers
(`cluster`).

The autoencoder names below are imported from `models.autoencoder` on first use, so importing
a module of this package that needs no torch (`models.cluster`) does not import torch.
"""

import importlib

__all__ = [
    "CHECKPOINT_VERSION",
    "AEConfig",
    "ConvAutoencoder",
    "SeededDropout",
    "build_autoencoder",
    "count_parameters",
    "keras_parameter_count",
    "load_checkpoint",
    "save_checkpoint",
    "set_dropout_generator",
]


def __getattr__(name: str):
    if name == "AEConfig":          # a plain dataclass: no torch needed
        return importlib.import_module(".configs", __name__).AEConfig
    if name in __all__:
        return getattr(importlib.import_module(".autoencoder", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
