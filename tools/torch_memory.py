"""What PyTorch keeps for one SDDPM training step (the reference model, sddpm_ref.py), for BENCHMARKS.md.

usage: python tools/torch_memory.py --preset cifar10 --batch 32 [--snn-steps 4] [--device cpu|meta]

Counts every tensor autograd saves for backward (other than parameters and buffers) during the forward (torch.autograd.graph.saved_tensors_hooks),
deduplicated by storage (a view shares its base's storage), plus parameters and buffers, and a gradient and
Adam's two moments per trainable parameter. On the meta device nothing is allocated, so the paper's nets at
batch 32 fit any machine (same counts as on the CPU: checked on tiny); storages are then told apart by identity.
Prints one JSON line.
"""
import argparse, json, os, sys
import torch

sys.path.insert(0, "/work/shared/reference")
from sddpm_ref import SpkUNet  # noqa: E402

PRESETS = {
    "cifar10": dict(ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, img_ch=3, size=32),
    "celeba64": dict(ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, img_ch=3, size=64),
    "mnist": dict(ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, img_ch=1, size=32),
    "small": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, img_ch=1, size=32),
    "tiny": dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, img_ch=3, size=32),
}

ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="tiny", choices=PRESETS)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--snn-steps", type=int, default=4)
ap.add_argument("--device", default="cpu", choices=["cpu", "meta"])
a = ap.parse_args()
p = dict(PRESETS[a.preset]); size = p.pop("size")
dev = torch.device(a.device)
m = SpkUNet(T=1000, timestep=a.snn_steps, **p).to(dev)
m.train()
x = torch.randn(a.batch, p["img_ch"], size, size, device=dev)
t = torch.randint(0, 1000, (a.batch,), device=dev)
eps = torch.randn_like(x)

seen = {}
keep = []


def skey(st):
    return (st.data_ptr(), st.nbytes()) if a.device != "meta" else st._cdata


# Parameters and buffers are counted once below, not again as saved tensors.
owned = {skey(q.untyped_storage()) for q in list(m.parameters()) + list(m.buffers())}


def pack(s):
    st = s.untyped_storage()
    if skey(st) not in owned:
        seen[skey(st)] = st.nbytes()
    keep.append(st)  # keep storages alive so ids/pointers are not reused while counting
    return s


with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
    loss = ((m(x, t) - eps) ** 2).mean()
params = sum(q.numel() * q.element_size() for q in m.parameters())
trainable = sum(q.numel() * q.element_size() for q in m.parameters() if q.requires_grad)
buffers = sum(b.numel() * b.element_size() for b in m.buffers())
saved = sum(seen.values())
total = saved + params + buffers + 3 * trainable  # grads + exp_avg + exp_avg_sq
gib = lambda b: round(b / 2**30, 4)
print(json.dumps(dict(preset=a.preset, batch=a.batch, snn_steps=a.snn_steps, device=a.device, torch=torch.__version__,
                      saved_bytes=saved, saved_gib=gib(saved), storages=len(seen), params_bytes=params,
                      buffers_bytes=buffers, weights_grads_adam_bytes=params + buffers + 3 * trainable,
                      total_bytes=total, total_gib=gib(total), total_mib=round(total / 2**20, 2))))
