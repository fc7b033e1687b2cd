"""Command line: ``fastai-memmap demo | info PATH | verify PATH | convert-images SOURCE OUT | bench`` (also ``python -m fastai_memmap``)."""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from ..errors import MemmapError

__all__ = ["main"]


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


def _cmd_info(args: argparse.Namespace) -> int:
    from ..store.reader import MemmapArray
    a = MemmapArray.open(args.path)
    m = a.manifest
    files = [{"file": f.name, "bytes": f.stat().st_size} for f in a.shard_files]
    info = {"path": str(a.path), "kind": m.kind, "version": m.version, "dtype": a.dtype.name,
            "rows": len(a), "data_bytes": a.nbytes, "meta": m.meta, "shards": m.to_dict()["shards"],
            "files": files, "summary": _shape_text(a)}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{info['path']}: {info['summary']} ({a.nbytes:,} data bytes), format v{m.version}, kind {m.kind}")
    if m.meta:
        print(f"meta: {json.dumps(m.meta)[:500]}")
    for s in info["shards"]:
        print(f"  {s['file']}: {s['rows']} rows, {s.get('checksum') or 'no checksum'}")
    print(f"  files: {len(files)}, {sum(f['bytes'] for f in files):,} bytes on disk")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from ..store.reader import MemmapArray
    a = MemmapArray.open(args.path)
    a.verify(progress=not args.quiet)
    print(f"{a.path}: OK, {len(a.manifest.shards)} shard(s), {a.nbytes:,} bytes checked")
    return 0


def build_parser() -> argparse.ArgumentParser:
    "The argument parser of the ``fastai-memmap`` command."
    p = argparse.ArgumentParser(prog="fastai-memmap", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="train a CNN on scikit-learn's digits read from a store (the main job)")
    d.add_argument("--dir", help="keep stores, models and export.pkl here (default: a temporary directory)")
    d.add_argument("--epochs", type=int, default=6)
    d.add_argument("--size", type=int, default=32, help="image side in pixels after resizing")
    d.add_argument("--num-workers", type=int, default=2)
    d.add_argument("--min-accuracy", type=float, default=0.0, help="exit 1 if validation accuracy is lower")
    d.set_defaults(func=_cmd_demo)
    i = sub.add_parser("info", help="print a store's header, shards and sizes")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_info)
    v = sub.add_parser("verify", help="check every shard against its checksum (exit 1 on mismatch)")
    v.add_argument("path")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=_cmd_verify)
    from ..vision.convert import add_convert_images_parser
    add_convert_images_parser(sub)
    sub.add_parser("bench", help="loader throughput table, side by side (fastai-memmap bench --help)")
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
