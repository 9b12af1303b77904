"""An LSTM word language model, the classic case for gradient clipping, with gradwatch.

    python examples/lstm_lm.py --steps 300

PyTorch's ``word_language_model`` example trains an LSTM with plain SGD at lr 20 and calls
``torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)`` before every step: without it, the
gradients of backpropagation through time explode. Here gradwatch does that clipping (the same
numbers) and reports what it did: how often it clipped, by how much, and which layers pushed.
The text is a few sentences written below, batched and cut into BPTT windows as in that example.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradwatch as gw

TEXT = """
the cat sat on the mat and the dog sat on the rug . the cat saw the dog and the dog saw the cat .
a bird flew over the house and the cat watched the bird . the dog slept on the rug all day .
when the rain came the cat ran into the house and the dog followed the cat . the bird sang .
"""
BATCH, BPTT, CLIP = 4, 12, 0.25


class WordLSTM(nn.Module):
    def __init__(self, vocab: int, dim: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, layers, dropout=0.2)
        self.decoder = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor, hidden: tuple | None = None):
        output, hidden = self.lstm(self.embed(tokens), hidden)
        return self.decoder(output), hidden


def batchify(text: str) -> tuple[torch.Tensor, int]:
    words = text.split()
    vocab = {w: i for i, w in enumerate(sorted(set(words)))}
    ids = torch.tensor([vocab[w] for w in words] * 20)
    columns = ids.numel() // BATCH
    return ids[: columns * BATCH].view(BATCH, columns).t().contiguous(), len(vocab)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    data, vocab = batchify(TEXT)
    model = WordLSTM(vocab)
    optimizer = torch.optim.SGD(model.parameters(), lr=20.0)
    # The one gradwatch line: clip_grad_norm_(..., 0.25) moves into the watcher.
    watch = gw.GradWatch(model, clip=gw.ClipNorm(CLIP), sinks=[gw.ConsoleSink(every=100)])
    watch.attach(optimizer)

    hidden = None
    start = 0
    for _ in range(args.steps):
        if start + BPTT + 1 > data.size(0):
            start, hidden = 0, None
        inputs, targets = data[start : start + BPTT], data[start + 1 : start + BPTT + 1]
        start += BPTT
        if hidden is not None:
            hidden = tuple(h.detach() for h in hidden)  # truncated backpropagation through time
        logits, hidden = model(inputs, hidden)
        loss = nn.functional.cross_entropy(logits.view(-1, vocab), targets.reshape(-1))
        optimizer.zero_grad()
        with watch.backward(loss=loss):
            loss.backward()
        optimizer.step()  # gradwatch checks and clips first

    summary = watch.close()  # prints the summary table
    print(f"clipped {summary.clipped_steps} of {summary.steps} steps; last loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
