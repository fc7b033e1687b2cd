"""The text layer: raw text tokenised out of core into token stores, and the fastai.text lists and
bunches over them (language models and classifiers).

=========  ======================================================================================
module     concept
=========  ======================================================================================
tokenize   `texts_to_memmap`: fastai's tokenisation rules (spaCy), streamed into a ragged id store
lm         `MemmapLMDataBunch`, `LMStream`, `MemmapTextList`: language models and classifiers
=========  ======================================================================================
"""
from .tokenize import texts_to_memmap
from .lm import LMStream, MemmapLMDataBunch, MemmapTextList, TextEncoder, TextIdProcessor, import_fastai_text

# TextIdProcessor / TextEncoder: also for exports pickled before 0.2, which name the module
# fastai_memmap.text (now this package)
__all__ = ["LMStream", "MemmapLMDataBunch", "MemmapTextList", "TextEncoder", "TextIdProcessor", "import_fastai_text",
           "texts_to_memmap"]
