"""Out-of-core tokenisation: raw text → a ragged store of token ids plus its fastai ``Vocab``.

`texts_to_memmap` reads a corpus as a stream (a folder of text files, a column of a CSV / JSON-lines
file or DataFrame, or an iterable of strings), tokenises it in parallel with fastai's own
``Tokenizer`` (spaCy plus fastai's rules), and writes one item per document: the int32 token ids of
that document, exactly the ids ``TextList`` would produce for the same documents in the same order::

    corpus = texts_to_memmap("reviews.csv", "tokens", column="text")       # (path, vocab, rows, tokens)
    data = MemmapLMDataBunch.from_memmap(corpus.path, bs=64, bptt=70)

How the ids equal fastai's
--------------------------
fastai (``TokenizeProcessor`` then ``NumericalizeProcessor``) prefixes each text with ``xxbos`` (fastai's
``_join_texts``), applies the pre-rules, spaCy and the post-rules (``Tokenizer.process_text``), then
builds ``Vocab.create(tokens, max_vocab=60000, min_freq=3)``: tokens by decreasing count, ties in order of
first occurrence (``Counter.most_common``), those seen fewer than `min_freq` times dropped, fastai's
special tokens first, padded with ``xxfake`` to a multiple of 8. Here the same functions tokenise each
chunk; the first pass stores *provisional* ids (numbered in order of first occurrence over the corpus)
and counts them, so the vocabulary is computed with the same ordering without any token list in RAM;
a second pass maps provisional ids to final ids (``xxunk`` = 0 for dropped tokens). With `vocab` given
(e.g. a language model's, for a classifier) there is one pass.

Memory and processes
--------------------
RAM holds one chunk of texts per worker in flight (``2 * workers`` chunks at most), the vocabulary
being built (one entry per distinct token) and one block of ids; never the corpus. Workers are forked
processes (``workers`` defaults to the CPUs this process may use); each builds its spaCy tokenizer once.

Atomicity
---------
The store is written by a `RaggedWriter` (staged, checked, renamed into place). The provisional store
of the first pass lives in a hidden ``.NAME.fmtmp-PID-*`` directory next to the target, created while
the final writer holds the target's lock: it is removed on success and on any error, and a later writer
of the same target removes it if this process was killed. On error nothing appears at `out` and an
existing store there is unchanged.
"""
import collections
import importlib
import multiprocessing
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from ..errors import (ArgumentError, ArgumentTypeError, ColumnNotFoundError, FormatError, SourceNotFoundError)
from ..store.ragged import RaggedArray, RaggedWriter
from ..store.progress import Progress
from ..store.sources import count_rows, iter_frames
from ..store.writer import TMP_MARK, staging_stem, check_no_overlap

__all__ = ["texts_to_memmap", "TokenizedCorpus", "list_text_files", "tokenizer_meta", "tokenizer_from_meta",
           "TextTokenizer", "CHUNK_DOCS", "TEXT_EXTENSIONS"]

CHUNK_DOCS = 1000          # documents per job sent to a worker: amortises the pickling, keeps the bar moving
REMAP_TOKENS = 1 << 22     # provisional ids remapped per block in the second pass (16 MiB of int32)
TEXT_EXTENSIONS = (".txt",)   # fastai's text_extensions
FASTAI_MAX_VOCAB, FASTAI_MIN_FREQ = 60000, 3   # NumericalizeProcessor's defaults


def _text_module() -> Any:
    "``fastai.text`` (raises ``FastaiCompatError`` naming the text extra when spaCy is missing)."
    importlib.import_module("fastai.text")
    return importlib.import_module("fastai.text.data")


# ---------------------------------------------------------------------------------------- tokenizer
def _qualname(f: Any) -> str:
    return f"{f.__module__}:{f.__qualname__}"


def _resolve(name: str) -> Any:
    module, _, attr = name.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ArgumentError(f"tokenizer meta: expected an importable function {name!r}, found none ({e}); pass "
                            "tokenizer= with the rules the store was tokenised with") from None
    return obj


