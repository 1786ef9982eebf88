"""The default method: steps and terraces, lattice-residual detection, stable classes."""
