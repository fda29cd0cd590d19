"""Errors the entry points report as one ``error:`` line (exit status 2)."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""
