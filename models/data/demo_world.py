"""The demo world: a deterministic, seeded multimodal KB + mention set in the canonical format.

It exists so that the whole pipeline (training, index job, service) runs and is tested without
any download, and so that a model which ignores a modality *measurably* loses. Every property
below is there for one of those two reasons.

Entities (``kb.jsonl``, ``images/kb/E*.jpg``)
    * ``id`` ``E000001``...; ``name`` "First Surname"; ``attributes`` a short fixed-order text
      ``"Occupation: painter. City: Lisbon. Born: 1872."`` (8 words: the discriminating fields
      come first and nothing is cut by a 40-word-piece tokenizer).
    * Looks: each entity has a latent *look* = shape (8) x fill colour (10) x pattern (5) x
      background (6). Images are drawn procedurally with PIL (big shapes, saturated colours)
      so that an ImageNet CNN separates them. About a third of the entities have NO image
      (``image_share``), like real KBs; those must be linked from text alone.
    * Name collisions: ``collision_share`` of the entities sit in groups of 2-5 that share one
      full name and differ only by attributes and look. Inside a group every member has a
      different shape AND a different fill colour AND a different background, and a
      different (occupation, city) pair and birth year. The attribute values are deliberately
      *paired*: members ``i`` and ``i+1`` share one field (say occupation) and every other
      member shares the other field (city), so one context word narrows a group to 2-3
      members without settling it.
    * Surnames are drawn from a pool about ``names_per_surname`` times smaller than the set of
      full names, so a surname-only (partial) mention collides across name groups.

Mentions (``mentions.jsonl``, ``images/mentions/M*.jpg``)
    * ``id`` ``M0000001``...; ``mention`` the full name or (``partial_name_share``) just the
      surname; ``sentence`` one of many short templates (<= ~20 words) carrying context words
      (the gold's occupation / city / birth year) next to the mention; exact ``span``.
    * Images are fresh, noisy *views* of a look, drawn with their own randomness (new pose and
      scale, random crop, rotation, colour jitter, occlusion patch, blur, pixel noise), never
      copies of the KB image. ``no_image_share`` of the mentions have no image;
      ``misleading_image_share`` of the mentions whose gold has an imaged namesake show the
      look of that namesake (another member of the same name group), preferably one that
      shares no context attribute with the gold, so the words clearly outvote the image.
    * The evidence is complementary; the context of each mention is chosen from the candidate
      set its surface string points to (the name group, or all entities with that surname):
        - ``unambiguous``: the surface names one entity; one or two context words anyway;
        - ``image_resolves``: ambiguous surface, a true image of an imaged gold: with
          probability ``narrow_context_share`` the sentence names ONE attribute that 2-3
          candidates share, so only the image can pick the gold (text-only models lose here);
        - ``text_resolves``: the smallest set of attributes that singles the gold out among
          the candidates. Always used for mentions without an image, with a misleading image,
          or whose gold has no KB image (image-only models lose here);
        - ``unresolvable``: counted, kept tiny (a partial-name mention that no attribute set
          can settle falls back to the full name, so this is normally 0).
    * NIL mentions (a person not in the KB, ``entity_id`` null) are OFF by default
      (``nil_share``); MIMIC-style training has no NIL class.

Files: ``kb.jsonl``, ``mentions.jsonl``, ``splits.json`` (70/10/20 by mention), ``meta.json``
(summary + config), the images, and two ground-truth sidecars that no loader needs but
evaluation breakdowns can use: ``truth_entities.jsonl`` (look, attribute fields, name group)
and ``truth_mentions.jsonl`` (evidence kind, image kind, context fields, candidate count).

Determinism and scale: all structure comes from one ``random.Random(seed)`` consumed in a fixed
order; every image gets its own ``numpy`` generator seeded by ``(seed, kind, index)``, so the
bytes do not depend on the number of worker processes. Nothing iterates a set or hashes a
string. The world is built in a hidden sibling folder and renamed into place after
``meta.json`` (the "done" marker) is written, so a killed run never looks finished.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from models.data.schema import (
    KB_FILE,
    MENTIONS_FILE,
    META_FILE,
    SPLITS_FILE,
    Entity,
    Mention,
    write_json,
    write_jsonl,
    write_meta,
)

logger = logging.getLogger(__name__)

SOURCE = "models.data.demo_world"
TRUTH_ENTITIES_FILE = "truth_entities.jsonl"
TRUTH_MENTIONS_FILE = "truth_mentions.jsonl"
KB_IMAGE_DIR = "images/kb"
MENTION_IMAGE_DIR = "images/mentions"

# ------------------------------------------------------------------------------ vocabularies
# Looks. Colours are saturated and far apart in hue/lightness; backgrounds are pale so the
# shape always stands out.
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "crescent")
COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (215, 25, 32)),
    ("orange", (245, 130, 20)),
    ("yellow", (250, 215, 30)),
    ("green", (40, 160, 60)),
    ("teal", (0, 150, 150)),
    ("blue", (30, 70, 200)),
    ("purple", (120, 40, 160)),
    ("pink", (240, 110, 180)),
    ("brown", (120, 70, 30)),
    ("black", (25, 25, 25)),
)
PATTERNS = ("solid", "stripes", "dots", "checker", "rings")
BACKGROUNDS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("white", (250, 250, 250)),
    ("grey", (200, 200, 200)),
    ("cream", (245, 235, 200)),
    ("sky", (200, 225, 250)),
    ("mint", (205, 240, 210)),
    ("rose", (250, 215, 220)),
)

# Attribute vocabularies: single words, so that a context word is one exact token to match.
OCCUPATIONS = (
    "painter", "sculptor", "chemist", "physicist", "botanist", "geologist", "astronomer",
    "architect", "engineer", "surgeon", "pianist", "violinist", "composer", "poet", "novelist",
    "journalist", "photographer", "historian", "linguist", "economist", "mathematician",
    "cartographer", "diplomat", "sailor", "aviator", "jockey", "cyclist", "swimmer", "wrestler",
    "fencer", "chef", "tailor", "jeweller", "carpenter", "blacksmith", "potter", "weaver",
    "lawyer", "judge", "banker", "merchant", "pharmacist", "zoologist", "archaeologist",
    "philosopher", "dancer", "actor", "singer", "drummer", "cellist", "librarian", "teacher",
    "nurse", "inventor", "explorer", "mountaineer", "goalkeeper", "rower", "archer", "boxer",
)  # fmt: skip
CITIES = (
    "Lisbon", "Oslo", "Cairo", "Lima", "Dublin", "Vienna", "Prague", "Warsaw", "Athens",
    "Madrid", "Rome", "Naples", "Berlin", "Munich", "Hamburg", "Zurich", "Geneva", "Lyon",
    "Marseille", "Bordeaux", "Porto", "Seville", "Valencia", "Krakow", "Budapest", "Bucharest",
    "Belgrade", "Zagreb", "Helsinki", "Stockholm", "Copenhagen", "Bergen", "Riga", "Vilnius",
    "Tallinn", "Kyiv", "Odessa", "Istanbul", "Ankara", "Tehran", "Beirut", "Tunis", "Algiers",
    "Casablanca", "Dakar", "Lagos", "Nairobi", "Accra", "Kampala", "Mumbai", "Delhi",
    "Kolkata", "Dhaka", "Karachi", "Tashkent", "Bangkok", "Hanoi", "Manila", "Jakarta",
    "Seoul", "Tokyo", "Osaka", "Kyoto", "Shanghai", "Beijing", "Sydney", "Melbourne",
    "Auckland", "Toronto", "Montreal", "Chicago", "Boston", "Denver", "Havana", "Bogota",
    "Quito", "Santiago", "Caracas", "Montevideo",
)  # fmt: skip
YEAR_RANGE = (1820, 2000)  # birth years, end exclusive

FIRST_NAMES = (
    "Ada", "Alan", "Alma", "Amir", "Anna", "Arjun", "Astrid", "Aurelio", "Bao", "Beatriz",
    "Boris", "Bruno", "Camille", "Carmen", "Chen", "Clara", "Dara", "David", "Dmitri", "Edith",
    "Elena", "Elif", "Emil", "Enzo", "Esther", "Farah", "Felix", "Freya", "Gustav", "Hana",
    "Hugo", "Ida", "Ines", "Ivan", "Jamal", "Jana", "Jonas", "Jorge", "Julia", "Kai", "Kamala",
    "Karin", "Kenji", "Lars", "Leila", "Lena", "Leo", "Liam", "Lina", "Lucia", "Luis", "Maya",
    "Mateo", "Mei", "Mila", "Nadia", "Nia", "Nils", "Noor", "Olga", "Omar", "Oscar", "Paulo",
    "Pia", "Priya", "Rafael", "Rosa", "Ravi", "Ruth", "Sami", "Sara", "Selma", "Tariq",
    "Tomas", "Una", "Uri", "Vera", "Victor", "Wanda", "Yara", "Yusuf", "Zara", "Zeno", "Agnes",
    "Anton", "Bianca", "Cyrus", "Dalia", "Elias", "Fatima", "Greta", "Hamid", "Irene",
    "Jakob", "Kofi", "Laila", "Marek", "Nina", "Otto", "Petra", "Quentin", "Rania", "Stefan",
    "Tove", "Ulla", "Vikram", "Wilma", "Xenia", "Yosef", "Zofia", "Abel", "Bettina", "Casimir",
    "Delia", "Emeka", "Flora", "Goran", "Helga", "Igor", "Joaquin", "Keiko", "Lucas", "Mirela",
    "Nadir", "Ofelia", "Pavel", "Rhea", "Soren", "Thea", "Valentin", "Willem", "Yuki",
)  # fmt: skip

# Surnames are built from parts (onset [+ middle [+ middle]] + ending): enough distinct strings
# for a million-entity world, short ones first so small worlds get short surnames.
_SURNAME_ONSETS = (
    "Bar", "Bel", "Cor", "Dal", "Dor", "Fen", "Gar", "Hal", "Kor", "Lan", "Mar", "Mor", "Nor",
    "Pel", "Ros", "Sal", "Tor", "Val", "Ver", "Wen", "Zan", "Ash", "Bran", "Cal", "Dren", "El",
    "Fal", "Gor", "Hart", "Ing", "Jas", "Kel", "Lor", "Mel", "Nev", "Or", "Quen", "Rad",
    "Sten", "Tal",
)  # fmt: skip
_SURNAME_MIDDLES = (
    "a", "e", "i", "o", "u", "an", "en", "in", "on", "ar", "er", "ol", "ad", "is", "ur",
)  # fmt: skip
_SURNAME_ENDINGS = (
    "vin", "dell", "mont", "ski", "berg", "wick", "ford", "sen", "ova", "etti", "ez", "hart",
    "ley", "ton", "ard", "win", "ovich", "ani", "quist", "ak", "oux", "ida", "stad", "more",
    "ville", "enko", "idis", "aro", "holm", "ach",
)  # fmt: skip

# Sentence pieces. Events never contain an attribute value, a year or a name.
EVENTS = (
    "opened a new exhibition", "gave a public lecture", "signed the agreement",
    "arrived late to the ceremony", "won the annual prize", "was interviewed on the radio",
    "published a short memoir", "visited the old harbour", "joined the expedition",
    "spoke at the spring festival", "met the visiting delegation",
    "returned home after years abroad", "appeared in a newsreel", "attended the gala dinner",
    "received an honorary medal", "cut the ribbon at the new bridge",
    "was seen at the train station", "answered questions from students", "led the parade",
    "posed for a portrait", "announced a farewell tour", "shared a letter with the press",
    "hosted a charity evening", "toured the northern provinces", "planted a tree in the park",
    "unveiled a memorial plaque", "left the meeting early", "greeted the crowd",
    "wrote to the newspaper", "launched a small foundation",
)  # fmt: skip
# {D} = descriptor built from the context attributes, {E} = event, {m} = the mention.
TEMPLATES = (
    "{D}, {m}, {E}.",
    "{m}, {D}, {E}.",
    "As {D}, {m} {E}.",
    "{m} ({D}) {E}.",
    "Last year {m}, {D}, {E}.",
    "Reports say that {m}, {D}, {E}.",
    "Known as {D}, {m} {E}.",
    "Our archive lists {m} as {D}.",
    "Among the guests was {m}, {D}.",
    "The photo shows {m}, {D}, who {E}.",
    "It was {m}, {D}, who {E}.",
    "Few expected that {m}, {D}, {E}.",
    "In the spring {D} named {m} {E}.",
    "{m}, {D}, {E} last week.",
)

OCC, CITY, YEAR = "occupation", "city", "year"
FIELDS = (OCC, CITY, YEAR)
# Smallest-first attribute sets for a context that must single the gold out. Year comes last:
# a number is the weakest cue for a word-piece text encoder.
_FULL_CONTEXT_ORDER: tuple[tuple[str, ...], ...] = (
    (OCC,),
    (CITY,),
    (OCC, CITY),
    (OCC, YEAR),
    (CITY, YEAR),
    (OCC, CITY, YEAR),
)
_DESCRIPTORS: dict[tuple[str, ...], tuple[str, ...]] = {
    (OCC,): ("{a} {occ}", "the {occ}"),
    (CITY,): ("a native of {city}", "a resident of {city}", "someone from {city}"),
    (YEAR,): ("a person born in {year}",),
    (OCC, CITY): ("{a} {occ} from {city}", "the {city} {occ}", "{a} {occ} based in {city}"),
    (OCC, YEAR): ("{a} {occ} born in {year}",),
    (CITY, YEAR): ("a native of {city} born in {year}",),
    (OCC, CITY, YEAR): ("{a} {occ} from {city} born in {year}",),
}

# Evidence kinds of a mention (``truth_mentions.jsonl`` and the summary).
UNAMBIGUOUS = "unambiguous"
TEXT_RESOLVES = "text_resolves"
IMAGE_RESOLVES = "image_resolves"
UNRESOLVABLE = "unresolvable"
NIL = "nil"
# Image kinds of a mention.
IMG_TRUE, IMG_NONE, IMG_MISLEADING = "true", "none", "misleading"


@dataclass(frozen=True)
class DemoWorldConfig:
    """Knobs of the demo world. Defaults give the 2,000-entity world of ``make demo``."""

    # Big enough for 6k mentions (4.2k train) with real ambiguity, small enough to build in
    # seconds; benchmarks pass 100_000+.
    num_entities: int = 2000
    seed: int = 0
    # About a third of the entities have no image, as in Wikidata-derived MEL KBs.
    image_share: float = 2 / 3
    # Half the entities share their full name with 1-4 others: ambiguity is the point.
    collision_share: float = 0.5
    # Relative frequency of name-group sizes 2, 3, 4, 5 (small groups are the common case).
    group_size_weights: tuple[float, float, float, float] = (0.4, 0.3, 0.2, 0.1)
    # Distinct full names per surname: ~2.5 makes most surname-only mentions ambiguous across
    # name groups while a two-attribute context still settles them.
    names_per_surname: float = 2.5
    # 3 mentions per entity: every entity appears in training while dev/test stay large.
    mentions_per_entity: int = 3
    # Stored JPEG side: the encoders resize to 224 anyway; 112 px keeps 100k worlds small.
    image_size: int = 112
    jpeg_quality: int = 85
    # Mentions without an image (must be linked from text).
    no_image_share: float = 0.2
    # Of the mentions whose gold has an imaged namesake: the image shows that namesake
    # (~3.5% of all mentions). Kept small: the text must outvote a confident wrong image.
    misleading_image_share: float = 0.08
    # Surname-only mentions (collide across name groups).
    partial_name_share: float = 0.15
    # Of the ambiguous mentions with a true image of an imaged gold: the sentence only narrows
    # the candidates (one shared attribute) and the image decides. This is what a text-only
    # model cannot solve.
    narrow_context_share: float = 0.8
    # NIL mentions (gold null) as a share of all mentions; off: MIMIC training has no NIL.
    nil_share: float = 0.0
    # Split by mention, as the published MEL datasets do.
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    # Image-rendering processes; 0 = all cores (at most 8). Output bytes do not depend on it.
    workers: int = 0

    def __post_init__(self) -> None:
        if self.num_entities < 1:
            raise ValueError("num_entities must be >= 1")
        for name in (
            "image_share",
            "collision_share",
            "no_image_share",
            "misleading_image_share",
            "partial_name_share",
            "narrow_context_share",
        ):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if not 0.0 <= self.nil_share < 1.0:
            raise ValueError(f"nil_share must be in [0, 1), got {self.nil_share}")
        if self.no_image_share + self.misleading_image_share > 1.0:
            raise ValueError("no_image_share + misleading_image_share must be <= 1")
        if (
            len(self.group_size_weights) != 4
            or min(self.group_size_weights) < 0
            or sum(self.group_size_weights) <= 0
        ):
            raise ValueError("group_size_weights: four non-negative weights for sizes 2..5")
        if not 1.0 <= self.names_per_surname < len(FIRST_NAMES):
            raise ValueError(f"names_per_surname must be in [1, {len(FIRST_NAMES)})")
        if self.mentions_per_entity < 1:
            raise ValueError("mentions_per_entity must be >= 1")
        if not 32 <= self.image_size <= 512:
            raise ValueError("image_size must be in [32, 512]")
        if (
            len(self.split_fractions) != 3
            or min(self.split_fractions) < 0
            or abs(sum(self.split_fractions) - 1.0) > 1e-6
        ):
            raise ValueError("split_fractions: three non-negative fractions summing to 1")
        if self.workers < 0:
            raise ValueError("workers must be >= 0")


# ------------------------------------------------------------------------------- the world


@dataclass(frozen=True, slots=True)
class _Person:
    """One KB entity with its latent fields (index = row in kb.jsonl)."""

    id: str
    first: str
    surname: str
    occupation: str
    city: str
    year: int
    look: tuple[int, int, int, int]  # (shape, colour, pattern, background) indices
    has_image: bool
    group: int  # index of its full-name group

    @property
    def name(self) -> str:
        return f"{self.first} {self.surname}"

    def value(self, field: str) -> str:
        if field == OCC:
            return self.occupation
        if field == CITY:
            return self.city
        return str(self.year)


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _group_sizes(rng: random.Random, config: DemoWorldConfig) -> list[int]:
    """Sizes of the full-name groups (1 = a unique name), summing to ``num_entities``."""
    n = config.num_entities
    target = round(n * config.collision_share)
    sizes: list[int] = []
    in_groups = 0
    while in_groups < target:
        size = rng.choices((2, 3, 4, 5), weights=config.group_size_weights)[0]
        size = min(size, target - in_groups)
        if size < 2:  # one entity left over: grow the last group if it can take it
            if sizes and sizes[-1] < 5:
                sizes[-1] += 1
                in_groups += 1
            break
        sizes.append(size)
        in_groups += size
    sizes.extend([1] * (n - in_groups))
    rng.shuffle(sizes)
    return sizes


def _surnames(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct surnames that are not also a first name, a city or an occupation."""
    n_on, n_mid, n_end = len(_SURNAME_ONSETS), len(_SURNAME_MIDDLES), len(_SURNAME_ENDINGS)
    form_sizes = (n_on * n_end, n_on * n_mid * n_end, n_on * n_mid * n_mid * n_end)
    total = sum(form_sizes)
    limit = min(total, max(4 * count, 2000))
    reserved = {w.lower() for w in (*FIRST_NAMES, *CITIES, *OCCUPATIONS)}
    out: list[str] = []
    seen: set[str] = set()
    for idx in rng.sample(range(limit), limit):
        parts: tuple[str, ...]
        if idx < form_sizes[0]:
            on, end = divmod(idx, n_end)
            parts = (_SURNAME_ONSETS[on], _SURNAME_ENDINGS[end])
        elif idx < form_sizes[0] + form_sizes[1]:
            rest, end = divmod(idx - form_sizes[0], n_end)
            on, mid = divmod(rest, n_mid)
            parts = (_SURNAME_ONSETS[on], _SURNAME_MIDDLES[mid], _SURNAME_ENDINGS[end])
        else:
            rest, end = divmod(idx - form_sizes[0] - form_sizes[1], n_end)
            rest, mid2 = divmod(rest, n_mid)
            on, mid1 = divmod(rest, n_mid)
            parts = (
                _SURNAME_ONSETS[on],
                _SURNAME_MIDDLES[mid1],
                _SURNAME_MIDDLES[mid2],
                _SURNAME_ENDINGS[end],
            )
        name = "".join(parts)
        key = name.lower()
        if key in seen or key in reserved:
            continue
        seen.add(key)
        out.append(name)
        if len(out) == count:
            return out
    raise ValueError(
        f"cannot draw {count} distinct surnames (at most ~{total}); "
        "raise names_per_surname or lower num_entities"
    )


