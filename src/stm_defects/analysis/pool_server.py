"""Where `stm predict --workers N`'s worker processes come from: a fork server, started once the
command knows it has more than one scan, that imports what a worker needs while the command
itself imports and loads the models.

Importing the scientific stack takes several seconds (scikit-learn, scikit-image, scipy). A
spawned worker pays it again, after the command has paid it; a worker forked from this server
inherits the imports and starts in milliseconds. Torch is not among them: the default method
never uses it, and with the `paper` method each worker imports it itself when it first builds
the autoencoders (about 2 s, once per worker). The server is a fresh interpreter
that has run nothing but those imports (no thread pool of torch or OpenMP has started, so none
is lost in a fork). This module imports nothing but the standard library, so starting the server
costs the command nothing.

Caveats: workers get the environment the server started with (a variable set later in the same
process does not reach them); the preload applies only if this is the first fork server of the
process (`run_pool` and `stm predict` start it through `start_pool_server`); a module of
`WORKER_MODULES` that raises ImportError is skipped by the server (a worker then imports it
itself).
"""

from __future__ import annotations

import multiprocessing

__all__ = ["WORKER_MODULES", "pool_start_method", "start_pool_server"]

#: What a pool worker imports; the fork server imports it once, before any worker starts.
WORKER_MODULES = ("stm_defects.analysis.batch", "stm_defects.analysis.predict", "stm_defects.analysis.render")


def pool_start_method() -> str:
    """``forkserver`` where the platform has it (Linux, macOS), else ``spawn``."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def start_pool_server() -> None:
    """Start the fork server now, importing `WORKER_MODULES`, and return at once: call it as early
    as possible. A no-op where workers are spawned, or when the server already runs. It holds
    the imports' memory (about 0.4 GB) until the command ends."""
    if pool_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(WORKER_MODULES))
    forkserver.ensure_running()
