"""
Constants of the bundled synthetic dataset: classes, label ids, the rules' parameters and the
palette. The renderer (:mod:`ion_d2.data.synthetic.render`) draws with them; generation and
registration (:mod:`ion_d2.data.synthetic`) publish them as dataset metadata.
"""

from dataclasses import dataclass
from typing import Tuple

__all__ = [
    "GENERATOR_VERSION",
    "THING_CLASSES",
    "THING_COLORS",
    "CONTEXT_CLASSES",
    "CONTEXT_PAIRS",
    "CLASS_GLYPHS",
    "GLYPHS",
    "SCENE_CLASSES",
    "SEM_SEG_CLASSES",
    "SEM_SEG_COLORS",
    "BACKGROUND_ID",
    "ROAD_ID",
    "WATER_ID",
    "MOON_ID",
    "IGNORE_LABEL",
    "TRAIN_DATASET_NAME",
    "VAL_DATASET_NAME",
    "DEFAULT_NUM_TRAIN",
    "DEFAULT_NUM_VAL",
    "DEFAULT_SEED",
    "IMAGE_SIZE_RANGE",
    "MAX_OCCLUDED_FRACTION",
    "CONTEXT_MARGIN",
    "CONTEXT_MIN_VISIBLE",
    "MOON_MIN_GAP",
    "PALETTE",
    "VARIANTS",
    "LOCAL_CLASSES",
    "LOCAL_GLYPH",
    "LOCAL_TRAIN_DATASET_NAME",
    "LOCAL_VAL_DATASET_NAME",
    "FLYERS_PER_IMAGE",
    "FLYER_SIDE_RANGE",
    "STRING_HALF_WIDTH",
    "STRING_LENGTH_RANGE",
    "DISTRACTOR_STRINGS_PER_IMAGE",
    "VariantSpec",
    "variant_spec",
]


#: Bumped whenever a change alters the generated files; part of the completion marker, so a
#: dataset written by another version is generated again.
GENERATOR_VERSION = 1

#: Thing classes; COCO category id = index + 1, semantic label id = index + 1.
THING_CLASSES = ("car", "boat", "lamp", "ball", "sign", "ring")
#: Display colours of the thing classes (for detectron2's Visualizer).
THING_COLORS = (
    (220, 40, 40),
    (40, 90, 220),
    (250, 200, 40),
    (250, 120, 20),
    (200, 30, 120),
    (40, 170, 60),
)
#: Classes that look identical inside their box to their partner and need context.
CONTEXT_CLASSES = ("car", "boat", "lamp", "ball")
#: The glyph each class is drawn with: equal glyphs give pixel-identical boxes.
CLASS_GLYPHS = {
    "car": "vehicle",
    "boat": "vehicle",
    "lamp": "orb",
    "ball": "orb",
    "sign": "sign",
    "ring": "ring",
    "kite": "flyer",
    "bird": "flyer",
}
#: Glyphs the base dataset draws its objects with (:func:`ion_d2.data.synthetic.glyphs.render_glyph`
#: also draws the local variant's LOCAL_GLYPH).
GLYPHS = ("vehicle", "orb", "sign", "ring")

#: Scene ("stuff") classes of the label maps, after background and the thing classes.
SCENE_CLASSES = ("road", "water", "moon")
#: The pairs of context classes drawn with one glyph (pixel-identical in their boxes), told
#: apart only by context: (("car", "boat"), ("lamp", "ball")). ContextPairEvaluator reports them.
CONTEXT_PAIRS = tuple(
    tuple(c for c in CONTEXT_CLASSES if CLASS_GLYPHS[c] == glyph)
    for glyph in dict.fromkeys(CLASS_GLYPHS[c] for c in CONTEXT_CLASSES)
)
#: Semantic classes of the label maps, index = pixel value: 0 = background (clutter),
#: 1..6 = thing classes, 7 = road, 8 = water, 9 = moon.
SEM_SEG_CLASSES = ("background",) + THING_CLASSES + SCENE_CLASSES
#: Display colours of the semantic classes.
SEM_SEG_COLORS = ((0, 0, 0),) + THING_COLORS + ((100, 100, 100), (30, 80, 160), (235, 235, 255))
BACKGROUND_ID = 0
ROAD_ID = SEM_SEG_CLASSES.index("road")
WATER_ID = SEM_SEG_CLASSES.index("water")
MOON_ID = SEM_SEG_CLASSES.index("moon")
#: Declared "ignore" value of the label maps (detectron2's convention); the generator labels
#: every pixel, so it never writes it.
IGNORE_LABEL = 255

#: Names :func:`ion_d2.data.synthetic.register_ion_synthetic` registers by default.
TRAIN_DATASET_NAME = "ion_synth_train"
VAL_DATASET_NAME = "ion_synth_val"
DEFAULT_NUM_TRAIN = 600
DEFAULT_NUM_VAL = 150
DEFAULT_SEED = 0

