"""What the stage scripts offer by name, without importing torch: the ViT sizes and the evaluation datasets.

The scripts' argument parsers list these as choices; model.py and evaluation.py build what the names stand for.
Keeping the names here (standard library only) lets `--help` and a bad flag answer at once: importing torch
alone takes about 2 s.
"""

VIT_SIZES = {  # name: (width, heads); patch 16, MLP ratio 4; depth 12 (vit_large: 24); timm's names and shapes
    "vit_tiny": (192, 3),
    "vit_small": (384, 6),
    "vit_base": (768, 12),
    "vit_large": (1024, 16),
}


def vit_name(width):
    """The VIT_SIZES name of a ViT of this width, or None."""
    return next((name for name, (size_width, _) in VIT_SIZES.items() if size_width == width), None)


# the paper's 11 fine-grained datasets, as torchvision names them (evaluation.TORCHVISION_DATASETS opens them)
EVAL_DATASETS = ("cifar10", "cifar100", "aircraft", "cars", "dtd", "flowers", "pets", "sun397", "caltech101",
                 "food101", "voc2007")

# FairFace (Karkkainen & Joo 2021), one name per attribute classified: the paper's fairness probe (evaluation.FairFace)
FAIRFACE_DATASETS = ("fairface", "fairface_gender", "fairface_age", "fairface_race_gender")
