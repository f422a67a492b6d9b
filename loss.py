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