#: Image height and width are each drawn uniformly from this closed range.
IMAGE_SIZE_RANGE = (128, 256)
#: No object ever has more than this fraction of its mask hidden by later objects.
MAX_OCCLUDED_FRACTION = 0.4
#: A car (boat) box grown by this many pixels on every side lies entirely on road (water).
CONTEXT_MARGIN = 4
#: At least this fraction of that margin shows the road (water): objects and clutter never
#: hide a vehicle's surroundings.
CONTEXT_MIN_VISIBLE = 0.5
#: Every orb (lamp or ball) box is at least this far (pixels, box to box) from the moon's place,
#: which every image has, with or without the moon drawn.
MOON_MIN_GAP = 40

#: RGB colours of the glyphs and scene details: chosen once, never jittered, so a glyph depends
#: on its size only.
PALETTE = {
    "tile": (205, 205, 198),
    "tile_edge": (150, 150, 145),
    "vehicle_body": (170, 30, 35),
    "vehicle_window": (150, 200, 230),
    "vehicle_wheel": (25, 25, 25),
    "orb": (245, 185, 35),
    "orb_edge": (95, 55, 10),
    "orb_highlight": (255, 248, 215),
    "sign": (200, 25, 30),
    "sign_bar": (250, 250, 250),
    "ring": (40, 170, 60),
    "moon": (235, 235, 255),
    "lane": (230, 215, 120),
    "flyer": (20, 110, 120),
    "string": (25, 25, 30),
}

# ------------------------------------------------------------------------------------------
# The "local" variant (issue 26): the base dataset plus a pair decided by a thin structure just
# outside the box. Registered as "ion_synth_local_train" / "ion_synth_local_val".
# ------------------------------------------------------------------------------------------
#: Dataset variants: "base" (the demo's and the gate's) and "local".
VARIANTS = ("base", "local")
#: The local variant's extra pair, one glyph: a kite has a string (a line 2 px wide) from the
#: middle of its box's bottom edge outwards, a bird has none. No other string comes within one
#: box side of either's box, so the string alone tells them apart.
LOCAL_CLASSES = ("kite", "bird")
#: The glyph of the kite/bird pair: an opaque tile filling its box, as "vehicle" and "orb".
LOCAL_GLYPH = "flyer"
LOCAL_TRAIN_DATASET_NAME = "ion_synth_local_train"
LOCAL_VAL_DATASET_NAME = "ion_synth_local_val"
#: Flyers drawn per image (closed range), after the base objects.
FLYERS_PER_IMAGE = (1, 3)
#: The shorter side of a flyer's box, in pixels (closed range); the longer is up to 1.4x it.
FLYER_SIDE_RANGE = (12, 36)
#: A string is the pixels whose centres lie within this distance of its segment: 2 px wide.
STRING_HALF_WIDTH = 1.0
#: A kite's string is this fraction of its box's longer side long (half-open range): it ends
#: within one box side of the box.
STRING_LENGTH_RANGE = (0.6, 1.0)
#: Free strings drawn elsewhere in each image (closed range): a string alone is no kite.
DISTRACTOR_STRINGS_PER_IMAGE = (2, 5)


@dataclass(frozen=True)
class VariantSpec:
    """What a dataset variant publishes: its classes, pairs and names."""

    name: str
    directory: str  # under the datasets root
    thing_classes: Tuple[str, ...]
    thing_colors: Tuple[Tuple[int, int, int], ...]
    sem_seg_classes: Tuple[str, ...]
    sem_seg_colors: Tuple[Tuple[int, int, int], ...]
    context_classes: Tuple[str, ...]
    context_pairs: Tuple[Tuple[str, str], ...]
    train_name: str
    val_name: str


def variant_spec(variant: str) -> VariantSpec:
    """The :class:`VariantSpec` of ``variant``, one of :data:`VARIANTS`."""
    if variant == "base":
        return VariantSpec(
            name="base",
            directory="ion_synth",
            thing_classes=THING_CLASSES,
            thing_colors=THING_COLORS,
            sem_seg_classes=SEM_SEG_CLASSES,
            sem_seg_colors=SEM_SEG_COLORS,
            context_classes=CONTEXT_CLASSES,
            context_pairs=CONTEXT_PAIRS,
            train_name=TRAIN_DATASET_NAME,
            val_name=VAL_DATASET_NAME,
        )
    if variant == "local":
        # The pair's classes come after the base ones in both lists, so every base id keeps
        # its value: category ids 7 and 8, label ids 10 and 11.
        return VariantSpec(
            name="local",
            directory="ion_synth_local",
            thing_classes=THING_CLASSES + LOCAL_CLASSES,
            thing_colors=THING_COLORS + ((20, 160, 170), (120, 60, 170)),
            sem_seg_classes=SEM_SEG_CLASSES + LOCAL_CLASSES,
            sem_seg_colors=SEM_SEG_COLORS + ((20, 160, 170), (120, 60, 170)),
            context_classes=CONTEXT_CLASSES + LOCAL_CLASSES,
            context_pairs=CONTEXT_PAIRS + (LOCAL_CLASSES,),
            train_name=LOCAL_TRAIN_DATASET_NAME,
            val_name=LOCAL_VAL_DATASET_NAME,
        )
    raise ValueError(f"variant={variant!r} is not a dataset variant; expected one of {VARIANTS}.")
