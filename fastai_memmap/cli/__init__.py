"""The command line (``fastai-memmap``): ``info``, ``verify``, ``convert-images``, ``demo``, ``bench``.

=======  ========================================================================================
module   concept
=======  ========================================================================================
main     the argument parser and the subcommands
demo     the end-to-end demo on a bundled synthetic image set
bench    the benchmark harness behind ``fastai-memmap bench``
=======  ========================================================================================
"""
from .main import main

__all__ = ["main"]
