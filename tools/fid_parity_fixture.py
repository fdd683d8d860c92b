#!/usr/bin/env python3
"""Parity fixture for the FID Inception (tests/fid_inception.rs): small PNG folders and what the
reference (shared/reference/fid.py's protocol: default_1.pt in torch, pytorch-fid preprocessing,
scipy sqrtm, torch-fidelity KID) computes for them. Needs torch, scipy, pillow.
usage: python3 tools/fid_parity_fixture.py default_1.pt tests/fixtures/fid"""
import gzip, json, os, sys
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from scipy import linalg

weights, out = sys.argv[1], sys.argv[2]
net = torch.jit.load(weights).eval()
torch.set_num_threads(os.cpu_count())
root = os.path.dirname(os.path.abspath(__file__))
with gzip.open(os.path.join(root, "..", "assets", "mnist-train-10k-images-idx3-ubyte.gz")) as f:
    mnist = np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 28, 28)
rng = np.random.default_rng(4)
gray = [mnist[i] for i in range(3)]
# RGB: smooth colour fields with noise, of two sizes (each image is resized to 299 on its own)
yy, xx = np.mgrid[0:32, 0:32] / 31.0
rgb = [np.clip(np.stack([xx, yy, (xx + yy) / 2], -1) * 255 * (0.5 + 0.5 * k / 2) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
       for k in range(3)]
rgb.append(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
sets = {"gray": gray, "rgb": rgb}
feats = {}
for name, imgs in sets.items():
    d = os.path.join(out, "images", name)
    os.makedirs(d, exist_ok=True)
    fs = []
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(os.path.join(d, f"{i:03d}.png"))
        b = torch.from_numpy(np.array(Image.open(os.path.join(d, f"{i:03d}.png")))).float()[None] / 255
        b = b[:, None].repeat(1, 3, 1, 1) if b.ndim == 3 else b.permute(0, 3, 1, 2)[:, :3]
        b = F.interpolate(b, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        with torch.no_grad():
            fs.append(net(b).reshape(1, -1))
    feats[name] = torch.cat(fs)
save_file({k: v.contiguous() for k, v in feats.items()}, os.path.join(out, "inception_features.safetensors"))
f1, f2 = feats["gray"].double().numpy(), feats["rgb"][:3].double().numpy()
m1, s1, m2, s2 = f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)
covmean = linalg.sqrtm(s1.dot(s2)).real
fid = float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
k = lambda x, y: (x @ y.T / x.shape[1] + 1) ** 3
m = len(f1)
kid = float((k(f1, f1).sum() - np.trace(k(f1, f1)) + k(f2, f2).sum() - np.trace(k(f2, f2))) / (m * (m - 1)) - 2 * k(f1, f2).mean())
json.dump({"fid_gray_rgb3": fid, "kid_gray_rgb3": kid}, open(os.path.join(out, "inception_expected.json"), "w"), indent=1)
print(fid, kid, {k: v.shape for k, v in feats.items()})
