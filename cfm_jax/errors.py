"""The one exception type for bad user input: the CLI prints its message on one line and exits 2."""


class UserError(ValueError):
    """Bad input from the user (config value, key, path, experiment file). Message = one line."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient stopped training; the last good checkpoint is kept."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """'ExceptionType: first line of its message', at most `limit` characters: how a caught error is
    named inside a one-line message or warning."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:limit]
