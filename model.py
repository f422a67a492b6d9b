"""The networks of StableRep, written by hand: the ViT encoder f, the projection head h, the text tower of the CLIP
and StableRep+ baselines. (The self-supervised families' networks are in families/, checkpoint reading in
util/checkpoints.py.)

The encoder's parameter names, shapes, initialisation and epsilons are those of timm's VisionTransformer
(class-token pooling, no classifier), so `load_state_dict` takes a timm ViT state dict as it is and the same
weights give the same features. The official StableRep code wraps that timm model as `visual` and the head as
`image_mlp`; `StableRepModel` keeps both names, so an official checkpoint loads into it key for key.

    image [B, 3, H, W] --VisionTransformer--> f(x) [B, D] --ProjectionHead--> h(f(x)) [B, 256]
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.catalog import VIT_SIZES

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
# position embeddings at another input size
# ------------------------------------------------------------------------------------------------------------


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


