"""pretrain.py: the four objectives learn, torchrun with gloo, exact resume after a kill, every bad input."""
import argparse
import contextlib
import glob
import io
import json
import math
import os
import pty
import re
import shutil
import signal
import subprocess
import traceback
from types import SimpleNamespace

import pytest
import torch

import augment
import pretrain
from conftest import (
    assert_one_line_error,
    read_terminal,
    run_python,
    run_python_with_file_size_limit,
    signal_when,
    start_python,
    write_random_tree,
)
from data import CaptionImagesDataset, collate
from families import dino
from families.common import cosine_schedule
from util import checkpoints, files, resume
from util.checkpoints import load_encoder
from util.cli import UserError, parse_command_line, run
from util.official import continue_official

ENCODER_TINY = ["--model", "vit_tiny", "--depth", "2", "--image-size", "32", "--workers", "0", "--log-every", "1"]
HEAD_TINY = ["--head-hidden-dim", "64", "--embed-dim", "32"]
TEXT_TINY = ["--text-width", "32", "--text-layers", "1", "--text-heads", "2", "--context-length", "40"]


def tiny(loss="stablerep"):
    """The small model's flags for `loss`: only those it reads (any other is refused)."""
    read = pretrain.flags_read(pretrain.OBJECTIVES[loss])
    return [*ENCODER_TINY, *(HEAD_TINY if "embed_dim" in read else []), *(TEXT_TINY if "text_width" in read else [])]


TINY = tiny()  # StableRep's (the default --loss)
# the families' own parts, as small (DINO: 2 local crops of 16 px, one patch each)
FAMILY_TINY = {"dino": ["--out-dim", "64", "--local-crops", "2", "--local-crop-size", "16"],
               "mae": ["--decoder-width", "32", "--decoder-depth", "1", "--decoder-heads", "2"]}



def read_resume(argv):
    """pretrain.py's --resume reading on this command line: the checkpoint to continue, args given its recipe."""
    parser = pretrain.get_args_parser()
    return resume.read_resume_checkpoint(parser.parse_args(argv), parser, pretrain.RESUMABLE_FLAGS,
                                         pretrain.NEVER_RESTORED)

def run_pretrain(*args, check=True):
    """pretrain.py's command: as a subprocess, or, for one that is to be refused (check=False) and starts no loader
    workers, in this process (a refusal then costs a fraction of a second, not the subprocess's imports)."""
    if not check and not workers_started(args):
        return pretrain_in_process(*args)
    result = run_python("pretrain.py", *args)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def workers_started(args):
    """Does the command start loader workers (whose output a process of its own keeps)?"""
    argv = [str(a) for a in args]
    return "--workers" not in argv or argv[len(argv) - 1 - argv[::-1].index("--workers") + 1] != "0"