def tokenizer_meta(tokenizer: Any, include_bos: bool = True, include_eos: bool = False,
                   mark_fields: bool = False) -> Dict[str, Any]:
    """The JSON description of `tokenizer` (a fastai ``Tokenizer``) and the join options, kept in the
    store's meta under ``"tokenizer"`` so that ``learn.predict(text)`` tokenises like the corpus.

    Functions are recorded as ``"module:qualname"``; `tokenizer_from_meta` imports them back (trusted
    stores only: importing runs module code). Raises ``ArgumentTypeError`` for a tokenizer without
    fastai's ``tok_func`` / ``lang`` / rules attributes."""
    try:
        return {"tok_func": _qualname(tokenizer.tok_func), "lang": str(tokenizer.lang),
                "pre_rules": [_qualname(r) for r in tokenizer.pre_rules],
                "post_rules": [_qualname(r) for r in tokenizer.post_rules],
                "special_cases": [str(t) for t in (tokenizer.special_cases or [])],
                "include_bos": bool(include_bos), "include_eos": bool(include_eos), "mark_fields": bool(mark_fields)}
    except AttributeError as e:
        raise ArgumentTypeError(f"tokenizer: expected a fastai.text Tokenizer (tok_func, lang, pre_rules, "
                                f"post_rules), found {type(tokenizer).__name__} ({e})") from None


def tokenizer_from_meta(meta: Dict[str, Any]) -> "TextTokenizer":
    """Rebuild the `TextTokenizer` described by `meta` (the ``"tokenizer"`` entry of a store's meta).

    Raises ``ArgumentError`` if a recorded function cannot be imported, ``FastaiCompatError`` without spaCy."""
    text = _text_module()
    try:
        tok = text.Tokenizer(tok_func=_resolve(meta["tok_func"]), lang=meta["lang"],
                             pre_rules=[_resolve(r) for r in meta["pre_rules"]],
                             post_rules=[_resolve(r) for r in meta["post_rules"]],
                             special_cases=list(meta["special_cases"]), n_cpus=1)
        return TextTokenizer(tok, meta["include_bos"], meta["include_eos"], meta["mark_fields"])
    except (KeyError, TypeError) as e:
        raise ArgumentError(f"tokenizer meta: expected the keys of tokenizer_meta(), found {meta!r:.200} ({e})") from None


class TextTokenizer:
    """fastai's tokenisation of raw texts, in one process: ``_join_texts`` (``xxbos``, field marks) then
    ``Tokenizer.process_text`` with a spaCy tokenizer built on first use (once per process).

    Parameters
    ----------
    tokenizer : fastai ``Tokenizer``, optional
        Default ``Tokenizer()`` (spaCy ``'en'``, fastai's default rules and special cases).
    include_bos, include_eos, mark_fields : bool
        As fastai's ``TokenizeProcessor`` (defaults ``True``, ``False``, ``False``).

    Pickles without the spaCy object (rebuilt in the process that unpickles it).
    """

    def __init__(self, tokenizer: Any = None, include_bos: bool = True, include_eos: bool = False,
                 mark_fields: bool = False):
        self.tokenizer = _text_module().Tokenizer(n_cpus=1) if tokenizer is None else tokenizer
        self.include_bos, self.include_eos, self.mark_fields = include_bos, include_eos, mark_fields
        self.meta = tokenizer_meta(self.tokenizer, include_bos, include_eos, mark_fields)
        self._base = None

    def __getstate__(self) -> Dict[str, Any]:
        return {**vars(self), "_base": None}

    def base(self) -> Any:
        "The fastai ``BaseTokenizer`` (spaCy) of this process, with the special cases added."
        if self._base is None:
            t = self.tokenizer
            self._base = t.tok_func(t.lang)
            if t.special_cases:
                self._base.add_special_cases(t.special_cases)
        return self._base

    def __call__(self, texts: Any) -> List[List[str]]:
        """Tokens of each text of `texts` (1-d: one text per document; 2-d: fields joined per row), as fastai.

        Returns a list (one per document) of lists of str."""
        if not len(texts):
            return []
        joined = _text_module()._join_texts(texts, self.mark_fields, self.include_bos, self.include_eos)
        base = self.base()
        return [self.tokenizer.process_text(str(t), base) for t in joined]


# ---------------------------------------------------------------------------------------- sources
def list_text_files(folder: Union[str, Path], extensions: Sequence[str] = TEXT_EXTENSIONS) -> List[Path]:
    """Files of `folder` (recursively) whose suffix is in `extensions`, sorted by relative path.

    This is the document order of `texts_to_memmap` for a folder: document ``i`` is ``list_text_files(folder)[i]``.
    Hidden files and directories (a leading dot) are skipped. Raises ``SourceNotFoundError`` if there is none."""
    root = Path(folder)
    ext = {e.lower() for e in extensions}
    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in ext and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).parts)
    if not files:
        raise SourceNotFoundError(f"{root}: expected text files with a suffix in {sorted(ext)}, found none")
    return files


