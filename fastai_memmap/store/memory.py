"""How much memory this process may fill with page cache: the number that decides whether a store is
"larger than RAM" (numpy-free, standard library and psutil only).

A store larger than this budget cannot stay in the page cache for an epoch, so its reads go to the
disk and the read strategy matters (see `fastai_memmap.data.sampling`). The budget is the smaller of

- ``MemAvailable`` of the machine (psutil's ``virtual_memory().available``: free memory plus the
  page cache the kernel can reclaim), and
- the memory cgroup limit of this process minus the memory its processes hold for themselves:
  anonymous memory and mapped files, their own code (``total_rss`` + ``total_mapped_file`` in cgroup
  v1's ``memory.stat``, ``anon`` + ``file_mapped`` in v2's; torch's libraries alone map hundreds of
  MB). Page cache counts against the limit, so a container of 2 GB on a 256 GB machine holds at most
  ~2 GB of a store, whatever ``MemAvailable`` says.
"""
import os
from pathlib import Path
from typing import Dict, Optional

__all__ = ["memory_budget", "cgroup_room", "CGROUP_ROOT"]

CGROUP_ROOT = Path("/sys/fs/cgroup")   # where cgroup v1 controllers (memory/...) or the v2 hierarchy are mounted
UNLIMITED = 1 << 60                    # cgroup v1 writes ~2**63 for "no limit"; anything above this is none


def _read(p: Path) -> Optional[str]:
    try:
        return p.read_text()
    except OSError:
        return None


def _stat(text: Optional[str]) -> Dict[str, int]:
    out = {}
    for line in (text or "").splitlines():
        k, _, v = line.partition(" ")
        if v.strip().isdigit():
            out[k] = int(v)
    return out


def _sum(*parts: Optional[int]) -> Optional[int]:
    found = [p for p in parts if p is not None]
    return sum(found) if found else None


def _cgroup_dirs(root: Path, proc_cgroup: str):
    "``(version, directory)`` of this process's memory cgroup, from ``/proc/self/cgroup`` text."
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if "memory" in controllers.split(","):
            yield 1, root / "memory" / rel
        elif controllers == "":
            yield 2, root / rel


def cgroup_room(root: Path = CGROUP_ROOT, proc_cgroup: Optional[str] = None) -> Optional[int]:
    """Bytes of page cache this process's memory cgroup can hold: its limit minus its anonymous memory
    and mapped files (see the module).

    Looks at the process's own cgroup and every parent up to the root (the tightest limit wins).
    Returns None where there is no cgroup limit or it cannot be read (not Linux, no permission).
    Units: bytes. Never raises.
    """
    text = proc_cgroup if proc_cgroup is not None else _read(Path("/proc/self/cgroup"))
    if not text:
        return None
    best = None
    for version, d in _cgroup_dirs(Path(root), text):
        anon = None
        while True:
            if version == 1:
                raw = _read(d / "memory.limit_in_bytes")
                limit = int(raw) if raw and raw.strip().isdigit() else None
                st = _stat(_read(d / "memory.stat"))
                used = _sum(st.get("total_rss", st.get("rss")), st.get("total_mapped_file", st.get("mapped_file")))
            else:
                raw = _read(d / "memory.max")
                limit = int(raw) if raw and raw.strip().isdigit() else None
                st = _stat(_read(d / "memory.stat"))
                used = _sum(st.get("anon"), st.get("file_mapped"))
            anon = used if anon is None else anon
            if limit is not None and limit < UNLIMITED:
                room = max(0, limit - (anon or 0))
                best = room if best is None else min(best, room)
            if d == Path(root) or d.parent == d or (version == 1 and d == Path(root) / "memory"):
                break
            d = d.parent
    return best


def memory_budget() -> int:
    """Bytes of store data this process can expect to keep in the page cache: the smaller of
    ``MemAvailable`` (psutil) and `cgroup_room`. Units: bytes; at least 0. Never raises."""
    try:
        import psutil
        avail = int(psutil.virtual_memory().available)
    except Exception:   # psutil missing or unsupported platform: fall back to sysconf
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = UNLIMITED
    room = cgroup_room()
    return max(0, min(avail, room) if room is not None else avail)