def pretrain_in_process(*args):
    """pretrain.py's command in this process, through util.cli.run as `python pretrain.py` runs it: its exit code and
    what it printed (a traceback included), as run_python returns them."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run(pretrain.main, pretrain.get_args_parser(), [str(a) for a in args])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except Exception:  # what a subprocess would print as a traceback
            traceback.print_exc()
            code = 1
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_defaults_are_the_papers_recipe():
    args = pretrain.fill_recipe(pretrain.get_args_parser().parse_args(["--data", "x"]))
    assert (args.model, args.image_size, args.loss, args.temperature) == ("vit_base", 224, "stablerep", 0.1)
    assert (args.captions_per_gpu, args.base_lr, args.weight_decay, tuple(args.betas)) == (43, 2e-4, 0.1, (0.9, 0.98))
    assert (args.head_hidden_dim, args.embed_dim, args.schedule, args.head_batchnorm) == (
        4096, 256, "cc12m-1x", "per-view")
    assert (args.epochs, args.warmup_epochs, tuple(args.crop_scale)) == (15, 0.5, (0.08, 1.0))
    views = {name: (o.images_per_caption, o.crops_per_image) for name, o in pretrain.OBJECTIVES.items()}
    assert views == {"stablerep": (6, 1), "simclr": (1, 2), "clip": (1, 1), "stablerep+": (6, 1),
                     "mocov3": (1, 2), "byol": (1, 2), "dino": (1, 2), "mae": (1, 1)}
    # downsampling off (the official README's table scores it lower), the official command's resolutions at hand
    assert (args.downsample_prob, tuple(args.downsample_res), args.gpu_augment) == (0.0, (64, 128), False)


def test_learning_rate_is_the_official_rule():
    """main_stablerep.py: blr x (captions per GPU x GPUs) x n_img / 256 x num_crop / 2."""
    def official(blr, captions_per_gpu, gpus, n_img, num_crop):
        return blr * captions_per_gpu * gpus * n_img / 256 * num_crop / 2

    for name in ("stablerep", "simclr", "clip", "stablerep+"):
        m, c = pretrain.OBJECTIVES[name].images_per_caption, pretrain.OBJECTIVES[name].crops_per_image
        assert math.isclose(pretrain.scaled_lr(2e-4, 43 * 32 * m * c), official(2e-4, 43, 32, m, c))
        lr, _ = pretrain.objective_lr(pretrain.OBJECTIVES[name], 2e-4, 43 * 32 * m * c, c)
        assert math.isclose(lr, official(2e-4, 43, 32, m, c))
    assert math.isclose(pretrain.scaled_lr(2e-4, 8256), 3.225e-3)


def test_schedules_are_the_official_readmes():
    assert pretrain.SCHEDULES == {"cc12m-1x": (15, 0.5), "cc12m-2x": (31, 1.0), "cc12m-3x": (46, 1.5),
                                  "redcaps-1x": (13, 0.45), "redcaps-2x": (27, 0.9), "redcaps-3x": (40, 1.35)}


def official_lr(lr, epoch, warmup_epochs, epochs, min_lr=0.0):
    """util/misc.py adjust_learning_rate, called with `data_iter_step / len(data_loader) + epoch`."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def test_the_learning_rate_is_the_official_schedule_at_every_step():
    epochs, warmup = pretrain.SCHEDULES["cc12m-1x"]
    steps_per_epoch = -(-12_423_374 // 32) // 43  # CC12M's captions, 43 per GPU x 32 GPUs (the official loader)
    total = epochs * steps_per_epoch
    warmup_steps = warmup * steps_per_epoch
    points = [0, 1, 2, 100, 4000, 4512, 4513, 4514, 4515, 5000, 9027, 9028, 20000, 67709, 67710, 100000,
              120000, 135000, total - 2, total - 1]
    assert len(set(points)) == 20 and max(points) < total and (steps_per_epoch, warmup_steps) == (9028, 4514.0)
    for step in points:
        ours = pretrain.cosine_lr(step, total, warmup_steps, 3.225e-3)
        official = official_lr(3.225e-3, step / steps_per_epoch, warmup, epochs)
        assert math.isclose(ours, official, rel_tol=1e-12, abs_tol=1e-18), (step, ours, official)
    assert pretrain.cosine_lr(0, total, warmup_steps, 1.0) == 0.0  # step 0 changes only AdamW's moments
    # no warmup: the cosine starts at the peak on step 0 (the old code forced one warmup step)
    assert pretrain.cosine_lr(0, 10, 0.0, 1.0) == 1.0 == official_lr(1.0, 0.0, 0.0, 10)


@pytest.mark.slow
@pytest.mark.parametrize("loss", list(pretrain.OBJECTIVES))
def test_each_objective_drives_its_loss_down_on_a_fixed_batch(loss, random_tree, tiny_tokenizer):
    args = pretrain.fill_recipe(pretrain.get_args_parser().parse_args(["--data", random_tree, "--loss", loss,
                                                                       *tiny(loss), *FAMILY_TINY.get(loss, [])]))
    m, c = pretrain.OBJECTIVES[loss].images_per_caption, pretrain.OBJECTIVES[loss].crops_per_image
    m = min(m, 3)
    tokenizer = tiny_tokenizer if loss in ("clip", "stablerep+") else None
    dataset = CaptionImagesDataset([random_tree], m, c, 32, tokenizer=tokenizer, context_length=40,
                                   **pretrain.family_crops(args))
    batch = collate([dataset[i] for i in range(6)])
    torch.manual_seed(0)
    model = pretrain.build_model(args, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    losses = []
    for _ in range(40):
        value, _ = pretrain.compute_loss(model, batch, pretrain.OBJECTIVES[loss], args, torch.device("cpu"))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize("loss", [name for name in pretrain.OBJECTIVES if name not in pretrain.FAMILIES])
def test_each_objective_runs_the_script(loss, generated_tree, tiny_sd_folder, tmp_path):
    """(The self-supervised families run the script in test_each_family_resumes_exactly_and_runs_on_two_processes.)"""
    m = {"stablerep": ["--images-per-caption", "2"], "stablerep+": ["--images-per-caption", "2"]}.get(loss, [])
    text = ["--tokenizer", tiny_sd_folder] if pretrain.OBJECTIVES[loss].text else []
    run_pretrain("--data", generated_tree, "--output", str(tmp_path), "--loss", loss, *text, "--epochs", "1",
                 "--captions-per-gpu", "4", *m, *tiny(loss), *FAMILY_TINY.get(loss, []))
    summary = (tmp_path / "summary.json").read_text()
    assert '"steps": 3' in summary
    encoder = load_encoder(str(tmp_path / "encoder.pth"))
    assert encoder(torch.zeros(1, 3, 32, 32)).shape == (1, 192)


# ---- the self-supervised families of the paper's first question: MoCo v3, BYOL, DINO, MAE ----

def test_the_parser_offers_every_objective_of_the_table():
    """--loss's choices are read before torch loads (OBJECTIVE_NAMES); the table below the imports has the same rows."""
    assert pretrain.OBJECTIVE_NAMES == tuple(pretrain.OBJECTIVES)
    assert set(pretrain.FAMILIES) <= set(pretrain.OBJECTIVES)


def test_families_default_to_their_official_recipes():
    parse = pretrain.get_args_parser().parse_args
    recipes = {loss: vars(pretrain.fill_recipe(parse(["--data", "x", "--loss", loss]))) for loss in pretrain.FAMILIES}
    # MoCo v3 ViT-B (CONFIG.md, main_moco.py): lr 1.5e-4 x batch / 256, wd 0.1, 300 epochs, 40 warmup, T 0.2,
    # m 0.99, the random patch projection frozen, MLP 4096 -> 256, crop-min 0.08, AdamW's default betas
    expected = {"mocov3": dict(base_lr=1.5e-4, weight_decay=0.1, epochs=300, warmup_epochs=40, temperature=0.2,
                               momentum=0.99, frozen_patch_embed=True, head_hidden_dim=4096, embed_dim=256,
                               crop_scale=(0.08, 1.0), betas=(0.9, 0.999), captions_per_gpu=64),
                # BYOL: tau 0.996, MLPs 4096 -> 256
                "byol": dict(momentum=0.996, head_hidden_dim=4096, embed_dim=256, crop_scale=(0.08, 1.0)),
                # DINO (main_dino.py): lr 5e-4, wd 0.04 -> 0.4, 100 epochs, 10 warmup, student 0.1, teacher 0.04,
                # m 0.996, head 2048 -> 256 -> 65536, clip 3, last layer frozen 1 epoch, drop path 0.1, global
                # crops 0.4-1, 8 local crops of 96 px at 0.05-0.4, batch 64 a GPU
                "dino": dict(base_lr=5e-4, weight_decay=0.04, weight_decay_end=0.4, epochs=100, warmup_epochs=10,
                             temperature=0.1, teacher_temperature=0.04, warmup_teacher_temperature=0.04,
                             warmup_teacher_temperature_epochs=0, momentum=0.996, head_hidden_dim=2048,
                             embed_dim=256, out_dim=65536, clip_grad=3.0, freeze_last_layer=1, drop_path=0.1,
                             crop_scale=(0.4, 1.0), local_crops=8, local_crop_scale=(0.05, 0.4),
                             local_crop_size=96, captions_per_gpu=64),
                # MAE (PRETRAIN.md, main_pretrain.py): blr 1.5e-4, wd 0.05, betas (0.9, 0.95), 800 epochs, 40
                # warmup, mask 0.75, normalised pixels, decoder 512 x 8 blocks x 16 heads, crop 0.2-1
                "mae": dict(base_lr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), epochs=800, warmup_epochs=40,
                            mask_ratio=0.75, norm_pix_loss=True, decoder_width=512, decoder_depth=8,
                            decoder_heads=16, crop_scale=(0.2, 1.0), captions_per_gpu=64)}
    for loss, values in expected.items():
        assert {key: recipes[loss][key] for key in values} == values, loss
        assert recipes[loss]["images_per_caption"] == 1 and recipes[loss]["schedule"] is None
    # the linear scaling rule over images, not crops: MoCo v3's 4096 images x 2 crops -> 1.5e-4 x 4096 / 256
    lr, _ = pretrain.objective_lr(pretrain.OBJECTIVES["mocov3"], 1.5e-4, 4096 * 2, 2)
    assert math.isclose(lr, 2.4e-3)
    assert [recipes[loss]["base_lr"] for loss in ("mocov3", "byol", "dino", "mae")] == [1.5e-4, 1.5e-4, 5e-4, 1.5e-4]


def test_schedules_are_the_official_formulas():
    """MoCo v3's adjust_moco_momentum, DINO's (and BYOL's) cosine_scheduler from the start value to 1, and DINO's
    teacher temperature: np.linspace over the warmup epochs, then constant."""
    import numpy as np
    total, epochs = 40, 10
    for step in range(total):
        epoch = step / (total / epochs)  # MoCo v3's fractional epoch
        moco = 1 - 0.5 * (1 + math.cos(math.pi * epoch / epochs)) * (1 - 0.99)
        assert math.isclose(cosine_schedule(0.99, 1.0, step, total), moco)
    dinos = 1 + 0.5 * (0.996 - 1) * (1 + np.cos(np.pi * np.arange(total) / total))
    np.testing.assert_allclose([cosine_schedule(0.996, 1.0, s, total) for s in range(total)], dinos)
    args = pretrain.get_args_parser().parse_args(["--data", "x", "--loss", "dino", "--warmup-teacher-temperature",
                                                  "0.04", "--teacher-temperature", "0.07",
                                                  "--warmup-teacher-temperature-epochs", "4"])
    pretrain.fill_recipe(args)
    official = np.concatenate([np.linspace(0.04, 0.07, 4), np.ones(6) * 0.07])
    model, optimizer = SimpleNamespace(), torch.optim.AdamW([{"params": [torch.zeros(1, requires_grad=True)]}])
    for epoch in range(10):
        dino.schedules(model, optimizer, pretrain.StepPosition(epoch * 4 + 1, 4, 40), args)
        assert math.isclose(model.teacher_temperature, official[epoch])
    assert math.isclose(optimizer.param_groups[0]["weight_decay"], cosine_schedule(0.04, 0.4, 37, 40))


def test_dino_clips_each_gradient_on_its_own_and_freezes_the_last_layer_early():
    args = pretrain.fill_recipe(pretrain.get_args_parser().parse_args(["--data", "x", "--loss", "dino", *tiny("dino"),
                                                                       *FAMILY_TINY["dino"]]))
    model = pretrain.build_model(args)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.full_like(parameter, 0.5)
    norms = {name: p.grad.norm().item() for name, p in model.named_parameters() if p.grad is not None}
    dino.clip_and_cancel_gradients(model, None, pretrain.StepPosition(0, 3, 30), args)  # epoch 0 < --freeze-last-layer
    assert model.head.last_layer.weight_v.grad is None
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:  # clipped to norm 3 one by one (DINO's clip_gradients), or left alone
            expected = min(norms[name], 3.0 * norms[name] / (norms[name] + 1e-6))
            assert math.isclose(parameter.grad.norm().item(), expected, rel_tol=1e-4), name
    model.head.last_layer.weight_v.grad = torch.ones_like(model.head.last_layer.weight_v)
    dino.clip_and_cancel_gradients(model, None, pretrain.StepPosition(3, 3, 30), args)  # epoch 1: trained
    assert model.head.last_layer.weight_v.grad is not None


@pytest.mark.parametrize("loss", list(pretrain.OBJECTIVES))
def test_every_flag_the_objective_does_not_read_is_refused_when_typed(loss):
    """Each objective-dependent flag typed for an objective that does not read it: one line naming it; one it reads
    passes; a resumed run's recorded settings (a flag the user never typed) are never blamed."""
    parser = pretrain.get_args_parser()
    read = pretrain.flags_read(pretrain.OBJECTIVES[loss])
    for key in sorted(pretrain.OBJECTIVE_FLAGS):
        action = next(a for a in parser._actions if a.dest == key)
        flag = action.option_strings[0]
        if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
            argv = [flag]
        elif action.choices:
            argv = [flag, action.choices[-1]]
        elif action.nargs == 2:
            argv = [flag, "0.2", "0.5"]
        else:  # a value the flag takes
            argv = [flag, "x"]
            for text in ("2", "16", "0.5") if action.type else ():
                try:
                    argv = [flag, str(action.type(text))]
                    break
                except argparse.ArgumentTypeError:
                    pass
        args = parse_command_line(parser, ["--data", "x", "--loss", loss, *argv])
        if key in read:
            pretrain.check_family_flags(args)
        else:
            with pytest.raises(UserError, match=f"{flag} is .*: it does nothing for --loss {re.escape(loss)}$"):
                pretrain.check_family_flags(args)
    recorded = parse_command_line(parser, ["--data", "x", "--resume", "r.pth", "--output", "o"])
    vars(recorded).update(vars(pretrain.fill_recipe(parser.parse_args(["--data", "x", "--loss", loss]))),
                          resume="r.pth", flags_given=["resume", "output"])
    pretrain.check_family_flags(recorded)  # a run's own settings, whatever its loss
    recorded.flags_given.append("temperature" if "temperature" not in read else "decoder_width")  # one it ignores
    with pytest.raises(UserError, match="the loss the resumed checkpoint records"):
        pretrain.check_family_flags(recorded)


def test_every_findings_config_is_a_command_line_pretrain_accepts():
    from experiments.findings import BLUR, CONFIGS, ENCODER
    for name, spec in CONFIGS.items():
        if spec is None:  # raw pixels, random init: nothing trained
            continue
        args = parse_command_line(pretrain.get_args_parser(), ["--data", "x", "--loss", spec["loss"], *ENCODER, *BLUR,
                                                               *spec["flags"]])
        pretrain.check_family_flags(args)  # a flag the objective does not read is refused here
        assert args.image_size % args.patch_size == 0, name


@pytest.mark.slow
def test_family_flags_are_refused_where_they_do_nothing(random_tree, tmp_path):
    out = ["--data", random_tree, "--output", str(tmp_path / "o")]
    for argv, message in ((["--mask-ratio", "0.5"], "--mask-ratio is mae's: it does nothing for --loss stablerep"),
                          (["--loss", "dino", "--momentum", "0.9", "--decoder-depth", "2"], "--decoder-depth is mae's"),
                          (["--loss", "byol", "--schedule", "cc12m-1x"], "--schedule names the official StableRep"),
                          (["--loss", "mocov3", "--images-per-caption", "2"], "one image of each caption"),
                          (["--loss", "mae", "--crops-per-image", "2"], "takes 1 crop(s)"),
                          (["--loss", "dino", "--init-from", "x.pth"], "starts from random weights"),
                          (["--loss", "dino", "--local-crop-size", "24"], "not a multiple of the patch size"),
                          (["--loss", "dino", "--local-crop-size", "96"],
                           "--local-crop-size 96 is not smaller than --image-size 32"),
                          (["--loss", "byol", "--gpu-augment", "--gpu-decode"], "leave --gpu-decode off"),
                          (["--loss", "byol", "--temperature", "0.2"], "--temperature is stablerep/simclr/"),
                          (["--loss", "dino", "--context-length", "40"], "--context-length is clip/stablerep+'s")):
        loss = argv[argv.index("--loss") + 1] if "--loss" in argv else "stablerep"
        assert_one_line_error(run_pretrain(*out, *tiny(loss), *argv, check=False), message)
    assert not (tmp_path / "o").exists()


def run_in_process(*argv):
    """pretrain.py's main in this process (as `python pretrain.py ...` runs it), without a new interpreter."""
    from util.cli import run
    run(pretrain.main, pretrain.get_args_parser(), [str(a) for a in argv])


@pytest.mark.slow
@pytest.mark.parametrize("loss", pretrain.FAMILIES)
def test_each_family_resumes_exactly_and_runs_on_two_processes(loss, random_tree, tmp_path):
    """One process, 6 steps; the same run resumed from its step-3 checkpoint (all a run keeps: the momentum
    network or teacher, DINO's center, the optimiser) ends with the same weights; torchrun with 2 gloo processes of
    half the batch each trains the same global batch. DINO and MAE then end where one process does: DINO's center
    is all-reduced and every random draw of a sample (MAE's mask, stochastic depth) travels with it. MoCo v3 and
    BYOL have BatchNorm in their MLPs, per rank by design on CPU (SyncBatchNorm on GPUs); their losses match across
    ranks (MoCo v3's keys are gathered: tests/test_loss.py). The encoder loads in both probes."""
    common = ["--data", random_tree, "--loss", loss, *tiny(loss), *FAMILY_TINY.get(loss, []), "--epochs", "2",
              "--warmup-epochs", "1", "--save-every", "3", "--no-tensorboard", "--base-lr", "0.05"]
    if loss == "dino":  # every schedule moves within the run: teacher temperature, last layer frozen in epoch 0
        common += ["--warmup-teacher-temperature", "0.03", "--warmup-teacher-temperature-epochs", "2"]
    whole, resumed, two = tmp_path / "whole", tmp_path / "resumed", tmp_path / "two"
    run_in_process(*common, "--captions-per-gpu", "4", "--output", whole)
    resumed.mkdir()
    shutil.copy(whole / "checkpoint-00000003.pth", resumed)
    run_in_process(*common, "--captions-per-gpu", "4", "--output", resumed, "--resume")
    final = torch.load(whole / "checkpoint-00000006.pth", weights_only=True)["model"]
    again = torch.load(resumed / "checkpoint-00000006.pth", weights_only=True)["model"]
    assert final.keys() == again.keys()
    for key, value in final.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)
    start = torch.load(whole / "checkpoint-00000003.pth", weights_only=True)["model"]
    for key in final:  # the momentum network / teacher moved wherever its online network did
        online = key.partition(".")[2] if key.startswith(("momentum.", "teacher.")) else None
        if online in final and final[key].is_floating_point() and not torch.equal(start[online], final[online]):
            assert not torch.equal(start[key], final[key]), key
    assert loss != "dino" or not torch.equal(start["center"], final["center"])

    result = run_python("-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "pretrain.py",
                        *common, "--captions-per-gpu", "2", "--output", two)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = torch.load(two / "checkpoint-00000006.pth", weights_only=True)
    assert ranks["world_size"] == 2 and ranks["model"].keys() == final.keys()
    if loss in ("dino", "mae"):
        for key, value in final.items():
            other = ranks["model"][key]
            if key.endswith("attn.qkv.bias"):  # the key bias has no gradient (a softmax ignores a shift of all its
                width = len(value) // 3  # logits): AdamW scales its rounding noise up to lr-sized steps
                value, other = torch.cat([value[:width], value[2 * width:]]), torch.cat([other[:width],
                                                                                         other[2 * width:]])
            torch.testing.assert_close(other, value, rtol=0, atol=2e-6, msg=key)

    import fewshot
    import linear_probe
    from util import evaluation
    for script, flags in ((linear_probe, ["--protocol", "lbfgs"]), (fewshot, [])):
        args = script.get_args_parser().parse_args(["--checkpoint", str(whole / "encoder.pth"), *flags])
        encoder, identity = evaluation.build_encoder(args, torch.device("cpu"))
        assert identity["depth"] == 2 and encoder(torch.zeros(1, 3, 32, 32)).shape == (1, 192)
    exported = torch.load(whole / "encoder.pth", weights_only=True)["model"]
    prefix = "teacher.visual." if loss == "dino" else "visual."  # DINO evaluates its teacher, the others online
    assert all(torch.equal(value, final[prefix + key]) for key, value in exported.items())


