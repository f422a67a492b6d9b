"""compositionality.py: ARO's scoring against hand-computed values and the benchmark's own rule (np.argmax: a tie goes
to the first option, so a model blind to word order scores 0% on the VG subsets, whose first option is the false
caption, and 100% on the Order subsets, whose first is the true one; with --ties split exactly 50% and 20%), the
benchmark's words (NLTK's tokenizer), perturbations and file layouts on a tiny fixture, zero-shot classification, every
checkpoint kind with a text tower, and one-line errors."""
import importlib.util
import itertools
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import compositionality as comp
import model as model_lib
from demo.tiny_sd import _write_tokenizer_files
from util import checkpoints
from util.cli import run

# the fixture's words and their Penn tags (the tests' stand-in for spaCy, which is not a test dependency)
LEXICON = {"a": "DT", "the": "DT", "dog": "NN", "cat": "NN", "grass": "NN", "horse": "NN", "road": "NN",
           "house": "NN", "brown": "JJ", "white": "JJ", "red": "JJ", "small": "JJ", "on": "IN", "eating": "VBG",
           "is": "VBZ", "sits": "VBZ", "near": "IN", ".": "."}


def lexicon_tagger(text):
    return [(token, LEXICON.get(token.lower(), "NN")) for token in comp.word_tokens(text)]


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    from transformers import CLIPTokenizer
    folder = str(tmp_path_factory.mktemp("tokenizer"))
    vocab, merges, _ = _write_tokenizer_files(folder)
    CLIPTokenizer(vocab, merges, model_max_length=77).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def plus_checkpoint(tmp_path_factory, tokenizer_folder):
    """A tiny StableRep+ model in pretrain.py's format (the args record the text tower's heads and tokenizer)."""
    from util.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(tokenizer_folder)
    torch.manual_seed(0)
    text = model_lib.TextTransformer(len(tokenizer), tokenizer.eos_token_id, 77, 32, 1, 2, 16)
    model = model_lib.StableRepModel(model_lib.build_vit("vit_tiny", image_size=32, depth=2),
                                     model_lib.ProjectionHead(192, 64, 16), text)
    path = tmp_path_factory.mktemp("plus") / "checkpoint-00000010.pth"
    torch.save({"model": model.state_dict(), "step": 10, "args": {"model": "vit_tiny", "image_size": 32,
                                                                  "text_heads": 2, "tokenizer": tokenizer_folder}},
               path)
    return str(path)


