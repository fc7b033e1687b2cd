"""Command line: ``fastai-memmap demo | info PATH | verify PATH | convert-images SOURCE OUT | bench`` (also ``python -m fastai_memmap``)."""
import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..errors import MemmapError, StoreNotFoundError

__all__ = ["main", "build_parser", "summarise"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    res = run_demo(Path(args.dir) if args.dir else None, epochs=args.epochs, size=args.size,
                   num_workers=args.num_workers)
    return 0 if res["accuracy"] >= args.min_accuracy else 1


def _shape_text(a) -> str:
    "One line describing what a store holds, for every kind (dense, ragged, sparse)."
    kind = a.manifest.kind
    if kind == "ragged":
        return f"{len(a)} items of (var, {', '.join(map(str, a.trailing_shape))}) {a.dtype.name}, {a.nelements:,} elements in all"
    if kind == "sparse":
        return f"{len(a)} sparse rows of {a.size:,} {a.dtype.name} features, {a.nnz:,} stored entries"
    return f"{len(a)} rows of {tuple(a.item_shape)} {a.dtype.name}"


def summarise(value: Any, items: int = 2, chars: int = 80) -> str:
    """A short, whole text for one ``meta`` value: long lists and dicts show their first `items` entries and
    how many more there are (``"['a', 'b', ... 9,998 more]"``), long strings their first `chars` characters."""
    if isinstance(value, (list, tuple)) and len(value) > items + 1:
        head = ", ".join(summarise(v, items, chars) for v in value[:items])
        o, c = "[]" if isinstance(value, list) else "()"
        return f"{o}{head}, ... {len(value) - items:,} more{c}"
    if isinstance(value, dict) and len(value) > items + 1:
        head = ", ".join(f"{k!r}: {summarise(v, items, chars)}" for k, v in list(value.items())[:items])
        return f"{{{head}, ... {len(value) - items:,} more}}"
    if isinstance(value, list):
        return "[" + ", ".join(summarise(v, items, chars) for v in value) + "]"
    if isinstance(value, str) and len(value) > chars:
        return repr(value[:chars]) + f"... ({len(value):,} chars)"
    return repr(value)


def _stores(path: Path) -> List[Tuple[str, Path]]:
    """``[(name, store path)]``: `path` itself if it is a store (a ``.npy`` file, a directory with a manifest, or
    that manifest), else each sub-store of a group of stores (e.g. ``images_to_memmap``'s x/ and y/, or
    ``tabular_to_memmap``'s cats/, conts/, y/, valid/), named by its folder."""
    from ..store.format import MANIFEST_NAME
    if not path.is_dir() or (path / MANIFEST_NAME).exists():
        return [(str(path), path)]
    subs = sorted(d for d in path.iterdir() if d.is_dir() and (d / MANIFEST_NAME).is_file())
    if not subs:
        raise StoreNotFoundError(f"{path}: expected a store ({MANIFEST_NAME}), a .npy file or a folder of stores, "
                                 f"found a folder with neither a {MANIFEST_NAME} nor sub-folders that have one")
    return [(d.name, d) for d in subs]


def _store_info(a) -> Dict[str, Any]:
    "What ``info --json`` prints about one opened store."
    m = a.manifest
    files = [{"file": f.name, "bytes": f.stat().st_size} for f in a.shard_files]
    return {"path": str(a.where), "kind": m.kind, "version": m.version, "dtype": a.dtype.name,
            "rows": len(a), "data_bytes": a.nbytes, "meta": m.meta, "shards": m.to_dict()["shards"],
            "files": files, "summary": _shape_text(a)}


def _print_store(info: Dict[str, Any], name: str, indent: str = "") -> None:
    "Print one store's `info` for people: a header line, each meta key summarised, the shards, the files."
    print(f"{indent}{name}: {info['summary']} ({info['data_bytes']:,} data bytes), format v{info['version']}, "
          f"kind {info['kind']}")
    if info["meta"]:
        print(f"{indent}  meta:")
        for k, v in info["meta"].items():
            print(f"{indent}    {k}: {summarise(v)}")
    for s in info["shards"]:
        print(f"{indent}  {s['file']}: {s['rows']} rows, {s.get('checksum') or 'no checksum'}")
    files = info["files"]
    print(f"{indent}  files: {len(files)}, {sum(f['bytes'] for f in files):,} bytes on disk")


def _cmd_info(args: argparse.Namespace) -> int:
    from ..store.reader import MemmapArray
    path = Path(args.path)
    stores = _stores(path)
    infos = [(name, _store_info(MemmapArray.open(p))) for name, p in stores]
    group = len(stores) > 1 or stores[0][1] != path
    other = sorted(f.name for f in path.iterdir() if f.is_file() and not f.name.startswith(".")) if group else []
    if args.json:
        print(json.dumps({"path": str(path), "stores": {n: i for n, i in infos}, "other_files": other} if group
                         else infos[0][1], indent=1))
        return 0
    if not group:
        _print_store(infos[0][1], infos[0][1]["path"])
        return 0
    print(f"{path}: a group of {len(infos)} stores" + (f", with {', '.join(other)}" if other else ""))
    for name, info in infos:
        _print_store(info, name + "/", indent="  ")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from ..store.reader import MemmapArray
    for _, p in _stores(Path(args.path)):
        a = MemmapArray.open(p)
        res = a.verify(progress=not args.quiet, allow_unchecked=args.allow_unchecked)
        unchecked = sum(1 for r in res if r.get("status") == "unchecked")
        note = f", {unchecked} without a checksum (not compared)" if unchecked else ""
        print(f"{a.where}: OK, {len(a.manifest.shards)} shard(s), {a.nbytes:,} bytes checked{note}")
    return 0


# the --help text, in plain text (the module docstring is reST)
DESCRIPTION = ("fastai-memmap: inspect, check and make memory-mapped stores for fastai.\n"
               "  fastai-memmap info PATH | verify PATH | convert-images SOURCE OUT | demo | bench\n"
               "(also: python -m fastai_memmap ...). Each command has its own --help.")


def build_parser() -> argparse.ArgumentParser:
    "The argument parser of the ``fastai-memmap`` command."
    p = argparse.ArgumentParser(prog="fastai-memmap", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", help="one of:")
    d = sub.add_parser("demo", help="train a CNN on scikit-learn's digits read from a store (the main job)")
    d.add_argument("--dir", help="keep stores, models and export.pkl here (default: a temporary directory)")
    d.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    d.add_argument("--size", type=int, default=32, help="image side in pixels after resizing (default 32)")
    d.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    d.add_argument("--min-accuracy", type=float, default=0.0, help="exit 1 if validation accuracy is lower")
    d.set_defaults(func=_cmd_demo)
    i = sub.add_parser("info", help="print a store's header, shards and sizes")
    i.add_argument("path", help="a store folder, its manifest.json, a .npy file, or a folder of stores "
                   "(e.g. the output of convert-images or tabular_to_memmap)")
    i.add_argument("--json", action="store_true", help="print everything as JSON instead of text")
    i.set_defaults(func=_cmd_info)
    v = sub.add_parser("verify", help="check every shard against its checksum (exit 1 on mismatch)")
    v.add_argument("path", help="a store folder, its manifest.json, a .npy file, or a folder of stores "
                   "(each sub-store is checked)")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.add_argument("--allow-unchecked", action="store_true",
                   help="accept shards without a recorded checksum (e.g. a bare .npy file): check what can be checked")
    v.set_defaults(func=_cmd_verify)
    from ..vision.convert import add_convert_images_parser
    add_convert_images_parser(sub)
    sub.add_parser("bench", help="loader throughput table, side by side (fastai-memmap bench --help)",
                   description="loader throughput of this package against the usual alternatives; "
                   "its options: fastai-memmap bench --help")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    "Entry point of ``fastai-memmap``; returns the exit status (1 on a store error, with its message)."
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:          # the benchmark has its own parser (fastai_memmap.cli.bench)
        from .bench import bench_main
        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (MemmapError, FileNotFoundError) as e:
        print(f"fastai-memmap {args.cmd}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