@pytest.mark.slow
def test_torchrun_two_processes_with_gloo(random_tree, tmp_path):
    result = run_python("-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "pretrain.py",
                        "--data", random_tree, "--output", tmp_path, "--epochs", "1", "--captions-per-gpu", "2",
                        "--images-per-caption", "2", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(sorted(tmp_path.glob("checkpoint-*.pth"))[-1], weights_only=True)
    assert checkpoint["step"] == 3  # 12 captions / (2 captions x 2 ranks)
    assert any(k.startswith("image_mlp.bn1") for k in checkpoint["model"])
    load_encoder(str(tmp_path / "encoder.pth"))


@pytest.mark.slow
def test_gpu_augment_trains_on_the_same_crops_and_downsampling_changes_them(random_tree, tmp_path):
    """--gpu-augment finishes the augmentation on the device (here the CPU) from the loader's draws: the same
    losses step for step; --gpu-decode decodes the JPEGs there too (the same draws, pixels within a grey level or
    two). --downsample-prob 1 with a tiny resolution trains on other crops."""
    common = ["--data", random_tree, "--epochs", "1", "--captions-per-gpu", "3", "--images-per-caption", "2", *TINY]
    losses = {}
    for name, flags in (("cpu", []), ("device", ["--gpu-augment"]), ("decoded", ["--gpu-augment", "--gpu-decode"]),
                        ("downsampled", ["--downsample-prob", "1", "--downsample-res", "8"])):
        run_pretrain(*common, "--output", str(tmp_path / name), *flags)
        log = (tmp_path / name / "log.jsonl").read_text().splitlines()
        losses[name] = torch.tensor([json.loads(line)["loss"] for line in log])
    assert len(losses["cpu"]) == 4
    torch.testing.assert_close(losses["device"], losses["cpu"], rtol=1e-5, atol=0)
    # --gpu-decode's pixels differ by a grey level or two (tests/test_data.py pins its crops), which a random tiny
    # ViT's contrastive loss at tau 0.1 amplifies to a few percent at the first step
    assert len(losses["decoded"]) == 4 and abs(losses["decoded"][0] / losses["cpu"][0] - 1) < 0.1
    assert (losses["downsampled"] - losses["cpu"]).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tree", "shards"])
def test_killed_and_resumed_run_ends_with_the_same_weights(layout, random_tree, random_shards, tmp_path):
    data = random_tree if layout == "tree" else random_shards
    common = ["--data", data, "--epochs", "3", "--captions-per-gpu", "3", "--images-per-caption", "2",
              "--save-every", "3", *TINY]  # 4 checkpoints of 12 MB a run: the suite stays light on disk
    run_pretrain(*common, "--output", str(tmp_path / "whole"))

    interrupted = tmp_path / "interrupted"
    process = start_python("pretrain.py", *common, "--output", interrupted, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    signal_when(process, lambda: list(interrupted.glob("checkpoint-0000000[3-9].pth")))
    process.wait()
    saved = sorted(interrupted.glob("checkpoint-*.pth"))
    assert saved and saved[-1].name != "checkpoint-00000012.pth", "the run finished before it could be killed"
    run_pretrain(*common, "--output", str(interrupted), "--resume")

    whole = torch.load(tmp_path / "whole" / "checkpoint-00000012.pth", weights_only=True)
    resumed = torch.load(interrupted / "checkpoint-00000012.pth", weights_only=True)
    for key, value in whole["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_streamed_shards_resume_exactly_from_a_checkpoint(random_shards, tmp_path):
    url = "pipe:cat " + os.path.join(random_shards, "{00000..00002}.tar")
    common = ["--data", url, "--stream-captions", "12", "--shuffle-buffer", "3", "--epochs", "2",
              "--captions-per-gpu", "2", "--images-per-caption", "2", "--save-every", "3", *TINY,
              "--workers", "2"]
    run_pretrain(*common, "--output", str(tmp_path / "whole"))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(tmp_path / "whole" / "checkpoint-00000009.pth", resumed)  # epoch 1, step 3 of 6
    run_pretrain(*common, "--output", str(resumed), "--resume")
    whole = torch.load(tmp_path / "whole" / "checkpoint-00000012.pth", weights_only=True)
    again = torch.load(resumed / "checkpoint-00000012.pth", weights_only=True)
    for key, value in whole["model"].items():
        torch.testing.assert_close(again["model"][key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_official_csv_layout_trains(tmp_path):
    tree = write_random_tree(tmp_path / "tree", captions=8, images_per_caption=3)
    roots = [tmp_path / f"seed{k}" for k in range(3)]  # the official layout: one root per seed, same relative paths
    rows = ["filepath,title"]
    for caption_id in range(8):
        for k, root in enumerate(roots):
            (root / "img").mkdir(parents=True, exist_ok=True)
            image = os.path.join(tree, "00000", f"{caption_id:09d}_{k:02d}.jpg")
            shutil.copy(image, root / "img" / f"{caption_id}.jpg")
        rows.append(f"img/{caption_id}.jpg,a photo of object number {caption_id}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    run_pretrain("--data", str(tmp_path / "train.csv"), "--folder-list", *map(str, roots), "--output",
                 str(tmp_path / "run"), "--epochs", "1", "--captions-per-gpu", "4", "--images-per-caption", "3", *TINY)
    assert '"steps": 2' in (tmp_path / "run" / "summary.json").read_text()


@pytest.mark.slow
def test_bad_data_sources_are_one_line_errors(random_shards, tmp_path):
    out = ["--output", str(tmp_path / "o"), *TINY]
    assert_one_line_error(run_pretrain("--data", str(tmp_path / "train.csv"), *out, check=False), "--folder-list")
    assert_one_line_error(run_pretrain("--data", random_shards, "--folder-list", str(tmp_path), *out, check=False),
                          "--folder-list goes with a --data CSV")
    url = "pipe:cat " + os.path.join(random_shards, "00000.tar")
    assert_one_line_error(run_pretrain("--data", url, *out, check=False), "--stream-captions")
    assert_one_line_error(run_pretrain("--data", url, random_shards, "--stream-captions", "5", *out, check=False),
                          "stream all or none")
    assert_one_line_error(run_pretrain("--data", os.path.join(random_shards, "{00000..00004}.tar"), *out,
                                       check=False), "00003.tar does not exist")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_corrupt_images_are_counted_in_the_summary(tmp_path):
    """data.py skips them (tests/test_data.py); the run says how many."""
    tree = write_random_tree(tmp_path / "tree", captions=8, images_per_caption=3)
    with open(os.path.join(tree, "00000", "000000001_00.jpg"), "r+b") as f:
        f.truncate(100)
    output = tmp_path / "run"
    run_pretrain("--data", tree, "--output", str(output), "--epochs", "2", "--captions-per-gpu", "4",
                 "--images-per-caption", "3", *TINY)
    assert json.loads((output / "summary.json").read_text())["corrupt_images_this_run"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_data_with_no_readable_image_is_one_line(workers, tmp_path):
    tree = write_random_tree(tmp_path / "tree", captions=4, images_per_caption=2)
    for image in glob.glob(os.path.join(tree, "*", "*.jpg")):
        with open(image, "r+b") as f:
            f.truncate(0)  # what a generation run that hit its disk quota leaves
    result = run_pretrain("--data", tree, "--output", str(tmp_path / "run"), "--epochs", "1", "--captions-per-gpu",
                          "2", "--images-per-caption", "2", *TINY, "--workers", workers, check=False)
    assert_one_line_error(result, "no caption has enough readable images in --data", "decode")


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(random_tree, tmp_path):
    missing = tmp_path / "missing"
    assert_one_line_error(run_pretrain("--data", str(missing), "--output", str(tmp_path / "o"), *TINY, check=False),
                          "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_pretrain("--data", str(empty), "--output", str(tmp_path / "o"), *TINY, check=False),
                          "not an image tree")
    (empty / "00000").mkdir()
    assert_one_line_error(run_pretrain("--data", str(empty), "--output", str(tmp_path / "o"), *TINY, check=False),
                          "no captioned images")
    assert_one_line_error(run_pretrain("--data", random_tree, "--output", str(tmp_path / "o"),
                                       "--images-per-caption", "5", *TINY, check=False), "4 image(s)")
    assert_one_line_error(run_pretrain("--data", random_tree, "--output", str(tmp_path / "o"),
                                       "--crop-scale", "0.9", "0.5", *TINY, check=False), "must satisfy MIN <= MAX")
    assert_one_line_error(run_pretrain("--data", random_tree, "--output", str(tmp_path / "o"),
                                       "--downsample-prob", "1.5", *TINY, check=False),
                          "--downsample-prob: must be a finite number >= 0 and <= 1")
    assert not (tmp_path / "o").exists()  # nothing written for bad input

    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(run_pretrain("--data", random_tree, "--output", str(blocker / "run"),
                                       "--captions-per-gpu", "4", "--images-per-caption", "2", *TINY, check=False),
                          "cannot be written")

    run_dir = tmp_path / "run"
    run_pretrain("--data", random_tree, "--output", str(run_dir), "--epochs", "1", "--captions-per-gpu", "4",
                 "--images-per-caption", "2", *TINY)
    other_size = [a if a != "vit_tiny" else "vit_small" for a in TINY]
    assert_one_line_error(run_pretrain("--data", random_tree, "--output", str(run_dir), "--epochs", "2",
                                       "--captions-per-gpu", "4", "--images-per-caption", "2", *other_size,
                                       "--resume", check=False), "--model vit_tiny, not vit_small")
    assert_one_line_error(run_pretrain("--data", random_tree, "--output", str(run_dir), "--epochs", "2",
                                       "--captions-per-gpu", "4", "--images-per-caption", "2", *TINY, check=False),
                          "already holds checkpoints")


# ---- the official code's artefacts as inputs; precision ----

def official_checkpoint(path, loss, tokenizer=None, logit_scale=None):
    """A checkpoint in the official code's format: {'model', 'optimizer', 'epoch', 'scaler', 'args': Namespace},
    DDP's `module.` prefix, the text tower (StableRep+) under CLIP's names with [in, out] projection matrices."""
    import argparse
    args = pretrain.fill_recipe(pretrain.get_args_parser().parse_args(["--data", "x", "--loss", loss, *tiny(loss)]))
    torch.manual_seed(1)
    model = pretrain.build_model(args, tokenizer)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("text.") or key == "image_projection.weight":
            continue  # the official text tower is written below under its own names
        state[key] = value
    if tokenizer is not None:
        from util.checkpoints import OFFICIAL_PROJECTIONS, OFFICIAL_TEXT_NAMES
        for key, value in model.state_dict().items():
            official = key
            for theirs, ours in OFFICIAL_TEXT_NAMES:
                official = official.replace(ours, theirs)
            if key in OFFICIAL_PROJECTIONS.values():
                official = next(k for k, v in OFFICIAL_PROJECTIONS.items() if v == key)
                value = value.T
            if official != key:
                state[official] = value
        if logit_scale is not None:
            state["logit_scale"] = torch.tensor(logit_scale)
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}, "epoch": 14, "scaler": {},
                "args": argparse.Namespace(model="base", n_img=6)}, path)
    return model


OFFICIAL_SMALL = ["--model", "vit_small", "--depth", "1", "--image-size", "32", "--head-hidden-dim", "64",
                  "--embed-dim", "32"]


def official_run_checkpoint(path, epoch=1, epochs=3):
    """A checkpoint as main_stablerep.py writes it after `epoch` (0-based) of `epochs`: weights after an AdamW step
    over util/misc.py add_weight_decay's two groups of named_parameters, its args as an argparse Namespace."""
    torch.manual_seed(3)
    model = pretrain.build_model(pretrain.get_args_parser().parse_args(["--data", "x", *OFFICIAL_SMALL]))
    named = list(model.named_parameters())
    no_decay = [p for n, p in named if p.ndim < 2 or "bias" in n or "ln" in n or "bn" in n]
    decay = [p for n, p in named if not any(p is q for q in no_decay)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0}],
                                  lr=1e-3, betas=(0.9, 0.98))
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()
    recipe = argparse.Namespace(model="small", batch_size=12, n_img=2, num_crop=1, epochs=epochs, warmup_epochs=1.0,
                                blr=2e-4, lr=2e-4 * 24 / 512, weight_decay=0.1, beta1=0.9, beta2=0.98, ssl_temp=0.1,
                                ssl_mlp_dim=64, ssl_emb_dim=32, seed=0, world_size=1, add_language=False,
                                vl_projection="linear", downsample=False, csv_path="train.csv")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "scaler": {}, "args": recipe}, path)
    return model, optimizer


