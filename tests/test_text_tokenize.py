"""Raw text → token store (fastai_memmap.text.tokenize): ids equal fastai's ``TextList`` on the same corpus
for every kind of source, in parallel or not; atomic on error; then LM ``predict`` and a classifier with
export → ``load_learner`` → ``predict(text)``."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

import fastai_memmap  # noqa: F401
from fastai_memmap import save_memmap
from fastai_memmap.errors import (ArgumentError, ArgumentTypeError, ColumnNotFoundError, FormatError, OverlapError,
                                  SourceNotFoundError, StoreExistsError)
from fastai_memmap.store.ragged import RaggedArray

pytest.importorskip("spacy", reason="the text extra (spaCy) is not installed")

import fastai.text as ft  # noqa: E402
from fastai.basic_train import load_learner  # noqa: E402
from fastai_memmap.text.lm import MemmapLMDataBunch, MemmapTextList, TextEncoder  # noqa: E402
from fastai_memmap.text.tokenize import list_text_files, texts_to_memmap  # noqa: E402

WORDS = ["the", "The", "cat", "DOG", "sat", "on", "a", "mat", "!!!!", "it's", "don't", "U.S.", "http://x.org",
         "#tag", "<br />", "&amp;", "hello", "World", "ok ok ok ok", "\n"] + [f"w{i}" for i in range(60)]


@pytest.fixture(scope="module")
def docs():
    "300 documents (one empty) exercising fastai's rules: caps, repetitions, html, '#', '/', newlines."
    rng = np.random.default_rng(7)
    d = [" ".join(rng.choice(WORDS, rng.integers(0, 40))) for _ in range(300)]
    d[4] = ""
    return d


def textlist(items, **kw):
    "fastai's own result: (ids per document, itos)."
    x = ft.TextList(items, **kw).split_none().label_for_lm().train.x
    return [np.asarray(i) for i in x.items], x.vocab.itos


def assert_same(store_path, corpus, want_ids, want_itos):
    store = RaggedArray.open(store_path)
    assert corpus.vocab.itos == want_itos == store.meta["itos"]
    assert len(store) == len(want_ids) == corpus.rows and corpus.tokens == sum(map(len, want_ids))
    for i, ids in enumerate(want_ids):
        assert np.array_equal(store[i], ids), i


@pytest.fixture(scope="module")
def fastai_ids(docs):
    return textlist(docs)


@pytest.mark.parametrize("workers,chunk_docs", [(1, 1000), (2, 37)])
def test_strings_give_textlist_ids(tmp_path, docs, fastai_ids, workers, chunk_docs):
    corpus = texts_to_memmap(docs, tmp_path / "t", workers=workers, chunk_docs=chunk_docs, progress=False)
    assert_same(tmp_path / "t", corpus, *fastai_ids)
    assert RaggedArray.open(tmp_path / "t").dtype == np.int32
    assert sorted(os.listdir(tmp_path)) == [".t.lock", "t"]   # the writer's lock file; no provisional store left


def test_csv_jsonl_dataframe_and_records_give_textlist_ids(tmp_path, docs):
    df = pd.DataFrame({"text": docs, "label": np.arange(len(docs)) % 3})
    df.loc[7, "text"] = np.nan                          # fastai: the text "nan"
    df.to_csv(tmp_path / "d.csv", index=False)
    want = textlist(pd.read_csv(tmp_path / "d.csv")["text"].values)
    corpus = texts_to_memmap(tmp_path / "d.csv", tmp_path / "csv", column="text", chunk_docs=50, workers=2,
                             progress=False)
    assert_same(tmp_path / "csv", corpus, *want)
    with open(tmp_path / "d.jsonl", "w") as f:
        for t in docs:
            f.write(json.dumps({"text": t}) + "\n")
    for name, src in (("jsonl", tmp_path / "d.jsonl"), ("df", pd.DataFrame({"text": docs})),
                      ("records", [{"text": t} for t in docs])):
        corpus = texts_to_memmap(src, tmp_path / name, column="text", workers=1, progress=False)
        assert_same(tmp_path / name, corpus, *textlist(docs))


def test_two_text_columns_with_field_marks(tmp_path, docs):
    df = pd.DataFrame({"title": docs[::-1], "body": docs})
    want_x = ft.TextList.from_df(df, cols=["title", "body"],
                                 processor=[ft.TokenizeProcessor(mark_fields=True), ft.NumericalizeProcessor()])
    x = want_x.split_none().label_for_lm().train.x
    corpus = texts_to_memmap(df, tmp_path / "t", column=["title", "body"], mark_fields=True, progress=False)
    assert_same(tmp_path / "t", corpus, [np.asarray(i) for i in x.items], x.vocab.itos)
    assert "xxfld" in corpus.vocab.itos[:9]


def test_folder_gives_textlist_ids_in_sorted_order(tmp_path, docs):
    root = tmp_path / "corpus"
    for i, t in enumerate(docs[:60]):
        sub = root / ("pos" if i % 2 else "neg")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:03d}.txt").write_text(t, encoding="utf-8")
    (root / "notes.md").write_text("not a text file")
    files = list_text_files(root)
    assert len(files) == 60 and files == sorted(files, key=lambda p: p.relative_to(root).parts)
    corpus = texts_to_memmap(root, tmp_path / "t", workers=2, chunk_docs=8, progress=False)
    want = textlist(files, processor=[ft.OpenFileProcessor(), ft.TokenizeProcessor(), ft.NumericalizeProcessor()])
    assert_same(tmp_path / "t", corpus, *want)
    corpus = texts_to_memmap(iter(files), tmp_path / "paths", progress=False)   # an iterable of Path: files
    assert_same(tmp_path / "paths", corpus, *want)


def test_given_vocab_one_pass_unknown_is_xxunk(tmp_path, docs, fastai_ids):
    _, itos = fastai_ids
    small = itos[:20]
    corpus = texts_to_memmap(docs, tmp_path / "t", vocab=ft.Vocab(small), progress=False)
    want = textlist(docs, processor=[ft.TokenizeProcessor(), ft.NumericalizeProcessor(vocab=ft.Vocab(small))])[0]
    store = RaggedArray.open(tmp_path / "t")
    assert corpus.vocab.itos == small and all(np.array_equal(store[i], w) for i, w in enumerate(want))
    assert int(store.elements.read(np.arange(corpus.tokens)).max()) < 20 and (store.elements.read(
        np.arange(corpus.tokens)) == 0).any()


def test_max_vocab_and_min_freq_as_fastai(tmp_path, docs):
    proc = [ft.TokenizeProcessor(), ft.NumericalizeProcessor(max_vocab=30, min_freq=1)]
    ids, itos = textlist(docs, processor=proc)
    corpus = texts_to_memmap(docs, tmp_path / "t", max_vocab=30, min_freq=1, progress=False)
    assert len(itos) == 30 and corpus.vocab.itos == itos
    assert all(np.array_equal(RaggedArray.open(tmp_path / "t")[i], w) for i, w in enumerate(ids))


def test_worker_error_leaves_nothing(tmp_path, docs):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(30):
        (root / f"{i:02d}.txt").write_text(docs[i])
    (root / "17.txt").write_bytes(b"caf\xe9 latin-1")
    save_memmap(tmp_path / "old", [np.arange(3, dtype=np.int32)], kind="ragged")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FormatError, match=r"17\.txt: expected UTF-8 text"):
        texts_to_memmap(root, tmp_path / "old", workers=2, chunk_docs=4, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert np.array_equal(RaggedArray.open(tmp_path / "old")[0], np.arange(3))   # the old store is unchanged


@pytest.mark.parametrize("call,error,words", [
    (lambda d, p: texts_to_memmap(["a", b"b"], p), ArgumentTypeError, "expected str documents, found bytes at position 1"),
    (lambda d, p: texts_to_memmap(42, p), ArgumentTypeError, "found int"),
    (lambda d, p: texts_to_memmap(["a"], p, column="text"), ArgumentError, "expected column=None"),
    (lambda d, p: texts_to_memmap(pd.DataFrame({"a": ["x"]}), p), ArgumentError, "expected column="),
    (lambda d, p: texts_to_memmap(pd.DataFrame({"a": ["x"]}), p, column="text"), ColumnNotFoundError, "['text']"),
    (lambda d, p: texts_to_memmap(d / "missing.csv", p, column="t"), SourceNotFoundError, "found nothing"),
    (lambda d, p: texts_to_memmap(d, p), SourceNotFoundError, "found none"),
    (lambda d, p: texts_to_memmap(["a"], p, max_vocab=0), ArgumentError, "max_vocab: expected an int >= 1, found 0"),
    (lambda d, p: texts_to_memmap(["a"], p, workers=1.5), ArgumentTypeError, "workers"),
    (lambda d, p: texts_to_memmap(["a"], p, dtype=np.float32), ArgumentTypeError, "integer dtype"),
    (lambda d, p: texts_to_memmap(["a"], p, vocab=["t"] * 300, dtype=np.int8), ArgumentError, "ids up to 299"),
    (lambda d, p: texts_to_memmap(["a"], p, vocab="abc"), ArgumentTypeError, "vocab: expected"),
])
def test_bad_input_refused_before_any_work(tmp_path, call, error, words):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(error) as ei:
        call(src, tmp_path / "out")
    assert words in str(ei.value), str(ei.value)
    assert not (tmp_path / "out").exists()


def test_output_inside_source_folder_refused(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(OverlapError, match="lies inside"):
        texts_to_memmap(tmp_path, tmp_path / "tokens", progress=False)


def test_existing_store_needs_overwrite(tmp_path):
    texts_to_memmap(["a b"], tmp_path / "t", progress=False)
    with pytest.raises(StoreExistsError):
        texts_to_memmap(["c d"], tmp_path / "t", progress=False)


# ---------------------------------------------------------------------------------------- learners
REVIEWS = (["the movie was good and great", "a lovely fine film", "the plot was great"],
           ["the movie was bad and awful", "a poor sad film", "the plot was awful"])


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    "120 labelled reviews in a token store and a label store."
    path = tmp_path_factory.mktemp("reviews")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 120)
    texts = [str(rng.choice(REVIEWS[1 - y])).capitalize() + "!" for y in labels]
    corpus = texts_to_memmap(texts, path / "tokens", progress=False, min_freq=1)
    save_memmap(path / "labels", labels.astype(np.int64), meta={"classes": ["neg", "pos"]})
    return path, corpus, texts, labels


def test_language_model_predicts_words(reviews):
    path, corpus, _, _ = reviews
    data = MemmapLMDataBunch.from_memmap(corpus.path, bs=4, bptt=8, seed=0)
    config = dict(ft.awd_lstm_lm_config, emb_sz=16, n_hid=24, n_layers=1)
    learn = ft.language_model_learner(data, ft.AWD_LSTM, config=config, pretrained=False)
    learn.fit(1, 1e-2)
    x, _ = data.one_item("The movie was")
    assert x.tolist() == [[corpus.vocab.itos.index(t) for t in ["xxbos", "xxmaj", "the", "movie", "was"]]]
    out = learn.predict("The movie was", n_words=5, decoder=lambda tokens: tokens)   # raw tokens: no xxmaj merge
    assert out.startswith("The movie was ")
    words = out[len("The movie was "):].split(" ")
    assert len(words) == 5 and set(words) <= set(corpus.vocab.itos) - {"xxunk"}          # no_unk=True
    assert learn.predict("The movie was", n_words=2).startswith("The movie was ")


def test_classifier_export_load_learner_predict_text(reviews):
    path, corpus, texts, labels = reviews
    data = (MemmapTextList.from_memmap(corpus.path).split_by_rand_pct(0.25, seed=0)
            .label_from_memmap(path / "labels").databunch(bs=8, num_workers=0))
    xb, yb = data.one_batch()
    assert data.vocab.itos == corpus.vocab.itos and xb.dtype == torch.int64 and xb.ndim == 2
    assert (xb[:, -1] != 1).all() and (xb[:, 0] == 1).any() | (xb[:, 0] == 2).all()   # xxpad (1) first
    config = dict(ft.awd_lstm_clas_config, emb_sz=16, n_hid=24, n_layers=1)
    learn = ft.text_classifier_learner(data, ft.AWD_LSTM, config=config, pretrained=False)
    learn.fit_one_cycle(3, 3e-2)
    text = texts[0]
    ids = RaggedArray.open(corpus.path)[0]
    by_text, by_ids = learn.predict(text), learn.predict(ids)
    assert torch.allclose(by_text[2], by_ids[2])                       # predict(text) tokenises like the store
    learn.export()
    loaded = load_learner(path)
    again = loaded.predict(text)
    assert int(again[1]) == int(by_text[1]) and torch.allclose(again[2], by_text[2], atol=1e-6)
    assert np.array_equal(TextEncoder(corpus.vocab.itos, RaggedArray.open(corpus.path).meta["tokenizer"])(text), ids)
