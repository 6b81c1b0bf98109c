"""The two backbones of the perceptual metrics, with the state-dict layouts of the real weights.

* VGG16 `features` (torchvision layout, file `vgg16-397923af.pth`) under the LPIPS v0.1 linear
  heads (`lin0..lin4.model.1.weight`, shipped inside torchmetrics as `lpips_models/vgg.pth`).
* InceptionV3 of FID (pytorch-fid layout, file `pt_inception-2015-12-05-6726825d.pth`): the TF
  2015-12-05 graph ported to torchvision's module names, 1008 classes, average pools that do not
  count padding, max pool in the last block; the metric uses its 2048-d pool3 features.

Neither file can be bundled; `find_weights` looks in the torch hub cache where torchvision /
pytorch-fid put them ($TORCH_HOME/hub/checkpoints). Layer names equal the files' keys, so they
load with strict=True; `filter_inception_state_dict` is the one place that adapts a file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VGG16_FILE = "vgg16-397923af.pth"
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS ScalingLayer: ImageNet stats in [-1, 1] units
LPIPS_SCALE = (0.458, 0.448, 0.450)
FID_SIZE = 299  # Inception input side
FID_FEATURES = 2048  # pool3 width


def find_weights(explicit: str | os.PathLike | None, filename: str) -> Path | None:
    """An explicit path (must exist), else TORCH_HOME's hub/checkpoints/<filename>, else None."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    return cached if cached.is_file() else None


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


# ---- VGG16 + LPIPS --------------------------------------------------------------------------

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # features[i] = relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


class VGG16Features(nn.Module):
    """torchvision's vgg16().features up to relu5_3 (the last max pool is never used)."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> the five tapped activations, (B, 64, H, W) ... (B, 512, H/16, W/16)."""
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                taps.append(x)
        return taps


class NetLin(nn.Module):
    """A LPIPS head: channel weights of one layer's squared feature difference (1x1 conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPSHeads(nn.Module):
    """lin0..lin4, the layout of lpips / torchmetrics `vgg.pth`."""

    def __init__(self, channels=(64, 128, 256, 512, 512)):
        super().__init__()
        for i, c in enumerate(channels):
            self.add_module(f"lin{i}", NetLin(c))

    def forward(self, i: int, diff: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"lin{i}").model(diff)


class LPIPS(nn.Module):
    """LPIPS v0.1 (VGG): sum over 5 layers of the head-weighted, spatially averaged distance."""

    def __init__(self):
        super().__init__()
        self.net = VGG16Features()
        self.heads = LPIPSHeads()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Two (B, 3, H, W) batches in [-1, 1] -> (B,) distances."""
        feats_a = self.net((a - self.shift) / self.scale)
        feats_b = self.net((b - self.shift) / self.scale)
        total = 0
        for i, (fa, fb) in enumerate(zip(feats_a, feats_b, strict=True)):
            # unit-normalise each pixel's feature vector over channels (eps as the original)
            fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + self.heads(i, (fa - fb).pow(2)).mean(dim=(2, 3))  # (B, 1)
        return total[:, 0]


def lpips_heads_file() -> Path:
    """The LPIPS v0.1 VGG heads shipped inside the torchmetrics wheel (7 KB), found unimported."""
    from importlib.util import find_spec

    spec = find_spec("torchmetrics")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("LPIPS needs the heads shipped with torchmetrics: pip install "
                                "'moebius-inpaint[eval]' (or torchmetrics)")  # fmt: skip
    root = Path(list(spec.submodule_search_locations)[0])
    return root / "functional" / "image" / "lpips_models" / "vgg.pth"


def load_lpips(vgg_weights: str | os.PathLike, heads: str | os.PathLike | None = None) -> LPIPS:
    """LPIPS from torchvision's VGG16 file (classifier ignored) and the v0.1 heads, eval mode."""
    model = LPIPS()
    state = {k: v for k, v in _load_file(Path(vgg_weights)).items() if k.startswith("features.")}
    state = {k: v for k, v in state.items() if int(k.split(".")[1]) < len(model.net.features)}
    _strict_load(model.net, state, vgg_weights, VGG16_FILE)
    _strict_load(model.heads, _load_file(Path(heads or lpips_heads_file())), heads, "vgg.pth")
    return model.eval().requires_grad_(False)


def _strict_load(module: nn.Module, state: dict, path, expected: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{path} does not hold the weights this metric needs ({expected}): "
            f"{str(err).splitlines()[0]} ..."
        ) from err


# ---- InceptionV3 (FID) ----------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, the TF port's) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # the TF pooling


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the TF graph's last block (Mixed_7c) max-pools its pool branch
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


class InceptionV3(nn.Module):
    """FID InceptionV3; forward: uint8 (B, 3, H, W) -> pool3 features (B, 2048) in float32."""

    num_features = FID_FEATURES  # read by torchmetrics' FrechetInceptionDistance

    def __init__(self, num_classes: int = 1008):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FID_FEATURES, num_classes)  # logits: unused, kept for a strict load

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255  # as pytorch-fid: [0, 1], bilinear resize, then [-1, 1]
        x = F.interpolate(x, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))  # (B, 2048, 8, 8) -> pool3 (B, 2048)


def filter_inception_state_dict(state: dict, model: InceptionV3) -> dict:
    """pytorch-fid / torchvision-style file -> our keys: drop AuxLogits, add BN step counters."""
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    return state


def load_inception(path: str | os.PathLike) -> InceptionV3:
    """The FID InceptionV3 from pytorch-fid's weights file, eval mode."""
    model = InceptionV3()
    state = filter_inception_state_dict(_load_file(Path(path)), model)
    _strict_load(model, state, path, INCEPTION_FILE)
    return model.eval().requires_grad_(False)
