"""Linear probe of a frozen encoder, the two protocols of the paper.

--protocol sgd (ImageNet, the official code's protocol): a linear layer on the CLS feature, behind a BatchNorm
without affine parameters, trained with SGD (momentum 0.9, no weight decay, cosine schedule, 90 epochs) on
RandomResizedCrop + flip. Many learning rates are trained at once: every head sees the same frozen forward pass,
so ten learning rates cost one encoder pass per batch. Runs under torchrun (DDP), bf16 autocast on GPU.

    torchrun --nproc_per_node 8 linear_probe.py --protocol sgd --checkpoint ckpt.pth \
        --train-dir imagenet/train --val-dir imagenet/val

--protocol lbfgs (the fine-grained datasets): features extracted once and cached on disk, standardised,
multinomial logistic regression with L-BFGS; the L2 strength is swept over 45 log-spaced values on a validation
split (the dataset's own, else 20% of train), the best refitted on train + validation and scored on test.

    python linear_probe.py --protocol lbfgs --checkpoint ckpt.pth --dataset flowers --data-root data
"""
import argparse
import math
import os
import sys

from util import evaluation_flags
from util.catalog import FAIRFACE_DATASETS
from util.cli import ArgumentParser, UserError, integer, number, parse_command_line, run
from util.files import atomic_write_json
from util.results import MADE_BY
from util.runlog import RunLog, check_loggers

# the paper's metric per dataset (Kornblith et al.'s protocol); top-1 for the others
PAPER_METRICS = {"aircraft": "mean_per_class", "caltech101": "mean_per_class", "flowers": "mean_per_class",
                 "pets": "mean_per_class", "voc2007": "map11"}
# FairFace: the paper's fairness numbers are the mean and the worst of the per-class accuracies (FIDELITY.md)
PAPER_METRICS.update({name: "mean_per_class" for name in FAIRFACE_DATASETS})
# the settings that change each protocol's number: a non-default value is named in the default results file
RESULT_SETTINGS = {"sgd": ("epochs", "base_lrs", "batchnorm", "batch_size", "eval_every", "seed", "image_size"),
                   "lbfgs": ("wd_range", "wd_steps", "val_fraction", "max_iter", "metric", "seed", "image_size")}


def get_args_parser():
    parser = ArgumentParser("linear_probe.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=["sgd", "lbfgs"], required=True,
                        help="sgd: the ImageNet protocol; lbfgs: the fine-grained protocol (see above)")
    evaluation_flags.add_encoder_arguments(parser)
    data = evaluation_flags.add_dataset_arguments(parser, {
        "--train-dir": "ImageFolder of training images",
        "--val-dir": "ImageFolder of held-out images, scored at the end (ImageNet's val; the test split)"})
    data.add_argument("--batch-size", type=integer(1), default=1024, help="images per step over all processes; 1024, "
                      "the official probe's (the learning rates scale with it)")
    # ---- sgd protocol ----
    sgd = parser.add_argument_group("sgd protocol")
    sgd.add_argument("--epochs", type=integer(1), default=90, help="90, the official probe's (cosine schedule to 0)")
    sgd.add_argument("--base-lrs", type=number(above=0), nargs="+",
                     default=[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5],
                     help="one head per base lr, lr = base x batch / 256; the official sweep 0.001 ... 0.5, since "
                          "the best lr differs between encoders and one frozen pass trains them all")
    sgd.add_argument("--no-batchnorm", dest="batchnorm", action="store_false",
                     help="drop the BatchNorm (no affine) in front of the heads (the official probe's --use_bn is on "
                          "by default)")
    sgd.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                     help="TensorBoard curves in <output stem>_tensorboard/ (default: on when installed); <output "
                          "stem>.log.jsonl too")
    sgd.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to this Weights & Biases project")
    sgd.add_argument("--eval-every", type=integer(1), default=10,
                     help="score every head on the held-out images every N epochs and after the last; 10, the "
                          "official probe's --eval-freq. The results hold the last evaluation and the best one")
    # ---- lbfgs protocol ----
    lbfgs = parser.add_argument_group("lbfgs protocol")
    lbfgs.add_argument("--wd-range", type=number(above=0), nargs=2, default=[1e-6, 1e5], metavar=("MIN", "MAX"),
                       help="L2 strengths swept (log-spaced): 1e-6 ... 1e5, the paper's range")
    lbfgs.add_argument("--wd-steps", type=integer(1), default=45, help="45 values, the paper's sweep")
    lbfgs.add_argument("--val-fraction", type=number(above=0, maximum=0.9), default=0.2,
                       help="share of train held out to pick the L2 strength when the dataset has no val split; "
                            "0.2, the paper's")
    lbfgs.add_argument("--max-iter", type=integer(1), default=1000, help="L-BFGS iterations per fit; 1000, "
                       "scikit-learn's usual cap for this problem")
    lbfgs.add_argument("--metric", choices=["auto", "top1", "mean_per_class", "map11"], default="auto",
                       help="auto: the paper's metric for --dataset (mean per-class accuracy for Aircraft, "
                            "Caltech-101, Flowers, Pets; 11-point mAP for VOC2007; top-1 otherwise)")
    # ---- run ----
    evaluation_flags.add_run_arguments(parser, "linear_probe", "data order, validation split, --random-init")
    return parser