def write_aro(root):
    """VG-Relation (2 relations, 3 cases each), VG-Attribution (26 cases of one pair, 3 of another) and COCO-Order
    (2 images x 2 captions) in the benchmark's layout."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "val2014").mkdir()
    for name in ("vg1.jpg", "val2014/coco1.jpg", "val2014/coco2.jpg"):
        folder = root / ("images" if name.startswith("vg") else "")
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / name)
    box = {"bbox_x": 4, "bbox_y": 2, "bbox_w": 40, "bbox_h": 30}
    relations = [{"image_path": "vg1.jpg", **box, "relation_name": relation, "true_caption": true,
                  "false_caption": false}
                 for relation, true, false in [("eating", "the horse is eating the grass",
                                                "the grass is eating the horse")] * 3
                 + [("on", "the cat is on the road", "the road is on the cat")] * 3]
    attributes = [{"image_path": "vg1.jpg", **box, "attributes": pair, "true_caption": f"the {pair[0]} road and "
                   f"the {pair[1]} house", "false_caption": f"the {pair[1]} road and the {pair[0]} house"}
                  for pair in [["white", "red"]] * 26 + [["small", "brown"]] * 3]
    coco = [{"image": "val2014/coco1.jpg", "caption": ["A brown dog sits on the grass.", "a dog on the grass"]},
            {"image": "val2014/coco2.jpg", "caption": ["the white horse is eating the red grass.",
                                                       "a small cat near a house"]}]
    for name, content in (("visual_genome_relation.json", relations), ("visual_genome_attribution.json", attributes),
                          ("coco_karpathy_test.json", coco)):
        (root / name).write_text(json.dumps(content))
    return str(root)


@pytest.fixture(scope="module")
def aro(tmp_path_factory):
    return write_aro(tmp_path_factory.mktemp("aro"))


def args_for(*argv):
    return comp.get_args_parser().parse_args([str(a) for a in argv])


def test_defaults_are_the_benchmarks():
    args = args_for("--checkpoint", "x")
    assert (args.max_words, args.keep_symmetric, comp.MIN_ATTRIBUTE_CASES) == (30, False, 25)
    assert args.ties == "first"  # the benchmark's np.argmax
    assert comp.SUBSETS == ("vg_relation", "vg_attribution", "coco_order", "flickr30k_order")
    assert {"next to", "near", "with"} <= comp.SYMMETRIC_RELATIONS and "eating" not in comp.SYMMETRIC_RELATIONS


# ---- scoring by hand ----

def test_credit_splits_ties_and_accuracy_is_macro_where_the_benchmark_says():
    scores = torch.tensor([[0.1, 0.9], [0.5, 0.5], [0.7, 0.2], [0.3, 0.3]])
    assert comp.credit(scores, 1, "split").tolist() == [1.0, 0.5, 0.0, 0.5]
    five = torch.tensor([[1.0, 1, 0, 1, 0], [2.0, 1, 1, 1, 1]])
    assert comp.credit(five, 0, "split").tolist() == [pytest.approx(1 / 3), 1.0]
    cases = [{"group": g} for g in ["eating"] * 3 + ["on"] + ["near"] * 2]  # "near" is symmetric: left out
    correct = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    relation = comp.subset_accuracy("vg_relation", cases, correct)
    assert relation["accuracy"] == pytest.approx(100 * (2 / 3 + 0) / 2) and relation["cases_counted"] == 4
    assert relation["micro"] == pytest.approx(100 * 4 / 6)
    assert comp.subset_accuracy("vg_relation", cases, correct, keep_symmetric=True)["accuracy"] == \
        pytest.approx(100 * (2 / 3 + 0 + 1) / 3)
    attribute_cases = [{"group": "white_red"}] * 25 + [{"group": "small_brown"}] * 24  # the second: < 25 cases
    attributes = comp.subset_accuracy("vg_attribution", attribute_cases, torch.cat([torch.ones(5), torch.zeros(44)]))
    assert attributes["accuracy"] == pytest.approx(20.0) and list(attributes["groups"]) == ["white_red"]
    order = comp.subset_accuracy("coco_order", [{}] * 4, torch.tensor([1.0, 0.2, 0.0, 1.0]))
    assert order["accuracy"] == pytest.approx(55.0)


def benchmark_correct(scores, answer):
    """The benchmark's rule (evaluate_scores in dataset_zoo/aro_datasets.py): the prediction is np.argmax over the
    options, which takes the first of tied maxima; right when it is the true caption's index (1 on VG, whose options
    are [false, true]; 0 on Order, whose options are [caption, four shufflings])."""
    return torch.tensor(np.argmax(np.asarray(scores), axis=-1) == answer, dtype=torch.float32)


def test_ties_go_to_the_first_option_as_the_benchmarks_argmax_gives_them():
    scores = torch.tensor([[0.1, 0.9], [0.5, 0.5], [0.7, 0.2], [0.3, 0.3]])
    assert comp.credit(scores, 1).tolist() == [1.0, 0.0, 0.0, 0.0]  # a VG tie goes to the false caption
    five = torch.tensor([[1.0, 1, 0, 1, 0], [2.0, 1, 1, 1, 1], [0.0, 1, 0, 1, 0]])
    assert comp.credit(five, 0).tolist() == [1.0, 1.0, 0.0]  # an Order tie goes to the true caption
    assert comp.credit(five, 1).tolist() == [0.0, 0.0, 1.0] and comp.credit(five, 3).tolist() == [0.0, 0.0, 0.0]
    rng = np.random.default_rng(0)
    for options in (2, 5):  # scores from three values: most cases tie
        scores = torch.tensor(rng.integers(0, 3, (500, options)), dtype=torch.float32)
        for answer in range(options):
            assert torch.equal(comp.credit(scores, answer, "first"), benchmark_correct(scores, answer))
    order = torch.tensor(rng.integers(0, 3, (500, 5)), dtype=torch.float32)
    assert comp.subset_accuracy("coco_order", [{}] * 500, comp.credit(order, 0))["accuracy"] == \
        pytest.approx(100 * benchmark_correct(order, 0).mean().item())


def test_shufflings_move_the_benchmarks_words_and_keep_them_all():
    caption = "A brown dog sits on the grass."
    rng = np.random.default_rng(0)
    shuffled = comp.shufflings(caption, lexicon_tagger, rng)
    tokens = comp.word_tokens(caption)
    assert len(shuffled) == 4 and all(Counter(s.split(" ")) == Counter(tokens) for s in shuffled)
    nouns_adjectives, others = shuffled[0].split(" "), shuffled[1].split(" ")

    def kind(token):
        tag = LEXICON[token.lower()]
        return "noun" if tag in comp.NOUN_TAGS else "adjective" if tag in comp.ADJECTIVE_TAGS else "other"

    for i, token in enumerate(tokens):  # nouns stay on noun positions, adjectives on theirs, the rest on theirs
        if kind(token) == "other":
            assert nouns_adjectives[i] == token and kind(others[i]) == "other"
        else:
            assert kind(nouns_adjectives[i]) == kind(token) and others[i] == token
    trigrams = [tokens[i:i + 3] for i in range(0, len(tokens), 3)]
    within = shuffled[2].split(" ")
    assert [sorted(within[i:i + 3]) for i in range(0, len(within), 3)] == [sorted(t) for t in trigrams]
    assert shuffled[3].split(" ") in [sum(order, []) for order in itertools.permutations(trigrams)]
    assert comp.shufflings(caption, lexicon_tagger, np.random.default_rng(0)) == shuffled  # seeded
    assert comp.word_tokens("the dog's bone isn't red.") == ["the", "dog", "'s", "bone", "is", "n't", "red", "."]
    assert comp.pre_caption('A "Dog": on (the) grass!  ok.', 4) == "a dog on the"


# the words of the issue that our regular expression split and NLTK keeps whole, as nltk 3.7 to 3.10 split them
NLTK_WORDS = {
    "A man in a t-shirt takes a close-up.": ["A", "man", "in", "a", "t-shirt", "takes", "a", "close-up", "."],
    "a 3.5 inch screen at 10:30": ["a", "3.5", "inch", "screen", "at", "10:30"],
    "a clock at ten o'clock": ["a", "clock", "at", "ten", "o'clock"],
    "about 1,000 birds": ["about", "1,000", "birds"],
    "the dog's bone isn't red.": ["the", "dog", "'s", "bone", "is", "n't", "red", "."],
    'a "big" dog (brown)': ["a", "``", "big", "''", "dog", "(", "brown", ")"],
}


def test_words_are_nltks_and_need_no_download(monkeypatch):
    """word_tokens is NLTK's tokenizer as the benchmark's nltk.word_tokenize runs it on a caption of one sentence,
    with no NLTK data: word_tokenize itself first splits sentences with Punkt, whose data is a download."""
    import nltk
    monkeypatch.setattr(nltk.data, "path", [])  # no NLTK data anywhere: any lookup fails
    monkeypatch.setattr(nltk, "download", lambda *args, **kwargs: pytest.fail("nltk.download was called"))
    for caption, words in NLTK_WORDS.items():
        assert comp.word_tokens(caption) == words == nltk.word_tokenize(caption, preserve_line=True) == \
            nltk.tokenize.NLTKWordTokenizer().tokenize(caption)
    with pytest.raises(LookupError):
        nltk.word_tokenize("A dog. A cat.")  # the benchmark's call wants Punkt's data
    assert comp.word_tokens("A dog. A cat.") == ["A", "dog.", "A", "cat", "."]  # Punkt would give "dog", "."
    shuffled = comp.shufflings("A man in a t-shirt sits at 10:30", lexicon_tagger, np.random.default_rng(0))
    trigrams = [["A", "man", "in"], ["a", "t-shirt", "sits"], ["at", "10:30"]]  # the benchmark's trigram boundaries
    within = shuffled[2].split(" ")
    assert [sorted(within[i:i + 3]) for i in range(0, len(within), 3)] == [sorted(t) for t in trigrams]
    assert shuffled[3].split(" ") in [sum(order, []) for order in itertools.permutations(trigrams)]


def order_blind(model):
    """The model with a text tower that sees each caption's tokens sorted: blind to word order by construction."""
    tower = model.text.forward
    model.text.forward = lambda tokens: tower(tokens.sort(dim=1).values)
    return model


