"""The project's user-facing errors: each message is one line naming the problem and the fix."""


class MmfmError(RuntimeError):
    """Base of all errors the CLI reports as a single line (exit code 2) instead of a traceback."""


class ConfigError(MmfmError, ValueError):
    """A config value that cannot work; the message names the field and the fix."""
