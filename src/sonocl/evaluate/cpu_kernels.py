"""CPU kernels of the fine-tuning models: convolutions as GEMMs and per-stage memory layouts on tiny feature maps.

Measured on a 2-core Xeon (AVX-512) at 64 px, last-block: channels-last is faster up to ``layer2`` but about 2×
slower on the 4×4 and 2×2 maps of ``layer3``/``layer4``, where `GemmConv2d` also beats oneDNN's backward
(docs/evaluate.md, Cost). Only the kernels change: same parameters, same results up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

TINY_MAP = 4
"""Feature maps of at most this many pixels a side run in NCHW layout and, when trained on the CPU, as GEMM convs."""


def _stages(backbone: torchvision.models.ResNet) -> list[tuple[nn.Module, int]]:
    """The backbone's modules in forward order, each with the stride of its output relative to the input image."""
    return [
        (backbone.conv1, 2),
        (backbone.bn1, 2),
        (backbone.relu, 2),
        (backbone.maxpool, 4),
        (backbone.layer1, 4),
        (backbone.layer2, 8),
        (backbone.layer3, 16),
        *[(block, 32) for block in backbone.layer4],
    ]


class GemmConv2d(nn.Conv2d):
    """A convolution computed as one im2col matrix product, with the same parameters and result as ``nn.Conv2d``.

    On the CPU, oneDNN's kernels (above all its backward) are 1.5–3× slower on the 2×2 maps of ``layer4`` at
    64 px than MKL's GEMM on the same product (docs/evaluate.md, Cost); the unfolded input is small there.
    """

    # Pairs in a 2-d convolution (torch types them for any dimension); the padding numeric, as `sharing` builds it
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def sharing(cls, conv: nn.Conv2d) -> GemmConv2d:
        """A GemmConv2d using ``conv``'s own weight and bias tensors (same Parameters: optimiser and state unchanged)."""
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"GemmConv2d needs groups=1, numeric zero padding: {conv}")
        gemm = cls(
            conv.in_channels,
            conv.out_channels,
            _pair(conv.kernel_size),
            _pair(conv.stride),
            _pair(conv.padding),
            _pair(conv.dilation),
            bias=conv.bias is not None,
            device="meta",
        )
        gemm.weight, gemm.bias = conv.weight, conv.bias
        return gemm

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, _, height, width = images.shape
        out_h, out_w = (
            (side + 2 * pad - dil * (k - 1) - 1) // stride + 1
            for side, pad, dil, k, stride in zip(
                (height, width), self.padding, self.dilation, self.kernel_size, self.stride
            )
        )
        columns = F.unfold(images, self.kernel_size, self.dilation, self.padding, self.stride)  # (N, C·kh·kw, L)
        out = columns.transpose(1, 2).reshape(n * out_h * out_w, -1) @ self.weight.flatten(1).T  # one (N·L, O) GEMM
        if self.bias is not None:
            out = out + self.bias
        return out.view(n, out_h * out_w, -1).transpose(1, 2).reshape(n, -1, out_h, out_w)


def _pair(size: tuple[int, ...]) -> tuple[int, int]:
    """One of a 2-d convolution's sizes, which torch types as a tuple of any length."""
    height, width = size
    return height, width


def _use_gemm_convs(module: nn.Module) -> None:
    """Replace every Conv2d inside ``module`` by a `GemmConv2d` sharing its parameters."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(module, name, GemmConv2d.sharing(child))
        else:
            _use_gemm_convs(child)


class _ContiguousLayout(nn.Module):
    """Switches activations from channels-last to NCHW (where the small feature maps begin)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous()
