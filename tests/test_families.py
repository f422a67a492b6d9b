"""families/: each self-supervised family's loss against its formula written out by hand (and its own reference
form), on one process and across two (gloo); their networks against their official codes' definitions."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from conftest import leave_spawned_worker
from families import byol, dino, mae, mocov3
from families.common import MomentumModel, sincos_position_embedding
from model import interpolate_pos_embed, vit_tiny
from util import checkpoints


def tiny_vit(**overrides):
    return vit_tiny(**{"image_size": 32, "depth": 2, **overrides})


# ---- the self-supervised families' networks (MoCo v3, BYOL, DINO, MAE) ----

def maes_sincos_embedding(width, grid):
    """MAE's util/pos_embed.py formula, written out with numpy: [g*g + 1, width], a zero row for the class token,
    then per patch (row-major) sin / cos of its column at width/4 frequencies, then of its row."""
    import numpy as np
    omega = 1.0 / 10000 ** (np.arange(width // 4) / (width / 4))
    rows = []
    for r in range(grid):
        for c in range(grid):
            rows.append(np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)]))
    return torch.from_numpy(np.concatenate([np.zeros((1, width)), np.stack(rows)])).float()


def test_sincos_position_embedding_is_maes_and_stays_untrained():
    torch.testing.assert_close(sincos_position_embedding(16, 3)[0], maes_sincos_embedding(16, 3))
    for init in (mocov3.init_vit, mae.init_vit):
        vit = init(tiny_vit())
        torch.testing.assert_close(vit.pos_embed[0], maes_sincos_embedding(192, 2))
        assert not vit.pos_embed.requires_grad


def test_mocov3_vit_is_xavier_with_split_qkv_and_a_frozen_random_patch_projection():
    torch.manual_seed(0)
    vit = mocov3.init_vit(vit_tiny(image_size=32, depth=4))
    qkv = torch.cat([block.attn.qkv.weight for block in vit.blocks]).flatten()  # q, k, v each 192 x 192
    bound = (6 / (192 + 192)) ** 0.5
    assert qkv.abs().max() <= bound and abs(qkv.std().item() - bound / 3 ** 0.5) < 0.01 * bound
    fc1 = torch.cat([block.mlp.fc1.weight.flatten() for block in vit.blocks])
    assert abs(fc1.std().item() - (2 / (192 + 768)) ** 0.5) < 0.01 * (2 / (192 + 768)) ** 0.5  # xavier
    assert not any(p.requires_grad for p in vit.patch_embed.parameters())
    assert vit.cls_token.abs().max() < 1e-4
    assert mocov3.init_vit(tiny_vit(), frozen_patch_embed=False).patch_embed.proj.weight.requires_grad


def test_momentum_network_starts_as_a_copy_and_follows_by_exponential_moving_average():
    torch.manual_seed(0)
    vit = tiny_vit()
    model = MomentumModel(vit, mocov3.mlp(3, 192, 32, 8), mocov3.mlp(2, 8, 32, 8))
    online, target = dict(model.named_parameters()), dict(model.momentum.named_parameters())
    assert all(torch.equal(online[name], value) and not value.requires_grad for name, value in target.items())
    before = {name: value.clone() for name, value in target.items()}
    with torch.no_grad():
        for value in model.visual.parameters():
            value.add_(torch.randn_like(value))
    model.update_momentum(0.9)
    for name, value in target.items():  # 0.9 x target + 0.1 x online
        torch.testing.assert_close(value, 0.9 * before[name] + 0.1 * online[name])
    out = model.train()(torch.randn(8, 3, 32, 32), views=2)
    assert out["online"].shape == out["target"].shape == (4, 2, 8) and not out["target"].requires_grad


def test_mocov3_and_byol_mlps_are_the_official_ones():
    projector, predictor = mocov3.mlp(3, 12, 20, 6), mocov3.mlp(2, 6, 20, 6)
    assert [type(m).__name__ for m in projector] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert all(m.bias is None for m in projector if isinstance(m, nn.Linear))  # bias-free Linears
    assert not projector[-1].affine and projector[1].affine and len(predictor) == 5 and not predictor[-1].affine
    byol_mlp = byol.mlp(12, 20, 6)
    assert [type(m).__name__ for m in byol_mlp] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert byol_mlp[0].bias is not None and byol_mlp[-1].out_features == 6


def test_dino_head_ends_in_unit_prototypes_whose_norm_is_not_trained():
    torch.manual_seed(0)
    head = dino.DINOHead(192, out_dim=50, hidden_dim=32, bottleneck_dim=8)
    last = head.last_layer
    assert not last.weight_g.requires_grad and last.weight_v.requires_grad
    x = torch.randn(4, 192)
    prototypes = last.weight_v / last.weight_v.norm(dim=1, keepdim=True)  # g = 1: unit rows
    torch.testing.assert_close(head(x), nn.functional.normalize(head.mlp(x), dim=-1) @ prototypes.T)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]


def test_dino_center_follows_the_teacher_mean_and_the_teacher_has_no_stochastic_depth():
    torch.manual_seed(0)
    model = dino.DINOModel(tiny_vit(drop_path_rate=0.1), dino.DINOHead(192, 20, 16, 8))
    assert model.visual.drop_path_rate == 0.1 and model.teacher["visual"].drop_path_rate == 0.0
    images, local = torch.randn(6, 3, 32, 32), torch.randn(12, 3, 16, 16)
    out = model.train()(images, views=2, local_images=local)
    assert out["student"].shape == (3, 6, 20) and out["teacher"].shape == (3, 2, 20)
    torch.testing.assert_close(out["center"], torch.zeros(1, 20))  # the loss gets the center before the update
    torch.testing.assert_close(model.center, 0.1 * out["teacher"].mean((0, 1))[None])  # 0.9 x 0 + 0.1 x mean
    model.eval()(images, views=2)
    torch.testing.assert_close(model.center, 0.1 * out["teacher"].mean((0, 1))[None])  # eval: no update


def test_stochastic_depth_drops_whole_branches_per_sample_from_the_given_noise():
    torch.manual_seed(0)
    vit = tiny_vit(drop_path_rate=0.5)
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(vit.eval()(images, drop_path_noise=torch.zeros(3, 4)), vit(images))  # eval: off
    # block 0's rate is 0; block 1's 0.5: noise below it drops both of block 1's branches, here for sample 0
    # only; samples 1 and 2 keep them, scaled by 1 / (1 - 0.5)
    noise = torch.ones(3, 4)
    noise[0, 2:] = 0.0
    out = vit.train()(images, drop_path_noise=noise)
    x = vit.blocks[0](vit.embed(images))
    torch.testing.assert_close(out[0], vit.norm(x[0, 0]))  # sample 0 skips block 1
    kept = vit.blocks[1](x[1:], class_token_only=True, keep=torch.full((2, 2), 2.0))
    torch.testing.assert_close(out[1:], vit.norm(kept[:, 0]))


def test_a_smaller_crop_gets_the_position_embedding_resized_without_antialiasing():
    torch.manual_seed(0)
    vit = tiny_vit(image_size=64)
    small = torch.randn(2, 3, 32, 32)
    resized = tiny_vit(image_size=32)
    resized.load_state_dict({**vit.state_dict(), "pos_embed": interpolate_pos_embed(vit.pos_embed, 2, False)})
    torch.testing.assert_close(vit(small), resized(small))


def test_mae_removes_three_quarters_of_the_patches_and_its_encoder_sees_the_rest():
    torch.manual_seed(0)
    vit = mae.init_vit(vit_tiny(image_size=64, depth=2))
    model = mae.MAEModel(vit, mae.MAEDecoder(192, 4, 16, decoder_width=32, depth=1, num_heads=2))
    images, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    out = model(images, noise=noise)
    assert out["pred"].shape == out["patches"].shape == (2, 16, 768)
    assert out["mask"].sum(1).tolist() == [12.0, 12.0]  # 75% of 16 patches removed
    kept = noise.argsort(1)[:, :4]  # the lowest noise is kept
    assert all(out["mask"][i, kept[i]].sum() == 0 for i in range(2))
    # the patches as MAE's patchify lays them out: (row, column) of patches, then (row, column, channel) inside
    official = images.reshape(2, 3, 4, 16, 4, 16).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 768)
    torch.testing.assert_close(out["patches"], official)
    # the encoder runs on the class token and the kept patches alone
    tokens = vit.embed(images)
    visible = torch.cat([tokens[:, :1], torch.stack([tokens[i, 1:][kept[i]] for i in range(2)])], dim=1)
    for block in vit.blocks:
        visible = block(visible)
    torch.testing.assert_close(vit.forward_tokens(images, keep=kept), vit.norm(visible))


def test_a_dino_checkpoint_gives_the_probes_its_teacher(tmp_path):
    torch.manual_seed(0)
    model = dino.DINOModel(tiny_vit(), dino.DINOHead(192, 20, 16, 8))
    with torch.no_grad():
        model.teacher["visual"].cls_token.fill_(3.0)  # the teacher differs from the student
    torch.save({"model": model.state_dict(), "args": {"model": "vit_tiny", "image_size": 32}}, tmp_path / "c.pth")
    encoder = checkpoints.load_encoder(str(tmp_path / "c.pth"))
    assert torch.equal(encoder.cls_token, model.teacher["visual"].cls_token)


# ---- the self-supervised families (MoCo v3, BYOL, DINO, MAE), each against its formula written out by hand ----

def family_inputs(seed, *shapes):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in shapes]


def looped_mocov3(queries, keys, temperature):
    """MoCo v3's ctr(q1, k2) + ctr(q2, k1), one query at a time: 2 tau x mean_i -log softmax_j(q_i.k_j / tau)_i."""
    q, k = F.normalize(queries, dim=-1), F.normalize(keys, dim=-1)
    total = q.new_zeros(())
    for view in (0, 1):
        for i in range(len(q)):
            logits = torch.stack([q[i, view] @ k[j, 1 - view] / temperature for j in range(len(k))])
            total = total - 2 * temperature * (logits[i] - torch.logsumexp(logits, 0)) / len(q)
    return total


