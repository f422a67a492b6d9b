"""loss.py against an explicitly looped Eq. 2-4, on one process and across two (gloo)."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import leave_spawned_worker
from loss import (
    image_text_loss,
    multi_positive_loss,
    multi_positive_loss_reference,
)


def looped_loss(features, labels, temperature):
    """Eq. 2-4 written as the paper states them, one anchor and one candidate at a time, in float64."""
    z = features.double()
    n = len(z)
    total = z.new_zeros(())
    for i in range(n):
        others = [k for k in range(n) if k != i]
        normaliser = torch.logsumexp(torch.stack([z[i] @ z[k] / temperature for k in others]), 0)
        positives = [j for j in others if labels[j] == labels[i]]
        for j in positives:
            log_q = z[i] @ z[j] / temperature - normaliser  # Eq. 2
            p = 1.0 / len(positives)  # Eq. 3
            total = total - p * log_q  # Eq. 4 (anchors without positives add nothing)
    return total / n


def random_batch(labels, dim=8, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(len(labels), dim, generator=generator, dtype=dtype), dim=1)
    return features, torch.tensor(labels)


@pytest.mark.parametrize("labels", [
    [0, 0, 1, 1, 2, 2],  # even groups of two
    [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3],  # uneven group sizes
    [5, 5, 5, 9, 9, 7, 1, 1],  # an anchor (7) with no positive
    [3, 3, 3, 3],  # one caption only: no negatives at all
])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_matches_looped_equations_value_and_gradient(labels, temperature):
    features, labels = random_batch(labels)
    ours_input = features.clone().requires_grad_()
    ref_input = features.clone().requires_grad_()
    ours = multi_positive_loss(ours_input, labels, temperature)
    ref = looped_loss(ref_input, labels, temperature)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours_input.grad, ref_input.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 2, 2], [5, 5, 5, 9, 9, 7, 1, 1], [3, 3, 3, 3]])
def test_the_literal_reference_is_the_looped_equations_and_the_fast_loss(labels):
    """loss.py's two implementations: the literal Eq. 2-4 and the one training uses give one value and gradient."""
    features, labels = random_batch(labels, seed=9)
    inputs = [features.clone().requires_grad_() for _ in range(3)]
    losses = [multi_positive_loss_reference(inputs[0], labels, 0.2), multi_positive_loss(inputs[1], labels, 0.2),
              looped_loss(inputs[2], labels, 0.2)]
    for loss in losses:
        loss.backward()
    for loss, x in zip(losses[1:], inputs[1:]):
        torch.testing.assert_close(loss, losses[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(x.grad, inputs[0].grad, rtol=1e-9, atol=1e-12)


def test_invariant_to_permuting_the_batch():
    features, labels = random_batch([0, 0, 0, 1, 1, 2, 2, 2, 2, 3], seed=1)
    permutation = torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(multi_positive_loss(features, labels),
                               multi_positive_loss(features[permutation], labels[permutation]))


def test_invariant_to_renaming_captions():
    features, labels = random_batch([0, 0, 1, 1, 1, 2, 2], seed=2)
    torch.testing.assert_close(multi_positive_loss(features, labels), multi_positive_loss(features, labels * 1000 + 7))


def test_simclr_is_two_crops_per_caption():
    """SimCLR's NT-Xent: 2B views, each view's positive is the other crop of its image, all else negatives."""
    batch, temperature = 6, 0.2
    generator = torch.Generator().manual_seed(4)
    crop1 = F.normalize(torch.randn(batch, 16, generator=generator, dtype=torch.float64), dim=1)
    crop2 = F.normalize(torch.randn(batch, 16, generator=generator, dtype=torch.float64), dim=1)
    views = torch.cat([crop1, crop2])  # [2B, D]
    logits = views @ views.T / temperature
    logits.fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])
    nt_xent = F.cross_entropy(logits, partner)
    image_ids = torch.arange(batch).repeat(2)  # each "caption" is one image, seen in two crops
    torch.testing.assert_close(multi_positive_loss(views, image_ids, temperature), nt_xent)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    features, labels = random_batch([0, 0, 1, 1, 2, 2, 2, 3], dim=32, dtype=torch.float32)
    half = features.to(dtype).requires_grad_()
    loss = multi_positive_loss(half, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and half.grad.dtype == dtype
    torch.testing.assert_close(loss, looped_loss(half.detach(), labels, 0.1).float(), rtol=1e-5, atol=1e-5)


def test_large_logits_do_not_overflow():
    """tau = 1e-3 puts logits near 1000, where exp overflows even float64; the loss must stay exact."""
    features, labels = random_batch([0, 0, 1, 1, 2, 2], dtype=torch.float32)
    features.requires_grad_()
    loss = multi_positive_loss(features, labels, temperature=1e-3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(features.grad).all()
    torch.testing.assert_close(loss.double(), looped_loss(features.detach(), labels, 1e-3), rtol=1e-5, atol=1e-3)


def test_anchor_without_positive_contributes_zero_and_no_nan():
    features, labels = random_batch([0, 0, 1, 2, 2], seed=5)
    features.requires_grad_()
    loss = multi_positive_loss(features, labels)
    loss.backward()
    assert torch.isfinite(features.grad).all()
    # the lone anchor (index 2) adds 0 to the sum, which still averages over all 5 anchors
    others = looped_loss(features.detach(), labels, 0.1) * 5
    torch.testing.assert_close(loss * 5, others)


def test_rejects_a_single_image_and_bad_shapes():
    with pytest.raises(ValueError, match="at least two"):
        multi_positive_loss(torch.ones(1, 4), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="expected features"):
        multi_positive_loss(torch.ones(4, 4), torch.zeros(3, dtype=torch.long))


# ---- distributed equivalence: two gloo processes, each with half the batch ----

def _rank_loss_and_gradient(rank, world_size, features, labels):
    per_rank = len(labels) // world_size
    local = features[rank * per_rank:(rank + 1) * per_rank].clone().requires_grad_()
    loss = multi_positive_loss(local, labels[rank * per_rank:(rank + 1) * per_rank])
    loss.backward()
    return {"loss": loss.detach().clone(), "grad": local.grad.clone()}


def _two_rank_worker(rank, world_size, store_path, features, labels, result_path):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    torch.save(_rank_loss_and_gradient(rank, world_size, features, labels), f"{result_path}.{rank}")
    leave_spawned_worker()


@pytest.mark.slow
@pytest.mark.parametrize("labels", [
    [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3],  # captions split across the two ranks
    [0, 4, 0, 1, 1, 2, 2, 2, 5, 3, 3, 3],  # uneven groups, and lone anchors (4, 5)
])
def test_two_processes_match_one_process(tmp_path, labels):
    features, labels = random_batch(labels, seed=6)
    world_size = 2
    mp.spawn(_two_rank_worker, args=(world_size, str(tmp_path / "store"), features, labels, str(tmp_path / "out")),
             nprocs=world_size, join=True)
    results = [torch.load(tmp_path / f"out.{rank}") for rank in range(world_size)]

    whole = features.clone().requires_grad_()
    loss = multi_positive_loss(whole, labels)
    loss.backward()
    # DDP averages over ranks: the mean of the per-rank losses, and each rank's gradient divided by world_size
    torch.testing.assert_close(sum(r["loss"] for r in results) / world_size, loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([r["grad"] for r in results]) / world_size, whole.grad,
                               rtol=1e-9, atol=1e-12)



# ---- precision: the losses compute in float32 whatever autocast says ----

def near_converged_batch(captions=43, images=6, dim=256, seed=7):
    """The regime where bf16 hurts most: each caption's images close together (the loss is nearly minimal)."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(captions, dim, generator=generator), dim=1)
    noise = 0.05 * torch.randn(captions * images, dim, generator=generator)
    labels = torch.arange(captions).repeat_interleave(images)
    return F.normalize(centres.repeat_interleave(images, 0) + noise, dim=1), labels


def _loss_and_gradients(loss_fn, inputs, autocast_dtype, backward_inside):
    leaves = [x.clone().requires_grad_() for x in inputs]
    context = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
    with context:
        loss = loss_fn(*leaves)
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    return loss.detach(), [x.grad for x in leaves]


def _multi_positive(features):
    return multi_positive_loss(features, near_converged_batch()[1])


def _image_text(images, texts, log_scale):
    captions = torch.arange(len(texts))
    return image_text_loss(images, texts, captions.repeat_interleave(len(images) // len(texts)), captions,
                           log_scale.exp())


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("which, backward_inside", [
    ("multi_positive", False),  # pretrain.py's use: forward under autocast, backward after it
    ("multi_positive", True),  # the hand-written backward switches autocast off itself
    ("image_text", False),  # autograd's own backward (torch documents backward under autocast as unsupported)
])
def test_losses_are_float32_inside_autocast(which, backward_inside, autocast_dtype):
    """Near-converged embeddings, 43 captions x 6 images, d = 256: the pre-fix code was off by 1e-3 (bf16) in
    value and 4% in gradient here; the loss must match float32 to 1e-5 and its gradient to 1e-4 relative."""
    features, _ = near_converged_batch()
    if which == "multi_positive":
        loss_fn, inputs = _multi_positive, [features]
    else:
        texts = F.normalize(torch.randn(43, 256, generator=torch.Generator().manual_seed(8)), dim=1)
        loss_fn, inputs = _image_text, [features, texts, torch.tensor(2.659)]
    reference, reference_grads = _loss_and_gradients(loss_fn, inputs, None, False)
    loss, grads = _loss_and_gradients(loss_fn, inputs, autocast_dtype, backward_inside)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-5)
    for grad, reference_grad in zip(grads, reference_grads):
        assert (grad - reference_grad).norm() <= 1e-4 * reference_grad.norm()


# ---- the image-text loss (CLIP, StableRep+) ----

def test_image_text_loss_with_one_image_per_caption_is_clips():
    generator = torch.Generator().manual_seed(10)
    images = F.normalize(torch.randn(6, 16, generator=generator, dtype=torch.float64), dim=1)
    texts = F.normalize(torch.randn(6, 16, generator=generator, dtype=torch.float64), dim=1)
    scale = torch.tensor(14.3, dtype=torch.float64)
    logits = scale * images @ texts.T
    clip = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    torch.testing.assert_close(image_text_loss(images, texts, torch.arange(6), torch.arange(6), scale), clip)


def test_image_text_loss_spreads_text_to_image_over_the_captions_images():
    """m = 3 images per caption: image -> text targets its caption's text; text -> image is uniform over the 3."""
    generator = torch.Generator().manual_seed(11)
    images = F.normalize(torch.randn(12, 16, generator=generator, dtype=torch.float64), dim=1)
    texts = F.normalize(torch.randn(4, 16, generator=generator, dtype=torch.float64), dim=1)
    image_captions, scale = torch.arange(4).repeat_interleave(3), torch.tensor(10.0, dtype=torch.float64)
    image_to_text = F.cross_entropy(scale * images @ texts.T, image_captions)
    uniform = (torch.arange(4)[:, None] == image_captions[None, :]).double() / 3  # [texts, images]
    text_to_image = -(uniform * torch.log_softmax(scale * texts @ images.T, dim=1)).sum(1).mean()
    torch.testing.assert_close(image_text_loss(images, texts, image_captions, torch.arange(4), scale),
                               (image_to_text + text_to_image) / 2)
