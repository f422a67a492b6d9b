"""BYOL (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020). Its official code is JAX for ResNets; we follow the
paper and vturrisi/solo-learn (solo/losses/byol.py, solo/methods/byol.py) as the public reference, and MoCo v3's
AdamW recipe for a ViT, as the MoCo v3 paper trains its ViT BYOL. FIDELITY.md's BYOL section lists every item.

    two views --ViT--projector--predictor--> q [N, 2, 256]
    two views --target ViT--target projector--> z' [N, 2, 256]  (no gradient; EMA of the online network)
    L = ||q1 - z'2||^2 + ||q2 - z'1||^2 on unit vectors        (`regression_loss`)
"""
import torch
import torch.nn as nn

from augment import View
from families.common import MomentumModel, cosine_schedule, embedding_std
from loss import at_least_float32, full_precision
from model import build_vit

# ---- recipe ----

# BYOL (paper Sec. 3.3, Appendix): MLPs 4096 -> 256, tau 0.996 to 1, crop 0.08-1. BYOL's own optimiser is LARS for
# ResNet-50; for a ViT we take MoCo v3's AdamW recipe, as the MoCo v3 paper does for its ViT BYOL (FIDELITY.md)
RECIPE = {"captions_per_gpu": 64, "base_lr": 1.5e-4, "weight_decay": 0.1, "betas": (0.9, 0.999),
          "crop_scale": (0.08, 1.0), "head_hidden_dim": 4096, "embed_dim": 256, "epochs": 300, "warmup_epochs": 40,
          "momentum": 0.996}


# ---- views ----

# BYOL's two views (BYOL paper, Table 6): colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2, blur p 1.0
# on the first and 0.1 on the second, solarisation p 0 and 0.2, bicubic resampling
VIEWS = (View(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0, interpolation="bicubic"),
         View(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.1, solarize_p=0.2, interpolation="bicubic"))


# ---- networks ----

def mlp(in_dim, hidden_dim, out_dim):
    """BYOL's projector and predictor (BYOL paper Sec. 3.3): Linear-BatchNorm-ReLU-Linear, with biases."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


def build(args):
    """BYOL's online network (encoder, projector, predictor) and its target copy."""
    visual = build_vit(args.model, image_size=args.image_size, patch_size=args.patch_size, depth=args.depth)
    projector = mlp(visual.width, args.head_hidden_dim, args.embed_dim)
    predictor = mlp(args.embed_dim, args.head_hidden_dim, args.embed_dim)
    return MomentumModel(visual, projector, predictor, args.head_batchnorm == "per-view")


# ---- loss ----

def regression_loss(predictions, targets):
    """BYOL's symmetrised regression loss (Grill et al., NeurIPS 2020, Eq. 2 and the sum L + L~ of Sec. 3.1).

    predictions: [N, 2, E] the online predictor's q of each image's two views; targets: [N, 2, E] the target
    network's projections z' (no gradient). With both L2-normalised, the prediction of one view regresses the
    target of the other:

        L = mean_i ||q_i,1 - z'_i,2||^2 + mean_i ||q_i,2 - z'_i,1||^2,   ||q - z'||^2 = 2 - 2 cos(q, z')

    Per image, so the mean of the per-rank losses under DDP is the one-process loss. Returns a float32 scalar."""
    with full_precision(predictions):
        q = torch.nn.functional.normalize(at_least_float32(predictions), dim=-1)
        z = torch.nn.functional.normalize(at_least_float32(targets.detach()), dim=-1)
        return (2 - 2 * (q * z.flip(1)).sum(-1)).mean(0).sum()  # views (1, 2) against targets (2, 1)


def regression_loss_reference(predictions, targets):
    """`regression_loss` as Eq. 2 reads: the squared distance of the unit vectors, L + L~, float64."""
    q = predictions.double() / predictions.double().norm(dim=-1, keepdim=True)
    z = targets.double().detach() / targets.double().norm(dim=-1, keepdim=True)
    loss = ((q[:, 0] - z[:, 1]) ** 2).sum(-1).mean()  # L: view 1 predicts view 2's target
    loss_tilde = ((q[:, 1] - z[:, 0]) ** 2).sum(-1).mean()  # L~: the views swapped
    return loss + loss_tilde


def loss_term(out, batch, args):
    """pretrain.py's term: each view's prediction regresses the target network's projection of the other view."""
    return regression_loss(out["online"], out["target"])


# ---- the target network's schedule (a hook: hook(model, optimizer, position, args)) ----

def update_target_network(model, optimizer, position, args):
    """After the optimiser step: the target network moves towards the online one with this step's tau."""
    model.update_momentum(cosine_schedule(args.momentum, 1.0, position.step, position.total_steps))


# ---- what its users watch (pretrain.py writes it into log.jsonl every --log-every steps) ----

def monitor(model, out, position, args):
    """The momentum of this step, and the online network's output spread (0 when the representation collapses)."""
    return {"momentum": cosine_schedule(args.momentum, 1.0, position.step, position.total_steps),
            "embedding_std": embedding_std(out["online"])}
