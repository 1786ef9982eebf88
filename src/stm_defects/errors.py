"""Errors a user can fix. The CLI turns each into one line on stderr and exit code 1."""


class ConfigError(ValueError):
    """A bad params file or stored config: unknown key, wrong type, unknown profile."""


class StageError(RuntimeError):
    """A stage or command cannot go on (e.g. too few valid scans, no project found)."""
