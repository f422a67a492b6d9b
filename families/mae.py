"""MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022), as its official code runs the
ViT-B recipe: facebookresearch/mae, commit efb2a80 (models_mae.py, main_pretrain.py, PRETRAIN.md). FIDELITY.md's
MAE section lists every item and the differences.

    image --patchify--> [N, L, p p 3]; keep a random 25% --ViT encoder--> latent --decoder--> pixels [N, L, p p 3]
    L = mean squared error on the removed patches, targets standardised per patch   (`reconstruction_loss`)
"""
import torch
import torch.nn as nn

from augment import View
from families.common import fix_position_embedding, sincos_position_embedding, xavier_init
from loss import at_least_float32, full_precision
from model import Block, build_vit
from util.cli import UserError

# ---- recipe ----

# MAE ViT-B (PRETRAIN.md, main_pretrain.py, models_mae.py): batch 4096 (64 a GPU x 64), blr 1.5e-4 x batch / 256,
# AdamW (0.9, 0.95) wd 0.05, 800 epochs, 40 warmup, mask 0.75, normalised pixels, decoder 512 wide, 8 blocks, 16
# heads, crop 0.2-1
RECIPE = {"captions_per_gpu": 64, "base_lr": 1.5e-4, "weight_decay": 0.05, "betas": (0.9, 0.95),
          "crop_scale": (0.2, 1.0), "epochs": 800, "warmup_epochs": 40, "mask_ratio": 0.75, "decoder_width": 512,
          "decoder_depth": 8, "decoder_heads": 16, "norm_pix_loss": True}


def check_args(args):
    """What MAE's flags cannot take together (pretrain.py's check_args calls it)."""
    if args.decoder_width % args.decoder_heads or args.decoder_width % 4:
        raise UserError(f"--decoder-width {args.decoder_width} must be divisible by --decoder-heads "
                        f"{args.decoder_heads} and by 4 (its sin-cos position embedding)")


# ---- views ----

# main_pretrain.py: RandomResizedCrop (bicubic) and a flip, no colour at all
VIEWS = (View(jitter_p=0.0, gray_p=0.0, blur_p=0.0, interpolation="bicubic"),)


# ---- networks ----

def init_vit(visual):
    """MAE's encoder (models_mae.py initialize_weights): fixed sin-cos position embedding, xavier-uniform Linears,
    the patch projection xavier-uniform as a [width, 3 p p] matrix (its bias keeps the convolution's default),
    class token N(0, 0.02)."""
    fix_position_embedding(visual)
    xavier_init(visual.blocks)
    nn.init.xavier_uniform_(visual.patch_embed.proj.weight.view(visual.width, -1))
    nn.init.normal_(visual.cls_token, std=0.02)
    return visual


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
    uniform noise, the lowest kept), the `decoder` predicts every patch's pixels, and the loss (`reconstruction_loss`)
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


def build(args):
    """MAE's encoder (sin-cos position embedding, xavier init) and its lightweight decoder."""
    visual = init_vit(build_vit(args.model, image_size=args.image_size, patch_size=args.patch_size, depth=args.depth))
    decoder = MAEDecoder(visual.width, visual.patch_embed.grid_size, visual.config["patch_size"],
                         args.decoder_width, args.decoder_depth, args.decoder_heads)
    return MAEModel(visual, decoder, args.mask_ratio)


def noise_per_crop(args):
    """The mask's uniform draws per crop, drawn by the loader: one per patch."""
    return (args.image_size // args.patch_size) ** 2


# ---- loss ----

def reconstruction_loss(pred, patches, mask, normalise_patches=True):
    """MAE's reconstruction loss (He et al., CVPR 2022, Sec. 3; models_mae.py forward_loss).

    pred, patches: [N, L, p p 3] the decoder's prediction and the image's pixels per patch; mask: [N, L], 1 where
    the patch was removed. With normalise_patches (MAE's --norm_pix_loss, its recipe), each target patch is first
    standardised by its own pixels' mean and (unbiased) variance, t = (x - mean) / sqrt(var + 1e-6). The loss is
    the mean squared error per patch, averaged over the removed patches only:

        L = sum_{i,l} m_il x mean_d (pred_ild - t_ild)^2 / sum_{i,l} m_il

    Every image has the same number of removed patches, so the mean of the per-rank losses under DDP is the
    one-process loss. Returns a float32 scalar."""
    with full_precision(pred):
        pred, target = at_least_float32(pred), at_least_float32(patches)
        if normalise_patches:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(dim=-1)  # [N, L]
        return (per_patch * mask).sum() / mask.sum()


def reconstruction_loss_reference(pred, patches, mask, normalise_patches=True):
    """`reconstruction_loss` as the formula reads, float64: t = (x - mean) / sqrt(var + 1e-6) per patch (unbiased
    variance), then sum_{i,l} m_il mean_d (pred_ild - t_ild)^2 / sum_{i,l} m_il."""
    x, pixels = patches.double(), patches.shape[-1]
    if normalise_patches:
        mean = x.sum(-1, keepdim=True) / pixels
        variance = ((x - mean) ** 2).sum(-1, keepdim=True) / (pixels - 1)
        x = (x - mean) / torch.sqrt(variance + 1e-6)
    per_patch = ((pred.double() - x) ** 2).sum(-1) / pixels  # [N, L]
    return (mask.double() * per_patch).sum() / mask.double().sum()


def loss_term(out, batch, args):
    """pretrain.py's term: the pixels of the removed patches (standardised per patch with --norm-pix-loss)."""
    return reconstruction_loss(out["pred"], out["patches"], out["mask"], args.norm_pix_loss)



# ---- what its users watch (pretrain.py writes it into log.jsonl every --log-every steps) ----

@torch.no_grad()
def monitor(model, out, position, args):
    """The loss on the removed patches (the training loss) beside the same error on the visible ones, which the
    decoder sees through the encoder: a model that only copies what it sees lowers the second, not the first."""
    visible = 1 - out["mask"]
    return {"masked_patch_loss": reconstruction_loss(out["pred"], out["patches"], out["mask"],
                                                     args.norm_pix_loss).item(),
            "visible_patch_loss": reconstruction_loss(out["pred"], out["patches"], visible,
                                                      args.norm_pix_loss).item()}
