"""MoCo v3 (Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021), as its
official code runs the ViT-B recipe: facebookresearch/moco-v3, commit c349e6e (moco/builder.py, vits.py,
main_moco.py, CONFIG.md). FIDELITY.md's MoCo v3 section lists every item and the differences.

    two views --ViT (sin-cos positions, frozen patch projection)--projector--predictor--> q [N, 2, 256]
    two views --momentum ViT--momentum projector--> k [N, 2, 256]  (no gradient; EMA of the online network)
    L = ctr(q1, k2) + ctr(q2, k1)                                    (symmetrised InfoNCE, `contrastive_loss`)
"""
import math

import torch
import torch.nn as nn

from augment import View
from families.common import MomentumModel, cosine_schedule, embedding_std, fix_position_embedding, xavier_init
from loss import at_least_float32, full_precision
from model import build_vit
from util.distributed import all_gather_no_grad, rank

# ---- recipe ----

# MoCo v3 ViT-B (CONFIG.md, main_moco.py): batch 4096 (64 a GPU x 64), lr 1.5e-4 x batch / 256, AdamW wd 0.1 and
# torch's default betas, 300 epochs, 40 warmup, T 0.2, m 0.99 to 1, crop-min 0.08, MLPs 4096 -> 256
RECIPE = {"captions_per_gpu": 64, "base_lr": 1.5e-4, "weight_decay": 0.1, "betas": (0.9, 0.999),
          "crop_scale": (0.08, 1.0), "temperature": 0.2, "head_hidden_dim": 4096, "embed_dim": 256, "epochs": 300,
          "warmup_epochs": 40, "momentum": 0.99, "frozen_patch_embed": True}


# ---- views ----

# main_moco.py augmentation1 / augmentation2 (BYOL's two asymmetric views): colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8,
# grayscale p 0.2, blur p 1.0 / 0.1, solarisation p 0 / 0.2, flip, torchvision's bilinear RandomResizedCrop
VIEWS = (View(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0),
         View(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.1, solarize_p=0.2))


# ---- networks ----

def init_vit(visual, frozen_patch_embed=True):
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


def mlp(layers, in_dim, hidden_dim, out_dim):
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


def build(args):
    """MoCo v3's ViT (sin-cos position embedding, xavier init, frozen random patch projection), a 3-layer
    projector and a 2-layer predictor (moco/builder.py MoCo_ViT), and their momentum copies."""
    visual = init_vit(build_vit(args.model, image_size=args.image_size, patch_size=args.patch_size, depth=args.depth),
                      frozen_patch_embed=args.frozen_patch_embed)
    projector = mlp(3, visual.width, args.head_hidden_dim, args.embed_dim)
    predictor = mlp(2, args.embed_dim, args.head_hidden_dim, args.embed_dim)
    return MomentumModel(visual, projector, predictor, args.head_batchnorm == "per-view")


# ---- loss ----

def contrastive_loss(queries, keys, temperature=0.2):
    """MoCo v3's symmetrised InfoNCE (Chen, Xie, He, ICCV 2021, Eq. 1; moco/builder.py contrastive_loss).

    queries: [N_local, 2, E] the predictor's outputs q of each image's two views; keys: [N_local, 2, E] the
    momentum encoder's k (no gradient). With q, k L2-normalised, the key of image i's other view as its positive
    and every other image's key in the global batch as negatives:

        ctr(q, k) = 2 tau x mean_i -log( exp(q_i.k_i / tau) / sum_j exp(q_i.k_j / tau) )
        L = ctr(q_view1, k_view2) + ctr(q_view2, k_view1)

    (the factor 2 tau is the official code's, which makes the gradient's scale independent of tau). Under DDP the
    keys are gathered from every rank (they carry no gradient), each rank scores its own queries, and the mean of
    the per-rank losses is the one-process loss of the global batch. Returns a float32 scalar."""
    with full_precision(queries):
        queries, keys = at_least_float32(queries), at_least_float32(keys.detach())
        queries, keys = torch.nn.functional.normalize(queries, dim=-1), torch.nn.functional.normalize(keys, dim=-1)
        all_keys = all_gather_no_grad(keys)  # [N_global, 2, E]
        positives = torch.arange(len(queries), device=queries.device) + rank() * len(queries)
        total = 0.0
        for view in (0, 1):
            logits = queries[:, view] @ all_keys[:, 1 - view].T / temperature  # [N_local, N_global]
            total = total + torch.nn.functional.cross_entropy(logits, positives) * (2 * temperature)
        return total


def contrastive_loss_reference(queries, keys, temperature=0.2):
    """`contrastive_loss` for one process as the formula reads: ctr(q, k) = 2 tau x mean_i -log softmax_j(q_i.k_j /
    tau)_i over an [N, N] logit matrix per view pair, float64."""
    q, k = torch.nn.functional.normalize(queries.double(), dim=-1), torch.nn.functional.normalize(keys.double(), dim=-1)
    total = 0.0
    for view, other in ((0, 1), (1, 0)):
        log_softmax = torch.log_softmax(q[:, view] @ k[:, other].detach().T / temperature, dim=1)  # [N, N]
        total = total + 2 * temperature * -log_softmax.diagonal().mean()  # image i's other view is its positive
    return total


def loss_term(out, batch, args):
    """pretrain.py's term: each view's query against the momentum keys of the global batch."""
    return contrastive_loss(out["online"], out["target"], args.temperature)


# ---- the momentum encoder's schedule (a hook: hook(model, optimizer, position, args)) ----

def update_momentum_encoder(model, optimizer, position, args):
    """MoCo v3, before the forward pass (moco/builder.py does it inside forward): the momentum encoder moves towards
    the base encoder with this step's momentum."""
    model.update_momentum(cosine_schedule(args.momentum, 1.0, position.step, position.total_steps))


# ---- what its users watch (pretrain.py writes it into log.jsonl every --log-every steps) ----

def monitor(model, out, position, args):
    """The momentum of this step, and the online network's output spread (0 when the representation collapses)."""
    return {"momentum": cosine_schedule(args.momentum, 1.0, position.step, position.total_steps),
            "embedding_std": embedding_std(out["online"])}
