"""pytest-benchmark JSON -> markdown table (median seconds, pairs/s, ratio to
the chunked baseline of the same group)."""
import json
import sys


def main(path):
    rows = json.load(open(path))["benchmarks"]
    chunked = {r["group"]: r["stats"]["median"] for r in rows if r["extra_info"]["impl"] == "chunked"}
    print("| path | variant | N | T | D | C | impl | median s | pairs/s | chunked / this |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["group"], r["extra_info"]["impl"])):
        e, t = r["extra_info"], r["stats"]["median"]
        speedup = chunked.get(r["group"], float("nan")) / t
        print(f"| {e['path']} | {e['variant']} | {e['N']:,} | {e['T']:,} | {e['D']} | {e['C']} | "
              f"{e['impl']} | {t:.3f} | {e['N'] * e['T'] / t:.3g} | {speedup:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1])
