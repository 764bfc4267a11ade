"""Errors several modules raise, in a module that imports nothing of qin (so imports point one way)."""


class ConfigError(ValueError):
    """A setting is unknown or has a bad value; the message names it."""