def _read_text(path: str) -> str:
    "fastai's ``open_text``: the whole file as UTF-8 text."
    try:
        with open(path, "r", encoding="utf-8") as f:
            return "".join(f.readlines())
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: expected UTF-8 text, found an undecodable byte at {e.start} ({e.reason}); "
                          "re-encode the file") from None


def _chunks(it: Iterable[Any], n: int) -> Iterator[list]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


def _strings(source: Iterable[Any]) -> Iterator[str]:
    for i, s in enumerate(source):
        if not isinstance(s, str):
            raise ArgumentTypeError(f"texts: expected str documents, found {type(s).__name__} at position {i} "
                                    f"({s!r:.60}); decode bytes first, or pass Path objects for files")
        yield s


def _files(source: Iterable[Any]) -> Iterator[str]:
    for i, p in enumerate(source):
        if not isinstance(p, os.PathLike):
            raise ArgumentTypeError(f"files: expected Path objects only, found {type(p).__name__} at position {i}")
        yield os.fspath(p)


def _column_chunks(source: Any, columns: List[str], chunk_docs: int, read_kwargs: Optional[Dict[str, Any]],
                   file_format: Optional[str]) -> Iterator[np.ndarray]:
    "Values of `columns` (object array, 1-d for one column) of a tabular source, `chunk_docs` rows at a time."
    csv_like = isinstance(source, (str, os.PathLike))
    for df in iter_frames(source, chunksize=chunk_docs, file_format=file_format, read_kwargs=read_kwargs,
                          columns=columns if csv_like else None):
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise ColumnNotFoundError(f"{_name(source)}: expected text column(s) {missing}, found columns "
                                      f"{list(df.columns)[:20]}")
        values = df[columns].values
        yield values[:, 0] if len(columns) == 1 else values


