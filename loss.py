"""The multi-positive contrastive loss of StableRep (Tian et al., NeurIPS 2023, arXiv 2306.00984, Sec. 3.2).

A batch holds N images; image i comes from caption c_i and has the L2-normalised embedding z_i. For an anchor i
and every other image j != i:

    Eq. 2, contrastive distribution   q_ij = exp(z_i.z_j / tau) / sum_{k != i} exp(z_i.z_k / tau)
    Eq. 3, ground-truth distribution  p_ij = 1[c_i = c_j] / sum_{k != i} 1[c_i = c_k]
    Eq. 4, loss                       L = mean_i H(p_i, q_i) = -mean_i sum_{j != i} p_ij log q_ij

This is SupCon's L_out with caption ids as labels, and SimCLR's NT-Xent when every "caption" is one image seen in
two crops (labels = image ids, each appearing twice).

Shapes: features [N_local, D], labels [N_local]. Under torch.distributed each rank scores its N_local rows
against the N_global = world_size * N_local columns gathered from all ranks (the gather carries gradients);
nothing of size N_global x N_global is ever built. Every rank must hold the same N_local.

Edge cases: an anchor whose caption has no other image in the global batch has no positive; p_i is undefined,
so it contributes 0 to the sum (and no gradient through its own row) while still serving as a negative for the
others; the mean is still over all N anchors, so that the per-rank means average to the one-process mean.

Two implementations of the same numbers: `multi_positive_loss_reference` is Eq. 2-4 line by line (N x N masks,
autograd), to read beside the paper; `multi_positive_loss` is what training calls: the same value and gradient
(tests/test_loss.py holds them to 1e-10), with this rank's rows against gathered columns under DDP, positives
summed per caption instead of masked, and a hand-written backward that recomputes the logits instead of keeping
them, so it needs a fifth of SupConLoss's memory and a third of its time (BENCHMARKS.md).
"""
import torch

from util.distributed import all_gather_no_grad, all_gather_with_grad, rank


def full_precision(tensor):
    """Autocast off for what follows on `tensor`'s device, so a matmul on float32 inputs stays float32.

    Inside torch.autocast(bf16/fp16) a `.float()` cast alone does not help: autocast casts the operands of the
    next matmul back down. The losses are softmaxes over thousands of logits divided by tau = 0.1, where bf16's
    8-bit mantissa moves the loss by ~1e-3 and the gradient by several percent (measured on near-converged
    embeddings), so they run in float32 whatever the caller's autocast says."""
    return torch.autocast(tensor.device.type, enabled=False)


def at_least_float32(tensor):
    """fp16 / bf16 -> float32; float32 and float64 are kept."""
    return tensor.float() if tensor.element_size() < 4 else tensor


def multi_positive_loss_reference(features, labels, temperature=0.1):
    """Eq. 2-4 as the paper writes them, for one process: features [N, D] L2-normalised, labels [N]."""
    not_self = ~torch.eye(len(features), dtype=torch.bool, device=features.device)  # [N, N], the k != i of Eq. 2-3
    logits = (features @ features.T / temperature).masked_fill(~not_self, float("-inf"))  # z_i.z_k / tau
    log_q = torch.log_softmax(logits, dim=1).masked_fill(~not_self, 0.0)  # Eq. 2, log q_ij (q_ii is never used)
    same_caption = (labels[:, None] == labels[None, :]) & not_self  # 1[c_i = c_j], j != i
    p = same_caption.to(log_q.dtype) / same_caption.sum(dim=1, keepdim=True).clamp(min=1)  # Eq. 3 (0s: no positive)
    return -(p * log_q).sum(dim=1).mean()  # Eq. 4: mean_i H(p_i, q_i)


