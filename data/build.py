"""Build the bundled datasets: instruction-following SFT data and preference pairs.

Every prompt asks for a short text about a topic under 1-2 verifiable constraints (word
limits, a keyword, bullet count, lowercase, a closing phrase), so `alignment.gold` can
score any response exactly. All text is written here: hand-written fact sentences per
topic, assembled by templates. Deterministic (``random.Random(0)``), stdlib only, offline:

    python data/build.py

writes data/instruct/{train,eval}.jsonl and data/prefs/{train,eval}.jsonl. Every prompt is
unique across all four files, so neither eval split shares a prompt with any training split.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere; gold is pure python

from alignment.gold import check, count_words, passes  # noqa: E402

SIZES = {"instruct": {"train": 400, "eval": 80}, "prefs": {"train": 300, "eval": 80}}
MAX_RESPONSE_WORDS = 75  # keeps prompt + response well inside 256 tokens
# Word-limit violations fix the length direction (max_words: rejected longer, min_words:
# rejected shorter); elsewhere the rejected answer is longer this often, so that overall the
# chosen one is longer in ~40% of pairs and a reward model cannot win by preferring brevity.
REJECTED_LONGER_P = 0.65

# (topic as used in a prompt, facts, keywords); each keyword appears in at most two facts,
# so a keyword-free response can always be built for a rejected answer.
TOPICS: list[tuple[str, list[str], list[str]]] = [
    ("the moon", [
        "The moon circles the Earth about once every month.",
        "The moon's surface is covered in dusty craters and old lava plains.",
        "Moonlight is sunlight reflected off grey rock.",
        "The moon's pull on the oceans creates the tides.",
        "On clear nights the moon can look bright and silver.",
        "Astronauts first walked on the moon in 1969.",
    ], ["craters", "tides", "silver", "astronauts"]),
    ("the ocean", [
        "The ocean covers most of the surface of our planet.",
        "Salt water holds huge amounts of heat from the sun.",
        "Currents move warm and cold water around the globe.",
        "Tiny plankton near the surface produce much of our oxygen.",
        "The deepest trenches are darker than any night sky.",
        "Whales, fish and corals all depend on healthy seas.",
    ], ["currents", "plankton", "trenches", "whales"]),
    ("volcanoes", [
        "A volcano forms where melted rock escapes from deep underground.",
        "Molten rock is called magma below ground and lava above.",
        "Some eruptions are gentle flows, while others are violent blasts.",
        "Volcanic ash can travel thousands of kilometres on the wind.",
        "Over time, cooled lava can build entire islands.",
        "Scientists watch for small earthquakes that warn of eruptions.",
    ], ["magma", "ash", "islands", "earthquakes"]),
    ("honeybees", [
        "Honeybees live in large colonies led by a single queen.",
        "Worker bees collect nectar and pollen from flowers.",
        "Bees turn nectar into honey and store it in wax cells.",
        "A bee dance tells other workers where food can be found.",
        "By carrying pollen, bees help many crops produce fruit.",
        "A strong hive can hold tens of thousands of bees.",
    ], ["queen", "nectar", "dance", "hive"]),
    ("rainforests", [
        "Rainforests grow in warm regions that get heavy rain.",
        "Rainforests are home to more than half of all land species.",
        "Tall trees form a canopy that blocks most sunlight.",
        "The forest floor stays dim, damp and full of fungi.",
        "Many medicines were first found in rainforest plants.",
        "Cutting the forests releases carbon and destroys habitats.",
    ], ["canopy", "species", "medicines", "carbon"]),
    ("deserts", [
        "A desert is any place that receives very little rain.",
        "Some deserts are hot and sandy, while others are freezing.",
        "Cacti store water in their thick, waxy stems.",
        "Many desert animals rest by day and hunt at night.",
        "Temperatures can drop sharply once the sun goes down.",
        "Strong winds shape the sand into moving dunes.",
    ], ["cacti", "dunes", "sandy", "temperatures"]),
    ("the human heart", [
        "The heart is a muscle about the size of a fist.",
        "The heart pumps blood through the body without ever resting.",
        "Four chambers keep oxygen-rich and oxygen-poor blood apart.",
        "An adult heart beats roughly seventy times a minute.",
        "Regular exercise makes the heart stronger and more efficient.",
        "Valves act like doors that stop blood flowing backwards.",
    ], ["muscle", "chambers", "valves", "exercise"]),
    ("bicycles", [
        "A bicycle turns leg power into smooth forward motion.",
        "Gears let riders climb hills without tiring too quickly.",
        "Bicycles produce no exhaust, so they keep city air cleaner.",
        "Good brakes and a helmet make every ride safer.",
        "Cycling is a gentle way to build fitness.",
        "The chain carries force from the pedals to the back wheel.",
    ], ["gears", "helmet", "chain", "exhaust"]),
    ("coffee", [
        "Coffee is brewed from the roasted seeds of a tropical plant.",
        "The seeds are usually called beans, though they are not beans.",
        "Caffeine in coffee can make people feel more alert.",
        "Darker roasts taste bolder, while lighter roasts taste brighter.",
        "Coffee plants grow best on cool, rainy hillsides near the equator.",
        "Many people enjoy a cup to start their morning.",
    ], ["caffeine", "roasts", "beans", "morning"]),
    ("chess", [
        "Chess is a strategy game played on 64 squares.",
        "Each player starts with sixteen pieces.",
        "The goal is to trap the opposing king in checkmate.",
        "Knights are the only pieces that can jump over others.",
        "Good players plan several moves ahead.",
        "Opening moves often fight for control of the centre.",
    ], ["king", "knights", "strategy", "centre"]),
    ("the piano", [
        "A piano makes sound when small hammers strike tight strings.",
        "A standard piano has eighty-eight black and white keys.",
        "Pedals let the player sustain or soften the notes.",
        "The instrument can play melody and harmony at the same time.",
        "Pianos need regular tuning to stay in pitch.",
        "Learning scales helps beginners build speed and accuracy.",
    ], ["hammers", "pedals", "tuning", "scales"]),
    ("photosynthesis", [
        "Photosynthesis is how plants make food from sunlight.",
        "Leaves take in carbon dioxide from the air.",
        "Roots supply the water that the process needs.",
        "The green pigment chlorophyll captures the light energy.",
        "Sugar is produced, and oxygen is released as a by-product.",
        "Almost every food chain on Earth starts with this process.",
    ], ["chlorophyll", "leaves", "roots", "sugar"]),
    ("lighthouses", [
        "A lighthouse warns ships away from rocks and shallow water.",
        "A lighthouse lamp is focused by large glass lenses.",
        "Each lighthouse flashes its own pattern for sailors.",
        "Keepers once lived on site to tend the flame.",
        "Today most lighthouses run automatically.",
        "Bold painted stripes help the towers stand out by day.",
    ], ["ships", "lenses", "keepers", "stripes"]),
    ("glaciers", [
        "A glacier is a slow river of ice on land.",
        "A glacier forms where snow builds up faster than it melts.",
        "Glaciers carve deep valleys as they grind downhill.",
        "Glaciers store a large share of the world's fresh water.",
        "Many glaciers are shrinking as the climate warms.",
        "Cracks called crevasses can open across a glacier.",
    ], ["valleys", "crevasses", "snow", "climate"]),
    ("owls", [
        "Owls are birds of prey that mostly hunt at night.",
        "Soft feathers let owls fly almost silently.",
        "Owls have large eyes that gather light in near darkness.",
        "An owl can turn its head much farther than a human.",
        "Sharp hearing helps owls find mice hidden under snow.",
        "Owls swallow small prey whole and cough up pellets.",
    ], ["feathers", "hearing", "pellets", "eyes"]),
    ("baking bread", [
        "Bread needs only flour, water, salt and yeast.",
        "Yeast feeds on sugars and releases gas that lifts the dough.",
        "Kneading builds gluten, which gives bread its stretch.",
        "The dough rests so that it can rise.",
        "A hot oven turns the outside into a golden crust.",
        "Sourdough uses wild yeast kept alive in a starter.",
    ], ["kneading", "crust", "sourdough", "flour"]),
    ("the internet", [
        "The internet is a global network of connected computers.",
        "Data travels in small packets that find their own routes.",
        "Undersea cables carry most traffic between continents.",
        "Web pages are just one of many services the internet supports.",
        "Strong passwords help keep online accounts safe.",
        "A router directs traffic between your devices and the wider network.",
    ], ["packets", "cables", "passwords", "router"]),
    ("trains", [
        "Trains move people and goods along fixed steel rails.",
        "Early trains were pulled by steam engines burning coal.",
        "Many modern trains run on electricity from overhead wires.",
        "Rail travel uses less fuel per passenger than driving.",
        "High-speed lines link some cities in just a few hours.",
        "Freight trains can haul more than a hundred wagons.",
    ], ["rails", "steam", "freight", "electricity"]),
    ("mountains", [
        "Mountains rise where the plates of the crust push together.",
        "The air grows thinner and colder as you climb.",
        "Rain and ice slowly wear even the tallest peaks down.",
        "Snowmelt from mountains feeds rivers far below.",
        "Plants and animals change as altitude increases.",
        "Climbers often need days to adjust to high altitude.",
    ], ["peaks", "plates", "snowmelt", "climbers"]),
    ("thunderstorms", [
        "Thunderstorms form when warm, moist air rises quickly.",
        "Lightning is a giant spark between clouds or the ground.",
        "Thunder is the sound of air heated by lightning.",
        "Light travels faster than sound, so we see the flash first.",
        "Heavy storms can bring hail, floods and strong gusts.",
        "It is safest to stay indoors until the storm passes.",
    ], ["lightning", "hail", "indoors", "flash"]),
    ("octopuses", [
        "An octopus has eight flexible arms lined with suckers.",
        "An octopus can change colour in a blink to hide.",
        "Octopuses have three hearts and blue blood.",
        "With no bones, octopuses squeeze through tiny gaps.",
        "Octopuses can solve puzzles and even open jars.",
        "When threatened, an octopus squirts a cloud of ink.",
    ], ["suckers", "hearts", "ink", "puzzles"]),
    ("libraries", [
        "A library lends books for free to its members.",
        "Librarians help people find reliable information.",
        "Many libraries also offer computers and quiet study rooms.",
        "Books are sorted by subject so they are easy to find.",
        "Public libraries often run reading groups for children.",
        "Returning books on time lets others enjoy them too.",
    ], ["librarians", "computers", "children", "subject"]),
    ("solar power", [
        "Solar panels turn sunlight directly into electricity.",
        "Panels work best when they face the sun.",
        "Solar power produces no smoke while it runs.",
        "Batteries can store daytime energy for use at night.",
        "The cost of panels has fallen sharply in recent years.",
        "Rooftop systems let households make some of their own power.",
    ], ["batteries", "rooftop", "smoke", "cost"]),
    ("gardening", [
        "Most vegetables need plenty of sun and regular water.",
        "Compost feeds the soil with broken-down kitchen scraps.",
        "Mulch keeps moisture in and weeds out.",
        "Seeds should be planted at the depth shown on the packet.",
        "Bees and butterflies help many garden plants set fruit.",
        "Pulling weeds early saves a lot of work later.",
    ], ["compost", "mulch", "seeds", "butterflies"]),
    ("rivers", [
        "A river carries rainwater from high ground to the sea.",
        "Rivers carve valleys and drop fertile mud on their banks.",
        "Many cities grew up beside rivers for water and trade.",
        "Dams hold back rivers to store water or make power.",
        "Fish such as salmon swim upstream to lay their eggs.",
        "A river's mouth may split into a wide, marshy delta.",
    ], ["dams", "salmon", "delta", "trade"]),
    ("elephants", [
        "Elephants are the largest animals that live on land.",
        "Elephant trunks can grab food, spray water and greet friends.",
        "Herds are usually led by an experienced older female.",
        "Elephants flap their big ears to cool down.",
        "Elephants remember water holes across huge distances.",
        "An elephant can eat for most of the day.",
    ], ["trunks", "herds", "ears", "remember"]),
    ("the sun", [
        "The sun is the star our planet orbits.",
        "The sun is a huge ball of hot, glowing gas.",
        "Sunlight takes about eight minutes to reach us.",
        "Fusion in the sun's core turns hydrogen into helium.",
        "Dark sunspots appear where the sun's magnetic field is strong.",
        "Without the sun, Earth would be frozen and lifeless.",
    ], ["fusion", "sunspots", "minutes", "gas"]),
    ("maps", [
        "A map shows a place from above on a flat surface.",
        "The scale links distances on paper to real distances.",
        "A legend explains the symbols and colours used.",
        "Contour lines show the height and steepness of the land.",
        "Most maps put north at the top.",
        "Phone maps use satellites to show where you are.",
    ], ["legend", "contour", "north", "satellites"]),
    ("recycling", [
        "Recycling turns used materials into new products.",
        "Glass and metal can be recycled many times over.",
        "Sorting waste carefully keeps the recycling stream clean.",
        "Recycled paper saves trees, water and energy.",
        "Food scraps can be composted instead of thrown away.",
        "Reusing items is even better than recycling them.",
    ], ["glass", "paper", "sorting", "reusing"]),
    ("sleep", [
        "Most adults need seven to nine hours of sleep each night.",
        "During sleep, the brain sorts and stores memories.",
        "Dreams happen mostly during a stage called REM sleep.",
        "A regular bedtime helps the body keep its rhythm.",
        "Bright screens at night can delay falling asleep.",
        "Poor sleep affects mood, focus and health.",
    ], ["memories", "dreams", "bedtime", "screens"]),
    ("tea", [
        "Tea is made by steeping leaves in hot water.",
        "Green, black and oolong teas come from the same plant.",
        "The leaves are dried or rolled to change their flavour.",
        "Black tea is steeped in boiling water for a few minutes.",
        "Tea is one of the most popular drinks in the world.",
        "Many herbal teas contain no tea leaves at all.",
    ], ["oolong", "herbal", "flavour", "steeping"]),
    ("clocks", [
        "Clocks divide the day into hours, minutes and seconds.",
        "A pendulum clock keeps time with a steady swing.",
        "Quartz watches count the vibrations of a tiny crystal.",
        "Atomic clocks lose barely a second in millions of years.",
        "Sundials told the time long before mechanical clocks.",
        "Many phones set their clocks automatically from the network.",
    ], ["pendulum", "quartz", "atomic", "sundials"]),
]

TASKS = [
    "Describe {topic}.",
    "Tell me about {topic}.",
    "Write a short note about {topic}.",
    "What should I know about {topic}?",
    "Give me a quick overview of {topic}.",
    "Share some facts about {topic}.",
    "Explain {topic} to a curious student.",
    "I am curious about {topic}. What can you tell me?",
]

PHRASINGS = {
    "max_words": [
        "Answer in at most {n} words.",
        "Use no more than {n} words.",
        "Keep your answer to {n} words or fewer.",
        "Your reply must not exceed {n} words.",
    ],
    "min_words": [
        "Write at least {n} words.",
        "Use no fewer than {n} words.",
        "Your answer should be {n} words or longer.",
        "Make it at least {n} words long.",
    ],
    "keyword": [
        "Use the word '{word}'.",
        "Include the word '{word}' somewhere.",
        "Make sure the word '{word}' appears in your answer.",
        "Mention '{word}' at least once.",
    ],
    "bullets": [
        "Format the answer as exactly {n} bullet points starting with '- '.",
        "Give exactly {n} bullet points, each on its own line beginning with '- '.",
        "Use exactly {n} bullets that start with '- '.",
        "Answer with exactly {n} bullet points ('- ' at the start of each).",
    ],
    "lowercase": [
        "Write everything in lowercase letters.",
        "Do not use any capital letters.",
        "Use only lowercase letters.",
        "Keep the whole answer in lowercase.",
    ],
    "end_with": [
        # No closing period: the phrase carries its own punctuation and is always the last sentence.
        'End your response with the exact phrase "{phrase}"',
        'Finish with the words "{phrase}"',
        'Your last words must be "{phrase}"',
        'Close your answer with "{phrase}"',
    ],
}
TYPES = list(PHRASINGS)
END_PHRASES = [
    "Hope this helps.",
    "That is all for now.",
    "Thanks for asking.",
    "Let me know if you want more.",
    "And that is the short version.",
    "Stay curious!",
]
BULLET_INTROS = ["Here is what to know about {topic}:", "A few facts about {topic}:"]
PARAM_CHOICES = {"max_words": [10, 12, 15, 20, 25], "min_words": [20, 25, 30, 35, 40], "bullets": [2, 3, 4, 5]}


def sample_constraints(rng: random.Random, main: str, keywords: list[str]) -> list[dict]:
    """The main constraint plus, half the time, a compatible second one."""
    types = [main]
    if rng.random() < 0.5:
        # At most N and at least M words together would mostly test arithmetic, not following.
        types.append(rng.choice([t for t in TYPES if t != main and {t, main} != {"max_words", "min_words"}]))
    constraints = []
    for ctype in types:
        c: dict = {"type": ctype}
        if ctype in PARAM_CHOICES:
            c["n"] = rng.choice(PARAM_CHOICES[ctype])
        elif ctype == "keyword":
            c["word"] = rng.choice(keywords)
        elif ctype == "end_with":
            c["phrase"] = rng.choice(END_PHRASES).lower() if "lowercase" in types else rng.choice(END_PHRASES)
        constraints.append(c)
    return constraints


def prompt_text(rng: random.Random, topic: str, constraints: list[dict]) -> str:
    """A task sentence followed by one instruction sentence per constraint (end_with last)."""
    ordered = sorted(constraints, key=lambda c: c["type"] == "end_with")
    parts = [rng.choice(PHRASINGS[c["type"]]).format(**{k: v for k, v in c.items() if k != "type"}) for c in ordered]
    return " ".join([rng.choice(TASKS).format(topic=topic)] + parts)


def compose(rng: random.Random, topic: tuple[str, list[str], list[str]], constraints: list[dict],
            violate: str | None = None) -> str | None:
    """A fluent response meeting every constraint, or, when `violate` names a constraint type,
    one that clearly breaks that constraint while meeting the others (None if none is found)."""
    name, facts, _ = topic
    by_type = {c["type"]: c for c in constraints}
    facts = _fact_order(rng, facts, by_type.get("keyword"), exclude=violate == "keyword")
    n_bullets = _bullet_count(rng, by_type.get("bullets"), violate, len(facts))
    phrase = _end_phrase(rng, by_type.get("end_with"), violate)
    lower = "lowercase" in by_type and violate != "lowercase"
    sizes = [n_bullets] if n_bullets else list(range(1, len(facts) + 1))
    rng.shuffle(sizes)
    for k in sizes:
        text = _render(rng, name, facts[:k], bool(n_bullets), phrase, lower)
        if _acceptable(text, constraints, violate):
            return text
    return None


def _fact_order(rng: random.Random, facts: list[str], keyword: dict | None, exclude: bool) -> list[str]:
    """Shuffled facts; a keyword fact first when the keyword is required, none when it must be missing."""
    facts = rng.sample(facts, len(facts))
    if keyword is None:
        return facts
    has = [f for f in facts if check(f, keyword)]
    hasnt = [f for f in facts if not check(f, keyword)]
    return hasnt if exclude else has[:1] + rng.sample(has[1:] + hasnt, len(facts) - 1)


def _bullet_count(rng: random.Random, bullets: dict | None, violate: str | None, n_facts: int) -> int:
    """How many bullet lines to write; 0 means prose. A violation is off by 1-2 or plain prose."""
    if bullets is None:
        return 0
    n = bullets["n"]
    if violate != "bullets":
        return n
    return rng.choice([0] + [m for m in (n - 2, n - 1, n + 1, n + 2) if 1 <= m <= n_facts and m != n])


def _end_phrase(rng: random.Random, end_with: dict | None, violate: str | None) -> str | None:
    """The closing phrase; a violation drops it or closes with a different one."""
    if end_with is None:
        return None
    if violate != "end_with":
        return end_with["phrase"]
    others = [p for p in END_PHRASES if p.lower() != end_with["phrase"].lower()]
    return rng.choice([None, rng.choice(others)])


def _render(rng: random.Random, name: str, facts: list[str], bullets: bool, phrase: str | None, lower: bool) -> str:
    """Join facts as prose or as '- ' lines (sometimes under an intro line), then close and case."""
    if bullets:
        lines = [f"- {f}" for f in facts]
        if rng.random() < 0.4:
            lines.insert(0, rng.choice(BULLET_INTROS).format(topic=name))
        text = "\n".join(lines + ([phrase] if phrase else []))
    else:
        text = " ".join(facts + ([phrase] if phrase else []))
    return text.lower() if lower else text


def _acceptable(text: str, constraints: list[dict], violate: str | None) -> bool:
    """Chosen: passes everything. Rejected: passes all but `violate`, which it fails clearly."""
    words = count_words(text)
    if words > MAX_RESPONSE_WORDS:
        return False
    if violate is None:
        return passes(text, constraints)
    main = next(c for c in constraints if c["type"] == violate)
    others = [c for c in constraints if c is not main]
    if check(text, main) or not passes(text, others):
        return False
    if violate == "max_words":  # "way too long", not one word over
        return words >= main["n"] + max(8, main["n"] // 2)
    if violate == "min_words":
        return words <= main["n"] - max(8, main["n"] // 3)
    return True


def make_item(rng: random.Random, main: str, topic: tuple, used: set[str], with_rejected: bool) -> dict:
    """One prompt (unique across all files) with its constraints, chosen and maybe rejected response."""
    rejected_longer = rng.random() < REJECTED_LONGER_P
    for _ in range(500):
        constraints = sample_constraints(rng, main, topic[2])
        prompt = prompt_text(rng, topic[0], constraints)
        chosen = compose(rng, topic, constraints)
        rejected = compose(rng, topic, constraints, violate=main) if with_rejected else ""
        if prompt in used or not chosen or rejected is None:
            continue
        if with_rejected and main not in ("max_words", "min_words") and (len(rejected) > len(chosen)) != rejected_longer:
            continue
        used.add(prompt)
        return {"prompt": prompt, "constraints": constraints, "chosen": chosen, "rejected": rejected}
    raise RuntimeError(f"no example found for {main} / {topic[0]}")


def build_split(rng: random.Random, kind: str, split: str, used: set[str]) -> list[dict]:
    """Rows of one file; categories and topics are cycled so both stay balanced."""
    rows = []
    topics = rng.sample(TOPICS, len(TOPICS))
    for i in range(SIZES[kind][split]):
        main = TYPES[i % len(TYPES)]
        item = make_item(rng, main, topics[i % len(topics)], used, with_rejected=kind == "prefs")
        rows.append(_row(kind, f"{kind}-{split}-{i + 1:04d}", main, item))
    return rows


def _row(kind: str, row_id: str, category: str, item: dict) -> dict:
    """An item in the file's row contract (SFT messages, or a preference pair)."""
    user = [{"role": "user", "content": item["prompt"]}]
    if kind == "instruct":
        messages = user + [{"role": "assistant", "content": item["chosen"]}]
        return {"id": row_id, "category": category, "messages": messages, "constraints": item["constraints"]}
    return {
        "id": row_id,
        "prompt": user,
        "chosen": [{"role": "assistant", "content": item["chosen"]}],
        "rejected": [{"role": "assistant", "content": item["rejected"]}],
        "label_source": "human",
        "constraints": item["constraints"],
        "category": category,
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    rng = random.Random(0)
    used: set[str] = set()
    for kind, splits in SIZES.items():
        for split in splits:
            rows = build_split(rng, kind, split, used)
            path = ROOT / "data" / kind / f"{split}.jsonl"
            write_jsonl(path, rows)
            print(f"{path.relative_to(ROOT)}: {len(rows)} rows")


if __name__ == "__main__":
    main()
