#!/usr/bin/env python3
"""transformers' BertForPreTraining forward + backward steps per second on the CPU, on the shapes of
`bertcuda bench model` (random batch, 15% of tokens labelled, NSP labels, training mode).

    python3 benches/torch_cpu.py --preset mini --batch-size 8 --seq 128 --threads 2
"""
import argparse
import time

import torch
from transformers import BertConfig, BertForPreTraining

PRESETS = {"tiny": (2, 128, 2), "mini": (4, 256, 4), "small": (4, 512, 8), "medium": (8, 512, 8), "base": (12, 768, 12)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    l, h, heads = PRESETS[a.preset]
    model = BertForPreTraining(BertConfig(vocab_size=30522, hidden_size=h, num_hidden_layers=l, num_attention_heads=heads,
                                          intermediate_size=4 * h)).train()
    b, t = a.batch_size, a.seq
    ids = torch.randint(1000, 30000, (b, t))
    labels = torch.where(torch.rand(b, t) < 0.15, ids, torch.full_like(ids, -100))
    types = (torch.arange(t) >= t // 2).long().expand(b, t)
    nsp = torch.arange(b) % 2
    step = lambda: model(input_ids=ids, token_type_ids=types, attention_mask=torch.ones_like(ids), labels=labels,
                         next_sentence_label=nsp).loss.backward()
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    sps = a.steps / (time.perf_counter() - start)
    print(f"torch {torch.__version__} cpu {a.preset} batch {b}×{t}: {sps:.2f} steps/s ({sps * b:.1f} sequences/s) on {a.threads} threads")


if __name__ == "__main__":
    main()
