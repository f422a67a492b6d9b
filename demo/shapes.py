"""A procedural text-to-image stand-in for the CPU miniature: captions from a grammar, each rendered many times from
its own seeds, with a guidance-like knob `w`.

    scenes = sample_scenes(2000, seed=0)          # distinct captions of three objects and two relations
    scenes[0].caption                             # "a star below a small ring and left of a small cross"
    write_synthetic(scenes, "syn_w2", n=10, w=2)  # generate.py's folder tree (or tar shards): 10 images a caption
    write_real(scenes, "real")                    # one "photo" a caption, the same layout
    write_labelled(scenes, "probe/test")          # an ImageFolder by the large object's shape, for the probes

A scene is what a caption says: a large object (one of 10 shapes), a small object above or below it and one left or
right of it (each one of the 10 shapes), 4000 captions in all. Its words are shapes and places only. Everything else
is left open and drawn per rendering from its own seed: the three objects' colours, the background (plain, striped
or checkered, in one of 6 tones), positions within the relations' bands, sizes, rotations, tints, noise and a clutter
stroke. The image is drawn at 4x the size and downsampled (anti-aliased edges). Colour and background stay out of
the captions on purpose: a word that a linear read of the pixels gives is a cue a batch of captions is told apart by
long before the shapes are (BENCHMARKS.md measures StableRep learning the background, and not the shapes, when the
captions named it), while renderings of one caption that share only their shapes teach the invariance the paper
credits to several images per caption.

The knob plays the part of classifier-free guidance (Sec. 2 of the paper: a higher w follows the text more closely
and gives less diverse images):
    fidelity(w)  = 1 - 0.6 exp(-w / 2)   chance that each of the caption's five words is honoured (else a random one)
    diversity(w) = 1 / (1 + w / 3)       nuisances drawn this far from the caption's own typical rendering (its
                                         "mode", seeded by the caption) towards a fresh draw from the world's spread
A "real" image (`w=None`) is a draw from the world: every word honoured, full diversity, one image per caption.

Every image is a function of (seed, caption id, image index) and w alone, as generate.py's are; the same seed at
two values of w gives the same draws, as the same latent noise does under two guidance scales.
"""
import dataclasses
import hashlib
import math
import os

import numpy as np
from PIL import Image, ImageDraw

from util import imagetree, shards

SHAPES = ("circle", "square", "triangle", "cross", "star", "ring", "arrow", "crescent", "diamond", "hexagon")
COLOURS = {"red": (220, 40, 40), "orange": (240, 140, 30), "yellow": (230, 220, 50), "green": (50, 180, 70),
           "cyan": (50, 200, 210), "blue": (50, 80, 230), "purple": (150, 60, 200), "white": (235, 235, 235)}
BACKGROUNDS = {"black": ((20, 20, 20), None), "grey": ((110, 110, 110), None), "navy": ((20, 30, 80), None),
               "brown": ((90, 60, 30), None), "striped": ((60, 60, 60), "stripes"),
               "checkered": ((60, 60, 60), "checks")}
VERTICAL, HORIZONTAL = ("above", "below"), ("left of", "right of")
SUPERSAMPLE = 4  # drawn at 4x the size, then downsampled: anti-aliased edges


def fidelity(w):
    """Chance that a rendering at guidance `w` honours each word of its caption."""
    return 1.0 - 0.6 * math.exp(-w / 2.0)


def diversity(w):
    """How far a rendering's nuisances go from the caption's typical rendering towards a fresh draw (1: the world's)."""
    return 1.0 / (1.0 + w / 3.0)


@dataclasses.dataclass(frozen=True)
class Scene:
    """What a caption says: the large object's shape, where it is relative to a small object above or below it
    (`vertical`) and to one left or right of it (`horizontal`), and those two objects' shapes."""
    shape: str
    vertical: str
    vertical_shape: str
    horizontal: str
    horizontal_shape: str

    @property
    def caption(self):
        article = "an" if self.shape[0] in "aeiou" else "a"
        return (f"{article} {self.shape} {self.vertical} a small {self.vertical_shape} and {self.horizontal} a "
                f"small {self.horizontal_shape}")

    @property
    def label(self):
        """The evaluation's class: the large object's shape."""
        return SHAPES.index(self.shape)


