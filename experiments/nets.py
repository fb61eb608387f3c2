"""The networks the reproductions explain, each small enough to train on
2 CPU cores in minutes, and the code that trains them and reads their last
layer. Every model takes one tensor per example, so one loop trains them all."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import exemplar
from exemplar.progress import Progress


def conv_net(num_classes: int = 10) -> nn.Sequential:
    """Barshan et al.'s 16C-32C-64C-F: 3×3 convolutions, each followed by ReLU and
    2×2 max pooling, then one linear layer. On 28×28 inputs it sees 64·3·3 = 576 features."""
    layers, channels = [], 1
    for width in (16, 32, 64):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 3 * 3, num_classes))


class BagOfEmbeddings(nn.Module):
    """Text classifier: the mean word embedding of a review, a tanh hidden layer,
    a linear layer. Input (B, L) word ids, 0 = padding (left out of the mean)."""

    def __init__(self, vocabulary: int, num_classes: int = 2, width: int = 64, hidden: int = 32):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocabulary, width, mode="mean", padding_idx=0)
        self.hidden = nn.Sequential(nn.Linear(width, hidden), nn.Tanh())
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(self.embed(words)))


class CharGRU(nn.Module):
    """Character-level GRU over a name; the last hidden state goes to a linear layer.
    Input (B, L) character ids, 0 = padding after the name."""

    def __init__(self, alphabet: int, num_classes: int, width: int = 32, hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(alphabet, width, padding_idx=0)
        self.gru = nn.GRU(width, hidden, batch_first=True)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        lengths = (chars != 0).sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(self.embed(chars), lengths, batch_first=True, enforce_sorted=False)
        return self.out(self.gru(packed)[1][-1])


def train(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float = 3e-3,
          batch_size: int = 128, weight_decay: float = 0.0, seed: int = 0, progress: bool = False) -> nn.Module:
    """Adam on the mean cross-entropy, minibatches in a seeded order; a progress line per epoch if asked."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr, weight_decay=weight_decay)
    bar = Progress(f"train {type(model).__name__}, epochs", epochs, progress)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=g).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
            opt.step()
        bar.update()
    bar.close()
    model.eval()
    return model


def last_layer(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor | None = None,
               batch_size: int = 1024) -> tuple[exemplar.LastLayer, exemplar.LastLayerData]:
    """The model's last linear layer and its data on `inputs`, in float64."""
    hook = exemplar.LastLayer(model)
    batches = [inputs[i:i + batch_size] if labels is None else (inputs[i:i + batch_size], labels[i:i + batch_size])
               for i in range(0, len(inputs), batch_size)]
    data = hook.collect(batches, progress=False)
    return hook, exemplar.LastLayerData(data.features.double(), data.logits.double(), data.labels)


def accuracy(data: exemplar.LastLayerData, labels: torch.Tensor) -> float:
    return float((data.logits.argmax(1) == labels).double().mean())
