"""Shared memory that crosses process boundaries as a file name, never as data: `SharedBuffer`.

A `SharedBuffer` is a file in a RAM-backed filesystem (``/dev/shm``) mapped with ``MAP_SHARED``.
Every process that maps it reads the same physical pages:

- after ``fork`` (DataLoader workers, the default on Linux) the child inherits the parent's map;
- a pickled buffer is its file name and size (about 100 bytes, whatever the size of the buffer); it
  unpickles (``spawn``/``forkserver`` workers) by mapping the file again, read-only.

Why a file rather than ``multiprocessing.shared_memory``: Python 3.11 registers a
``SharedMemory`` with the resource tracker in *every* process that attaches to it, and the tracker
unlinks it when that process exits, under the feet of the others (CPython issue 82300). A plain file
has one owner, the creating process, which unlinks it on `close` or at exit; attachers never do.

Space is reserved at creation with ``posix_fallocate``: a sparse file on a full tmpfs would kill the
process with ``SIGBUS`` on first write. ``/dev/shm`` is used only if it keeps ``SHM_RESERVE`` bytes free
afterwards (torch's DataLoader moves every batch through ``/dev/shm``; containers often mount only
64 MB there); otherwise the buffer is a file in ``tempfile.gettempdir()``, which works the same way but
lets the kernel write dirty pages back to disk, with a warning that says how to enlarge ``/dev/shm``.

File names are ``fastai_memmap-<pid>-<random>``: a buffer left behind by a process that was killed
(``SIGKILL`` skips every cleanup) is removed by the next `SharedBuffer.create` in the same directory
once its owner pid is gone.
"""
import errno
import mmap
import os
import tempfile
import uuid
import warnings
import weakref
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import numpy as np

from ..errors import ArgumentError, ArgumentTypeError, SharedMemoryError

__all__ = ["SharedBuffer", "SharedMemoryError", "SHM_DIR", "SHM_RESERVE", "FILE_PREFIX", "choose_dir", "free_bytes"]

SHM_DIR = "/dev/shm"
SHM_RESERVE = 256 << 20     # bytes of /dev/shm left free for torch's DataLoader batches (shared through it)
FILE_PREFIX = "fastai_memmap-"   # + "<owner pid>-<hex>": leftovers of dead owners are recognisable


def free_bytes(directory: Union[str, Path]) -> int:
    "Bytes an unprivileged process can still write in the filesystem of `directory` (``statvfs``), 0 if absent."
    try:
        st = os.statvfs(directory)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _fmt(n: int) -> str:
    return f"{n / 2 ** 20:,.1f} MiB"


