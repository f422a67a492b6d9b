"""The networks of StableRep, written by hand: the ViT encoder f, the projection head h, and checkpoint loading.

The encoder's parameter names, shapes, initialisation and epsilons are those of timm's VisionTransformer
(class-token pooling, no classifier), so `load_state_dict` takes a timm ViT state dict as it is and the same
weights give the same features. The official StableRep code wraps that timm model as `visual` and the head as
`image_mlp`; `StableRepModel` keeps both names, so an official checkpoint loads into it key for key.

    image [B, 3, H, W] --VisionTransformer--> f(x) [B, D] --ProjectionHead--> h(f(x)) [B, 256]
"""
import argparse
import copy
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.catalog import VIT_SIZES, vit_name
from util.cli import first_line
from util.distributed import all_gather_no_grad, world_size

# ------------------------------------------------------------------------------------------------------------
# ViT encoder
# ------------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches and project each to the width D (one strided convolution)."""

    def __init__(self, image_size, patch_size, width):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, images):  # [B, 3, H, W] -> [B, num_patches, D]
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and PyTorch's fused attention kernel."""

    def __init__(self, width, num_heads):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, attn_mask=None, num_queries=None):
        """x [B, N, D] -> [B, N, D]; with num_queries=q, only the first q tokens attend (output [B, q, D])."""
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        if num_queries is not None:
            q = q[:, :, :num_queries]  # (B, heads, q, head_dim)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, q or N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(batch, q.shape[2], width))


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): CLIP's approximation of GELU, which its text transformer was trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    def __init__(self, width, hidden, activation=nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = activation()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, width, num_heads, mlp_ratio=4.0, eps=1e-6, activation=nn.GELU):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, int(width * mlp_ratio), activation)

    def forward(self, x, attn_mask=None, class_token_only=False, keep=None):
        """x [B, N, D] -> [B, N, D], or [B, 1, D] (the first token alone) with class_token_only.

        keep [B, 2] (stochastic depth): per sample, the factors of the attention and MLP branches, 0 for a dropped
        branch and 1 / keep-probability for a kept one; None keeps both whole."""
        residual = x[:, :1] if class_token_only else x
        attention = self.attn(self.norm1(x), attn_mask=attn_mask, num_queries=1 if class_token_only else None)
        x = residual + (attention if keep is None else attention * keep[:, :1, None])
        mlp = self.mlp(self.norm2(x))
        return x + (mlp if keep is None else mlp * keep[:, 1:, None])


