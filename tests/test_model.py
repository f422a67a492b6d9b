"""model.py: shapes, sizes, timm compatibility (names, numerics), checkpoint formats, bad checkpoints."""
import argparse

import pytest
import torch
import torch.nn as nn

import model as model_lib
from model import ProjectionHead, build_vit, interpolate_pos_embed, vit_small, vit_tiny
from util import checkpoints
from util.checkpoints import load_encoder

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


def test_initialisation_and_epsilons_are_timms_but_the_class_tokens_is_timm_0_5_4s():
    """Current timm draws the class token at std 1e-6; the official encoder (timm 0.5.4) at 0.02, as ours."""
    torch.manual_seed(0)
    ours = vit_small(image_size=64, depth=2)
    reference = timm.models.vision_transformer.VisionTransformer(img_size=64, embed_dim=384, depth=2, num_heads=6)
    for module in ours.modules():
        if isinstance(module, nn.LayerNorm):
            assert module.eps == 1e-6
    ours_params, ref_params = ours.state_dict(), reference.state_dict()
    assert ref_params["cls_token"].std() < 1e-5 and abs(ours_params["cls_token"].std() - 0.02) < 0.005
    for key, value in ours_params.items():  # same distribution per tensor: mean, spread, range
        if key == "cls_token":
            continue
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


def test_a_pickle_of_objects_never_advises_unsafe_loading(tmp_path, recwarn):
    """torch's own message says to retry with weights_only=False (which runs the file's code): ours never does."""
    import pickle
    path = tmp_path / "objects.pth"
    path.write_bytes(pickle.dumps({"model": pickle.Pickler}, protocol=4))  # a class: code, not weights
    with pytest.raises(ValueError, match="other than tensors and plain data") as error:
        load_encoder(str(path))
    assert "weights_only" not in str(error.value) and "False" not in str(error.value)
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]  # torch's remark is not shown


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


# ---- the head's BatchNorm per view, the text tower, official StableRep+ checkpoints ----

def test_head_runs_once_per_view_so_batchnorm_never_sees_two_positives():
    torch.manual_seed(0)
    head = ProjectionHead(16, 32, 8).train()
    captions, views = 5, 3
    features = torch.randn(captions * views, 16)  # caption-major: caption 0's 3 views, then caption 1's, ...
    batch_sizes = []
    head.bn1.register_forward_hook(lambda module, inputs, output: batch_sizes.append(inputs[0].shape[0]))
    out = head.forward_per_view(features, views)
    assert batch_sizes == [captions] * views  # one image of every caption per BatchNorm batch
    by_view = features.view(captions, views, 16)
    for view in range(views):  # each view's rows, in the input's order, are the head of that view alone
        torch.testing.assert_close(out.view(captions, views, 8)[:, view], head(by_view[:, view]))
    assert not torch.allclose(out, head(features), atol=1e-4)  # a joint BatchNorm batch gives other outputs


def test_model_chooses_per_view_or_joint_batchnorm():
    torch.manual_seed(0)
    images = torch.randn(6, 3, 32, 32)
    per_view = model_lib.StableRepModel(tiny_vit(), ProjectionHead(192, 32, 8)).train()
    joint = model_lib.StableRepModel(tiny_vit(), ProjectionHead(192, 32, 8), head_batchnorm="joint").train()
    joint.load_state_dict(per_view.state_dict())
    features = per_view.visual(images)
    torch.testing.assert_close(per_view(images, views=2)["image"],
                               nn.functional.normalize(per_view.image_mlp.forward_per_view(features, 2), dim=1))
    torch.testing.assert_close(joint(images, views=2)["image"],
                               nn.functional.normalize(joint.image_mlp(features), dim=1))


def test_text_tower_is_clips():
    """QuickGELU, LayerNorm eps 1e-5, CLIP's scaled initialisation (stds measured on the official model at width
    512, 12 layers: attention in 0.044, attention out and MLP c_proj 0.009, MLP c_fc 0.031, projection 0.044)."""
    torch.manual_seed(0)
    text = model_lib.TextTransformer(1000, 999, context_length=77, width=512, depth=12, num_heads=8)
    block = text.blocks[5]
    assert isinstance(block.mlp.act, model_lib.QuickGELU) and block.norm1.eps == 1e-5 and text.norm.eps == 1e-5
    x = torch.linspace(-3, 3, 13)
    torch.testing.assert_close(block.mlp.act(x), x * torch.sigmoid(1.702 * x))
    for parameter, std in ((block.attn.qkv.weight, 0.0442), (block.attn.proj.weight, 0.0090),
                           (block.mlp.fc1.weight, 0.0312), (block.mlp.fc2.weight, 0.0090),
                           (text.projection.weight, 0.0442), (text.token_embedding.weight, 0.02)):
        assert abs(parameter.std().item() - std) < 0.03 * std, (parameter.shape, parameter.std().item(), std)
    assert block.attn.qkv.bias.abs().sum() == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_small", "vit_base"])
