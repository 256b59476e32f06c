"""Errors every layer may raise; the lowest module of fastenc (it imports nothing from it)."""


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and what to do."""