def _build_people(rng: random.Random, config: DemoWorldConfig) -> list[_Person]:
    sizes = _group_sizes(rng, config)
    n_names = len(sizes)
    n_surnames = max(1, round(n_names / config.names_per_surname))
    if math.ceil(n_names / n_surnames) > len(FIRST_NAMES):
        raise ValueError("too many full names per surname for distinct first names")
    surnames = _surnames(rng, n_surnames)
    first_offset = [rng.randrange(len(FIRST_NAMES)) for _ in range(n_surnames)]
    # Name u gets surname u % S and the (u // S)-th first name after that surname's offset:
    # full names are unique, each surname carries ceil(U / S) or fewer of them.
    name_order = rng.sample(range(n_names), n_names)
    imaged_rows = set(
        rng.sample(range(config.num_entities), round(config.num_entities * config.image_share))
    )
    slots = rng.sample(range(config.num_entities), config.num_entities)  # row of each member

    people: list[_Person | None] = [None] * config.num_entities
    n_years = YEAR_RANGE[1] - YEAR_RANGE[0]
    pos = 0
    for g, size in enumerate(sizes):
        u = name_order[g]
        s = u % n_surnames
        first = FIRST_NAMES[(first_offset[s] + u // n_surnames) % len(FIRST_NAMES)]
        surname = surnames[s]
        years = [YEAR_RANGE[0] + y for y in rng.sample(range(n_years), size)]
        shapes = rng.sample(range(len(SHAPES)), size)
        colours = rng.sample(range(len(COLOURS)), size)
        backgrounds = rng.sample(range(len(BACKGROUNDS)), size)
        patterns = [rng.randrange(len(PATTERNS)) for _ in range(size)]
        # Paired attributes: member i has paired[i // 2] and alternating[i % 2], so one field
        # narrows the group to 2 (or 3) members and the (occupation, city) pair is unique.
        paired_is_occ = rng.random() < 0.5
        paired_vocab, alt_vocab = (OCCUPATIONS, CITIES) if paired_is_occ else (CITIES, OCCUPATIONS)
        paired = rng.sample(paired_vocab, (size + 1) // 2)
        alternating = rng.sample(alt_vocab, min(size, 2))
        for i in range(size):
            p_val, a_val = paired[i // 2], alternating[i % 2]
            occ, city = (p_val, a_val) if paired_is_occ else (a_val, p_val)
            row = slots[pos]
            pos += 1
            people[row] = _Person(
                id=f"E{row + 1:06d}",
                first=first,
                surname=surname,
                occupation=occ,
                city=city,
                year=years[i],
                look=(shapes[i], colours[i], patterns[i], backgrounds[i]),
                has_image=row in imaged_rows,
                group=g,
            )
    return [p for p in people if p is not None]


def _consistent(
    cands: Sequence[int], people: Sequence[_Person], gold: _Person, fields: Sequence[str]
) -> list[int]:
    return [c for c in cands if all(people[c].value(f) == gold.value(f) for f in fields)]


def _image_settles(cands: Sequence[int], people: Sequence[_Person], gold_row: int) -> bool:
    """A true view of the gold's look picks it out of ``cands`` (no other imaged look equal)."""
    look = people[gold_row].look
    return all(c == gold_row or not people[c].has_image or people[c].look != look for c in cands)


def _sentence(
    rng: random.Random, surface: str, values: dict[str, str], fields: tuple[str, ...]
) -> tuple[str, tuple[int, int]]:
    """A templated sentence with the context attributes ``fields`` and the exact span."""
    occ = values.get(OCC, "")
    desc = rng.choice(_DESCRIPTORS[fields]).format(
        a=_article(occ) if occ else "a",
        occ=occ,
        city=values.get(CITY, ""),
        year=values.get(YEAR, ""),
    )
    template = rng.choice(TEMPLATES)
    before, after = template.split("{m}")
    event = rng.choice(EVENTS)
    prefix = before.format(D=desc, E=event)
    suffix = after.format(D=desc, E=event)
    sentence = prefix + surface + suffix
    sentence = sentence[0].upper() + sentence[1:]
    return sentence, (len(prefix), len(prefix) + len(surface))


# ----------------------------------------------------------------------------------- images


def _polygon(
    n: int, cx: float, cy: float, r: float, rot: float, radii: Sequence[float] = (1.0,)
) -> list[tuple[float, float]]:
    return [
        (
            cx + r * radii[k % len(radii)] * math.cos(rot + 2 * math.pi * k / n),
            cy + r * radii[k % len(radii)] * math.sin(rot + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _draw_shape(
    mask: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float
) -> None:
    if shape == "circle":
        mask.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        mask.polygon(_polygon(4, cx, cy, r * 1.15, rot + math.pi / 4), fill=255)
    elif shape == "triangle":
        mask.polygon(_polygon(3, cx, cy, r * 1.2, rot - math.pi / 2), fill=255)
    elif shape == "star":
        mask.polygon(_polygon(10, cx, cy, r * 1.2, rot - math.pi / 2, (1.0, 0.45)), fill=255)
    elif shape == "hexagon":
        mask.polygon(_polygon(6, cx, cy, r * 1.05, rot), fill=255)
    elif shape == "diamond":
        mask.polygon(_polygon(4, cx, cy, r * 1.2, rot, (1.0, 0.6)), fill=255)
    elif shape == "cross":
        w = 0.36
        pts = [
            (w, 1),
            (w, w),
            (1, w),
            (1, -w),
            (w, -w),
            (w, -1),
            (-w, -1),
            (-w, -w),
            (-1, -w),
            (-1, w),
            (-w, w),
            (-w, 1),
        ]
        c, s = math.cos(rot), math.sin(rot)
        mask.polygon(
            [(cx + r * 1.05 * (x * c - y * s), cy + r * 1.05 * (x * s + y * c)) for x, y in pts],
            fill=255,
        )
    elif shape == "crescent":
        mask.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        ox, oy = cx + 0.45 * r * math.cos(rot), cy + 0.45 * r * math.sin(rot)
        mask.ellipse((ox - 0.8 * r, oy - 0.8 * r, ox + 0.8 * r, oy + 0.8 * r), fill=0)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)


def _draw_pattern(
    layer: ImageDraw.ImageDraw,
    pattern: str,
    colour: tuple[int, int, int],
    size: int,
    cx: float,
    cy: float,
    r: float,
    rot: float,
) -> None:
    """Pattern in ``colour`` over the whole layer; spacing scales with the shape radius so the
    pattern looks the same in every view."""
    step = max(4.0, r / 2.6)
    if pattern == "stripes":
        dx, dy = math.cos(rot), math.sin(rot)  # stripe normal
        reach = size * 1.5
        k = -int(reach / step)
        while k * step <= reach:
            ox, oy = cx + dx * k * step, cy + dy * k * step
            layer.line(
                (ox - dy * reach, oy + dx * reach, ox + dy * reach, oy - dx * reach),
                fill=colour,
                width=max(2, int(step * 0.45)),
            )
            k += 1
    elif pattern == "dots":
        rad = step * 0.28
        y = cy - math.ceil(cy / step) * step
        row = 0
        while y < size + step:
            x = cx - math.ceil(cx / step) * step + (step / 2 if row % 2 else 0.0)
            while x < size + step:
                layer.ellipse((x - rad, y - rad, x + rad, y + rad), fill=colour)
                x += step
            y += step
            row += 1
    elif pattern == "checker":
        cell = step * 0.8
        x0 = cx - math.ceil(cx / cell) * cell
        y0 = cy - math.ceil(cy / cell) * cell
        nx = int((size - x0) / cell) + 1
        ny = int((size - y0) / cell) + 1
        for j in range(ny):
            for i in range(j % 2, nx, 2):
                layer.rectangle(
                    (x0 + i * cell, y0 + j * cell, x0 + (i + 1) * cell, y0 + (j + 1) * cell),
                    fill=colour,
                )
    elif pattern == "rings":
        width = max(2, int(step * 0.4))
        rr = step * 0.7
        while rr < r * 1.6:
            layer.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), outline=colour, width=width)
            rr += step


def _render_look(
    look: tuple[int, int, int, int],
    size: int,
    cx: float,
    cy: float,
    r: float,
    rot: float,
    bg_shift: tuple[int, int, int] = (0, 0, 0),
) -> Image.Image:
    shape, colour, pattern, background = look
    fill_rgb = COLOURS[colour][1]
    bg_rgb = tuple(
        min(255, max(0, c + d)) for c, d in zip(BACKGROUNDS[background][1], bg_shift, strict=True)
    )
    # Pattern ink contrasts with the fill: white on dark fills, near-black on light ones.
    lum = 0.299 * fill_rgb[0] + 0.587 * fill_rgb[1] + 0.114 * fill_rgb[2]
    ink = (250, 250, 250) if lum < 150 else (30, 30, 30)
    img = Image.new("RGB", (size, size), bg_rgb)
    fill = Image.new("RGB", (size, size), fill_rgb)
    if PATTERNS[pattern] != "solid":
        _draw_pattern(ImageDraw.Draw(fill), PATTERNS[pattern], ink, size, cx, cy, r, rot)
    mask = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(mask), SHAPES[shape], cx, cy, r, rot)
    img.paste(fill, (0, 0), mask)
    # A dark outline keeps light shapes (yellow on cream) separable from the background.
    edge = mask.filter(ImageFilter.FIND_EDGES)
    img.paste((40, 40, 40), (0, 0), edge)
    return img


def _render_kb(
    look: tuple[int, int, int, int],
    size: int,
    rng: np.random.Generator,
) -> Image.Image:
    """The clean catalogue picture of a look: centred, large, a little random pose."""
    r = size * rng.uniform(0.34, 0.40)
    c = size / 2
    return _render_look(
        look,
        size,
        c + rng.uniform(-0.03, 0.03) * size,
        c + rng.uniform(-0.03, 0.03) * size,
        r,
        rng.uniform(-0.25, 0.25),
    )


def _render_view(
    look: tuple[int, int, int, int],
    size: int,
    rng: np.random.Generator,
) -> Image.Image:
    """A noisy photo-like view of a look, drawn from scratch with its own randomness."""
    big = int(size * 1.25)  # draw larger, then crop: the crop moves and rescales the shape
    r = big * rng.uniform(0.24, 0.34)
    cx = big / 2 + rng.uniform(-0.08, 0.08) * big
    cy = big / 2 + rng.uniform(-0.08, 0.08) * big
    shift = tuple(int(v) for v in rng.integers(-12, 13, size=3))
    img = _render_look(
        look, big, cx, cy, r, rng.uniform(0, 2 * math.pi), (shift[0], shift[1], shift[2])
    )
    # Random crop containing most of the shape, resized back to ``size``; half the views go
    # through a smaller intermediate size first, which blurs them (cheaper than a Gaussian).
    side = big * rng.uniform(0.72, 0.95)
    x0 = float(np.clip(cx - side / 2 + rng.uniform(-0.12, 0.12) * side, 0, big - side))
    y0 = float(np.clip(cy - side / 2 + rng.uniform(-0.12, 0.12) * side, 0, big - side))
    box = (x0, y0, x0 + side, y0 + side)
    if rng.random() < 0.5:
        small = int(size / rng.uniform(1.4, 2.4))
        img = img.resize((small, small), Image.Resampling.BILINEAR, box=box)
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    else:
        img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if rng.random() < 0.5:  # occlusion patch: a grey or random-colour rectangle
        w = int(size * rng.uniform(0.15, 0.32))
        h = int(size * rng.uniform(0.15, 0.32))
        px, py = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        colour = (
            tuple(int(v) for v in rng.integers(60, 200, size=3))
            if rng.random() < 0.5
            else (128, 128, 128)
        )
        ImageDraw.Draw(img).rectangle((px, py, px + w, py + h), fill=colour)
    # Colour jitter (per-channel gain + brightness offset, as a lookup table) + sensor noise.
    gain = rng.uniform(0.88, 1.12, size=(3, 1))
    offset = rng.uniform(-18.0, 18.0)
    amp = int(rng.integers(2, 9))
    lut = np.clip(np.arange(256, dtype=np.float64)[None, :] * gain + offset, 0, 255)
    arr = lut.astype(np.int16)[_CHANNELS, np.asarray(img)]
    arr += rng.integers(-amp, amp + 1, size=arr.shape, dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


_CHANNELS = np.arange(3)[None, None, :]


# One render job: (relative path, 0 = KB / 1 = mention, index, look).
_Job = tuple[str, int, int, tuple[int, int, int, int]]


def _render_jobs(root: str, size: int, quality: int, seed: int, jobs: Sequence[_Job]) -> int:
    for rel, kind, index, look in jobs:
        rng = np.random.default_rng((seed, kind, index))
        img = _render_kb(look, size, rng) if kind == 0 else _render_view(look, size, rng)
        img.save(os.path.join(root, rel), format="JPEG", quality=quality)
    return len(jobs)


def _render_all(root: Path, config: DemoWorldConfig, jobs: list[_Job]) -> None:
    workers = config.workers or min(8, os.cpu_count() or 1)
    chunk = 256  # ~0.3 s of work: small enough to balance, big enough to hide the IPC
    if workers <= 1 or len(jobs) <= 2 * chunk:
        _render_jobs(str(root), config.image_size, config.jpeg_quality, config.seed, jobs)
        return
    # fork where there is one: spawn / forkserver re-import the caller's __main__, which fails
    # (or recurses) for `python -`, notebooks and unguarded scripts. The workers only touch
    # PIL and numpy. Each job seeds its own generator: the bytes do not depend on scheduling.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(workers) as pool:
        pending = [
            pool.apply_async(
                _render_jobs,
                (
                    str(root),
                    config.image_size,
                    config.jpeg_quality,
                    config.seed,
                    jobs[i : i + chunk],
                ),
            )
            for i in range(0, len(jobs), chunk)
        ]
        for p in pending:
            p.get()


# ---------------------------------------------------------------------------------- mentions


@dataclass(frozen=True, slots=True)
class _MentionPlan:
    mention: Mention
    kind: str
    image_kind: str
    partial: bool
    fields: tuple[str, ...]
    candidates: int  # KB entities the surface string can refer to
    consistent: int  # of those, how many agree with every context attribute
    shown_row: int | None  # whose look the image shows (gold, or another member if misleading)


def _choose_fields(
    rng: random.Random,
    people: Sequence[_Person],
    gold_row: int,
    cands: Sequence[int],
    image_kind: str,
    config: DemoWorldConfig,
) -> tuple[tuple[str, ...], str, int]:
    """Context attributes for one mention, its evidence kind and the consistent count."""
    gold = people[gold_row]
    if len(cands) == 1:
        fields: tuple[str, ...] = (rng.choice((OCC, CITY)),)
        if rng.random() < 0.25:
            fields = (OCC, CITY)
        return fields, UNAMBIGUOUS, 1
    image_can_settle = image_kind == IMG_TRUE and gold.has_image
    if image_can_settle and rng.random() < config.narrow_context_share:
        options = [(f,) for f in (OCC, CITY)]
        rng.shuffle(options)
        for fields in options:
            cons = _consistent(cands, people, gold, fields)
            if len(cons) >= 2 and _image_settles(cons, people, gold_row):
                return fields, IMAGE_RESOLVES, len(cons)
    singles = [(OCC,), (CITY,)]
    rng.shuffle(singles)
    for fields in (*singles, *_FULL_CONTEXT_ORDER[2:]):
        cons = _consistent(cands, people, gold, fields)
        if len(cons) == 1:
            return fields, TEXT_RESOLVES, 1
    fields = (OCC, CITY, YEAR)
    cons = _consistent(cands, people, gold, fields)
    if image_can_settle and _image_settles(cons, people, gold_row):
        return fields, IMAGE_RESOLVES, len(cons)
    return fields, UNRESOLVABLE, len(cons)


def _plan_mentions(
    rng: random.Random,
    people: list[_Person],
    config: DemoWorldConfig,
) -> list[_MentionPlan]:
    group_rows: dict[int, list[int]] = {}
    surname_rows: dict[str, list[int]] = {}
    for row, p in enumerate(people):
        group_rows.setdefault(p.group, []).append(row)
        surname_rows.setdefault(p.surname, []).append(row)

    golds = [row for row in range(len(people)) for _ in range(config.mentions_per_entity)]
    n_nil = round(len(golds) * config.nil_share / (1.0 - config.nil_share))
    order: list[int | None] = [*golds, *([None] * n_nil)]
    rng.shuffle(order)
    nil_surnames = _nil_surnames(rng, people, n_nil)

    plans: list[_MentionPlan] = []
    n_nil_done = 0
    for j, gold_row in enumerate(order):
        mid = f"M{j + 1:07d}"
        image_path = f"{MENTION_IMAGE_DIR}/{mid}.jpg"
        if gold_row is None:
            plans.append(_plan_nil(rng, mid, image_path, nil_surnames[n_nil_done], config))
            n_nil_done += 1
            continue
        gold = people[gold_row]
        members = group_rows[gold.group]
        others = [r for r in members if r != gold_row and people[r].has_image]
        u = rng.random()
        if u < config.no_image_share:
            image_kind = IMG_NONE
        elif others and u < config.no_image_share + config.misleading_image_share:
            image_kind = IMG_MISLEADING
        else:
            image_kind = IMG_TRUE
        partial = rng.random() < config.partial_name_share
        cands = surname_rows[gold.surname] if partial else members
        # A misleading image must be outvoted by text: pick context that settles the gold.
        text_must_settle = image_kind == IMG_MISLEADING
        fields, kind, n_cons = _choose_fields(
            rng, people, gold_row, cands, IMG_NONE if text_must_settle else image_kind, config
        )
        if kind == UNRESOLVABLE and partial:  # the surname cannot be settled: use the full name
            partial, cands = False, members
            fields, kind, n_cons = _choose_fields(
                rng, people, gold_row, cands, IMG_NONE if text_must_settle else image_kind, config
            )
        shown: int | None = gold_row
        if image_kind == IMG_NONE:
            shown = None
        elif image_kind == IMG_MISLEADING:
            # Prefer a member that shares no context attribute: the text then clearly outvotes.
            far = [r for r in others if all(people[r].value(f) != gold.value(f) for f in fields)]
            shown = rng.choice(far or others)
        surface = gold.surname if partial else gold.name
        values = {f: gold.value(f) for f in fields}
        sentence, span = _sentence(rng, surface, values, fields)
        mention = Mention(
            id=mid,
            mention=surface,
            sentence=sentence,
            span=span,
            image=image_path if shown is not None else None,
            entity_id=gold.id,
        )
        plans.append(
            _MentionPlan(mention, kind, image_kind, partial, fields, len(cands), n_cons, shown)
        )
    return plans


def _nil_surnames(rng: random.Random, people: Sequence[_Person], n: int) -> list[str]:
    if n == 0:
        return []
    used = {p.surname.lower() for p in people}
    pool = [s for s in _surnames(rng, len(used) + n + 50) if s.lower() not in used]
    return pool[:n]


def _plan_nil(
    rng: random.Random, mid: str, image_path: str, surname: str, config: DemoWorldConfig
) -> _MentionPlan:
    surface = f"{rng.choice(FIRST_NAMES)} {surname}"
    fields = rng.choice(((OCC,), (CITY,), (OCC, CITY)))
    values = {OCC: rng.choice(OCCUPATIONS), CITY: rng.choice(CITIES)}
    sentence, span = _sentence(rng, surface, values, fields)
    has_image = rng.random() >= config.no_image_share
    mention = Mention(
        id=mid,
        mention=surface,
        sentence=sentence,
        span=span,
        image=image_path if has_image else None,
        entity_id=None,
    )
    return _MentionPlan(
        mention, NIL, IMG_TRUE if has_image else IMG_NONE, False, fields, 0, 0, None
    )


def _split(
    rng: random.Random,
    ids: list[str],
    fractions: Sequence[float],
) -> dict[str, list[str]]:
    shuffled = rng.sample(ids, len(ids))
    n_train = round(len(ids) * fractions[0])
    n_dev = round(len(ids) * fractions[1])
    parts = {
        "train": shuffled[:n_train],
        "dev": shuffled[n_train : n_train + n_dev],
        "test": shuffled[n_train + n_dev :],
    }
    return {k: sorted(v) for k, v in parts.items()}


# ----------------------------------------------------------------------------------- summary


def _summary(
    people: list[_Person],
    plans: list[_MentionPlan],
    splits: dict[str, list[str]],
    config: DemoWorldConfig,
) -> dict[str, Any]:
    group_size = Counter(p.group for p in people)
    size_hist = Counter(group_size.values())
    surname_size = Counter(p.surname for p in people)
    look_count = Counter(p.look for p in people if p.has_image)
    kinds = Counter(pl.kind for pl in plans)
    image_kinds = Counter(pl.image_kind for pl in plans)
    linked = [pl for pl in plans if pl.kind != NIL]
    ambiguous = [pl for pl in linked if pl.candidates > 1]
    n = max(1, len(linked))
    text_ok = sum(1 for pl in linked if pl.consistent == 1)
    # Image alone: a true view of an imaged gold whose look no other imaged entity has.
    row_of = {p.id: i for i, p in enumerate(people)}
    image_ok = sum(
        1
        for pl in linked
        if pl.image_kind == IMG_TRUE
        and pl.mention.entity_id is not None
        and people[row_of[pl.mention.entity_id]].has_image
        and look_count[people[row_of[pl.mention.entity_id]].look] == 1
    )
    both_ok = sum(1 for pl in linked if pl.kind != UNRESOLVABLE)
    return {
        "entities": len(people),
        "entities_with_image": sum(1 for p in people if p.has_image),
        "entities_without_image": sum(1 for p in people if not p.has_image),
        "distinct_names": len(group_size),
        "name_groups": sum(1 for s in group_size.values() if s > 1),
        "entities_in_name_groups": sum(s for s in group_size.values() if s > 1),
        "name_group_sizes": {str(k): size_hist[k] for k in sorted(size_hist) if k > 1},
        "surnames": len(surname_size),
        "mean_entities_per_surname": round(len(people) / max(1, len(surname_size)), 3),
        "distinct_imaged_looks": len(look_count),
        "mentions": len(plans),
        "mention_kinds": {
            "with_image": sum(1 for pl in plans if pl.mention.image is not None),
            "without_image": image_kinds[IMG_NONE],
            "misleading_image": image_kinds[IMG_MISLEADING],
            "partial_name": sum(1 for pl in plans if pl.partial),
            "ambiguous_name": len(ambiguous),
            "gold_without_kb_image": sum(
                1
                for pl in linked
                if pl.mention.entity_id is not None
                and not people[row_of[pl.mention.entity_id]].has_image
            ),
            "nil": kinds[NIL],
        },
        "evidence": {
            k: kinds[k] for k in (UNAMBIGUOUS, TEXT_RESOLVES, IMAGE_RESOLVES, UNRESOLVABLE)
        },
        "mean_candidates_of_ambiguous_mentions": round(
            sum(pl.candidates for pl in ambiguous) / max(1, len(ambiguous)), 3
        ),
        # Shares of the linked mentions that the evidence of one or both modalities settles
        # (upper bounds for text-only / image-only / multimodal Hits@1).
        "oracle_hits1": {
            "text_only": round(text_ok / n, 4),
            "image_only": round(image_ok / n, 4),
            "text_and_image": round(both_ok / n, 4),
        },
        "max_sentence_words": max((len(pl.mention.sentence.split()) for pl in plans), default=0),
        "max_attribute_words": max((len(_attributes(p).split()) for p in people), default=0),
        "splits": {k: len(v) for k, v in splits.items()},
        # ``workers`` changes how fast, never what: left out so the bytes do not depend on it.
        "config": {k: v for k, v in asdict(config).items() if k != "workers"},
    }


# ------------------------------------------------------------------------------------- main


def _attributes(p: _Person) -> str:
    return f"Occupation: {p.occupation}. City: {p.city}. Born: {p.year}."


def _prepare_target(out: Path) -> Path:
    """The hidden sibling folder the world is built in (emptied), after checking ``out``."""
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder")
        is_dataset = (out / META_FILE).exists() or (out / KB_FILE).exists()
        if not is_dataset and any(out.iterdir()):
            raise FileExistsError(
                f"{out} is a non-empty folder that is not a dataset; refusing to replace it"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.partial"
    if work.exists():
        shutil.rmtree(work)
    (work / KB_IMAGE_DIR).mkdir(parents=True)
    (work / MENTION_IMAGE_DIR).mkdir(parents=True)
    return work


def _swap_in(work: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    work.rename(out)
    if old.exists():
        shutil.rmtree(old)


def generate_demo_world(out: Path, config: DemoWorldConfig) -> dict[str, Any]:
    """Write the demo world to ``out`` (replacing a previous dataset there) and return its
    summary, which is also stored in ``meta.json``.

    Same config -> byte-identical files, images included, whatever ``workers`` is.
    """
    out = Path(out)
    t0 = time.perf_counter()
    rng = random.Random(config.seed)
    people = _build_people(rng, config)
    plans = _plan_mentions(rng, people, config)
    splits = _split(rng, [pl.mention.id for pl in plans], config.split_fractions)
    t_plan = time.perf_counter()

    work = _prepare_target(out)
    entities = [
        Entity(
            id=p.id,
            name=p.name,
            attributes=_attributes(p),
            images=(f"{KB_IMAGE_DIR}/{p.id}.jpg",) if p.has_image else (),
        )
        for p in people
    ]
    write_jsonl(work / KB_FILE, entities)
    write_jsonl(work / MENTIONS_FILE, (pl.mention for pl in plans))
    write_json(work / SPLITS_FILE, splits)
    _write_truth(work, people, plans)

    jobs: list[_Job] = [
        (e.images[0], 0, row, p.look)
        for row, (e, p) in enumerate(zip(entities, people, strict=True))
        if p.has_image
    ]
    for j, pl in enumerate(plans):
        if pl.mention.image is not None:
            look = (
                people[pl.shown_row].look if pl.shown_row is not None else _nil_look(config.seed, j)
            )
            jobs.append((pl.mention.image, 1, j, look))
    _render_all(work, config, jobs)
    t_render = time.perf_counter()

    summary = _summary(people, plans, splits, config)
    write_meta(
        work, name=f"demo-world-{config.num_entities}-s{config.seed}", source=SOURCE, **summary
    )  # last: meta.json marks the folder complete
    _swap_in(work, out)
    logger.info(
        "demo world %s: %d entities, %d mentions, %d images in %.1fs (plan %.1fs, render %.1fs)",
        out,
        len(people),
        len(plans),
        len(jobs),
        time.perf_counter() - t0,
        t_plan - t0,
        t_render - t_plan,
    )
    return summary


def generate_retrieval_world(
    out: Path, config: DemoWorldConfig, queries: int = 1000, split: str = "test"
) -> dict[str, Any]:
    """The demo world of ``config`` cut down for retrieval benchmarks at scale: its whole KB
    **text-only** (every entity's ``images`` emptied: the no-image rule) and only the first
    ``queries`` mentions of ``split``, with their images rendered.

    The people, mentions and splits are planned exactly as :func:`generate_demo_world` plans
    them (same config, same entities, same query mentions and images); only the rendering of
    KB images and of the other mentions' images is skipped, which is what makes a
    million-entity world cheap to write.
    """
    out = Path(out)
    t0 = time.perf_counter()
    rng = random.Random(config.seed)
    people = _build_people(rng, config)
    plans = _plan_mentions(rng, people, config)
    splits = _split(rng, [pl.mention.id for pl in plans], config.split_fractions)
    wanted = splits[split][:queries]
    by_id = {pl.mention.id: (j, pl) for j, pl in enumerate(plans)}
    work = _prepare_target(out)
    write_jsonl(
        work / KB_FILE,
        (Entity(id=p.id, name=p.name, attributes=_attributes(p), images=()) for p in people),
    )
    picked = [by_id[mid] for mid in wanted]
    write_jsonl(work / MENTIONS_FILE, (pl.mention for _, pl in picked))
    write_json(work / SPLITS_FILE, {name: (wanted if name == split else []) for name in splits})
    jobs: list[_Job] = []
    for j, pl in picked:
        if pl.mention.image is not None:
            look = (
                people[pl.shown_row].look if pl.shown_row is not None else _nil_look(config.seed, j)
            )
            jobs.append((pl.mention.image, 1, j, look))
    _render_all(work, config, jobs)
    summary: dict[str, Any] = {
        "entities": len(people),
        "entity_images": 0,
        "queries": len(picked),
        "queries_with_image": len(jobs),
        "split": split,
    }
    write_meta(
        work,
        name=f"retrieval-world-{config.num_entities}-s{config.seed}",
        source=SOURCE,
        **summary,
    )
    _swap_in(work, out)
    logger.info("retrieval world %s: %s in %.1fs", out, summary, time.perf_counter() - t0)
    return summary


def _nil_look(seed: int, index: int) -> tuple[int, int, int, int]:
    r = random.Random(f"{seed}/nil-look/{index}")
    return (
        r.randrange(len(SHAPES)),
        r.randrange(len(COLOURS)),
        r.randrange(len(PATTERNS)),
        r.randrange(len(BACKGROUNDS)),
    )


def _write_truth(root: Path, people: Sequence[_Person], plans: Sequence[_MentionPlan]) -> None:
    tmp = root / (TRUTH_ENTITIES_FILE + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for p in people:
            f.write(
                json.dumps(
                    {
                        "id": p.id,
                        "group": p.group,
                        "surname": p.surname,
                        "occupation": p.occupation,
                        "city": p.city,
                        "year": p.year,
                        "shape": SHAPES[p.look[0]],
                        "colour": COLOURS[p.look[1]][0],
                        "pattern": PATTERNS[p.look[2]],
                        "background": BACKGROUNDS[p.look[3]][0],
                        "has_image": p.has_image,
                    }
                )
                + "\n"
            )
    tmp.replace(root / TRUTH_ENTITIES_FILE)
    tmp = root / (TRUTH_MENTIONS_FILE + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for pl in plans:
            f.write(
                json.dumps(
                    {
                        "id": pl.mention.id,
                        "kind": pl.kind,
                        "image_kind": pl.image_kind,
                        "partial_name": pl.partial,
                        "context_fields": list(pl.fields),
                        "candidates": pl.candidates,
                        "consistent": pl.consistent,
                        "image_shows": people[pl.shown_row].id
                        if pl.shown_row is not None
                        else None,
                    }
                )
                + "\n"
            )
    tmp.replace(root / TRUTH_MENTIONS_FILE)


def image_blind_top1(root: Path, candidates: dict[str, Sequence[str]]) -> dict[str, float]:
    """Expected Top-1 of an ideal reader of the words that never sees a candidate's own image.

    ``candidates`` maps a mention id to its candidate entity ids (say, a retrieved list). The
    words of a mention leave open the candidates that carry its surface (the gold's name group,
    or every entity with the gold's surname for a surname-only mention) and agree with the gold
    on every context attribute the sentence names. A reranker that reads all of that perfectly
    but has no way to compare each candidate's image with the mention's can only guess among
    them: ``1 / |open and listed|`` when the gold is listed, else 0. This is the ceiling of the
    released DRIN graph on this world up to what it memorises from training mentions, since
    its score never depends on the candidate's own image (``tests/test_drin.py``). Needs the
    truth sidecars; mentions without a gold are left out.
    """
    ents = {e["id"]: e for e in _read_jsonl(root / TRUTH_ENTITIES_FILE)}
    truth = {t["id"]: t for t in _read_jsonl(root / TRUTH_MENTIONS_FILE)}
    gold_of = {m["id"]: m.get("entity_id") for m in _read_jsonl(root / MENTIONS_FILE)}
    out: dict[str, float] = {}
    for mid, listed in candidates.items():
        gold_id = gold_of.get(mid)
        if gold_id is None:
            continue
        t, gold = truth[mid], ents[gold_id]
        same = "surname" if t["partial_name"] else "group"
        open_ = [
            c
            for c in dict.fromkeys(listed)
            if ents[c][same] == gold[same]
            and all(ents[c][f] == gold[f] for f in t["context_fields"])
        ]
        out[mid] = 1.0 / len(open_) if gold_id in open_ else 0.0
    return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


__all__ = [
    "DemoWorldConfig",
    "generate_demo_world",
    "generate_retrieval_world",
    "image_blind_top1",
]
