"""Few-shot classification on a frozen encoder: N-way K-shot episodes, mean accuracy and its 95% interval.

Each episode draws N classes, K support and Q query images per class (all distinct); a classifier fitted on
the support images' L2-normalised features labels the queries. The paper's setting: 5-way 5-shot, 15 queries,
600 episodes, logistic regression (class prototypes, Ericsson et al.'s alternative, on --classifier prototype).
Episodes depend only on --seed and the dataset's labels, so two checkpoints are scored on the same episodes.

    python fewshot.py --checkpoint ckpt.pth --data-dir flowers/test
    python fewshot.py --checkpoint ckpt.pth --dataset cifar100 --data-root data --split test
"""
import argparse
import math
import os

from util import evaluation_flags
from util.cli import ArgumentParser, UserError, integer, number, parse_command_line, run
from util.files import atomic_write_json
from util.results import MADE_BY


def get_args_parser():
    parser = ArgumentParser("fewshot.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluation_flags.add_encoder_arguments(parser)
    data = evaluation_flags.add_dataset_arguments(parser, {"--data-dir": "ImageFolder to draw episodes from"})
    data.add_argument("--split", choices=["train", "val", "test"], default="test",
                      help="split of --dataset to draw episodes from; test, the unseen images")
    data.add_argument("--batch-size", type=integer(1), default=256, help="images per forward pass")
    # ---- episodes ----
    episodes = parser.add_argument_group("episodes")
    episodes.add_argument("--ways", type=integer(2), default=5, help="classes per episode; 5, the paper's")
    episodes.add_argument("--shots", type=integer(1), default=5, help="support images per class; 5, the paper's")
    episodes.add_argument("--queries", type=integer(1), default=15, help="query images per class; 15, the paper's")
    episodes.add_argument("--episodes", type=integer(1), default=600, help="600, the paper's; the interval shrinks as "
                          "1/sqrt(episodes)")
    episodes.add_argument("--classifier", choices=["logistic", "prototype"], default="logistic",
                          help="logistic: L2-regularised logistic regression, the paper's; prototype: nearest "
                               "class mean by cosine similarity")
    episodes.add_argument("--C", type=number(above=0), default=1.0,
                          help="inverse L2 strength of the logistic regression as scikit-learn defines it; 1.0, "
                               "scikit-learn's default used by the few-shot benchmarks")
    evaluation_flags.add_run_arguments(parser, "fewshot", "the episodes (and --random-init)")
    return parser


if __name__ == "__main__":  # the command line is read before torch loads (2 s): --help and a bad flag answer at once
    command_line = parse_command_line(get_args_parser())

# the imports below load torch: after the command line, see above
import torch

from util import evaluation as ev

# ------------------------------------------------------------------------------------------------------------
# episodes
# ------------------------------------------------------------------------------------------------------------


def check_class_sizes(labels, names, ways, shots, queries):
    """Every class must hold shots + queries images and there must be `ways` classes: UserError otherwise."""
    counts = torch.bincount(labels, minlength=len(names))
    small = [(names[c], int(n)) for c, n in enumerate(counts.tolist()) if n < shots + queries]
    if small:
        listed = ", ".join(f"{name!r} ({n})" for name, n in small[:5]) + (" ..." if len(small) > 5 else "")
        raise UserError(f"{len(small)} class(es) hold fewer than {shots} shots + {queries} queries = "
                        f"{shots + queries} images: {listed}")
    if len(names) < ways:
        raise UserError(f"{ways}-way episodes need {ways} classes; the data has {len(names)}")


def sample_episodes(labels, num_episodes, ways, shots, queries, seed):
    """Image indices of every episode: [E, ways, shots + queries] (support first), from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    by_class = [torch.nonzero(labels == c).flatten() for c in range(int(labels.max()) + 1)]
    episodes = torch.empty(num_episodes, ways, shots + queries, dtype=torch.long)
    for e in range(num_episodes):
        classes = torch.randperm(len(by_class), generator=generator)[:ways]
        for w, c in enumerate(classes.tolist()):
            members = by_class[c]
            episodes[e, w] = members[torch.randperm(len(members), generator=generator)[:shots + queries]]
    return episodes


def episode_accuracies(features, episodes, shots, classifier, C, chunk=100):
    """Accuracy (%) on the queries of each episode: [E]. features: L2-normalised [N, D]."""
    num_episodes, ways = episodes.shape[:2]
    classes = torch.arange(ways, device=features.device)
    labels = classes.repeat_interleave(episodes.shape[2] - shots)  # queries, class-major
    support_labels = classes.repeat_interleave(shots)
    accuracies = []
    for start in range(0, num_episodes, chunk):  # one batched fit for `chunk` independent episodes
        block = features[episodes[start:start + chunk]]  # (E, ways, shots + queries, D)
        support = block[:, :, :shots].flatten(1, 2)  # (E, ways * shots, D)
        query = block[:, :, shots:].flatten(1, 2)  # (E, ways * queries, D)
        if classifier == "prototype":
            class_means = support.unflatten(1, (ways, shots)).mean(2)  # (E, ways, D)
            prototypes = torch.nn.functional.normalize(class_means, dim=-1)
            scores = query @ prototypes.transpose(1, 2)
        else:  # scikit-learn's C on a sum of losses = weight decay 1 / (C n) on their mean
            n = support.shape[1]
            weight, bias = ev.fit_logistic_regression(support, support_labels.expand(len(block), -1), ways,
                                                      1.0 / (C * n))
            scores = ev.predict_logits(query, weight, bias)
        accuracies.append(100.0 * (scores.argmax(-1) == labels).float().mean(1))
    return torch.cat(accuracies)


def mean_and_interval(accuracies):
    """Mean and half-width of the 95% confidence interval (normal approximation, 1.96 standard errors)."""
    if len(accuracies) < 2:
        return accuracies.mean().item(), float("nan")
    return accuracies.mean().item(), 1.96 * accuracies.std().item() / math.sqrt(len(accuracies))


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------


def result_tags(args):
    """What made the number, for the default results file's name: the episodes' shape and the classifier, then each
    other setting that is not its default (fewshot_flowers_5way5shot_logistic.json, ..._prototype_seed-1.json)."""
    return [f"{args.ways}way{args.shots}shot", args.classifier,
            *ev.changed_settings(args, get_args_parser(), ("queries", "episodes", "C", "split", "seed", "image_size"))]


def main(args):
    # ---- arguments and output (checked here, written only at the end) ----
    folders = [os.path.abspath(args.data_dir)] if args.data_dir else []
    made_by = ev.made_by(args, "fewshot.py", args.dataset or folders,
                         ("split", "ways", "shots", "queries", "episodes", "classifier", "C", "seed"))
    output = ev.results_path(args, "fewshot", args.dataset or ev.folder_name(args.data_dir or "folder"),
                             result_tags(args), made_by, folders)
    cache_dir = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(output)), "feature_cache")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # ---- model ----
    encoder, encoder_id = ev.build_encoder(args, device)
    transform = ev.eval_transform(encoder_id["image_size"])

    # ---- data ----
    if ev.uses_named_dataset(args, ["--data-dir"]):
        dataset = ev.open_torchvision_split(args.dataset, args.data_root, args.split, transform, args.download)
        ev.fairface_notes(dataset)
        if dataset is None:
            raise UserError(f"{args.dataset} has no {args.split} split")
        if args.dataset == "voc2007":
            raise UserError("voc2007 is multi-label: one class per image is needed for episodes")
        data_id = {"dataset": args.dataset, "root": os.path.abspath(args.data_root), "split": args.split}
    else:
        dataset = ev.open_image_folder(args.data_dir, transform)
        data_id = {"dataset": "folder", "data_dir": os.path.abspath(args.data_dir)}
    names = ev.class_names(dataset)
    listed = getattr(dataset, "targets", None) or getattr(dataset, "_labels", None)  # ImageFolder, torchvision
    if listed is not None:  # fail before the long extraction when the labels are known without images
        check_class_sizes(torch.as_tensor(listed), names, args.ways, args.shots, args.queries)

    # ---- features ----
    key = {"encoder": encoder_id, "data": ev.dataset_identity(dataset, data_id), "transform": repr(transform)}
    features, labels, cache_hit = ev.cached_features(
        cache_dir, key, lambda: ev.extract_features(encoder, dataset, args.batch_size, args.num_workers, device))
    check_class_sizes(labels, names, args.ways, args.shots, args.queries)
    features = torch.nn.functional.normalize(features.to(device), dim=-1)

    # ---- episodes ----
    episodes = sample_episodes(labels, args.episodes, args.ways, args.shots, args.queries, args.seed)
    accuracies = episode_accuracies(features, episodes.to(device), args.shots, args.classifier, args.C).cpu()
    mean, interval = mean_and_interval(accuracies)

    # ---- save ----
    results = {"protocol": f"{args.ways}-way {args.shots}-shot", "encoder": encoder_id, "data": data_id,
               "classifier": args.classifier, "ways": args.ways, "shots": args.shots, "queries": args.queries,
               "episodes": args.episodes, "accuracy": mean, "ci95": interval,
               "episode_accuracies": accuracies.tolist(), "feature_cache": {"dir": os.path.abspath(cache_dir),
                                                                            "hit": cache_hit}, "args": vars(args),
               MADE_BY: made_by}
    atomic_write_json(output, results)
    print(f"{args.ways}-way {args.shots}-shot ({args.queries} queries, {args.episodes} episodes, {args.classifier})"
          f" of {ev.encoder_name(encoder_id)} on {data_id['dataset']}")
    print(f"  accuracy  {mean:6.2f} +- {interval:.2f} (95% interval)")
    print(f"results: {output}")
    return results


if __name__ == "__main__":
    run(main, get_args_parser(), args=command_line)
