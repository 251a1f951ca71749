"""The trainer's configuration error (its own module so that the option helpers ``aliases`` and
``prompting`` raise it without importing ``config``, which imports them)."""

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """An invalid configuration value (the message names the option and value)."""
