"""EfficientNet-Lite0 image tower in plain torch, named to load lukemelas-style weights strictly."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (repeats, kernel, stride, expand ratio, channels in, channels out) per stage, from the
# EfficientNet-Lite reference (tensorflow/tpu efficientnet/lite): B0's stages, no
# squeeze-excitation, ReLU6, stem and head not scaled.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STRIDE = 32  # total downsampling: the last feature map has (S / 32)^2 cells


def _bn(channels: int) -> nn.BatchNorm2d:
    # TensorFlow's batch-norm settings (decay 0.99, eps 1e-3) the weights were trained with.
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class SameConv2d(nn.Conv2d):
    """Bias-free convolution with TensorFlow "SAME" padding, which for stride 2 pads less
    before than after. The input sides are even (image size a multiple of 32), so the padding
    is a constant of the layer: no shape arithmetic in the exported graph."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        total = kernel - stride  # SAME on an even side: (n/s - 1) * s + k - n
        before = total // 2
        symmetric = 2 * before == total  # then the convolution pads by itself, no copy
        super().__init__(
            cin, cout, kernel, stride, before if symmetric else 0, groups=groups, bias=False
        )
        self.pads = None if symmetric else (before, total - before, before, total - before)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pads is not None and torch.onnx.is_in_onnx_export():
            kernel, stride = self.kernel_size[0], self.stride[0]
            return _AsymmetricConv.apply(x, self.weight, kernel, stride, self.groups, self.pads)
        return super().forward(x if self.pads is None else F.pad(x, self.pads))


class _AsymmetricConv(torch.autograd.Function):
    """Pad, then convolve, exported as ONE ONNX Conv with asymmetric `pads`. A separate Pad
    node is not fused by ONNX Runtime: the tensor leaves its blocked layout around the Pad,
    and those copies took 30% of this tower's CPU time."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, kernel: int, stride: int, groups: int, pads: Any
    ) -> Tensor:
        return F.conv2d(F.pad(x, pads), weight, None, stride, 0, 1, groups)

    @staticmethod
    def symbolic(
        g: Any, x: Any, weight: Any, kernel: int, stride: int, groups: int, pads: Any
    ) -> Any:
        left, right, top, bottom = pads  # F.pad order: last dimension first
        return g.op(
            "Conv",
            x,
            weight,
            kernel_shape_i=[kernel, kernel],
            strides_i=[stride, stride],
            pads_i=[top, left, bottom, right],  # ONNX: all begins, then all ends
            dilations_i=[1, 1],
            group_i=groups,
        )


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise k x k, 1x1 project; skip when shapes match."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, cout, 1)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if hasattr(self, "_expand_conv"):
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.skip else out


class EfficientNetLite0(nn.Module):
    """pixels (B, 3, S, S) -> last-stage cells (B, (S/32)^2, 1280) and their average (B, 1280).

    Masking for MVM: `mask` (B, N) bool marks cells of the last (S/32 x S/32) grid, the grid a
    visual tokenizer aligns with. Each masked cell's 16 x 16 footprint in the stem output
    (stride 2) is replaced by a learned `mask_embedding`, the CNN analogue of BEiT swapping a
    patch embedding: the network then sees no pixel of that cell, yet its receptive field
    gives the masked cell's state the surrounding context.
    """

    new_parameters = ("mask_embedding",)  # not in the ImageNet weights
    width = 1280

    def __init__(self, image_size: int) -> None:
        super().__init__()
        if image_size % STRIDE:
            raise ValueError(
                f"image size {image_size} is not a multiple of {STRIDE} for EfficientNet"
            )
        self.grid_size = (image_size // STRIDE, image_size // STRIDE)
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        self.mask_embedding = nn.Parameter(torch.zeros(32))
        self._blocks = nn.ModuleList(
            MBConvBlock(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand)
            for repeats, kernel, stride, expand, cin, cout in STAGES
            for i in range(repeats)
        )
        self._conv_head = SameConv2d(320, self.width, 1)
        self._bn1 = _bn(self.width)
        self._init_weights()
        # Channels-last weights make every convolution run NHWC (oneDNN and cuDNN alike):
        # about 1.4x faster on this CPU, and the layout cuDNN's depthwise kernels want.
        self.to(memory_format=torch.channels_last)

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self._blocks)

    @property
    def head_modules(self) -> tuple[nn.Module, ...]:
        return (self._conv_head, self._bn1)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        x = F.relu6(self._bn0(self._conv_stem(pixels)))  # (B, 32, S/2, S/2)
        if mask is not None:
            rows, cols = self.grid_size
            cells = mask.view(-1, 1, rows, cols)
            cells = cells.repeat_interleave(STRIDE // 2, 2).repeat_interleave(STRIDE // 2, 3)
            x = torch.where(cells, self.mask_embedding.view(1, -1, 1, 1).to(x.dtype), x)
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))  # (B, 1280, S/32, S/32)
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, 1280)
        return {"tokens": tokens, "pooled": tokens.mean(1)}
