"""What linear_probe.py and fewshot.py share: the frozen encoder, the datasets, the evaluation transform, batched
feature extraction with an on-disk cache, and multinomial logistic regression fitted with L-BFGS in torch.

    images --eval_transform--> [B, 3, S, S] --frozen ViT (CLS token)--> features [N, D] (cached on disk)
    features --standardise / L2-normalise--> fit_logistic_regression --> W [D, C], b [C]

Every failure a user can cause (missing checkpoint or folder, another architecture, an empty split) is raised
as `cli.UserError`, which the scripts turn into one line on stderr and exit code 2.
"""
import csv
import hashlib
import json
import os
import re
import sys

import torch
import torchvision
from PIL import Image
from torchvision import datasets
from tqdm import tqdm

import augment
from model import build_vit
from util import results
from util.catalog import VIT_SIZES, vit_name
from util.checkpoints import load_encoder
from util.cli import UserError, first_line, raised_message
from util.files import atomic_open, check_creatable

# ------------------------------------------------------------------------------------------------------------
# encoder
# ------------------------------------------------------------------------------------------------------------


def results_path(args, results_name, data_name, tags, made_by, inputs):
    """Where the results go: --output, or beside the checkpoint as <results_name>_<data>_<tag>_..._<checkpoint>.json
    (util.results.default_name), the tags saying what made the number (the protocol, changed_settings), so a result
    of other settings is never replaced. Checked, not created: a run that fails on its input leaves nothing behind.
    UserError for a folder given as the file, a place that cannot be written, or a file that is one of `inputs` or
    holds another result than `made_by`'s (util.results.check_output)."""
    if args.output is None:
        if args.random_init or args.raw_pixels:
            flag = "--random-init" if args.random_init else "--raw-pixels"
            raise UserError(f"{flag} has no checkpoint folder to write results beside: pass --output")
        args.output = results.default_name(results_name, [data_name, *tags], args.checkpoint)
    if os.path.isdir(args.output):
        raise UserError(f"--output {args.output} is a folder; name the results file (e.g. {results_name}.json)")
    check_creatable(os.path.dirname(os.path.abspath(args.output)), "--output")
    results.check_output(args.output, made_by, [args.checkpoint, args.cache_dir, *inputs])
    if args.cache_dir is not None and os.path.exists(args.cache_dir) and not os.path.isdir(args.cache_dir):
        raise UserError(f"--cache-dir {args.cache_dir} is a file, not a folder")
    check_creatable(args.cache_dir or os.path.dirname(os.path.abspath(args.output)), "--cache-dir")
    return args.output


def made_by(args, script, data, settings):
    """What made an evaluation's number, as its results file records it (util.results): the script, the encoder
    (checkpoint, or a random init's model), the data and the settings that change the number."""
    encoder = {"raw_pixels": True} if args.raw_pixels else {}  # the key only where it is set: older files match
    return results.jsonable({"script": script,
                             "checkpoint": os.path.abspath(args.checkpoint) if args.checkpoint else None,
                             "model": args.model, "image_size": args.image_size, **encoder, "data": data,
                             "settings": {key: getattr(args, key) for key in settings}})


def changed_settings(args, parser, dests):
    """Words for a results file's name: each setting among `dests` (argparse dests, in that order) whose value is not
    the parser's default, as flag-value ("epochs-10", "base-lrs-0.05,0.5", "seed-1"), a switch as its name or
    "no-" its name ("no-batchnorm")."""
    words = []
    for dest in dests:
        value = getattr(args, dest)
        if value == parser.get_default(dest):
            continue
        name = dest.replace("_", "-")
        if isinstance(value, bool):
            words.append(name if value else f"no-{name}")
        else:
            shown = value if isinstance(value, (list, tuple)) else [value]
            words.append(f"{name}-" + ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in shown))
    return words


def folder_name(path):
    """A short name for an image folder in a results file name: its last two parts, "flowers_test"."""
    parts = os.path.abspath(path).rstrip(os.sep).split(os.sep)
    return "_".join(part for part in parts[-2:] if part)


class RawPixels(torch.nn.Module):
    """The `--raw-pixels` encoder: the normalised image itself as the feature, [B, 3, S, S] -> [B, 3 S S]."""

    def forward(self, images):
        return images.flatten(1)


def encoder_name(identity):
    """What a results line calls the encoder: the checkpoint's path, "random init" or "raw pixels"."""
    return identity["checkpoint"] or ("raw pixels" if identity.get("raw_pixels") else "random init")