class VisionTransformer(nn.Module):
    """ViT with a class token; `forward(images) -> [B, D]` is the class token after the final LayerNorm.

    Images of another size than `image_size` (DINO's local crops) get the position embedding resized to their
    grid. `drop_path_rate` > 0 turns on stochastic depth (DINO's student), its per-sample draws given by the
    caller (`drop_path_noise`), so that they travel with the sample: the same whichever process trains it."""

    def __init__(self, image_size=224, patch_size=16, width=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 drop_path_rate=0.0):
        super().__init__()
        self.config = dict(image_size=image_size, patch_size=patch_size, width=width, depth=depth,
                           num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.width = width
        self.drop_path_rate = drop_path_rate  # a training setting, not architecture: not in config
        self.patch_embed = PatchEmbed(image_size, patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, width))
        self.blocks = nn.ModuleList([Block(width, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.init_weights()

    def init_weights(self):
        """The official encoder's initialisation, timm 0.5.4's VisionTransformer (`init_weights`, `_init_vit_weights`):
        truncated normal (std 0.02, cut at +-2) for the position embedding, the class token and every Linear (zero
        bias), PyTorch's defaults for the patch convolution, ones and zeros for the LayerNorms. (Current timm draws
        the class token at std 1e-6 instead.)"""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def embed(self, images):
        """Patch tokens with the class token in front, plus position: [B, 3, H, W] -> [B, 1 + num_patches, D].
        Another input size than the model's gets the position embedding resized bicubically to its grid (without
        antialiasing, as DINO does for its local crops)."""
        x = self.patch_embed(images)  # [B, (H / p) (W / p), D]
        pos_embed = self.pos_embed
        grid = images.shape[-1] // self.config["patch_size"]
        if grid != self.patch_embed.grid_size:
            pos_embed = interpolate_pos_embed(pos_embed, grid, antialias=False)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos_embed

    def block_keep(self, drop_path_noise):
        """Stochastic depth's branch factors per block from uniform noise [B, 2 x depth] (two draws per block, one
        per branch; the rate rises linearly from 0 at the first block to drop_path_rate at the last, as in DINO
        and timm): a list of depth [B, 2] tensors of 0 (dropped) or 1 / keep-probability; Nones when off."""
        depth = len(self.blocks)
        if drop_path_noise is None or self.drop_path_rate == 0 or not self.training:
            return [None] * depth
        rates = torch.linspace(0, self.drop_path_rate, depth).tolist()
        noise = drop_path_noise.to(self.cls_token.device).view(-1, depth, 2)  # [B, depth, 2]
        return [(noise[:, i] >= rate).to(self.cls_token.dtype) / (1 - rate) for i, rate in enumerate(rates)]

    def forward_tokens(self, images, keep=None):
        """The plain ViT, every block over every token: [B, 3, H, W] -> [B, 1 + num_patches, D] after the final
        norm. f(x) of the paper is `forward_tokens(x)[:, 0]`; `forward` computes the same numbers faster.

        keep [B, K] (MAE): the indices of the patches that enter the encoder, per image; the output is then
        [B, 1 + K, D], the class token and those patches in that order."""
        x = self.embed(images)
        if keep is not None:
            patches = torch.gather(x[:, 1:], 1, keep[..., None].expand(-1, -1, x.shape[-1]))  # [B, K, D]
            x = torch.cat([x[:, :1], patches], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images, drop_path_noise=None):
        """f(x): the class token after the final norm, [B, 3, H, W] -> [B, D].

        Equal to `forward_tokens(images)[:, 0]` (tests/test_model.py checks it), with one speed trick: the last
        block runs for the class token alone, since no other token's output is used after it. Its attention still
        reads every token's keys and values, but the attention output, projection and MLP skip the patch tokens:
        about 6% of a ViT-B/16's FLOPs. drop_path_noise [B, 2 x depth] uniform draws: see block_keep."""
        keep = self.block_keep(drop_path_noise)
        x = self.embed(images)
        for block, block_keep in zip(self.blocks[:-1], keep[:-1]):
            x = block(x, keep=block_keep)
        x = self.blocks[-1](x, class_token_only=True, keep=keep[-1])  # [B, 1, D]
        return self.norm(x[:, 0])


def default_depth(name):
    """Blocks of a VIT_SIZES model: ViT-L/16 has 24, the other three 12."""
    return 24 if name == "vit_large" else 12


def build_vit(name, image_size=224, patch_size=16, depth=None, drop_path_rate=0.0):
    """One of VIT_SIZES, with overrides of image size, patch size and depth (tests build 32-pixel, 2-block ViTs).

    ViT-L/16 has 24 blocks; the other three have 12."""
    if name not in VIT_SIZES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(VIT_SIZES)}")
    width, heads = VIT_SIZES[name]
    depth = default_depth(name) if depth is None else depth
    return VisionTransformer(image_size=image_size, patch_size=patch_size, width=width, depth=depth,
                             num_heads=heads, drop_path_rate=drop_path_rate)


def vit_tiny(**overrides):
    return build_vit("vit_tiny", **overrides)


def vit_small(**overrides):
    return build_vit("vit_small", **overrides)


def vit_base(**overrides):
    return build_vit("vit_base", **overrides)


def vit_large(**overrides):
    return build_vit("vit_large", **overrides)


# ------------------------------------------------------------------------------------------------------------
# projection head h
# ------------------------------------------------------------------------------------------------------------


class ProjectionHead(nn.Sequential):
    """The paper's 3-layer MLP head: Linear(D, 4096)-BN-ReLU-Linear(4096, 4096)-BN-ReLU-Linear(4096, 256).

    The module names (layer1, bn1, ..., layer3) are those of the official code's `image_mlp`. Under DDP, convert
    the BatchNorms with `nn.SyncBatchNorm.convert_sync_batchnorm` so batch statistics span all ranks."""

    def __init__(self, in_dim, hidden_dim=4096, out_dim=256):
        super().__init__()
        self.add_module("layer1", nn.Linear(in_dim, hidden_dim))
        self.add_module("bn1", nn.BatchNorm1d(hidden_dim))
        self.add_module("relu1", nn.ReLU(inplace=True))
        self.add_module("layer2", nn.Linear(hidden_dim, hidden_dim))
        self.add_module("bn2", nn.BatchNorm1d(hidden_dim))
        self.add_module("relu2", nn.ReLU(inplace=True))
        self.add_module("layer3", nn.Linear(hidden_dim, out_dim))

    def forward_per_view(self, features, views):
        """The head run once per view, as the official model does: [B * V, D] -> [B * V, out_dim].

        `features` are caption-major (caption 0's V views, then caption 1's, ...); view v of every caption goes
        through the head together, so each BatchNorm batch holds one image of each caption and never two
        positives of one caption. The output keeps the input's order."""
        per_caption = features.unflatten(0, (-1, views))  # (B, V, D)
        out = [self(per_caption[:, view]) for view in range(views)]  # V x (B, E)
        return torch.stack(out, dim=1).flatten(0, 1)  # (B * V, E), caption-major again


# ------------------------------------------------------------------------------------------------------------
# the self-supervised families of the paper's first question (Sec. 2): MoCo v3, BYOL, DINO, MAE
# ------------------------------------------------------------------------------------------------------------


def sincos_position_embedding(width, grid_size):
    """The fixed 2-D sin-cos position embedding of MoCo v3's and MAE's ViTs, [1, 1 + g * g, width] float32.

    The class token's row is zero. Patch (row r, column c), numbered row-major as PatchEmbed flattens them, gets
    [sin(c w), cos(c w), sin(r w), cos(r w)] with the width / 4 frequencies w_k = 10000^(-k / (width / 4)) (MAE's
    util/pos_embed.py; MoCo v3's vits.py puts the row's half first, the same embedding up to an order of
    channels)."""
    if width % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, not {width}")
    quarter = width // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [width / 4]
    rows, columns = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64),
                                   torch.arange(grid_size, dtype=torch.float64), indexing="ij")

    def encode(position):  # [g, g] -> [g * g, width / 2]
        angles = position.flatten()[:, None] * frequencies[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    patches = torch.cat([encode(columns), encode(rows)], dim=1)  # [g * g, width]
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), patches]).float()[None]


def fix_position_embedding(visual):
    """MoCo v3's and MAE's ViTs: the position embedding is the sin-cos one, and never trained."""
    visual.pos_embed.data.copy_(sincos_position_embedding(visual.width, visual.patch_embed.grid_size))
    visual.pos_embed.requires_grad_(False)


