"""The one exception type for bad user input: the CLI prints its message on one line and exits 2."""


class UserError(ValueError):
    """Bad input from the user (config value, key, path, experiment file). Message = one line."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient stopped training; the last good checkpoint is kept."""
