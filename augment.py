"""The paper's augmentation (SimCLR's recipe, as the official StableRep code applies it), fast on one CPU core, and
its colour part batched on any device.

One crop of an image goes through two stages:

    PretrainAugmentation.crop(pixels)  uint8 [H, W, 3]: [down- and up-sampling], RandomResizedCrop -> [S, S, 3]
                                       uint8, and the crop's drawn ColorParams
    augment_crops(crops, params)       torch, batched: colour jitter (four ops in a random order) p=0.8,
                                       grayscale p=0.2, Gaussian blur p=0.5, horizontal flip, ImageNet normalisation

The data loader runs both on the CPU (the default), or only the first, and ships the uint8 crops with their
parameters to the training device, which runs the second on the whole batch (pretrain.py --gpu-augment). Every
parameter is drawn from torch's global generator, so an item seeded by (seed, epoch, caption) is the same whichever
stage runs where.

Where the speed comes from (the official pipeline is PIL + torchvision's v1 transforms on PIL images): the crop is
resized by torch's uint8 antialiased kernel for channels-last images (PIL's resampling, about 5x faster than PIL), and
everything after runs at crop size in float32 with few passes: brightness, contrast and saturation are blends, the
hue shift is the HSV hexcone rotation written as a distance on the hue circle (no HSV round trip), the blur is PIL's
three box passes folded into one separable kernel, and the flip and normalisation are single passes. The outputs
have the official pipeline's statistics (tests/test_data.py); `official_augmentation` rebuilds that pipeline as the
reference.

The self-supervised families of the paper's first question draw each crop from their own official recipe, a `View`
(a set of colour strengths and probabilities, solarisation, the resampling filter): MoCo v3's and BYOL's two
asymmetric views, DINO's two global views and its small local crops, MAE's crop and flip alone (VIEWS below). The
default View is SimCLR's, StableRep's, drawn exactly as before the families existed.
"""
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ColorJitter(0.4, 0.4, 0.4, 0.1): brightness, contrast and saturation factors in [0.6, 1.4], hue shift in
# [-0.1, 0.1] of a turn; the four ops are applied in a random order (the order matters through clamping)
JITTER_STRENGTH = (0.4, 0.4, 0.4, 0.1)
JITTER_P, GRAYSCALE_P, BLUR_P, FLIP_P = 0.8, 0.2, 0.5, 0.5
BLUR_SIGMA = (0.1, 2.0)
CROP_RATIO = (3 / 4, 4 / 3)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's convert("L") and torchvision's rgb_to_grayscale
LUMA_WEIGHTS = torch.tensor(LUMA)
# hue (sixths of a turn) where R, G, B are at their min: cyan, magenta, yellow; [1, 3, 1, 1]
HUE_ANCHORS = torch.tensor([3.0, 5.0, 1.0]).view(1, 3, 1, 1)
NORMALISE_SCALE = 1 / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)  # (x - mean) / std = x * scale + shift
NORMALISE_SHIFT = -torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * NORMALISE_SCALE
SOLARIZE_THRESHOLD = 128 / 255  # PIL's ImageOps.solarize: levels >= 128 are inverted


class View(NamedTuple):
    """One crop's recipe: ColorJitter strengths (brightness, contrast, saturation, hue) applied with jitter_p,
    grayscale, Gaussian blur (sigma U(blur_sigma), pixels) and solarisation probabilities, and the
    RandomResizedCrop's resampling filter. The defaults are SimCLR's (StableRep's); every view also flips with p 0.5
    and normalises."""
    jitter: tuple = JITTER_STRENGTH
    jitter_p: float = JITTER_P
    gray_p: float = GRAYSCALE_P
    blur_p: float = BLUR_P
    solarize_p: float = 0.0
    interpolation: str = "bilinear"
    blur_sigma: tuple = BLUR_SIGMA