if __name__ == "__main__":  # the command line is read before torch loads (2 s): --help and a bad flag answer at once
    command_line = parse_command_line(get_args_parser())

# the imports below load torch: after the command line, see above
import numpy as np
import torch
import torchvision
from tqdm import tqdm

import augment
from util import distributed
from util import evaluation as ev

# ------------------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------------------


def top1(scores, targets):
    return 100.0 * (scores.argmax(-1) == targets).float().mean().item()


def mean_per_class_accuracy(scores, targets):
    correct = (scores.argmax(-1) == targets).float()
    return 100.0 * torch.stack([correct[targets == c].mean() for c in targets.unique()]).mean().item()


def map11(scores, targets):
    """VOC2007's 11-point interpolated average precision, averaged over classes. targets: multi-hot [N, C]."""
    precisions = []
    for c in range(targets.shape[1]):
        order = scores[:, c].argsort(descending=True)
        hits = targets[order, c]
        if hits.sum() == 0:
            continue
        true_positives = hits.cumsum(0)
        precision = true_positives / torch.arange(1, len(hits) + 1)
        recall = true_positives / hits.sum()
        points = [precision[recall >= t].max().item() if (recall >= t).any() else 0.0
                  for t in np.linspace(0, 1, 11)]
        precisions.append(sum(points) / 11)
    return 100.0 * sum(precisions) / len(precisions)


def per_class_accuracy(scores, targets, num_classes):
    """Accuracy (%) of each class over its own images, [num_classes], None for a class with no image."""
    correct = (scores.argmax(-1) == targets).float()
    return [100.0 * correct[targets == c].mean().item() if (targets == c).any() else None for c in range(num_classes)]


METRICS = {"top1": top1, "mean_per_class": mean_per_class_accuracy, "map11": map11}


# ------------------------------------------------------------------------------------------------------------
# sgd protocol
# ------------------------------------------------------------------------------------------------------------


class LinearHeads(torch.nn.Module):
    """One optional BatchNorm (no affine, so it is shared: it has nothing to learn) and one linear head per lr.

    features [B, D] -> logits [heads, B, classes]. Heads start at N(0, 0.01) weights and zero bias."""

    def __init__(self, width, num_classes, num_heads, batchnorm):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(width, affine=False, eps=1e-6) if batchnorm else torch.nn.Identity()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, num_classes) for _ in range(num_heads))
        for head in self.heads:
            torch.nn.init.trunc_normal_(head.weight, std=0.01)
            torch.nn.init.zeros_(head.bias)

    def forward(self, features):
        features = self.norm(features)
        return torch.stack([head(features) for head in self.heads])  # (heads, B, classes)