def build_encoder(args, device):
    """The frozen encoder named by the arguments, in eval mode on `device`, and a dict that identifies it.

    The identity (checkpoint path, size, modification time, architecture, input size) keys the feature cache
    and is written into the results."""
    if args.raw_pixels:
        if args.image_size is None:
            raise UserError("--raw-pixels needs --image-size (the side every image is resized and cropped to)")
        return RawPixels().to(device), {"checkpoint": None, "raw_pixels": True, "model": "raw pixels",
                                        "image_size": args.image_size}
    if args.random_init:
        if args.model is None:
            raise UserError("--random-init needs --model (one of " + ", ".join(VIT_SIZES) + ")")
        torch.manual_seed(args.seed)
        encoder = build_vit(args.model, image_size=args.image_size or 224)
        identity = {"checkpoint": None, "random_init_seed": args.seed}
    else:
        try:
            encoder = load_encoder(args.checkpoint, args.model, args.image_size)
        except (FileNotFoundError, ValueError) as err:
            raise UserError(str(err).splitlines()[0]) from None
        stat = os.stat(args.checkpoint)
        identity = {"checkpoint": os.path.abspath(args.checkpoint), "bytes": stat.st_size,
                    "mtime_ns": stat.st_mtime_ns}
    config = encoder.config
    identity.update(model=args.model or vit_name(encoder.width), image_size=config["image_size"],
                    depth=config["depth"], patch_size=config["patch_size"])
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    return encoder.eval().to(device), identity


# ------------------------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------------------------


def eval_transform(image_size, interpolation="bicubic"):
    """Resize 256 -> center crop 224, scaled to `image_size`, PIL's antialiased resampling:

    - "bilinear" is the official ImageNet probe's (main_linear.py leaves torchvision's default)
    - "bicubic" is the transfer protocol's of the fine-grained datasets (SimCLR's and Kornblith et al.'s), which
      the L-BFGS probe and few-shot follow."""
    transforms = torchvision.transforms
    mode = {"bilinear": transforms.InterpolationMode.BILINEAR, "bicubic": transforms.InterpolationMode.BICUBIC}
    return transforms.Compose([
        transforms.Lambda(to_rgb),
        transforms.Resize(round(image_size * 256 / 224), interpolation=mode[interpolation]),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(augment.IMAGENET_MEAN, augment.IMAGENET_STD),  # as the encoder was trained
    ])


def to_rgb(image):
    """Greyscale and palette images (Caltech-101 has some) become 3-channel RGB."""
    return image.convert("RGB")


class UnreadableImage(Exception):
    """An evaluation image that cannot be decoded; its message is "<path>: <reason>"."""


def load_image(path):
    """PIL's loader for ImageFolder, with every decoder failure (truncated file, not an image, a decompression
    bomb over PIL's pixel limit) turned into UnreadableImage naming the file."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
            return image
    except augment.DECODE_ERRORS as err:
        raise UnreadableImage(f"{path}: {first_line(err)}") from None


def batches(loader):
    """Iterate a DataLoader; an unreadable image (raised in a worker or here) becomes a one-line UserError."""
    try:
        yield from loader
    except UnreadableImage as err:
        raise UserError(f"cannot read image {raised_message(err)}; remove or replace the file") from None


def open_image_folder(path, transform):
    """torchvision's ImageFolder at `path` (decoded by `load_image`); a missing or empty folder is a UserError."""
    if not os.path.isdir(path):
        raise UserError(f"image folder {path} does not exist")
    try:
        return torchvision.datasets.ImageFolder(path, transform=transform, loader=load_image)
    except (FileNotFoundError, RuntimeError) as err:  # no class folders, or class folders without images
        raise UserError(f"image folder {path} is empty: {str(err).splitlines()[0]}") from None


VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


class VOCMultiLabel:
    """VOC2007 classification: each image's target is a multi-hot vector over the 20 classes of its objects."""

    classes = VOC_CLASSES

    def __init__(self, detection):
        self.detection = detection

    def __len__(self):
        return len(self.detection)

    def __getitem__(self, index):
        image, annotation = self.detection[index]
        objects = annotation["annotation"]["object"]
        target = torch.zeros(len(VOC_CLASSES))
        for obj in objects if isinstance(objects, list) else [objects]:
            target[VOC_CLASSES.index(obj["name"])] = 1.0
        return image, target


class HeldOutSplit:
    """A deterministic train/test split of a dataset that ships as one pool (SUN397, Caltech-101): 20% of the
    images (seeded permutation) are the test set. Ours, not an official partition."""

    def __init__(self, dataset, split, fraction=0.2, seed=0):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
        cut = int(round(fraction * len(dataset)))
        self.dataset, self.indices = dataset, sorted(order[:cut] if split == "test" else order[cut:])
        self.classes = getattr(dataset, "classes", None) or getattr(dataset, "categories", None)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.dataset[self.indices[index]]