WORDS = {"shape": SHAPES, "vertical": VERTICAL, "vertical_shape": SHAPES, "horizontal": HORIZONTAL,
         "horizontal_shape": SHAPES}


def sample_scenes(count, seed=0, exclude=()):
    """`count` distinct scenes (of 10 x 2 x 10 x 2 x 10 = 4000), none of `exclude`, from a seeded generator."""
    rng, scenes, seen = np.random.default_rng(seed), [], set(exclude)
    if count > math.prod(len(values) for values in WORDS.values()) - len(seen):
        raise ValueError(f"the grammar has fewer than {count} scenes outside the {len(seen)} excluded")
    while len(scenes) < count:
        scene = Scene(**{key: values[rng.integers(len(values))] for key, values in WORDS.items()})
        if scene not in seen:
            seen.add(scene)
            scenes.append(scene)
    return scenes


# ---- nuisances: what the caption leaves open ----

NUISANCES = {  # name: slice of the nuisance vector, numbers in [0, 1) mapped to pixels in `render`
    "background": slice(0, 1), "background_tint": slice(1, 4), "texture": slice(4, 6), "noise": slice(6, 7),
    "colours": slice(7, 10), "tints": slice(10, 13), "spins": slice(13, 16), "radii": slice(16, 19),
    "large_position": slice(19, 21), "vertical_position": slice(21, 23), "horizontal_position": slice(23, 25)}
NUISANCE_COUNT = 25


def draw_nuisances(rng):
    """One draw of everything a caption leaves open, as NUISANCE_COUNT numbers in [0, 1)."""
    return rng.random(NUISANCE_COUNT)


def named(vector):
    """A nuisance vector as {name: its numbers}, by NUISANCES."""
    return {name: vector[part] for name, part in NUISANCES.items()}


def mode_of(scene, seed):
    """The caption's typical rendering: its nuisances drawn once from the caption's own seed."""
    digest = hashlib.sha256(scene.caption.encode()).digest()
    return draw_nuisances(np.random.default_rng([seed, int.from_bytes(digest[:8], "little")]))


def shape_mask(shape, size, cx, cy, radius, angle):
    """An L-mode mask of `shape` centred at (cx, cy) with outer radius `radius`, rotated by `angle` radians."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)

    def polygon(points):
        cos, sin = math.cos(angle), math.sin(angle)
        return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in points]

    def regular(k, start=-math.pi / 2, r=1.0):
        return [(r * math.cos(start + 2 * math.pi * i / k), r * math.sin(start + 2 * math.pi * i / k))
                for i in range(k)]

    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        inner = 0.55 * radius
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif shape == "crescent":
        draw.ellipse(box, fill=255)
        dx, dy = 0.45 * radius * math.cos(angle), 0.45 * radius * math.sin(angle)
        draw.ellipse((cx - radius + dx, cy - radius + dy, cx + radius + dx, cy + radius + dy), fill=0)
    elif shape == "square":
        draw.polygon(polygon([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]), fill=255)
    elif shape == "diamond":
        draw.polygon(polygon([(0, -1), (0.65, 0), (0, 1), (-0.65, 0)]), fill=255)
    elif shape == "triangle":
        draw.polygon(polygon(regular(3)), fill=255)
    elif shape == "hexagon":
        draw.polygon(polygon(regular(6)), fill=255)
    elif shape == "star":
        outer, inner = regular(5), regular(5, -math.pi / 2 + math.pi / 5, 0.42)
        draw.polygon(polygon([p for pair in zip(outer, inner) for p in pair]), fill=255)
    elif shape == "cross":
        t = 0.3
        draw.polygon(polygon([(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t),
                              (-1, t), (-1, -t), (-t, -t)]), fill=255)
    elif shape == "arrow":
        draw.polygon(polygon([(-1, -0.25), (0.1, -0.25), (0.1, -0.7), (1, 0), (0.1, 0.7), (0.1, 0.25),
                              (-1, 0.25)]), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def tinted(rgb, u, amount):
    """`rgb` shifted by up to +-amount per channel by three draws `u` in [0, 1)."""
    return tuple(int(np.clip(c + amount * (2 * x - 1), 0, 255)) for c, x in zip(rgb, u))


def pick(values, u):
    """The element of `values` that a draw u in [0, 1) falls on."""
    return values[min(int(u * len(values)), len(values) - 1)]


def layout(scene, u, big):
    """`u`: named nuisances. Centres and radii of the large object and the small ones above/below and left/right of
    it, on a big x big canvas: the large object anywhere that leaves room for the small ones on the sides the
    relations name, each small object in the band between the large one and the canvas's edge, beside the large
    one's extent (the two never overlap)."""
    large_radius = big * (0.26 + 0.06 * u["radii"][0])
    small_radii = big * (0.07 + 0.02 * u["radii"][1:])
    margin = 0.02 * big
    sx = 1 if scene.horizontal == "right of" else -1  # the side of the canvas the large object keeps to
    sy = 1 if scene.vertical == "below" else -1

    def large_centre(side, small_radius, v):  # room for the small object and the margins on its side
        start = margin + 2 * small_radius + margin + large_radius  # from the small object's edge of the canvas
        offset = start + (big - margin - large_radius - start) * v
        return offset if side == 1 else big - offset

    rv, rh = small_radii
    cx, cy = large_centre(sx, rh, u["large_position"][0]), large_centre(sy, rv, u["large_position"][1])

    def band(centre, side, radius, v):  # from the canvas's edge to the large object's edge, on the small one's side
        near, far = centre - side * (large_radius + margin + radius), big / 2 - side * (big / 2 - margin - radius)
        return far + (near - far) * v

    def beside(centre, radius, v):  # within the large object's extent, on the other axis
        return centre - large_radius + radius + (2 * (large_radius - radius)) * v

    vertical = (beside(cx, rv, u["vertical_position"][0]), band(cy, sy, rv, u["vertical_position"][1]))
    horizontal = (band(cx, sx, rh, u["horizontal_position"][0]), beside(cy, rh, u["horizontal_position"][1]))
    return [((cx, cy), large_radius), (vertical, rv), (horizontal, rh)]


