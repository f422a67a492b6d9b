"""Image-text evaluations of a model with a text tower (StableRep+, CLIP): ARO's compositionality benchmark and
zero-shot classification with prompt ensembles.

ARO (Yuksekgonul et al., ICLR 2023, github.com/mertyg/vision-language-models-are-bows) scores each image against its
caption and perturbed ones; a case is right when the true caption has the highest cosine similarity:

    vg_relation     Visual Genome crops, "the horse is eating the grass" vs "the grass is eating the horse";
                    accuracy per relation, macro-averaged over the relations, symmetric ones left out
    vg_attribution  "the paved road and the white house" vs "the white road and the paved house"; macro over the
                    attribute pairs with at least 25 cases
    coco_order      COCO (Karpathy test split, 5 captions an image) and Flickr30k (test split): each caption against
    flickr30k_order four shufflings of its words (nouns and adjectives among themselves, the other words, within
                    trigrams, the trigrams); accuracy over all cases

    python compositionality.py --checkpoint runs/stablerep_plus/checkpoint-00050000.pth --aro-root aro \
        --coco-root coco --flickr-root flickr30k
    python compositionality.py --checkpoint runs/clip/checkpoint-00050000.pth --zero-shot-dir imagenet/val

Files as the benchmark distributes them: --aro-root holds visual_genome_relation.json, visual_genome_attribution.json
and images/; --coco-root coco_karpathy_test.json and the images it names (val2014/...); --flickr-root
flickr30k_test.json and the images it names. The word-order shufflings tag parts of speech with spaCy's
en_core_web_sm (pip install spacy && python -m spacy download en_core_web_sm) and split words for the trigram ones with
NLTK's Treebank-style tokenizer, both as the benchmark does, and are drawn from --seed. Ties (an
order-blind model scores a caption and its shufflings the same) go to the first option, as the benchmark's argmax gives
them (--ties split: 1/k when k options share the top score). Zero-shot: each class folder's name (underscores as
spaces) in every --templates prompt, the prompts' normalised embeddings averaged per class. Results go to
compositionality.json beside the checkpoint (compositionality_ties-split.json with --ties split).
"""
import argparse
import json
import math
import os
import re
import reprlib

from util.cli import SEED, ArgumentParser, UserError, first_line, integer, parse_command_line, run
from util.files import atomic_write_json, check_creatable

SUBSETS = ("vg_relation", "vg_attribution", "coco_order", "flickr30k_order")
TIE_RULES = ("first", "split")  # the benchmark's argmax, and split credit
DEFAULT_TOKENIZER = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # pretrain.py's default: CLIP's BPE
# our prompt ensemble for zero-shot classification (--templates FILE replaces it, e.g. with CLIP's 80 for ImageNet)
TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a blurry photo of a {}.", "a close-up photo of a {}.",
             "a photo of a small {}.", "a photo of a large {}.", "art of the {}.")
