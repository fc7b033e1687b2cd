"""Dask conversion: one task and one shard per row chunk, committed atomically."""
import numpy as np
import pytest

da = pytest.importorskip("dask.array")

from fastai_memmap import MemmapArray, save_memmap
from fastai_memmap.errors import StoreExistsError


def _source(rows=1000, chunk=137):
    x = np.arange(rows * 6, dtype=np.float64).reshape(rows, 2, 3)
    return x, da.from_array(x, chunks=(chunk, 1, 3))


@pytest.mark.parametrize("scheduler", ["threads", pytest.param("processes", marks=pytest.mark.slow), "synchronous"])
def test_dask_array_written_one_shard_per_chunk(tmp_path, scheduler):
    x, arr = _source()
    save_memmap(tmp_path / "s", arr, dtype=np.float32, scheduler=scheduler, meta={"src": "dask"})
    a = MemmapArray.open(tmp_path / "s")
    assert a.shape == (1000, 2, 3) and a.dtype == np.float32 and a.meta == {"src": "dask"}
    assert [s.rows for s in a.manifest.shards] == list(arr.chunks[0])
    assert a[:].tobytes() == x.astype(np.float32).tobytes()
    a.verify()                                   # checksums written by the tasks are right


def test_dask_distributed_local_cluster(tmp_path):
    distributed = pytest.importorskip("distributed")
    x, arr = _source(400, 50)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster):
        save_memmap(tmp_path / "s", arr)
    assert np.array_equal(MemmapArray.open(tmp_path / "s")[:], x)


def test_failed_task_leaves_nothing(tmp_path):
    x, arr = _source(300, 100)

    def boom(block, block_info=None):
        if block_info[0]["chunk-location"][0] == 2:
            raise RuntimeError("task failed")
        return block
    bad = arr.map_blocks(boom, dtype=arr.dtype)
    with pytest.raises(RuntimeError, match="task failed"):
        save_memmap(tmp_path / "s", bad, scheduler="threads")
    assert not (tmp_path / "s").exists()
    assert [p.name for p in tmp_path.iterdir() if "fmtmp" in p.name] == []


def test_existing_target_refused_and_kept(tmp_path):
    x, arr = _source(100, 30)
    save_memmap(tmp_path / "s", x[:10])
    with pytest.raises(StoreExistsError):
        save_memmap(tmp_path / "s", arr)
    assert len(MemmapArray.open(tmp_path / "s")) == 10
    save_memmap(tmp_path / "s", arr, overwrite=True)
    assert len(MemmapArray.open(tmp_path / "s")) == 100
