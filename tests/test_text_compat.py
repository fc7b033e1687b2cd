"""fastai.text on this stack (fastai_memmap.data.compat): spaCy 3 in `SpacyTokenizer`, QRNN's in-place gates,
IPython 9's `display`, the import hook. Each fix is shown necessary (fastai's own code, kept as
``__wrapped__`` or reached in a fresh interpreter, fails) and sufficient (the patched code works)."""
import json
import subprocess
import sys

import pytest
import torch

import fastai_memmap  # noqa: F401  (applies the fixes, installs the import hook)
from fastai_memmap.data import compat

pytest.importorskip("spacy", reason="the text extra (spaCy) is not installed")

import fastai.text as text  # noqa: E402  (after fastai_memmap: loaded through the import hook)
from fastai.text.models import qrnn  # noqa: E402

NO_SPACY = r'''
import json, sys
sys.modules["spacy"] = None              # `import spacy` now fails as if it were not installed
import fastai_memmap
from fastai_memmap.errors import FastaiCompatError
out = {}
try:
    import fastai.text
    out["import"] = None
except ImportError as e:
    out["import"] = [type(e).__name__, isinstance(e, FastaiCompatError), str(e)]
from fastai_memmap.text.lm import import_fastai_text
t = import_fastai_text()                  # the case it still serves: pre-tokenised ids, no spaCy
out["lm"] = hasattr(t, "language_model_learner") and hasattr(t, "AWD_LSTM")
out["spacy_after"] = sys.modules.get("spacy", "absent")
try:
    t.SpacyTokenizer("en")
    out["tokenizer"] = None
except ImportError as e:
    out["tokenizer"] = [type(e).__name__, str(e)]
print(json.dumps(out))
'''

IMPORT_AFTER = r'''
import json, sys
import fastai_memmap
from fastai_memmap.data import compat
before = [n for n in ("fastai.text", "spacy") if n in sys.modules]
import fastai.text
from fastai.text.models import qrnn
print(json.dumps({"before": before, "tokenizer": compat._is_ours(fastai.text.SpacyTokenizer.__init__),
                  "qrnn": compat._is_ours(qrnn.QRNNLayer.forward), "np": type(fastai.text.data.np).__name__,
                  "applied": compat.applied(), "patches": sorted(compat.PATCHES),
                  "tokens": fastai.text.Tokenizer(n_cpus=1).process_all(["Hello WORLD"])[0]}))
'''


@pytest.fixture(scope="module")
def fresh():
    "Both fresh interpreters at once (each spends several seconds importing fastai)."
    procs = {name: subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, code in (("no_spacy", NO_SPACY), ("after", IMPORT_AFTER))}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        results[name] = json.loads(out.strip().splitlines()[-1])
    return results


# ---------------------------------------------------------------------------------------- spaCy 3
def test_fastai_spacy_tokenizer_fails_on_spacy3_without_the_fix():
    init = text.SpacyTokenizer.__init__
    assert compat._is_ours(init)
    with pytest.raises(TypeError, match="disable"):
        init.__wrapped__(object.__new__(text.SpacyTokenizer), "en")


def test_tokenizer_rules_on_spacy3():
    tok = text.Tokenizer(n_cpus=1)
    got = tok.process_all(["Hello WORLD, it's a test!!!! <br />A/B", ""])
    assert got == [["xxmaj", "hello", "xxup", "world", ",", "it", "'s", "a", "test", "xxrep", "4", "!", "\n ",
                    "a", "/", "b"], []]
    assert text.SpacyTokenizer("en").lang == "en"


# ---------------------------------------------------------------------------------------- QRNN
def test_fastai_qrnn_forward_fails_with_gradients_without_the_fix():
    layer = qrnn.QRNNLayer(4, 6)
    with pytest.raises(RuntimeError, match="modified inplace"):
        qrnn.QRNNLayer.forward.__wrapped__(layer, torch.randn(2, 5, 4))


@pytest.mark.parametrize("kw", [dict(), dict(window=2, save_prev_x=True), dict(output_gate=False),
                                dict(backward=True), dict(zoneout=0.0)])
