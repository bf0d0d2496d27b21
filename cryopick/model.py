"""Patch classifier shared by train and pick: a ResNet that is also a dense score-map network.

Design (decided for pick's sake): the backbone is fully convolutional with output stride OS
(default 8; later stages trade stride for dilation) and the head is dropout + a 1×1 convolution,
so the network maps a binned image to a logit map in which sample ``(i, j)`` is centred on input
pixel ``(i·OS, j·OS)``. The classifier's logit for a 128×128 patch is the map's sample at the
patch centre ``(64, 64)``. Pick runs the same network once over a whole (tiled) micrograph and
reads every sample: the same function of the image around each centre, not a separate model.
The only difference is what lies beyond the patch border (zero padding vs real context).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cryopick.errors import CryopickError

# (block, blocks per stage, stage widths)
_ARCHS = {
    "resnet8": ("basic", [1, 1, 1], [32, 64, 128]),
    "resnet18": ("basic", [2, 2, 2, 2], [64, 128, 256, 512]),
    "resnet34": ("basic", [3, 4, 6, 3], [64, 128, 256, 512]),
    "resnet50": ("bottleneck", [3, 4, 6, 3], [64, 128, 256, 512]),
}
BACKBONES = tuple(_ARCHS)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x), inplace=True)


def _stride_one_tail(stages: list[nn.Sequential]) -> tuple[int, int]:
    """First stage of the trailing run of stride-1 stages, and how far (in feature cells) an output of
    those stages reaches into their input: the centre logit depends on nothing beyond that radius."""
    start, radius = len(stages), 0
    for i in range(len(stages) - 1, -1, -1):
        convs = [m for m in stages[i].modules() if isinstance(m, nn.Conv2d)]
        if any(c.stride != (1, 1) for c in convs):
            break
        start = i
        radius += sum(c.dilation[0] * (c.kernel_size[0] // 2) for c in convs if c.kernel_size[0] > 1)
    return start, radius


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNetBackbone(nn.Module):
    """ResNet with a 1-channel stem; stages beyond ``output_stride`` use dilation instead of stride."""

    def __init__(self, block: str, layers: list[int], widths: list[int], output_stride: int = 8):
        super().__init__()
        if output_stride not in (4, 8, 16, 32):
            raise CryopickError(f"output stride must be 4, 8, 16 or 32, got {output_stride}")
        block_cls = BasicBlock if block == "basic" else Bottleneck
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 7, 2, padding=3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, padding=1),
        )
        stride_now, dilation, cin = 4, 1, widths[0]
        stages = []
        for i, (n, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            if stride == 2 and stride_now >= output_stride:
                dilation *= 2
                stride = 1
            stride_now *= stride
            blocks = []
            for b in range(n):
                blocks.append(block_cls(cin, width, stride if b == 0 else 1, dilation))
                cin = width * block_cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.out_channels = cin
        self.output_stride = stride_now
        self.tail_start, self.tail_radius = _stride_one_tail(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class PatchClassifier(nn.Module):
    """Binary particle classifier whose logit map can be computed densely over a micrograph."""

    def __init__(self, backbone: str = "resnet18", dropout: float = 0.3, output_stride: int = 8):
        super().__init__()
        if backbone not in _ARCHS:
            raise CryopickError(f"unknown backbone '{backbone}' (choose from {', '.join(BACKBONES)})")
        block, layers, widths = _ARCHS[backbone]
        self.spec = {"backbone": backbone, "dropout": float(dropout), "output_stride": int(output_stride)}
        self.backbone = ResNetBackbone(block, layers, widths, output_stride)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Conv2d(self.backbone.out_channels, 1, 1)
        self.output_stride = self.backbone.output_stride
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def score_map(self, x: torch.Tensor) -> torch.Tensor:
        """Logit map ``(N, H', W')``; sample ``(i, j)`` is centred on input pixel ``(i·OS, j·OS)``."""
        return self.head(self.dropout(self.backbone(x)))[:, 0]

    def centre_index(self, size: int) -> int:
        half = size // 2
        if half % self.output_stride:
            raise CryopickError(
                f"patch size {size}: its centre {half} is not on the output-stride-{self.output_stride} grid"
            )
        return half // self.output_stride

    def forward(self, x: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """Logits ``(N,)`` for patches ``(N, 1, H, W)``: the map sample at the patch centre; with ``dense``,
        the whole logit map ``(N, H', W')`` (``score_map``; through ``forward`` so DDP sees it).

        The trailing stride-1 stages only need the centre's cone of dependence, so their input is
        cropped to it first (exactly the same logit, far less work for small backbones).
        """
        if dense:
            return self.score_map(x)
        cy, cx = self.centre_index(x.shape[-2]), self.centre_index(x.shape[-1])
        bb = self.backbone
        f = bb.stages[:bb.tail_start](bb.stem(x))
        r = bb.tail_radius
        if cy - r > 0 and cx - r > 0 and cy + r + 1 < f.shape[-2] and cx + r + 1 < f.shape[-1]:
            f = f[..., cy - r:cy + r + 1, cx - r:cx + r + 1]
            cy = cx = r
        f = bb.stages[bb.tail_start:](f)
        return self.head(self.dropout(f))[:, 0, cy, cx]


def build_model(spec: dict) -> PatchClassifier:
    """Model from the spec recorded in a checkpoint (``PatchClassifier.spec``)."""
    return PatchClassifier(spec["backbone"], spec.get("dropout", 0.0), spec.get("output_stride", 8))