@pytest.mark.parametrize("damage, fragment", [
    ({"epoch": -5}, "after epoch -5"), ({"epoch": 10 ** 9}, "after epoch 1000000000"),
    ({"args.epochs": -3}, "--epochs -3"), ({"args.batch_size": "12"}, "--batch_size '12'"),
    ({"args.n_img": 0}, "--n_img 0"), ({"args.world_size": 0}, "--world_size 0"),
    ({"args.blr": math.nan, "args.lr": None}, "--blr nan"), ({"args.seed": 2 ** 70}, "--seed 1180591620717411303424"),
    ({"args.beta1": "x"}, "--betas ['x', 0.98]"), ({"args.warmup_epochs": "1"}, "--warmup_epochs '1'")])
def test_an_official_checkpoint_with_damaged_settings_is_one_line(damage, fragment, random_tree, tmp_path):
    """Every recorded setting of an official checkpoint goes through pretrain.py's own flag checks (or, before its
    arithmetic, a whole-number / finite-number check): one line naming the file, never a traceback or a run that
    trains backwards."""
    path = tmp_path / "official.pth"
    official_run_checkpoint(path)
    state = torch.load(path, weights_only=False)
    for key, value in damage.items():
        if key.startswith("args."):
            setattr(state["args"], key[len("args."):], value)
        else:
            state[key] = value
    torch.save(state, path)
    with pytest.raises(pretrain.UserError) as raised:
        read_resume(["--data", random_tree, "--resume", str(path), "--depth", "1", "--image-size", "32"])
    assert str(path) in str(raised.value) and fragment in str(raised.value), str(raised.value)