@pytest.mark.slow
def test_an_order_blind_model_scores_as_the_benchmark_scores_ties_or_at_chance_when_split(aro, plus_checkpoint,
                                                                                          tokenizer_folder):
    """Every option of every case ties: the benchmark's rule gives VG's to the false caption (0%) and Order's to the
    true one (100%); split credit gives chance (50% on two options, 20% on five)."""
    from util.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(tokenizer_folder)
    model, heads, _ = checkpoints.load_image_text_model(plus_checkpoint, eos_token_id=tokenizer.eos_token_id)
    assert heads == 2
    model = order_blind(model)
    args = args_for("--checkpoint", plus_checkpoint, "--num-workers", 0)
    transform = comp.image_transform(32)
    device = torch.device("cpu")
    for subset, expected in (("vg_relation", 50.0), ("vg_attribution", 50.0)):
        cases = comp.visual_genome_cases(aro, subset)
        scores = comp.score_cases(model, tokenizer, cases, transform, args, device, subset)
        assert (scores == scores[:, :1]).all()  # every case a tie
        assert comp.subset_accuracy(subset, cases, comp.credit(scores, 1, "split"))["accuracy"] == \
            pytest.approx(expected)
        first = comp.subset_accuracy(subset, cases, comp.credit(scores, 1))["accuracy"]
        assert first == comp.subset_accuracy(subset, cases, benchmark_correct(scores, 1))["accuracy"] == 0.0
    cases = comp.order_cases(aro, "coco_order", lexicon_tagger, 30, seed=0)
    assert len(cases) == 4 and all(len(case["options"]) == 5 for case in cases)
    assert cases[0]["options"][0] == "a brown dog sits on the grass"  # pre_caption'd
    scores = comp.score_cases(model, tokenizer, cases, transform, args, device, "coco_order")
    assert (scores == scores[:, :1]).all()
    assert comp.subset_accuracy("coco_order", cases, comp.credit(scores, 0, "split"))["accuracy"] == \
        pytest.approx(20.0)
    first = comp.subset_accuracy("coco_order", cases, comp.credit(scores, 0))["accuracy"]
    assert first == comp.subset_accuracy("coco_order", cases, benchmark_correct(scores, 0))["accuracy"] == 100.0


