"""An embedded offline corpus: short TinyStories-like stories with invented names.

Every story introduces made-up words early (a hero and a friend with syllable-salad names, an
object such as "a blue frobnet" or a creature species, places such as "the town of Quenwick")
and repeats them later, in one of two plots (a lost object, a journey) with variable middles.
The invented words are new in every story, so a model can only predict their later mentions by
copying them from earlier context: the corpus rewards attention (induction heads), which is
what the OELM experiments probe, while staying small enough to train on a laptop CPU.

The text is a pure function of (n_bytes, seed): `random.Random(seed)` is the only randomness.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

# ---------------------------------------------------------------------------------------------
# invented words

_ONSETS = (
    "b",
    "br",
    "d",
    "dr",
    "f",
    "fl",
    "g",
    "gl",
    "gr",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "pl",
    "qu",
    "r",
    "s",
    "sn",
    "st",
    "t",
    "tr",
    "v",
    "w",
    "z",
    "zh",
    "th",
    "sh",
    "bl",
)
_VOWELS = ("a", "e", "i", "o", "u", "oo", "ai", "ee", "or", "ar", "y", "ou")
_CODAS = ("", "", "", "n", "b", "l", "m", "x", "k", "rk", "nd", "ck", "p", "sh", "t", "rb", "z")
_NAME_ENDS = ("in", "a", "o", "ix", "elle", "us", "wick", "by", "ina", "et", "on", "ie")
_NOUN_ENDS = ("et", "le", "ock", "um", "ip", "az", "ing", "o", "ble", "ush")
_PLACE_ENDS = ("wick", "ton", "dale", "mere", "by", "ford", "holm", "stead", "vale")


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, ends: tuple[str, ...]) -> str:
    # a syllable, sometimes a second open one, plus an ending: pronounceable, short, and with
    # ~10^6 combinations rarely repeated across stories
    second = rng.choice(_ONSETS) + rng.choice(_VOWELS) if rng.random() < 0.3 else ""
    return _syllable(rng) + second + rng.choice(ends)


# ---------------------------------------------------------------------------------------------
# vocabulary of the story frame (plain English words, shared by all stories)

_KINDS = (
    "a brave mouse",
    "a kind dragon",
    "a small bunny",
    "a curious cat",
    "a happy puppy",
    "a tiny bird",
    "a shy frog",
    "an old turtle",
    "a clever fox",
    "a young bear",
)
_COLORS = ("blue", "red", "green", "yellow", "purple", "shiny", "striped", "soft", "tiny", "big", "golden", "spotted")
_ADJS = (
    "round",
    "warm",
    "bumpy",
    "smooth",
    "heavy",
    "light",
    "funny",
    "pretty",
    "strange",
    "sparkly",
    "noisy",
    "quiet",
)
_ACTIVITIES = (
    "play in the park",
    "draw pictures",
    "sing songs",
    "run in the grass",
    "look at the stars",
    "build towers with blocks",
    "jump in puddles",
    "read books",
    "pick flowers",
    "watch the clouds",
)
_HIDES = (
    "a big rock",
    "a pile of leaves",
    "the old bridge",
    "a tall tree",
    "a bush",
    "the bed",
    "a wooden box",
    "the garden fence",
)
_FEELINGS = ("happy", "excited", "proud", "glad", "cheerful", "calm")
_WORRIES = ("sad", "scared", "worried", "upset", "lonely")
_PLACE_FORMS = (
    "the town of {P}",
    "the village of {P}",
    "the {P} forest",
    "{P} Hill",
    "the land of {P}",
    "the city of {P}",
)

# templates use {H} hero, {F} friend, {N} invented noun, {C} color, {PL} place (full), {P} place
# (short), {he}/{He}/{his}/{him} hero pronouns, plus frame words drawn per story
_OPENINGS = (
    "Once upon a time, in {PL}, there lived {kind} named {H}.",
    "{H} was {kind} who lived in {PL}.",
    "Long ago, {PL} was home to {kind} called {H}.",
    "There was once {kind} named {H}. {He} lived in {PL}.",
    "In {PL}, there was {kind}. {His} name was {H}.",
)
_TRAITS = (
    "{H} loved to {act}.",
    "Every day, {H} liked to {act} near {P}.",
    "More than anything, {H} wanted to {act} all day.",
    "{H} was always {feel} when {he} could {act}.",
)
_OBJECTS = (
    "One day, {H} found a {C} {N} under {hide}.",
    "One morning, {H}'s grandma gave {him} a {C} {N}.",
    "On {his} birthday, {H} got a {C} {N}.",
    "One sunny day, {H} saw a {C} {N} in the middle of {P}.",
)
_OBJECT_MORE = (
    "The {N} was {adj} and {adj2}.",
    "{H} had never seen a {N} before.",
    "Nobody in {P} had a {N} like it.",
    "{H} held the {C} {N} close and smiled.",
)
_FRIENDS = (
    "{H} ran to show it to {his} friend {F}, {fkind}.",
    "Then {H} met {fkind} named {F}.",
    "Soon {F}, {fkind} from {P}, came to see.",
)
_TALK = (
    '"Look at my {N}!" said {H}. "It is {C}!"',
    '"What is a {N}?" asked {F}. "It is a {N} from {P}," said {H}.',
    '{F} said, "I want to play with the {C} {N} too!"',
    '"Can I hold it?" asked {F}. {H} gave the {N} to {F}.',
    '"Wow, {H}," said {F}. "I like your {N}."',
)
_PROBLEMS = (
    "But then the wind came and blew the {N} far away from {P}.",
    "But when {H} looked again, the {C} {N} was gone!",
    "Then {F} dropped the {N}, and it rolled away down the hill.",
    "But a big dog grabbed the {N} and ran out of {P}.",
)
_MIDDLE = (
    "{H} felt {bad}.",
    "{F} felt {bad} too.",
    '"We must find the {N}," said {F}.',
    "{H} and {F} looked everywhere in {P}.",
    '"{F}, where did it go?" cried {H}.',
    "They asked everyone in {P} about the {C} {N}.",
    '{H} called, "Little {N}, where are you?"',
    "{F} held {H}'s hand so {he} would not be {bad}.",
    "The sun went down over {P}, but {H} did not give up.",
)
_ENDINGS = (
    "At last, {F} saw the {C} {N} behind {hide}. {H} hugged {F}.",
    "Finally, {H} found the {N} next to {hide}. {He} was so {feel}!",
    "In the end, the {N} was safe with {H} again, and {F} laughed.",
)
_MORALS = (
    "From that day on, {H} and {F} played with the {C} {N} every day.",
    "{H} learned that friends like {F} always help.",
    "Everyone in {P} still tells the story of {H} and the {N}.",
    "{H} and {F} took the {N} home and had a snack.",
    "Now {H} keeps the {C} {N} in a safe place, and {F} comes to visit.",
)

# the journey plot adds a second place {P2}/{PL2} and a creature species {CR} named {CRN}
_RUMORS = (
    "One day, {F} told {H} about a {CR} that lived in {PL2}.",
    '{H}\'s grandpa said, "Far away in {PL2}, there lives a {CR}."',
    "Everyone in {P} talked about the {CR} of {P2}.",
)
_CREATURE = (
    "A {CR} is a {adj} animal with {C} fur.",
    "Nobody in {P} had ever seen a {CR}.",
    "{H} wanted to see a real {CR} more than anything.",
)
_SET_OFF = (
    "{H} and {F} packed some food and walked to {P2}.",
    "So {H} asked {F}, {fkind}, to come along, and they set off for {P2}.",
)
_ROAD = (
    "The road to {P2} was long.",
    '{F} was {bad}, but {H} said, "We will find the {CR}."',
    "They crossed a river and climbed a hill.",
    "At night, they slept under the stars and dreamed of the {CR}.",
    '"Is {P2} far?" asked {F}.',
    'They met an old owl who said, "The {CR} lives by the lake in {P2}."',
)
_MEET = (
    "At last, in {P2}, they saw the {CR}. It was {adj2} and very {C}.",
    "When they reached {P2}, a {CR} was waiting for them by a tree.",
)
_GREET = (
    '"Hello, {CR}!" said {H}. The {CR} smiled.',
    'The {CR} said, "My name is {CRN}. Welcome to {P2}."',
    '"I am {CRN}," said the {CR}. "Do you want to play?"',
)
_JOURNEY_ENDS = (
    "{H}, {F} and {CRN} played until the sun went down. Then {H} and {F} went home to {P}.",
    "{CRN} the {CR} gave {H} a {C} stone to take back to {P}.",
    "From that day on, {H} visited {CRN} the {CR} in {P2} every summer.",
    "Back in {P}, {H} told everyone about {CRN}, and {F} drew a picture of the {CR}.",
)


def split_seed(seed: int, split: str) -> int:
    """Seed of one split; hashing (seed, split) gives val stories unseen in train."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{split}".encode()).digest()[:8], "little")