@pytest.mark.slow
def test_an_official_run_continues_with_its_weights_moments_and_schedule(random_tree, tmp_path):
    path = tmp_path / "official.pth"
    official, official_optimizer = official_run_checkpoint(path)
    resumed = read_resume(
        ["--data", random_tree, "--resume", str(path), "--depth", "1", "--image-size", "32"])
    assert resumed["official"] and resumed["recipe"]["captions_per_gpu"] == 12 and resumed["world_size"] == 1
    args = argparse.Namespace(**{**vars(pretrain.get_args_parser().parse_args(["--data", "x", *OFFICIAL_SMALL])),
                                 **resumed["recipe"]})
    model = pretrain.build_model(args)
    optimizer = torch.optim.AdamW(pretrain.param_groups(model, 0.1), lr=1e-3)
    step = continue_official(resumed, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), 7)
    assert step == 14  # after its epoch 2 (0-based 1) of 7 steps each
    theirs = {name: official_optimizer.state[p] for name, p in official.named_parameters()}
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter, dict(official.named_parameters())[name], rtol=0, atol=0)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(optimizer.state[parameter][key], theirs[name][key], rtol=0, atol=0, msg=name)

    # the script: one step left (12 captions, 12 per step, epoch 3 of 3), on this command line's --data
    result = run_pretrain("--resume", str(path), "--data", random_tree, "--output", str(tmp_path / "run"), "--depth",
                          "1", "--image-size", "32", "--workers", "0")
    assert "continuing the official run" in result.stdout and "resumed at step 2" in result.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["steps"], summary["steps_this_run"]) == (3, 1)
    for argv, fragment in ((["--captions-per-gpu", "4"], "was trained with --captions-per-gpu 12, not 4"),
                           ([], "does not say where its images are")):
        data = ["--data", random_tree] if argv else []
        result = run_pretrain("--resume", str(path), *data, "--output", str(tmp_path / "other"), *argv, check=False)
        assert_one_line_error(result, fragment)
    partial = tmp_path / "partial.pth"
    official_checkpoint(partial, "stablerep")  # weights and a Namespace without the recipe
    assert_one_line_error(run_pretrain("--data", random_tree, "--output", str(tmp_path / "other"), "--resume",
                                       str(partial), *TINY, check=False), "lack --batch_size", "--init-from")
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_init_from_an_official_checkpoint_loads_its_weights(random_tree, tmp_path):
    path = tmp_path / "official.pth"
    official = official_checkpoint(path, "stablerep")
    result = run_pretrain("--data", random_tree, "--output", str(tmp_path / "run"), "--init-from", str(path),
                          "--epochs", "1", "--captions-per-gpu", "4", "--images-per-caption", "2", "--base-lr", "0",
                          *TINY)
    assert "initialised image_mlp, visual from" in result.stdout
    trained = torch.load(sorted((tmp_path / "run").glob("checkpoint-*.pth"))[-1], weights_only=True)["model"]
    for key, value in official.state_dict().items():  # lr 0: the weights are the official ones (BN stats move)
        if "running" not in key and "num_batches" not in key:
            torch.testing.assert_close(trained[key], value, msg=key)