def train_transform(image_size):
    """RandomResizedCrop + horizontal flip, the official probe's training augmentation (bilinear, its default)."""
    transforms = torchvision.transforms
    return transforms.Compose([
        transforms.Lambda(ev.to_rgb),
        transforms.RandomResizedCrop(image_size, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(augment.IMAGENET_MEAN, augment.IMAGENET_STD),
    ])


def run_sgd(args, encoder, train_set, test_set, num_classes, device):
    per_rank = args.batch_size // distributed.world_size()
    if per_rank < 1:
        raise UserError(f"--batch-size {args.batch_size} is smaller than the {distributed.world_size()} processes")
    lrs = [base * args.batch_size / 256 for base in args.base_lrs]
    log = None
    if distributed.is_main_process():
        print(f"batch {args.batch_size} = {per_rank} x {distributed.world_size()} processes; lr = base_lr x "
              f"{args.batch_size} / 256 = {', '.join(f'{lr:.4g}' for lr in lrs)}")
        stem = os.path.splitext(os.path.basename(args.output))[0]
        log = RunLog(os.path.dirname(os.path.abspath(args.output)), name=f"{stem}.log.jsonl",
                     tensorboard_dir=f"{stem}_tensorboard", tensorboard=args.tensorboard, wandb_project=args.wandb,
                     config=vars(args))
    sampler = (torch.utils.data.distributed.DistributedSampler(train_set, seed=args.seed)
               if distributed.world_size() > 1 else None)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=per_rank, shuffle=sampler is None, sampler=sampler, num_workers=args.num_workers,
        pin_memory=device.type == "cuda", drop_last=True,  # drop_last: BatchNorm needs 2+ rows
        generator=torch.Generator().manual_seed(args.seed))
    if len(loader) == 0:
        raise UserError(f"{len(train_set)} training images make no full batch of {per_rank} per process")
    heads, module = distributed.data_parallel(
        LinearHeads(encoder.width, num_classes, len(lrs), args.batchnorm).to(device), device)
    optimizer = torch.optim.SGD([{"params": head.parameters(), "lr": lr} for head, lr in zip(heads.heads, lrs)],
                                momentum=0.9, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(loader))  # per step
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    # ---- loop ----
    history, evaluations = [], []
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        module.train()
        loss_sum = torch.zeros(len(lrs), device=device)
        for images, targets in ev.batches(loader):
            with torch.no_grad(), autocast:
                features = encoder(images.to(device, non_blocking=True))  # one frozen pass for all heads
            targets = targets.to(device, non_blocking=True)
            logits = module(features.float())  # (heads, B, classes)
            losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.repeat(len(lrs)), reduction="none")
            losses = losses.view(len(lrs), -1).mean(1)  # (heads,); heads share no parameter, so one backward
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            schedule.step()
            loss_sum += losses.detach()
        all_losses = distributed.all_gather_no_grad(loss_sum[None]).sum(0)  # (heads,), summed over ranks
        mean_losses = (all_losses / (len(loader) * distributed.world_size())).tolist()
        if not any(math.isfinite(x) for x in mean_losses):
            raise UserError(f"every head's training loss is non-finite at epoch {epoch}: lower --base-lrs")
        history.append({"epoch": epoch, "train_loss": mean_losses})
        line = f"epoch {epoch}: train loss {min(mean_losses):.4f} (lowest of {len(lrs)} heads)"
        scalars = {f"train_loss/base_lr_{base:g}": value for base, value in zip(args.base_lrs, mean_losses)}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            accuracies = evaluate_heads(heads, encoder, test_set, per_rank, args.num_workers, autocast, device)
            evaluations.append({"epoch": epoch, "top1": accuracies})
            line += f"; held-out top-1 {max(accuracies):.2f} (best head)"
            scalars.update({f"top1/base_lr_{base:g}": value for base, value in zip(args.base_lrs, accuracies)})
        if log:
            print(line)
            log.write(epoch + 1, epoch=epoch, **scalars)
    if log:
        log.close()

    # ---- results: the last evaluation, and the best over evaluations and heads ----
    def best_head(evaluation):
        head = max(range(len(lrs)), key=lambda h: evaluation["top1"][h])
        return {"epoch": evaluation["epoch"], "base_lr": args.base_lrs[head], "lr": lrs[head],
                "top1": evaluation["top1"][head]}

    last = evaluations[-1]
    return {"metric": "top1",
            "heads": [{"base_lr": b, "lr": lr, "top1": acc} for b, lr, acc in zip(args.base_lrs, lrs, last["top1"])],
            "last": best_head(last),
            "best": max((best_head(e) for e in evaluations), key=lambda row: row["top1"]),
            "evaluations": evaluations, "history": history}