def test_qrnn_forward_backward_matches_fastai_without_grad(kw):
    "Same outputs as fastai's forward (which works under no_grad), and gradients flow."
    torch.manual_seed(0)
    layer, x = qrnn.QRNNLayer(4, 6, **kw), torch.randn(3, 5, 4)
    with torch.no_grad():
        want, want_h = qrnn.QRNNLayer.forward.__wrapped__(layer, x)
    layer.reset()
    out, h = layer(x.requires_grad_())
    assert torch.allclose(out, want) and torch.allclose(h, want_h) and out.shape == (3, 5, 6)
    (out.sum() + h.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and layer.linear.weight.grad.abs().sum() > 0


def test_awd_lstm_with_qrnn_trains_a_step():
    config = dict(text.awd_lstm_lm_config, emb_sz=8, n_hid=12, n_layers=2, qrnn=True)
    model = text.get_language_model(text.AWD_LSTM, 20, config=config)
    x = torch.randint(0, 20, (2, 7))
    loss = torch.nn.functional.cross_entropy(model(x)[0].reshape(-1, 20), x.reshape(-1))
    loss.backward()
    leaves = {n: p for n, p in model.named_parameters() if p.is_leaf}   # WeightDropout's copies are not leaves
    assert torch.isfinite(loss) and "0.rnns.1.layers.0.linear.weight_raw" in leaves
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in leaves.values())


# ---------------------------------------------------------------------------------------- IPython 9
def test_doc_is_back_in_fastai_basics_and_ipython_untouched():
    pytest.importorskip("nbconvert", reason="fastai's doc() needs nbconvert")
    import IPython.core.display as core_display
    import fastai.basics
    if int(__import__("IPython").__version__.split(".")[0]) >= 9:
        with pytest.raises(ImportError, match="display"):   # what fastai's gen_doc imports, still gone
            from IPython.core.display import display  # noqa: F401
        assert compat.PATCHES["ipython_display"].targets
    assert type(sys.modules["IPython.core.display"]) is type(core_display) and not isinstance(
        core_display, compat._ModuleProxy)
    assert callable(fastai.basics.doc) and "doc" in fastai.basics.__all__
    from fastai.gen_doc.nbdoc import display
    from IPython.display import display as real
    assert display is real


# ---------------------------------------------------------------------------------------- import hook
def test_fastai_text_imported_after_fastai_memmap_is_patched(fresh):
    r = fresh["after"]
    assert r["before"] == [] and r["tokenizer"] and r["qrnn"] and r["np"] == "_ModuleProxy" and r["applied"]
    assert {"spacy3_tokenizer", "qrnn_inplace", "text_import_hook"} <= set(r["patches"])
    assert r["tokens"] == ["xxmaj", "hello", "xxup", "world"]


def test_import_fastai_text_without_spacy_names_the_extra(fresh):
    r = fresh["no_spacy"]
    name, ours, message = r["import"]
    assert name == "FastaiCompatError" and ours
    assert "fastai_memmap[text]" in message and "spaCy" in message
    assert r["lm"] is True and r["spacy_after"] is None   # import_fastai_text restores sys.modules['spacy']
    assert r["tokenizer"][0] == "FastaiCompatError" and "spacy is not installed" in r["tokenizer"][1]


def test_apply_again_changes_nothing_in_fastai_text():
    compat.apply()   # records the fastai.text modules loaded since the first call (ragged_array targets)
    snapshot = [text.SpacyTokenizer.__init__, qrnn.QRNNLayer.forward, text.data.np, list(sys.meta_path),
                dict(compat.PATCHES)]
    compat.apply()
    again = [text.SpacyTokenizer.__init__, qrnn.QRNNLayer.forward, text.data.np, list(sys.meta_path),
             dict(compat.PATCHES)]
    assert all(a is b for a, b in zip(snapshot[:3], again[:3]))
    assert snapshot[3] == again[3] and snapshot[4] == again[4] and compat.applied()
    assert sum(isinstance(f, compat._TextImportHook) for f in sys.meta_path) == 1
