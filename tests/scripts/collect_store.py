"""Run by tests/storage/test_store.py: collects a small model's last layer into a store
(argv: store path, delay seconds per batch) and prints how many batches the
model ran on, so a kill -9 mid-run and a rerun can be compared."""
import sys
import time

import torch

import exemplar


def main(path: str, delay: float) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(1000, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (1000,), generator=torch.Generator().manual_seed(2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=30)
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1) or time.sleep(delay))
    store = exemplar.LastLayer(model).collect(loader, progress=False, store=path, shard_rows=128)
    print(len(calls), len(store), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
