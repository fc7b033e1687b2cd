"""fastai_memmap: out-of-core memory-mapped and in-RAM datasets for the fastai v1 data block API."""
from pathlib import Path
from setuptools import setup, find_packages

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "fastai_memmap" / "version.py").read_text(), version)

setup(
    name="fastai_memmap",
    version=version["__version__"],
    description="Memory-mapped (larger than RAM) and in-RAM datasets for fastai v1's data block API",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fastai_memmap", "fastai_memmap.*"]),
    package_data={"fastai_memmap": ["py.typed"]},
    python_requires=">=3.8",
    install_requires=[
        # fastai 1.0.61 is the last v1 release; torch/torchvision are resolved through it (unpinned)
        "fastai==1.0.61",
        "numpy<2",             # fastai 1.0.61 and its deps are built against numpy 1.x
        "pandas<2",            # pandas>=2 breaks fastai's Categorify
        "setuptools<81",       # `import fastai` needs pkg_resources
        "fastprogress>=0.2",
        "psutil",
        "scikit-learn",        # bundled digits images for the demo
        "matplotlib",
        "pillow",
    ],
    extras_require={
        # fastai.text needs spaCy; 3.8 installs with numpy<2 (fastai_memmap.compat fixes fastai's spaCy 2 calls)
        "text": ["spacy>=3.8,<4"],
        # nbconvert: fastai's doc() (gen_doc) needs it; the IPython 9 fix is tested with it
        "dev": ["pytest", "hypothesis", "nbmake", "nbformat", "ipykernel", "h5py", "scipy", "dask[array]", "distributed",
                "spacy>=3.8,<4", "nbconvert"],
    },
    entry_points={"console_scripts": ["fastai-memmap=fastai_memmap.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Framework :: Jupyter"],
)