def evaluate_heads(heads, encoder, test_set, batch_size, num_workers, autocast, device):
    """Top-1 (%) of every head on the held-out images: each rank scores its share, the counts are summed."""
    heads.eval()
    shard = torch.utils.data.Subset(test_set, range(distributed.rank(), len(test_set), distributed.world_size()))
    correct = torch.zeros(len(heads.heads), device=device)
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=num_workers)
    for images, targets in ev.batches(loader):
        with torch.inference_mode():
            with autocast:
                features = encoder(images.to(device, non_blocking=True))
            logits = heads(features.float())
            correct += (logits.argmax(-1) == targets.to(device)).sum(1)
    return (100.0 * distributed.all_gather_no_grad(correct[None]).sum(0) / len(test_set)).tolist()


# ------------------------------------------------------------------------------------------------------------
# lbfgs protocol
# ------------------------------------------------------------------------------------------------------------


def split_train_val(features, targets, fraction, seed):
    """Hold out `fraction` of the training features (seeded permutation) as the validation split."""
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))
    cut = int(round(fraction * len(features)))
    if cut < 1 or cut >= len(features):
        raise UserError(f"--val-fraction {fraction} of {len(features)} training images leaves an empty split")
    val, train = order[:cut], order[cut:]
    return features[train], targets[train], features[val], targets[val]


def sweep_and_refit(train, val, test, num_classes, metric, args, device, val_name="val"):
    """Pick the L2 strength on (train, val), refit on train + val, score on test. Each arg: (features, targets);
    `val_name` says what the validation images are (the dataset's val split, or a share of train held out)."""
    score = METRICS[metric]
    strengths = np.logspace(math.log10(args.wd_range[0]), math.log10(args.wd_range[1]), args.wd_steps)
    x_train, x_val = ev.standardise(train[0].to(device), val[0].to(device))
    y_train = train[1].to(device)
    sweep, init = [], None
    # strong to weak: each fit warm-starts the next; a bar, not a line per strength (the JSON holds every score)
    for strength in tqdm(sorted(strengths, reverse=True), desc="L2 strength sweep", unit="fit", file=sys.stderr):
        init = ev.fit_logistic_regression(x_train, y_train, num_classes, float(strength), args.max_iter, init=init)
        sweep.append({"weight_decay": float(strength),
                      "val": score(ev.predict_logits(x_val, *init).cpu(), val[1])})
    sweep.sort(key=lambda row: row["weight_decay"])
    best = max(sweep, key=lambda row: row["val"])  # ties: the weakest regularisation that reaches the best
    print(f"L2 strength {best['weight_decay']:.3g}, the best of {len(sweep)} from {sweep[0]['weight_decay']:g} to "
          f"{sweep[-1]['weight_decay']:g} on {val_name} ({len(val[0])} images): {metric} {best['val']:.2f}")
    at_edge = len(sweep) > 2 and best["weight_decay"] in (sweep[0]["weight_decay"], sweep[-1]["weight_decay"])
    if at_edge:
        print(f"note: the best L2 strength {best['weight_decay']:.3g} is at the edge of --wd-range "
              f"{args.wd_range[0]:g} {args.wd_range[1]:g}; a wider range may score higher", file=sys.stderr)
    x_all, x_test = ev.standardise(torch.cat([train[0], val[0]]).to(device), test[0].to(device))
    weight, bias = ev.fit_logistic_regression(x_all, torch.cat([train[1], val[1]]).to(device), num_classes,
                                              best["weight_decay"], args.max_iter)
    test_scores = ev.predict_logits(x_test, weight, bias).cpu()
    results = {"metric": metric, "sweep": sweep, "best_weight_decay": best["weight_decay"], "best_val": best["val"],
               "best_at_edge_of_sweep": at_edge,
               "test": score(test_scores, test[1]), "train_images": len(train[0]), "val_images": len(val[0]),
               "test_images": len(test[0])}
    if test[1].ndim == 1:  # single-label: each class's accuracy and the worst of them (FairFace's fairness number)
        per_class = per_class_accuracy(test_scores, test[1], num_classes)
        scored = [v for v in per_class if v is not None]  # classes the test split has
        results.update(test_per_class=per_class, test_worst_class=min(scored), test_worst_class_of=len(scored))
    return results


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------