def test_initialisation_is_the_official_models(name):
    """The official StableRep model's, by statistics: its encoder is timm 0.5.4's VisionTransformer
    (trunc_normal std 0.02 for pos_embed, cls_token and every Linear, zero biases; PyTorch's default Conv2d, i.e.
    U(+-1/sqrt(fan_in)): std 1/sqrt(3 fan_in); LayerNorm 1, 0), its image_mlp PyTorch's default Linear and
    BatchNorm (models/StableRep.py). The text tower's statistics are test_text_tower_is_clips's."""
    torch.manual_seed(0)
    visual = model_lib.build_vit(name)
    head = model_lib.ProjectionHead(visual.width, 4096, 256)

    def close(tensor, std, tolerance=0.03):
        assert abs(tensor.std().item() - std) < tolerance * std and abs(tensor.mean().item()) < 4 * std / \
            tensor.numel() ** 0.5, (tuple(tensor.shape), tensor.std().item(), std)

    close(visual.pos_embed, 0.02)
    close(visual.cls_token, 0.02, tolerance=0.15)  # width values only; current timm's 1e-6 is far outside
    fan_in = 3 * 16 * 16
    close(visual.patch_embed.proj.weight, (3 * fan_in) ** -0.5)
    close(visual.patch_embed.proj.bias, (3 * fan_in) ** -0.5, tolerance=0.15)
    for block in (visual.blocks[0], visual.blocks[-1]):
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            close(linear.weight, 0.02)
            assert linear.weight.abs().max() <= 2.0 and linear.bias.abs().sum() == 0
        for norm in (block.norm1, block.norm2):
            assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and norm.bias.abs().sum() == 0
    assert torch.equal(visual.norm.weight, torch.ones_like(visual.norm.weight))
    for linear, fan_in in ((head.layer1, visual.width), (head.layer2, 4096), (head.layer3, 4096)):
        close(linear.weight, (3 * fan_in) ** -0.5)
    for norm in (head.bn1, head.bn2):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and norm.bias.abs().sum() == 0


def test_logit_scale_parameter_is_clamped_to_clips_range():
    text = model_lib.TextTransformer(100, 99, context_length=8, width=32, depth=1, num_heads=2)
    model = model_lib.StableRepModel(tiny_vit(), None, text)
    assert model.logit_scale.item() == pytest.approx(2.6593, abs=1e-4)  # ln(1 / 0.07)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == torch.tensor(4.6052).item()  # the official cap (main_stablerep.py)
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 0.0


class OfficialTextBlock(nn.Module):
    """CLIP's residual block as the official StableRep+ code builds it (nn.MultiheadAttention, ln_1, c_fc,
    QuickGELU, c_proj, ln_2), to check our renaming of its checkpoints against its own forward pass."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", model_lib.QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x, mask):  # x (L, B, width)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


def official_text_features(state, tokens, layers, heads):
    """The official encode_text + text_projection, computed from an official-format state dict."""
    width = state["token_embedding.weight"].shape[1]
    length = tokens.shape[1]
    x = state["token_embedding.weight"][tokens] + state["positional_embedding"][:length]
    mask = torch.full((length, length), float("-inf")).triu(1)
    x = x.permute(1, 0, 2)
    for i in range(layers):
        block = OfficialTextBlock(width, heads)
        prefix = f"transformer.resblocks.{i}."
        block.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        x = block(x, mask)
    x = nn.functional.layer_norm(x.permute(1, 0, 2), (width,), state["ln_final.weight"], state["ln_final.bias"])
    return x[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ state["text_projection"]


def test_official_stablerep_plus_checkpoint_gives_the_same_text_features(tmp_path):
    torch.manual_seed(0)
    width, layers, heads, vocab, length = 32, 2, 4, 50, 10
    official = {"token_embedding.weight": torch.randn(vocab, width), "positional_embedding": torch.randn(length, width),
                "ln_final.weight": 1 + 0.1 * torch.randn(width), "ln_final.bias": 0.1 * torch.randn(width),
                "text_projection": torch.randn(width, 16), "image_projection": torch.randn(192, 16),
                "logit_scale": torch.tensor(3.0)}
    for i in range(layers):
        block = OfficialTextBlock(width, heads)
        for parameter in block.parameters():
            nn.init.normal_(parameter, std=0.2)
        official.update({f"transformer.resblocks.{i}.{k}": v for k, v in block.state_dict().items()})
    vit = tiny_vit()
    official.update({f"module.visual.{k}": v for k, v in vit.state_dict().items()})
    official = {k if k.startswith("module.") else f"module.{k}": v for k, v in official.items()}
    path = tmp_path / "official_plus.pth"
    torch.save({"model": official, "epoch": 3, "args": argparse.Namespace(model="base")}, path)

    ours = model_lib.StableRepModel(tiny_vit(), None, model_lib.TextTransformer(vocab, vocab - 1, length, width,
                                                                                  layers, heads, 16))
    state = checkpoints.model_state_dict(checkpoints.load_checkpoint_file(str(path)))
    ours.load_state_dict(state)  # strict: every key renamed onto one of ours
    tokens = torch.tensor([[3, 7, 8, vocab - 1, vocab - 1, vocab - 1], [5, vocab - 1, vocab - 1, vocab - 1, 2, 2]])
    reference = official_text_features({k[len("module."):]: v for k, v in official.items()}, tokens, layers, heads)
    with torch.no_grad():
        torch.testing.assert_close(ours.text(tokens), reference, rtol=1e-4, atol=1e-4)
        images = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(ours.image_projection(ours.visual(images)),
                                   vit(images) @ official["module.image_projection"])
