"""``python -m fastai_memmap``: same as the ``fastai-memmap`` command."""
import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