def open_splits(args, transform_for):
    """{"train", "val" (or None), "test"} datasets, the number of classes, and a description for the results."""
    if ev.uses_named_dataset(args, ["--train-dir", "--val-dir"]):
        splits = {split: ev.open_torchvision_split(args.dataset, args.data_root, split, transform_for(split),
                                                   args.download) for split in ("train", "val", "test")}
        identity = {"dataset": args.dataset, "root": os.path.abspath(args.data_root)}
        if distributed.is_main_process():
            ev.fairface_notes(*splits.values())
        return splits, len(ev.class_names(splits["train"])), identity
    train = ev.open_image_folder(args.train_dir, transform_for("train"))
    test = ev.open_image_folder(args.val_dir, transform_for("test"))
    if train.classes != test.classes:
        raise UserError(f"{args.train_dir} and {args.val_dir} hold different class folders")
    return ({"train": train, "val": None, "test": test}, len(train.classes),
            {"dataset": "folders", "train_dir": os.path.abspath(args.train_dir),
             "val_dir": os.path.abspath(args.val_dir)})


def result_tags(args):
    """What made the number, for the default results file's name: the protocol, then its changed RESULT_SETTINGS
    (linear_probe_flowers_lbfgs.json, linear_probe_imagenet_sgd_epochs-100.json)."""
    return [args.protocol, *ev.changed_settings(args, get_args_parser(), RESULT_SETTINGS[args.protocol])]