@pytest.mark.slow
def test_init_from_official_stablerep_plus_and_the_logit_scale_is_clamped_after_each_step(
        random_tree, tiny_sd_folder, tiny_tokenizer, tmp_path):
    path = tmp_path / "official_plus.pth"
    official = official_checkpoint(path, "stablerep+", tiny_tokenizer, logit_scale=6.0)  # above ln 100
    run_pretrain("--data", random_tree, "--output", str(tmp_path / "run"), "--init-from", str(path), "--loss",
                 "stablerep+", "--tokenizer", tiny_sd_folder, "--epochs", "1", "--captions-per-gpu", "4",
                 "--images-per-caption", "2", "--base-lr", "1e-9", *tiny("stablerep+"))
    trained = torch.load(sorted((tmp_path / "run").glob("checkpoint-*.pth"))[-1], weights_only=True)["model"]
    assert trained["logit_scale"].item() == pytest.approx(4.6052)  # the official cap, after the optimiser step
    torch.testing.assert_close(trained["text.blocks.0.attn.qkv.weight"],
                               official.state_dict()["text.blocks.0.attn.qkv.weight"], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cpu_autocast_run(precision, random_tree, tiny_sd_folder, tmp_path):
    """--precision bf16 / fp16 on the CPU: the GPU's mixed-precision path (autocast, fp16's gradient scaler,
    the float32 losses) exercised without a GPU."""
    result = run_pretrain("--data", random_tree, "--output", str(tmp_path), "--loss", "stablerep+", "--tokenizer",
                          tiny_sd_folder, "--precision", precision, "--epochs", "2", "--captions-per-gpu", "4",
                          "--images-per-caption", "2", *tiny("stablerep+"))
    assert f"{precision} on cpu" in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 6 and math.isfinite(summary["final_loss"])


# ---- resume, bookkeeping, crashes and hostile files (issue 12) ----

def small_run(tree, output, *extra):
    return ["--data", tree, "--output", str(output), "--captions-per-gpu", "4", "--images-per-caption", "2", *TINY,
            *extra]


@pytest.mark.slow
def test_resume_takes_the_recorded_recipe_and_refuses_another(random_tree, tmp_path):
    output = tmp_path / "run"
    run_pretrain(*small_run(random_tree, output, "--epochs", "2", "--temperature", "0.2", "--save-every", "4"))
    first_log = (output / "log.jsonl").read_text()
    checkpoints = sorted(output.glob("checkpoint-*.pth"))
    assert [p.name for p in checkpoints] == ["checkpoint-00000004.pth", "checkpoint-00000006.pth"]
    for name in (checkpoints[-1].name, "encoder.pth", "summary.json"):  # as if killed between step 4 and the end
        (output / name).unlink()
    (output / "log.jsonl").write_text(first_log)
    # no --data, no recipe: all from the checkpoint; --log-every may change
    result = run_pretrain("--output", str(output), "--resume", "--log-every", "2")
    assert "resumed at step 4" in result.stdout and "x 2 images" in result.stdout
    steps = [json.loads(line)["step"] for line in (output / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # no step logged twice
    assert json.loads((output / "run.json").read_text())["args"]["temperature"] == 0.2

    assert_one_line_error(run_pretrain("--output", str(output), "--resume", "checkpoint-x.pth", check=False),
                          "does not exist")
    shutil.copy(output / "checkpoint-00000004.pth", tmp_path / "copy.pth")
    assert_one_line_error(run_pretrain("--output", str(tmp_path / "other"), "--resume", str(tmp_path / "copy.pth"),
                                       "--temperature", "0.5", check=False), "--temperature 0.2, not 0.5")
    state = torch.load(tmp_path / "copy.pth", weights_only=True)
    state["world_size"] = 2  # as if trained by two processes: one would halve the batch and the lr
    torch.save(state, tmp_path / "copy.pth")
    assert_one_line_error(run_pretrain("--output", str(tmp_path / "other"), "--resume", str(tmp_path / "copy.pth"),
                                       check=False), "resume with 2 process(es)")
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_resume_of_a_finished_run_leaves_it_alone(random_tree, tmp_path):
    output = tmp_path / "run"
    run_pretrain(*small_run(random_tree, output, "--epochs", "1"))
    before = {p.name: p.read_bytes() for p in output.iterdir() if p.is_file()}
    result = run_pretrain("--output", str(output), "--resume")
    assert "nothing to do" in result.stdout
    assert {p.name: p.read_bytes() for p in output.iterdir() if p.is_file()} == before


@pytest.mark.slow
def test_one_step_epochs_write_a_checkpoint_every_save_every_steps_not_every_step(random_tree, tmp_path):
    output = tmp_path / "run"
    result = run_pretrain(*small_run(random_tree, output, "--epochs", "7", "--captions-per-gpu", "12",
                                     "--save-every", "3", "--keep", "20", "--log-every", "2"))
    assert [p.name for p in sorted(output.glob("checkpoint-*.pth"))] == [
        "checkpoint-00000003.pth", "checkpoint-00000006.pth", "checkpoint-00000007.pth"]
    # through a pipe (a batch job's log): a plain progress line every --log-every steps and at the end, no redraws
    progress = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert "\r" not in result.stdout
    assert [line.split("  ")[:2] for line in progress] == [
        [f"step {s}/7 ({100 * s // 7}%)", f"epoch {s:.2f}/7"] for s in (2, 4, 6, 7)]
    assert all(" loss " in line and " lr " in line and " images/s " in line and line.endswith(" left")
               for line in progress)


@pytest.mark.slow
def test_progress_is_redrawn_in_a_terminal_and_quiet_says_nothing(random_tree, tmp_path):
    master, terminal = pty.openpty()
    process = start_python("pretrain.py", *small_run(random_tree, tmp_path / "run", "--epochs", "2"),
                           stdout=terminal, stderr=subprocess.PIPE)
    os.close(terminal)
    shown = read_terminal(master).replace("\r\n", "\n")  # the terminal writes a newline as CR LF
    os.close(master)
    assert process.wait() == 0, process.stderr.read()
    process.stderr.close()
    first, loader, progress, done = shown.split("\n")[:4]
    assert first.startswith("12 captions") and loader.startswith("loader: ") and done.startswith("done: 6 steps")
    assert [line.split("  ")[0] for line in progress.split("\r")[1:]] == [f"step {s}/6 ({100 * s // 6}%)"
                                                                         for s in range(1, 7)]
    quiet = run_pretrain(*small_run(random_tree, tmp_path / "quiet", "--epochs", "1", "--quiet"))
    lines = quiet.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("12 captions") and lines[2].startswith("done: 3 steps")
    assert len((tmp_path / "quiet" / "log.jsonl").read_text().splitlines()) == 3  # the record is kept


@pytest.mark.slow
def test_nothing_is_written_for_bad_input_and_repeated_data_is_refused(random_tree, tmp_path):
    output = tmp_path / "run"
    for argv, fragment in (
            (["--data", random_tree, random_tree], "more than once"),
            (["--data", random_tree, "--temperature", "0"], "--temperature: must be a finite number > 0"),
            (["--data", random_tree, "--seed", str(2 ** 64)], "--seed: must be >= 0"),
            (["--data", random_tree, "--betas", "2", "2"], "--betas: must be a finite number >= 0 and < 1"),
            (["--data", random_tree, "--warmup-epochs", "-1"], "--warmup-epochs: must be a finite number >= 0"),
            (["--data", random_tree, "--base-lr", "nan"], "--base-lr: must be a finite number"),
            (["--data", random_tree, "--workers", "-1"], "--workers: must be >= 0"),
            (["--data", random_tree, "--depth", "0"], "--depth: must be >= 1"),
            (["--data", random_tree, "--context-length", "0"], "--context-length: must be >= 2"),
            (["--data", str(tmp_path / "nope")], "does not exist"),
            ([], "--data"),
    ):
        assert_one_line_error(run_pretrain(*argv, "--output", str(output), *TINY, check=False), fragment)
    assert not output.exists()


@pytest.mark.slow
def test_an_empty_tokenizer_is_refused(random_tree, tmp_path):
    """transformers returns an empty tokenizer (two tokens) for a hub id it cannot find offline."""
    result = run_pretrain("--data", random_tree, "--output", tmp_path / "run", "--captions-per-gpu", "4",
                          *tiny("clip"), "--loss", "clip", "--tokenizer", "nobody/no-such-model", check=False)
    assert_one_line_error(result, "usable CLIP tokenizer")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_never_writes_through_a_planted_link(random_tree, tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name, refusal in (("checkpoint-00000003.pth", "already holds checkpoints"),  # the run's next checkpoint
                          ("log.jsonl", "log.jsonl is a symbolic link"),
                          ("encoder.pth", "already holds a run (encoder.pth)")):  # another run's file
        (output / name).symlink_to(victim)
        assert_one_line_error(run_pretrain(*small_run(random_tree, output, "--epochs", "1"), check=False), refusal)
        assert [p.name for p in output.iterdir()] == [name]  # refused before anything was written
        (output / name).unlink()
    # a link planted in the run's own folder between two launches is replaced, never written through
    run_pretrain(*small_run(random_tree, output, "--epochs", "2", "--save-every", "3"))
    for name in ("checkpoint-00000006.pth", "summary.json", "encoder.pth"):
        (output / name).unlink()
    (output / "encoder.pth").symlink_to(victim)
    run_pretrain("--output", str(output), "--resume")
    assert victim.read_text() == "precious" and not (output / "encoder.pth").is_symlink()
    assert os.stat(output / "encoder.pth").st_mode & 0o777 == 0o666 & ~files.UMASK


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(random_tree, tmp_path):
    """Every write past 200 kB fails (EFBIG), as a full disk would (ENOSPC)."""
    output = tmp_path / "run"
    result = run_python_with_file_size_limit(200_000, "pretrain.py", *small_run(random_tree, output, "--epochs",
                                                                                "1", "--no-tensorboard"))
    assert_one_line_error(result, "no space left to write", "checkpoint-00000003.pth")
    assert not [p.name for p in output.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_resume_continues(random_tree, tmp_path):
    output = tmp_path / "run"
    argv = small_run(random_tree, output, "--epochs", "40", "--save-every", "2")
    process = start_python("pretrain.py", *argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    signal_when(process, lambda: list(output.glob("checkpoint-*.pth")), signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    lines = [line for line in stderr.splitlines() if line.strip() and "step/s" not in line and "%|" not in line]
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert len(lines) == 1 and "rerun the same command with --resume" in lines[0], stderr


def test_a_preemption_signal_stops_at_the_next_step_boundary():
    """SIGTERM or SIGUSR1 only raise a flag the loop reads between steps (so it saves first); a second SIGTERM stops
    at once; a signal arriving while a checkpoint is written reaches the flag once the file is whole; the handlers
    come back afterwards; a DataLoader worker ignores both."""
    before = {sig: signal.getsignal(sig) for sig in checkpoints.PREEMPTION_SIGNALS}
    with checkpoints.stop_at_step_boundary() as preemption:
        assert not preemption.due()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.due() and preemption.name() == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    assert {sig: signal.getsignal(sig) for sig in checkpoints.PREEMPTION_SIGNALS} == before
    with checkpoints.stop_at_step_boundary() as preemption:
        with checkpoints.interrupts_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            assert preemption.received is None  # deferred while the file is written
        assert preemption.name() == "SIGTERM"
    try:
        checkpoints.quiet_worker(0)
        for sig in checkpoints.PREEMPTION_SIGNALS:
            assert signal.getsignal(sig) is signal.SIG_IGN
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_saves_a_checkpoint_and_stops_quietly(random_tree, tmp_path, signum):
    """SIGTERM to the whole process group (`timeout`, scancel) or SLURM's SIGUSR1 warning: a checkpoint at the next
    step although --save-every is far away, one line, no worker traceback; --resume continues from it."""
    output = tmp_path / "run"
    argv = small_run(random_tree, output, "--epochs", "40", "--save-every", "1000")
    argv[argv.index("--workers") + 1] = "2"
    process = start_python("pretrain.py", *argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    log = output / "log.jsonl"
    signal_when(process, lambda: log.is_file() and log.read_text().count("\n") >= 2, signal.SIGCONT)
    os.killpg(process.pid, signum) if signum == signal.SIGTERM else process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip() and "step/s" not in line and "%|" not in line]
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0] and "--resume" in lines[0], stderr
    saved = checkpoints.list_checkpoints(str(output))
    assert len(saved) == 1 and f"saved {saved[0]};" in lines[0]


@pytest.mark.slow
def test_warmup_longer_than_the_run_is_noted(random_tree, tmp_path):
    result = run_pretrain(*small_run(random_tree, tmp_path / "run", "--epochs", "1", "--warmup-epochs", "5"))
    assert "note: the warmup" in result.stderr


@pytest.mark.slow
def test_tensorboard_curves_continue_after_resume_without_repeated_steps(random_tree, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    output = tmp_path / "run"
    run_pretrain(*small_run(random_tree, output, "--epochs", "3", "--save-every", "3", "--tensorboard"))
    for checkpoint in sorted(output.glob("checkpoint-*.pth"))[1:]:
        checkpoint.unlink()  # back to step 3 of 9
    (output / "summary.json").unlink()
    run_pretrain("--output", str(output), "--resume")
    steps = []
    for events in sorted((output / "tensorboard").glob("events.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        steps += [event.step for event in accumulator.Scalars("loss")]
    assert sorted(set(steps)) == list(range(1, 10))  # every step once the purge is applied on reading
    lines = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 10))


@pytest.mark.slow
def test_wandb_offline_logs_the_run(random_tree, tmp_path):
    pytest.importorskip("wandb")
    output = tmp_path / "run"
    result = run_python("pretrain.py", *small_run(random_tree, output, "--epochs", "1", "--wandb", "stablerep-test"),
                        env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr
    assert list((output / "wandb").glob("offline-run-*"))
    assert (output / "wandb-run-id").is_file()


@pytest.mark.slow
def test_wandb_that_cannot_start_is_one_line(random_tree, tmp_path):
    """Without the package, or (with it) without a login and network: one line, not wandb's traceback."""
    result = run_python("pretrain.py", *small_run(random_tree, tmp_path / "run", "--epochs", "1", "--wandb", "p"),
                        env={"HOME": str(tmp_path), "WANDB_MODE": "", "WANDB_API_KEY": ""})
    assert_one_line_error(result, "wandb")
    assert "pip install wandb" in result.stderr or "wandb login" in result.stderr


def test_an_interrupt_waits_until_the_checkpoint_is_whole(tmp_path):
    """Ctrl-C landing inside torch.save used to surface as torch's RuntimeError with a traceback."""
    path = tmp_path / "checkpoint.pth"
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if run under nohup
    try:
        with pytest.raises(KeyboardInterrupt):
            with checkpoints.interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGTERM)
                pretrain.torch.save({"weights": torch.ones(3)}, path)  # the signals wait for the write
                written = torch.load(path, weights_only=True)
        assert torch.equal(written["weights"], torch.ones(3))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are back
    finally:
        signal.signal(signal.SIGINT, before)


def test_an_ignored_interrupt_stays_ignored_while_a_checkpoint_is_written(tmp_path):
    """A run started with SIGINT ignored (nohup, a background job) must not start reacting to it."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with checkpoints.interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            pretrain.torch.save({"weights": torch.ones(3)}, tmp_path / "checkpoint.pth")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_the_loader_forks_its_workers(random_tree, tmp_path):
    """The start method is chosen, not Python's default (forkserver from 3.14: ~370 MiB more per worker)."""
    args = pretrain.get_args_parser().parse_args(["--data", random_tree, *TINY, "--workers", "2",
                                                  "--images-per-caption", "2", "--captions-per-gpu", "2",
                                                  "--output", str(tmp_path / "run")])
    pretrain.check_args(args)
    _, _, loader = pretrain.build_data(args, None, 1, 0, torch.device("cpu"))
    assert loader.multiprocessing_context.get_start_method() == "fork" and loader.prefetch_factor == 2


def test_gpu_decode_goes_with_gpu_augment(random_tree, tmp_path):
    args = pretrain.get_args_parser().parse_args(["--data", random_tree, *TINY, "--gpu-decode",
                                                  "--output", str(tmp_path / "run")])
    with pytest.raises(pretrain.UserError, match="--gpu-decode goes with --gpu-augment"):
        pretrain.check_args(args)


# ---- a run's data is never lost or mixed up, and no file makes the run execute a command (issue 18) ----

@pytest.fixture(scope="module")
def finished_run(random_tree, tmp_path_factory):
    """A finished small run (3 steps, a checkpoint at each), to copy and damage."""
    output = tmp_path_factory.mktemp("finished") / "run"
    run_pretrain(*small_run(random_tree, output, "--epochs", "1", "--save-every", "1", "--keep", "3"))
    return output


def first_moments(state):
    return next(iter(state["optimizer"]["state"].values()))


DAMAGE = {  # what hand-editing or a broken writer can leave in a checkpoint, and the words of its refusal
    "no rng": (lambda state: state.pop("rng"), "its 'rng' is missing"),
    "string step": (lambda state: state.update(step="3"), "its 'step' is a str"),
    "string flag": (lambda state: state["args"].update(captions_per_gpu="four"), "records --captions-per-gpu 'four'"),
    "number as text": (lambda state: state["args"].update(captions_per_gpu="12"), "records --captions-per-gpu '12'"),
    "float for a whole number": (lambda state: state["args"].update(epochs=2.5), "records --epochs 2.5"),
    "moment shape": (lambda state: first_moments(state).update(exp_avg=torch.zeros(3)),
                     "optimiser state 'exp_avg' does not have the shape"),
    "nan weights": (lambda state: state["model"]["visual.pos_embed"].fill_(float("nan")), "non-finite weights"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_one_line_naming_it(damage, finished_run, tmp_path):
    """Damage to the file's parts and recorded settings is found when it is read (checked in this process), the rest
    when it is loaded into the model and optimiser (checked as the command, which must write nothing)."""
    state = torch.load(finished_run / "checkpoint-00000002.pth", weights_only=True)
    change, fragment = DAMAGE[damage]
    change(state)
    path = tmp_path / "damaged.pth"
    torch.save(state, path)
    argv = ["--resume", str(path), "--output", str(tmp_path / "out")]
    if damage in ("no rng", "string step", "string flag", "number as text", "float for a whole number"):
        with pytest.raises(pretrain.UserError, match="cannot be resumed") as raised:
            read_resume(argv)
        assert str(path) in str(raised.value) and fragment in str(raised.value)
    else:
        assert_one_line_error(run_pretrain(*argv, check=False), str(path), fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_command_recorded_in_a_checkpoint_is_never_run(finished_run, tmp_path):
    marker = tmp_path / "ran"
    state = torch.load(finished_run / "checkpoint-00000002.pth", weights_only=True)
    state["args"]["data"] = [f"pipe:touch {marker}; cat {state['args']['data'][0]}/x.tar"]
    state["args"]["stream_captions"] = 12
    torch.save(state, tmp_path / "shared.pth")
    result = run_pretrain("--resume", str(tmp_path / "shared.pth"), "--output", str(tmp_path / "out"), check=False)
    assert_one_line_error(result, "records the streamed --data", "pass --data again")
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_run_never_takes_over_another_runs_folder(finished_run, random_tree, tmp_path):
    theirs = finished_run / "checkpoint-00000002.pth"
    mine = tmp_path / "mine"
    run_pretrain(*small_run(random_tree, mine, "--epochs", "1", "--seed", "5"))
    before = {p.name: p.read_bytes() for p in mine.iterdir() if p.is_file()}
    result = run_pretrain("--resume", str(theirs), "--output", str(mine), check=False)
    assert_one_line_error(result, f"--output {mine} holds another run", str(theirs))
    assert {p.name: p.read_bytes() for p in mine.iterdir() if p.is_file()} == before
    assert_one_line_error(run_pretrain(*small_run(random_tree, mine, "--epochs", "1"), check=False),
                          "already holds checkpoints")
    # continuing their run in a folder of one's own: trained to the end from their checkpoint, then finished
    copy = tmp_path / "copy"
    run_pretrain("--resume", str(theirs), "--output", str(copy))
    assert json.loads((copy / "summary.json").read_text())["steps"] == 3
    assert json.loads((copy / "run.json").read_text())["run_id"] == json.loads(
        (finished_run / "run.json").read_text())["run_id"]


def test_resuming_an_older_checkpoint_never_overwrites_a_newer_state(finished_run, tmp_path):
    """A run folder holding checkpoints 1-3 and its finish: --resume checkpoint-1 into it is one line and changes
    nothing (it would overwrite checkpoints 2-3 and the finished encoder); into an empty folder it continues."""
    output = tmp_path / "run"
    shutil.copytree(finished_run, output)
    before = {p.name: p.read_bytes() for p in output.iterdir() if p.is_file()}
    parser = pretrain.get_args_parser()
    args = parser.parse_args(["--resume", str(output / "checkpoint-00000001.pth"), "--output", str(output)])
    args.flags_given = ["resume", "output"]
    resumed = resume.read_resume_checkpoint(args, parser, pretrain.RESUMABLE_FLAGS, pretrain.NEVER_RESTORED)
    with pytest.raises(pretrain.UserError, match="holds checkpoint-00000003.pth, newer than .*step 1"):
        checkpoints.check_output(args, resumed, pretrain.RUN_FILES)
    for name in ("checkpoint-00000002.pth", "checkpoint-00000003.pth"):
        (output / name).unlink()  # only the finish is newer now
    with pytest.raises(pretrain.UserError, match=r"the finish of step 3 \(summary.json\)"):
        checkpoints.check_output(args, resumed, pretrain.RUN_FILES)
    assert {p.name: p.read_bytes() for p in output.iterdir() if p.is_file()} == {
        name: data for name, data in before.items() if name not in ("checkpoint-00000002.pth",
                                                                    "checkpoint-00000003.pth")}
    args.output = str(tmp_path / "empty")
    checkpoints.check_output(args, resumed, pretrain.RUN_FILES)


@pytest.mark.slow
def test_a_run_killed_before_its_finish_finishes_on_resume(finished_run, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(finished_run, output)
    for name in ("encoder.pth", "summary.json"):  # SIGKILL after the last checkpoint, before the finish
        (output / name).unlink()
    result = run_pretrain("--output", str(output), "--resume")
    assert "writing encoder.pth and summary.json" in result.stdout
    assert json.loads((output / "summary.json").read_text())["steps"] == 3
    finished = load_encoder(str(finished_run / "encoder.pth")).state_dict()
    for key, value in load_encoder(str(output / "encoder.pth")).state_dict().items():
        torch.testing.assert_close(value, finished[key], rtol=0, atol=0, msg=key)
    assert "nothing to do" in run_pretrain("--output", str(output), "--resume").stdout


def test_ctrl_c_while_the_encoder_is_written_is_one_line_and_the_finish_is_left_to_resume(
        finished_run, tmp_path, monkeypatch, capsys):
    args = argparse.Namespace(**torch.load(finished_run / "checkpoint-00000003.pth", weights_only=True)["args"])
    args.output = str(tmp_path)
    save = pretrain.torch.save

    def interrupted_save(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # lands while encoder.pth is being written
        save(obj, f)

    monkeypatch.setattr(pretrain.torch, "save", interrupted_save)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even under nohup
    try:
        with pytest.raises(SystemExit) as exit_info:
            with checkpoints.interrupts_as_one_line(3, 3):
                checkpoints.finish(load_encoder(str(finished_run / "encoder.pth")), args, {"steps": 3})
    finally:
        signal.signal(signal.SIGINT, before)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == ("pretrain.py: stopped at step 3; the last checkpoint is step 3: rerun "
                                               "the same command with --resume to continue")
    assert load_encoder(str(tmp_path / "encoder.pth")) is not None  # whole: the interrupt waited for the write
    assert not checkpoints.finished(str(tmp_path), 3)  # no summary.json: a resume finishes the run


@pytest.mark.slow
def test_inputs_are_checked_before_anything_is_written(random_tree, tmp_path):
    """Each refusal leaves --output as it found it: absent, or without a single new file."""
    unreadable = write_random_tree(tmp_path / "unreadable", captions=4, images_per_caption=2)
    for image in glob.glob(os.path.join(unreadable, "*", "*.jpg")):
        with open(image, "r+b") as f:
            f.truncate(10)
    (tmp_path / "unreadable" / ".stablerep-index").write_text("")  # the data folder takes no index: --output does
    output = tmp_path / "out"
    assert_one_line_error(run_pretrain(*small_run(unreadable, output, "--captions-per-gpu", "2", "--epochs", "1"),
                                       check=False), "no caption has enough readable images")
    assert not output.exists()  # nor the index it built in output/index-cache

    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert_one_line_error(run_pretrain(*small_run(random_tree, dangling), check=False), "which does not exist")
    assert_one_line_error(run_pretrain(*small_run(str(tmp_path / "${UNSET}" / "{0..1}.tar"), output),
                                       check=False), "does not exist")
    run_dir = tmp_path / "run"
    run_pretrain(*small_run(random_tree, run_dir, "--epochs", "2", "--save-every", "3"))
    (run_dir / "checkpoint-00000006.pth").unlink()
    (run_dir / "log.jsonl").unlink()
    (run_dir / "log.jsonl").mkdir()
    before = sorted(p.name for p in run_dir.iterdir())
    assert_one_line_error(run_pretrain("--output", str(run_dir), "--resume", check=False), "log.jsonl is not a file")
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_patch_size_blur_and_colour_flags_reach_the_model_and_the_views():
    parser = pretrain.get_args_parser()

    def parsed(*flags):
        return parse_command_line(parser, ["--data", "x", "--model", "vit_tiny", "--image-size", "32", *flags])

    assert pretrain.build_model(parsed("--patch-size", "8", "--depth", "1")).visual.patch_embed.grid_size == 4
    mae_args = pretrain.fill_recipe(parsed("--loss", "mae", "--patch-size", "8"))
    assert pretrain.family_crops(mae_args)["noise_per_crop"] == 16  # one mask draw per 8 px patch
    with pytest.raises(UserError, match="not a multiple of the patch size 12"):
        pretrain.check_args(parsed("--patch-size", "12"))
    assert pretrain.family_crops(pretrain.fill_recipe(parsed())) == {}  # StableRep's data path: the paper's views
    views = pretrain.family_crops(pretrain.fill_recipe(parsed("--no-color-augment", "--blur-sigma", "0.01", "0.3")))
    assert [(v.jitter_p, v.gray_p, v.blur_sigma) for v in views["views"]] == [(0.0, 0.0, (0.01, 0.3))]
    dino_crops = pretrain.family_crops(pretrain.fill_recipe(parsed("--loss", "dino", "--patch-size", "8",
                                                                   "--local-crop-size", "16", "--no-color-augment")))
    assert all(v.jitter_p == 0 and v.solarize_p == 0 for v in dino_crops["views"])
    assert dino_crops["local"].view.jitter_p == 0 and dino_crops["local"].size == 16
    torch.manual_seed(0)
    params = augment.sample_color_params(augment.View(blur_p=1.0, blur_sigma=(0.5, 0.5)))
    assert params.sigma.item() == 0.5