def choose_dir(nbytes: int, directory: Optional[Union[str, Path]] = None) -> Path:
    """Directory for a new buffer of `nbytes`: `directory` if given, else ``/dev/shm`` or the temp dir.

    ``/dev/shm`` is chosen when it keeps `SHM_RESERVE` bytes free after the buffer; otherwise
    ``tempfile.gettempdir()`` with a ``UserWarning``. Raises `SharedMemoryError` if the chosen
    directory has no room, with the sizes and how to fix it.
    """
    if directory is not None:
        d = Path(directory)
        if free_bytes(d) < nbytes:
            raise SharedMemoryError(errno.ENOSPC, f"{d}: a shared buffer needs {_fmt(nbytes)}, found {_fmt(free_bytes(d))} "
                                    "free; pass another buffer_dir or free space")
        return d
    shm_free = free_bytes(SHM_DIR)
    if shm_free - nbytes >= SHM_RESERVE:
        return Path(SHM_DIR)
    tmp = Path(tempfile.gettempdir())
    if free_bytes(tmp) >= nbytes:
        warnings.warn(f"{SHM_DIR} has {_fmt(shm_free)} free, a shared buffer of {_fmt(nbytes)} needs {_fmt(nbytes + SHM_RESERVE)} "
                      f"(with {_fmt(SHM_RESERVE)} kept free for DataLoader batches): using a file-backed map in {tmp} "
                      "instead (same sharing, but the kernel may write its pages to disk). To keep it in RAM, enlarge "
                      "/dev/shm (docker run --shm-size=8g, or mount -o remount,size=8G /dev/shm) or pass buffer_dir=")
        return tmp
    raise SharedMemoryError(errno.ENOSPC, f"a shared buffer of {_fmt(nbytes)} fits neither in {SHM_DIR} ({_fmt(shm_free)} free) "
                            f"nor in {tmp} ({_fmt(free_bytes(tmp))} free); enlarge /dev/shm (docker run --shm-size=...), "
                            "set TMPDIR to a larger filesystem, or load fewer/smaller images (size=)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, owned by someone else
        return True
    return True


def _clean_stale(directory: Path) -> None:
    "Remove buffers of this user whose owner process is gone (killed before it could unlink them)."
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    uid = os.getuid()
    for e in entries:
        if not e.name.startswith(FILE_PREFIX):
            continue
        try:
            pid = int(e.name[len(FILE_PREFIX):].split("-", 1)[0])
            if e.stat(follow_symlinks=False).st_uid == uid and not _pid_alive(pid):
                os.unlink(e.path)
        except (ValueError, OSError):
            continue


def _unlink_if_owner(path: str, owner: int) -> None:
    if os.getpid() == owner:   # a forked child inherits the finalizer: it must never unlink
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class SharedBuffer:
    """`nbytes` bytes of memory shared between processes through a mapped file (see module docstring).

    Create with `SharedBuffer.create` (the owner: it unlinks the file on `close`, when garbage
    collected, or at exit) or `SharedBuffer.attach` (maps an existing file; never unlinks it).
    `view` returns NumPy arrays over the map: views, not copies, read-only unless the buffer was
    created or attached writable. Pickles as ``(path, nbytes)``; unpickling attaches read-only, or
    yields a closed buffer (with a warning) if the file is gone.
    """

    def __init__(self, path: Path, nbytes: int, mm: Optional[mmap.mmap], writable: bool, owner: Optional[int]):
        self.path, self.nbytes, self.writable, self.owner = Path(path), int(nbytes), writable, owner
        self._mm = mm
        self._finalizer = (weakref.finalize(self, _unlink_if_owner, str(path), owner) if owner is not None else None)

    # ---------------------------------------------------------------- creation
    @classmethod
    def create(cls, nbytes: int, directory: Optional[Union[str, Path]] = None) -> "SharedBuffer":
        """Create a zero-filled buffer of `nbytes` (see `choose_dir` for where) and map it read-write.

        Raises `SharedMemoryError` when there is no room (with the sizes and the fix).
        """
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)):
            raise ArgumentTypeError(f"SharedBuffer.create: expected nbytes as an int, found {type(nbytes).__name__} {nbytes!r:.50}")
        if nbytes < 0:
            raise ArgumentError(f"SharedBuffer.create: expected nbytes >= 0, found {nbytes}")
        d = choose_dir(nbytes, directory)
        _clean_stale(d)
        path = d / f"{FILE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        size = max(int(nbytes), 1)   # mmap refuses length 0
        fd = _open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, "create")
        try:
            _reserve(fd, size, path)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(path, nbytes, mm, writable=True, owner=os.getpid())

    @classmethod
    def attach(cls, path: Union[str, Path], nbytes: int, writable: bool = False) -> "SharedBuffer":
        """Map the existing buffer file `path` (of at least `nbytes` bytes); read-only unless `writable`.

        Raises ``FileNotFoundError`` if the file is gone (its owner closed it or exited),
        `SharedMemoryError` if it is shorter than `nbytes`.
        """
        fd = _open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW, "attach")
        try:
            found = os.fstat(fd).st_size
            if found < max(nbytes, 1):
                raise SharedMemoryError(errno.EINVAL, f"{path}: expected a shared buffer of {nbytes} bytes, found {found}; "
                                        "file replaced or truncated?")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(fd, max(nbytes, 1), mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        return cls(path, nbytes, mm, writable=writable, owner=None)

    # ---------------------------------------------------------------- state
    @property
    def closed(self) -> bool:
        "True once `close` was called (or the file was gone when unpickled)."
        return self._mm is None

    @property
    def in_ram(self) -> bool:
        "True if the file lives in ``/dev/shm`` (pages never written to disk)."
        return str(self.path).startswith(SHM_DIR + "/")

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("owner" if self.owner == os.getpid() else "attached")
        return f"SharedBuffer({str(self.path)!r}, {self.nbytes} bytes, {state})"

    def view(self, dtype: Any, offset: int, shape: Tuple[int, ...]) -> np.ndarray:
        """A NumPy view of `shape` and `dtype` starting at byte `offset` (no copy).

        Read-only unless the buffer is writable. Raises ``ArgumentError`` (a ``ValueError``) if it does
        not fit, ``SharedMemoryError`` (``EBADF``) if the buffer is closed.
        """
        if self._mm is None:
            raise SharedMemoryError(errno.EBADF, f"{self.path}: expected an open shared buffer, found it closed "
                                    "(purged, or its owner process freed it); load the data again")
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if offset < 0 or (count and offset + count * dt.itemsize > self.nbytes):
            raise ArgumentError(f"{self.path}: expected a view within the buffer of {self.nbytes} bytes, found "
                                f"{count} x {dt} at byte {offset}")
        a = np.frombuffer(self._mm, dtype=dt, count=count, offset=offset).reshape(shape)
        if not self.writable:
            a.flags.writeable = False
        return a

    def close(self) -> None:
        """Unmap the buffer and, in the owner process, unlink its file (the memory is freed once no
        other process maps it). Views still referenced elsewhere keep the map alive until collected.
        Safe to call twice."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:   # a view is still alive: the map goes when it is garbage collected
                pass
        if self._finalizer is not None:
            self._finalizer()

    # ---------------------------------------------------------------- pickling
    def __reduce__(self):
        return (_reattach, (str(self.path), self.nbytes, self.closed))


def _reserve(fd: int, size: int, path: Path) -> None:
    "Allocate `size` bytes of `fd` now, so that a full filesystem fails here and not with SIGBUS later."
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise SharedMemoryError(errno.ENOSPC, f"{path}: no room for a shared buffer of {_fmt(size)} "
                                    f"({_fmt(free_bytes(path.parent))} free); enlarge the filesystem or pass buffer_dir=") from None
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise SharedMemoryError(e.errno, f"{path}: cannot reserve {_fmt(size)} for a shared buffer ({e.strerror})") from None
        os.ftruncate(fd, size)   # filesystem without fallocate: sparse file


def _open(path: Path, flags: int, doing: str) -> int:
    """``os.open`` of a buffer file; OS errors other than a missing file (``FileNotFoundError``, which
    `_reattach` expects) as `SharedMemoryError` naming the path (a symlink is refused: ``O_NOFOLLOW``)."""
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:
        raise
    except OSError as e:
        cause = "a symlink (refused)" if e.errno == errno.ELOOP else e.strerror
        raise SharedMemoryError(e.errno, f"{path}: cannot {doing} a shared buffer file: {cause}") from None


def _reattach(path: str, nbytes: int, closed: bool) -> SharedBuffer:
    if not closed:
        try:
            return SharedBuffer.attach(path, nbytes)
        except FileNotFoundError:
            warnings.warn(f"{path}: shared buffer no longer exists (its owner process closed it or exited); "
                          "items are read from their source instead")
    return SharedBuffer(Path(path), nbytes, None, writable=False, owner=None)
