"""Language modelling from a ragged store of token ids (fastai_memmap.text.lm): the streams match the
documents token for token, workers see the same batches, fastai.text imports without spacy, and
``language_model_learner`` trains one short epoch."""
import sys

import numpy as np
import pytest
import torch

import fastai_memmap  # noqa: F401  (applies the fastai compat fixes)
from fastai_memmap import save_memmap
from fastai_memmap.errors import (ArgumentError, ArgumentTypeError, FastaiCompatError, ItemShapeError, RowIndexError,
                                  TokenIdError)
from fastai_memmap.store.ragged import RaggedArray
from fastai_memmap.text.lm import LMStream, MemmapLMDataBunch, import_fastai_text, lm_vocab

V = 40




@pytest.fixture
def corpus(tmp_path, rng):
    "120 documents (some empty) of token ids 2..V-1; the store's meta holds the vocab."
    docs = [rng.integers(2, V, n).astype(np.int32) for n in rng.integers(0, 50, 120)]
    docs[3] = docs[50] = np.zeros(0, np.int32)
    save_memmap(tmp_path / "c", docs, kind="ragged", shard_rows=45, meta={"itos": [f"w{i}" for i in range(V)]})
    return tmp_path / "c", docs


def stream_rows(ds):
    "Every batch of `ds` (item order of a shuffle=False loader): x and y rows concatenated per sub-stream."
    xs, ys = [[] for _ in range(ds.bs)], [[] for _ in range(ds.bs)]
    for b in range(ds.n_batches):
        x, y = ds.__getitems__(list(range(b * ds.bs, (b + 1) * ds.bs)))
        assert x.dtype == torch.int64 and x.shape == y.shape and x.shape[1] <= ds.bptt
        for j in range(ds.bs):
            xs[j] += x[j].tolist()
            ys[j] += y[j].tolist()
    return xs, ys


@pytest.mark.parametrize("backwards", [False, True])
def test_streams_are_the_documents_in_order(corpus, backwards):
    path, docs = corpus
    store = RaggedArray.open(path)
    rows = np.array([0, 3, 7, 50, 9, 11, 119])
    ds = LMStream(store, rows, bs=3, bptt=5, backwards=backwards, shuffle=True)
    for epoch in range(2):
        ds.on_epoch_begin()
        text = np.concatenate([docs[rows[i]] for i in ds.order]).tolist()
        if backwards:
            text = text[::-1]
        L = len(text) // 3
        xs, ys = stream_rows(ds)
        for j in range(3):                          # x: tokens 0..L-2 of sub-stream j, y: tokens 1..L-1
            assert xs[j] == text[j * L:(j + 1) * L - 1] and ys[j] == text[j * L + 1:(j + 1) * L]
    assert sorted(ds.order.tolist()) == list(range(len(rows)))
    x, y = ds[4]                                    # one row (sanity checks, single_dl)
    assert x.shape == (5,) and x[1:].tolist() == y[:-1].tolist()
    with pytest.raises(ValueError, match="one batch"):
        ds.__getitems__([0, 3])                     # rows of two batches


def test_databunch_has_what_language_model_learner_reads(corpus):
    path, docs = corpus
    data = MemmapLMDataBunch.from_memmap(path, bs=4, bptt=8, valid_pct=0.2, seed=0)
    assert data.vocab.itos[5] == "w5" and data.backwards is False
    assert len(data.train_ds.rows) + len(data.valid_ds.rows) == len(docs) and len(data.valid_ds.rows) == 24
    assert not set(data.train_ds.rows.tolist()) & set(data.valid_ds.rows.tolist())
    assert data.train_ds.total == sum(len(docs[r]) for r in data.train_ds.rows)
    x, y = data.one_batch()
    assert x.shape == (4, 8) and torch.equal(x[:, 1:], y[:, :-1])
    assert data.loss_func(torch.zeros(4, 8, V), y).ndim == 0
    # RAM: a few integers per document, no token list
    sizes = [v.nbytes for v in vars(data.train_ds).values() if isinstance(v, np.ndarray)]
    assert sum(sizes) <= 5 * 8 * len(docs)


def test_workers_deliver_the_same_batches(corpus):
    path, _ = corpus
    data = MemmapLMDataBunch.from_memmap(path, bs=4, bptt=8, seed=1)
    data.train_ds.on_epoch_begin()                  # fastai calls this before iterating (the dataset is a Callback)
    expect = [(x.clone(), y.clone()) for x, y in data.train_dl]
    workers = data.train_dl.new(num_workers=2)
    got = list(workers)
    assert len(got) == len(expect) == data.train_ds.n_batches
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expect))


