"""experiments/findings.py in small: on the shapes stand-in, StableRep learns the shapes its captions name and its
broken variant (the same images under random captions) and an untrained encoder do not, scored by the L-BFGS linear
probe on world renderings of held-out captions labelled by the large object's shape (10 classes); and every config
of findings.py's table is one pretrain.py takes."""
import json

import pytest

import linear_probe
import pretrain
from demo import shapes
from experiments import findings
from util.cli import run

# 96 steps of 96 images, half the quick run's: the smallest measured to separate the rows (64 such steps, or 96
# steps of 48 images, leave broken level with StableRep)
CAPTIONS, IMAGES, CAPTIONS_PER_STEP, EPOCHS, PROBE_CAPTIONS = 384, 6, 16, 4, 300


def stage(module, argv):
    """A stage script's command, in this process (no second torch import), as `python <script>` runs it."""
    run(module.main, module.get_args_parser(), [str(a) for a in argv])


@pytest.fixture(scope="module")
def small_findings(tmp_path_factory):
    root = tmp_path_factory.mktemp("findings")
    scenes = shapes.sample_scenes(CAPTIONS, seed=0)
    probe = shapes.sample_scenes(2 * PROBE_CAPTIONS, seed=1, exclude=scenes)
    trees = {"stablerep": shapes.write_synthetic(scenes, str(root / "w2"), n=IMAGES, w=2.0),
             "broken": shapes.write_synthetic(scenes, str(root / "scrambled"), n=IMAGES, w=2.0, scrambled=True)}
    train = shapes.write_labelled(probe[:PROBE_CAPTIONS], str(root / "probe_train"), seed=1)
    test = shapes.write_labelled(probe[PROBE_CAPTIONS:], str(root / "probe_test"), seed=2)
    checkpoints = {"random_init": findings.random_init_checkpoint(0, str(root / "random_init"))}
    for name, tree in trees.items():
        stage(pretrain, ["--data", tree, "--output", root / name, "--loss", "stablerep", *findings.ENCODER,
                         *findings.BLUR, *findings.CONFIGS[name]["flags"], "--captions-per-gpu", CAPTIONS_PER_STEP,
                         "--images-per-caption", IMAGES, "--base-lr", findings.get_args_parser().get_default("base_lr"),
                         "--epochs", EPOCHS, "--warmup-epochs", 1, "--workers", 0, "--seed", 0, "--quiet"])
        checkpoints[name] = str(root / name / "encoder.pth")
    accuracy = {}
    for name, checkpoint in checkpoints.items():
        output = root / f"{name}_probe.json"
        stage(linear_probe, ["--protocol", "lbfgs", "--checkpoint", checkpoint, "--train-dir", train, "--val-dir", test,
                             "--wd-steps", 5, "--num-workers", 0, "--output", output])
        accuracy[name] = json.loads(output.read_text())["test"]
    return accuracy


@pytest.mark.slow
def test_working_beats_broken_and_beats_random(small_findings):
    assert small_findings["stablerep"] > small_findings["broken"] + 5, small_findings
    assert small_findings["stablerep"] > small_findings["random_init"] + 5, small_findings


def test_every_config_trains_the_same_images_a_step_and_whole_epochs():
    for name, spec in findings.CONFIGS.items():
        if spec is None:
            continue
        assert spec["captions"] * spec["m"] * spec["crops"] == findings.IMAGES_PER_STEP, name
        assert findings.CAPTIONS % spec["captions"] == 0, name
        assert (findings.get_args_parser().get_default("steps") * spec["captions"]) % findings.CAPTIONS == 0, name