def render(scene, rng, w=None, size=32, mode=None):
    """One rendering of `scene` as an RGB PIL image of size x size: the world's (w None: every word honoured, full
    diversity) or the stand-in model's at guidance `w` (words kept with fidelity(w), nuisances diversity(w) of the
    way from `mode`, the caption's typical rendering, towards this draw)."""
    if w is not None:
        kept = rng.random(len(WORDS)) < fidelity(w)
        words = {key: (getattr(scene, key) if keep else values[rng.integers(len(values))])
                 for keep, (key, values) in zip(kept, WORDS.items())}
        scene = Scene(**words)
        vector = mode + diversity(w) * (draw_nuisances(rng) - mode)
    else:
        vector = draw_nuisances(rng)
    u = named(vector)
    big = size * SUPERSAMPLE
    base, texture = BACKGROUNDS[pick(tuple(BACKGROUNDS), u["background"][0])]
    canvas = np.empty((big, big, 3), dtype=np.float32)
    canvas[:] = tinted(base, u["background_tint"], 25)
    if texture is not None:
        period = big / (3 + 3 * u["texture"][0])
        ys, xs = np.mgrid[0:big, 0:big]
        if texture == "stripes":
            theta = math.pi * u["texture"][1]
            on = ((xs * math.cos(theta) + ys * math.sin(theta)) // (period / 2)) % 2 == 0
        else:
            on = ((xs // (period / 2) + ys // (period / 2)) % 2) == 0
        canvas[on] += 40
    image = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    shapes_drawn = (scene.shape, scene.vertical_shape, scene.horizontal_shape)
    for i, (shape, ((cx, cy), radius)) in enumerate(zip(shapes_drawn, layout(scene, u, big))):
        colour = COLOURS[pick(tuple(COLOURS), u["colours"][i])]  # colours are left open by the caption
        tint = tinted(colour, np.roll(u["tints"], i), 30)
        fill = Image.new("RGB", (big, big), tint)
        image.paste(fill, mask=shape_mask(shape, big, cx, cy, radius, (u["spins"][i] - 0.5) * math.radians(50)))
    draw = ImageDraw.Draw(image)  # clutter: a thin stroke of random colour, from the draw itself
    x0, y0, x1, y1 = (rng.random(4) * big).tolist()
    draw.line((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=SUPERSAMPLE)
    image = image.resize((size, size), Image.Resampling.BOX)
    noise = rng.normal(0.0, 6.0 * (0.5 + u["noise"][0]), (size, size, 3))
    return Image.fromarray((np.asarray(image, dtype=np.float32) + noise).clip(0, 255).astype(np.uint8))


def image_rng(seed, caption_id, image_index):
    """The generator of image `image_index` of caption `caption_id`: the same at every w."""
    return np.random.default_rng([seed, caption_id, image_index])


# ---- writers: generate.py's layouts ----

def write_synthetic(scenes, root, n=10, w=2.0, seed=0, size=32, output_format="files", scrambled=False,
                    captions_per_shard=imagetree.CAPTIONS_PER_FOLDER):
    """n renderings of each scene at guidance w, caption id = the scene's index, in generate.py's folder tree
    (`files`) or tar shards (`webdataset`); returns `root`. `scrambled`: a broken generator that files every image
    under a random caption (one permutation of all (caption, k) slots), so the images of a caption share nothing."""
    slots = np.arange(len(scenes) * n)
    if scrambled:
        slots = np.random.default_rng([seed, 1]).permutation(slots)
    made = {}
    for caption_id, scene in enumerate(scenes):  # image k of caption i, before any scrambling
        mode = mode_of(scene, seed)
        for k in range(n):
            made[int(slots[caption_id * n + k])] = render(scene, image_rng(seed, caption_id, k), w, size, mode)
    images = {i: [made[i * n + k] for k in range(n)] for i in range(len(scenes))}
    _write_layout(root, [scene.caption for scene in scenes], images, output_format, captions_per_shard)
    imagetree.write_settings(root, {"source": "demo/shapes.py", "model": "shapes", "w": w, "n": n, "seed": seed,
                                    "size": size, "scrambled": scrambled, "output_format": output_format,
                                    "captions_per_shard": captions_per_shard, "captions": len(scenes)})
    return root


def write_real(scenes, root, seed=0, size=32):
    """One world rendering ("photo") of each scene, in generate.py's folder tree with n = 1; returns `root`."""
    images = {i: [render(scene, image_rng(seed, i, 0), None, size)] for i, scene in enumerate(scenes)}
    _write_layout(root, [scene.caption for scene in scenes], images, "files", imagetree.CAPTIONS_PER_FOLDER)
    imagetree.write_settings(root, {"source": "demo/shapes.py", "model": "world", "n": 1, "seed": seed,
                                    "size": size, "captions": len(scenes)})
    return root


def write_labelled(scenes, root, seed=0, size=32):
    """One world rendering of each scene as root/<shape>/<index>.png (torchvision's ImageFolder), labelled by the
    large object's shape; returns `root`."""
    for index, scene in enumerate(scenes):
        folder = os.path.join(root, scene.shape)
        os.makedirs(folder, exist_ok=True)
        render(scene, image_rng(seed, index, 0), None, size).save(os.path.join(folder, f"{index:05d}.png"))
    return root


def _write_layout(root, captions, images, output_format, captions_per_shard):
    """captions [text] and images {caption id: [PIL image] x n} as generate.py writes them (PNG)."""
    os.makedirs(root, exist_ok=True)
    if output_format == "webdataset":
        for shard in range(-(-len(captions) // captions_per_shard)):
            ids = list(range(shard * captions_per_shard, min(len(captions), (shard + 1) * captions_per_shard)))
            writer = shards.ShardWriter(os.path.join(root, shards.shard_name(shard)), ids, len(images[ids[0]]))
            for i in ids:
                encoded = [(k, "png", imagetree.encode_image(image, "png")) for k, image in enumerate(images[i])]
                writer.add(i, encoded, captions[i], {"caption_id": i})
            writer.finish()
        return
    for i, text in enumerate(captions):
        imagetree.write_caption(root, i, text, captions_per_shard)
        for k, image in enumerate(images[i]):
            imagetree.write_image(root, i, k, image, "png", per_folder=captions_per_shard)
    for folder in sorted({imagetree.folder_of(root, i, captions_per_shard) for i in range(len(captions))}):
        imagetree.index_folder(folder)
