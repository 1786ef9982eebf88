"""Neural network models."""

from .autoencoder import (
    CHECKPOINT_VERSION,
    AEConfig,
    ConvAutoencoder,
    SeededDropout,
    build_autoencoder,
    count_parameters,
    keras_parameter_count,
    load_checkpoint,
    save_checkpoint,
    set_dropout_generator,
)

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