def main(args):
    # ---- arguments and output (checked here, written only at the end) ----
    check_loggers(args.tensorboard, args.wandb)
    if args.wd_range[0] > args.wd_range[1]:
        raise UserError(f"--wd-range {args.wd_range[0]:g} {args.wd_range[1]:g} needs MIN <= MAX")
    data_name = args.dataset or ev.folder_name(args.train_dir or "folders")
    folders = [os.path.abspath(folder) for folder in (args.train_dir, args.val_dir) if folder]
    made_by = ev.made_by(args, "linear_probe.py", args.dataset or folders,
                         ("protocol", "metric", *RESULT_SETTINGS[args.protocol]))
    output = ev.results_path(args, "linear_probe", data_name, result_tags(args), made_by, folders)
    cache_dir = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(output)), "feature_cache")

    # ---- distributed ----
    device = distributed.init_distributed()
    if args.protocol == "lbfgs" and distributed.world_size() > 1:
        raise UserError("--protocol lbfgs runs as one process (features are extracted once); drop torchrun")

    # ---- model ----
    encoder, encoder_id = ev.build_encoder(args, device)
    image_size = encoder_id["image_size"]

    # ---- data ----
    sgd_train = args.protocol == "sgd"
    eval_t = ev.eval_transform(image_size, "bilinear" if sgd_train else "bicubic")  # each protocol's own
    splits, num_classes, data_id = open_splits(
        args, lambda split: train_transform(image_size) if sgd_train and split == "train" else eval_t)
    for split, dataset in splits.items():
        if dataset is not None and len(dataset) == 0:
            raise UserError(f"the {split} split holds no images")
    if num_classes < 2:
        raise UserError(f"the training split holds {num_classes} class: a classifier needs at least 2")
    metric = PAPER_METRICS.get(args.dataset, "top1") if args.metric == "auto" else args.metric
    if metric == "map11" and args.dataset != "voc2007":
        raise UserError("--metric map11 needs the multi-label --dataset voc2007")

    # ---- probe ----
    results = {"protocol": args.protocol, "encoder": encoder_id, "data": data_id, "num_classes": num_classes,
               "args": vars(args), MADE_BY: made_by}
    if args.protocol == "sgd":
        if metric != "top1":
            raise UserError(f"--protocol sgd reports top-1; {metric} is the lbfgs protocol's metric")
        results.update(run_sgd(args, encoder, splits["train"], splits["test"], num_classes, device))
        summary = [(f"base lr {h['base_lr']:g}", h["top1"]) for h in results["heads"]]
        summary.append((f"last: best head at the last epoch (base lr {results['last']['base_lr']:g})",
                        results["last"]["top1"]))
        summary.append((f"best: over evaluations and heads (epoch {results['best']['epoch']}, base lr "
                        f"{results['best']['base_lr']:g}; chosen on these held-out images, as the official probe "
                        "does)", results["best"]["top1"]))
    else:
        features, cache_hits = {}, {}
        for split, dataset in splits.items():
            if dataset is None:
                continue
            key = {"encoder": encoder_id, "data": ev.dataset_identity(dataset, {**data_id, "split": split}),
                   "transform": repr(eval_t)}
            x, y, cache_hits[split] = ev.cached_features(
                cache_dir, key, lambda: ev.extract_features(encoder, dataset, args.batch_size, args.num_workers,
                                                            device, desc=f"{split} features"))
            features[split] = (x, y)
        val_name = "the val split"
        if "val" not in features:  # no validation split: hold out part of train to pick the L2 strength
            x_train, y_train, x_val, y_val = split_train_val(*features["train"], args.val_fraction, args.seed)
            features["train"], features["val"] = (x_train, y_train), (x_val, y_val)
            val_name = f"{args.val_fraction:.0%} of train held out"
        results["feature_cache"] = {"dir": os.path.abspath(cache_dir), "hits": cache_hits}
        results.update(sweep_and_refit(features["train"], features["val"], features["test"], num_classes, metric,
                                       args, device, val_name))
        results["val_images_from"] = val_name
        summary = [(f"{metric} on {val_name} (best weight decay {results['best_weight_decay']:.3g})",
                    results["best_val"]),
                   (f"test {metric}", results["test"])]
        if args.dataset in FAIRFACE_DATASETS:  # the fairness table: every class, then the worst
            names = ev.class_names(splits["train"])
            summary += [(f"test accuracy: {name}", value) for name, value in zip(names, results["test_per_class"])
                        if value is not None]
            summary.append((f"test worst-class accuracy (of {results['test_worst_class_of']} classes)",
                            results["test_worst_class"]))

    # ---- save ----
    if distributed.is_main_process():
        atomic_write_json(output, results)
        width = max(len(name) for name, _ in summary)
        print(f"linear probe ({args.protocol}) of {ev.encoder_name(encoder_id)} on {data_id['dataset']}")
        for name, value in summary:
            print(f"  {name:<{width}}  {value:6.2f}")
        print(f"results: {output}")
    distributed.leave()
    return results


if __name__ == "__main__":
    run(main, get_args_parser(), args=command_line)
