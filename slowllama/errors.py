"""The one error a user sees: a checkpoint, store, file or argument that cannot be used, named in one line."""


class ConfigError(ValueError):
    """A checkpoint, store or argument that cannot be used; the message names it."""
