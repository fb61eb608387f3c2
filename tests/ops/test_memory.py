"""The top-k path's extra memory is O(T*k) (plus fixed-size tiles), not O(T*N)."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.dirname(__file__))  # tests/, where peak_memory.py is


@pytest.mark.slow
@pytest.mark.parametrize("path", ["general", "rank1"])
def test_topk_peak_memory_is_independent_of_n(path):
    T, N, k = 2000, 200_000, 10
    out = subprocess.run([sys.executable, os.path.join(HERE, "peak_memory.py"), str(T), str(N),
                          str(k), path], capture_output=True, text=True, check=True,
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    growth = json.loads(out.stdout.strip().splitlines()[-1])
    full_matrix = T * N * 4  # float32 (T, N): 1.6 GB
    # Tiles are a fixed 1024 x tile_rows buffer (16 MB here) plus the gradient
    # tile; 64 MB leaves room for allocator slack and is 25x below T*N.
    assert growth["topk"] < 64 * 2**20, growth
    # Control: the same measurement does see the dense (T, N) result.
    assert growth["dense"] > 0.9 * full_matrix, growth
