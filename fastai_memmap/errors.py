"""Exception hierarchy of fastai_memmap.

Every error raised on bad input derives from :class:`MemmapError` *and* from the builtin
that a caller would naturally catch (``FileNotFoundError``, ``ValueError``, ``IndexError``...),
so ``except ValueError`` keeps working for code that does not know this package.

Messages follow one pattern: *what* (the file or argument), *expected*, *found*, and the
likely fix, e.g.::

    /data/x/shard-000000.npy: expected 4096000 data bytes for 1000 rows of (1024,) float32,
    found 2048000; file truncated (writer not closed?)
"""

__all__ = [
    "MemmapError", "StoreNotFoundError", "StoreExistsError", "WriterConflictError",
    "FormatError", "TruncatedStoreError", "ShardMismatchError", "UnsafePathError",
    "UnsupportedDtypeError", "ChecksumError", "RowIndexError", "RowIndexTypeError",
    "ItemShapeError", "StoreWriteError", "StoreChangedError", "MemoryBudgetError", "LabelError",
    "FastaiCompatError", "OffsetsError", "SparseIndexError", "TokenIdError", "ImageReadError", "SharedMemoryError",
    "TabularError", "ColumnNotFoundError", "ColumnTypeError", "ColumnValueError", "SourceNotFoundError",
    "ArgumentError", "ArgumentTypeError", "WriterStateError", "LossyCastError", "NotAStoreError", "OverlapError",
    "StoreIOError", "UnverifiedStoreError", "CheckpointMismatchError", "CheckpointFormatError",
    "UnsupportedTransformError",
]


class MemmapError(Exception):
    "Base class of every error raised by fastai_memmap."


class StoreNotFoundError(MemmapError, FileNotFoundError):
    "A store, its manifest or one of its shards does not exist."


class StoreExistsError(MemmapError, FileExistsError):
    "A writer was pointed at an existing store without `overwrite=True`."


class WriterConflictError(MemmapError, FileExistsError):
    "Another writer (process or thread) is writing the same target right now."


class FormatError(MemmapError, ValueError):
    "A manifest or `.npy` header is malformed, of an unknown version, or disagrees with its data."


class OffsetsError(FormatError):
    "A ragged or sparse shard's offsets do not start at 0, decrease, or do not end at the data length."


class SparseIndexError(FormatError):
    "A sparse store holds a column index outside ``[0, size)``."


class TruncatedStoreError(FormatError):
    "A shard file is shorter or longer than its header says (crash while writing? disk full?)."


class ShardMismatchError(FormatError):
    "Shards of one store disagree on dtype or item shape, or a shard disagrees with the manifest."


class UnsafePathError(MemmapError, ValueError):
    "A shard name escapes the store directory (absolute, `..`, symlink out of the store)."


class UnsupportedDtypeError(MemmapError, TypeError):
    "A dtype that cannot be memory-mapped safely (object, structured/void, non-native layout...)."


class ChecksumError(MemmapError, ValueError):
    "A shard's content does not match the checksum recorded when it was written."


class RowIndexError(MemmapError, IndexError):
    "A row index is out of range for the store."


class RowIndexTypeError(MemmapError, TypeError):
    "A row index is not an integer (or integer array, slice)."


class ItemShapeError(MemmapError, ValueError):
    "A batch or item passed to a writer or item list does not have the expected shape or dtype."


class StoreWriteError(MemmapError, OSError):
    "Writing a store failed at the OS level (disk full, file too large, I/O error); nothing was committed."


class StoreChangedError(MemmapError, OSError):
    "A store's file changed size while it was open (replaced or truncated by another process)."


class MemoryBudgetError(MemmapError, MemoryError):
    "Loading data into RAM would exceed the memory available."


class LabelError(MemmapError, ValueError):
    "Labels do not fit the task: class codes out of range, wrong label shape or dtype for classification."


class FastaiCompatError(MemmapError, ImportError):
    "fastai cannot be imported or is not the version (1.0.61) the compatibility fixes were written for."


class TokenIdError(MemmapError, ValueError):
    "A token id read from a store is outside the vocabulary (``0 <= id < len(vocab.itos)``)."


class TabularError(MemmapError, ValueError):
    "Bad arguments for a tabular store: procs, split, column lists, or a list that is not split."


class ColumnNotFoundError(MemmapError, KeyError):
    "A column named in `cat_names`, `cont_names`, `y_names` or `valid_col` is missing (chunk or row)."

    def __str__(self) -> str:   # KeyError would print the message with quotes
        return str(self.args[0]) if self.args else ""


class ColumnTypeError(MemmapError, TypeError):
    "A column holds values of the wrong type (text in a continuous column, text and numbers mixed...)."


class ColumnValueError(MemmapError, ValueError):
    "A value cannot be processed: a missing value where training had none, an all-missing column..."


class SourceNotFoundError(MemmapError, FileNotFoundError):
    "A CSV or JSON-lines source file does not exist."


class ImageReadError(MemmapError, OSError):
    "An image file cannot be opened or decoded (missing, truncated, not an image)."


class SharedMemoryError(MemmapError, OSError):
    "No room for a shared buffer (in ``/dev/shm`` nor in the temporary directory), or it cannot be mapped."


class ArgumentError(MemmapError, ValueError):
    "An argument is out of its range or an unsupported combination (``bs=0``, ``size=0``, ``rank >= num_replicas``...)."


class ArgumentTypeError(MemmapError, TypeError):
    "An argument is of the wrong type (a string where a number is expected, a list where an array is...)."


class WriterStateError(MemmapError, RuntimeError):
    "A writer was used in the wrong state: `append` after `close` or `abort`, `close` on a writer never opened."


class LossyCastError(ItemShapeError):
    """Appending would change values: integers out of the store dtype's range, a float with a fractional
    part into an integer store, complex into real, NaN into integers, finite floats that overflow to inf."""


class NotAStoreError(StoreExistsError):
    """``overwrite=True`` was given but the target is not a store (a regular file, or a directory without a
    valid manifest): it is never deleted; move it away or pick another path."""


class OverlapError(MemmapError, ValueError):
    "A converter's output path is, contains or lies inside one of its inputs: writing there could destroy them."


class StoreIOError(MemmapError, OSError):
    """An OS error at the file boundary (symlink loop, name too long, read-only filesystem, permission
    denied), wrapped with the path and its likely cause. `errno` is the original one."""


class UnverifiedStoreError(ChecksumError):
    "`verify` was asked to prove a store's content, but one or more shards carry no checksum to check."


class CheckpointMismatchError(MemmapError, ValueError):
    """A training checkpoint belongs to another run (other schedule, data, model shape or optimizer):
    resuming from it would not continue this run. The message names what differs."""


class CheckpointFormatError(FormatError):
    "A training checkpoint file is not one `fastai_memmap.Checkpoint` wrote, or is of an unknown version."


class UnsupportedTransformError(MemmapError, ValueError):
    """A transform given as ``batch_tfms=`` that the batch path cannot apply (named in the message), or an
    order or probability that would give items of one batch different sizes: use per-item ``.transform()``."""
