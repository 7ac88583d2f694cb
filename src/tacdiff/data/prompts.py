"""Prompt sets for text-to-image calibration, evaluation and sampling: a built-in default list,
prompt files (one prompt per line), the hash that identifies a set, and captions of Fashion-MNIST
classes for training a text-to-image model on them."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Sequence

DEFAULT_PROMPTS: tuple[str, ...] = (
    "a photo of a cat sitting on a windowsill",
    "a red bicycle leaning against a brick wall",
    "a bowl of fresh fruit on a wooden table",
    "a lighthouse on a rocky coast at sunset",
    "a portrait of an old man with a grey beard",
    "a city street at night in the rain",
    "a mountain lake surrounded by pine trees",
    "a plate of pasta with tomato sauce",
    "a dog running on a sandy beach",
    "a vintage car parked in front of a diner",
    "an astronaut floating above the earth",
    "a watercolor painting of a small village",
    "a close-up photo of a sunflower",
    "a cozy living room with a fireplace",
    "a sailing boat on a calm blue sea",
    "a snowy forest in the early morning",
    "a pair of running shoes on a white background",
    "a cup of coffee and a croissant",
    "a futuristic city skyline with flying cars",
    "a horse grazing in a green meadow",
    "an oil painting of a stormy ocean",
    "a child flying a kite in a park",
    "a wooden cabin in the mountains",
    "a bird perched on a branch in spring",
    "a busy market with colorful stalls",
    "a desert landscape with sand dunes",
    "a steam train crossing a stone bridge",
    "a bookshelf full of old books",
    "a pencil sketch of a human hand",
    "a field of tulips under a blue sky",
    "a robot cooking in a kitchen",
    "a waterfall in a tropical jungle",
)
"""Varied everyday captions (objects, animals, scenes, styles) used when no prompt file is given."""


PIPELINE_PROMPTS = "prompts.txt"
"""A pipeline folder's own default prompts (one per line), used when a run names none; ``tacdiff train-latent``
writes its class-balanced :func:`fashion_prompts` there."""


def default_prompts(folder: str | Path | None) -> tuple[str, ...]:
    """The prompts a run on the pipeline in ``folder`` uses when it is given none: the folder's
    :data:`PIPELINE_PROMPTS` if it has one, else :data:`DEFAULT_PROMPTS`."""
    file = Path(folder) / PIPELINE_PROMPTS if folder is not None else None
    return tuple(read_prompts(file)) if file is not None and file.is_file() else DEFAULT_PROMPTS


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a UTF-8 text file, one per line (surrounding blanks stripped, blank lines skipped).

    ``ValueError`` names the file when it is missing, unreadable, not text or holds no prompt.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass a text file with one prompt per line")
    if not path.is_file():
        raise ValueError(f"prompts file not found: {path}; pass a text file with one prompt per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; pass a text file with one prompt per line") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompt; write one prompt per line")
    return prompts


def prompt_set_sha256(prompts: Sequence[str]) -> str:
    """A hash identifying an ordered prompt set (recorded by tables and artifacts fitted on it)."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


def prompt_of(prompts: Sequence[str], index: int) -> str:
    """The prompt of sample ``index``: the prompts are used in turn (sample ``i`` gets ``prompts[i % len]``)."""
    return prompts[index % len(prompts)]


FASHION_NAMES: tuple[tuple[str, ...], ...] = (
    ("t-shirt", "tee", "top", "t-shirt or top"),
    ("trousers", "pants", "pair of trousers", "pair of pants"),
    ("pullover", "sweater", "jumper"),
    ("dress", "summer dress"),
    ("coat", "jacket", "winter coat"),
    ("sandal", "sandals", "pair of sandals"),
    ("shirt", "button-up shirt", "blouse"),
    ("sneaker", "sneakers", "trainer", "running shoe", "pair of sneakers"),
    ("bag", "handbag", "purse"),
    ("ankle boot", "boot", "boots", "pair of ankle boots"),
)
"""Ways to name each Fashion-MNIST class, in label order (see ``FASHION_MNIST_CLASSES``)."""

FASHION_TEMPLATES: tuple[str, ...] = (
    "{name}", "a {name}", "a photo of a {name}", "a picture of a {name}", "{name}, product photo",
    "a black and white photo of a {name}", "a {name} on a plain background", "an image of a {name}",
)
"""Caption templates; ``a {name}`` is written ``an ...`` before a vowel, and without ``a`` for plurals."""
PLURAL_NAMES = frozenset({"trousers", "pants", "sandals", "sneakers", "boots"})


def fashion_caption(label: int, rng: random.Random) -> str:
    """A caption naming Fashion-MNIST class ``label``: a random template and a random name of the class."""
    name = rng.choice(FASHION_NAMES[label])
    return _with_article(rng.choice(FASHION_TEMPLATES), name)


def fashion_captions(labels: Sequence[int], seed: int, empty_fraction: float = 0.1) -> list[str]:
    """One caption per label, seeded; about ``empty_fraction`` of them empty, so that the model also
    learns the unconditional estimate that classifier-free guidance needs."""
    rng = random.Random(seed)
    return ["" if rng.random() < empty_fraction else fashion_caption(int(label), rng) for label in labels]


def fashion_class_of(prompt: str) -> int | None:
    """The Fashion-MNIST class a prompt names (by whole words of :data:`FASHION_NAMES`), or ``None`` when it
    names none or several (e.g. "a shirt" is class 6, "a t-shirt" class 0, "a bag and a coat" None)."""
    words = f" {' '.join(prompt.lower().replace(',', ' ').split())} "
    found = {label for label, names in enumerate(FASHION_NAMES) for name in names if f" {name} " in words}
    return found.pop() if len(found) == 1 else None


def fashion_vocabulary() -> list[str]:
    """Every word the Fashion-MNIST captions can contain (``a``/``an`` both), sorted."""
    texts = [template.format(name=name) for template in FASHION_TEMPLATES for names in FASHION_NAMES
             for name in names]
    return sorted({word for text in texts for word in text.replace(",", " ").split()} | {"an"})


def fashion_prompts() -> list[str]:
    """Twenty plain captions, two per Fashion-MNIST class, ordered so that any run of ten consecutive samples
    (prompt ``i mod 20``) names every class once and a multiple of 20 samples is exactly balanced."""
    phrasings = ("a photo of a {name}", "{name}, product photo")
    return [_with_article(template, names[0]) for template in phrasings for names in FASHION_NAMES]


def _with_article(template: str, name: str) -> str:
    """``template`` filled with ``name``, its ``a`` made ``an`` before a vowel and dropped before a plural name."""
    text = template.format(name=name)
    if name in PLURAL_NAMES:
        text = text.replace(f"a {name}", name)
    return " ".join("an" if word == "a" and following[:1] in "aeiou" else word
                    for word, following in zip(text.split(), text.split()[1:] + [""]))