def looped_byol(predictions, targets):
    """BYOL's L + L~: mean_i ||q_i / |q_i| - z'_j / |z'_j|||^2 over the two (view, other view) pairs."""
    total = predictions.new_zeros(())
    for i in range(len(predictions)):
        for view in (0, 1):
            q, z = predictions[i, view], targets[i, 1 - view]
            total = total + ((q / q.norm() - z / z.norm()) ** 2).sum() / len(predictions)
    return total


def looped_mae(pred, patches, mask, normalise):
    """MAE: mean over removed patches of the per-patch mean squared error, targets standardised per patch."""
    total, count = pred.new_zeros(()), 0
    for i in range(pred.shape[0]):
        for patch in range(pred.shape[1]):
            if mask[i, patch]:
                target = patches[i, patch]
                if normalise:
                    mean = target.sum() / len(target)
                    var = ((target - mean) ** 2).sum() / (len(target) - 1)  # unbiased, as torch.var
                    target = (target - mean) / (var + 1e-6) ** 0.5
                total = total + ((pred[i, patch] - target) ** 2).mean()
                count += 1
    return total / count


def assert_value_and_gradient(ours_fn, reference_fn, inputs, trained):
    """Both functions on clones of `inputs`: the same value, and the same gradient for the inputs in `trained`."""
    ours_inputs = [x.clone().requires_grad_(i in trained) for i, x in enumerate(inputs)]
    reference_inputs = [x.clone().requires_grad_(i in trained) for i, x in enumerate(inputs)]
    ours, reference = ours_fn(*ours_inputs), reference_fn(*reference_inputs)
    ours.backward()
    reference.backward()
    torch.testing.assert_close(ours.double(), reference, rtol=1e-10, atol=1e-12)
    for i in trained:
        torch.testing.assert_close(ours_inputs[i].grad, reference_inputs[i].grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_mocov3_loss_is_the_symmetrised_infonce_with_2_tau(temperature):
    queries, keys = family_inputs(20, (6, 2, 8), (6, 2, 8))
    assert_value_and_gradient(lambda q, k: mocov3.contrastive_loss(q, k, temperature),
                              lambda q, k: looped_mocov3(q, k, temperature), [queries, keys], trained={0})
    assert_value_and_gradient(lambda q, k: mocov3.contrastive_loss(q, k, temperature),
                              lambda q, k: mocov3.contrastive_loss_reference(q, k, temperature), [queries, keys],
                              trained={0})
    queries.requires_grad_(), keys.requires_grad_()
    mocov3.contrastive_loss(queries, keys, temperature).backward()
    assert keys.grad is None  # the keys are the momentum encoder's: no gradient reaches them


def test_byol_loss_is_the_symmetrised_normalised_regression():
    predictions, targets = family_inputs(21, (5, 2, 8), (5, 2, 8))
    assert_value_and_gradient(byol.regression_loss, looped_byol, [predictions, targets], trained={0})
    assert_value_and_gradient(byol.regression_loss, byol.regression_loss_reference, [predictions, targets],
                              trained={0})
    same = F.normalize(predictions, dim=-1)  # a prediction equal to the other view's target: loss 0
    torch.testing.assert_close(byol.regression_loss(same, same.flip(1)), torch.tensor(0.0, dtype=torch.float64))


@pytest.mark.parametrize("views", [2, 5])
def test_dino_loss_is_the_official_loop_and_never_pairs_a_crop_with_itself(views):
    student, teacher, center = family_inputs(22, (4, views, 16), (4, 2, 16), (1, 16))
    assert_value_and_gradient(lambda s, t, c: dino.distillation_loss(s, t, c, 0.1, 0.04),
                              lambda s, t, c: dino.distillation_loss_reference(s, t, c, 0.1, 0.04),
                              [student, teacher, center], trained={0})
    # hand-computed: with V = 2 the loss is the mean of H(P_t(crop 1), P_s(crop 2)) and H(P_t(crop 2), P_s(crop 1))
    if views == 2:
        p_teacher = torch.softmax((teacher - center) / 0.04, dim=-1)
        log_student = torch.log_softmax(student / 0.1, dim=-1)
        by_hand = -((p_teacher[:, 0] * log_student[:, 1]).sum(-1).mean()
                    + (p_teacher[:, 1] * log_student[:, 0]).sum(-1).mean()) / 2
        torch.testing.assert_close(dino.distillation_loss(student, teacher, center, 0.1, 0.04), by_hand)


@pytest.mark.parametrize("normalise", [True, False])
def test_mae_loss_is_the_mean_squared_error_on_removed_patches(normalise):
    pred, patches = family_inputs(23, (3, 8, 12), (3, 8, 12))
    mask = torch.zeros(3, 8)
    mask[:, :6] = 1
    mask = mask[:, torch.randperm(8, generator=torch.Generator().manual_seed(1))]
    assert_value_and_gradient(lambda p, t, m: mae.reconstruction_loss(p, t, m, normalise),
                              lambda p, t, m: looped_mae(p, t, m, normalise), [pred, patches, mask], trained={0})
    assert_value_and_gradient(lambda p, t, m: mae.reconstruction_loss(p, t, m, normalise),
                              lambda p, t, m: mae.reconstruction_loss_reference(p, t, m, normalise),
                              [pred, patches, mask], trained={0})


def _family_losses(dtype):
    """Each family's loss on float32 inputs, inside autocast(dtype) or outside it (dtype None): values and the
    gradients of the trained input."""
    mask = (torch.arange(16) % 4 != 0).float().repeat(8, 1)
    cases = [(lambda q, k: mocov3.contrastive_loss(q, k, 0.2), [(8, 2, 32), (8, 2, 32)]),
             (byol.regression_loss, [(8, 2, 32), (8, 2, 32)]),
             (lambda s, t, c: dino.distillation_loss(s, t, c, 0.1, 0.04), [(8, 4, 64), (8, 2, 64), (1, 64)]),
             (lambda p, t: mae.reconstruction_loss(p, t, mask), [(8, 16, 48), (8, 16, 48)])]
    results = []
    for seed, (fn, shapes) in enumerate(cases):
        leaves = [x.float().requires_grad_() for x in family_inputs(24 + seed, *shapes)]
        context = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
        with context:
            loss = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), leaves[0].grad))
    return results


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_family_losses_are_float32_inside_autocast(autocast_dtype):
    for (loss, grad), (reference, reference_grad) in zip(_family_losses(autocast_dtype), _family_losses(None)):
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, reference, rtol=0, atol=1e-5)
        assert (grad - reference_grad).norm() <= 1e-4 * reference_grad.norm()