def story(rng: random.Random) -> str:
    """One story drawn from rng: a lost-object plot or a journey plot."""
    he, his, him, child = rng.choice((("he", "his", "him", "a little boy"), ("she", "her", "her", "a little girl")))
    place, place2 = (_word(rng, _PLACE_ENDS).capitalize() for _ in range(2))
    w = {
        "H": _word(rng, _NAME_ENDS).capitalize(),
        "F": _word(rng, _NAME_ENDS).capitalize(),
        "CRN": _word(rng, _NAME_ENDS).capitalize(),
        "N": _word(rng, _NOUN_ENDS),
        "CR": _word(rng, _NOUN_ENDS),
        "C": rng.choice(_COLORS),
        "P": place,
        "P2": place2,
        "PL": rng.choice(_PLACE_FORMS).format(P=place),
        "PL2": rng.choice(_PLACE_FORMS).format(P=place2),
        "kind": rng.choice((child, *_KINDS)),
        "fkind": rng.choice(("a little boy", "a little girl", *_KINDS)),
        "act": rng.choice(_ACTIVITIES),
        "hide": rng.choice(_HIDES),
        "feel": rng.choice(_FEELINGS),
        "bad": rng.choice(_WORRIES),
        "adj": rng.choice(_ADJS),
        "adj2": rng.choice(_ADJS),
        "he": he,
        "He": he.capitalize(),
        "his": his,
        "His": his.capitalize(),
        "him": him,
    }
    parts = [rng.choice(_OPENINGS)]
    # optional sentences and variable-length middles keep stories from being one fixed template
    if rng.random() < 0.7:
        parts.append(rng.choice(_TRAITS))
    if rng.random() < 0.5:
        parts.append(rng.choice(_OBJECTS))
        parts += rng.sample(_OBJECT_MORE, rng.randint(0, 2))
        parts.append(rng.choice(_FRIENDS))
        parts += rng.sample(_TALK, rng.randint(1, 3))
        parts.append(rng.choice(_PROBLEMS))
        parts += rng.sample(_MIDDLE, rng.randint(1, 5))
        parts.append(rng.choice(_ENDINGS))
        parts += rng.sample(_MORALS, rng.randint(1, 2))
    else:
        parts.append(rng.choice(_RUMORS))
        parts += rng.sample(_CREATURE, rng.randint(1, 2))
        parts.append(rng.choice(_SET_OFF))
        parts += rng.sample(_ROAD, rng.randint(1, 4))
        parts.append(rng.choice(_MEET))
        parts += rng.sample(_GREET, rng.randint(1, 3))
        parts += rng.sample(_JOURNEY_ENDS, rng.randint(1, 2))
    # split into two or three paragraphs at random sentence boundaries
    cut = sorted(rng.sample(range(2, len(parts) - 1), rng.randint(1, 2)))
    paras = [" ".join(parts[a:b]) for a, b in zip([0, *cut], [*cut, len(parts)])]
    return "\n\n".join(paras).format(**w)


def generate_stories(n_bytes: int, seed: int) -> Iterator[str]:
    """Yield stories from `seed` until at least n_bytes of UTF-8 text has been produced."""
    rng = random.Random(seed)
    produced = 0
    while produced < n_bytes:
        text = story(rng)
        produced += len(text.encode())
        yield text
