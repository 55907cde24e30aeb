"""
Constants of the bundled synthetic dataset: classes, label ids, the rules' parameters and the
palette. The renderer (:mod:`ion_d2.data.synthetic.render`) draws with them; generation and
registration (:mod:`ion_d2.data.synthetic`) publish them as dataset metadata.
"""

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
}
#: Glyphs that :func:`ion_d2.data.synthetic.glyphs.render_glyph` draws.
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
}