# ---- end to end ----

@pytest.mark.slow
def test_runs_aro_and_zero_shot_end_to_end(tmp_path, aro, plus_checkpoint, digit_folders, monkeypatch, capsys):
    monkeypatch.setattr(comp, "load_tagger", lambda: lexicon_tagger)
    out = tmp_path / "results.json"
    results = comp.main(args_for("--checkpoint", plus_checkpoint, "--aro-root", aro, "--coco-root", aro,
                                 "--zero-shot-dir", digit_folders[1], "--num-workers", 0, "--output", out))
    saved = json.loads(out.read_text())
    assert sorted(saved["aro"]) == ["coco_order", "vg_attribution", "vg_relation"] and saved["text_heads"] == 2
    assert saved["aro"]["vg_relation"]["cases_counted"] == 6 and saved["aro"]["vg_attribution"]["cases_counted"] == 26
    for row in saved["aro"].values():
        assert 0 <= row["accuracy"] <= 100
    assert saved["zero_shot"]["classes"] == 10 and saved["zero_shot"]["images"] == 450
    assert saved["zero_shot"]["templates"] == list(comp.TEMPLATES) and 0 <= saved["zero_shot"]["top1"] <= 100
    assert saved["aro"] == results["aro"] and "ARO coco_order" in capsys.readouterr().out
    assert saved["tie_rule"] == "first" and saved["args"]["ties"] == "first"
    import nltk
    assert saved["word_tokenizer"] == f"nltk {nltk.__version__} NLTKWordTokenizer"