def xavier_init(module, split_qkv=False):
    """Xavier-uniform weights and zero biases for every Linear in `module` (MoCo v3's and MAE's ViTs, following the
    JAX ViT); with split_qkv (MoCo v3) the fused q, k, v projection is initialised as three width x width
    matrices."""
    for name, layer in module.named_modules():
        if not isinstance(layer, nn.Linear):
            continue
        if split_qkv and name.endswith("attn.qkv"):
            bound = math.sqrt(6 / (layer.weight.shape[0] // 3 + layer.weight.shape[1]))
            nn.init.uniform_(layer.weight, -bound, bound)
        else:
            nn.init.xavier_uniform_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def init_like_mocov3(visual, frozen_patch_embed=True):
    """MoCo v3's ViT (vits.py VisionTransformerMoCo): fixed sin-cos position embedding, xavier-uniform Linears with
    q, k, v split, the patch projection xavier-uniform as a [width, 3 p p] matrix with zero bias, class token
    N(0, 1e-6). frozen_patch_embed: the patch projection stays random and untrained (--stop-grad-conv1, which the
    MoCo v3 paper found to stabilise ViT training)."""
    fix_position_embedding(visual)
    xavier_init(visual.blocks, split_qkv=True)
    weight = visual.patch_embed.proj.weight
    bound = math.sqrt(6 / (weight[0].numel() + weight.shape[0]))
    nn.init.uniform_(weight, -bound, bound)
    nn.init.zeros_(visual.patch_embed.proj.bias)
    nn.init.normal_(visual.cls_token, std=1e-6)
    visual.patch_embed.requires_grad_(not frozen_patch_embed)
    return visual


def init_like_mae(visual):
    """MAE's encoder (models_mae.py initialize_weights): fixed sin-cos position embedding, xavier-uniform Linears,
    the patch projection xavier-uniform as a [width, 3 p p] matrix (its bias keeps the convolution's default),
    class token N(0, 0.02)."""
    fix_position_embedding(visual)
    xavier_init(visual.blocks)
    nn.init.xavier_uniform_(visual.patch_embed.proj.weight.view(visual.width, -1))
    nn.init.normal_(visual.cls_token, std=0.02)
    return visual


def frozen_copy(module):
    """A copy of `module` that no gradient trains: the start of a momentum encoder or a teacher, which then follows
    its online network by `ema_update_`."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target, online, momentum):
    """target <- momentum x target + (1 - momentum) x online, parameter by parameter (buffers, such as BatchNorm
    statistics, are each network's own, as in the official codes)."""
    for target_parameter, online_parameter in zip(target.parameters(), online.parameters()):
        target_parameter.mul_(momentum).add_(online_parameter.detach(), alpha=1 - momentum)


def per_view(network, features, views, per_view_batchnorm=True):
    """`network` on caption-major inputs [N x V, ...] (image 0's V views, then image 1's ...) -> [N, V, ...].

    per_view_batchnorm: view v of every image goes through `network` together, so that a BatchNorm batch holds
    one view of each image (MoCo v3's and BYOL's official codes call their networks once per view); else one
    pass over all of them."""
    if not per_view_batchnorm or views == 1:
        return network(features).unflatten(0, (-1, views))
    grouped = features.unflatten(0, (-1, views))  # (N, V, ...)
    return torch.stack([network(grouped[:, view]) for view in range(views)], dim=1)


def mocov3_mlp(layers, in_dim, hidden_dim, out_dim):
    """MoCo v3's projector (3 layers) and predictor (2 layers) for ViTs (moco/builder.py _build_mlp): bias-free
    Linears, BatchNorm and ReLU after every one but the last, and after the last a BatchNorm without affine
    parameters (SimCLR's design)."""
    modules = []
    for layer in range(layers):
        last = layer == layers - 1
        modules.append(nn.Linear(in_dim if layer == 0 else hidden_dim, out_dim if last else hidden_dim, bias=False))
        if last:
            modules.append(nn.BatchNorm1d(out_dim, affine=False))
        else:
            modules += [nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
    return nn.Sequential(*modules)


def byol_mlp(in_dim, hidden_dim, out_dim):
    """BYOL's projector and predictor (BYOL paper Sec. 3.3): Linear-BatchNorm-ReLU-Linear, with biases."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class MomentumModel(nn.Module):
    """MoCo v3 and BYOL: an online network (the encoder `visual`, a `projector`, a `predictor`) and a momentum
    network (`momentum.visual`, `momentum.projector`) that starts as its copy and then follows it as an exponential
    moving average (`update_momentum`), never by gradient.

        image [V views] --visual--projector--predictor--> online [N, V, E]
                        --momentum.visual--momentum.projector--> target [N, V, E]  (no gradient)

    The online encoder `visual` is the one both papers evaluate (MoCo v3's base encoder, BYOL's online
    encoder)."""

    def __init__(self, visual, projector, predictor, per_view_batchnorm=True):
        super().__init__()
        self.visual, self.projector, self.predictor = visual, projector, predictor
        self.momentum = nn.ModuleDict({"visual": frozen_copy(visual), "projector": frozen_copy(projector)})
        self.per_view_batchnorm = per_view_batchnorm

    def forward(self, images, views=2):
        """images [N x V, 3, S, S], caption-major -> {"online": [N, V, E], "target": [N, V, E]}."""
        online = per_view(lambda x: self.predictor(self.projector(self.visual(x))), images, views,
                          self.per_view_batchnorm)
        with torch.no_grad():
            target = per_view(lambda x: self.momentum["projector"](self.momentum["visual"](x)), images, views,
                              self.per_view_batchnorm)
        return {"online": online, "target": target}

    def update_momentum(self, momentum):
        ema_update_(self.momentum["visual"], self.visual, momentum)
        ema_update_(self.momentum["projector"], self.projector, momentum)


class WeightNormLinear(nn.Module):
    """A bias-free Linear with weight-normalised rows, W_k = g_k v_k / ||v_k|| (torch's weight_norm along dim 0,
    the official DINO head's last layer, under its parameter names weight_g [out, 1] and weight_v [out, in]).
    v starts as nn.Linear's default weights and g at 1; learn_norm=False (DINO's norm_last_layer) keeps g = 1, so
    every output is a cosine similarity with a unit prototype."""

    def __init__(self, in_dim, out_dim, learn_norm=False):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=learn_norm)

    def forward(self, x):
        return F.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True))


class DINOHead(nn.Module):
    """DINO's projection head (vision_transformer.py DINOHead, use_bn=False): a 3-layer MLP with GELU, width ->
    hidden -> hidden -> bottleneck (truncated-normal 0.02 weights, zero biases), L2 normalisation, then the
    weight-normalised `last_layer` to out_dim prototypes. [B, width] -> [B, out_dim]."""

    def __init__(self, in_dim, out_dim=65536, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, learn_norm=not norm_last_layer)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class DINOModel(nn.Module):
    """DINO: a student (`visual` with stochastic depth, `head`) and a teacher (`teacher.visual`, `teacher.head`),
    its copy followed by exponential moving average (`update_teacher`); and the `center` of the teacher's outputs
    (a buffer, so it is in every checkpoint), which each training forward pass moves towards the global batch's
    mean teacher output with momentum center_momentum (0.9, main_dino.py DINOLoss.update_center), after handing
    out the center the loss uses.

        global crops [N x 2] --visual, head--> student [N, 2 + L, K] <--visual, head-- local crops [N x L]
        global crops [N x 2] --teacher--> teacher [N, 2, K]  (no gradient)

    The teacher's encoder is the one DINO evaluates (eval_linear.py's checkpoint_key "teacher"): encoder.pth holds
    it, and model.encoder_state_dict prefers it in a full checkpoint. `teacher_temperature` is the sharpening the
    loss applies to the teacher this step (a schedule: pretrain.py sets it before each step)."""

    def __init__(self, visual, head, center_momentum=0.9, teacher_temperature=0.04):
        super().__init__()
        self.visual, self.head = visual, head
        teacher_visual = frozen_copy(visual)
        teacher_visual.drop_path_rate = 0.0  # main_dino.py builds the teacher without stochastic depth
        self.teacher = nn.ModuleDict({"visual": teacher_visual, "head": frozen_copy(head)})
        self.register_buffer("center", torch.zeros(1, head.last_layer.weight_v.shape[0]))
        self.center_momentum, self.teacher_temperature = center_momentum, teacher_temperature

    def forward(self, images, views=2, local_images=None, noise=None, local_noise=None):
        """images [N x 2, 3, S, S] (two global crops per image, caption-major), local_images [N x L, 3, s, s] or
        None, noise / local_noise: each crop's stochastic-depth draws [crops, 2 x depth] or None ->
        {"student": [N, 2 + L, K], "teacher": [N, 2, K], "center": [1, K], "teacher_temperature": float}."""
        count = len(images) // views
        features = [self.visual(images, drop_path_noise=noise)]  # [N x 2, D]
        if local_images is not None:
            features.append(self.visual(local_images, drop_path_noise=local_noise))  # [N x L, D]
        outputs = self.head(torch.cat(features))  # one head pass over every crop, as DINO's MultiCropWrapper
        student = outputs[:len(images)].unflatten(0, (count, views))  # (N, 2, K)
        if local_images is not None:
            student = torch.cat([student, outputs[len(images):].unflatten(0, (count, -1))], dim=1)  # (N, 2 + L, K)
        with torch.no_grad():
            teacher = self.teacher["head"](self.teacher["visual"](images)).unflatten(0, (count, views))
        center = self.center.clone()
        if self.training:
            self.update_center(teacher)
        return {"student": student, "teacher": teacher, "center": center,
                "teacher_temperature": self.teacher_temperature}

    @torch.no_grad()
    def update_center(self, teacher):
        """center <- m center + (1 - m) x mean teacher output over the global batch (every rank's, both crops)."""
        total = all_gather_no_grad(teacher.float().sum((0, 1))[None]).sum(0, keepdim=True)  # [1, K]
        mean = total / (teacher.shape[0] * teacher.shape[1] * world_size())
        self.center.mul_(self.center_momentum).add_(mean, alpha=1 - self.center_momentum)

    def update_teacher(self, momentum):
        ema_update_(self.teacher["visual"], self.visual, momentum)
        ema_update_(self.teacher["head"], self.head, momentum)


class MAEDecoder(nn.Module):
    """MAE's lightweight decoder (models_mae.py): the encoder's tokens projected to decoder_width, a shared learned
    mask token in every masked patch's place, a fixed sin-cos position embedding, `depth` transformer blocks, a
    LayerNorm and a linear prediction of each patch's p x p x 3 pixels."""

    def __init__(self, width, grid_size, patch_size, decoder_width=512, depth=8, num_heads=16):
        super().__init__()
        self.embed = nn.Linear(width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.pos_embed = nn.Parameter(sincos_position_embedding(decoder_width, grid_size), requires_grad=False)
        self.blocks = nn.ModuleList([Block(decoder_width, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(decoder_width, eps=1e-6)
        self.pred = nn.Linear(decoder_width, patch_size ** 2 * 3)
        xavier_init(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent, restore):
        """latent [B, 1 + K, D] (class token and the K visible patches), restore [B, L] (where each of the L patches
        sits in the shuffled order: visible ones first) -> predicted pixels [B, L, p p 3]."""
        x = self.embed(latent)  # [B, 1 + K, d]
        masked = self.mask_token.expand(x.shape[0], restore.shape[1] + 1 - x.shape[1], -1)  # [B, L - K, d]
        patches = torch.cat([x[:, 1:], masked], dim=1)  # [B, L, d], shuffled order
        patches = torch.gather(patches, 1, restore[..., None].expand(-1, -1, x.shape[-1]))  # image order
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed  # [B, 1 + L, d]
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]  # [B, L, p p 3], the class token dropped


class MAEModel(nn.Module):
    """MAE: the encoder `visual` sees a random mask_ratio of each image's patches removed (per-image shuffle of
    uniform noise, the lowest kept), the `decoder` predicts every patch's pixels, and the loss (loss.mae_loss)
    scores the removed ones. The encoder is the one MAE probes (its class token, BatchNorm before the linear
    head: linear_probe.py --protocol sgd)."""

    def __init__(self, visual, decoder, mask_ratio=0.75):
        super().__init__()
        self.visual, self.decoder, self.mask_ratio = visual, decoder, mask_ratio
        self.patch_size = visual.config["patch_size"]

    def patchify(self, images):
        """[B, 3, H, W] -> [B, L, p p 3], patches row-major, each as (row, column, channel) within the patch."""
        p = self.patch_size
        x = images.unflatten(2, (-1, p)).unflatten(4, (-1, p))  # (B, 3, H/p, p, W/p, p)
        return x.permute(0, 2, 4, 3, 5, 1).flatten(1, 2).flatten(2)  # (B, L, p p 3)

    def forward(self, images, views=1, noise=None):
        """images [B, 3, S, S], noise [B, L] uniform draws deciding the mask (None: drawn here) ->
        {"pred": [B, L, p p 3], "patches": [B, L, p p 3] the target pixels, "mask": [B, L] 1 = removed}."""
        patches = self.patchify(images)
        count, length = patches.shape[:2]
        noise = torch.rand(count, length) if noise is None else noise
        shuffle = torch.argsort(noise.to(images.device), dim=1)  # ascending: the lowest noise is kept
        restore = torch.argsort(shuffle, dim=1)
        kept = int(length * (1 - self.mask_ratio))
        mask = torch.ones(count, length, device=images.device)
        mask[:, :kept] = 0
        mask = torch.gather(mask, 1, restore)  # [B, L] in image order
        latent = self.visual.forward_tokens(images, keep=shuffle[:, :kept])  # [B, 1 + kept, D]
        return {"pred": self.decoder(latent, restore), "patches": patches, "mask": mask}


# ------------------------------------------------------------------------------------------------------------
# text tower (CLIP and StableRep+ baselines)
# ------------------------------------------------------------------------------------------------------------


class TextTransformer(nn.Module):
    """CLIP's text encoder, as the official StableRep+ code builds it: token and position embeddings, pre-norm
    blocks (QuickGELU, LayerNorm eps 1e-5) under a causal mask, a final LayerNorm, and the state of the first
    end-of-text token projected to the joint embedding (no bias).

    tokens [B, L] (L <= context_length) -> [B, embed_dim]."""

    def __init__(self, vocab_size, eos_token_id, context_length=77, width=512, depth=12, num_heads=8,
                 embed_dim=512):
        super().__init__()
        self.eos_token_id = eos_token_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        self.blocks = nn.ModuleList([Block(width, num_heads, eps=1e-5, activation=QuickGELU) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-5)
        self.projection = nn.Linear(width, embed_dim, bias=False)
        causal = torch.ones(context_length, context_length, dtype=torch.bool).tril()  # True: may attend
        self.register_buffer("causal_mask", causal, persistent=False)
        self.init_weights(width, depth)

    def init_weights(self, width, depth):
        """CLIP's initialisation: embeddings N(0, 0.02) and N(0, 0.01); attention inputs width^-1/2; the two
        projections back into the residual stream (attention output, MLP fc2) width^-1/2 (2 depth)^-1/2, so the
        stream's variance does not grow with depth; MLP fc1 (2 width)^-1/2; the output projection width^-1/2.
        Attention biases start at zero, MLP biases at PyTorch's default (as nn.MultiheadAttention and nn.Linear
        leave them in CLIP)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        residual_std = width ** -0.5 * (2 * depth) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=width ** -0.5)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.zeros_(block.attn.proj.bias)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=residual_std)
        nn.init.normal_(self.projection.weight, std=width ** -0.5)

    def forward(self, tokens):
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]  # [B, L, width]
        for block in self.blocks:
            x = block(x, attn_mask=self.causal_mask[:length, :length])
        x = self.norm(x)
        end = (tokens == self.eos_token_id).int().argmax(dim=1)  # first end-of-text token (the last if none)
        end = torch.where((tokens == self.eos_token_id).any(dim=1), end, length - 1)
        return self.projection(x[torch.arange(len(tokens), device=tokens.device), end])


MAX_LOGIT_SCALE = 4.6052  # the official cap (main_stablerep.py): ln 100 = 4.60517 rounded up, exp <= 100.0001


class StableRepModel(nn.Module):
    """The encoder f with the heads an objective needs, under the official code's names:

    - `image_mlp` (ProjectionHead): the 256-d embedding of the multi-positive loss (StableRep, SimCLR, StableRep+)
    - `image_projection`, `text` (TextTransformer), `logit_scale`: the image-text loss (CLIP, StableRep+), with
      CLIP's learnable logit scale initialised at ln(1/0.07) and kept in [0, 4.6052] by `clamp_logit_scale`.

    forward(images, tokens=None, views=1) returns the L2-normalised embeddings the losses take; `views` is the
    number of images x crops of each caption in the batch (caption-major), and with head_batchnorm="per-view"
    the head's BatchNorm sees one view of every caption at a time (the official model); "joint" runs the head
    once over all of them."""

    def __init__(self, visual, image_mlp=None, text=None, head_batchnorm="per-view"):
        super().__init__()
        self.visual = visual
        self.image_mlp = image_mlp
        self.text = text
        self.head_batchnorm = head_batchnorm
        if text is not None:
            self.image_projection = nn.Linear(visual.width, text.projection.out_features, bias=False)
            nn.init.normal_(self.image_projection.weight, std=visual.width ** -0.5)  # CLIP's
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, images, tokens=None, views=1):
        features = self.visual(images)  # [N, D]
        out = {}
        if self.image_mlp is not None:
            if self.head_batchnorm == "per-view" and views > 1:
                projected = self.image_mlp.forward_per_view(features, views)
            else:
                projected = self.image_mlp(features)
            out["image"] = F.normalize(projected, dim=1)  # z_i of Eq. 2
        if self.text is not None:
            out["image_text"] = F.normalize(self.image_projection(features), dim=1)
            out["text"] = F.normalize(self.text(tokens), dim=1)
            out["logit_scale"] = self.logit_scale.exp()
        return out

    @torch.no_grad()
    def clamp_logit_scale(self):
        """Keep the logit scale parameter in [0, 4.6052] (after every optimiser step, as CLIP and the official code
        do): clamping only in the forward pass would leave a parameter above the cap with zero gradient."""
        if self.text is not None:
            self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


# ------------------------------------------------------------------------------------------------------------
# linear probe heads (linear_probe.py --protocol sgd)
# ------------------------------------------------------------------------------------------------------------


class LinearHeads(nn.Module):
    """One optional BatchNorm (no affine, so it is shared: it has nothing to learn) and one linear head per lr.

    features [B, D] -> logits [heads, B, classes]. Heads start at N(0, 0.01) weights and zero bias."""

    def __init__(self, width, num_classes, num_heads, batchnorm):
        super().__init__()
        self.norm = nn.BatchNorm1d(width, affine=False, eps=1e-6) if batchnorm else nn.Identity()
        self.heads = nn.ModuleList(nn.Linear(width, num_classes) for _ in range(num_heads))
        for head in self.heads:
            nn.init.trunc_normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, features):
        features = self.norm(features)
        return torch.stack([head(features) for head in self.heads])  # (heads, B, classes)


# ------------------------------------------------------------------------------------------------------------
# semantic segmentation (segment.py): UperNet on a ViT's multi-level features, as BEiT and MAE fine-tune it
# ------------------------------------------------------------------------------------------------------------


def drop_path(x, rate, training):
    """Stochastic depth: each sample's residual branch is dropped with probability `rate`, kept ones scaled by
    1 / (1 - rate); the identity outside training."""
    if not training or rate == 0:
        return x
    keep = torch.rand(x.shape[0], *(1,) * (x.ndim - 1), device=x.device, dtype=x.dtype) >= rate
    return x * keep / (1 - rate)


def conv_bn_relu(in_channels, out_channels, kernel_size):
    """mmsegmentation's ConvModule: convolution (no bias), BatchNorm, ReLU; Kaiming init (fan out)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def segmentation_classifier(in_channels, num_classes):
    """Dropout2d(0.1) then a 1x1 convolution to the classes, N(0, 0.01) weights (mmsegmentation's cls_seg)."""
    conv = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.Dropout2d(0.1), conv)


def upsample(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class RelativePositionBias(nn.Module):
    """BEiT's relative position bias of one block: a learned table with one entry per head for every 2-d offset
    between two patches ((2g - 1)^2 of them) and three for the class token (to a patch, from a patch, to itself).
    forward() -> the additive attention bias [heads, 1 + g^2, 1 + g^2]. Zero at the start (the MAE paper's
    transfer setting)."""

    def __init__(self, grid, heads):
        super().__init__()
        offsets = (2 * grid - 1) ** 2
        self.table = nn.Parameter(torch.zeros(offsets + 3, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
        delta = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + grid - 1  # (g^2, g^2, 2), >= 0
        index = torch.empty(1 + grid * grid, 1 + grid * grid, dtype=torch.long)
        index[1:, 1:] = delta[..., 0] * (2 * grid - 1) + delta[..., 1]
        index[0, 1:], index[1:, 0], index[0, 0] = offsets, offsets + 1, offsets + 2
        self.register_buffer("index", index, persistent=False)

    def forward(self):
        return self.table[self.index].permute(2, 0, 1)  # (heads, 1 + g^2, 1 + g^2)


class ViTBackbone(nn.Module):
    """The encoder's blocks with stochastic depth (rising linearly to `drop_path` over the blocks, timm's rule) and,
    optionally, a relative position bias per block; returns the patch tokens of the tapped blocks laid on the patch
    grid, [B, D, g, g] each. The encoder's final LayerNorm is not used: BEiT's backbone taps the blocks' outputs as
    they are (and a module without gradient would stop DDP)."""

    def __init__(self, encoder, taps, drop_path=0.0, rel_pos_bias=False):
        super().__init__()
        self.encoder = encoder
        encoder.norm = nn.Identity()
        self.taps = list(taps)
        depth = len(encoder.blocks)
        self.drop_rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]
        grid, heads = encoder.patch_embed.grid_size, encoder.blocks[0].attn.num_heads
        self.rel_pos = (nn.ModuleList(RelativePositionBias(grid, heads) for _ in range(depth)) if rel_pos_bias
                        else None)

    def forward(self, images):
        x = self.encoder.embed(images)  # [B, 1 + g^2, D]
        batch, grid = len(x), self.encoder.patch_embed.grid_size
        maps = []
        for i, block in enumerate(self.encoder.blocks):
            bias = self.rel_pos[i]() if self.rel_pos is not None else None
            x = x + drop_path(block.attn(block.norm1(x), attn_mask=bias), self.drop_rates[i], self.training)
            x = x + drop_path(block.mlp(block.norm2(x)), self.drop_rates[i], self.training)
            maps.extend(x[:, 1:].transpose(1, 2).reshape(batch, -1, grid, grid) for tap in self.taps if tap == i)
        return maps  # 4 x [B, D, g, g], in the order of taps


class Pyramid(nn.Module):
    """BEiT's multi-level neck: the four tapped maps (1/16 of the input) to 1/4, 1/8, 1/16 and 1/32:
    ConvTranspose 2x - BatchNorm - GELU - ConvTranspose 2x; ConvTranspose 2x; identity; MaxPool 2x."""

    def __init__(self, width):
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(width, width, 2, stride=2), nn.BatchNorm2d(width), nn.GELU(),
                                 nn.ConvTranspose2d(width, width, 2, stride=2))
        self.up2 = nn.ConvTranspose2d(width, width, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, stride=2)

    def forward(self, maps):
        return [self.up4(maps[0]), self.up2(maps[1]), maps[2], self.down2(maps[3])]


class PyramidPooling(nn.Module):
    """PSPNet's module: the map average-pooled to 1x1, 2x2, 3x3 and 6x6, each projected (1x1 conv-BN-ReLU) and
    upsampled back, concatenated with the map and fused by a 3x3 conv-BN-ReLU."""

    def __init__(self, in_channels, channels, scales=(1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels, channels, 1))
                                    for s in scales)
        self.bottleneck = conv_bn_relu(in_channels + len(scales) * channels, channels, 3)

    def forward(self, x):
        pooled = [upsample(stage(x), x.shape[2:]) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UperNetHead(nn.Module):
    """UperNet (Xiao et al. 2018) over four levels, finest first: 1x1 laterals on the three finer levels and
    pyramid pooling on the coarsest; a top-down path adding each coarser level, upsampled, into the next finer one;
    a 3x3 conv on each of the three; all four upsampled to the finest, concatenated, fused (3x3 conv-BN-ReLU) and
    classified: [B, classes, H/4, W/4] for BEiT's pyramid."""

    def __init__(self, in_channels, channels, num_classes):
        super().__init__()
        self.laterals = nn.ModuleList(conv_bn_relu(in_channels, channels, 1) for _ in range(3))
        self.ppm = PyramidPooling(in_channels, channels)
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(3))
        self.fuse = conv_bn_relu(4 * channels, channels, 3)
        self.classify = segmentation_classifier(channels, num_classes)

    def forward(self, levels):
        lateral = [conv(level) for conv, level in zip(self.laterals, levels)] + [self.ppm(levels[3])]
        for i in range(3, 0, -1):  # top-down: coarse to fine
            lateral[i - 1] = lateral[i - 1] + upsample(lateral[i], lateral[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lateral[:3])] + [lateral[3]]
        size = outs[0].shape[2:]
        return self.classify(self.fuse(torch.cat([outs[0]] + [upsample(x, size) for x in outs[1:]], dim=1)))


class FCNHead(nn.Module):
    """The auxiliary head: 3x3 conv-BN-ReLU to 256 channels, then classified."""

    def __init__(self, in_channels, num_classes, channels=256):
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 3)
        self.classify = segmentation_classifier(channels, num_classes)

    def forward(self, x):
        return self.classify(self.conv(x))


class Segmenter(nn.Module):
    """ViT backbone -> Pyramid -> UperNetHead, and the auxiliary FCNHead on the 1/16 level (training only).

    forward(images [B, 3, S, S]) -> logits [B, classes, S, S] (UperNet's, upsampled bilinearly); in training, the
    pair (those, the auxiliary head's likewise upsampled)."""

    def __init__(self, encoder, taps, num_classes, channels=None, drop_path=0.0, rel_pos_bias=False):
        super().__init__()
        self.backbone = ViTBackbone(encoder, taps, drop_path, rel_pos_bias)
        self.neck = Pyramid(encoder.width)
        self.decode_head = UperNetHead(encoder.width, channels or encoder.width, num_classes)
        self.auxiliary_head = FCNHead(encoder.width, num_classes)

    def forward(self, images):
        levels = self.neck(self.backbone(images))
        logits = upsample(self.decode_head(levels), images.shape[2:])
        if not self.training:
            return logits
        return logits, upsample(self.auxiliary_head(levels[2]), images.shape[2:])


# ------------------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------------------

# a DINO run's teacher first (the encoder DINO evaluates), then official / DDP-wrapped names, longest first
ENCODER_PREFIXES = ("module.teacher.visual.", "teacher.visual.", "module.visual.", "visual.", "module.")


def load_checkpoint_file(path):
    """`torch.load(path, weights_only=True)`, with one-sentence errors for a missing or unreadable file.

    argparse.Namespace is allowed because checkpoints written by the official code store their args as one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a file that is not a checkpoint
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({first_line(err)})") from None


def _tensors_of(checkpoint):
    """The state dict inside a loaded checkpoint: the dict itself, or the one under 'model' / 'state_dict'.
    ValueError when there is none (a bare tensor, a list, a dict of other things)."""
    state = checkpoint
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise ValueError("checkpoint holds no state dict (expected a dict of tensors, or one under 'model')")
    return state


def encoder_state_dict(checkpoint):
    """The encoder's weights, under timm's names, from any of the formats we accept:

    - ours (pretrain.py): {"model": {"visual.*", "image_mlp.*", ...}, "args": {...}}
    - the official StableRep code: {"model": {"module.visual.*" or "visual.*", ...}, "args": Namespace}
    - a plain timm state dict, or our exported encoder ({"model": timm keys, "config": {...}})
    Heads (timm's classifier `head.*`, `fc_norm.*`, the projection head and text tower) are dropped."""
    state = _tensors_of(checkpoint)
    for prefix in ENCODER_PREFIXES:
        if any(k.startswith(prefix + "cls_token") for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    return {k: v for k, v in state.items() if not k.startswith(("head.", "head_drop.", "fc_norm."))}


# the official StableRep+ text tower (CLIP's module names) -> ours; weights of the same layout unless transposed
OFFICIAL_TEXT_NAMES = (
    ("transformer.resblocks.", "text.blocks."), (".attn.in_proj_", ".attn.qkv."), (".attn.out_proj.", ".attn.proj."),
    (".ln_1.", ".norm1."), (".ln_2.", ".norm2."), (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2."),
    ("token_embedding.", "text.token_embedding."), ("positional_embedding", "text.positional_embedding"),
    ("ln_final.", "text.norm."),
)
OFFICIAL_PROJECTIONS = {"text_projection": "text.projection.weight", "image_projection": "image_projection.weight"}


def model_state_dict(checkpoint):
    """The weights of a whole StableRepModel (encoder, head, text tower) under our names, from:

    - ours (pretrain.py's checkpoints): returned as they are
    - the official code's (StableRep and StableRep+, with or without DDP's `module.`): the text tower is renamed
      (CLIP's `transformer.resblocks.N.attn.in_proj_weight` -> `text.blocks.N.attn.qkv.weight`, ...; the same
      q, k, v layout) and the two projection matrices, stored as [in, out] parameters, become Linear weights
    - an encoder alone (a timm ViT state dict, or our exported encoder.pth): under `visual.`
    Raises ValueError for a file without a state dict."""
    state = _tensors_of(checkpoint)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if not any(k.startswith("visual.") for k in state):  # an encoder alone
        return {f"visual.{k}": v for k, v in encoder_state_dict(state).items()}
    renamed = {}
    for key, value in state.items():
        name, transposed = our_name(key)
        renamed[name] = value.T.contiguous() if transposed else value  # [in, out] parameter -> Linear [out, in]
    return renamed


def our_name(key):
    """(our name, whether the tensor is stored transposed) of one key of an official StableRep or StableRep+
    checkpoint (DDP's `module.` dropped); our own names come back as they are."""
    key = key.removeprefix("module.")
    if key in OFFICIAL_PROJECTIONS:
        return OFFICIAL_PROJECTIONS[key], True
    if not key.startswith(("visual.", "image_mlp.", "text.")):
        for official, ours in OFFICIAL_TEXT_NAMES:
            key = key.replace(official, ours)
    return key, False


def checkpoint_config(checkpoint):
    """What the file says of the architecture: {"model": name, "image_size": int} where it says it, else {}."""
    if not isinstance(checkpoint, dict):
        return {}
    args = checkpoint.get("args") or checkpoint.get("config") or {}
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    config = {}
    if args.get("model") in VIT_SIZES:  # the official code says "base"; its width tells us instead
        config["model"] = args["model"]
    for key in ("image_size", "input_size"):
        if isinstance(args.get(key), int):
            config["image_size"] = args[key]
            break
    return config


def infer_vit_name(state):
    """The VIT_SIZES entry whose width matches the state dict's, or None (the depth is read off the keys)."""
    return vit_name(state["cls_token"].shape[-1]) if "cls_token" in state else None


def interpolate_pos_embed(pos_embed, grid_size, antialias=True):
    """Resize a [1, 1 + g*g, D] position embedding to a grid of grid_size x grid_size patches.

    The class token's entry is kept; the patch entries are resized as a 2-d image with bicubic interpolation,
    antialiased by default (timm's choice, so features match timm's on resized checkpoints; DINO resizes its
    training crops' embedding without)."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    old_grid = math.isqrt(patch_pos.shape[1])
    if old_grid == grid_size:
        return pos_embed
    width = patch_pos.shape[-1]
    patch_pos = patch_pos.float().reshape(1, old_grid, old_grid, width).permute(0, 3, 1, 2)  # (1, D, g, g)
    patch_pos = F.interpolate(patch_pos, size=(grid_size, grid_size), mode="bicubic", antialias=antialias)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, width).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


def load_encoder(path, model_name=None, image_size=None, checkpoint=None):
    """Build a VisionTransformer and load the encoder weights of the checkpoint at `path` into it (`checkpoint`:
    the file's content when the caller has read it already).

    model_name: a VIT_SIZES name; default what the checkpoint records, else what its shapes say.
    image_size: the input size to evaluate at; default the checkpoint's. The position embedding is interpolated
    when it differs. Raises FileNotFoundError or ValueError with a one-line message naming the problem (missing
    file, not a checkpoint, other architecture, missing or unexpected keys).
    """
    checkpoint = load_checkpoint_file(path) if checkpoint is None else checkpoint
    state = encoder_state_dict(checkpoint)
    config = checkpoint_config(checkpoint)
    stored_name = config.get("model") or infer_vit_name(state)
    model_name = model_name or stored_name
    if model_name is None:
        raise ValueError(f"{path}: cannot tell the architecture from the file; name it (e.g. vit_base)")
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise ValueError(f"{path}: no ViT encoder weights found (no patch_embed.proj.weight / pos_embed)")
    patch_size = state["patch_embed.proj.weight"].shape[-1]
    stored_grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    image_size = image_size or config.get("image_size") or stored_grid * patch_size
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    model = build_vit(model_name, image_size=image_size, patch_size=patch_size, depth=depth)
    stored_width = state["pos_embed"].shape[-1]
    if stored_width != model.width:
        raise ValueError(f"{path}: checkpoint is a ViT of width {stored_width} ({stored_name or 'unknown size'}),"
                         f" not {model_name} (width {model.width})")
    state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], model.patch_embed.grid_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: keys do not match {model_name}: missing {sorted(missing)[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected {sorted(unexpected)[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}")
    return model


def load_image_text_model(path, text_heads=None, image_size=None, eos_token_id=None):
    """A StableRepModel with its text tower (no head) from a checkpoint that has one: ours (pretrain.py --loss clip
    or stablerep+) or the official StableRep+ code's (renamed by model_state_dict). The text tower's sizes are read
    off the weights; its number of heads, which the weights do not show, from the checkpoint's args (ours record
    text_heads), else `text_heads`, else CLIP's width / 64. eos_token_id: the tokenizer's end-of-text token, whose
    state is pooled (set `model.text.eos_token_id` later when the tokenizer is known only then). Returns (model in
    eval mode, the heads used, the checkpoint's recorded args as a dict). Raises ValueError (one line) for a
    checkpoint without a text tower."""
    checkpoint = load_checkpoint_file(path)
    state = model_state_dict(checkpoint)
    if "text.token_embedding.weight" not in state or "image_projection.weight" not in state:
        raise ValueError(f"{path} has no text tower: image-text evaluations need a StableRep+ or CLIP checkpoint "
                         "(pretrain.py --loss stablerep+ or clip, or the official StableRep+)")
    visual = load_encoder(path, image_size=image_size, checkpoint=checkpoint)
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    vocab, width = state["text.token_embedding.weight"].shape
    depth = len({k.split(".")[2] for k in state if k.startswith("text.blocks.")})
    heads = text_heads or args.get("text_heads") or max(1, width // 64)
    if width % heads:
        raise ValueError(f"{path}: a text width of {width} does not split into {heads} heads (give the right number)")
    text = TextTransformer(vocab, eos_token_id, state["text.positional_embedding"].shape[0], width, depth, heads,
                           state["text.projection.weight"].shape[0])
    model = StableRepModel(visual, None, text)
    wanted = {k: v for k, v in state.items() if k.startswith("text.") or k in ("image_projection.weight",
                                                                                 "logit_scale")}
    missing, unexpected = model.load_state_dict(wanted, strict=False)
    missing = [k for k in missing if not k.startswith("visual.") and k != "logit_scale"]
    if missing or unexpected:
        raise ValueError(f"{path}: the text tower's keys do not match: missing {sorted(missing)[:4]}, unexpected "
                         f"{sorted(unexpected)[:4]}")
    return model.eval(), heads, args