class ColorParams(NamedTuple):
    """The drawn parameters of augment_crops for B crops (CPU tensors; one row per crop)."""
    jitter: torch.Tensor  # [B] bool, colour jitter applied
    order: torch.Tensor  # [B, 4] long, a permutation of (brightness, contrast, saturation, hue)
    factors: torch.Tensor  # [B, 4] float, brightness, contrast, saturation factors and the hue shift (turns)
    gray: torch.Tensor  # [B] bool, converted to grayscale
    sigma: torch.Tensor  # [B] float, Gaussian blur sigma in pixels, 0 = no blur
    flip: torch.Tensor  # [B] bool, flipped left-right
    solarize: torch.Tensor  # [B] bool, solarised

    @staticmethod
    def cat(params):
        """The rows of several ColorParams, in order."""
        return ColorParams(*(torch.cat(field) for field in zip(*params)))


def sample_color_params(view=View()):
    """One crop's ColorParams from torch's global generator, distributed as the official pipeline draws them for
    `view` (SimCLR's by default). A view with solarisation draws one more number, after the others: SimCLR's
    draws are the same as before views existed."""
    u = torch.rand(9).tolist()
    factors = [1 + strength * (2 * v - 1) for strength, v in zip(view.jitter[:3], u[1:4])]  # e.g. [0.6, 1.4]
    factors.append(view.jitter[3] * (2 * u[4] - 1))  # hue shift in [-0.1, 0.1] turns
    low, high = view.blur_sigma
    sigma = low + (high - low) * u[7] if u[6] < view.blur_p else 0.0
    solarize = float(torch.rand(())) < view.solarize_p if view.solarize_p > 0 else False
    return ColorParams(jitter=torch.tensor([u[0] < view.jitter_p]), order=torch.randperm(4)[None],
                       factors=torch.tensor([factors]), gray=torch.tensor([u[5] < view.gray_p]),
                       sigma=torch.tensor([sigma]), flip=torch.tensor([u[8] < FLIP_P]),
                       solarize=torch.tensor([solarize]))


# ---- the colour, blur and flip ops: float images in [0, 1], [n, 3, S, S], which they may modify in place, and a
# factor per image [n] (CPU or the images' device) ----

def _per_image(factor, x):
    """factor [n] as [n, 1, 1, 1] on x's device."""
    return factor.to(x.device).view(-1, 1, 1, 1)


def luma(x):
    """[n, 1, S, S] grey levels of RGB images [n, 3, S, S]."""
    r, g, b = x.unbind(1)
    return (r * LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2])[:, None]


def adjust_brightness(x, factor):
    """Blend with black: x * factor."""
    return x.mul_(_per_image(factor, x)).clamp_(0, 1)


def adjust_contrast(x, factor):
    """Blend with the image's mean grey level: factor * x + (1 - factor) * mean."""
    factor = _per_image(factor, x)
    mean = _per_image(x.mean((2, 3)) @ LUMA_WEIGHTS.to(x.device), x)  # [n, 1, 1, 1], the mean of luma(x)
    return x.mul_(factor).add_(mean * (1 - factor)).clamp_(0, 1)


def adjust_saturation(x, factor):
    """Blend with the image's own grayscale version: factor * x + (1 - factor) * luma."""
    return x.lerp_(luma(x), 1 - _per_image(factor, x)).clamp_(0, 1)