def test_results_are_named_after_what_made_them(tmp_path):
    """The benchmark's rule on all four subsets of encoder.pth keeps the name compositionality.json; split credit,
    fewer subsets, a zero-shot folder and another checkpoint of the run each get a file of their own."""
    run = tmp_path / "run"
    encoder, checkpoint = run / "encoder.pth", run / "checkpoint-00000010.pth"

    def name(*argv):
        args = args_for(*argv)
        return os.path.basename(comp.results_path(args, args.subsets or comp.SUBSETS))
    assert name("--checkpoint", encoder) == name("--checkpoint", encoder, "--ties", "first") == "compositionality.json"
    assert name("--checkpoint", encoder, "--ties", "split") == "compositionality_ties-split.json"
    assert name("--checkpoint", checkpoint) == "compositionality_checkpoint-00000010.json"
    assert name("--checkpoint", encoder, "--subsets", "vg_relation") == "compositionality_vg_relation.json"
    assert name("--checkpoint", encoder, "--zero-shot-dir", tmp_path / "flowers" / "test") == \
        "compositionality_zero-shot_flowers_test.json"
    args = args_for("--checkpoint", checkpoint, "--ties", "split", "--output", tmp_path / "r.json")
    assert comp.results_path(args, comp.SUBSETS) == str(tmp_path / "r.json")


def test_an_official_stablerep_plus_checkpoint_scores_as_ours(tmp_path, plus_checkpoint, tokenizer_folder):
    """The official code's names (CLIP's text tower, [in, out] projections, DDP prefix, Namespace args)."""
    import argparse
    ours = torch.load(plus_checkpoint, weights_only=True)["model"]
    official = {}
    for key, value in ours.items():
        name = key
        for theirs, mine in checkpoints.OFFICIAL_TEXT_NAMES if key.startswith("text.") else ():
            name = name.replace(mine, theirs)
        if key in checkpoints.OFFICIAL_PROJECTIONS.values():
            name = next(k for k, v in checkpoints.OFFICIAL_PROJECTIONS.items() if v == key)
            value = value.T
        official[f"module.{name}"] = value
    path = tmp_path / "official_plus.pth"
    torch.save({"model": official, "epoch": 3, "args": argparse.Namespace(model="base")}, path)
    eos = len(ours["text.token_embedding.weight"]) - 1  # the tiny tokenizer's <|endoftext|>
    a, _, _ = checkpoints.load_image_text_model(plus_checkpoint, eos_token_id=eos)
    b, heads, _ = checkpoints.load_image_text_model(str(path), text_heads=2, eos_token_id=eos)
    assert heads == 2
    tokens = torch.cat([torch.randint(0, 500, (3, 11)), torch.full((3, 1), eos)], dim=1)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(b.text(tokens), a.text(tokens))
        torch.testing.assert_close(b.image_projection(b.visual(images)), a.image_projection(a.visual(images)))


# ---- damaged or hostile benchmark files: one line each ----

VG_CASE = {"image_path": "vg1.jpg", "bbox_x": 4, "bbox_y": 2, "bbox_w": 40, "bbox_h": 30, "relation_name": "on",
           "true_caption": "the cat is on the road", "false_caption": "the road is on the cat"}