MIN_ATTRIBUTE_CASES = 25  # the benchmark's floor for an attribute pair to count in VG-Attribution's macro accuracy
# relations whose two objects can be swapped and stay true: left out of VG-Relation's macro accuracy by the benchmark
# (the list of its notebook "Replicate ARO! VG-Relation, VG-Attribution")
SYMMETRIC_RELATIONS = frozenset((
    "adjusting", "attached to", "between", "bigger than", "biting", "boarding", "brushing", "chewing", "cleaning",
    "climbing", "close to", "coming from", "coming out of", "contain", "crossing", "dragging", "draped over",
    "drinking", "drinking from", "driving", "driving down", "driving on", "eating from", "eating in", "enclosing",
    "exiting", "facing", "filled with", "floating in", "floating on", "flying", "flying above", "flying in",
    "flying over", "flying through", "full of", "going down", "going into", "going through", "grazing in",
    "growing in", "growing on", "guiding", "hanging from", "hanging in", "hanging off", "hanging over",
    "higher than", "holding onto", "hugging", "in between", "jumping off", "jumping on", "jumping over", "kept in",
    "larger than", "leading", "leaning over", "leaving", "licking", "longer than", "looking in", "looking into",
    "looking out", "looking over", "looking through", "lying next to", "lying on top of", "making", "mixed with",
    "mounted on", "moving", "on the back of", "on the edge of", "on the front of", "on the other side of", "opening",
    "painted on", "parked at", "parked beside", "parked by", "parked in", "parked in front of", "parked near",
    "parked next to", "perched on", "petting", "piled on", "playing", "playing in", "playing on", "playing with",
    "pouring", "reaching for", "reading", "reflected on", "riding on", "running in", "running on",
    "running through", "seen through", "sitting behind", "sitting beside", "sitting by", "sitting in front of",
    "sitting near", "sitting next to", "sitting under", "skiing down", "skiing on", "sleeping in", "sleeping on",
    "smiling at", "sniffing", "splashing", "sprinkled on", "stacked on", "standing against", "standing around",
    "standing behind", "standing beside", "standing in front of", "standing near", "standing next to",
    "staring at", "stuck in", "surrounding", "swimming in", "swinging", "talking to", "topped with", "touching",
    "traveling down", "traveling on", "tying", "typing on", "underneath", "wading in", "waiting for",
    "walking across", "walking by", "walking down", "walking next to", "walking through", "working in",
    "working on", "worn on", "wrapped around", "wrapped in", "by", "of", "near", "next to", "with", "beside",
    "on the side of", "around"))


