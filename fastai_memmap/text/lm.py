"""Language modelling from a ragged store of token ids, for fastai v1's ``language_model_learner``.

Write the corpus once as a ragged store of integer token ids (one item per document), with the
vocabulary in its meta, then train from it; no token list is ever held in RAM::

    save_memmap("corpus", docs, kind="ragged", dtype=np.int32, meta={"itos": itos})   # docs: iterable of id arrays
    data = MemmapLMDataBunch.from_memmap("corpus", bs=64, bptt=70)
    text = import_fastai_text()
    learn = text.language_model_learner(data, text.AWD_LSTM, pretrained=False)
    learn.fit_one_cycle(1, 1e-2)

`LMStream` replaces fastai's ``LanguageModelPreLoader``: the same contiguous ``bs`` streams cut in
``bptt`` windows (so an RNN's hidden state carries over from one batch to the next), read from the
store per batch with one sorted gather per shard. RAM holds O(documents) integers, not O(tokens).

What works on this stack (fastai 1.0.61, torch 2.x, numpy 1.26, spaCy 3.8 from the ``text`` extra)
------------------------------------------------------------------------------------------------
- Raw text → store: `fastai_memmap.text.tokenize.texts_to_memmap` (ids equal ``TextList``'s); the store's
  meta holds ``itos`` and the tokenizer description, so ``learn.predict("some text", n_words=5)`` works on a
  ``language_model_learner`` over a `MemmapLMDataBunch` (see `MemmapLMDataBunch.one_item`).
- Classification: `MemmapTextList` (a `RaggedItemList` padded as fastai's text classifier expects) +
  a label store → ``text_classifier_learner(data, AWD_LSTM, pretrained=False)``; ``learn.export()`` →
  ``load_learner`` → ``learn.predict("some text")`` (the processor keeps vocab and tokenizer rules).
- ``import fastai.text`` needs spaCy (`fastai_memmap.data.compat` patches it for spaCy 3 as it loads and
  names the ``text`` extra when spaCy is missing). Without spaCy, `import_fastai_text` still imports it
  for pre-tokenised ids (models, learners, ``Vocab``; tokenising raises ``FastaiCompatError``).
- ``pretrained=True`` downloads WT103 weights: it needs network access (not available here).
- ``learn.export()``/``load_learner`` are not supported for a `MemmapLMDataBunch` (fastai's text
  export pickles the ``LabelList`` state of a ``TextLMDataBunch``, which this bunch does not have);
  save the weights with ``learn.save`` / ``learn.save_encoder`` and rebuild the bunch from the store.
"""
import sys
import types
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from fastai.basic_data import DataBunch
from fastai.callback import Callback
from fastai.layers import CrossEntropyFlat
from torch.utils.data import DataLoader

from ..data.batching import Collated, memmap_collate
from ..errors import ArgumentError, ArgumentTypeError, FastaiCompatError, ItemShapeError, RowIndexError, TokenIdError
from ..data.items import as_store
from ..store.ragged import RaggedArray, norm_rows
from ..data.ragged_items import RaggedItemList, RaggedProcessor
from .tokenize import TextTokenizer, tokenizer_from_meta

__all__ = ["LMStream", "MemmapLMDataBunch", "MemmapTextList", "TextIdProcessor", "TextEncoder", "import_fastai_text",
           "lm_vocab", "text_to_ids"]


