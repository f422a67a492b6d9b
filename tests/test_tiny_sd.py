"""demo/tiny_sd.py: the random-weight Stable Diffusion that tests, benchmarks and the offline demo load from a
folder."""
import os

import pytest
import torch

from conftest import run_python
from demo import tiny_sd
from demo.tiny_sd import save_tiny_pipeline
from util.cli import run


def test_saved_pipeline_loads_back_exactly_offline(tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = save_tiny_pipeline(str(tmp_path / "tiny"), image_size=16)
    assert sorted(os.listdir(folder)) == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 8
    assert pipe.tokenizer.model_max_length == 77 and pipe.scheduler.config.steps_offset == 1
    again = save_tiny_pipeline(str(tmp_path / "again"), image_size=16)  # a fixed seed: the same weights
    other = StableDiffusionPipeline.from_pretrained(again, safety_checker=None, requires_safety_checker=False)
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(tensor, other.unet.state_dict()[name]), name
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red cat", height=16, width=16, num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 16, 16) and image.std() > 0.01


def test_image_size_must_be_a_multiple_of_8(tmp_path):
    with pytest.raises(ValueError, match="multiple of 8"):
        save_tiny_pipeline(str(tmp_path / "tiny"), image_size=20)


@pytest.mark.slow
def test_command_line_saves_the_pipeline(tmp_path):
    result = run_python("-m", "demo.tiny_sd", "--output", tmp_path / "tiny", "--image-size", "16")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "saved to" in result.stdout
    assert sorted(os.listdir(tmp_path / "tiny")) == ["model_index.json", "scheduler", "text_encoder", "tokenizer",
                                                     "unet", "vae"]


@pytest.mark.parametrize("args, message", [
    (["--output", "{tmp}/afile"], "cannot be written"),
    (["--output", "{tmp}/tiny", "--image-size", "20"], "multiple of 8"),
    (["--output", "{tmp}/tiny", "--image-size", "0"], "--image-size"),
    ([], "--output"),
])
def test_command_line_bad_input_is_one_line(args, message, tmp_path, capsys):
    (tmp_path / "afile").write_text("a file, not a folder")
    with pytest.raises(SystemExit) as exit_info:
        run(tiny_sd.main, tiny_sd.get_args_parser(), [a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert os.listdir(tmp_path) == ["afile"]
