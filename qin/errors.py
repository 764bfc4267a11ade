"""Errors several modules raise, in a module that imports nothing of qin (so imports point one way)."""


class ConfigError(ValueError):
    """A setting is unknown or has a bad value; the message names it."""


class StoppedBySignal(KeyboardInterrupt):
    """A stop signal turned into an exception where it arrived (a KeyboardInterrupt, so no `except
    Exception` on the way swallows it). `signum` sets how `qin` leaves (qin.cli.console_main);
    `reported`: its one line is said already."""

    def __init__(self, message: str, signum: int, reported: bool = False):
        super().__init__(message)
        self.signum, self.reported = signum, reported
