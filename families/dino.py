"""DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021), as its official code
runs it: facebookresearch/dino, commit 7c446df (main_dino.py's defaults, vision_transformer.py DINOHead, utils.py).
FIDELITY.md's DINO section lists every item and the differences.

    2 global + L local crops --student ViT (stochastic depth)--DINOHead--> P_s [N, 2 + L, K]
    2 global crops --teacher ViT--teacher head--> centred, sharpened P_t [N, 2, K]  (no gradient; EMA of the student)
    L = mean over pairs (g, v != g) of H(P_t(g), P_s(v))                        (`distillation_loss`)
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from augment import View
from data import LocalCrops
from families.common import cosine_schedule, ema_update_, frozen_copy
from loss import at_least_float32, full_precision
from model import build_vit, default_depth
from util.cli import UserError
from util.distributed import all_gather_no_grad, world_size

# ---- recipe ----

# DINO (main_dino.py's defaults): 64 a GPU, lr 5e-4 x batch / 256, AdamW, wd 0.04 -> 0.4, 100 epochs, 10 warmup,
# student temperature 0.1, teacher 0.04, m 0.996 to 1, head 2048 -> 256 -> 65536, clip 3.0, last layer frozen 1
# epoch, drop path 0.1, global crops 0.4-1, 8 local crops of 96 px at 0.05-0.4
RECIPE = {"captions_per_gpu": 64, "base_lr": 5e-4, "weight_decay": 0.04, "weight_decay_end": 0.4,
          "betas": (0.9, 0.999), "crop_scale": (0.4, 1.0), "temperature": 0.1, "head_hidden_dim": 2048,
          "embed_dim": 256, "out_dim": 65536, "epochs": 100, "warmup_epochs": 10, "momentum": 0.996,
          "teacher_temperature": 0.04, "warmup_teacher_temperature": 0.04, "warmup_teacher_temperature_epochs": 0,
          "clip_grad": 3.0, "freeze_last_layer": 1, "drop_path": 0.1, "local_crops": 8,
          "local_crop_scale": (0.05, 0.4), "local_crop_size": 96}


def check_args(args):
    """What DINO's flags cannot take together (pretrain.py's check_args calls it)."""
    if args.local_crops and args.local_crop_size % args.patch_size:
        raise UserError(f"--local-crop-size {args.local_crop_size} is not a multiple of the patch size "
                        f"{args.patch_size} (--patch-size)")
    if args.local_crops and args.local_crop_size >= args.image_size:
        raise UserError(f"--local-crop-size {args.local_crop_size} is not smaller than --image-size "
                        f"{args.image_size}: local crops are the small ones (DINO: 96 at 224)")


# ---- views: two global crops, and --local-crops small ones (main_dino.py DataAugmentationDINO) ----

# BYOL's two views as the global crops (colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2, blur p 1.0 /
# 0.1, solarisation p 0 / 0.2), bicubic; the local crops blur with p 0.5
VIEWS = (View(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0, interpolation="bicubic"),
         View(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.1, solarize_p=0.2, interpolation="bicubic"))
LOCAL_VIEW = View(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.5, interpolation="bicubic")


def local_crops(args):
    """The dataset's local crops (--local-crops of --local-crop-size pixels at --local-crop-scale), or None."""
    if not args.local_crops:
        return None
    return LocalCrops(args.local_crops, args.local_crop_size, tuple(args.local_crop_scale), LOCAL_VIEW)


def noise_per_crop(args):
    """Stochastic depth's uniform draws per crop, drawn by the loader: two (attention, MLP) per block."""
    return 2 * (args.depth or default_depth(args.model)) if args.drop_path > 0 else 0


