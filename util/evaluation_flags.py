"""The flags the evaluation scripts share (encoder, results file, datasets), torch-free: the scripts build their
parsers from these before torch loads."""
from util.catalog import EVAL_DATASETS, FAIRFACE_DATASETS, VIT_SIZES
from util.cli import SEED, available_cpus, integer


def add_encoder_arguments(parser):
    group = parser.add_argument_group("encoder")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="encoder to evaluate: a pretrain.py checkpoint, an official StableRep "
                        "checkpoint, or a timm ViT state dict")
    source.add_argument("--raw-pixels", action="store_true", help="evaluate the pixels themselves (each image "
                        "flattened after the evaluation transform, at --image-size): the floor under every encoder")
    source.add_argument("--random-init", action="store_true", help="evaluate an untrained --model (timm's "
                        "initialisation, seeded by --seed): the baseline a trained encoder must beat")
    group.add_argument("--model", choices=list(VIT_SIZES), default=None, help="architecture; default what the "
                       "checkpoint records or its shapes say (required with --random-init)")
    group.add_argument("--image-size", type=integer(16), default=None, help="input size; default the checkpoint's "
                       "(224 for --random-init, the paper's); position embeddings are interpolated")


def add_run_arguments(parser, results_name, seed_help):
    """--seed and --output, which both evaluation scripts take."""
    parser.add_argument("--seed", type=SEED, default=0, help=seed_help)
    parser.add_argument("--output", default=None,
                        help="results file (JSON); default beside --checkpoint, named after the data, protocol and "
                             "changed settings")


def add_dataset_arguments(parser, folder_flags):
    """--dataset/--data-root/--download, the torchvision datasets by name, next to the script's folder flags."""
    group = parser.add_argument_group("data")
    for flag, help_text in folder_flags.items():
        group.add_argument(flag, default=None, help=help_text)
    group.add_argument("--dataset", choices=EVAL_DATASETS + FAIRFACE_DATASETS, default=None,
                       help="a dataset by name instead of image folders: the paper's 11 (torchvision's) or FairFace "
                            "under <data-root>/fairface")
    group.add_argument("--data-root", default="data",
                       help="where --dataset lives, or is downloaded to with --download (default: data)")
    group.add_argument("--download", action="store_true", help="download --dataset if absent (off: never "
                       "touch the network unless asked)")
    group.add_argument("--num-workers", type=integer(0), default=min(4, available_cpus()),
                       help=f"data-loading processes: 4, or the CPU cores this machine gives the process if fewer "
                            f"(here {min(4, available_cpus())})")
    group.add_argument("--cache-dir", default=None, help="feature cache; default feature_cache/ next to --output")
    return group
