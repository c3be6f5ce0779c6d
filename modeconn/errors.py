"""Errors that mean "the input is wrong": the CLIs print them as one line and exit non-zero."""


class ModeconnError(Exception):
    """Bad input a user can fix: the message names the file, key or shape at fault."""


class ConfigError(ModeconnError):
    pass


class DataError(ModeconnError):
    pass


class CheckpointError(ModeconnError):
    pass