def adjust_hue(x, shift):
    """Rotate every pixel's HSV hue by `shift` turns (|shift| <= 1/6), keeping its value (max) and chroma
    (max - min), as an HSV round trip does.

    With the hue h in sixths of a turn, HSV -> RGB gives each channel max - chroma * f, where
    f = clamp(||h - anchor| - 3| - 1, 0, 1) and the anchors of R, G, B are 3, 5, 1 (f is 1 within 1 of the anchor,
    0 within 1 of the opposite point, linear between). The hue comes from whichever channel is the max, as in any
    RGB -> HSV conversion; the choice is made with 0/1 weights in lerps, which vectorise, rather than with masks."""
    top, bottom = x.amax(1), x.amin(1)  # [n, S, S]
    chroma = top - bottom
    safe = chroma.clamp_min(1e-12)  # grey pixels get some hue, and their chroma 0 keeps them grey
    r, g, b = x.unbind(1)
    not_r, not_g = (top - r).sign_(), (top - g).sign_()  # 0 where the channel is the max, else 1
    # hue x chroma: (g - b) when red is the max, 2 + (b - r) when green is, 4 + (r - g) when blue is
    hue = torch.lerp(g - b, torch.lerp((b - r).add_(safe, alpha=2), (r - g).add_(safe, alpha=4), not_g), not_r)
    hue.div_(safe).add_(6 * _per_image(shift, x)[:, 0])  # [n, S, S], in [-2, 6) sixths of a turn
    # |h - anchor| < 7, where the triangle wave above needs no modulo
    f = (hue[:, None] - HUE_ANCHORS.to(x.device)).abs_().sub_(3).abs_().sub_(1).clamp_(0, 1)  # [n, 3, S, S]
    return torch.addcmul(top[:, None], chroma[:, None], f, value=-1)


def to_grayscale(x):
    """The grey level in all three channels."""
    return luma(x).repeat(1, 3, 1, 1)


def blur_kernel(sigma):
    """The 1-D kernel of PIL's Gaussian blur of `sigma` pixels: three passes of an extended box filter (a box of
    radius l plus weight a on the next tap each side) of variance sigma^2 / 3 each (Gwosdek et al., SSVM 2011),
    convolved into one kernel of radius 3 (l + 1); float64 numpy [6 l + 7]."""
    variance = sigma ** 2 / 3
    whole = math.floor((math.sqrt(12 * variance + 1) - 1) / 2)  # l
    part = (2 * whole + 1) * (whole * (whole + 1) - 3 * variance) / (6 * (variance - (whole + 1) ** 2))  # a
    box = np.ones(2 * whole + 3)
    box[[0, -1]] = part
    box /= 2 * (whole + part) + 1
    return np.convolve(np.convolve(box, box), box)