FAIRFACE_CLASSES = {  # the attribute values of FairFace's CSVs, in the order of its README
    "race": ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern"),
    "gender": ("Male", "Female"),
    "age": ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70"),
}


class FairFace:
    """FairFace as distributed (github.com/joojs/fairface): a folder holding fairface_label_train.csv and
    fairface_label_val.csv (columns file, age, gender, race, service_test; `file` is "train/1.jpg") and the train/
    and val/ image folders (either of its two crops, padding 0.25 or 1.25). The target is one attribute (race, gender,
    age) or the 14 race x gender classes ("race_gender", CLIP's intersectional label set). FairFace has no test split:
    its val is the held-out set ("test" here), and the probe holds part of train out to choose its L2 strength."""

    def __init__(self, root, split, attribute, transform):
        csv_name = {"train": "fairface_label_train.csv", "test": "fairface_label_val.csv"}[split]
        path = os.path.join(root, csv_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {csv_name} in {root} (FairFace's labels and its train/ and val/ folders)")
        if attribute == "race_gender":
            self.classes = [f"{race} {gender}" for race in FAIRFACE_CLASSES["race"]
                            for gender in FAIRFACE_CLASSES["gender"]]
        else:
            self.classes = list(FAIRFACE_CLASSES[attribute])
        self.notes = []  # what the user should know about the split (printed by the scripts: fairface_notes)
        rows = _fairface_rows(path, root)
        self.samples, lines = [], {}  # lines: a file's first line
        for line, file, row in rows:
            value = f"{row['race']} {row['gender']}" if attribute == "race_gender" else row[attribute]
            if value not in self.classes:
                raise ValueError(f"{path}, line {line}: {attribute} {value!r} is not one of FairFace's")
            if file in lines:
                continue  # a duplicate row: counted in the note below, never scored twice
            lines[file] = line
            self.samples.append((os.path.join(root, file), self.classes.index(value)))
        if len(rows) > len(self.samples):
            duplicate = next(line for line, file, _ in rows if lines[file] != line)
            self.notes.append(f"{path}: {len(rows) - len(self.samples)} duplicate row(s) of a file already listed "
                              f"dropped (the first at line {duplicate})")
        train_csv = os.path.join(root, "fairface_label_train.csv")
        if split == "test" and os.path.isfile(train_csv):
            overlap = sorted(set(lines) & {file for _, file, _ in _fairface_rows(train_csv, root)})
            if overlap:
                self.notes.append(f"{path}: {len(overlap)} validation image(s) are also in training (the first: "
                                  f"{overlap[0]}): the test accuracy is not on unseen faces")
        self.targets = [label for _, label in self.samples]
        absent = [name for label, name in enumerate(self.classes) if label not in set(self.targets)]
        if absent:
            self.notes.append(f"{path}: no image of {', '.join(absent)}: "
                              + ("the probe cannot learn them" if split == "train" else
                                 f"the mean and the worst class are over the {len(self.classes) - len(absent)} "
                                 "classes it has"))
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        if not os.path.isfile(path):
            raise UnreadableImage(f"{path}: no such file")
        image = load_image(path)
        return (self.transform(image) if self.transform else image), label


def _fairface_rows(path, root):
    """[(line, file relative to root, row)] of a FairFace CSV; one line naming the file and the line for a header
    without FairFace's columns, a CSV of no rows, or a `file` that leaves the FairFace folder (absolute, `..`)."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a byte order mark before the header
        reader = csv.DictReader(f)
        missing = {"file", "race", "gender", "age"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: its header lacks the column(s) {', '.join(sorted(missing))}")
        rows = []
        for row in reader:
            file = row["file"] or ""
            normal = os.path.normpath(file)
            if os.path.isabs(file) or normal == ".." or normal.startswith(".." + os.sep) or not file:
                raise ValueError(f"{path}, line {reader.line_num}: file {file!r} is not a path inside {root}")
            rows.append((reader.line_num, normal, row))
    if not rows:
        raise ValueError(f"{path} has a header and no rows")
    return rows


def fairface_notes(*splits):
    """Print the notes of FairFace splits (duplicates, training images in validation, absent classes) once."""
    for dataset in splits:
        for note in getattr(dataset, "notes", ()):
            print(f"note: {note}", file=sys.stderr)


def _fairface(attribute):
    def open_split(root, split, transform, download):
        if download:
            raise UserError("FairFace cannot be downloaded automatically: get it from github.com/joojs/fairface and "
                            "unpack it under <data-root>/fairface")
        if split == "val":
            return None  # no validation split: the probe holds out part of train
        return FairFace(os.path.join(root, "fairface"), split, attribute, transform)
    return open_split


def _without_val(open_split):
    """For datasets with no validation split: None for "val" (the probe then holds out part of train)."""
    return lambda root, split, transform, download: None if split == "val" else open_split(root, split, transform,
                                                                                           download)


def _pool(dataset_class):
    """A dataset that ships as one pool, split by HeldOutSplit."""
    return _without_val(lambda root, split, transform, download: HeldOutSplit(
        dataset_class(root, transform=transform, download=download), split))


# name: (root, split in {"train", "val", "test"}, transform, download) -> dataset, or None when it has no such split
TORCHVISION_DATASETS = {
    "cifar10": _without_val(lambda root, split, t, d: datasets.CIFAR10(root, train=split == "train",
                                                                             transform=t, download=d)),
    "cifar100": _without_val(lambda root, split, t, d: datasets.CIFAR100(root, train=split == "train",
                                                                               transform=t, download=d)),
    "aircraft": lambda root, split, t, d: datasets.FGVCAircraft(root, split=split, transform=t, download=d),
    "cars": _without_val(lambda root, split, t, d: datasets.StanfordCars(root, split=split, transform=t,
                                                                                download=d)),
    "dtd": lambda root, split, t, d: datasets.DTD(root, split=split, transform=t, download=d),
    "flowers": lambda root, split, t, d: datasets.Flowers102(root, split=split, transform=t, download=d),
    "pets": _without_val(lambda root, split, t, d: datasets.OxfordIIITPet(
        root, split="trainval" if split == "train" else "test", transform=t, download=d)),
    "sun397": _pool(datasets.SUN397),
    "caltech101": _pool(datasets.Caltech101),
    "food101": _without_val(lambda root, split, t, d: datasets.Food101(root, split=split, transform=t,
                                                                              download=d)),
    "voc2007": lambda root, split, t, d: VOCMultiLabel(datasets.VOCDetection(
        root, year="2007", image_set=split, transform=t, download=d)),
    "fairface": _fairface("race"),
    "fairface_gender": _fairface("gender"),
    "fairface_age": _fairface("age"),
    "fairface_race_gender": _fairface("race_gender"),
}


FAIRFACE_NAMES = tuple(name for name in TORCHVISION_DATASETS if name.startswith("fairface"))


def uses_named_dataset(args, folder_flags):
    """True when the data is --dataset, False when it is the script's image folders (`folder_flags`, e.g.
    ["--train-dir", "--val-dir"]); UserError when both are given, or neither in full."""
    folders = [getattr(args, flag.lstrip("-").replace("-", "_")) for flag in folder_flags]
    if args.dataset and any(folders):
        raise UserError(f"give either --dataset or {'/'.join(folder_flags)}, not both")
    if not args.dataset and not all(folders):
        raise UserError(f"give --dataset NAME, or {' and '.join(folder_flags)}")
    return bool(args.dataset)


def open_torchvision_split(name, root, split, transform, download):
    """Split `split` of the torchvision dataset `name`, or None if it has none; an absent dataset is a UserError."""
    try:
        return TORCHVISION_DATASETS[name](root, split, transform, download)
    except (RuntimeError, FileNotFoundError, OSError, ValueError) as err:  # torchvision: "Dataset not found..."
        # torchvision's hint names its own argument (download=True); ours is the --download flag
        reason = re.sub(r"\.?\s*You can use download=True to download it\.?", "", first_line(err))
        hint = "" if download else f"; add --download to fetch it into --data-root {root}"
        if name in FAIRFACE_NAMES:  # no download exists: say where it comes from, when it is absent
            hint = (f"; get it from github.com/joojs/fairface and unpack it under {os.path.join(root, 'fairface')}"
                    if isinstance(err, FileNotFoundError) else "")
        raise UserError(f"{name} {split} split under {root}: {reason}{hint}") from None


def dataset_identity(dataset, description):
    """What identifies a dataset's content for the feature cache: its description and a hash of its file list."""
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        digest = hashlib.sha256(json.dumps([[os.path.abspath(p), int(y)] for p, y in samples]).encode())
        return {**description, "samples": digest.hexdigest()[:16]}
    return {**description, "length": len(dataset)}


def class_names(dataset):
    """The class names of an ImageFolder or torchvision dataset (Caltech-101 calls them categories)."""
    names = getattr(dataset, "classes", None) or getattr(dataset, "categories", None)
    if not names:
        raise UserError(f"{type(dataset).__name__} does not list its classes")
    return list(names)


# ------------------------------------------------------------------------------------------------------------
# features
# ------------------------------------------------------------------------------------------------------------


def extract_features(encoder, dataset, batch_size, num_workers, device, desc="features"):
    """Frozen CLS features and targets of every image, in dataset order: ([N, D] float32, [N] or [N, C]) on CPU.

    bf16 autocast on GPU; a tqdm bar on stderr."""
    if len(dataset) == 0:
        raise UserError(f"{desc}: the split holds no images")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    features, targets = [], []
    for images, target in tqdm(batches(loader), total=len(loader), desc=desc, unit="batch"):
        with torch.inference_mode(), autocast:
            features.append(encoder(images.to(device, non_blocking=True)).float().cpu())
        targets.append(torch.as_tensor(target))
    return torch.cat(features), torch.cat(targets)


def cached_features(cache_dir, key, compute):
    """`compute()`'s (features, targets), stored under `cache_dir` by a hash of `key` and reused next time.

    Returns (features, targets, hit). The file is written atomically: a killed run leaves no partial cache. A
    cache file that does not load as plain tensors under this key (truncated, corrupt, another file's, or a
    pickle carrying code, which weights_only refuses) is recomputed and replaced, with a note."""
    key_text = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    path = os.path.join(cache_dir, f"{digest}.pt")
    if os.path.isfile(path):
        stored = _load_cache(path, key_text)
        if stored is not None:
            return stored["features"], stored["targets"], True
        print(f"note: feature cache {path} is unreadable or not this data's; recomputing it", file=sys.stderr)
    features, targets = compute()
    os.makedirs(cache_dir, exist_ok=True)
    with atomic_open(path) as f:
        torch.save({"features": features, "targets": targets, "key": key_text}, f)
    return features, targets, False


def _load_cache(path, key_text):
    """The cache file's dict if it is a well-formed one for `key_text`, else None."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged file raises anything from EOFError to UnpicklingError
        return None
    well_formed = (isinstance(stored, dict) and stored.get("key") == key_text
                   and torch.is_tensor(stored.get("features")) and torch.is_tensor(stored.get("targets"))
                   and len(stored["features"]) == len(stored["targets"]))
    return stored if well_formed else None


def standardise(fit, *others, eps=1e-6):
    """Zero mean, unit variance per dimension, with the statistics of `fit` applied to all: (fit, *others)."""
    mean, std = fit.mean(0), fit.std(0) + eps
    return tuple((x - mean) / std for x in (fit, *others))


# ------------------------------------------------------------------------------------------------------------
# logistic regression (L-BFGS)
# ------------------------------------------------------------------------------------------------------------


def fit_logistic_regression(features, targets, num_classes, weight_decay, max_iter=1000, tol=1e-6, init=None):
    """L2-regularised logistic regression by full-batch L-BFGS (torch.optim.LBFGS, strong Wolfe line search).

    Minimises  mean_i loss(W^T x_i + b, y_i) + weight_decay / 2 * ||W||^2   (the bias is not penalised),
    i.e. scikit-learn's LogisticRegression with C = 1 / (weight_decay * n).
    features [..., n, D]; targets [..., n] class ids (multinomial cross-entropy) or [..., n, C] multi-hot floats
    (one-vs-rest sigmoid, summed over classes: VOC2007). Leading dims are independent problems (few-shot
    episodes) solved at once: the summed objective is separable, so its optimum is every problem's optimum.
    init: (W, b) to warm-start from (the previous value of a sweep). Runs on the features' device.
    Returns (W [..., D, C], b [..., C]).
    """
    features = features.float()
    batch, n, dim = features.shape[:-2], features.shape[-2], features.shape[-1]
    weight = torch.zeros(*batch, dim, num_classes, device=features.device)
    bias = torch.zeros(*batch, num_classes, device=features.device)
    if init is not None:
        weight, bias = init[0].clone(), init[1].clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    multilabel = targets.dtype.is_floating_point
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=tol,
                                  tolerance_change=1e-12, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = features @ weight + bias.unsqueeze(-2)  # (..., n, C)
        if multilabel:
            data_loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / n
        else:
            data_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, num_classes), targets.reshape(-1),
                                                          reduction="sum") / n
        loss = data_loss + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def predict_logits(features, weight, bias):
    return features.float() @ weight + bias.unsqueeze(-2)