# ---------------------------------------------------------------------------------------- fastai.text
def _spacy_placeholder() -> types.ModuleType:
    "A stand-in for spacy with what ``fastai/text/transform.py`` touches at import time; anything else raises."
    def missing(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise FastaiCompatError(f"spacy.{name}: spacy is not installed, fastai.text was imported without it; "
                                "expected pre-tokenised token ids (see fastai_memmap.text.lm), found a call that "
                                "tokenises text (SpacyTokenizer); install spacy to tokenise with fastai")
    spacy, symbols = types.ModuleType("spacy"), types.ModuleType("spacy.symbols")
    symbols.ORTH = 65            # spacy.symbols.ORTH in spacy 2.x/3.x; only used to add special cases
    spacy.symbols, spacy.__getattr__ = symbols, missing
    return spacy


def import_fastai_text() -> types.ModuleType:
    """Import and return ``fastai.text``, also when spaCy is not installed.

    The case this still serves: training a language model from *pre-tokenised* token ids (produced by
    any tokenizer) on a machine without the ``text`` extra. With spaCy installed it is plain
    ``import fastai.text`` (patched by `fastai_memmap.data.compat` as it loads), and
    `fastai_memmap.text.tokenize` is the way from raw text. Without spaCy, ``import fastai.text``
    raises ``FastaiCompatError`` naming the extra; this function instead puts a placeholder ``spacy``
    module in ``sys.modules`` for the duration of the import only (what was there before, even
    ``None``, is restored), so models, learners and ``Vocab`` work and ``SpacyTokenizer`` raises
    ``FastaiCompatError``.

    Returns
    -------
    module
        ``fastai.text`` (``sys.modules["fastai.text"]``).

    Raises
    ------
    FastaiCompatError
        (an ``ImportError``) if ``fastai.text`` still cannot be imported.
    """
    if "fastai.text" in sys.modules:
        return sys.modules["fastai.text"]
    from ..data import compat
    placeholder = None if compat.spacy_available() else _spacy_placeholder()
    saved = {name: sys.modules.get(name, _ABSENT) for name in ("spacy", "spacy.symbols")}
    if placeholder is not None:
        sys.modules["spacy"], sys.modules["spacy.symbols"] = placeholder, placeholder.symbols
    try:
        import fastai.text
    except ImportError as e:
        raise FastaiCompatError(f"fastai.text: expected it to import, found {type(e).__name__}: {e}") from e
    finally:
        if placeholder is not None:   # `import spacy` fails again after the import, as before it
            for name, module in saved.items():
                if module is _ABSENT:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module
    compat.apply()
    return fastai.text


_ABSENT = object()   # marks a sys.modules entry that did not exist


def lm_vocab(vocab: Any, store: Any) -> Any:
    """The fastai ``Vocab`` of a language model over `store`.

    `vocab` may be a ``Vocab`` (returned as is), a list of token strings (``itos``), an int (the
    vocabulary size; tokens are named by their id), or None: ``store.meta['itos']``, else
    ``store.meta['vocab_size']``. Raises ``ArgumentError`` (a ``ValueError``) if none is available or
    the size is not >= 1.
    """
    if hasattr(vocab, "itos"):
        return vocab
    if vocab is None:
        vocab = store.meta.get("itos", store.meta.get("vocab_size"))
    if vocab is None:
        raise ArgumentError(f"{store.where}: expected a vocab (Vocab, itos list or size), or 'itos' / 'vocab_size' "
                            "in the store's meta; found none")
    if isinstance(vocab, (bool, np.bool_)) or isinstance(vocab, (int, np.integer)) and vocab < 1:
        raise ArgumentError(f"{store.where}: expected a vocab size >= 1, found {vocab!r}")
    itos = [str(i) for i in range(vocab)] if isinstance(vocab, (int, np.integer)) else [str(t) for t in vocab]
    return import_fastai_text().Vocab(itos)


# ---------------------------------------------------------------------------------------- the stream
class LMStream(Callback):
    """Language-model batches read from a ragged store of token ids (fastai's ``LanguageModelPreLoader``,
    tokens on disk).

    The documents `rows` are concatenated (in a new random order each epoch if `shuffle`) into one
    stream of ``T`` tokens, cut into `bs` contiguous sub-streams of ``L = T // bs`` tokens (the last
    ``T - bs * L`` tokens of an epoch are not used). Batch ``b`` holds for each sub-stream ``j`` the input
    ``x = stream_j[b * bptt : b * bptt + sl]`` and the target ``y``, the same window shifted by one token,
    with ``sl = min(bptt, L - 1 - b * bptt)`` (only the last batch is shorter). Row ``j`` of batch ``b + 1``
    continues row ``j`` of batch ``b``, as a stateful RNN (AWD-LSTM) needs. Item ``k`` is row
    ``k % bs`` of batch ``k // bs``: a loader with ``batch_size=bs, shuffle=False`` yields the batches in
    order, through `__getitems__` (one sorted gather per shard, int64 tensors ``(bs, sl)``).

    RAM: three int64 arrays per document (start, length, order), never the tokens. The epoch's order
    is drawn in `on_epoch_begin` in the main process (fastai calls it: the dataset is a `Callback`),
    so workers (fork or spawn) read the same order; there is no per-row state.

    Raises ``ItemShapeError`` (not a ragged integer store of scalar tokens, fewer than ``2 * bs``
    tokens) and ``TokenIdError`` (a token id outside ``[0, vocab_size)`` in a batch read).
    """
    token_stream = True   # marks a token stream for layers that must not import this one (distributed)

    def __init__(self, store: RaggedArray, rows: Any = None, bs: int = 64, bptt: int = 70, shuffle: bool = False,
                 backwards: bool = False, vocab_size: Optional[int] = None):
        if getattr(store, "kind", None) != "ragged" or store.dtype.kind not in "iu" or store.trailing_shape != ():
            raise ItemShapeError(f"{getattr(store, 'path', store)}: expected a ragged store of integer token ids "
                                 f"(trailing shape ()), found {store!r:.200}")
        for name, v in (("bs", bs), ("bptt", bptt)):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise ArgumentTypeError(f"{store.where}: expected {name} to be an int >= 1, found {v!r:.100}")
        if bs < 1 or bptt < 1:
            raise ArgumentError(f"{store.where}: expected bs >= 1 and bptt >= 1, found bs={bs}, bptt={bptt}")
        self.store, self.bs, self.bptt, self.shuffle, self.backwards = store, int(bs), int(bptt), shuffle, backwards
        self.vocab_size = vocab_size
        self.rows = np.arange(len(store), dtype=np.int64) if rows is None else norm_rows(rows, len(store), store.where)[1]
        self.lengths, self.doc_starts = store.lengths(self.rows), store.starts(self.rows)
        self.total = int(self.lengths.sum())
        self.stream_len = self.total // self.bs
        if self.stream_len < 2:
            raise ItemShapeError(f"{store.where}: expected at least 2 tokens per stream (2 * bs = {2 * self.bs} tokens) "
                                 f"in {len(self.rows)} documents, found {self.total}; lower bs")
        self.n_batches = -(-(self.stream_len - 1) // self.bptt)
        self.set_order(np.arange(len(self.rows)))

    def set_order(self, order: np.ndarray) -> None:
        "Concatenate the documents in `order` (positions in `rows`) from now on."
        self.order = np.asarray(order, np.int64)
        self._cum = np.concatenate([[0], np.cumsum(self.lengths[self.order])]).astype(np.int64)

    def on_epoch_begin(self, **kwargs: Any) -> None:
        "Draw a new document order (``np.random``) if shuffling."
        if self.shuffle:
            self.set_order(np.random.permutation(len(self.rows)))

    def __len__(self) -> int:
        return self.n_batches * self.bs

    def tokens(self, positions: np.ndarray) -> np.ndarray:
        """Token ids at `positions` (any shape, ints in ``[0, total)``) of this epoch's stream, a new int64 array.

        One sorted read per shard. Raises ``TokenIdError`` for ids outside the vocabulary.
        """
        p = np.asarray(positions, np.int64).reshape(-1)
        if self.backwards:
            p = self.total - 1 - p
        i = np.searchsorted(self._cum, p, side="right") - 1
        t = self.store.elements.read(self.doc_starts[self.order[i]] + (p - self._cum[i])).astype(np.int64)
        if self.vocab_size is not None and len(t) and (int(t.min()) < 0 or int(t.max()) >= self.vocab_size):
            bad = int(t[(t < 0) | (t >= self.vocab_size)][0])
            raise TokenIdError(f"{self.store.where}: expected token ids in [0, {self.vocab_size}) (the vocab), "
                               f"found {bad}; vocab and store do not match")
        return t.reshape(np.shape(positions))

    def __getitems__(self, indices: Sequence[int]) -> Collated:
        "Rows `indices` of one batch as a `Collated` ``[x, y]`` of int64 tensors ``(len(indices), sl)``."
        k = np.asarray(indices, np.int64)
        if len(k) == 0 or k.min() < 0 or k.max() >= len(self):
            raise RowIndexError(f"{self.store.where}: expected stream items in [0, {len(self)}), found {k!r:.100}")
        b, j = k // self.bs, k % self.bs
        if (b != b[0]).any():
            raise ArgumentError(f"{self.store.where}: expected the rows of one batch (a loader with batch_size={self.bs}, "
                             f"shuffle=False), found items of batches {np.unique(b)[:5].tolist()}")
        sl = min(self.bptt, self.stream_len - 1 - int(b[0]) * self.bptt)
        pos = (j * self.stream_len + int(b[0]) * self.bptt)[:, None] + np.arange(sl + 1)
        t = torch.from_numpy(self.tokens(pos))
        return Collated([t[:, :-1], t[:, 1:]])

    def __getitem__(self, k: int):
        x, y = self.__getitems__([k])
        return x[0], y[0]

    def __repr__(self) -> str:
        return (f"LMStream({str(self.store.path)!r}, {len(self.rows)} documents, {self.total} tokens, bs={self.bs}, "
                f"bptt={self.bptt}, {self.n_batches} batches)")


class MemmapLMDataBunch(DataBunch):
    """A `DataBunch` for language modelling over a ragged store of token ids (see `LMStream`).

    Has what ``language_model_learner`` reads: ``vocab`` (a fastai ``Vocab``), ``backwards``, a
    flattened cross-entropy ``loss_func``. Build it with `from_memmap`.
    """

    @classmethod
    def from_memmap(cls, path: Union[str, Path, RaggedArray], *, vocab: Any = None, valid_pct: float = 0.1,
                    valid_rows: Any = None, seed: Optional[int] = None, bs: int = 64, val_bs: Optional[int] = None,
                    bptt: int = 70, backwards: bool = False, num_workers: int = 0, device: Any = None,
                    item_path: Optional[Union[str, Path]] = None, dl_tfms: Any = None,
                    tokenizer: Optional[TextTokenizer] = None, **dl_kwargs: Any) -> "MemmapLMDataBunch":
        """Create a language-model `DataBunch` from the ragged store of token ids at `path`.

        Parameters
        ----------
        vocab : Vocab, list of str, int or None
            See `lm_vocab` (default: ``meta['itos']`` or ``meta['vocab_size']`` of the store).
        valid_pct, seed : float, int
            Fraction of the *documents* (items) drawn at random for validation, in ``[0, 1)``, unless
            `valid_rows` (document numbers) is given; `seed` (an int >= 0 or None) fixes the draw.
        bs, val_bs, bptt, backwards
            Streams per batch (train / validation), window length, read the streams backwards.
        num_workers, device, dl_tfms, **dl_kwargs
            As for fastai's ``DataBunch.create`` (``num_workers=0`` by default, as fastai's text bunches).
        item_path : path, optional
            fastai's ``path`` (``models/`` goes there); default: the store's parent.
        tokenizer : TextTokenizer, optional
            How `one_item` (``learn.predict(text)``) tokenises; default: the rules recorded in the
            store's ``meta['tokenizer']`` by `texts_to_memmap`.

        Raises the errors of ``MemmapArray.open``, `LMStream` and `lm_vocab`; ``ArgumentError`` for a
        `valid_pct` outside ``[0, 1)`` or a negative `seed`, ``ArgumentTypeError`` for non-numbers.
        """
        _check_split(valid_pct, seed)
        store = as_store(path)
        vocab = lm_vocab(vocab, store)
        n = len(store)
        if valid_rows is None:
            perm = np.random.default_rng(seed).permutation(n)
            valid_rows = np.sort(perm[:int(valid_pct * n)])
            if not len(valid_rows):
                raise ArgumentError(f"{store.where}: expected valid_pct to select at least one of the {n} documents "
                                    f"for validation, found valid_pct={valid_pct!r} selecting none; raise it or "
                                    "pass valid_rows")
        valid_rows = norm_rows(valid_rows, n, store.where)[1]
        train_rows = np.setdiff1d(np.arange(n, dtype=np.int64), valid_rows)
        kw = dict(bptt=bptt, backwards=backwards, vocab_size=len(vocab.itos))
        train = LMStream(store, train_rows, bs=bs, shuffle=True, **kw)
        valid = LMStream(store, valid_rows, bs=val_bs or bs, shuffle=False, **kw)
        dls = [DataLoader(ds, batch_size=ds.bs, shuffle=False, num_workers=num_workers, **dl_kwargs)
               for ds in (train, valid)]
        data = cls(*dls, path=item_path or store.path.parent, device=device, dl_tfms=dl_tfms,
                   collate_fn=memmap_collate, no_check=True)
        data.vocab, data.backwards = vocab, backwards
        data.text_encoder = TextEncoder(vocab.itos, store.meta.get("tokenizer"), tokenizer)
        return data

    def one_item(self, item: Any, detach: bool = False, denorm: bool = False, cpu: bool = False) -> Any:
        """Get `item` (a text, or a 1-d int array of token ids) into a batch ``(x, x)``: int64 ``(1, n)`` on the device.

        A text is tokenised as the corpus was (`text_to_ids`); ``learn.predict(text, n_words)`` calls this.
        Raises ``ArgumentError`` for a text when the store records no tokenizer and none was given,
        ``TokenIdError`` for ids outside the vocab."""
        if isinstance(item, str):
            ids = self.text_encoder(item)
        else:
            ids = _check_ids(item, len(self.vocab.itos))
        x = torch.from_numpy(ids)[None]
        x = x if cpu else x.to(self.device)
        return x, x.clone()

    @property
    def loss_func(self) -> Any:
        "Flattened cross-entropy over ``(bs, sl, vocab)`` predictions and ``(bs, sl)`` targets."
        return CrossEntropyFlat()


def _check_split(valid_pct: Any, seed: Any) -> None:
    "Refuse a `valid_pct` outside ``[0, 1)`` (-0.2 would make 80% of the documents validation) or a bad `seed`."
    if isinstance(valid_pct, (bool, np.bool_)) or not isinstance(valid_pct, (int, float, np.integer, np.floating)):
        raise ArgumentTypeError(f"valid_pct: expected a number in [0, 1), found {valid_pct!r:.100}")
    if not 0 <= valid_pct < 1:   # NaN fails too
        raise ArgumentError(f"valid_pct: expected a fraction in [0, 1) of the documents, found {valid_pct!r}")
    if seed is not None:
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
            raise ArgumentTypeError(f"seed: expected an int >= 0 or None, found {seed!r:.100}")
        if seed < 0:
            raise ArgumentError(f"seed: expected an int >= 0 or None, found {seed}")


# ---------------------------------------------------------------------------------------- raw text
def _check_ids(item: Any, vocab_size: int) -> np.ndarray:
    a = np.asarray(item.cpu() if isinstance(item, torch.Tensor) else item)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise ItemShapeError(f"expected a text or a 1-d array of integer token ids, found shape {a.shape} dtype {a.dtype}")
    a = a.astype(np.int64)
    if a.size and (int(a.min()) < 0 or int(a.max()) >= vocab_size):
        raise TokenIdError(f"expected token ids in [0, {vocab_size}) (the vocab), found {int(a.min())}..{int(a.max())}")
    return a


class TextEncoder:
    """Raw text → token ids with one vocabulary and one tokenizer, as `texts_to_memmap` (and fastai's
    ``TextList``) produce them.

    Parameters
    ----------
    itos : list of str
        The vocabulary; a token not in it becomes id 0 (``xxunk``).
    meta : dict, optional
        A store's ``meta['tokenizer']`` (see `tokenizer_meta`), used when `tokenizer` is None.
    tokenizer : TextTokenizer, optional

    The tokenizer (spaCy) and the token → id table are built on the first call, once per process;
    pickles as ``(itos, meta, tokenizer)`` without them.
    """

    def __init__(self, itos: Sequence[str], meta: Optional[dict] = None, tokenizer: Optional[TextTokenizer] = None):
        self.itos, self.meta, self.tokenizer = list(itos), meta, tokenizer
        self._stoi: Optional[dict] = None

    def __getstate__(self) -> dict:
        return {**vars(self), "_stoi": None}

    def __call__(self, text: str) -> np.ndarray:
        """Ids of `text`: a new int64 array of shape ``(n_tokens,)``.

        Raises ``ArgumentTypeError`` if `text` is not a str, ``ArgumentError`` if there is neither a
        tokenizer nor tokenizer meta (a store of ids tokenised elsewhere: pass ids instead)."""
        if not isinstance(text, str):
            raise ArgumentTypeError(f"text: expected a str, found {type(text).__name__}")
        if self.tokenizer is None:
            if not self.meta:
                raise ArgumentError("text: expected a tokenizer (the store's meta['tokenizer'], written by "
                                    "texts_to_memmap, or tokenizer=), found none; pass token ids instead of text")
            self.tokenizer = tokenizer_from_meta(self.meta)
        if self._stoi is None:
            self._stoi = {v: k for k, v in enumerate(self.itos)}   # fastai's Vocab.stoi (last of a repeated token)
        return np.array([self._stoi.get(t, 0) for t in self.tokenizer([text])[0]], dtype=np.int64)


def text_to_ids(text: str, itos: Sequence[str], meta: Optional[dict] = None,
                tokenizer: Optional[TextTokenizer] = None) -> np.ndarray:
    """Token ids of one raw `text` (``TextEncoder(itos, meta, tokenizer)(text)``; build a `TextEncoder`
    to encode many). Returns a new int64 array ``(n_tokens,)``; raises like `TextEncoder`."""
    return TextEncoder(itos, meta, tokenizer)(text)


# ---------------------------------------------------------------------------------------- classification
def _meta_pad(meta: dict) -> int:
    itos = meta.get("itos") or []
    return itos.index("xxpad") if "xxpad" in itos else 1


class TextIdProcessor(RaggedProcessor):
    """`RaggedProcessor` of a token-id store that also takes raw text at predict time.

    State (pickled by ``export``): the store's kind, dtype, shape and ``meta`` (``itos``, ``tokenizer``), so
    a learner from ``load_learner`` tokenises ``learn.predict("some text")`` with the corpus' rules."""

    def __getstate__(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "_encoder"}

    def process_one(self, item: Any) -> Any:
        "Tokenise and numericalise a text (a str), then turn it, or raw ids, into a `RaggedItem`."
        if isinstance(item, str):
            if getattr(self, "_encoder", None) is None:
                self._encoder = TextEncoder(self.meta.get("itos") or [], self.meta.get("tokenizer"))
            item = self._encoder(item)
        return super().process_one(item)


class MemmapTextList(RaggedItemList):
    """A `RaggedItemList` over a store of token ids, batched as fastai's text classifier expects.

    Create it with ``MemmapTextList.from_memmap(path)`` on a store written by `texts_to_memmap`.
    Batches are int64 ``(bs, longest)`` tensors padded *before* the ids with ``xxpad``'s id (fastai's
    ``pad_collate(pad_first=True)``), without lengths (``output=None``): the input of
    ``text_classifier_learner``'s model. `vocab` (read by ``text_classifier_learner``) comes from the
    store's ``meta['itos']`` or, after ``load_learner``, from the processor. Raises like `RaggedItemList`.
    """
    _processor = TextIdProcessor

    def __init__(self, items: Any, store: Optional[Any] = None, pad_value: Any = None, pad_first: bool = True,
                 output: Optional[str] = None, **kwargs):
        if pad_value is None:
            pad_value = _meta_pad(dict(getattr(store, "meta", None) or {}))
        super().__init__(items, store=store, pad_value=pad_value, pad_first=pad_first, output=output, **kwargs)

    def _meta(self) -> dict:
        if self.store is not None:
            return self.store.meta
        procs = [p for p in (self.processor or []) if isinstance(p, RaggedProcessor)] if isinstance(
            self.processor, (list, tuple)) else [self.processor]
        return next((p.meta for p in procs if getattr(p, "meta", None)), {})

    @property
    def vocab(self) -> Any:
        "The fastai ``Vocab`` of the ids (``meta['itos']``); ``ArgumentError`` if the store has none."
        itos = self._meta().get("itos")
        if not itos:
            raise ArgumentError(f"{getattr(self.store, 'path', type(self).__name__)}: expected meta['itos'] (the vocab) "
                                "in the token store, found none; write it with texts_to_memmap or meta={'itos': ...}")
        return import_fastai_text().Vocab(list(itos))