def test_bad_inputs_refused(corpus, tmp_path):
    path, _ = corpus
    store = RaggedArray.open(path)
    with pytest.raises(TokenIdError, match=r"expected token ids in \[0, 10\)") as ei:
        LMStream(store, bs=2, bptt=4, vocab_size=10).__getitems__([0, 1])
    assert str(path) in str(ei.value)
    with pytest.raises(ItemShapeError, match="at least 2 tokens per stream"):
        LMStream(store, rows=[3], bs=2)             # an empty document only
    floats = RaggedArray.open(save_memmap(tmp_path / "f", [np.zeros(3, "f4")], kind="ragged"))
    with pytest.raises(ItemShapeError, match="integer token ids"):
        LMStream(floats)
    no_vocab = save_memmap(tmp_path / "n", [np.zeros(3, "i4")], kind="ragged")
    with pytest.raises(ArgumentError, match="expected a vocab"):
        MemmapLMDataBunch.from_memmap(no_vocab)
    assert lm_vocab(3, store).itos == ["0", "1", "2"]
    with pytest.raises(ArgumentError, match="expected a vocab size >= 1, found 0"):
        lm_vocab(0, store)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(valid_pct=-0.2), ArgumentError, "valid_pct: expected a fraction in [0, 1) of the documents, found -0.2"),
    (dict(valid_pct=1.0), ArgumentError, "found 1.0"),
    (dict(valid_pct=1.5), ArgumentError, "found 1.5"),
    (dict(valid_pct=float("nan")), ArgumentError, "found nan"),
    (dict(valid_pct="0.1"), ArgumentTypeError, "valid_pct: expected a number"),
    (dict(valid_pct=True), ArgumentTypeError, "valid_pct"),
    (dict(seed=-1), ArgumentError, "seed: expected an int >= 0 or None, found -1"),
    (dict(seed=0.5), ArgumentTypeError, "seed"),
    (dict(bs=0), ArgumentError, "expected bs >= 1 and bptt >= 1, found bs=0"),
    (dict(bptt=2.5), ArgumentTypeError, "bptt to be an int"),
])
def test_bad_split_and_sizes_refused_before_any_work(corpus, kwargs, error, words):
    "valid_pct=-0.2 used to make 8 of 10 documents validation (perm[:int(-0.2 * n)] is all but the last 20%)."
    path, _ = corpus
    with pytest.raises(error) as ei:
        MemmapLMDataBunch.from_memmap(path, **{"bs": 2, "bptt": 4, **kwargs})
    assert words in str(ei.value), str(ei.value)


@pytest.mark.parametrize("valid_pct", [0, 0.0, 0.005, 0.25, 0.999])
def test_valid_pct_in_range_takes_that_fraction_of_documents(corpus, valid_pct):
    path, docs = corpus
    if int(valid_pct * len(docs)) == 0:   # no validation document: a stream cannot be built, say why
        with pytest.raises(ArgumentError, match=f"at least one of the {len(docs)} documents .*selecting none"):
            MemmapLMDataBunch.from_memmap(path, valid_pct=valid_pct, seed=0, bs=2, bptt=4)
        return
    data = MemmapLMDataBunch.from_memmap(path, valid_pct=valid_pct, seed=0, bs=2, bptt=4)
    valid, train = data.valid_ds, data.train_ds
    assert len(valid.rows) == int(valid_pct * len(docs)) and len(train.rows) == len(docs) - len(valid.rows)
    assert not set(valid.rows.tolist()) & set(train.rows.tolist())


def test_stream_items_out_of_range_or_of_two_batches_refused(corpus):
    path, _ = corpus
    ds = LMStream(RaggedArray.open(path), bs=2, bptt=4)
    with pytest.raises(RowIndexError, match=rf"expected stream items in \[0, {len(ds)}\)"):
        ds.__getitems__([len(ds)])
    with pytest.raises(ArgumentError, match="expected the rows of one batch"):
        ds.__getitems__([0, 2])


def test_fastai_text_imports_without_spacy():
    text = import_fastai_text()
    assert text is sys.modules["fastai.text"] and hasattr(text, "language_model_learner")
    if getattr(text.transform.spacy, "__file__", None) is None:     # spacy missing: a placeholder was used
        assert "spacy" not in sys.modules                             # ... only during the import
        with pytest.raises(FastaiCompatError, match="spacy is not installed"):
            text.SpacyTokenizer("en")
        with pytest.raises(ImportError):
            import spacy  # noqa: F401


def test_language_model_learner_trains_one_epoch(corpus):
    from fastai.metrics import accuracy
    path, _ = corpus
    text = import_fastai_text()
    data = MemmapLMDataBunch.from_memmap(path, bs=4, bptt=10, seed=0)
    config = dict(text.awd_lstm_lm_config, emb_sz=16, n_hid=24, n_layers=2)
    learn = text.language_model_learner(data, text.AWD_LSTM, config=config, pretrained=False, metrics=[accuracy])
    assert isinstance(learn, text.LanguageLearner)
    learn.fit_one_cycle(1, 1e-2)
    loss, acc = learn.validate()
    assert np.isfinite(loss) and 0 <= float(acc) <= 1
    assert len(learn.recorder.losses) == data.train_ds.n_batches
