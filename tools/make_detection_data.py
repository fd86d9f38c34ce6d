"""Writes synthetic retrieval-head detection data (QRHead, docs/dysco-reference-algorithm.md): each example hides one
fact among distractor paragraphs and asks for it.

    python tools/make_detection_data.py --n 24 --seed 0 --out tools/data/detection_synthetic.jsonl

One JSON object per line: {"question": str, "paragraphs": [{"title": str, "text": str}], "gold_ids": [i]},
i a 0-based index into "paragraphs". Every example has 8-20 paragraphs of plausible filler; the gold paragraph
holds the one fact the question asks about, and about half of the distractors hold a fact of the same kind
about a different entity (another vault, person, train...), so the question's entity, not the kind of fact,
identifies the gold paragraph. Prompts come to a few hundred to about 1,500 tokens. The output depends only
on --n and --seed (Python's random.Random; no other state).
"""
import argparse
import json
import os
import random
import sys
from typing import Dict, List

COLORS = ["blue", "red", "green", "amber", "silver", "golden", "violet", "crimson", "ivory", "teal", "black",
          "white", "copper", "scarlet", "indigo", "olive", "bronze", "grey", "orange", "jade"]
FIRST = ["Anna", "Boris", "Clara", "Dmitri", "Elena", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Katrin",
         "Lukas", "Marta", "Nils", "Olga", "Pavel", "Rosa", "Stefan", "Tilda", "Viktor", "Wanda", "Yusuf",
         "Zora", "Emil", "Lena", "Oskar", "Mira", "Anton", "Ida", "Karl"]
LAST = ["Albrecht", "Berger", "Castell", "Dorn", "Eckhart", "Falk", "Gruber", "Hahn", "Imhof", "Jansen",
        "Keller", "Lindqvist", "Moser", "Novak", "Ortmann", "Petrov", "Quast", "Richter", "Sandor", "Thal",
        "Ulbrich", "Varga", "Weiss", "Zeller"]
CITIES = ["Brenmoor", "Caldera", "Dunmore", "Eastwick", "Falkirk", "Greyhaven", "Holloway", "Ironbridge",
          "Juniper Falls", "Kestrel Bay", "Larkspur", "Millbrook", "Northcliff", "Oakhurst", "Pinecrest",
          "Queensferry", "Ravenholm", "Stonebridge", "Thornbury", "Umberton", "Valemont", "Westmere",
          "Yarrowdale", "Zephyr Point"]
RIVERS = ["Alder", "Brook", "Cresswater", "Dell", "Elm", "Fenwick", "Glass", "Heron"]
MATERIALS = ["granite", "sandstone", "limestone", "slate", "marble", "basalt", "red brick", "flint"]
PROFESSIONS = ["baker", "clockmaker", "ferry pilot", "librarian", "surveyor", "glassblower", "schoolteacher",
               "cartographer", "stonemason", "printer"]
PETS = ["Pepper", "Biscuit", "Juniper", "Mochi", "Tansy", "Ziggy", "Clover", "Nutmeg", "Sable", "Quill",
        "Marmalade", "Pickle", "Saffron", "Bramble", "Thimble"]
WORDS = ["falcon", "harbor", "lantern", "meadow", "orchid", "pebble", "quartz", "ribbon", "summit", "thistle",
         "walnut", "zenith", "cobalt", "ember", "garnet"]
INSTRUMENTS = ["cello", "oboe", "harp", "bassoon", "viola", "clarinet", "accordion", "trombone", "mandolin",
               "flute"]

