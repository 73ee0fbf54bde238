"""User-facing errors: one clear line, no traceback needed."""


class XDiTError(Exception):
    """Bad input or configuration. The message is shown to the user as is."""


class WeightsError(XDiTError):
    """Missing, unreadable or incompatible weights."""


class ConfigError(XDiTError):
    """Invalid parallel or sampling configuration."""


class Cancelled(Exception):
    """The job was cancelled; raised on every rank at the same step boundary."""
