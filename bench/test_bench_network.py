"""CI keeps the whole-network benchmarks working at smoke size (times are not
asserted; the real numbers are in bench/RESULTS.md, "Whole-network attribution")."""
import os

import network
import network_probe
import network_scale
import network_scoring


def test_network_scoring_ways_agree():
    rows = network_scoring.main(["--smoke"])
    assert len(rows) == 4 and all(r["same_top10_as_flattened"] for r in rows)


def test_network_scale_smoke(tmp_path):
    row = network_scale.main(["--store", str(tmp_path / "store"), "--smoke"])
    assert row["same_answer_on_reuse"] and row["N"] == 2000


def test_network_against_retraining_smoke(tmp_path):
    # the peer runs only where its venv is named (bench/network.py says how to make one)
    peer = os.environ.get("EXEMPLAR_PEER_PYTHON")
    rows = network.main(["--smoke", "--truth", str(tmp_path / "truth")] + (["--peer", peer] if peer else []))
    ours = [r for r in rows if r["row"].startswith("exemplar network, if")]
    assert len(ours) == 4 and all(-1 <= r["lds"] <= 1 for r in ours)


def test_network_probe_smoke():
    row = network_probe.main(["--smoke"])
    assert row["probe_s"] > 0 and row["construction_s"] > row["probe_s"]
