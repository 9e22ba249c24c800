"""Every error ltbench raises on purpose, in one module without heavy imports, so that the CLI and
the workflow catch them by type. Each message names the offending key, file or value."""

from __future__ import annotations


class LtbenchError(Exception):
    """Base of ltbench's own errors."""


class ConfigError(LtbenchError, ValueError):
    """A config, a recipe or a command-line value is invalid; the message names the key and value."""


class DownloadError(LtbenchError, RuntimeError):
    """A download failed or its checksum does not match."""


class ListCheckError(LtbenchError, ValueError):
    """An image list does not match what the config expects (counts, labels, missing files)."""


class ReferenceFileError(LtbenchError, ValueError):
    """A reference file is malformed; the message names the file, the entry and the key."""


class Preempted(LtbenchError):
    """SIGTERM/SIGUSR1 arrived; a checkpoint was written and the run can be resumed."""


class CellBusy(LtbenchError, RuntimeError):
    """Another process is training the same cell directory (it holds the cell lock)."""


class DataFileError(LtbenchError, ValueError):
    """A prepared data file is unreadable or does not match its cell (shapes, classes, counts)."""


# What the CLI ends with one line (``ltbench <subcommand>: error: ...``) instead of a traceback: ltbench's own
# errors, raised at the boundary where user input is read, and the library errors that name what they miss.
USER_ERRORS: tuple[type[BaseException], ...] = (LtbenchError, KeyError, FileNotFoundError, FloatingPointError)
