"""The built-in skills: SELMA's five (Li et al., NeurIPS 2024, Sec. 3.1) plus three our users asked for.

Pure data, in the same shape as a user's skill file (see ``selma_backend.skills``), so a person can
copy one of these into a ``.toml``/``.json`` file and change it. Instructions and seed examples are
our own; the word limits follow SELMA's generation prompts ("less than 30/50 words").
"""

from __future__ import annotations

_COMMON = (
    "Mention diverse objects, people, animals and places that often appear in daily life. "
    "Make every description different in wording and structure from the others and from the examples."
)

BUILTIN_SKILL_FIELDS: tuple[dict[str, object], ...] = (
    {
        "id": "localized_narratives",
        "name": "Localized narratives (paragraph scenes)",
        "instruction": (
            "Write image descriptions in the style of spoken paragraph captions: describe what can be seen "
            "in the scene, where things are, and what is in the background. " + _COMMON
        ),
        "examples": (
            "In this picture we can see a bicycle leaning against a brick wall, and on the left there is a "
            "potted plant. In the background we can see a window with white curtains.",
            "This image shows a kitchen counter with a cutting board, two lemons and a knife. Behind them "
            "we can see a kettle and some shelves with jars.",
            "Here we can see a man sitting on a bench and reading a newspaper. Beside him there is a dog, "
            "and at the top of the image we can see trees and the sky.",
        ),
        "word_limit": 50,
        "flip": "swap_left_right",
    },
    {
        "id": "countbench",
        "name": "CountBench (counting objects)",
        "instruction": (
            "Write image descriptions that test whether an image generator draws the right number of "
            "objects. Every description states an explicit count (one, two or three; never more than "
            "three) of everyday objects. " + _COMMON
        ),
        "examples": (
            "Three yellow tennis balls lying on a clay court.",
            "A photo of two coffee mugs on a windowsill.",
            "One red umbrella leaning against a white door.",
        ),
        "word_limit": 30,
        "flip": "allow",
    },
    {
        "id": "diffusiondb",
        "name": "DiffusionDB (detailed artistic prompts)",
        "instruction": (
            "Write detailed, artistic text-to-image prompts in the style people type into image "
            "generators: a subject, a setting, and comma-separated style, medium, lighting and quality "
            "keywords. Do not name living artists or brands. " + _COMMON
        ),
        "examples": (
            "a cozy reading nook with a cat asleep on a stack of books, warm lamp light, watercolor, soft "
            "pastel palette, highly detailed, storybook illustration",
            "portrait of an old fisherman mending nets at dawn, dramatic rim lighting, oil painting, "
            "impasto brushstrokes, muted blues and golds",
            "a floating island with a tiny lighthouse above a sea of clouds, volumetric light, digital art, "
            "isometric view, vibrant colors, 4k",
        ),
        "word_limit": 50,
        "flip": "allow",
    },
    {
        "id": "whoops",
        "name": "WHOOPS (commonsense-defying combinations)",
        "instruction": (
            "Write short image descriptions of everyday objects, animals or people in combinations that "
            "defy common sense (wrong place, wrong season, wrong material, impossible use), stated plainly "
            "as if they were normal. " + _COMMON
        ),
        "examples": (
            "A snowman standing on a sunny beach next to sunbathers.",
            "A candle burning underwater in a fish tank.",
            "A child eating soup with a fork.",
        ),
        "word_limit": 30,
        "flip": "allow",
    },
    {
        "id": "coco",
        "name": "COCO (plain everyday captions)",
        "instruction": (
            "Write plain, factual one-sentence captions of everyday photographs, like the captions in the "
            "COCO dataset: who or what is in the picture and what is happening. " + _COMMON
        ),
        "examples": (
            "A woman riding a bicycle down a wet city street.",
            "Two dogs playing with a frisbee in a park.",
            "A plate of pasta next to a glass of red wine on a table.",
        ),
        "word_limit": 30,
        "flip": "swap_left_right",
    },
    {
        "id": "spatial",
        "name": "Spatial relations",
        "instruction": (
            "Write image descriptions that place two or three everyday objects in an explicit spatial "
            "relation to each other: left of, right of, above, below, on top of, under, in front of, "
            "behind, next to. The relation must be unambiguous and visible. " + _COMMON
        ),
        "examples": (
            "A red apple to the left of a blue cup on a wooden table.",
            "A cat sitting under a chair, with a ball in front of the chair.",
            "A lamp above a desk, and a backpack to the right of the desk.",
        ),
        "word_limit": 30,
        "flip": "swap_left_right",
    },
    {
        "id": "attributes",
        "name": "Attribute binding (colour, material, texture)",
        "instruction": (
            "Write image descriptions of two or three objects, each with its own colour, material or "
            "texture, so that an image generator must bind every attribute to the right object (for "
            "example a glass bowl and a wooden spoon, not a wooden bowl). " + _COMMON
        ),
        "examples": (
            "A green ceramic vase beside a yellow wicker basket.",
            "A fluffy white towel folded on a smooth black stone counter.",
            "A rusty metal bucket holding a bunch of purple silk flowers.",
        ),
        "word_limit": 30,
        "flip": "allow",
    },
    {
        "id": "product",
        "name": "Product shots (catalogue style)",
        "instruction": (
            "Write catalogue-style product photo descriptions: the product, its materials and colours, "
            "how many items, how they are arranged, the background and the lighting. No brand names, "
            "logos or readable text. " + _COMMON
        ),
        "examples": (
            "Studio shot of three stainless steel water bottles in a row on a white background, soft "
            "shadows.",
            "A brown leather wallet lying open next to a pair of aviator sunglasses on grey linen, top-down "
            "view.",
            "Two matte black ceramic mugs stacked on a light oak shelf, natural window light.",
        ),
        "word_limit": 30,
        "flip": "never",
    },
)