def _name(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def _plan(source: Any, column: Any, extensions: Sequence[str], chunk_docs: int, read_kwargs: Any,
          file_format: Optional[str]) -> Tuple[Iterator[Tuple[str, Any]], Optional[int], List[Path]]:
    """``(jobs, total documents or None, input paths)``: jobs are ``("files", [path, ...])`` or
    ``("texts", array)``; refuses a source / column combination that does not fit."""
    columns = None if column is None else ([column] if isinstance(column, str) else list(column))
    if columns is not None and (not columns or not all(isinstance(c, str) for c in columns)):
        raise ArgumentTypeError(f"column: expected a column name or a list of names, found {column!r:.100}")
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        if columns is not None:
            raise ArgumentError(f"{source}: expected column=None for a folder of text files, found {column!r}")
        files = list_text_files(source, extensions)
        return (("files", c) for c in _chunks(map(os.fspath, files), chunk_docs)), len(files), [Path(source)]
    if isinstance(source, (str, os.PathLike, pd.DataFrame)):
        if isinstance(source, (str, os.PathLike)) and not Path(source).exists():
            raise SourceNotFoundError(f"{source}: expected a folder of text files or a CSV/JSON-lines file, found nothing")
        if columns is None:
            raise ArgumentError(f"{_name(source)}: expected column= naming the text column(s) of a table, found None")
        total = count_rows(source, file_format)
        inputs = [Path(source)] if isinstance(source, (str, os.PathLike)) else []
        return (("texts", v) for v in _column_chunks(source, columns, chunk_docs, read_kwargs, file_format)), total, inputs
    if isinstance(source, (bytes, dict)) or not isinstance(source, Iterable):
        raise ArgumentTypeError(f"source: expected a folder, a CSV/JSON-lines path, a DataFrame or an iterable of "
                                f"str (texts) or Path (files), found {type(source).__name__}")
    total = len(source) if hasattr(source, "__len__") else None
    it = iter(source)
    first = next(it, None)
    if first is None:
        return iter(()), 0, []
    rest = _prepend(first, it)
    if isinstance(first, os.PathLike):
        return (("files", c) for c in _chunks(_files(rest), chunk_docs)), total, []
    if isinstance(first, (dict, pd.DataFrame)):
        if columns is None:
            raise ArgumentError("records: expected column= naming the text column(s), found None")
        return (("texts", v) for v in _column_chunks(rest, columns, chunk_docs, None, None)), total, []
    if columns is not None:
        raise ArgumentError(f"texts: expected column=None for an iterable of strings, found {column!r}")
    return (("texts", np.array(c, dtype=object)) for c in _chunks(_strings(rest), chunk_docs)), total, []


def _prepend(first: Any, it: Iterator) -> Iterator:
    yield first
    yield from it


# ---------------------------------------------------------------------------------------- workers
@dataclass
class _Chunk:
    "One tokenised chunk: ids local to the chunk (numbered by first occurrence), their tokens and counts."
    ids: np.ndarray        # int32, every token of the chunk's documents, concatenated
    lengths: np.ndarray    # int64, tokens per document
    itos: List[str]        # local id -> token
    counts: np.ndarray     # int64, occurrences of each local id


def _tokenize_job(tok: TextTokenizer, job: Tuple[str, Any]) -> _Chunk:
    kind, payload = job
    texts = np.array([_read_text(p) for p in payload], dtype=object) if kind == "files" else payload
    stoi: Dict[str, int] = {}
    ids: List[int] = []
    lengths = []
    for doc in tok(texts):
        ids.extend(stoi.setdefault(w, len(stoi)) for w in doc)
        lengths.append(len(doc))
    ids_a = np.array(ids, dtype=np.int32)
    return _Chunk(ids_a, np.array(lengths, np.int64), list(stoi), np.bincount(ids_a, minlength=len(stoi)).astype(np.int64))


_WORKER_TOKENIZER: Optional[TextTokenizer] = None   # set in each worker process by the pool initializer


def _init_worker(tok: TextTokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tok


def _worker_job(job: Tuple[str, Any]) -> _Chunk:
    return _tokenize_job(_WORKER_TOKENIZER, job)


def _tokenized(jobs: Iterator[Tuple[str, Any]], tok: TextTokenizer, workers: int) -> Iterator[_Chunk]:
    "Tokenised chunks in job order; at most ``2 * workers`` jobs in flight. An error in a job propagates."
    if workers <= 1:
        for job in jobs:
            yield _tokenize_job(tok, job)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(tok,)) as ex:
        pending: collections.deque = collections.deque()
        try:
            for job in jobs:
                pending.append(ex.submit(_worker_job, job))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


# ---------------------------------------------------------------------------------------- vocabulary
class _VocabBuilder:
    "Provisional ids in order of first occurrence over the corpus, and their counts."

    def __init__(self) -> None:
        self.stoi: Dict[str, int] = {}
        self.itos: List[str] = []
        self.counts = np.zeros(1024, np.int64)

    def add(self, chunk: _Chunk) -> np.ndarray:
        "Map `chunk`'s local ids to provisional ids (int64 array, one per local id); count them."
        m = np.empty(len(chunk.itos), np.int64)
        for k, w in enumerate(chunk.itos):
            g = self.stoi.get(w)
            if g is None:
                g = self.stoi[w] = len(self.itos)
                self.itos.append(w)
            m[k] = g
        if len(self.itos) > len(self.counts):
            self.counts = np.concatenate([self.counts, np.zeros(max(len(self.itos), 2 * len(self.counts)) - len(self.counts), np.int64)])
        np.add.at(self.counts, m, chunk.counts)
        return m

    def vocab_itos(self, max_vocab: int, min_freq: int, special: Sequence[str]) -> List[str]:
        "fastai's ``Vocab.create(tokens, max_vocab, min_freq).itos`` from the counts (ties: first occurrence)."
        counts = self.counts[:len(self.itos)]
        top = np.argsort(-counts, kind="stable")[:max_vocab]       # Counter.most_common(max_vocab)
        itos = [self.itos[i] for i in top[counts[top] >= min_freq]]
        for o in reversed(special):
            if o in itos:
                itos.remove(o)
            itos.insert(0, o)
        itos = itos[:max_vocab]
        if len(itos) < max_vocab:
            while len(itos) % 8 != 0:
                itos.append("xxfake")
        return itos


def _stoi(itos: Sequence[str]) -> Dict[str, int]:
    "fastai's ``Vocab.stoi`` (a repeated token, e.g. ``xxfake``, maps to its last position)."
    return {v: k for k, v in enumerate(itos)}


# ---------------------------------------------------------------------------------------- converter
@dataclass(frozen=True)
class TokenizedCorpus:
    """What `texts_to_memmap` wrote.

    Attributes
    ----------
    path : Path
        The ragged store: one item per document, token ids of dtype `dtype`, shape ``(n_tokens_i,)``.
    vocab : fastai ``Vocab``
        ``vocab.itos[id]`` is the token of an id; also in the store's ``meta["itos"]``.
    rows, tokens : int
        Documents and tokens written.
    """
    path: Path
    vocab: Any
    rows: int
    tokens: int


def _check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise ArgumentTypeError(f"{name}: expected an int >= {lo}, found {v!r:.100}")
    if v < lo:
        raise ArgumentError(f"{name}: expected an int >= {lo}, found {v}")
    return int(v)


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def texts_to_memmap(source: Any, out: Union[str, Path], column: Union[None, str, Sequence[str]] = None,
                    tokenizer: Any = None, vocab: Any = None, max_vocab: int = FASTAI_MAX_VOCAB,
                    min_freq: int = FASTAI_MIN_FREQ, include_bos: bool = True, include_eos: bool = False,
                    mark_fields: bool = False, dtype: Any = np.int32, workers: Optional[int] = None,
                    chunk_docs: int = CHUNK_DOCS, extensions: Sequence[str] = TEXT_EXTENSIONS,
                    read_kwargs: Optional[Dict[str, Any]] = None, file_format: Optional[str] = None,
                    meta: Optional[Dict[str, Any]] = None, overwrite: bool = False, progress: bool = True,
                    shard_bytes: Optional[int] = None) -> TokenizedCorpus:
    """Tokenise a corpus with fastai's rules into a new ragged store of token ids at `out`, streaming.

    Parameters
    ----------
    source
        A folder (every file of `extensions` below it, in `list_text_files` order, read as UTF-8); a CSV
        or JSON-lines file (``.jsonl``/``.ndjson``/``.json`` or `file_format='jsonl'``), a DataFrame or an
        iterable of dict records, with `column`; an iterable of str (one document each, consumed once);
        an iterable of ``Path`` (files, in that order).
    column : str or list of str
        The text column(s) of a table; several are joined per row as fastai does (``xxfld i`` marks with
        `mark_fields`). Missing values become the text ``"nan"``, as in ``TextList.from_df``.
    tokenizer : fastai ``Tokenizer``, optional
        Default ``Tokenizer()``: spaCy ``'en'`` and fastai's default rules. Its functions are recorded by
        name in the store's meta (``"tokenizer"``) for ``learn.predict(text)``.
    vocab : fastai ``Vocab`` or list of str, optional
        Use this vocabulary (one pass; unknown tokens become ``xxunk``, id 0), e.g. a language model's
        for a classifier. Default: build it as ``Vocab.create(..., max_vocab, min_freq)`` (two passes).
    max_vocab, min_freq : int
        As fastai's ``NumericalizeProcessor`` (defaults 60000 and 3).
    include_bos, include_eos, mark_fields : bool
        As fastai's ``TokenizeProcessor``.
    dtype : integer numpy dtype
        Of the stored ids (default int32); must hold ``len(itos) - 1``.
    workers : int, optional
        Tokenising processes (default: the CPUs available; 1 tokenises in this process).
    chunk_docs : int
        Documents per job (and per DataFrame chunk read).
    meta : dict, optional
        Extra JSON meta for the store (``"itos"`` and ``"tokenizer"`` are set here).
    overwrite, progress, shard_bytes
        As for `RaggedWriter` (the bar counts documents, when their number is known).

    Returns
    -------
    TokenizedCorpus
        ``(path, vocab, rows, tokens)``. ``vocab.itos`` equals ``TextList``'s for the same documents.

    Raises
    ------
    ArgumentTypeError, ArgumentError
        A source, column, vocab or option that does not fit (expected vs found), before any work.
    SourceNotFoundError
        A missing file, a folder without text files.
    ColumnNotFoundError, FormatError
        A missing text column; a non-UTF-8 file, a bad JSON line.
    OverlapError
        `out` is, contains or lies inside the source folder or file.
    FastaiCompatError
        spaCy is not installed (install the ``text`` extra).
    StoreExistsError, NotAStoreError, WriterConflictError, StoreWriteError
        As `RaggedWriter`. On any error nothing is left at `out` (nor next to it).
    """
    out = Path(out)
    max_vocab, min_freq = _check_int("max_vocab", max_vocab, 1), _check_int("min_freq", min_freq, 0)
    chunk_docs = _check_int("chunk_docs", chunk_docs, 1)
    workers = _default_workers() if workers is None else _check_int("workers", workers, 1)
    dt = np.dtype(dtype)
    if dt.kind not in "iu":
        raise ArgumentTypeError(f"dtype: expected an integer dtype for token ids, found {dt}")
    tok = tokenizer if isinstance(tokenizer, TextTokenizer) else TextTokenizer(tokenizer, include_bos, include_eos, mark_fields)
    fixed = None if vocab is None else _fixed_itos(vocab)
    if fixed is not None:
        _check_fits(len(fixed), dt)
    jobs, total, inputs = _plan(source, column, extensions, chunk_docs, read_kwargs, file_format)
    check_no_overlap([out], inputs)
    text = _text_module()
    extra = dict(meta or {})
    kw = dict(overwrite=overwrite, **({} if shard_bytes is None else {"shard_bytes": shard_bytes}))
    with RaggedWriter(out, dt, (), **kw) as w:
        bar = Progress(total, progress, "documents tokenised")
        chunks = _tokenized(jobs, tok, workers)
        if fixed is not None:
            itos, rows, tokens = fixed, *_write_fixed(chunks, _stoi(fixed), w, bar)
        else:
            itos, rows, tokens = _write_two_pass(chunks, w, bar, max_vocab, min_freq, text.defaults.text_spec_tok)
        w.meta = {**extra, "itos": itos, "tokenizer": tok.meta}   # checked when the writer stages the manifest
    return TokenizedCorpus(out, text.Vocab(itos), rows, tokens)


def _fixed_itos(vocab: Any) -> List[str]:
    itos = getattr(vocab, "itos", vocab)
    if isinstance(itos, (str, bytes)) or not isinstance(itos, Sequence) or not len(itos) \
            or not all(isinstance(t, str) for t in itos):
        raise ArgumentTypeError(f"vocab: expected a fastai Vocab or a non-empty list of str tokens, found "
                                f"{type(vocab).__name__} {str(vocab)[:80]!r}")
    return list(itos)


def _check_fits(n: int, dt: np.dtype) -> None:
    if n - 1 > np.iinfo(dt).max:
        raise ArgumentError(f"dtype: expected one that holds ids up to {n - 1} (the vocab size - 1), found {dt} "
                            f"(max {np.iinfo(dt).max}); use int32")


def _write_fixed(chunks: Iterator[_Chunk], stoi: Dict[str, int], w: RaggedWriter, bar: Progress) -> Tuple[int, int]:
    rows = tokens = 0
    for c in chunks:
        m = np.array([stoi.get(t, 0) for t in c.itos], np.int64)   # 0: xxunk, as fastai's defaultdict(int)
        w.append_flat(m[c.ids].astype(w.dtype), c.lengths)
        rows, tokens = rows + len(c.lengths), tokens + len(c.ids)
        bar.update(rows)
    return rows, tokens


def _write_two_pass(chunks: Iterator[_Chunk], w: RaggedWriter, bar: Progress, max_vocab: int, min_freq: int,
                    special: Sequence[str]) -> Tuple[List[str], int, int]:
    "First pass into a provisional store next to the target (under its lock), then the remap into `w`."
    tmp = w.path.parent / f".{staging_stem(w.path.name)}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        builder, rows, tokens = _VocabBuilder(), 0, 0
        with RaggedWriter(tmp / "provisional", np.int32, ()) as pw:
            for c in chunks:
                pw.append_flat(builder.add(c)[c.ids], c.lengths)
                rows, tokens = rows + len(c.lengths), tokens + len(c.ids)
                bar.update(rows)
        itos = builder.vocab_itos(max_vocab, min_freq, special)
        _check_fits(len(itos), w.dtype)
        stoi = _stoi(itos)
        remap = np.array([stoi.get(t, 0) for t in builder.itos], np.int64).astype(w.dtype)
        _remap_store(tmp / "provisional", remap, w)
        return itos, rows, tokens
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remap_store(path: Path, remap: np.ndarray, w: RaggedWriter) -> None:
    "Append every item of the store at `path` to `w`, ids mapped through `remap`, in blocks of ~`REMAP_TOKENS`."
    prov = RaggedArray.open(path)
    try:
        n, a = len(prov), 0
        while a < n:
            lengths = prov.lengths(np.arange(a, min(n, a + 65536), dtype=np.int64))
            b = a + max(1, int(np.searchsorted(np.cumsum(lengths), REMAP_TOKENS, side="right")))
            data, lengths = prov.gather(np.arange(a, min(b, n), dtype=np.int64))
            w.append_flat(remap[data], lengths)
            a = min(b, n)
    finally:
        prov.close()
