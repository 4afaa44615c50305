"""Errors shared by every layer (a leaf module: config, plugins and the engine all import it).

A ``UserError`` is a mistake the user can fix (a setting, a path, a dataset, a run folder, a
checkpoint of another setup): its message names the thing and says what to do, in one line, and
``dsvit`` prints it as ``dsvit: error: <message>`` with exit status 2. Anything else is a bug and
keeps its traceback. Each kind also derives from the built-in exception the site raised before,
so ``except FileNotFoundError`` / ``except RuntimeError`` callers keep working.
"""


class UserError(Exception):
    """A mistake the user can fix; the message says what and how, in one line."""


class ConfigError(UserError, ValueError):
    """A configuration mistake; the message says which key and what to do."""


class DataError(UserError, RuntimeError):
    """The dataset on disk disagrees with itself or the run (a damaged or rewritten shard, a label
    out of range); the message names the file and how to rewrite or check it."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user points at (data.root, a shard, a run's checkpoint) is not there."""


class RunStateError(UserError, RuntimeError):
    """A run folder, checkpoint or benchmark folder this command cannot use as it is: made by
    another setup or run, or damaged; the message says which to use instead."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` as one line. An exception raised in a DataLoader worker comes back
    re-raised by torch with the same type but the worker's whole traceback as its message
    (``Caught X in DataLoader worker process 0.\\nOriginal Traceback ...\\nmodule.X: message``):
    the original message is what follows the last ``module.X: ``."""
    text = str(error)
    cls = type(error)
    for prefix in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        if "Original Traceback" in text and prefix in text:
            text = text[text.rindex(prefix) + len(prefix):]
            break
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())
