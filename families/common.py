"""What several self-supervised families share: momentum copies and their exponential moving average (MoCo v3, BYOL,
DINO), the fixed 2-D sin-cos position embedding and xavier initialisation (MoCo v3, MAE), running a network once per
view (MoCo v3, BYOL), and the half-cosine schedules of momenta and weight decay (MoCo v3, BYOL, DINO)."""
import copy
import math

import torch
import torch.nn as nn


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


def cosine_schedule(start, end, step, total_steps):
    """From `start` at step 0 to `end` at total_steps along a half cosine: the momentum of MoCo v3
    (adjust_moco_momentum), BYOL (tau) and DINO (momentum_schedule), and DINO's weight decay (wd_schedule)."""
    return end + (start - end) * (1 + math.cos(math.pi * step / total_steps)) / 2


@torch.no_grad()
def embedding_std(embeddings):
    """The collapse monitor of MoCo v3 and BYOL (the SimSiam paper's, Sec. 4.1; solo-learn logs it): the standard
    deviation over the batch of the L2-normalised embeddings [N, ..., E], averaged over the E channels. A collapsed
    network gives 0; embeddings spread uniformly on the sphere give about 1 / sqrt(E)."""
    unit = torch.nn.functional.normalize(embeddings.detach().float().flatten(0, -2), dim=-1)
    return unit.std(dim=0).mean().item()