# ---- networks ----

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
    it, and util.checkpoints.encoder_state_dict prefers it in a full checkpoint. `teacher_temperature` is the
    sharpening the loss applies to the teacher this step (a schedule: `schedules` sets it before each step)."""

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


def build(args):
    """DINO's student (ViT with stochastic depth, DINOHead) and teacher; the teacher temperature starts at its
    warmup value (set each step by `schedules`)."""
    visual = build_vit(args.model, image_size=args.image_size, patch_size=args.patch_size, depth=args.depth,
                       drop_path_rate=args.drop_path)
    head = DINOHead(visual.width, args.out_dim, args.head_hidden_dim, args.embed_dim)
    return DINOModel(visual, head, teacher_temperature=args.warmup_teacher_temperature)


def teacher_encoder(model):
    """The encoder encoder.pth holds: the teacher's, the network DINO's paper evaluates."""
    return model.teacher["visual"]


# ---- loss ----

def distillation_loss(student, teacher, center, student_temperature=0.1, teacher_temperature=0.04):
    """DINO's self-distillation loss (Caron et al., ICCV 2021, Eq. 1 and Alg. 1; main_dino.py DINOLoss).

    student: [N, V, K] the student head's outputs for each image's V crops, the two global crops first; teacher:
    [N, 2, K] the teacher's for the two global crops (no gradient); center: [1, K]. The teacher is centred and
    sharpened, P_t = softmax((t - center) / teacher_temperature); the student is P_s = softmax(s /
    student_temperature); each student crop learns every teacher crop but its own:

        L = 1 / #pairs x sum_{g in {1, 2}} sum_{v != g} mean_i H(P_t(i, g), P_s(i, v)),   H(a, b) = -sum_k a_k log b_k

    with #pairs = 2 (V - 1). The sum over pairs is one contraction over K ([2, V] cross-entropies at once) instead
    of the official loop's V - 1 passes per teacher crop (`distillation_loss_reference` is that loop); the same
    value and gradient (tests/test_dino.py). The loss is a mean over this rank's images (the center is the global one).
    Returns a float32 scalar."""
    with full_precision(student):
        log_student = torch.log_softmax(at_least_float32(student) / student_temperature, dim=-1)  # [N, V, K]
        targets = torch.softmax((at_least_float32(teacher.detach()) - center) / teacher_temperature, dim=-1)
        cross = -torch.einsum("ngk,nvk->gv", targets, log_student) / len(student)  # [2, V]: mean_i H per pair
        views = student.shape[1]
        other = ~torch.eye(2, views, dtype=torch.bool, device=student.device)  # v != g
        return cross[other].sum() / (2 * (views - 1))


def distillation_loss_reference(student, teacher, center, student_temperature=0.1, teacher_temperature=0.04):
    """`distillation_loss` as the official DINOLoss.forward loops: pair by pair, each an [N, K] cross-entropy."""
    student_out = (student.double() / student_temperature).unbind(1)
    teacher_out = torch.softmax((teacher.double() - center.double()) / teacher_temperature, dim=-1).detach()
    total, pairs = 0.0, 0
    for g, target in enumerate(teacher_out.unbind(1)):
        for v, crop in enumerate(student_out):
            if v == g:
                continue  # a crop never learns from itself
            total = total + torch.sum(-target * torch.log_softmax(crop, dim=-1), dim=-1).mean()
            pairs += 1
    return total / pairs


def loss_term(out, batch, args):
    """pretrain.py's term: every student crop learns the centred, sharpened teacher softmax of the other global
    crop(s)."""
    return distillation_loss(out["student"], out["teacher"], out["center"], args.temperature,
                              out["teacher_temperature"])


# ---- schedules, gradients and the teacher (hooks: hook(model, optimizer, position, args)) ----

MIN_LR = 1e-6  # main_dino.py --min_lr: where the learning rate's cosine ends


def learning_rate(step, total_steps, warmup_steps, peak_lr):
    """main_dino.py's learning rate at `step` (utils.cosine_scheduler, per iteration): np.linspace(0, peak_lr, W)
    over the W = warmup_steps first steps (the peak is reached at step W - 1), then from the peak at step W half a
    cosine towards MIN_LR over the remaining total_steps - W steps. (StableRep's objectives take pretrain.cosine_lr.)"""
    warmup = int(warmup_steps)
    if step < warmup:
        return peak_lr * step / (warmup - 1) if warmup > 1 else 0.0
    progress = (step - warmup) / (total_steps - warmup)
    return MIN_LR + 0.5 * (peak_lr - MIN_LR) * (1 + math.cos(math.pi * progress))


def schedules(model, optimizer, position, args):
    """DINO, before each step: the teacher temperature (linear per epoch from its warmup value over the warmup
    epochs, then constant: DINOLoss.teacher_temp_schedule) and the weight decay of the decayed parameters (cosine
    from --weight-decay to --weight-decay-end; only main_dino.py's first group is regularised, as ours)."""
    start, end, warmup = (args.warmup_teacher_temperature, args.teacher_temperature,
                          args.warmup_teacher_temperature_epochs)
    if position.epoch < warmup:
        model.teacher_temperature = start + (end - start) * (position.epoch / (warmup - 1) if warmup > 1 else 0)
    else:
        model.teacher_temperature = end
    optimizer.param_groups[0]["weight_decay"] = cosine_schedule(args.weight_decay, args.weight_decay_end,
                                                                position.step, position.total_steps)


def clip_and_cancel_gradients(model, optimizer, position, args):
    """DINO, between backward and the optimiser step (on unscaled gradients): each parameter's gradient clipped to
    norm --clip-grad on its own (utils.clip_gradients), and none for the head's last layer during the first
    --freeze-last-layer epochs (utils.cancel_gradients_last_layer: AdamW then skips it entirely)."""
    if args.clip_grad:
        for parameter in model.parameters():
            if parameter.grad is not None:
                scale = args.clip_grad / (parameter.grad.norm() + 1e-6)
                parameter.grad.mul_(scale.clamp(max=1.0))
    if position.epoch < args.freeze_last_layer:
        for parameter in model.head.last_layer.parameters():
            parameter.grad = None


def update_teacher(model, optimizer, position, args):
    """DINO, after the optimiser step: the teacher moves towards the student with this step's momentum."""
    model.update_teacher(cosine_schedule(args.momentum, 1.0, position.step, position.total_steps))


# ---- what its users watch (pretrain.py writes it into log.jsonl every --log-every steps) ----

@torch.no_grad()
def monitor(model, out, position, args):
    """DINO's collapse signals (the DINO paper's Sec. 5.3, Fig. 7): the entropy of the centred, sharpened teacher
    softmax h(P_t) (ln K: collapse to uniform; 0: collapse to one prototype) and the KL divergence of the student to
    the teacher, KL = H(P_t, P_s) - h(P_t) (0 when both collapse alike); with the teacher temperature and momentum of
    this step."""
    teacher = torch.softmax((out["teacher"].detach().float() - out["center"]) / out["teacher_temperature"], dim=-1)
    entropy = -(teacher * torch.log(teacher.clamp_min(1e-30))).sum(-1).mean().item()  # over images and global crops
    cross = distillation_loss(out["student"].detach(), out["teacher"], out["center"], args.temperature,
                              out["teacher_temperature"]).item()  # each teacher crop in (V - 1) pairs: mean H
    return {"teacher_entropy": entropy, "teacher_student_kl": cross - entropy,
            "teacher_temperature": out["teacher_temperature"],
            "momentum": cosine_schedule(args.momentum, 1.0, position.step, position.total_steps)}
