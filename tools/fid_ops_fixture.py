#!/usr/bin/env python3
"""What torch computes for the FID Inception's new ops, on small inputs: tests/fixtures/fid/ops.safetensors
checks the CPU references' semantics (count_include_pad=False, bilinear align_corners=False, the last
block's padded max pool, non-square convs). Needs torch + safetensors.
usage: python3 tools/fid_ops_fixture.py tests/fixtures/fid/ops.safetensors"""
import sys
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

g = torch.Generator().manual_seed(5)
x = torch.randn(2, 3, 7, 9, generator=g)
img = torch.rand(2, 1, 5, 7, generator=g)
rgb = torch.rand(1, 3, 8, 6, generator=g)
w17 = torch.randn(4, 3, 1, 7, generator=g) * 0.3
w71 = torch.randn(5, 3, 7, 1, generator=g) * 0.3
b = torch.randn(5, generator=g) * 0.1
t = {
    "x": x, "img": img, "rgb": rgb, "w17": w17, "w71": w71, "b": b,
    "avg3_s1_p1": F.avg_pool2d(x, 3, 1, 1, count_include_pad=False),
    "max3_s2_p0": F.max_pool2d(x, 3, 2, 0),
    "max3_s1_p1": F.max_pool2d(x, 3, 1, 1),
    "avg2_s2_p0": F.avg_pool2d(x, 2, 2, 0),
    # pytorch-fid preprocessing: gray repeated to RGB, resize, 2x - 1 (up and down sampling)
    "img_up": F.interpolate(img.repeat(1, 3, 1, 1), size=(13, 11), mode="bilinear", align_corners=False) * 2 - 1,
    "rgb_down": F.interpolate(rgb, size=(5, 4), mode="bilinear", align_corners=False) * 2 - 1,
    "conv17_relu": F.relu(F.conv2d(x, w17, None, 1, (0, 3))),
    "conv71_s2_relu": F.relu(F.conv2d(x, w71, b, 2, (3, 0))),
}
save_file({k: v.contiguous() for k, v in t.items()}, sys.argv[1])
