import pytest
import timm
import torch

from labelkit.errors import ConfigError
from labelkit.training import SelaModel, create_backbone, feature_dim


@pytest.mark.parametrize("name, size, widths", [("alexnet", 224, (96, 256, 384, 384, 256)),
                                                 ("alexnet_small", 224, (64, 192, 384, 256, 256)),
                                                 ("alexnet", 32, (96, 256, 384, 384, 256))])
def test_alexnet_is_a_timm_model(name, size, widths):
    model = timm.create_model(name, num_classes=7, img_size=size)
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert tuple(convs) == widths
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 5
    model.eval()
    x = torch.randn(2, 3, size, size)
    assert model(x).shape == (2, 7)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.head_hidden_size)
    model.reset_classifier(0)
    assert model(x).shape == (2, 4096)
    assert name in timm.list_models("alexnet*")


def test_registered_models_refuse_pretrained_weights():
    with pytest.raises(ConfigError, match="no pretrained weights"):
        timm.create_model("alexnet", pretrained=True)


def test_backbone_factory_sizes_heads_from_timm():
    backbone = create_backbone("resnet18", 32)
    model = SelaModel(backbone, [10, 30])
    out = model(torch.randn(2, 3, 32, 32))
    assert [o.shape for o in out] == [(2, 10), (2, 30)]
    assert model.heads[0].in_features == feature_dim(backbone) == 512
    vit = create_backbone("vit_tiny_patch16_224", 64)  # fixed input size: gets the chosen size
    assert vit(torch.randn(1, 3, 64, 64)).shape[-1] == feature_dim(vit)


def test_unknown_arch_suggests_names():
    with pytest.raises(ConfigError, match="did you mean .*resnet18"):
        create_backbone("resnet19", 32)


def test_init_loads_local_weights(tmp_path):
    from safetensors.torch import save_file

    a = create_backbone("labelkit_cnn", 16)
    path = tmp_path / "w.safetensors"
    save_file({f"backbone.{k}": v.contiguous() for k, v in a.state_dict().items()}, str(path))
    b = create_backbone("labelkit_cnn", 16, init=str(path))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    with pytest.raises(ConfigError, match="no such file"):
        create_backbone("labelkit_cnn", 16, init=str(tmp_path / "missing.pt"))


def test_cosine_heads_are_a_linear_map_of_the_features():
    backbone = create_backbone("labelkit_cnn", 16)
    model = SelaModel(backbone, [4, 6], temperature=0.1).eval()
    x = torch.randn(3, 3, 16, 16)
    f = model.features(x)
    assert torch.allclose(f.norm(dim=1), torch.ones(3), atol=1e-5)
    for h, out in enumerate(model(x)):
        weight, bias = model.head_weights(h)
        assert bias is None and torch.allclose(out, f @ weight.T, atol=1e-5)
        assert out.abs().max() <= 1 / 0.1 + 1e-4  # cosine / temperature
    plain = SelaModel(backbone, [4]).eval()
    weight, bias = plain.head_weights(0)
    assert torch.allclose(plain(x)[0], plain.features(x) @ weight.T + bias, atol=1e-5)


def test_importing_labelkit_leaves_the_hub_switched_on(tmp_path):
    """labelkit changes no process-wide setting: a user's own hub reads keep working in the same process."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = ("import os, labelkit.cli, labelkit.training as t; t.create_backbone('labelkit_cnn', 16); "
            "import huggingface_hub.constants as c; print(os.environ.get('HF_HUB_OFFLINE'), c.HF_HUB_OFFLINE)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "False"]


def _fake_hub_cache(root, repo: str, state: dict) -> None:
    """The layout huggingface_hub gives a downloaded repository: refs/main names the snapshot holding the file."""
    from safetensors.torch import save_file

    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    (folder / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "snapshots" / "0123abcd" / "model.safetensors"))


def test_pretrained_weights_come_from_the_local_cache_and_never_the_network(tmp_path, monkeypatch):
    import huggingface_hub
    import timm.models._builder as builder

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(builder, "download_cached_file", no_network)
    monkeypatch.setattr(builder, "load_state_dict_from_hf", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match="not in the local cache.*--init FILE"):
        create_backbone("resnet18", 32, pretrained=True)
    reference = timm.create_model("resnet18")
    _fake_hub_cache(tmp_path / "hub", timm.models.get_pretrained_cfg("resnet18").hf_hub_id, reference.state_dict())
    loaded = create_backbone("resnet18", 32, pretrained=True)
    assert torch.equal(loaded.conv1.weight, reference.conv1.weight)
    assert torch.equal(loaded.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_init_that_fits_only_part_of_the_body_is_refused_unless_partial(tmp_path):
    from safetensors.torch import save_file

    from labelkit.training import init_record

    full = create_backbone("resnet18", 32)
    stem = {k: v for k, v in full.state_dict().items() if k.startswith(("conv1.", "bn1.", "layer1."))}
    path = tmp_path / "stem.safetensors"
    save_file({k: v.contiguous() for k, v in stem.items()}, str(path))
    with pytest.raises(ConfigError, match=r"leaving 9\d% of the body's parameters random.*--init-partial"):
        create_backbone("resnet18", 32, init=str(path))  # loaded silently before, the rest left random
    model = create_backbone("resnet18", 32, init=str(path), init_partial=True)
    assert torch.equal(model.layer1[0].conv1.weight, full.layer1[0].conv1.weight)
    record = init_record(model)
    assert record["loaded"] == len(stem) and record["missing"] > 0 and record["random_share"] > 0.9
    assert record["missing_names"][0].startswith("layer")
    whole = tmp_path / "whole.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(whole))
    assert init_record(create_backbone("resnet18", 32, init=str(whole)))["missing"] == 0


def test_eval_uses_a_pretrained_backbones_own_input_configuration(tmp_path, monkeypatch):
    import numpy as np

    import labelkit.training._probe as probe
    from labelkit.training import EvalConfig, evaluate

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    reference = timm.create_model("resnet18")
    _fake_hub_cache(tmp_path / "hub", timm.models.get_pretrained_cfg("resnet18").hf_hub_id, reference.state_dict())
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 3
    np.savez(tmp_path / "d.npz", images=(rng.integers(0, 60, (30, 8, 8)) + 90 * labels[:, None, None]).astype(np.uint8),
             labels=labels)
    used, original = [], probe.extract_features

    def recording(backbone, dim, source, transform, *args, **kwargs):
        used.append(repr(transform))
        return original(backbone, dim, source, transform, *args, **kwargs)

    monkeypatch.setattr(probe, "extract_features", recording)
    evaluate(EvalConfig("knn", data=str(tmp_path / "d.npz"), arch="resnet18", pretrained=True, image_size=32, k=3))
    # timm's resnet18 weights expect 224 px centre crops (eval ignored this and resized to --image-size 32)
    assert used and "CenterCrop(size=(224, 224))" in used[0] and "(32, 32)" not in used[0]
