"""model.py: shapes, sizes, timm compatibility (names, numerics), checkpoint formats, bad checkpoints."""
import argparse

import pytest
import torch
import torch.nn as nn

import model as model_lib
from model import ProjectionHead, build_vit, interpolate_pos_embed, load_encoder, vit_small, vit_tiny

timm = pytest.importorskip("timm")  # requirements-test.txt installs it; the project itself never imports timm


def tiny_vit(**overrides):
    return vit_tiny(**{"image_size": 32, "depth": 2, **overrides})


def tiny_timm_vit(**overrides):
    kwargs = dict(img_size=32, patch_size=16, embed_dim=192, depth=2, num_heads=3, num_classes=10)
    return timm.models.vision_transformer.VisionTransformer(**{**kwargs, **overrides})


@pytest.mark.parametrize("name,width", [("vit_tiny", 192), ("vit_small", 384), ("vit_base", 768),
                                        ("vit_large", 1024)])
def test_output_is_the_class_token_of_width_d(name, width):
    model = build_vit(name, image_size=32, depth=1).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features, tokens = model(images), model.forward_tokens(images)
    assert features.shape == (3, width) and tokens.shape == (3, 1 + 4, width)
    torch.testing.assert_close(features, tokens[:, 0])


# timm's published parameter counts, with its 1000-class classifier (D*1000 + 1000)
PUBLISHED_PARAMETERS = {"vit_tiny": 5_717_416, "vit_small": 22_050_664, "vit_base": 86_567_656,
                        "vit_large": 304_326_632}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETERS))
def test_parameter_counts_match_the_published_figures(name):
    with torch.device("meta"):  # count without allocating ViT-L
        encoder = build_vit(name)
    classifier = encoder.width * 1000 + 1000
    assert sum(p.numel() for p in encoder.parameters()) + classifier == PUBLISHED_PARAMETERS[name]


def test_parameter_names_and_shapes_are_timms():
    ours = tiny_vit().state_dict()
    theirs = {k: v for k, v in tiny_timm_vit().state_dict().items() if not k.startswith("head.")}
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_timm_weights_give_timms_features():
    torch.manual_seed(0)
    reference = tiny_timm_vit(img_size=48).eval()
    ours = tiny_vit(image_size=48).eval()
    ours.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("head.")})
    images = torch.randn(4, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference.forward_head(reference.forward_features(images),
                                                                        pre_logits=True))


def test_initialisation_and_epsilons_are_timms():
    torch.manual_seed(0)
    ours = vit_small(image_size=64, depth=2)
    reference = timm.models.vision_transformer.VisionTransformer(img_size=64, embed_dim=384, depth=2, num_heads=6)
    for module in ours.modules():
        if isinstance(module, nn.LayerNorm):
            assert module.eps == 1e-6
    ours_params, ref_params = ours.state_dict(), reference.state_dict()
    for key, value in ours_params.items():  # same distribution per tensor: mean, spread, range
        ref = ref_params[key]
        assert abs(value.std().item() - ref.std().item()) <= 0.1 * ref.std().item() + 1e-7, key
        assert abs(value.mean().item() - ref.mean().item()) <= 0.05 * ref.std().item() + 1e-7, key
        assert value.abs().max() <= max(ref.abs().max() * 1.5, 1e-5), key


def test_projection_head_is_the_papers():
    head = ProjectionHead(384)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU,
                                       nn.Linear]
    assert (head.layer1.in_features, head.layer1.out_features, head.layer3.out_features) == (384, 4096, 256)
    assert head(torch.randn(5, 384)).shape == (5, 256)
    small = ProjectionHead(192, hidden_dim=64, out_dim=16)
    assert small(torch.randn(3, 192)).shape == (3, 16)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    assert isinstance(synced.bn1, nn.SyncBatchNorm) and isinstance(synced.bn2, nn.SyncBatchNorm)


# ---- checkpoint formats ----

def _features(model, images):
    with torch.no_grad():
        return model.eval()(images)


@pytest.fixture
def trained_tiny():
    torch.manual_seed(1)
    return tiny_vit()


def test_loads_our_training_checkpoint(tmp_path, trained_tiny):
    head = ProjectionHead(192, 32, 8)
    state = {**{f"visual.{k}": v for k, v in trained_tiny.state_dict().items()},
             **{f"image_mlp.{k}": v for k, v in head.state_dict().items()}}
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "args": {"model": "vit_tiny", "image_size": 32}, "step": 3}, path)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_features(load_encoder(str(path)), images), _features(trained_tiny, images))


def test_loads_official_stablerep_checkpoint(tmp_path, trained_tiny):
    """The official code saves a DDP model (`module.visual.*`, `module.image_mlp.*`) and its args as a Namespace."""
    state = {f"module.visual.{k}": v for k, v in trained_tiny.state_dict().items()}
    state["module.image_mlp.layer1.weight"] = torch.zeros(4, 192)
    path = tmp_path / "official.pth"
    torch.save({"model": state, "args": argparse.Namespace(model="base", lr=1e-3), "epoch": 15}, path)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_features(load_encoder(str(path), "vit_tiny"), images), _features(trained_tiny, images))


def test_loads_plain_timm_state_dict_and_drops_its_classifier(tmp_path):
    torch.manual_seed(2)
    reference = tiny_timm_vit().eval()
    path = tmp_path / "timm.pth"
    torch.save(reference.state_dict(), path)
    images = torch.randn(2, 3, 32, 32)
    loaded = load_encoder(str(path))  # the architecture is read off the shapes
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(images), pre_logits=True)
    torch.testing.assert_close(_features(loaded, images), expected)


def test_position_embedding_interpolation_matches_timm(tmp_path, trained_tiny):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {f"visual.{k}": v for k, v in trained_tiny.state_dict().items()},
                "args": {"model": "vit_tiny", "image_size": 32}}, path)
    loaded = load_encoder(str(path), image_size=64)
    assert loaded.pos_embed.shape == (1, 1 + 16, 192)
    expected = timm.layers.resample_abs_pos_embed(trained_tiny.pos_embed.detach(), new_size=[4, 4],
                                                  num_prefix_tokens=1)
    torch.testing.assert_close(loaded.pos_embed.detach(), expected)
    assert _features(loaded, torch.randn(2, 3, 64, 64)).shape == (2, 192)
    same = interpolate_pos_embed(trained_tiny.pos_embed, 2)
    assert same is trained_tiny.pos_embed


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder(str(tmp_path / "nope.pth"))


def test_file_that_is_not_a_checkpoint_is_named(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_encoder(str(path))
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="no state dict"):
        load_encoder(str(tmp_path / "empty.pth"))


def test_checkpoint_of_another_architecture_is_named(tmp_path, trained_tiny):
    path = tmp_path / "tiny.pth"
    torch.save(trained_tiny.state_dict(), path)
    with pytest.raises(ValueError, match="width 192.*not vit_base"):
        load_encoder(str(path), "vit_base")


def test_mismatched_keys_are_listed_in_one_line(tmp_path, trained_tiny):
    state = trained_tiny.state_dict()
    state.pop("norm.weight")
    state["blocks.0.attn.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(ValueError) as info:
        load_encoder(str(tmp_path / "odd.pth"), "vit_tiny")
    message = str(info.value)
    assert "\n" not in message and "norm.weight" in message and "blocks.0.attn.extra" in message


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'vit_huge'"):
        build_vit("vit_huge")
    assert set(model_lib.VIT_SIZES) == {"vit_tiny", "vit_small", "vit_base", "vit_large"}
