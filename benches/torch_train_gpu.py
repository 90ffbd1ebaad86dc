#!/usr/bin/env python3
"""transformers' BertForPreTraining training steps on one GPU, the reference `bertcuda bench train` is
compared with: bf16 autocast, SDPA attention, fused AdamW, optionally torch.compile; random batches of the
same shapes (15% of tokens labelled, NSP labels). Prints sequences/s, tokens/s, model TFLOP/s and MFU.

    python3 benches/torch_train_gpu.py --preset base --batch-size 256 --seq 128 [--compile] [--peak-tflops 989]
"""
import argparse
import time

import torch
from transformers import BertConfig, BertForPreTraining

PRESETS = {"tiny": (2, 128, 2), "mini": (4, 256, 4), "small": (4, 512, 8), "medium": (8, 512, 8),
           "base": (12, 768, 12), "large": (24, 1024, 16)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="base")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--peak-tflops", type=float, default=None)
    a = ap.parse_args()
    l, h, heads = PRESETS[a.preset]
    cfg = BertConfig(vocab_size=30522, hidden_size=h, num_hidden_layers=l, num_attention_heads=heads,
                     intermediate_size=4 * h, max_position_embeddings=max(512, a.seq))
    model = BertForPreTraining(cfg).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step_model = torch.compile(model) if a.compile else model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.precision]
    scaler = torch.amp.GradScaler("cuda", enabled=a.precision == "fp16")
    b, t = a.batch_size, a.seq
    ids = torch.randint(1000, 30000, (b, t), device="cuda")
    labels = torch.where(torch.rand(b, t, device="cuda") < 0.15, ids, torch.full_like(ids, -100))
    types = (torch.arange(t, device="cuda") >= t // 2).long().expand(b, t)
    nsp = torch.arange(b, device="cuda") % 2

    def step():
        with torch.autocast("cuda", dtype=dtype, enabled=a.precision != "fp32"):
            loss = step_model(input_ids=ids, token_type_ids=types, labels=labels, next_sentence_label=nsp).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()
    secs = (time.perf_counter() - start) / a.steps
    n = sum(p.numel() for name, p in model.named_parameters() if name.startswith("bert.encoder."))
    flops = (6 * n + 12 * l * h * t) * b * t / secs / 1e12
    mfu = f", MFU {100 * flops / a.peak_tflops:.1f}%" if a.peak_tflops else ""
    print(f"transformers {a.preset} {a.precision}{' compiled' if a.compile else ''} on {torch.cuda.get_device_name()}: "
          f"{b / secs:.1f} sequences/s, {b * t / secs:.0f} tokens/s, {flops:.1f} model TFLOP/s{mfu}, "
          f"peak memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB")


if __name__ == "__main__":
    main()
