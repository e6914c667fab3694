"""Backbones through timm's registry, SeLa's AlexNet registered into it, and the multi-head SeLa model.

``import labelkit.models`` registers ``alexnet`` (SeLa's BatchNorm AlexNet, conv widths 96-256-384-384-256),
``alexnet_small`` (64-192-384-256-256) and ``labelkit_cnn`` (a compact conv net for tiny images) with timm, so
``timm.create_model("alexnet")`` and every other timm name go through one path. Nothing is ever downloaded.
"""

from __future__ import annotations

import difflib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub access, ever

import timm
import torch
from timm.models import register_model
from torch import nn

from .errors import ConfigError

__all__ = ["AlexNet", "SmallCNN", "SelaModel", "create_backbone", "feature_dim", "ALEXNET_WIDTHS"]

ALEXNET_WIDTHS = {"big": (96, 256, 384, 384, 256), "small": (64, 192, 384, 256, 256)}


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class _TimmModel(nn.Module):
    """timm's method surface, so generic code never special-cases labelkit's own models.

    Subclasses set ``features``, ``head_hidden_size`` and ``forward_head``.
    """

    head_hidden_size: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, **_ignored) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes else nn.Identity()


class AlexNet(_TimmModel):
    """SeLa's AlexNet: five conv + BatchNorm layers and a two-layer 4096-wide MLP (Asano et al. 2020).

    Inputs of 128 px and more use the ImageNet stem (11x11 stride 4, 3x3 stride-2 pools, 6x6 before the MLP);
    smaller inputs (e.g. 32 px) use a 5x5 stride-1 stem and 2x2 pools so the feature map does not vanish.
    """

    def __init__(self, widths=ALEXNET_WIDTHS["big"], num_classes: int = 1000, in_chans: int = 3,
                 img_size: int = 224, mlp_width: int = 4096, drop_rate: float = 0.5, **_ignored):
        super().__init__()
        c1, c2, c3, c4, c5 = widths
        if img_size >= 128:
            stem, pool = _conv_bn(in_chans, c1, 11, 4, 2), lambda: nn.MaxPool2d(3, 2)
            grid = 6
        else:
            stem, pool = _conv_bn(in_chans, c1, 5, 1, 2), lambda: nn.MaxPool2d(2, 2)
            grid = max(1, img_size // 8)
        self.features = nn.Sequential(
            *stem, pool(),
            *_conv_bn(c1, c2, 5, 1, 2), pool(),
            *_conv_bn(c2, c3, 3, 1, 1),
            *_conv_bn(c3, c4, 3, 1, 1),
            *_conv_bn(c4, c5, 3, 1, 1), pool(),
        )
        self.pool = nn.AdaptiveMaxPool2d(grid)
        self.num_features = c5 * grid * grid
        self.head_hidden_size = mlp_width
        self.pre_logits = nn.Sequential(
            nn.Dropout(drop_rate), nn.Linear(self.num_features, mlp_width), nn.ReLU(inplace=True),
            nn.Dropout(drop_rate), nn.Linear(mlp_width, mlp_width), nn.ReLU(inplace=True),
        )
        self.num_classes = num_classes
        self.head = nn.Linear(mlp_width, num_classes) if num_classes else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(torch.flatten(self.pool(x), 1))
        return x if pre_logits else self.head(x)



class SmallCNN(_TimmModel):
    """A compact conv net for tiny images (digits, 16-32 px): three conv stages, global average pooling."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, width: int = 32, img_size: int = 32,
                 drop_rate: float = 0.0, **_ignored):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn(in_chans, w, 3, 1, 1), *_conv_bn(w, w, 3, 1, 1), nn.MaxPool2d(2),
            *_conv_bn(w, 2 * w, 3, 1, 1), *_conv_bn(2 * w, 2 * w, 3, 1, 1), nn.MaxPool2d(2),
            *_conv_bn(2 * w, 4 * w, 3, 1, 1),
        )
        self.num_features = self.head_hidden_size = 4 * w
        self.drop = nn.Dropout(drop_rate)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)



def _no_weights(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ConfigError(f"{name} has no pretrained weights; load local weights with --init FILE")


# timm's create_model passes pretrained_cfg, pretrained_cfg_overlay and cache_dir to every entry point;
# the models above take and ignore them through **_ignored.
@register_model
def alexnet(pretrained: bool = False, **kwargs) -> AlexNet:
    """SeLa AlexNet with BatchNorm, conv widths 96-256-384-384-256."""
    _no_weights("alexnet", pretrained)
    return AlexNet(ALEXNET_WIDTHS["big"], **kwargs)


@register_model
def alexnet_small(pretrained: bool = False, **kwargs) -> AlexNet:
    """SeLa AlexNet with BatchNorm, conv widths 64-192-384-256-256."""
    _no_weights("alexnet_small", pretrained)
    return AlexNet(ALEXNET_WIDTHS["small"], **kwargs)


@register_model
def labelkit_cnn(pretrained: bool = False, **kwargs) -> SmallCNN:
    """Compact conv net for tiny images; the default backbone for builtin:digits."""
    _no_weights("labelkit_cnn", pretrained)
    return SmallCNN(**kwargs)


_TAKES_IMG_SIZE = {"alexnet", "alexnet_small", "labelkit_cnn"}


def create_backbone(arch: str, image_size: int, init: str | None = None, in_chans: int = 3) -> nn.Module:
    """A timm backbone without classifier (``num_classes=0``) and without pretrained weights.

    Models with a fixed input size (ViTs) get ``image_size``; ``init`` loads local weights (safetensors or a
    tensor checkpoint, read with ``weights_only=True``).
    """
    names = timm.list_models()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ConfigError(f"--arch {arch!r} is not a timm model name{hint}")
    kwargs = {}
    cfg = timm.models.get_pretrained_cfg(arch)
    if arch in _TAKES_IMG_SIZE or (cfg is not None and cfg.fixed_input_size):
        kwargs["img_size"] = image_size
    model = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    if init:
        load_weights(model, init)
    return model


def load_weights(model: nn.Module, path: str) -> None:
    """Load local weights into ``model``; keys of a labelkit run (``backbone.``) are matched too."""
    if not os.path.isfile(path):
        raise ConfigError(f"--init {path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    if any(key.startswith("backbone.") for key in state):
        state = {key[len("backbone."):]: value for key, value in state.items() if key.startswith("backbone.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if len(missing) == len(model.state_dict()):
        raise ConfigError(f"--init {path}: no weight matches this architecture")


def feature_dim(backbone: nn.Module) -> int:
    """Width of the pre-logit features that SeLa heads read (timm's ``head_hidden_size``)."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


class SelaModel(nn.Module):
    """A backbone and T linear heads of K_h outputs each on its pre-logit features ("[K x T]").

    With ``temperature`` set, features and head weights are L2-normalised and the logits are cosine
    similarities divided by the temperature (prototype heads, as in SwAV); the paper's plain linear heads
    otherwise. Either way a head is a linear map of :meth:`features`, given by :meth:`head_weights`.
    """

    def __init__(self, backbone: nn.Module, clusters: list[int], temperature: float | None = None):
        super().__init__()
        self.backbone = backbone
        self.temperature = temperature
        dim = feature_dim(backbone)
        self.heads = nn.ModuleList(nn.Linear(dim, k, bias=temperature is None) for k in clusters)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)  # num_classes=0: timm returns the pooled pre-logit features
        return nn.functional.normalize(f, dim=1) if self.temperature else f

    def head_weights(self, h: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self.heads[h]
        if self.temperature:
            return nn.functional.normalize(head.weight, dim=1) / self.temperature, None
        return head.weight, head.bias

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.features(x)
        return [nn.functional.linear(f, *self.head_weights(h)) for h in range(len(self.heads))]
