"""CI keeps bench/store_scale.py and bench/in_memory_rss.py working at their
smoke sizes (times are not asserted; the real numbers are in bench/RESULTS.md)."""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_store_scale_smoke(tmp_path):
    out = subprocess.run([sys.executable, str(HERE / "store_scale.py"), "--smoke", "--store", str(tmp_path / "s")],
                         capture_output=True, text=True, check=True).stdout
    assert '"store_cold_pairs_per_s"' in out and '"phase": "store query (warm cache)"' in out


def test_in_memory_rss_smoke():
    out = subprocess.run([sys.executable, str(HERE / "in_memory_rss.py"), "--smoke"],
                         capture_output=True, text=True, check=True).stdout
    assert '"path": "general"' in out


def test_scale_out_smoke():
    out = subprocess.run([sys.executable, str(HERE / "scale_out.py"), "--smoke"],
                         capture_output=True, text=True, check=True).stdout
    assert "2 processes x 1 thread" in out and "1 process x 2 threads" in out
