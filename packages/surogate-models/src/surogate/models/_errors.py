"""The one exception of surogate.models: bad model folders, unsupported configs, bad user options."""


class ModelError(Exception):
    """A model folder, config or option we cannot use. The message names the file/key and the fix."""