def _mocov3_rank_worker(rank, world_size, store_path, queries, keys, result_path):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    per_rank = len(queries) // world_size
    local = queries[rank * per_rank:(rank + 1) * per_rank].clone().requires_grad_()
    loss = mocov3.contrastive_loss(local, keys[rank * per_rank:(rank + 1) * per_rank], 0.2)
    loss.backward()
    torch.save({"loss": loss.detach().clone(), "grad": local.grad.clone()}, f"{result_path}.{rank}")
    leave_spawned_worker()


@pytest.mark.slow
def test_mocov3_keys_are_gathered_so_two_processes_match_one(tmp_path):
    """Each rank's queries against the keys of both ranks: DDP's average of the two ranks' losses and gradients is
    the one-process loss of the whole batch."""
    queries, keys = family_inputs(25, (8, 2, 8), (8, 2, 8))
    mp.spawn(_mocov3_rank_worker, args=(2, str(tmp_path / "store"), queries, keys, str(tmp_path / "out")),
             nprocs=2, join=True)
    results = [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]
    whole = queries.clone().requires_grad_()
    loss = mocov3.contrastive_loss(whole, keys, 0.2)
    loss.backward()
    torch.testing.assert_close(sum(r["loss"] for r in results) / 2, loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([r["grad"] for r in results]) / 2, whole.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("total, warmup", [(100, 10), (37, 1), (20, 0)])
def test_dino_learning_rate_is_main_dinos_cosine_scheduler(total, warmup):
    """utils.cosine_scheduler(lr, min_lr 1e-6, ...) written out: np.linspace(0, lr, W) over the warmup iterations,
    then final + (base - final) (1 + cos(pi i / len)) / 2 over the remaining ones."""
    import numpy as np
    peak = 5e-4 * 1024 / 256
    warmup_part = np.linspace(0, peak, warmup)
    iters = np.arange(total - warmup)
    cosine_part = 1e-6 + 0.5 * (peak - 1e-6) * (1 + np.cos(np.pi * iters / len(iters)))
    official = np.concatenate((warmup_part, cosine_part))
    ours = [dino.learning_rate(step, total, warmup, peak) for step in range(total)]
    np.testing.assert_allclose(ours, official, rtol=1e-12, atol=0)
