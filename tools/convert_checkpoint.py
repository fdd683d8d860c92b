#!/usr/bin/env python3
"""Convert an official SDDPM PyTorch checkpoint to a sddpm-gpu safetensors checkpoint.

usage: python3 tools/convert_checkpoint.py CKPT.pt OUT.safetensors [--snn-steps 4] [--img-size 32] [--key net_model]

The official training script saves {'net_model': state_dict, ...}; DataParallel prefixes
('module.') are stripped. Tensor names stay the official ones. The model config (the reference
constructor's names: T, ch, ch_mult, num_res_blocks, timestep, img_ch, plus img_size) is inferred
from the shapes and written as JSON into the metadata key `config`; the spiking time steps cannot
be inferred from weights, so pass --snn-steps if the model was trained with T != 4.
Needs: torch, safetensors.
"""
import argparse, json, re, sys

import torch
from safetensors.torch import save_file


def infer_config(sd, snn_steps, img_size):
    ch, img_ch = sd["conv.weight"].shape[:2]
    levels, nrb, in_level, last = [], None, 0, ch
    i = 0
    while True:
        if f"downblocks.{i}.conv1.weight" in sd:
            last = sd[f"downblocks.{i}.conv1.weight"].shape[0]
            in_level += 1
        elif f"downblocks.{i}.conv.weight" in sd:
            nrb = in_level if nrb is None else nrb
            levels.append(last // ch)
            in_level = 0
        else:
            break
        i += 1
    levels.append(last // ch)
    return {"T": int(sd["time_embedding.timembedding.0.weight"].shape[0]), "ch": int(ch), "ch_mult": levels,
            "num_res_blocks": int(nrb if nrb is not None else in_level), "timestep": snn_steps,
            "img_ch": int(img_ch), "img_size": img_size}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--snn-steps", type=int, default=4)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--key", default="net_model", help="entry of the checkpoint dict holding the state_dict")
    a = ap.parse_args()
    obj = torch.load(a.ckpt, map_location="cpu", weights_only=False)
    sd = obj.get(a.key, obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict) or "conv.weight" not in {re.sub(r"^module\.", "", k) for k in sd}:
        sys.exit(f"error: {a.ckpt}: no SDDPM state_dict found (looked for '{a.key}' with 'conv.weight')")
    sd = {re.sub(r"^module\.", "", k): v.detach().cpu().contiguous() for k, v in sd.items() if torch.is_tensor(v)}
    cfg = infer_config(sd, a.snn_steps, a.img_size)
    save_file(sd, a.out, metadata={"config": json.dumps(cfg)})
    print(f"wrote {a.out}: {len(sd)} tensors, config {json.dumps(cfg)}")


if __name__ == "__main__":
    main()
