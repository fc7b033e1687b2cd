"""The tabular store format and its fitted state: `TabularState`, ``tabular.json``, `read_tabular_json`.

Layout of a tabular store
-------------------------
::

    out/
        tabular.json   the fitted state and a few facts (UTF-8 JSON, never pickle), see below
        cats/          store of int64 rows (n_cat,): category codes, 0 = '#na#'; columns `cat_names`
                       then FillMissing's indicator columns ``<col>_na``
        conts/         store of float32 rows (n_cont,): filled and normalised continuous values
        y/             only with targets: int64 scalars, class codes into ``meta['classes']``
                       (-1: missing label or a label absent from the training rows), or float32
                       scalars (one regression target) / rows (n_y,) (several)
        valid/         only with a split: int64 scalars, the sorted row numbers of validation rows

``tabular.json`` holds ``{"format": "fastai_memmap.tabular.item_list", "version": 1, "rows": N, "n_valid": k,
"split": {...}, "state": TabularState.to_dict()}``; non-finite floats are written as null.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from ..errors import ColumnValueError, FormatError, StoreNotFoundError

__all__ = ["TabularState", "read_tabular_json", "TABULAR_FORMAT", "TABULAR_VERSION", "STATE_NAME", "NA_CLASS",
           "PROC_NAMES"]

TABULAR_FORMAT = "fastai_memmap.tabular.item_list"
TABULAR_VERSION = 1          # bump on any change a version-1 reader would misread
STATE_NAME = "tabular.json"
NA_CLASS = "#na#"            # fastai's class 0 of every categorical column
PROC_NAMES = ("FillMissing", "Categorify", "Normalize")


def _jfloat(x: float) -> Optional[float]:
    "JSON has no NaN: non-finite floats are written as null."
    x = float(x)
    return x if np.isfinite(x) else None


def _ufloat(x: Any, where: str, key: str) -> float:
    "A number read from JSON (null: NaN, refused later where a number is needed); ``FormatError`` otherwise."
    if x is None:
        return float("nan")
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise FormatError(f"{where}: expected a number or null for {key}, found {x!r:.50}")
    try:
        return float(x)
    except OverflowError:      # an int too large for a float: not a usable statistic
        raise FormatError(f"{where}: expected a float for {key}, found an integer of {x.bit_length()} bits") from None


def _classes_of(v: Any, where: str, key: str) -> Tuple[Any, ...]:
    "A list of class values (str, int, float, bool) read from JSON, as a tuple; ``FormatError`` otherwise."
    if not isinstance(v, list) or not all(isinstance(c, (str, int, float, bool)) for c in v):
        raise FormatError(f"{where}: expected {key} to be a list of str, int, float or bool values, found {v!r:.100}")
    return tuple(v)


@dataclass(frozen=True)
class TabularState:
    """The fitted processing of a tabular store, as plain data (saved as JSON, carried by the processor).

    `cat_names`/`cont_names` are the source columns; `classes` maps every categorical column, the
    ``<col>_na`` indicators included, to its classes (``'#na#'`` first, then str/int/float/bool values);
    `fill_values` maps the continuous columns that had missing training values to their fill value;
    `means`/`stds` (empty without Normalize) the normalisation of every continuous column; `y_kind` is
    ``'category'`` (with `y_classes`), ``'float'`` or None (no targets fitted).
    """
    cat_names: Tuple[str, ...] = ()
    cont_names: Tuple[str, ...] = ()
    procs: Tuple[str, ...] = PROC_NAMES
    classes: Dict[str, Tuple[Any, ...]] = field(default_factory=dict)
    fill_values: Dict[str, float] = field(default_factory=dict)
    fill_strategy: str = "median"
    fill_val: float = 0.0
    add_col: bool = True
    means: Dict[str, float] = field(default_factory=dict)
    stds: Dict[str, float] = field(default_factory=dict)
    y_names: Tuple[str, ...] = ()
    y_kind: Optional[str] = None
    y_classes: Optional[Tuple[Any, ...]] = None

    @property
    def fill(self) -> bool:
        "Whether FillMissing is one of the procs."
        return "FillMissing" in self.procs

    @property
    def normalize(self) -> bool:
        "Whether Normalize is one of the procs."
        return "Normalize" in self.procs

    @property
    def na_names(self) -> Tuple[str, ...]:
        "FillMissing's indicator columns ``<col>_na``, in `cont_names` order."
        return tuple(f"{c}_na" for c in self.cont_names if c in self.fill_values) if self.add_col else ()

    @property
    def all_cat_names(self) -> Tuple[str, ...]:
        "Categorical columns of the model: `cat_names` then `na_names` (fastai's ``cat_names`` after procs)."
        return self.cat_names + self.na_names

    @property
    def col_names(self) -> Tuple[str, ...]:
        "All model columns: `all_cat_names` then `cont_names` (fastai's ``col_names``)."
        return self.all_cat_names + self.cont_names

    def to_dict(self) -> Dict[str, Any]:
        "The state as a JSON-compatible dict (lists, str, int, float, bool, None)."
        return {"cat_names": list(self.cat_names), "cont_names": list(self.cont_names), "procs": list(self.procs),
                "classes": {k: list(v) for k, v in self.classes.items()},
                "fill_values": {k: _jfloat(v) for k, v in self.fill_values.items()},
                "fill_strategy": self.fill_strategy, "fill_val": _jfloat(self.fill_val), "add_col": self.add_col,
                "means": {k: _jfloat(v) for k, v in self.means.items()},
                "stds": {k: _jfloat(v) for k, v in self.stds.items()},
                "y_names": list(self.y_names), "y_kind": self.y_kind,
                "y_classes": None if self.y_classes is None else list(self.y_classes)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "tabular state") -> "TabularState":
        """Validate a dict written by `to_dict` and build the state; raises ``FormatError`` (malformed) or
        ``ColumnValueError`` (null/non-finite means, stds or fill values: NaN predictions)."""
        if not isinstance(d, dict):
            raise FormatError(f"{where}: expected a JSON object, found {type(d).__name__}")
        names = {k: _str_list(d, k, where) for k in ("cat_names", "cont_names", "procs", "y_names")}
        maps = {k: _dict_of(d, k, where) for k in ("classes", "fill_values", "means", "stds")}
        st = cls(cat_names=names["cat_names"], cont_names=names["cont_names"], procs=names["procs"],
                 classes={k: _classes_of(v, where, f"classes[{k!r}]") for k, v in maps["classes"].items()},
                 fill_values={k: _ufloat(v, where, f"fill_values[{k!r}]") for k, v in maps["fill_values"].items()},
                 fill_strategy=d.get("fill_strategy", "median"), fill_val=_ufloat(d.get("fill_val", 0.0), where, "fill_val"),
                 add_col=bool(d.get("add_col", True)),
                 means={k: _ufloat(v, where, f"means[{k!r}]") for k, v in maps["means"].items()},
                 stds={k: _ufloat(v, where, f"stds[{k!r}]") for k, v in maps["stds"].items()},
                 y_names=names["y_names"], y_kind=d.get("y_kind"),
                 y_classes=None if d.get("y_classes") is None else _classes_of(d["y_classes"], where, "y_classes"))
        st._validate(where)
        return st

    def _validate(self, where: str) -> None:
        bad = [p for p in self.procs if p not in PROC_NAMES]
        if bad:
            raise FormatError(f"{where}: expected procs among {PROC_NAMES}, found {bad}")
        for c in self.all_cat_names:
            cl = self.classes.get(c)
            if not isinstance(cl, tuple) or not cl or cl[0] != NA_CLASS:
                raise FormatError(f"{where}: expected classes ['{NA_CLASS}', ...] for categorical column {c!r}, "
                                  f"found {cl!r:.100}")
        if self.normalize and not set(self.cont_names) <= set(self.means) & set(self.stds):
            raise FormatError(f"{where}: expected means and stds for every continuous column {list(self.cont_names)}, "
                              f"found means for {sorted(self.means)}, stds for {sorted(self.stds)}")
        self._validate_numbers(where)
        if self.y_kind not in (None, "category", "float"):
            raise FormatError(f"{where}: expected y_kind 'category', 'float' or null, found {self.y_kind!r}")
        if self.y_kind == "category" and self.y_classes is None:
            raise FormatError(f"{where}: expected y_classes for categorical targets, found null")


    def _validate_numbers(self, where: str) -> None:
        "Refuse statistics that would turn every prediction into NaN: null (non-finite) means, stds, fill values."
        used = [("fill value", self.fill_values, list(self.fill_values))]
        if self.normalize:
            used += [("mean", self.means, self.cont_names), ("std", self.stds, self.cont_names)]
        for what, values, names in used:
            bad = {c: values[c] for c in names if not _finite(values.get(c))}
            if bad:
                raise ColumnValueError(f"{where}: expected a finite {what} for continuous column(s) {sorted(bad)}, found "
                                       f"{list(bad.values())[:5]} (null in JSON: fitted on fewer rows than it needs?); "
                                       "every prediction would be NaN: convert the training data again")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and bool(np.isfinite(x))


def _str_list(d: dict, key: str, where: str) -> Tuple[str, ...]:
    v = d.get(key)
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise FormatError(f"{where}: expected {key!r} to be a list of strings, found {v!r:.100}")
    return tuple(v)


def _dict_of(d: dict, key: str, where: str) -> dict:
    v = d.get(key)
    if not isinstance(v, dict):
        raise FormatError(f"{where}: expected {key!r} to be a JSON object, found {type(v).__name__}")
    return v


def read_tabular_json(path: Union[str, Path]) -> Tuple[Dict[str, Any], TabularState]:
    """Read ``path/tabular.json`` of a tabular store: returns ``(document, state)``.

    Raises ``StoreNotFoundError`` if the file is missing, ``FormatError`` if it is not a version-1
    tabular document or its state is malformed.
    """
    fp = Path(path) / STATE_NAME
    try:
        doc = json.loads(fp.read_bytes().decode("utf8"))
    except FileNotFoundError:
        raise StoreNotFoundError(f"{fp}: not found; expected a tabular store written by tabular_to_memmap") from None
    except (ValueError, RecursionError) as e:   # JSONDecodeError, UnicodeDecodeError, int digits limit, nesting
        raise FormatError(f"{fp}: expected UTF-8 JSON, found unparsable content ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != TABULAR_FORMAT:
        raise FormatError(f"{fp}: expected format {TABULAR_FORMAT!r}, found {doc.get('format') if isinstance(doc, dict) else doc!r:.80}")
    if doc.get("version") != TABULAR_VERSION:
        raise FormatError(f"{fp}: expected version {TABULAR_VERSION}, found {doc.get('version')!r}; "
                          "written by a newer fastai_memmap? upgrade the package")
    if not isinstance(doc.get("rows"), int):
        raise FormatError(f"{fp}: expected an integer 'rows', found {doc.get('rows')!r:.50}")
    return doc, TabularState.from_dict(doc.get("state"), where=str(fp))
