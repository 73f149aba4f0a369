"""Errors a user can cause. The CLI prints their message, without a traceback."""


class ExpertyardError(Exception):
    """Base class of every error that is the user's to fix (bad input, bad checkpoint, bad flags)."""


class ConfigError(ExpertyardError, ValueError):
    """A configuration value is invalid; the message names the value."""


class CheckpointError(ExpertyardError):
    """A checkpoint directory is incomplete or does not match its config; the message names file and tensor."""


class UnsupportedArchitectureError(ExpertyardError):
    pass


class RequestError(ExpertyardError, ValueError):
    """A generation request is invalid (prompt too long, bad sampling parameters, ...)."""


class DeploymentDownError(ExpertyardError, RuntimeError):
    """A rank of a distributed deployment died or stopped answering within the timeout; the message names the
    rank that noticed and what it was waiting for."""
