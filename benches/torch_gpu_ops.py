#!/usr/bin/env python3
"""PyTorch's ops on the shapes of `bertcuda bench kernels` (fp32, one GPU): the reference its kernels are
compared with. Prints milliseconds per op.

    python3 benches/torch_gpu_ops.py
"""
import torch
import torch.nn.functional as F


def time_ms(f, reps=20):
    f()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        f()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = "cuda"
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    n, h, i, v = 32 * 128, 768, 3072, 30522
    x = torch.randn(n, h, device=dev, requires_grad=True)
    w, b = torch.ones(h, device=dev, requires_grad=True), torch.zeros(h, device=dev, requires_grad=True)
    y = F.layer_norm(x, (h,), w, b, 1e-12)
    g = torch.randn_like(y)
    print(f"layernorm_fwd (4096×768)   {time_ms(lambda: F.layer_norm(x, (h,), w, b, 1e-12)):.4f} ms")
    print(f"layernorm_bwd (4096×768)   {time_ms(lambda: torch.autograd.grad(y, (x, w, b), g, retain_graph=True)):.4f} ms")
    a = torch.randn(n, i, device=dev)
    print(f"gelu_fwd (4096×3072)       {time_ms(lambda: F.gelu(a)):.4f} ms")
    rows = n * 15 // 100
    z = torch.randn(rows, v, device=dev, requires_grad=True)
    lab = torch.arange(rows, device=dev) % v
    loss = F.cross_entropy(z, lab)
    print(f"cross_entropy fwd+bwd      {time_ms(lambda: torch.autograd.grad(F.cross_entropy(z, lab), z)):.4f} ms")
    for bb, seq in ((32, 128), (8, 512)):
        q = torch.randn(bb, 12, seq, 64, device=dev, requires_grad=True)
        k, vv = torch.randn_like(q, requires_grad=True), torch.randn_like(q, requires_grad=True)
        o = F.scaled_dot_product_attention(q, k, vv)
        go = torch.randn_like(o)
        print(f"sdpa fwd ({bb}×{seq}, 12×64)   {time_ms(lambda: F.scaled_dot_product_attention(q, k, vv)):.4f} ms")
        print(f"sdpa bwd ({bb}×{seq}, 12×64)   {time_ms(lambda: torch.autograd.grad(o, (q, k, vv), go, retain_graph=True)):.4f} ms")
    p = torch.zeros(110_000_000, device=dev, requires_grad=True)
    p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
    print(f"adamw fused (110 M)        {time_ms(lambda: opt.step(), reps=10):.4f} ms")
    del loss


if __name__ == "__main__":
    main()