FILLER = [
    "The market square of {city} is paved with {material} brought from the banks of the river {river}.",
    "Most visitors arrive in late spring, when the {color} flowers along the old walls are in bloom.",
    "{person} worked for {small} years as a {profession} before settling in {city}.",
    "The building was restored in {year} after a long dispute over who owned the land beneath it.",
    "Guards change shifts every {hours} hours, and no visitor may stay inside after dark.",
    "A small museum near the entrance displays old maps of the surrounding hills and valleys.",
    "Local records mention a great flood of the river {river} that reached the lower streets in {year}.",
    "The {color} banners that hang over the gate are replaced every {small} years by the town council.",
    "{person}, a {profession} from {city}, wrote a short history of the district that is still read today.",
    "In winter the road to {city} is often closed, and supplies arrive by boat along the river {river}.",
    "Its foundations are made of {material}, which the builders chose because it resists the damp.",
    "Every autumn a fair is held on the meadow outside {city}, with music, bread and cider.",
    "The nearest station is {small} kilometres away and trains stop there only twice a day.",
    "A stone bridge of {material} crosses the river {river} just below the mill.",
    "Children from {city} learn to swim in the shallow bend of the river {river} each summer.",
    "The council meets in a hall whose ceiling is painted with {color} stars on a dark field.",
    "According to an old story, a {profession} once hid a fortune somewhere in the cellars.",
    "The clock above the main door has not kept the right time since {year}.",
    "{person} is remembered for planting the long row of lime trees that leads to the harbor.",
    "There are {small} wells in the old quarter, though only one of them still gives water.",
    "A narrow staircase of {material} leads up to a gallery with a view over {city}.",
    "Fishermen say that the river {river} runs fastest in the week after the first snow melts.",
    "The library holds {count} volumes, most of them donated by families of the district.",
    "During the festival the streets are lit with {color} lanterns until long after midnight.",
    "The harbor master keeps a log of every ship that has docked there since {year}.",
    "A {profession} named {person} opened the first shop on the square in {year}.",
    "The hills west of {city} are covered with orchards of apples and pears.",
    "Visitors are asked to sign a heavy book bound in {color} leather before they enter.",
]

# Kinds of hidden facts: the sentence, the question, the title of a paragraph about the entity.
FACTS = [
    {"kind": "vault", "entity": lambda r: f"{r.choice(COLORS)} vault",
     "fact": lambda r, e: f"The secret code of the {e} is {r.randint(1000, 9999)}.",
     "question": lambda e: f"What is the secret code of the {e}?",
     "title": lambda r, e: r.choice([f"The {e}", f"Notes on the {e}", f"A visit to the {e}"])},
    {"kind": "birthplace", "entity": lambda r: f"{r.choice(FIRST)} {r.choice(LAST)}",
     "fact": lambda r, e: f"{e} was born in the city of {r.choice(CITIES)}.",
     "question": lambda e: f"In which city was {e} born?",
     "title": lambda r, e: r.choice([f"{e}", f"The life of {e}", f"{e}: early years"])},
    {"kind": "platform", "entity": lambda r: f"{r.choice(COLORS)} train to {r.choice(CITIES)}",
     "fact": lambda r, e: f"The {e} always leaves from platform {r.randint(2, 19)}.",
     "question": lambda e: f"From which platform does the {e} leave?",
     "title": lambda r, e: r.choice(["Station timetable", f"Travelling on the {e}", "Notes for passengers"])},
    {"kind": "pet", "entity": lambda r: f"{r.choice(FIRST)} {r.choice(LAST)}",
     "fact": lambda r, e: f"{e} owns a cat called {r.choice(PETS)}.",
     "question": lambda e: f"What is the name of the cat that {e} owns?",
     "title": lambda r, e: r.choice([f"The household of {e}", f"A portrait of {e}", f"{e} at home"])},
    {"kind": "founding", "entity": lambda r: f"town of {r.choice(CITIES)}",
     "fact": lambda r, e: f"The {e} was founded in the year {r.randint(1100, 1890)}.",
     "question": lambda e: f"In which year was the {e} founded?",
     "title": lambda r, e: r.choice([f"History of the {e}", f"The {e}", "Founding records"])},
    {"kind": "password", "entity": lambda r: f"{r.choice(COLORS)} server room",
     "fact": lambda r, e: f"The password of the {e} is {r.choice(WORDS)}{r.randint(10, 99)}.",
     "question": lambda e: f"What is the password of the {e}?",
     "title": lambda r, e: r.choice([f"Access to the {e}", f"The {e}", "Security notes"])},
    {"kind": "instrument", "entity": lambda r: f"{r.choice(FIRST)} {r.choice(LAST)}",
     "fact": lambda r, e: f"The instrument that {e} plays in the town orchestra is the {r.choice(INSTRUMENTS)}.",
     "question": lambda e: f"Which instrument does {e} play in the town orchestra?",
     "title": lambda r, e: r.choice(["The musicians of the orchestra", f"{e}", f"An evening with {e}"])},
]

