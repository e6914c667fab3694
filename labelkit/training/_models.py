"""Backbones through timm's registry, SeLa's AlexNet registered into it, and the multi-head SeLa model.

``import labelkit.training`` registers ``alexnet`` (SeLa's BatchNorm AlexNet, conv widths 96-256-384-384-256),
``alexnet_small`` (64-192-384-256-256) and ``labelkit_cnn`` (a compact conv net for tiny images) with timm, so
``timm.create_model("alexnet")`` and every other timm name go through one path. Nothing is ever downloaded:
pretrained weights are looked up in the local caches and handed to timm as a file (no process-wide switch).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from timm.models import register_model
from torch import nn

from ..errors import ConfigError

__all__ = ["AlexNet", "SmallCNN", "SelaModel", "create_backbone", "feature_dim", "init_record", "ALEXNET_WIDTHS"]

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


def create_backbone(arch: str, image_size: int, init: str | None = None, in_chans: int = 3,
                    pretrained: bool = False, init_partial: bool = False) -> nn.Module:
    """A timm backbone without classifier (``num_classes=0``).

    Models with a fixed input size (ViTs) get ``image_size``. ``pretrained`` takes timm's own weights from its
    local cache (labelkit never downloads: with no cached copy the error names ``--init``); ``init`` loads
    local weights on top (see :func:`load_weights`; ``init_partial`` accepts weights that fit only part of
    the body); what they filled is kept as ``model.labelkit_init``.
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
    if pretrained:  # a local file only: timm is never asked for a URL or a hub repository
        kwargs["pretrained_cfg_overlay"] = {"file": cached_weights(arch)}
    model = timm.create_model(arch, pretrained=pretrained, num_classes=0, in_chans=in_chans, **kwargs)
    if init:
        model.labelkit_init = {"init": init, **load_weights(model, init, partial=init_partial)}
    return model


def cached_weights(arch: str) -> str:
    """The local file of timm's pretrained weights for ``arch``, from the Hugging Face cache (``HF_HUB_CACHE``,
    ``HF_HOME``) or torch's hub cache (``TORCH_HOME``), found without any network access; a
    :class:`ConfigError` naming ``--init`` when neither holds them."""
    cfg = timm.models.get_pretrained_cfg(arch)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME") or os.path.join(Path.home(), ".cache", "huggingface"), "hub")
        from huggingface_hub import try_to_load_from_cache

        names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else ["model.safetensors",
                                                                                    "pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(hub_id, name, cache_dir=hub)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = getattr(cfg, "url", None)
    if url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
        if os.path.isfile(path):
            return path
    where = "timm has no pretrained weights for it" if cfg is None or not (hub_id or url) else \
        "they are not in the local cache (Hugging Face or torch hub) and labelkit does not download"
    raise ConfigError(f"--pretrained {arch}: {where}; fetch them once with timm where there is a network, or give "
                      "local weights with --init FILE")


# keys under which a backbone's weights sit in the checkpoints labelkit reads
_PREFIXES = ("backbone.net.", "backbone.", "module.", "model.", "")


def load_weights(model: nn.Module, path: str, partial: bool = False) -> dict:
    """Load local weights into ``model``: safetensors, a timm or torchvision state dict (also inside
    ``state_dict``/``model``), or a labelkit run's ``model.safetensors``. Classifier weights (shapes that do
    not fit) are dropped. Returns what was loaded, left missing (random) and not used; no key at all matching
    this architecture is an error, and so is a file that leaves more than half of the body's parameters random
    unless ``partial``."""
    if not os.path.isfile(path):
        raise ConfigError(f"--init {path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    except Exception as exc:
        raise ConfigError(f"--init {path}: not a readable weights file ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"--init {path}: not a state dict of tensors")
    own = model.state_dict()

    def strip(prefix):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    # the prefix under which most keys fit this architecture
    state = max((strip(p) for p in _PREFIXES), key=lambda s: sum(k in own for k in s))
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    wrong_shape = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    if not fits:
        raise ConfigError(f"--init {path}: no weight matches this architecture (its keys look like "
                          f"{sorted(state)[:3]}, the model's like {sorted(own)[:3]})")
    body = [k for k in wrong_shape if not _is_classifier(k)]
    if body:
        raise ConfigError(f"--init {path}: {len(body)} weight(s) do not fit this architecture, e.g. "
                          f"{body[0]} is {tuple(state[body[0]].shape)} in the file but "
                          f"{tuple(own[body[0]].shape)} here")
    missing = sorted(set(own) - set(fits))
    random = sum(own[k].numel() for k in missing if not _is_classifier(k) and own[k].is_floating_point())
    total = sum(v.numel() for k, v in own.items() if not _is_classifier(k) and v.is_floating_point())
    if random > total / 2 and not partial:
        raise ConfigError(f"--init {path}: fits only {len(fits)} of the model's {len(own)} weights, leaving "
                          f"{random / total:.0%} of the body's parameters random (e.g. {missing[0]}); give weights "
                          "of this architecture, or --init-partial to start from them anyway")
    model.load_state_dict(fits, strict=False)
    return {"loaded": len(fits), "missing": missing, "unused": sorted(set(state) - set(fits)),
            "random_share": round(random / max(total, 1), 4)}


def init_record(model: nn.Module) -> dict | None:
    """What ``--init`` filled in ``model``, for the run's history: counts, and the first names missing (left
    random) and unused; None without ``--init``."""
    report = getattr(model, "labelkit_init", None)
    if report is None:
        return None
    return {"type": "init", "init": report["init"], "loaded": report["loaded"], "missing": len(report["missing"]),
            "unused": len(report["unused"]), "random_share": report["random_share"],
            "missing_names": report["missing"][:10], "unused_names": report["unused"][:10]}


def _is_classifier(key: str) -> bool:
    return key.split(".")[0] in ("fc", "head", "classifier", "last_linear", "heads")


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
        if f.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # bfloat16 keeps 8 bits of a logit, and the cross-entropy of nearly fitted labels lives in the last
            # of them: on the development suite's textures (seeds 0 and 1), heads trained in bfloat16 ended at
            # NMI 0.770 / 0.764, float32 heads on the same bfloat16 backbone at 0.843 / 0.823. The heads cost
            # K x D a sample, little beside a backbone on a CPU (on CUDA, where K x T reaches 3000 x 10 and
            # nothing was measured, they stay in bfloat16).
            with torch.autocast("cpu", enabled=False):
                return self._logits(f.float())
        return self._logits(f)

    def _logits(self, f: torch.Tensor) -> list[torch.Tensor]:
        return [nn.functional.linear(f, *self.head_weights(h)) for h in range(len(self.heads))]
