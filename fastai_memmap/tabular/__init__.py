"""The tabular layer: a table (CSV, JSON lines, DataFrame, records) converted out of core into a
tabular store, and `MemmapTabularList` to train on it with ``tabular_learner``.

===============  ================================================================================
module           concept
===============  ================================================================================
item_list        `MemmapTabularList`: rows of a tabular store as fastai's tabular items
convert          `tabular_to_memmap`: two streaming passes over the table (statistics, then codes)
state            `TabularState`: the fitted procs (classes, medians, means), saved as JSON
encoding         categorical codes and normalised continuous columns of one chunk
split            the validation split decided while streaming
writer           the stores of a tabular conversion (categorical, continuous, labels), committed together
streaming_stats  exact medians and category counts in bounded memory
===============  ================================================================================
"""
from .convert import tabular_to_memmap
from .item_list import MemmapTabularLabelList, MemmapTabularList, MemmapTabularProcessor, TabularStore
from .state import TabularState

# MemmapTabularLabelList / MemmapTabularProcessor: also for exports pickled before 0.2, which name the
# module fastai_memmap.tabular (now this package)
__all__ = ["MemmapTabularLabelList", "MemmapTabularList", "MemmapTabularProcessor", "TabularState", "TabularStore",
           "tabular_to_memmap"]
