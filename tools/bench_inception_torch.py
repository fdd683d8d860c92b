#!/usr/bin/env python3
"""Images/s of the FID Inception (default_1.pt) in PyTorch on the CPU, batch B of 299x299 inputs,
after one warm-up batch: the number BENCHMARKS.md compares `sddpm-gpu fid` with.
usage: python3 tools/bench_inception_torch.py default_1.pt [BATCH] [ITERS]"""
import os, sys, time
import torch

net = torch.jit.load(sys.argv[1]).eval()
b = int(sys.argv[2]) if len(sys.argv) > 2 else 8
iters = int(sys.argv[3]) if len(sys.argv) > 3 else 2
torch.set_num_threads(os.cpu_count())
x = torch.rand(b, 3, 299, 299) * 2 - 1
with torch.no_grad():
    net(x)
    t = time.perf_counter()
    for _ in range(iters):
        net(x)
    dt = (time.perf_counter() - t) / iters
print(f"torch {torch.__version__}, {os.cpu_count()} threads, batch {b}: {dt * 1000:.0f} ms per batch, {b / dt:.2f} images/s")
