"""JPEG decoding on the training device (pretrain.py --gpu-decode): the loader workers check each JPEG's header and
end and ship it undecoded with its drawn crop box; the batch is decoded where it trains (torchvision's batched
decode_jpeg, nvJPEG on a GPU) and cropped as augment.PretrainAugmentation would have cropped it."""
import io
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image

from augment import DECODE_ERRORS, decode_rgb, shorter_side_to

JPEG_MAGIC = b"\xff\xd8\xff"


def jpeg_size(data):
    """(height, width) of the JPEG file `data` from its header, after the cheap checks a worker can make without
    decoding it: it opens, and it ends with the end-of-image marker (a truncated file does not). One of
    DECODE_ERRORS otherwise. (Damage inside the entropy-coded data shows only when decoding: decode_crops.)"""
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        raise OSError("the JPEG has no end-of-image marker (truncated)")
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "JPEG":
            raise OSError(f"not a JPEG: {image.format}")
        width, height = image.size
    return height, width


class DeviceJpegs(NamedTuple):
    """The JPEGs of a batch to decode where the training runs, and where their crops go: a batch of N crops is
    the uint8 crops the loader workers made themselves (other formats), at rows `shipped`, and these J."""
    rows: torch.Tensor  # [J] long: the batch rows the JPEGs' crops fill
    data: torch.Tensor  # uint8, the J files' bytes one after another (one tensor: one buffer between processes)
    lengths: torch.Tensor  # [J] long: each file's bytes
    boxes: torch.Tensor  # [J, 4] long: the crop box (top, left, height, width) in the image, as drawn
    downsample: torch.Tensor  # [J] long: the shorter side of the down-and-up resize first, 0 for none
    shipped: torch.Tensor  # [N - J] long: the rows of the crops shipped with them

    @staticmethod
    def cat(parts, sizes):
        """One DeviceJpegs of several items' of `sizes` rows each, in order."""
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return DeviceJpegs(torch.cat([part.rows + start for part, start in zip(parts, starts)]),
                           torch.cat([part.data for part in parts]), torch.cat([part.lengths for part in parts]),
                           torch.cat([part.boxes for part in parts]), torch.cat([part.downsample for part in parts]),
                           torch.cat([part.shipped + start for part, start in zip(parts, starts)]))


def crop_decoded(pixels, resolution, box, size):
    """A decoded image [3, H, W] uint8 (any device) -> its crop [size, size, 3] uint8, as PretrainAugmentation.crop
    makes it (the optional down-and-up resize, the box, bilinear antialiased resizing), in float32 (torch resizes
    uint8 on the CPU only), rounded back to uint8: within two grey levels of the CPU path's (the down-and-up
    resize rounds in between there)."""
    x = pixels[None].float()  # [1, 3, H, W]
    if resolution:
        height, width = x.shape[-2:]
        x = F.interpolate(x, size=shorter_side_to(height, width, resolution), mode="bilinear", antialias=True,
                          align_corners=False)
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    top, left, height, width = box
    x = F.interpolate(x[..., top:top + height, left:left + width], size=(size, size), mode="bilinear",
                      antialias=True, align_corners=False)
    return x[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)  # [size, size, 3]


def _decode_one(data, device):
    """One JPEG on `device` as [3, H, W] uint8: torchvision's decoder there, else PIL on the CPU (a JPEG nvJPEG
    refuses: CMYK, arithmetic coding); None when neither can decode it."""
    from torchvision.io import ImageReadMode, decode_jpeg
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:
        return decode_rgb(io.BytesIO(data.numpy().tobytes())).permute(2, 0, 1).to(device)
    except DECODE_ERRORS:
        return None


def decode_crops(shipped, jpegs, rows, views):
    """The batch's uint8 crops [rows, S, S, 3] on the device of `shipped` (the crops the workers made, [N - J, S,
    S, 3]): the JPEGs of `jpegs` (DeviceJpegs) decoded there in one call of torchvision's decode_jpeg (nvJPEG on a
    GPU; libjpeg-turbo on the CPU, where this runs only as a check) and cropped as drawn. A JPEG the batched call
    refuses is decoded alone (then by PIL); one that nothing decodes is corrupt: its rows take a copy of another
    crop of the same caption (`views` rows a caption), never another caption's image. Returns (crops, corrupt)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = shipped.device
    crops = torch.empty((rows, *shipped.shape[1:]), dtype=torch.uint8, device=device)
    crops[jpegs.shipped.to(device)] = shipped
    files = list(torch.split(jpegs.data, jpegs.lengths.tolist()))
    try:
        decoded = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = [_decode_one(data, device) for data in files]
    failed = []
    for row, pixels, box, resolution in zip(jpegs.rows.tolist(), decoded, jpegs.boxes.tolist(),
                                            jpegs.downsample.tolist()):
        if pixels is None:
            failed.append(row)
        else:
            crops[row] = crop_decoded(pixels, resolution, box, crops.shape[1])
    for row in failed:
        caption = row // views
        good = [other for other in range(caption * views, (caption + 1) * views) if other not in failed]
        if not good:
            raise OSError(f"no image of the caption at rows {caption * views}-{(caption + 1) * views - 1} decodes")
        crops[row] = crops[good[0]]
    return crops, len(failed)