@pytest.mark.parametrize("damage, message", [
    ({"true_caption": 7}, "true_caption is int 7, not a caption"),
    ({"false_caption": None}, "false_caption is NoneType"),
    ({"true_caption": ["a", "b"]}, "true_caption is list"),
    ({"true_caption": "a \ud800 cat"}, "holds a lone surrogate"),
    ({"true_caption": "   "}, "true_caption is blank"),
    ({"bbox_w": 0}, "is not a region of an image"),
    ({"bbox_x": -3}, "is not a region of an image"),
    ({"bbox_h": float("nan")}, "is not a region of an image"),
    ({"bbox_y": "2"}, "is not a region of an image"),
    ({"image_path": "../../../etc/passwd"}, "image_path '../../../etc/passwd' leaves"),
    ({"image_path": "/etc/passwd"}, "image_path '/etc/passwd' leaves"),
    ({"relation_name": 3}, "relation_name is int"),
])
def test_a_damaged_visual_genome_case_is_one_line(tmp_path, damage, message):
    (tmp_path / "visual_genome_relation.json").write_text(json.dumps([VG_CASE, {**VG_CASE, **damage}]))
    with pytest.raises(comp.UserError, match=f"case 1.*{message}"):
        comp.visual_genome_cases(str(tmp_path), "vg_relation")


def test_deep_nesting_coco_captions_and_boxes_outside_the_image_are_one_line(tmp_path):
    (tmp_path / "visual_genome_relation.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(comp.UserError, match="nested too deep"):
        comp.visual_genome_cases(str(tmp_path), "vg_relation")
    for captions, message in (([3], "caption 0 is int"), (["a dog", ""], "caption 1 is blank"),
                              ([None], "caption 0 is NoneType")):
        (tmp_path / "coco_karpathy_test.json").write_text(json.dumps([{"image": "a.jpg", "caption": captions}]))
        with pytest.raises(comp.UserError, match=f"entry 0's {message}"):
            comp.order_cases(str(tmp_path), "coco_order", lexicon_tagger, 30, 0)
    (tmp_path / "coco_karpathy_test.json").write_text(json.dumps([{"image": "../x.jpg", "caption": ["a dog"]}]))
    with pytest.raises(comp.UserError, match="entry 0's image '../x.jpg' leaves"):
        comp.order_cases(str(tmp_path), "coco_order", lexicon_tagger, 30, 0)
    Image.new("RGB", (64, 48)).save(tmp_path / "vg.jpg")
    images = comp.CaseImages([(str(tmp_path / "vg.jpg"), (70.0, 2.0, 10.0, 10.0)),
                              (str(tmp_path / "vg.jpg"), (50.0, 40.0, 30.0, 30.0))], lambda image: image.size)
    with pytest.raises(comp.ev.UnreadableImage, match="lies outside the 64x48 image"):
        images[0]
    assert images[1] == ((14, 8), 0)  # a box partly outside: the part inside


# ---- bad input: one line, exit code 2, nothing written ----

@pytest.mark.parametrize("case", ["no text tower", "nothing to do", "no json", "subset without root",
                                  "bad templates", "no spacy", "unknown tie rule"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, aro, plus_checkpoint, tiny_checkpoint, case):
    if case == "no spacy" and importlib.util.find_spec("spacy"):
        pytest.skip("spaCy is installed here")
    (tmp_path / "templates.txt").write_text("a photo of a dog\n")
    out = tmp_path / "out" / "results.json"
    argv, message = {
        "no text tower": (["--checkpoint", tiny_checkpoint, "--aro-root", aro], "has no text tower"),
        "nothing to do": (["--checkpoint", plus_checkpoint], "nothing to evaluate"),
        "no json": (["--checkpoint", plus_checkpoint, "--aro-root", tmp_path], "no file"),
        "subset without root": (["--checkpoint", plus_checkpoint, "--aro-root", aro, "--subsets", "coco_order"],
                                "needs --coco-root"),
        "bad templates": (["--checkpoint", plus_checkpoint, "--zero-shot-dir", aro, "--templates",
                           tmp_path / "templates.txt"], "one {} for the class name"),
        "no spacy": (["--checkpoint", plus_checkpoint, "--coco-root", aro], "pip install spacy"),
        "unknown tie rule": (["--checkpoint", plus_checkpoint, "--aro-root", aro, "--ties", "last"],
                             "argument --ties: invalid choice: 'last'"),
    }[case]
    with pytest.raises(SystemExit) as info:
        run(comp.main, comp.get_args_parser(), [str(a) for a in [*argv, "--output", out, "--num-workers", 0]])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
    assert not os.path.exists(os.path.join(os.path.dirname(plus_checkpoint), "compositionality.json"))