def get_args_parser():
    parser = ArgumentParser("compositionality.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- model ----
    group = parser.add_argument_group("model")
    group.add_argument("--checkpoint", required=True,
                       help="a model with a text tower: pretrain.py --loss stablerep+ or clip, or an official "
                            "StableRep+ checkpoint")
    group.add_argument("--tokenizer", default=None,
                       help="CLIPTokenizer (hub id or folder); default the checkpoint's, else Stable Diffusion v1.5's "
                            "(CLIP's BPE)")
    group.add_argument("--text-heads", type=integer(1), default=None,
                       help="attention heads of the text tower when the checkpoint does not record them (official "
                            "ones do not); default width / 64, CLIP's (8 at width 512)")
    group.add_argument("--image-size", type=integer(16), default=None, help="input size; default the checkpoint's")
    # ---- benchmarks ----
    group = parser.add_argument_group("benchmarks")
    group.add_argument("--aro-root", default=None, help="VG-Relation and VG-Attribution: visual_genome_relation.json, "
                       "visual_genome_attribution.json, images/")
    group.add_argument("--coco-root", default=None, help="COCO-Order: coco_karpathy_test.json and its images")
    group.add_argument("--flickr-root", default=None, help="Flickr30k-Order: flickr30k_test.json and its images")
    group.add_argument("--subsets", nargs="+", choices=SUBSETS, default=None,
                       help="ARO subsets to run; default every one whose root is given")
    group.add_argument("--keep-symmetric", action="store_true",
                       help="count VG-Relation's symmetric relations too (the benchmark leaves them out)")
    group.add_argument("--ties", choices=TIE_RULES, default="first",
                       help="a tie at the top score: first, the benchmark's argmax (the first option wins); split, 1/k "
                            "credit")
    group.add_argument("--max-words", type=integer(1), default=30,
                       help="COCO and Flickr captions are cut to this many words; 30, the benchmark's")
    group.add_argument("--zero-shot-dir", default=None,
                       help="ImageFolder to classify zero-shot, each class folder's name as its label")
    group.add_argument("--templates", default=None, metavar="FILE",
                       help="prompt templates for zero-shot, one a line with {} for the class name (default: the 7 of "
                            "TEMPLATES)")
    # ---- run ----
    group = parser.add_argument_group("run")
    group.add_argument("--batch-size", type=integer(1), default=256, help="images (or captions) per forward pass")
    group.add_argument("--num-workers", type=integer(0), default=4, help="data-loading processes")
    group.add_argument("--seed", type=SEED, default=0, help="the word-order shufflings of COCO and Flickr30k")
    group.add_argument("--output", default=None, help="results file (JSON); default compositionality.json beside "
                       "--checkpoint, tagged with a changed --ties")
    return parser


if __name__ == "__main__":  # the command line is read before torch loads (2 s): --help and a bad flag answer at once
    command_line = parse_command_line(get_args_parser())

# the imports below load torch: after the command line, see above
import numpy as np
import torch
import torchvision

import augment
from util import checkpoints
from util import evaluation as ev
from util import tokenizer as tokenizer_lib
from util.results import MADE_BY, check_output, default_name, jsonable

# ------------------------------------------------------------------------------------------------------------
# the benchmark's cases
# ------------------------------------------------------------------------------------------------------------


def read_json_list(path, what):
    if not os.path.isfile(path):
        raise UserError(f"{what}: no file {path} (the benchmark's files, and where to get them: docs/RUNNING.md, "
                        "Evaluation data)")
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not JSON ({first_line(err)})") from None
    except RecursionError:  # arrays or objects nested thousands deep: no benchmark file is
        raise UserError(f"{path} is nested too deep to be one of the benchmark's files") from None
    if not isinstance(items, list) or not items:
        raise UserError(f"{path} holds no list of cases")
    return items


def text_field(value, where):
    """A caption as the benchmark files hold it: a non-blank string of valid Unicode (JSON's \\ud800 escapes can
    give lone surrogates, which no tokenizer encodes); one line naming `where` otherwise."""
    if not isinstance(value, str):
        raise UserError(f"{where} is {type(value).__name__} {reprlib.repr(value)}, not a caption")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{where} holds a lone surrogate (\\ud800-\\udfff): not text") from None
    if not value.strip():
        raise UserError(f"{where} is blank")
    return value


def image_inside(root, relative, where):
    """root/relative for a path a benchmark file names, which must stay inside root: one line for an absolute
    path, one leaving it through `..`, or one that is not a string."""
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise UserError(f"{where} is not an image path")
    normal = os.path.normpath(relative)
    if os.path.isabs(relative) or normal == ".." or normal.startswith(".." + os.sep):
        raise UserError(f"{where} {relative!r} leaves {root}")
    return os.path.join(root, normal)


def crop_box(item, where):
    """(x, y, w, h) of a Visual Genome case: finite numbers, x and y >= 0, w and h > 0 (the part inside the image
    is checked when it is read: CaseImages)."""
    try:
        box = tuple(item[key] for key in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
    except KeyError as err:
        raise UserError(f"{where} lacks {first_line(err)}") from None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box) \
            or box[0] < 0 or box[1] < 0 or box[2] <= 0 or box[3] <= 0:
        raise UserError(f"{where}: its box (x, y, w, h) {box!r} is not a region of an image")
    return tuple(float(v) for v in box)


def visual_genome_cases(root, subset):
    """The cases of VG-Relation or VG-Attribution: {"image": (path, box), "options": [false, true], "answer": 1,
    "group": the relation, or the attribute pair "a_b"}."""
    name = {"vg_relation": "visual_genome_relation.json", "vg_attribution": "visual_genome_attribution.json"}[subset]
    cases = []
    for number, item in enumerate(read_json_list(os.path.join(root, name), f"--aro-root {root}")):
        where = f"{os.path.join(root, name)}: case {number}"
        if not isinstance(item, dict):
            raise UserError(f"{where} is not an object")
        try:
            box = crop_box(item, where)
            group = item["relation_name"] if subset == "vg_relation" else "_".join(
                text_field(a, f"{where}'s attribute") for a in item["attributes"][:2])
            text_field(group, f"{where}'s relation_name")
            image = image_inside(os.path.join(root, "images"), item["image_path"], f"{where}'s image_path")
            options = [text_field(item[key], f"{where}'s {key}") for key in ("false_caption", "true_caption")]
            cases.append({"image": (image, box), "options": options, "answer": 1, "group": group})
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{where} lacks {first_line(err)}") from None
    return cases


def pre_caption(caption, max_words):
    """The benchmark's caption cleaning: lower case, . ! " ( ) * # : ; ~ as spaces, spaces collapsed, cut to
    max_words words."""
    caption = re.sub(r"\s{2,}", " ", re.sub(r"[.!\"()*#:;~]", " ", caption.lower())).strip()
    return " ".join(caption.split(" ")[:max_words])


def word_tokens(text):
    """The words of a caption as the benchmark's trigram shufflings split it (nltk.word_tokenize): NLTK's
    Treebank-style tokenizer, which keeps "t-shirt", "3.5", "10:30", "o'clock" and "1,000" whole and splits
    contractions ("is", "n't"). word_tokenize first splits the text into sentences with Punkt, whose data is a
    download; this is word_tokenize on the caption as one sentence (preserve_line=True), the same for a caption of one
    sentence (FIDELITY.md: captions of two, and nltk's versions)."""
    from nltk.tokenize import NLTKWordTokenizer  # here, not at the top: nltk takes 2 s to import, only Order uses it
    return NLTKWordTokenizer().tokenize(text)


NOUN_TAGS, ADJECTIVE_TAGS = ("NN", "NNS", "NNP", "NNPS"), ("JJ", "JJR", "JJS")


def shufflings(caption, tagger, rng):
    """The benchmark's four perturbations of a caption, in its order: nouns among nouns and adjectives among
    adjectives; every other word among themselves; within each trigram; the trigrams. tagger: text -> [(token,
    Penn tag)]; rng: a numpy Generator."""
    tagged = tagger(caption)
    words = np.array([token for token, _ in tagged], dtype=object)

    def permuted(positions):
        out = words.copy()
        out[positions] = words[positions][rng.permutation(len(positions))]
        return out

    nouns = [i for i, (_, tag) in enumerate(tagged) if tag in NOUN_TAGS]
    adjectives = [i for i, (_, tag) in enumerate(tagged) if tag in ADJECTIVE_TAGS]
    others = [i for i, (_, tag) in enumerate(tagged) if tag not in NOUN_TAGS + ADJECTIVE_TAGS]
    nouns_and_adjectives = permuted(nouns)
    nouns_and_adjectives[adjectives] = words[adjectives][rng.permutation(len(adjectives))]
    tokens = word_tokens(caption)
    trigrams = [tokens[i:i + 3] for i in range(0, len(tokens), 3)]
    within = [[trigram[j] for j in rng.permutation(len(trigram))] for trigram in trigrams]
    across = [trigrams[j] for j in rng.permutation(len(trigrams))]
    return [" ".join(nouns_and_adjectives), " ".join(permuted(others)),
            " ".join(" ".join(t) for t in within), " ".join(" ".join(t) for t in across)]


def order_cases(root, subset, tagger, max_words, seed):
    """The cases of COCO-Order or Flickr30k-Order: every caption of every test image, {"image": (path, None),
    "options": [caption, its four shufflings], "answer": 0}, all cleaned by pre_caption; the shufflings of case k
    drawn from (seed, k)."""
    name = {"coco_order": "coco_karpathy_test.json", "flickr30k_order": "flickr30k_test.json"}[subset]
    flag = {"coco_order": "--coco-root", "flickr30k_order": "--flickr-root"}[subset]
    cases = []
    for number, item in enumerate(read_json_list(os.path.join(root, name), f"{flag} {root}")):
        if not isinstance(item, dict) or "image" not in item or not isinstance(item.get("caption"), list):
            raise UserError(f"{os.path.join(root, name)}: entry {number} has no image and caption list")
        where = f"{os.path.join(root, name)}: entry {number}"
        image = image_inside(root, item["image"], f"{where}'s image")
        for k, caption in enumerate(item["caption"]):
            text_field(caption, f"{where}'s caption {k}")
            rng = np.random.default_rng([seed, len(cases)])
            options = [caption] + shufflings(caption, tagger, rng)
            cases.append({"image": (image, None),
                          "options": [pre_caption(text, max_words) for text in options], "answer": 0})
    return cases


def load_tagger():
    """spaCy's en_core_web_sm as a function text -> [(token, Penn Treebank tag)], the benchmark's tagger."""
    try:
        import spacy
        nlp = spacy.load("en_core_web_sm")
    except (ImportError, OSError):
        raise UserError("COCO-Order and Flickr30k-Order shuffle words by part of speech with spaCy, as the "
                        "benchmark does: pip install spacy && python -m spacy download en_core_web_sm") from None
    return lambda text: [(token.text, token.tag_) for token in nlp(text)]


# ------------------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------------------


def credit(scores, answer, ties="first"):
    """Per case: 1 when the answer alone has the top score, 0 when it misses the top; a tie at the top goes to the first
    option there with ties="first" (the benchmark's np.argmax: the false caption on VG, the true one on Order), 1/k of
    a point to each of the k options with ties="split". scores [cases, options]."""
    at_top = scores == scores.max(dim=1, keepdim=True).values
    if ties == "split":
        return at_top[:, answer].float() / at_top.sum(1)
    return (at_top[:, answer] & ~at_top[:, :answer].any(1)).float()  # no option before the answer reaches the top


def subset_accuracy(subset, cases, correct, keep_symmetric=False):
    """The benchmark's number for a subset, in percent: macro over relations (symmetric ones left out) for
    VG-Relation, macro over attribute pairs with >= 25 cases for VG-Attribution, over all cases for the Order sets.
    Returns {"accuracy", "cases_counted", "groups" (per relation / pair: accuracy and count), "micro"}."""
    result = {"micro": 100 * correct.mean().item(), "cases": len(cases)}
    if subset not in ("vg_relation", "vg_attribution"):
        return {**result, "accuracy": result["micro"], "cases_counted": len(cases)}
    groups = {}
    for case, value in zip(cases, correct.tolist()):
        groups.setdefault(case["group"], []).append(value)
    if subset == "vg_relation" and not keep_symmetric:
        groups = {g: v for g, v in groups.items() if g not in SYMMETRIC_RELATIONS}
    if subset == "vg_attribution":
        groups = {g: v for g, v in groups.items() if len(v) >= MIN_ATTRIBUTE_CASES}
    per_group = {g: {"accuracy": 100 * sum(v) / len(v), "cases": len(v)} for g, v in sorted(groups.items())}
    macro = sum(g["accuracy"] for g in per_group.values()) / len(per_group) if per_group else math.nan
    return {**result, "accuracy": macro, "cases_counted": sum(len(v) for v in groups.values()), "groups": per_group}


class CaseImages:
    """The distinct images of the cases (path, optional crop box), transformed: index -> (tensor, 0)."""

    def __init__(self, keys, transform):
        self.keys, self.transform = keys, transform

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, index):
        path, box = self.keys[index]
        if not os.path.isfile(path):
            raise ev.UnreadableImage(f"{path}: no such file")
        image = ev.load_image(path).convert("RGB")
        if box is not None:  # the benchmark crops Visual Genome images to the relation's box
            x, y, w, h = box
            if x >= image.width or y >= image.height:  # nothing of the image in it: a black crop, never scored
                raise ev.UnreadableImage(f"{path}: the case's box {box} lies outside the {image.width}x"
                                         f"{image.height} image")
            image = image.crop((x, y, min(x + w, image.width), min(y + h, image.height)))  # the part inside
        return self.transform(image), 0