def blur_kernels(sigma):
    """[n, K] float32 kernels (blur_kernel) of sigma [n], zero-padded at both ends to the widest."""
    kernels = [blur_kernel(value) for value in sigma.tolist()]
    width = max(len(kernel) for kernel in kernels)
    padded = np.zeros((len(kernels), width), dtype=np.float32)
    for row, kernel in zip(padded, kernels):
        row[(width - len(kernel)) // 2:(width + len(kernel)) // 2] = kernel
    return torch.from_numpy(padded)


def gaussian_blur(x, sigma):
    """PIL's Gaussian blur (the official pipeline's) with per-image sigma [n] (pixels), as one separable kernel per
    image; edges replicate the border pixel, as PIL does."""
    kernels = blur_kernels(sigma).to(x.device)  # [n, K]
    taps = kernels.shape[1]
    weights = kernels.t().reshape(taps, -1, 1, 1, 1).unbind(0)  # K of [n, 1, 1, 1]
    height, width = x.shape[2:]
    x = F.pad(x, (taps // 2,) * 4, mode="replicate")  # [n, 3, H + 2r, W + 2r]
    for dim, size in ((3, width), (2, height)):  # along the width (padded rows too), then the height
        blurred = x.narrow(dim, 0, size) * weights[0]
        for tap in range(1, taps):
            blurred.addcmul_(x.narrow(dim, tap, size), weights[tap])
        x = blurred
    return x  # [n, 3, H, W]


def flip(x):
    """Left-right."""
    return x.flip(3)


def solarize(x):
    """PIL's ImageOps.solarize: every level at or above 128 / 255 becomes 1 - level."""
    return torch.where(x >= SOLARIZE_THRESHOLD, 1 - x, x)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _apply(op, x, rows, *per_image):
    """op on the images `rows` (a list) of x [B, 3, S, S], with those rows of its per-image arguments [B]."""
    if not rows:
        return x
    if len(rows) == x.shape[0]:
        return op(x, *per_image)
    index = torch.tensor(rows, device=x.device)
    x[index] = op(x[index], *(argument[rows] for argument in per_image))
    return x


def augment_crops(crops, params):
    """uint8 crops [B, S, S, 3] (any device) and their ColorParams (CPU) -> normalised float32 [B, 3, S, S]:
    colour jitter (the four ops in each crop's order), grayscale, blur, solarisation, flip, ImageNet mean/std.
    Always float32, whatever autocast is active."""
    jitter, order = params.jitter.tolist(), params.order.tolist()
    factors = params.factors.unbind(1)  # brightness, contrast, saturation, hue: [B] each
    with torch.autocast(crops.device.type, enabled=False):
        x = crops.permute(0, 3, 1, 2).float().contiguous().div_(255)  # [B, 3, S, S] in [0, 1]
        for position in range(4):
            for op_index, op in enumerate(JITTER_OPS):
                rows = [i for i, on in enumerate(jitter) if on and order[i][position] == op_index]
                x = _apply(op, x, rows, factors[op_index])
        x = _apply(to_grayscale, x, [i for i, on in enumerate(params.gray.tolist()) if on])
        x = _apply(gaussian_blur, x, [i for i, sigma in enumerate(params.sigma.tolist()) if sigma > 0], params.sigma)
        x = _apply(solarize, x, [i for i, on in enumerate(params.solarize.tolist()) if on])
        x = _apply(flip, x, [i for i, on in enumerate(params.flip.tolist()) if on])
        return x.mul_(NORMALISE_SCALE.to(x.device)).add_(NORMALISE_SHIFT.to(x.device))  # (x - mean) / std


# ---- the crop stage (CPU, uint8) ----

# what PIL raises for a file it cannot decode: truncated or corrupt data, a header it cannot parse, or more pixels
# than twice Image.MAX_IMAGE_PIXELS (a decompression bomb). PIL fails cleanly where a C decoder may crash outright.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode_rgb(path):
    """uint8 [H, W, 3] pixels of an image file (decoded by PIL, as the official code does); raises one of
    DECODE_ERRORS on a corrupt, truncated or oversized file."""
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image if image.mode == "RGB" else image.convert("RGB")))


def resize(pixels, height, width, mode="bilinear"):
    """uint8 [h, w, 3] -> [height, width, 3], bilinear (or bicubic) and antialiased: torch's uint8 kernel for
    channels-last images, which computes PIL's resampling to within a grey level or two, several times faster
    than PIL."""
    image = pixels.permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)  # [1, 3, h, w]
    resized = F.interpolate(image, size=(height, width), mode=mode, antialias=True, align_corners=False)
    return resized[0].permute(1, 2, 0)  # [height, width, 3]


