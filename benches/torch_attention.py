#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention (its flash backend, bf16) on the shapes of `bertcuda bench
kernels`' attention rows — 12 heads of 64; batch 32 at seq 128, 8 at 512; random inputs; without and with
dropout 0.1 — the reference its tensor-core attention is compared with. Prints milliseconds forward and
backward per shape; the FLOP rates count as bench kernels does (4·B·NH·T²·64 forward, 2.5× backward).

    python3 benches/torch_attention.py
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from torch_gpu_ops import time_ms


def main():
    dev = "cuda"
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "(SDPA, flash backend, bf16)")
    nh, hs = 12, 64
    torch.manual_seed(0)
    for b, t in [(32, 128), (8, 512)]:
        q, k, v = (torch.randn(b, nh, t, hs, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = torch.randn(b, nh, t, hs, device=dev, dtype=torch.bfloat16)
        flops = 4.0 * b * nh * t * t * hs
        for p in (0.0, 0.1):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                fwd = lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=p)
                f_ms = time_ms(fwd, reps=10)
                out = fwd()
                bwd = lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
                b_ms = time_ms(bwd, reps=10)
            what = f"{b}×{t}, 12×64{', dropout' if p else ''}"
            print(f"attention_fwd ({what}) {f_ms:10.4f} ms {flops / f_ms / 1e9:7.1f} TFLOP/s")
            print(f"attention_bwd ({what}) {b_ms:10.4f} ms {2.5 * flops / b_ms / 1e9:7.1f} TFLOP/s")


if __name__ == "__main__":
    main()