def image_transform(image_size):
    """CLIP's evaluation geometry (shorter side to the input size, bicubic, centre crop), ImageNet normalisation (the
    encoder's training)."""
    transforms = torchvision.transforms
    return transforms.Compose([transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(image_size), transforms.ToTensor(),
                               transforms.Normalize(augment.IMAGENET_MEAN, augment.IMAGENET_STD)])


def image_embeddings(model, dataset, batch_size, num_workers, device, desc):
    """L2-normalised joint-space embeddings of every image: [N, E]."""
    tower = lambda images: model.image_projection(model.visual(images))  # noqa: E731
    features, _ = ev.extract_features(tower, dataset, batch_size, num_workers, device, desc=desc)
    return torch.nn.functional.normalize(features, dim=-1)


def text_embeddings(model, tokenizer, texts, batch_size, device):
    """L2-normalised embeddings of `texts` (list of str): [len(texts), E]."""
    context = model.text.positional_embedding.shape[0]
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer_lib.tokenize(tokenizer, texts[start:start + batch_size], context).to(device)
        with torch.inference_mode():
            out.append(torch.nn.functional.normalize(model.text(tokens).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0)


def score_cases(model, tokenizer, cases, transform, args, device, subset):
    """Cosine similarity of each case's image with each of its options: [cases, options]."""
    keys = sorted({case["image"] for case in cases}, key=str)
    image_index = {key: i for i, key in enumerate(keys)}
    images = image_embeddings(model, CaseImages(keys, transform), args.batch_size, args.num_workers, device,
                              f"{subset} images")
    texts = sorted({text for case in cases for text in case["options"]})
    text_index = {text: i for i, text in enumerate(texts)}
    captions = text_embeddings(model, tokenizer, texts, args.batch_size, device)
    rows = torch.tensor([image_index[case["image"]] for case in cases])
    options = torch.tensor([[text_index[text] for text in case["options"]] for case in cases])
    return (images[rows, None, :] * captions[options]).sum(-1)  # (cases, options)


def zero_shot(model, tokenizer, dataset, templates, args, device):
    """Top-1 and mean per-class accuracy (%) of the prompt-ensemble classifier on an ImageFolder."""
    names = [name.replace("_", " ") for name in ev.class_names(dataset)]
    prompts = [template.format(name) for name in names for template in templates]
    per_prompt = text_embeddings(model, tokenizer, prompts, args.batch_size, device)
    classes = torch.nn.functional.normalize(per_prompt.view(len(names), len(templates), -1).mean(1), dim=-1)
    images = image_embeddings(model, dataset, args.batch_size, args.num_workers, device, "zero-shot images")
    labels = torch.tensor(dataset.targets)
    predicted = (images @ classes.T).argmax(1)
    correct = (predicted == labels).float()
    per_class = [correct[labels == c].mean().item() for c in range(len(names)) if (labels == c).any()]
    return {"top1": 100 * correct.mean().item(), "mean_per_class": 100 * sum(per_class) / len(per_class),
            "classes": len(names), "images": len(labels), "templates": list(templates)}


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------


def chosen_subsets(args):
    roots = {"vg_relation": args.aro_root, "vg_attribution": args.aro_root, "coco_order": args.coco_root,
             "flickr30k_order": args.flickr_root}
    flags = {"vg_relation": "--aro-root", "vg_attribution": "--aro-root", "coco_order": "--coco-root",
             "flickr30k_order": "--flickr-root"}
    subsets = args.subsets if args.subsets is not None else [s for s in SUBSETS if roots[s]]
    for subset in subsets:
        if not roots[subset]:
            raise UserError(f"--subsets {subset} needs {flags[subset]}")
        if not os.path.isdir(roots[subset]):
            raise UserError(f"{flags[subset]} {roots[subset]} is not a folder")
    if not subsets and not args.zero_shot_dir:
        raise UserError("nothing to evaluate: give --aro-root, --coco-root, --flickr-root or --zero-shot-dir")
    return subsets, roots


def read_templates(path):
    if path is None:
        return list(TEMPLATES)
    if not os.path.isfile(path):
        raise UserError(f"--templates {path} does not exist")
    with open(path, encoding="utf-8") as f:
        templates = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise UserError(f"--templates {path}: every line needs one {{}} for the class name"
                        + (f" ({bad[0]!r} has not)" if bad else " (the file has none)"))
    return templates


def results_path(args, subsets):
    """--output, or compositionality.json beside the checkpoint, named after what made the numbers
    (util.results.default_name): the subsets unless all four, the zero-shot folder, each changed setting
    (compositionality_ties-split.json), the checkpoint unless encoder.pth; so a result of other settings or
    another checkpoint is never replaced."""
    parts = [] if list(subsets) == list(SUBSETS) else list(subsets) or ["no-aro"]
    if args.zero_shot_dir:
        parts += ["zero-shot", ev.folder_name(args.zero_shot_dir)]
    parts += ev.changed_settings(args, get_args_parser(), ("ties", "keep_symmetric", "max_words"))
    return args.output or default_name("compositionality", parts, args.checkpoint)


def made_by(args, subsets, roots):
    """What made the numbers, as the results file records it (util.results)."""
    return jsonable({
        "script": "compositionality.py", "checkpoint": os.path.abspath(args.checkpoint),
        "aro": {subset: os.path.abspath(roots[subset]) for subset in subsets},
        "zero_shot": os.path.abspath(args.zero_shot_dir) if args.zero_shot_dir else None,
        "settings": {key: getattr(args, key) for key in ("tokenizer", "text_heads", "image_size", "ties",
                                                         "keep_symmetric", "max_words", "templates", "seed")}})


def main(args):
    # ---- arguments and output (checked here, written only at the end) ----
    subsets, roots = chosen_subsets(args)
    templates = read_templates(args.templates)
    output, recipe = results_path(args, subsets), made_by(args, subsets, roots)
    if os.path.isdir(output):
        raise UserError(f"--output {output} is a folder; name the results file")
    check_creatable(os.path.dirname(os.path.abspath(output)), "--output")
    check_output(output, recipe, [args.checkpoint, args.templates, args.zero_shot_dir,
                                  *(roots[subset] for subset in subsets)])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # ---- model and tokenizer ----
    try:
        model, heads, recorded = checkpoints.load_image_text_model(args.checkpoint, args.text_heads, args.image_size)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(first_line(err)) from None
    tokenizer_name = args.tokenizer or recorded.get("tokenizer") or DEFAULT_TOKENIZER
    tokenizer = tokenizer_lib.load_tokenizer(tokenizer_name)
    model.text.eos_token_id = tokenizer.eos_token_id  # the token whose state the text tower pools
    if len(tokenizer) > model.text.token_embedding.num_embeddings:
        raise UserError(f"the tokenizer {tokenizer_name!r} has {len(tokenizer)} tokens, the text tower "
                        f"{model.text.token_embedding.num_embeddings}: pass the tokenizer it was trained with")
    model = model.to(device)
    transform = image_transform(model.visual.config["image_size"])
    zero_shot_set = ev.open_image_folder(args.zero_shot_dir, transform) if args.zero_shot_dir else None

    # ---- ARO ----
    results = {"checkpoint": os.path.abspath(args.checkpoint), "tokenizer": tokenizer_name, "text_heads": heads,
               "tie_rule": args.ties, "aro": {}, "args": vars(args), MADE_BY: recipe}
    tagger = None
    if any(s.endswith("_order") for s in subsets):
        import nltk  # the Order subsets' word tokenizer (word_tokens), whose splits changed across its releases
        tagger, results["word_tokenizer"] = load_tagger(), f"nltk {nltk.__version__} NLTKWordTokenizer"
    for subset in subsets:
        if subset.startswith("vg_"):
            cases = visual_genome_cases(roots[subset], subset)
        else:
            cases = order_cases(roots[subset], subset, tagger, args.max_words, args.seed)
        scores = score_cases(model, tokenizer, cases, transform, args, device, subset)
        correct = credit(scores, cases[0]["answer"], args.ties)
        results["aro"][subset] = {**subset_accuracy(subset, cases, correct, args.keep_symmetric),
                                  "ties": int((scores == scores.max(1, keepdim=True).values).sum(1).gt(1).sum())}

    # ---- zero-shot ----
    if zero_shot_set is not None:
        results["zero_shot"] = {"data_dir": os.path.abspath(args.zero_shot_dir),
                                **zero_shot(model, tokenizer, zero_shot_set, templates, args, device)}

    # ---- save ----
    atomic_write_json(output, results)
    print(f"image-text evaluations of {args.checkpoint} (ARO ties: {args.ties})")
    for subset, row in results["aro"].items():
        print(f"  ARO {subset:<16} {row['accuracy']:6.2f}  ({row['cases_counted']} of {row['cases']} cases counted)")
    if "zero_shot" in results:
        row = results["zero_shot"]
        print(f"  zero-shot top-1      {row['top1']:6.2f}  ({row['classes']} classes, {len(templates)} templates)")
    print(f"results: {output}")
    return results


if __name__ == "__main__":
    run(main, get_args_parser(), args=command_line)