def multi_positive_loss(features, labels, temperature=0.1):
    """Eq. 4 averaged over this rank's anchors, the fast form of `multi_positive_loss_reference`; scalar float32.

    features: [N_local, D] L2-normalised embeddings (half precision is computed in float32, float64 kept).
    labels:   [N_local] integer caption ids; images that share an id are positives of each other.
    temperature: tau, 0.1 in the paper.
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"expected features [N, D] and labels [N], got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    with full_precision(features):
        features = at_least_float32(features)  # fp16 / bf16 from autocast: the softmax is computed in float32
        all_features = all_gather_with_grad(features)  # [N_global, D]
        all_labels = all_gather_no_grad(labels)  # [N_global]
        if all_features.shape[0] < 2:
            raise ValueError("the multi-positive loss needs at least two images in the (global) batch")
        first_column = rank() * features.shape[0]  # where this rank's rows sit among the global columns
        return _MultiPositiveCrossEntropy.apply(features, all_features, labels, all_labels, first_column,
                                                float(temperature))


def _positive_sums(labels, all_labels, all_features, first_column):
    """For each local anchor i: the sum over its positives j != i of z_j, and the number of those positives;
    also the caption index of every column and of every anchor, which backward reuses.

    Computed per caption in O(N D) rather than with an N x N mask: sum all images of caption c_i, then take
    the anchor's own embedding out."""
    caption_ids, caption_of_column = torch.unique(all_labels, return_inverse=True)
    caption_sums = torch.zeros(len(caption_ids), all_features.shape[1], dtype=all_features.dtype,
                               device=all_features.device).index_add_(0, caption_of_column, all_features)
    caption_sizes = torch.bincount(caption_of_column, minlength=len(caption_ids))
    caption_of_anchor = caption_of_column[first_column:first_column + len(labels)]
    own = all_features[first_column:first_column + len(labels)]
    return (caption_sums[caption_of_anchor] - own, caption_sizes[caption_of_anchor] - 1, caption_of_column,
            caption_of_anchor)


class _MultiPositiveCrossEntropy(torch.autograd.Function):
    """Eq. 2-4 with a hand-written backward that recomputes the logits instead of storing them.

    Only the [N_local, N_global] logit matrix is ever materialised (once in forward, once in backward), which
    halves peak memory against autograd; the positives are handled per caption in O(N D) (`_positive_sums`).
    """

    @staticmethod
    def forward(ctx, features, all_features, labels, all_labels, first_column, temperature):
        num_local = features.shape[0]
        rows = torch.arange(num_local, device=features.device)
        self_columns = rows + first_column

        logits = features @ all_features.T  # [N_local, N_global], z_i . z_j
        logits.div_(temperature)
        logits[rows, self_columns] = float("-inf")  # k != i in Eq. 2: an image is never its own candidate
        log_normaliser = torch.logsumexp(logits, dim=1)  # log sum_{k != i} exp(z_i.z_k / tau), Eq. 2's denominator

        positive_sum, num_positives, caption_of_column, caption_of_anchor = _positive_sums(
            labels, all_labels, all_features, first_column)
        has_positive = num_positives > 0
        # Eq. 3 puts p_ij = 1 / num_positives_i on each positive j, so with Eq. 2's log q_ij:
        # Eq. 4 per anchor: -sum_j p_ij log q_ij = log_normaliser_i - mean over positives of z_i.z_j / tau
        mean_positive_logit = (features * positive_sum).sum(1) / temperature / num_positives.clamp(min=1)
        loss_per_anchor = torch.where(has_positive, log_normaliser - mean_positive_logit, 0.0)

        ctx.save_for_backward(features, all_features, log_normaliser, positive_sum, num_positives,
                              caption_of_column, caption_of_anchor)
        ctx.first_column, ctx.temperature = first_column, temperature
        return loss_per_anchor.sum() / num_local  # Eq. 4: mean over anchors

    @staticmethod
    def backward(ctx, grad_output):
        with full_precision(grad_output):  # recompute the logits exactly as forward did, in float32
            return _MultiPositiveCrossEntropy._backward(ctx, grad_output)

    @staticmethod
    def _backward(ctx, grad_output):
        (features, all_features, log_normaliser, positive_sum, num_positives, caption_of_column,
         caption_of_anchor) = ctx.saved_tensors
        first_column, temperature = ctx.first_column, ctx.temperature
        num_local = features.shape[0]
        rows = torch.arange(num_local, device=features.device)

        # d loss_i / d logit_ij = (q_ij - p_ij) * weight_i, weight_i = 0 for anchors without positives
        weight = torch.where(num_positives > 0, grad_output / num_local, 0.0)  # [N_local]

        q = features @ all_features.T  # recompute the logits, then turn them into q (Eq. 2) in place
        q.div_(temperature)
        q[rows, rows + first_column] = float("-inf")
        q.sub_(log_normaliser[:, None]).exp_()
        q.mul_(weight[:, None] / temperature)  # chain rule through logit = z_i.z_j / tau

        # the p_ij part, per caption: row i pulls towards the mean of its positives, and every column j of
        # caption c receives the weighted anchors of caption c except itself
        p_scale = weight / temperature / num_positives.clamp(min=1)  # [N_local]
        grad_features = q @ all_features - p_scale[:, None] * positive_sum
        grad_all_features = q.T @ features
        num_captions = int(caption_of_column.max()) + 1
        weighted_anchor_sums = torch.zeros(num_captions, features.shape[1], dtype=features.dtype,
                                           device=features.device)
        weighted_anchor_sums.index_add_(0, caption_of_anchor, p_scale[:, None] * features)
        grad_all_features -= weighted_anchor_sums[caption_of_column]
        grad_all_features[first_column:first_column + num_local] += p_scale[:, None] * features
        return grad_features, grad_all_features, None, None, None, None


