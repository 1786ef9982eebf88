"""One module per family of DVC stages; each stage is fn(params, deps, outs, tracker, progress)."""
