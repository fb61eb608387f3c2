"""Run by tests/storage/test_store.py: a resumable top-k job over a store (argv: store,
job folder, delay seconds per test block); prints how many test blocks it
computed, then saves the result next to the job folder."""
import sys
import time

import torch

import exemplar


def main(store: str, out: str, delay: float) -> None:
    g = torch.Generator().manual_seed(5)
    test = exemplar.LastLayerData(torch.randn(95, 5, generator=g, dtype=torch.float64),
                                  torch.randn(95, 3, generator=g, dtype=torch.float64))
    method = exemplar.methods.get("theta_relatif")
    query, blocks = method.query, []
    method.query = lambda attr, t: blocks.append(len(t)) or time.sleep(delay * (len(t) < 95)) or query(attr, t)
    attr = exemplar.Attributor(store, curvature="ekfac", progress=False)
    values, indices = attr.topk(test, 7, "theta_relatif", out=out, test_rows=10)
    print(sum(1 for n in blocks if n < 95), flush=True)
    torch.save((values, indices), out + ".result.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
