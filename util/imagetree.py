"""The folder layout of an image-caption set: generate.py writes it (--output-format files), pretrain.py reads it
through dataindex.py, and the demo and the tests through read_tree.

    <root>/settings.json                   how the set was made (generate.py: model, scheduler, steps, w, seed, ...)
    <root>/00012/000012345.txt             the caption of caption id 12345 (UTF-8, one line)
    <root>/00012/000012345_00.jpg          image 0 of that caption, ..._01.jpg image 1, and so on
    <root>/00012/_index.json               written once the folder is complete: its captions and image names

A caption's id is its row in the captions file; caption id i lives in folder i // 1000 (generate.py's
--captions-per-shard, recorded in settings.json), so no folder holds more than 1000 captions (11,000 files at 10
images per caption). The 9-digit key and the `.txt` beside the image are img2dataset's `files` layout, so an
image-text set downloaded with img2dataset (one `<key>.jpg` per caption, no index) reads the same way. Every file
is written through a temporary name and a rename
(files.atomic_write_bytes): a killed writer leaves whole files or none, and readers skip the `.tmp*` leftovers.
"""
import io
import json
import os
from typing import List, NamedTuple

from util.files import atomic_write_bytes, atomic_write_json

CAPTIONS_PER_FOLDER = 1000
SETTINGS_FILE = "settings.json"
INDEX_FILE = "_index.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


class CaptionRecord(NamedTuple):
    caption_id: int  # row number in the captions file (img2dataset: the key)
    caption: str
    image_paths: List[str]  # absolute paths, in image-index order


def caption_key(caption_id):
    return f"{caption_id:09d}"


def folder_of(root, caption_id, per_folder=CAPTIONS_PER_FOLDER):
    return os.path.join(root, f"{caption_id // per_folder:05d}")


def caption_path(root, caption_id, per_folder=CAPTIONS_PER_FOLDER):
    return os.path.join(folder_of(root, caption_id, per_folder), caption_key(caption_id) + ".txt")


def image_name(caption_id, image_index, image_format="jpg"):
    return f"{caption_key(caption_id)}_{image_index:02d}.{image_format}"


def image_path(root, caption_id, image_index, image_format="jpg", per_folder=CAPTIONS_PER_FOLDER):
    return os.path.join(folder_of(root, caption_id, per_folder), image_name(caption_id, image_index, image_format))


def write_caption(root, caption_id, caption, per_folder=CAPTIONS_PER_FOLDER):
    os.makedirs(folder_of(root, caption_id, per_folder), exist_ok=True)
    atomic_write_bytes(caption_path(root, caption_id, per_folder), (caption + "\n").encode("utf-8"))


def encode_image(image, image_format="jpg", quality=95):
    """A PIL image as the bytes of a `jpg`, `png` or `webp` file."""
    buffer = io.BytesIO()
    options = {"quality": quality} if image_format in ("jpg", "webp") else {}
    image.save(buffer, format=PIL_FORMATS[image_format], **options)
    return buffer.getvalue()


def write_image(root, caption_id, image_index, image, image_format="jpg", quality=95,
                per_folder=CAPTIONS_PER_FOLDER):
    path = image_path(root, caption_id, image_index, image_format, per_folder)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_bytes(path, encode_image(image, image_format, quality))
    return path


def images_on_disk(folder, image_format="jpg"):
    """{caption id: {image index, ...}} of the `{key}_{k:02d}.{image_format}` files in `folder` ({} if none)."""
    present = {}
    if not os.path.isdir(folder):
        return present
    suffix = "." + image_format
    for name in os.listdir(folder):
        if name.startswith(".tmp") or not name.endswith(suffix):
            continue
        key, _, index = name[:-len(suffix)].partition("_")
        if key.isdigit() and index.isdigit():
            present.setdefault(int(key), set()).add(int(index))
    return present


def read_settings(root):
    """The tree's settings.json as a dict, or None when there is none. ValueError, one line, when something is
    there that is not a readable JSON object (a folder, damaged bytes)."""
    path = os.path.join(root, SETTINGS_FILE)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except (OSError, ValueError) as err:  # ValueError: not UTF-8, not JSON
        reason = err.strerror if isinstance(err, OSError) else err
        raise ValueError(f"{path} is not a readable settings file ({reason})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} is not a readable settings file (a JSON {type(settings).__name__}, not an object)")
    return settings


def write_settings(root, settings):
    atomic_write_json(os.path.join(root, SETTINGS_FILE), settings)


def caption_folders(root):
    """The tree's numbered caption folders ("00000", "00001", ...), sorted. ValueError with a one-line message for a
    missing folder or one that is not such a tree."""
    if not os.path.isdir(root):
        raise ValueError(f"data folder {root} does not exist")
    folders = sorted(name for name in os.listdir(root)
                     if name.isdigit() and os.path.isdir(os.path.join(root, name)))
    if not folders:
        raise ValueError(f"{root} is not an image tree (no numbered caption folders such as 00000/; "
                         "make one with generate.py or img2dataset --output_format files)")
    return folders


def list_folder(folder):
    """A caption folder's captions from a listing, without reading their text: [(key, caption file name, [image
    names])], sorted, for every key with a `.txt` and at least one image. Hidden files (temporary files, locks) and
    `_index.json` are skipped."""
    captions, images = {}, {}
    for name in os.listdir(folder):
        if name.startswith((".", "_")):
            continue
        stem, ext = os.path.splitext(name)
        if ext == ".txt":
            captions[stem] = name
        elif ext.lower() in IMAGE_EXTENSIONS:
            images.setdefault(stem.split("_")[0], []).append(name)
    return [(key, captions[key], sorted(images[key])) for key in sorted(captions) if key in images]


def folder_index(folder):
    """The entries of the folder's _index.json ([{"key", "caption", "images"}]), or None when there is none yet
    (an img2dataset folder, or one generate.py has not finished)."""
    index = os.path.join(folder, INDEX_FILE)
    if not os.path.isfile(index):
        return None
    with open(index, encoding="utf-8") as f:
        return json.load(f)["captions"]


def _scan_folder(folder):
    """A folder's captions from what is on disk: [(key, caption text, [image names])], sorted by key."""
    entries = []
    for key, caption_file, image_names in list_folder(folder):
        with open(os.path.join(folder, caption_file), encoding="utf-8", errors="replace") as f:
            entries.append((key, f.read().strip(), image_names))
    return entries


def index_folder(folder):
    """Write the folder's _index.json from what is on disk; call it once the folder's captions are complete."""
    entries = [{"key": key, "caption": caption, "images": names} for key, caption, names in _scan_folder(folder)]
    atomic_write_json(os.path.join(folder, INDEX_FILE), {"captions": entries})
    return entries


def _folder_entries(folder):
    entries = folder_index(folder)  # the fast path: one small file instead of listing thousands
    if entries is not None:
        return [(e["key"], e["caption"], e["images"]) for e in entries]
    return _scan_folder(folder)  # an img2dataset folder, or one generate.py has not finished yet


def read_tree(root):
    """Every caption of the tree that has at least one image, sorted by caption id: [CaptionRecord].

    Raises ValueError with a one-line message for a missing folder, a folder that is not such a tree, or a tree
    without a single image."""
    records = []
    for name in caption_folders(root):
        folder = os.path.join(root, name)
        for key, caption, image_names in _folder_entries(folder):
            records.append(CaptionRecord(int(key), caption, [os.path.join(folder, n) for n in image_names]))
    if not records:
        raise ValueError(f"{root} holds no captioned images")
    records.sort(key=lambda record: record.caption_id)
    return records
