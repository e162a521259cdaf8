"""Caption hard negatives (NegCLIP, Yuksekgonul et al. 2023): for a caption, captions of the same words
that mean something else, scored as extra wrong answers of image->text retrieval in training.

Two generators, both keeping the caption's word multiset (only the order changes) and never returning the
caption itself:

- ``swap``: exchange two different words of one word class (colours, sizes, shapes, cells, materials,
  ages, numbers, and common nouns of people, animals and things as one class: ``WORD_CLASSES``), e.g.
  "a red circle and a blue square" -> "a blue circle and a red square", "a man riding a horse" -> "a horse
  riding a man". A caption without two different words of one class has none (shuffling its words
  instead could only reorder adjectives, "a red small circle", which often means the same).
- ``shuffle``: permute the caption's content words (every word not in ``FUNCTION_WORDS``) among their
  places, keeping articles, prepositions and conjunctions where they are.

A caption without a negative (``shuffle``: fewer than two different content words, "a dog") has its slot
marked invalid, and the loss leaves it out. Words are compared in lower case and moved as written.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import torch

TEXT_NEGATIVES = ("none", "swap", "shuffle")

_NOUNS = (
    "man woman boy girl child kid person player skier surfer dog cat horse cow sheep bird elephant giraffe "
    "zebra bear table chair bed car bus truck train plane boat bike bicycle motorcycle pizza cake sandwich "
    "phone laptop computer umbrella kite ball bench sign clock vase bowl cup plate"
).split()
WORD_CLASSES: dict[str, frozenset[str]] = {
    name: frozenset(words)
    for name, words in {
        "colour": "red green blue yellow purple cyan orange white black brown pink grey gray silver gold "
        "violet beige tan".split(),
        "size": "small large big little tiny huge giant tall short long wide narrow".split(),
        "shape": "circle square triangle diamond rectangle oval star".split(),
        "vertical": "top bottom upper lower above below".split(),
        "horizontal": "left right".split(),
        "material": "wooden metal plastic glass stone brick leather paper concrete".split(),
        "age": "young old new".split(),
        "number": "one two three four five six seven eight nine ten".split(),
        # people, animals and things, singular and plural: "a man riding a horse" -> "a horse riding a man"
        "noun": _NOUNS + [n + "s" for n in _NOUNS] + "people men women children".split(),
    }.items()
}
FUNCTION_WORDS = frozenset(
    "a an the and or of at on in to with by for from into onto near next over under there is are "
    "it its this that these those some his her their while as".split()
)
_WORD = re.compile(r"[A-Za-z0-9']+")


def _words(caption: str) -> list[re.Match]:
    return list(_WORD.finditer(caption))


def _rebuild(caption: str, matches: list[re.Match], words: list[str]) -> str:
    out, last = [], 0
    for match, word in zip(matches, words, strict=True):
        out += [caption[last : match.start()], word]
        last = match.end()
    return "".join(out) + caption[last:]


def swap_negative(caption: str, rng: random.Random) -> str | None:
    """Two different words of one class exchanged; None when no class has two."""
    matches = _words(caption)
    words = [m.group() for m in matches]
    by_class: dict[str, list[int]] = {}
    for i, word in enumerate(words):
        for name, members in WORD_CLASSES.items():
            if word.lower() in members:
                by_class.setdefault(name, []).append(i)
    pairs = [
        (i, j)
        for places in by_class.values()
        for a, i in enumerate(places)
        for j in places[a + 1 :]
        if words[i].lower() != words[j].lower()
    ]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    words[i], words[j] = words[j], words[i]
    return _rebuild(caption, matches, words)


def shuffle_negative(caption: str, rng: random.Random) -> str | None:
    """The content words permuted among their places, to an order that reads differently; None when there
    are fewer than two different content words."""
    matches = _words(caption)
    words = [m.group() for m in matches]
    places = [i for i, w in enumerate(words) if w.lower() not in FUNCTION_WORDS]
    content = [words[i] for i in places]
    if len({w.lower() for w in content}) < 2:
        return None
    while True:  # ends: two different words have an order other than this one
        order = content[:]
        rng.shuffle(order)
        if [w.lower() for w in order] != [w.lower() for w in content]:
            break
    for i, word in zip(places, order, strict=True):
        words[i] = word
    return _rebuild(caption, matches, words)


class CaptionNegatives:
    """``(captions, rng) -> (negatives, valid)``: ``count`` negatives per caption, caption-major (caption
    i's at ``i * count ...``); an invalid slot holds the caption itself and must be left out of the loss."""

    def __init__(self, kind: str, count: int = 1):
        if kind not in TEXT_NEGATIVES or kind == "none":
            raise ValueError(f"loss.text_negatives must be one of {TEXT_NEGATIVES}, got {kind!r}")
        if count < 1:
            raise ValueError(f"loss.text_negatives_count must be >= 1, got {count}")
        self.kind, self.count = kind, count

    def __call__(self, captions: Sequence[str], rng: random.Random) -> tuple[list[str], list[bool]]:
        make = swap_negative if self.kind == "swap" else shuffle_negative
        negatives, valid = [], []
        for caption in captions:
            for _ in range(self.count):
                negative = make(caption, rng)
                negatives.append(caption if negative is None else negative)
                valid.append(negative is not None)
        return negatives, valid


def caption_negatives(kind: str | None, count: int = 1) -> CaptionNegatives | None:
    """The generator ``loss.text_negatives`` names, or None for ``none``."""
    if kind in (None, "none"):
        return None
    return CaptionNegatives(kind, count)


def negative_fields(
    negatives: CaptionNegatives | None, captions: Sequence[str], rng: random.Random, tokenizer
) -> dict:
    """A training batch's ``text_neg`` (tokens, ``count`` rows per caption) and ``text_neg_valid``; none
    without a generator."""
    if negatives is None:
        return {}
    texts, valid = negatives(captions, rng)
    return {"text_neg": tokenizer(texts), "text_neg_valid": torch.tensor(valid)}