PLAIN_TITLES = ["A walk through {city}", "The river {river}", "Markets of {city}", "Old customs",
                "The harbor of {city}", "Local history", "Buildings of the old quarter", "Seasons in {city}",
                "The mill on the {river}", "Notes of a traveller", "The council hall", "Festivals"]


def _fill(rng: random.Random, template: str, used_people: set) -> str:
    person = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    while person in used_people:
        person = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    return template.format(city=rng.choice(CITIES), river=rng.choice(RIVERS), material=rng.choice(MATERIALS),
                           color=rng.choice(COLORS), person=person, profession=rng.choice(PROFESSIONS),
                           small=rng.randint(2, 12), hours=rng.choice([4, 6, 8, 12]),
                           year=rng.randint(1500, 1990), count=rng.randint(2000, 90000))


def _paragraph(rng: random.Random, sentences: int, used_people: set, fact: str = "") -> str:
    parts = [_fill(rng, t, used_people) for t in rng.sample(FILLER, sentences)]
    if fact:
        parts.insert(rng.randint(0, len(parts)), fact)
    return " ".join(parts)


def make_example(rng: random.Random) -> Dict[str, object]:
    spec = rng.choice(FACTS)
    num_paragraphs = rng.randint(8, 20)
    # Fewer sentences per paragraph when there are many paragraphs: prompts stay under about 1,500 tokens.
    max_sentences = 5 if num_paragraphs <= 11 else 4 if num_paragraphs <= 15 else 3
    entities: List[str] = []
    while len(entities) < 1 + num_paragraphs // 2:
        e = spec["entity"](rng)
        if e not in entities:
            entities.append(e)
    gold_entity, others = entities[0], entities[1:]
    people = {e for e in entities if spec["kind"] in ("birthplace", "pet", "instrument")}
    gold = rng.randrange(num_paragraphs)
    distractor_slots = set(rng.sample([i for i in range(num_paragraphs) if i != gold], len(others)))
    paragraphs = []
    for i in range(num_paragraphs):
        sentences = rng.randint(2, max_sentences)
        if i == gold:
            paragraphs.append({"title": spec["title"](rng, gold_entity),
                               "text": _paragraph(rng, sentences, people, spec["fact"](rng, gold_entity))})
        elif i in distractor_slots:
            e = others.pop()
            paragraphs.append({"title": spec["title"](rng, e),
                               "text": _paragraph(rng, sentences, people, spec["fact"](rng, e))})
        else:
            title = _fill(rng, rng.choice(PLAIN_TITLES), people)
            paragraphs.append({"title": title, "text": _paragraph(rng, sentences, people)})
    return {"question": spec["question"](gold_entity), "paragraphs": paragraphs, "gold_ids": [gold]}


def make_examples(n: int, seed: int) -> List[Dict[str, object]]:
    rng = random.Random(seed)
    return [make_example(rng) for _ in range(n)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=24, help="number of examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON lines file to write")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.n < 1:
        print("make_detection_data: error: --n must be >= 1", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for example in make_examples(args.n, args.seed):
            f.write(json.dumps(example, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
