"""Errors a user sees when a checkpoint cannot be served."""


class CheckpointError(Exception):
    """The checkpoint at the given path cannot be loaded; the message says why."""
