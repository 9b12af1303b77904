"""A small GPT trained with bfloat16 autocast and gradient accumulation, watched by gradwatch.

    python examples/gpt_amp.py --steps 200

The forward pass runs under ``torch.autocast`` in bfloat16 (on CPU here; ``"cuda"`` on a GPU,
where fp16 would add a ``GradScaler``: pass it to ``attach(optimizer, scaler=scaler)``). Each
optimizer step accumulates four micro-batches: ``attach`` checks once per step, on the accumulated
gradient, and ``track_micro_batches=True`` keeps each micro-batch's own gradient norm, to find a
single bad one. The data is a synthetic language: sequences that count up modulo the vocabulary.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradwatch as gw

VOCAB, CONTEXT, ACCUMULATION, MICRO_BATCH = 32, 16, 4, 8


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.size(1), device=x.device)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.zeros(CONTEXT, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos[: tokens.size(1)]
        return self.head(self.ln(self.blocks(x)))


def batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randint(0, VOCAB, (MICRO_BATCH, 1), generator=generator)
    seq = (start + torch.arange(CONTEXT + 1)) % VOCAB
    return seq[:, :-1], seq[:, 1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = GPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    watch = gw.GradWatch(
        model,
        clip=gw.ClipNorm(1.0),
        layer_depth=2,  # summarise by block: "blocks.0", "blocks.1", ...
        track_micro_batches=True,
        sinks=[gw.ConsoleSink(every=50)],
    ).attach(optimizer)

    for _ in range(args.steps):
        optimizer.zero_grad()
        for _ in range(ACCUMULATION):
            tokens, targets = batch(generator)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(tokens)
                loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            with watch.backward(loss=loss):
                (loss / ACCUMULATION).backward()
        optimizer.step()  # one check per optimizer step, on the accumulated gradient

    last = watch.history[-1]
    micro = ", ".join(f"{n:.3g}" for n in last.micro_batch_norms)
    watch.close()
    print(f"last step: norm {last.global_norm:.3g} (micro-batches {micro}), loss {last.loss:.3f}")


if __name__ == "__main__":
    main()