def image_text_loss(image_features, text_features, image_captions, text_captions, logit_scale):
    """CLIP's symmetric image-text loss, generalised to m images per caption (StableRep+, Sec. 3.3).

    image_features: [N_images_local, E] and text_features: [N_texts_local, E], L2-normalised.
    image_captions / text_captions: the caption id of each image / text; every text is its own caption.
    logit_scale: exp of CLIP's learnable temperature parameter (a 0-d tensor).

    image -> text: each image's target is its caption's text; text -> image: the target is uniform over the
    caption's images in the global batch (with m = 1 this is CLIP's loss). Returns the mean of the two directions,
    each averaged over this rank's rows, against columns gathered from all ranks with gradients.
    """
    with full_precision(image_features):
        return _image_text_loss(at_least_float32(image_features), at_least_float32(text_features), image_captions,
                                text_captions, at_least_float32(logit_scale))


def _image_text_loss(image_features, text_features, image_captions, text_captions, logit_scale):
    all_images = all_gather_with_grad(image_features)  # [N_images_global, E]
    all_texts = all_gather_with_grad(text_features)  # [N_texts_global, E]
    all_image_captions = all_gather_no_grad(image_captions)
    all_text_captions = all_gather_no_grad(text_captions)

    def soft_cross_entropy(logits, row_captions, column_captions):
        targets = (row_captions[:, None] == column_captions[None, :]).to(logits.dtype)  # [rows, columns]
        targets = targets / targets.sum(dim=1, keepdim=True).clamp(min=1)
        return -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()

    image_to_text = soft_cross_entropy(logit_scale * image_features @ all_texts.T, image_captions, all_text_captions)
    text_to_image = soft_cross_entropy(logit_scale * text_features @ all_images.T, text_captions, all_image_captions)
    return (image_to_text + text_to_image) / 2


# ------------------------------------------------------------------------------------------------------------
# the self-supervised families of the paper's first question (Sec. 2): MoCo v3, BYOL, DINO, MAE
# ------------------------------------------------------------------------------------------------------------

def mocov3_loss(queries, keys, temperature=0.2):
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


def byol_loss(predictions, targets):
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


def dino_loss(student, teacher, center, student_temperature=0.1, teacher_temperature=0.04):
    """DINO's self-distillation loss (Caron et al., ICCV 2021, Eq. 1 and Alg. 1; main_dino.py DINOLoss).

    student: [N, V, K] the student head's outputs for each image's V crops, the two global crops first; teacher:
    [N, 2, K] the teacher's for the two global crops (no gradient); center: [1, K]. The teacher is centred and
    sharpened, P_t = softmax((t - center) / teacher_temperature); the student is P_s = softmax(s /
    student_temperature); each student crop learns every teacher crop but its own:

        L = 1 / #pairs x sum_{g in {1, 2}} sum_{v != g} mean_i H(P_t(i, g), P_s(i, v)),   H(a, b) = -sum_k a_k log b_k

    with #pairs = 2 (V - 1). The sum over pairs is one contraction over K ([2, V] cross-entropies at once) instead
    of the official loop's V - 1 passes per teacher crop (`dino_loss_reference` is that loop); the same value and
    gradient (tests/test_loss.py). The loss is a mean over this rank's images (the center is the global one).
    Returns a float32 scalar."""
    with full_precision(student):
        log_student = torch.log_softmax(at_least_float32(student) / student_temperature, dim=-1)  # [N, V, K]
        targets = torch.softmax((at_least_float32(teacher.detach()) - center) / teacher_temperature, dim=-1)
        cross = -torch.einsum("ngk,nvk->gv", targets, log_student) / len(student)  # [2, V]: mean_i H per pair
        views = student.shape[1]
        other = ~torch.eye(2, views, dtype=torch.bool, device=student.device)  # v != g
        return cross[other].sum() / (2 * (views - 1))


def dino_loss_reference(student, teacher, center, student_temperature=0.1, teacher_temperature=0.04):
    """`dino_loss` written as the official DINOLoss.forward loops: pair by pair, each an [N, K] cross-entropy."""
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


def mae_loss(pred, patches, mask, normalise_patches=True):
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