def shorter_side_to(height, width, size):
    """(height, width) scaled so the shorter side is `size`, the longer one truncated, as torchvision's Resize."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def down_and_up(pixels, resolution):
    """The image resized so its shorter side is `resolution`, then back to its own size: the official --downsample
    augmentation, which takes away the detail a low-resolution photo lacks. (The official code resizes back to a
    shorter side of 256, the size generate.py stores, so on such trees the two agree.)"""
    height, width = pixels.shape[:2]
    return resize(resize(pixels, *shorter_side_to(height, width, resolution)), height, width)


class PretrainAugmentation:
    """The paper's augmentation of one image into one crop: RandomResizedCrop(image_size, scale=crop_scale, ratio
    3/4-4/3), ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8 in a random order, grayscale p=0.2, PIL's Gaussian blur of
    sigma U(0.1, 2) p=0.5, horizontal flip, ImageNet mean/std; optionally, first, with probability downsample_prob the
    whole image is resized down to a resolution drawn uniformly from downsample_res and back up (official
    --downsample, off by default). `view` swaps the colour recipe and the resampling filter for another family's
    (View: MoCo v3's, BYOL's, DINO's, MAE's)."""

    def __init__(self, image_size, crop_scale=(0.08, 1.0), downsample_prob=0.0, downsample_res=(64, 128),
                 view=View()):
        self.image_size = image_size
        self.crop_scale = tuple(crop_scale)
        self.downsample_prob = downsample_prob
        self.downsample_res = tuple(downsample_res)
        self.view = view

    def draw(self, height, width):
        """Every random draw of one crop of a height x width image, from torch's global generator, in crop()'s order:
        (the shorter side of the down-and-up resize first, 0 for none; the crop box (top, left, height, width); its
        ColorParams). It needs the image's size only, so a JPEG's crop can be drawn before it is decoded."""
        resolution = 0
        if self.downsample_prob > 0 and float(torch.rand(())) < self.downsample_prob:
            resolution = self.downsample_res[int(torch.randint(len(self.downsample_res), ()))]
        size_only = torch.zeros((), dtype=torch.uint8).expand(3, height, width)  # get_params reads the shape alone
        box = T.RandomResizedCrop.get_params(size_only, self.crop_scale, CROP_RATIO)
        return resolution, box, sample_color_params(self.view)

    def crop(self, pixels):
        """uint8 [H, W, 3] image -> (uint8 [S, S, 3] crop, its ColorParams), drawn from torch's global generator."""
        resolution, (top, left, height, width), params = self.draw(*pixels.shape[:2])
        if resolution:
            pixels = down_and_up(pixels, resolution)
        return resize(pixels[top:top + height, left:left + width], self.image_size, self.image_size,
                      self.view.interpolation), params

    def __call__(self, pixels):
        """uint8 [H, W, 3] image -> normalised float32 [3, S, S]."""
        crop, params = self.crop(pixels)
        with torch.inference_mode():  # data, never differentiated: skips autograd's bookkeeping (6% of the time)
            return augment_crops(crop[None], params)[0]




# ---- the reference: the official pipeline's behaviour ----

class PILGaussianBlur:
    """PIL's Gaussian blur (three box blurs of the same variance) with sigma ~ U(0.1, 2), drawn from torch's
    generator (the official code draws it from Python's) so that a seed fixes the reference's output too."""

    def __call__(self, image):
        sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * float(torch.rand(()))
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))


class PILDownAndUp:
    """torchvision's Resize to a shorter side drawn uniformly from `resolutions`, then back to the image's own."""

    def __init__(self, resolutions):
        self.resolutions = tuple(resolutions)

    def __call__(self, image):
        resolution = self.resolutions[int(torch.randint(len(self.resolutions), ()))]
        return T.Resize(image.size[::-1])(T.Resize(resolution)(image))


def official_augmentation(image_size, crop_scale=(0.08, 1.0), downsample_prob=0.0, downsample_res=(64, 128),
                          view=View()):
    """The official StableRep pipeline's behaviour, rebuilt from torchvision's v1 transforms on PIL images: PIL image
    -> normalised float32 [3, S, S]. With another `view`, that family's official pipeline (main_moco.py,
    main_dino.py, main_pretrain.py, BYOL's Table 6), solarisation by PIL's ImageOps.solarize. The reference that
    tests/test_data.py compares PretrainAugmentation's statistics with and bench/bench_data.py times it against;
    training does not use it."""
    filters = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
    transforms = [
        T.RandomResizedCrop(image_size, scale=tuple(crop_scale), ratio=CROP_RATIO,
                            interpolation=filters[view.interpolation]),
        T.RandomApply([T.ColorJitter(*view.jitter)], p=view.jitter_p),
        T.RandomGrayscale(p=view.gray_p),
        T.RandomApply([PILGaussianBlur()], p=view.blur_p),
        T.RandomHorizontalFlip(p=FLIP_P),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    if view.solarize_p > 0:
        transforms.insert(4, T.RandomApply([ImageOps.solarize], p=view.solarize_p))
    if downsample_prob > 0:
        transforms.insert(0, T.RandomApply([PILDownAndUp(downsample_res)], p=downsample_prob))
    return T.Compose(transforms)
