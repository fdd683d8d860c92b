#!/usr/bin/env python3
"""Convert an official SDDPM PyTorch checkpoint, or a pytorch-ddpm one (the ANN counterpart,
w86763777/pytorch-ddpm), to a sddpm-gpu safetensors checkpoint. `sddpm-gpu convert` does the same
without Python (and every sddpm-gpu command reads the .pt directly); this script, which needs
torch, is kept to check the two against each other.

usage: python3 tools/convert_checkpoint.py CKPT.pt OUT.safetensors [--snn-steps 4] [--img-size 32] [--key net_model]
       python3 tools/convert_checkpoint.py CKPT.pt OUT.safetensors --key ema_model [--dropout 0.1] [--img-size 32]

The official training script saves {'net_model': state_dict, ...}; DataParallel prefixes
('module.') are stripped. Tensor names stay the official ones. The model config (the reference
constructor's names: T, ch, ch_mult, num_res_blocks, timestep, img_ch, plus img_size) is inferred
from the shapes and written as JSON into the metadata key `config`; the spiking time steps cannot
be inferred from weights, so pass --snn-steps if the model was trained with T != 4.

pytorch-ddpm checkpoints (recognised by `head.weight`) hold two state_dicts, 'net_model' (the
trained weights) and 'ema_model' (their EMA, which pytorch-ddpm samples and evaluates from):
--key must say which. Their config (T, ch, ch_mult, attn, num_res_blocks, img_ch, with
"model": "ddpm") is inferred from shapes, attention levels from the `.attn.` keys; dropout only
matters for further training and is not in the weights: --dropout (default 0.1, pytorch-ddpm's).
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


def infer_ddpm_config(sd, img_size, dropout):
    ch, img_ch = sd["head.weight"].shape[:2]
    levels, attn, nrb, in_level, last, level_attn = [], [], None, 0, ch, False
    i = 0
    while True:
        if f"downblocks.{i}.block1.2.weight" in sd:
            last = sd[f"downblocks.{i}.block1.2.weight"].shape[0]
            in_level += 1
            level_attn |= f"downblocks.{i}.attn.proj_q.weight" in sd
        elif f"downblocks.{i}.main.weight" in sd:
            nrb = in_level if nrb is None else nrb
            if level_attn:
                attn.append(len(levels))
            levels.append(last // ch)
            in_level, level_attn = 0, False
        else:
            break
        i += 1
    if level_attn:
        attn.append(len(levels))
    levels.append(last // ch)
    return {"model": "ddpm", "T": int(sd["time_embedding.timembedding.0.weight"].shape[0]), "ch": int(ch),
            "ch_mult": levels, "attn": attn, "num_res_blocks": int(nrb if nrb is not None else in_level),
            "dropout": dropout, "img_ch": int(img_ch), "img_size": img_size}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--snn-steps", type=int, default=4)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--key", help="entry of the checkpoint dict holding the state_dict (SDDPM default: "
                    "net_model; pytorch-ddpm: required, ema_model or net_model)")
    ap.add_argument("--dropout", type=float, default=0.1, help="pytorch-ddpm only: dropout for further training")
    a = ap.parse_args()
    obj = torch.load(a.ckpt, map_location="cpu", weights_only=False)
    names = lambda d: {re.sub(r"^module\.", "", k) for k in d} if isinstance(d, dict) else set()
    ddpm = isinstance(obj, dict) and any("head.weight" in names(v) for v in obj.values() if isinstance(v, dict))
    if ddpm and a.key is None:
        sys.exit(f"error: {a.ckpt}: a pytorch-ddpm checkpoint holds 'net_model' and 'ema_model'; pass --key ema_model "
                 "(the EMA weights pytorch-ddpm samples from) or --key net_model")
    key = a.key or "net_model"
    sd = obj.get(key, obj) if isinstance(obj, dict) else obj
    marker = "head.weight" if ddpm else "conv.weight"
    if not isinstance(sd, dict) or marker not in names(sd):
        sys.exit(f"error: {a.ckpt}: no {'pytorch-ddpm' if ddpm else 'SDDPM'} state_dict found "
                 f"(looked for '{key}' with '{marker}')")
    sd = {re.sub(r"^module\.", "", k): v.detach().cpu().contiguous() for k, v in sd.items() if torch.is_tensor(v)}
    cfg = infer_ddpm_config(sd, a.img_size, a.dropout) if ddpm else infer_config(sd, a.snn_steps, a.img_size)
    save_file(sd, a.out, metadata={"config": json.dumps(cfg)})
    print(f"wrote {a.out}: {len(sd)} tensors, config {json.dumps(cfg)}")


if __name__ == "__main__":
    main()
