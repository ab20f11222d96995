"""Build the bundled datasets: instruction-following SFT data and preference pairs.

Every prompt asks for a short text about one of ~100 topics under 1-3 verifiable constraints drawn
from 21 kinds in IFEval's families (word / sentence / paragraph counts, keywords, letter frequency,
case, commas, start / end phrases, quotes, titles, bullets, highlights, JSON, postscripts,
placeholders), so `alignment.gold` scores any response exactly. All text is written here and in
data/topics.py (hand-written fact sentences per topic, assembled by templates; Apache-2.0).
Deterministic (``random.Random(0)``), stdlib only, offline:

    python3 data/build.py [--out DIR]     # DIR defaults to data/

Splits (docs/data.md): five constraint kinds are held out (no training or preference row uses
them) and every kind, task sentence and prompt frame has training phrasings and held-out
phrasings (never used in a training row). Files:

- instruct/train.jsonl, prefs/train.jsonl: training kinds, training phrasings;
- instruct/eval.jsonl, prefs/eval.jsonl: the same distribution (in-distribution eval);
- instruct/eval_heldout_phrasings.jsonl, prefs/eval_heldout_phrasings.jsonl: training kinds asked
  with held-out phrasings;
- instruct/eval_heldout_kinds.jsonl: a held-out kind first (its category), training phrasings;
- general/heldout.jsonl: general paragraphs (data/general_text.py), the eval stage's forgetting text.

Every prompt is unique across all files. Rows are ordered so that any prefix cycles through the
kinds: a config's cap (``max_train_examples``, ``max_train_pairs``) takes a balanced subset.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere; gold is pure python
sys.path.insert(0, str(ROOT / "data"))

from alignment.gold import check, count_sentences, count_word, count_words, passes  # noqa: E402
from general_text import PARAGRAPHS  # noqa: E402
from topics import MORE_TOPICS, TOPICS  # noqa: E402

# file -> (split name, kinds of the first constraint, phrasings, preference pairs?, rows)
FILES = {
    "instruct/train.jsonl": ("train", "train", "train", False, 4000),
    "instruct/eval.jsonl": ("eval", "train", "train", False, 200),
    "instruct/eval_heldout_phrasings.jsonl": ("eval_heldout_phrasings", "train", "heldout", False, 200),
    "instruct/eval_heldout_kinds.jsonl": ("eval_heldout_kinds", "heldout", "train", False, 200),
    "prefs/train.jsonl": ("train", "train", "train", True, 3000),
    "prefs/eval.jsonl": ("eval", "train", "train", True, 200),
    "prefs/eval_heldout_phrasings.jsonl": ("eval_heldout_phrasings", "train", "heldout", True, 200),
}
ONE_EDIT = {"prefs/train_one_edit.jsonl": ("train", "train", "train", True, 3000)}
"""Training pairs like prefs/train.jsonl's, from a stream of their own (3), in which the kinds of ONE_EDIT_KINDS get
one-edit rejected responses (`one_edit_twin`); reward.yaml's `data.train` can point at it (docs/reward.md)."""
ONE_EDIT_KINDS = {"forbidden_words", "keyword", "letter_frequency", "min_words"}
"""The four kinds a reward model trained on prefs/train.jsonl ranked at or below chance on held-out phrasings in
every seed at 3,000 pairs (docs/reward.md)."""
SEALED = {"sealed/phrasings.jsonl": ("sealed_phrasings", "train", "sealed", False, 200),
          "sealed/phrasings2.jsonl": ("sealed2_phrasings", "train", "sealed2", False, 200)}
"""Training kinds in the sealed wordings (SEALED_* and SEALED2_* below), each file drawn after the ones before it
from its own random stream (1, 2) so that those stay byte-identical; read by bench/gold_splits.py --sealed /
--sealed2 only (docs/data.md, "The sealed split")."""
MAX_RESPONSE_WORDS = 75  # keeps prompt + response well inside 256 tokens
N_CONSTRAINTS = {1: 0.4, 2: 0.4, 3: 0.2}

TRAIN_KINDS = ["max_words", "min_words", "keyword", "bullets", "lowercase", "end_with", "min_sentences",
               "paragraphs", "forbidden_words", "keyword_frequency", "letter_frequency", "no_commas", "title",
               "highlights", "json_format", "postscript"]
HELDOUT_KINDS = ["max_sentences", "uppercase", "start_with", "quotation", "placeholders"]
"""Never in a training or preference row: the held-out-kinds split measures transfer to them."""

# Parts of a response a kind constrains; two kinds sharing one never meet in a prompt.
SLOTS = {
    "max_words": {"words"}, "min_words": {"words"}, "max_sentences": {"sentences"},
    "min_sentences": {"sentences"}, "paragraphs": {"layout"}, "bullets": {"layout"},
    "json_format": {"layout", "start", "end", "highlight", "placeholder", "commas"},
    "keyword": {"kw"}, "forbidden_words": {"kw"}, "keyword_frequency": {"kw"}, "letter_frequency": {"letter"},
    "lowercase": {"case"}, "uppercase": {"case"}, "no_commas": {"commas"}, "start_with": {"start"},
    "end_with": {"end"}, "quotation": {"start", "end"}, "title": {"start"}, "postscript": {"end"},
    "highlights": {"highlight"}, "placeholders": {"placeholder"},
}
# Pairs that fight over length (at most 12 words but at least 4 sentences) test arithmetic, not following.
CONFLICTS = {frozenset({"max_words", "min_sentences"}), frozenset({"min_words", "max_sentences"})}

# -- phrasings: (training templates, held-out templates); ids are kind/tN and kind/hN ----------------------------

TASKS = ([
    "Describe {topic}.",
    "Tell me about {topic}.",
    "Write a short note about {topic}.",
    "What should I know about {topic}?",
    "Give me a quick overview of {topic}.",
    "Share some facts about {topic}.",
    "Explain {topic} to a curious student.",
    "I am curious about {topic}. What can you tell me?",
    "Write a brief explainer on {topic}.",
    "Summarise the basics of {topic}.",
    "Teach me something about {topic}.",
    "Write a few lines about {topic} for a school newsletter.",
    "Write a paragraph about {topic}.",
    "Can you tell me about {topic}?",
    "Please explain {topic}.",
    "Give a short description of {topic}.",
    "Outline the key points of {topic}.",
    "Write a short piece about {topic} for a blog.",
    "What is interesting about {topic}?",
    "Inform me about {topic}.",
], [
    "Could you walk me through {topic}?",
    "My friend asked me about {topic} and I had no idea. Help me out.",
    "Put together a short fact sheet on {topic}.",
    "Jot down what a beginner ought to know regarding {topic}.",
])
# {task} and {cons} (the constraint sentences joined by spaces) or {cons_lines} ('- ' lines).
FRAMES = ([
    "{task} {cons}",
    "{cons} {task}",
    "{task}\n\n{cons}",
    "{cons}\n\n{task}",
    "{task} Please follow these instructions. {cons}",
    "Here is my request: {task} {cons}",
], [
    "{task}\nRules: {cons}",
    "{task}\n\nRequirements:\n{cons_lines}",
])

PHRASINGS: dict[str, tuple[list[str], list[str]]] = {
    "max_words": ([
        "Answer in at most {n} words.",
        "Use no more than {n} words.",
        "Keep your answer to {n} words or fewer.",
        "Your reply must not exceed {n} words.",
        "Stay under a limit of {n} words.",
        "The answer should be {n} words long at most.",
        "Please limit yourself to {n} words.",
        "I only have time for {n} words, so keep it that short.",
        "Word limit: {n}.",
    ], [
        "Be brief: {n} words is the ceiling.",
        "Do not go over {n} words in total.",
    ]),
    "min_words": ([
        "Write at least {n} words.",
        "Use no fewer than {n} words.",
        "Your answer should be {n} words or longer.",
        "Make it at least {n} words long.",
        "The reply needs a minimum of {n} words.",
        "Give me {n} words or more.",
        "Please write {n} words or more.",
        "Make the reply no shorter than {n} words.",
        "Length: {n} words minimum.",
    ], [
        "Anything shorter than {n} words is too short.",
        "Aim for a length of {n} words at the very least.",
    ]),
    "max_sentences": ([
        "Answer in at most {n} sentences.",
        "Use no more than {n} sentences.",
        "Keep it to {n} sentences or fewer.",
        "Do not write more than {n} sentences.",
    ], []),
    "min_sentences": ([
        "Write at least {n} sentences.",
        "Use no fewer than {n} sentences.",
        "Your answer should have {n} or more sentences.",
        "Include a minimum of {n} sentences.",
        "Make the answer {n} sentences long or longer.",
        "I want at least {n} full sentences.",
        "Please write {n} sentences or more.",
        "The reply should run to at least {n} sentences.",
        "Sentence count: {n} or more.",
    ], [
        "Fewer than {n} sentences will not do.",
        "Stretch the answer across {n} sentences or more.",
    ]),
    "paragraphs": ([
        "Split the answer into exactly {n} paragraphs separated by a blank line.",
        "Write exactly {n} paragraphs with an empty line between them.",
        "Use {n} paragraphs, no more and no fewer, separated by blank lines.",
        "Organise the reply as exactly {n} paragraphs divided by blank lines.",
        "Your response must contain exactly {n} paragraphs separated by empty lines.",
        "Give exactly {n} paragraphs and put a blank line between each.",
        "Please write {n} paragraphs exactly, separated by blank lines.",
        "Paragraphs: exactly {n}, with blank lines between them.",
        "Arrange your answer in {n} paragraphs exactly, with an empty line after each one but the last.",
    ], [
        "Break the text into {n} blocks of prose with one empty line between blocks, exactly {n}.",
        "There should be precisely {n} paragraphs, each divided from the next by a blank line.",
    ]),
    "keyword": ([
        "Use the word '{word}'.",
        "Include the word '{word}' somewhere.",
        "Make sure the word '{word}' appears in your answer.",
        "Mention '{word}' at least once.",
        "The word '{word}' must appear in the reply.",
        "Work the word '{word}' into your answer.",
        "Please include the word '{word}'.",
        "Keyword to use: '{word}'.",
        "Your answer has to contain '{word}'.",
    ], [
        "Somewhere in the text, say '{word}'.",
        "Do not forget to bring up the term '{word}'.",
    ]),
    "forbidden_words": ([
        "Do not use the words {words}.",
        "Avoid the words {words}.",
        "Never mention {words}.",
        "The words {words} must not appear.",
        "Leave out the words {words} entirely.",
        "Write it without using {words}.",
        "Please do not write {words}.",
        "Banned words: {words}.",
        "Your reply may not contain {words}.",
    ], [
        "Steer clear of the terms {words}.",
        "Any use of {words} is off limits.",
    ]),
    "keyword_frequency": ([
        "Use the word '{word}' at least {n} times.",
        "Mention '{word}' {n} or more times.",
        "The word '{word}' should appear at least {n} times.",
        "Repeat the word '{word}' at least {n} times.",
        "Include '{word}' no fewer than {n} times.",
        "Say '{word}' at least {n} times in the answer.",
        "Please use '{word}' {n} or more times.",
        "The word '{word}' needs to come up at least {n} times.",
        "Frequency: '{word}' at least {n} times.",
    ], [
        "I want to see '{word}' a minimum of {n} times.",
        "Make '{word}' show up {n} times or more.",
    ]),
    "letter_frequency": ([
        "Use the letter '{letter}' {freq}.",
        "The letter '{letter}' should appear {freq}.",
        "Make sure the letter '{letter}' occurs {freq}.",
        "Write so that the letter '{letter}' appears {freq}.",
        "Count your letters: '{letter}' must appear {freq}.",
        "In the whole answer, use the letter '{letter}' {freq}.",
        "Please use the letter '{letter}' {freq}.",
        "Letter '{letter}': {freq}.",
        "Your text should contain the letter '{letter}' {freq}.",
    ], [
        "The character '{letter}' (any case) has to show up {freq}.",
        "Keep an eye on the letter '{letter}': it must occur {freq}.",
    ]),
    "bullets": ([
        "Format the answer as exactly {n} bullet points starting with '- '.",
        "Give exactly {n} bullet points, each on its own line beginning with '- '.",
        "Use exactly {n} bullets that start with '- '.",
        "Answer with exactly {n} bullet points ('- ' at the start of each).",
        "Write exactly {n} lines, each starting with '- '.",
        "List exactly {n} points as '- ' bullets.",
        "Please answer in exactly {n} bullet points, each starting with '- '.",
        "Bullets: exactly {n}, each beginning with '- '.",
        "Present exactly {n} items, one per line, each line starting with '- '.",
    ], [
        "Lay it out as a dash list of precisely {n} items, every item opening with '- '.",
        "I need {n} bullet points, no more and no fewer, marked with '- '.",
    ]),
    "lowercase": ([
        "Write everything in lowercase letters.",
        "Do not use any capital letters.",
        "Use only lowercase letters.",
        "Keep the whole answer in lowercase.",
        "No uppercase letters are allowed.",
        "Your entire reply must be lowercase.",
        "Please write in lowercase only.",
        "Case: all lowercase.",
        "Every letter you write should be lowercase.",
    ], [
        "Not a single capital letter, please.",
        "Type it all in small letters.",
    ]),
    "uppercase": ([
        "Write your entire answer in capital letters.",
        "Use only uppercase letters.",
        "Your whole reply must be in all caps.",
        "Do not use any lowercase letters.",
    ], []),
    "no_commas": ([
        "Do not use any commas.",
        "Avoid commas completely.",
        "Your answer must not contain a comma.",
        "Write without a single comma.",
        "No commas are allowed in the reply.",
        "Leave out every comma.",
        "Please use no commas.",
        "Punctuation rule: no commas.",
        "Do not put a comma anywhere in your answer.",
    ], [
        "Skip the comma character entirely.",
        "The comma is banned from your text.",
    ]),
    "start_with": ([
        'Start your response with the exact phrase "{phrase}"',
        'Begin with the words "{phrase}"',
        'Your first words must be "{phrase}"',
        'Open your answer with "{phrase}"',
    ], []),
    "end_with": ([
        # No closing period: the phrase carries its own punctuation and is always the last sentence.
        'End your response with the exact phrase "{phrase}"',
        'Finish with the words "{phrase}"',
        'Your last words must be "{phrase}"',
        'Close your answer with "{phrase}"',
        'Make "{phrase}" the final words of your reply',
        'Wrap up with exactly "{phrase}"',
        'Please end with "{phrase}"',
        'The final phrase must be "{phrase}"',
        'Your reply should end with "{phrase}"',
    ], [
        'Nothing may follow the closing phrase "{phrase}"',
        'The text has to conclude with "{phrase}"',
    ]),
    "quotation": ([
        "Wrap your entire response in double quotation marks.",
        "Put the whole answer inside double quotes.",
        "Enclose everything you write in double quotation marks.",
        "Start and end the reply with a double quote.",
    ], []),
    "title": ([
        "Give the answer a title wrapped in double angle brackets, like <<my title>>.",
        "Include a title in double angular brackets, such as <<title>>.",
        "Start with a title inside << and >>.",
        "Add a title written as <<title here>>.",
        "Put a title in double angle brackets, for example <<a title>>.",
        "Your reply needs a title of the form <<title>>.",
        "Please add a title in double angle brackets, like <<title>>.",
        "Title format: <<title>>, at the top.",
        "Begin with a title between << and >>.",
    ], [
        "Head the text with a title enclosed by << and >>.",
        "Name your piece: place the name between << and >>.",
    ]),
    "highlights": ([
        "Highlight at least {n} sections with asterisks, like *this part*.",
        "Mark at least {n} parts in markdown italics, such as *highlighted text*.",
        "Emphasise at least {n} sections by wrapping them in single asterisks.",
        "Use *asterisks* to highlight at least {n} sections.",
        "Put at least {n} phrases between asterisks, like *this*.",
        "Include {n} or more highlighted sections written as *text*.",
        "Please highlight at least {n} parts with *asterisks*.",
        "Highlights: {n} or more, written as *text*.",
        "At least {n} sections of your answer should be in *asterisks*.",
    ], [
        "Surround {n} or more key sentences with a single star on each side, *like so*.",
        "Draw attention to at least {n} passages by enclosing them in asterisks.",
    ]),
    "json_format": ([
        "Format your entire answer as valid JSON.",
        "Reply with JSON only.",
        "Your whole response must be a valid JSON object.",
        "Wrap the entire output in JSON format.",
        "Give the answer as a JSON object and nothing else.",
        "Output valid JSON, with no text outside it.",
        "Please answer in JSON.",
        "Output format: JSON only.",
        "Respond with a JSON object, no other text.",
    ], [
        "Return machine-readable JSON rather than prose.",
        "Everything you send back should parse as JSON.",
    ]),
    "postscript": ([
        "At the end, add a postscript starting with {marker}",
        "Finish with a postscript that begins with {marker}",
        "Add a note at the end starting with {marker}",
        "Include a postscript, beginning with {marker}, at the end.",
        "End with a line starting with {marker}",
        "After the main text, add a postscript that starts with {marker}",
        "Please add a postscript at the end that starts with {marker}",
        "Postscript: required at the end, starting with {marker}",
        "Sign off with a postscript beginning with {marker}",
    ], [
        "Tack on an afterthought that opens with {marker}",
        "Close with an extra line introduced by {marker}",
    ]),
    "placeholders": ([
        "Include at least {n} placeholders in square brackets, like [name].",
        "Use at least {n} placeholders written as [placeholder].",
        "Add {n} or more bracketed placeholders such as [address].",
        "The answer must contain at least {n} placeholders in square brackets.",
    ], []),
}
assert set(PHRASINGS) == set(TRAIN_KINDS) | set(HELDOUT_KINDS) == set(SLOTS)

# -- the sealed split: a third set of phrasings, task sentences and frames for the 16 training kinds -----------
# Written 2026-12-03 after every held-out figure of docs/algorithms.md had been read many times: the held-out
# phrasings split has steered a dozen recipe choices, so a gain measured on it is partly selected. These
# wordings appear in no other file and no config's prompt sets; bench/gold_splits.py --sealed reads them only
# for a recipe frozen before the look, and docs/data.md logs every look.
SEALED_TASKS = [
    "Draft a handful of sentences on {topic} for a museum placard.",
    "Someone at dinner brought up {topic}. Brief me so I can join in.",
    "Produce a concise primer covering {topic}.",
    "What are the essentials of {topic}, in plain words?",
    "Compose a small informative text on the subject of {topic}.",
]
SEALED_FRAMES = [
    "{cons}\nTask: {task}",
    "Constraints first. {cons}\nNow the request: {task}",
]
SEALED_PHRASINGS: dict[str, list[str]] = {
    "max_words": ["Cap the length at {n} words.", "{n} words is the most you may write."],
    "min_words": ["Your text needs {n} words, at the least.", "Hit a word count of {n} or above."],
    "keyword": ["The term '{word}' has to be in there.", "Drop the word '{word}' into the text at some point."],
    "bullets": ["Reply as a list: {n} lines, each opening with a dash and a space ('- '), and nothing else.",
                "Structure: {n} dash-prefixed items ('- '), precisely that many."],
    "lowercase": ["Capital letters are forbidden throughout.", "Render the entire text in lower case."],
    "end_with": ['The very last words must read "{phrase}"', 'Sign off using the exact words "{phrase}"'],
    "min_sentences": ["The answer must contain {n} sentences at minimum.",
                      "Go for {n} or more complete sentences."],
    "paragraphs": ["Exactly {n} paragraphs, separated from each other by one blank line.",
                   "Deliver {n} separate paragraphs (blank line between consecutive ones), not one more."],
    "forbidden_words": ["Under no circumstances write {words}.", "Keep {words} out of the text."],
    "keyword_frequency": ["Work in '{word}' on at least {n} occasions.",
                          "The word '{word}' is needed {n} times at minimum."],
    "letter_frequency": ["Watch the letter '{letter}': it must be used {freq}.",
                         "Control how often '{letter}' shows up: {freq}."],
    "no_commas": ["Commas are not permitted anywhere.", "Write this with zero commas."],
    "title": ["Open with a heading framed by double angle brackets, e.g. <<Heading>>.",
              "Supply a title; enclose it in << >>."],
    "highlights": ["Italicise {n} or more fragments using single asterisks, as in *example*.",
                   "Make {n} or more spans stand out by putting them between asterisks."],
    "json_format": ["The whole output has to be a JSON object.", "Answer strictly in JSON syntax."],
    "postscript": ["Append a final note that begins with {marker}", "Put an extra remark at the bottom, opened by {marker}"],
}
assert set(SEALED_PHRASINGS) == set(TRAIN_KINDS)

# -- the second sealed split: a fourth set of wordings for the 16 training kinds ---------------------------------
# Written 2026-12-04 after the first sealed split had been read for seven recipes, before any model answered these;
# first read for the recipe frozen as docs/data.md's eighth look. Shared with no other file (tested).
SEALED2_TASKS = [
    "Help me understand {topic} before my exam tomorrow.",
    "A visitor wants to learn about {topic}. Write what you would tell them.",
    "Put into words the main ideas behind {topic}.",
    "Introduce {topic} to someone who has never heard of it.",
    "Sketch out {topic} in a short text.",
]
SEALED2_FRAMES = [
    "Request: {task}\nConditions: {cons}",
    "{task}\nWhile writing, respect this: {cons}",
]
SEALED2_PHRASINGS: dict[str, list[str]] = {
    "max_words": ["The response may hold {n} words or fewer.", "Make sure the word count stays within {n}."],
    "min_words": ["Reach at least {n} words before you stop.", "I need a minimum length of {n} words."],
    "keyword": ["Let the word '{word}' appear in what you write.", "Your text must feature '{word}'."],
    "bullets": ["Set it out as {n} lines starting with '- ', and write nothing besides those lines.",
                "Respond with a bulleted list ('- ') of {n} entries, exactly {n}."],
    "lowercase": ["Stick to lower-case characters from start to finish.", "Avoid uppercase letters entirely."],
    "end_with": ['Conclude with these exact words: "{phrase}"', 'The text has to stop on "{phrase}"'],
    "min_sentences": ["Produce no less than {n} sentences.", "Let the answer span {n} sentences or more."],
    "paragraphs": ["Compose {n} paragraphs exactly, with a single empty line between neighbouring ones.",
                   "The reply is to consist of {n} paragraphs, blank-line separated, exactly {n}."],
    "forbidden_words": ["Steer clear of {words}.", "The text may not include {words}."],
    "keyword_frequency": ["Repeat the word '{word}' {n} or more times.",
                          "Use '{word}' again and again: {n} times as a minimum."],
    "letter_frequency": ["Mind your letters: '{letter}' has to occur {freq}.",
                         "Count each '{letter}' you type: it must appear {freq}."],
    "no_commas": ["Refrain from using commas.", "The text must be free of commas."],
    "title": ["Place a title at the start, between << and >>.", "Top the answer with a title like <<Your Title>>."],
    "highlights": ["Use single asterisks to emphasise {n} or more passages, as in *this*.",
                   "Emphasise no fewer than {n} phrases, each set between asterisks."],
    "json_format": ["Respond only with a JSON object.", "Make your full reply a well-formed JSON document."],
    "postscript": ["End with an added note that starts with {marker}", "Include a closing addendum opening with {marker}"],
}
assert set(SEALED2_PHRASINGS) == set(TRAIN_KINDS)

START_PHRASES = ["Sure.", "Here is the short answer.", "Good question.", "Happy to help.", "Let me explain."]
END_PHRASES = ["Hope this helps.", "That is all for now.", "Thanks for asking.", "Let me know if you want more.",
               "And that is the short version.", "Stay curious!"]
POSTSCRIPTS = ["Ask me if you want more detail.", "There is plenty more to learn.", "I can share sources too.",
               "Thanks for reading."]
PLACEHOLDER_SENTENCES = ["Learn more at [website].", "Write to [name] with any questions.",
                         "Visit [place] to see it for yourself.", "Plan your visit for [date].",
                         "Share this note with [friend's name].", "Ask your teacher at [school name] for more."]
TITLES = ["All About {Topic}", "{Topic} in Brief", "A Short Guide to {Topic}", "Notes on {Topic}", "{Topic} Explained"]
BULLET_INTROS = ["Here is what to know about {topic}:", "A few facts about {topic}:"]
JSON_KEYS = [("topic", "facts"), ("subject", "points"), ("title", "notes")]
PARAMS = {"max_words": [10, 12, 15, 20, 25, 30], "min_words": [20, 25, 30, 35, 40, 50], "bullets": [2, 3, 4, 5],
          "max_sentences": [1, 2, 3], "min_sentences": [3, 4, 5], "paragraphs": [2, 3], "highlights": [1, 2, 3],
          "placeholders": [1, 2, 3], "keyword_frequency": [2, 3]}
COMMON_LETTERS, RARE_LETTERS = "aeinorst", "bkpvwyfg"
STOPWORDS = set("""a an the and or but of to in on at for with from by as is are was were be been it its this that
these those they them their there then than can could will would may might must should not no only very some most
many much more each every other into over under after before about also such so even just like one two""".split())

# -- topics ---------------------------------------------------------------------------------------------------


def all_topics() -> list[dict]:
    """Topics with their facts, keywords (in one or two facts) and frequent words (in two or more)."""
    out = []
    for name, facts, *given in TOPICS + MORE_TOPICS:
        counts = Counter()
        for f in facts:
            counts.update({w.lower() for w in re.findall(r"[A-Za-z]+", f)})
        content = sorted(w for w in counts if len(w) >= 4 and w not in STOPWORDS)
        keywords = given[0] if given else [w for w in content if counts[w] <= 2][:6]
        # Words and their counts over all facts, for "use X at least n times" (content words preferred).
        frequent = {w: sum(count_word(f, w) for f in facts) for w in sorted(counts) if len(w) >= 3}
        out.append({"name": name, "facts": facts, "keywords": keywords,
                    "frequent": {w: n for w, n in frequent.items() if n >= 2}})
    return out


# -- constraints and prompts -------------------------------------------------------------------------------------


def sample_constraints(rng: random.Random, main: str, topic: dict) -> list[dict]:
    """The main constraint plus 0-2 compatible training kinds (never a held-out one)."""
    kinds = [main]
    n = rng.choices(list(N_CONSTRAINTS), weights=list(N_CONSTRAINTS.values()))[0]
    while len(kinds) < n:
        free = [k for k in TRAIN_KINDS if k not in kinds and not any(
            SLOTS[k] & SLOTS[o] or frozenset({k, o}) in CONFLICTS for o in kinds)]
        if not free:
            break
        kinds.append(rng.choice(free))
    return [_params(rng, k, topic, kinds) for k in kinds]


def _params(rng: random.Random, kind: str, topic: dict, kinds: list[str]) -> dict:
    """One constraint of `kind` with parameters this topic's facts can meet (and break)."""
    c: dict = {"type": kind}
    case = (str.lower if "lowercase" in kinds else str.upper if "uppercase" in kinds else None)
    if kind == "keyword_frequency":
        c["n"] = rng.choice(PARAMS[kind])
        fits = [w for w, n in topic["frequent"].items() if n >= c["n"]] or list(topic["frequent"])
        content = [w for w in fits if w not in STOPWORDS]
        c["word"] = rng.choice(content or fits)
        c["n"] = min(c["n"], topic["frequent"][c["word"]])
    elif kind in PARAMS:
        c["n"] = rng.choice(PARAMS[kind])
    elif kind == "keyword":
        c["word"] = rng.choice(topic["keywords"])
    elif kind == "forbidden_words":
        c["words"] = rng.sample(topic["keywords"], rng.choice([1, 2]))
    elif kind == "letter_frequency":
        if rng.random() < 0.5:
            c.update(letter=rng.choice(COMMON_LETTERS), n=rng.choice([8, 10, 12, 15]), relation="at least")
        else:
            c.update(letter=rng.choice(RARE_LETTERS), n=rng.choice([2, 3, 4]), relation="less than")
    elif kind in ("start_with", "end_with"):
        phrase = rng.choice(START_PHRASES if kind == "start_with" else END_PHRASES)
        c["phrase"] = case(phrase) if case else phrase
    elif kind == "postscript":
        c["marker"] = rng.choice(["P.S.", "P.S.", "P.P.S."])
    return c


def _fill(template: str, c: dict) -> str:
    """A phrasing with the constraint's parameters in words."""
    words = " or ".join(f"'{w}'" for w in c.get("words", []))
    freq = (f"at least {c['n']} times" if c.get("relation") == "at least" else f"fewer than {c.get('n')} times")
    return template.format(words=words, freq=freq, **{k: v for k, v in c.items() if k not in ("type", "words")})


def prompt_text(rng: random.Random, topic: str, constraints: list[dict], phrasing: str) -> tuple[str, str]:
    """The prompt and its template id ('task/t3+frame/t0+keyword/t1+...'); end_with's sentence comes last."""
    pick = {"train": 0, "heldout": 1, "sealed": 2, "sealed2": 3}[phrasing]
    ids, parts = [], []
    for c in sorted(constraints, key=lambda c: c["type"] == "end_with"):
        train, held = PHRASINGS[c["type"]]
        if pick >= 2:
            pool, tag = (SEALED_PHRASINGS, SEALED2_PHRASINGS)[pick - 2][c["type"]], "sv"[pick - 2]
        else:  # held-out kinds: all their phrasings are unseen
            pool, tag = (held, "h") if pick and held else (train, "t")
        j = rng.randrange(len(pool))
        ids.append(f"{c['type']}/{tag}{j}")
        parts.append(_fill(pool[j], c))
    tasks, frames = [(TASKS[0], FRAMES[0]), (TASKS[1], FRAMES[1]), (SEALED_TASKS, SEALED_FRAMES),
                     (SEALED2_TASKS, SEALED2_FRAMES)][pick]
    t, f = rng.randrange(len(tasks)), rng.randrange(len(frames))
    tag = "thsv"[pick]
    task = tasks[t].format(topic=topic)
    text = frames[f].format(task=task, cons=" ".join(parts), cons_lines="\n".join(f"- {p}" for p in parts))
    return text, "+".join([f"task/{tag}{t}", f"frame/{tag}{f}"] + ids)


# -- responses -------------------------------------------------------------------------------------------------


def compose(rng: random.Random, topic: dict, constraints: list[dict], violate: str | None = None,
            longer_than: int | None = None, shorter_than: int | None = None) -> str | None:
    """A fluent response meeting every constraint, or, when `violate` names a constraint kind, one that clearly
    breaks that constraint while meeting the others; optionally longer/shorter (words) than a given length.
    None when no such response is found."""
    found = _compose(rng, topic, constraints, violate, longer_than, shorter_than)
    return found[0] if found else None


def _compose(rng: random.Random, topic: dict, constraints: list[dict], violate: str | None,
             longer_than: int | None, shorter_than: int | None) -> tuple | None:
    """`compose`, also returning what a one-edit twin needs: (text, facts, plan, the rng state _render began
    from). Reading the state draws nothing, so the files built before it stay byte-identical."""
    by = {c["type"]: c for c in constraints}
    facts = _fact_order(rng, topic["facts"], by, violate)
    plan = _plan(rng, by, violate, len(facts))
    sizes = list(range(1, len(facts) + 1))
    rng.shuffle(sizes)
    for k in sizes:
        if k < plan["min_facts"] or (plan["exact_facts"] and k != plan["exact_facts"]):
            continue
        state = rng.getstate()
        text = _render(rng, topic, facts[:k], plan)
        words = count_words(text)
        if longer_than is not None and words <= longer_than or shorter_than is not None and words >= shorter_than:
            continue
        if _acceptable(text, constraints, violate):
            return text, facts[:k], plan, state
    return None


def one_edit_twin(rng: random.Random, topic: dict, constraints: list[dict], parts: tuple, violate: str) -> str | None:
    """A rejected response one edit away from the chosen one (`_compose`'s parts): the same facts, layout and
    decorations (rendered from the same rng state), with one fact swapped for another of the topic, two where one
    cannot do it, or for min_words the last facts dropped, so that it breaks `violate` and meets the rest. A pair
    then differs only in what the violated check reads, the contrast a small scorer needs to learn a lexical
    check (docs/reward.md, "One-edit pairs"). None when no such edit exists."""
    _, facts, plan, state = parts

    def render(fs: list[str]) -> str:
        twin = random.Random()
        twin.setstate(state)
        return _render(twin, topic, fs, plan)

    if violate == "min_words":
        candidates = [facts[:j] for j in range(len(facts) - 1, 0, -1)
                      if j >= plan["min_facts"] and not plan["exact_facts"]]
    else:
        spare = [f for f in topic["facts"] if f not in facts]
        swaps = [(i, f) for i in range(len(facts)) for f in spare]
        rng.shuffle(swaps)
        candidates = [facts[:i] + [f] + facts[i + 1:] for i, f in swaps]
        pairs = [(a, b) for a in swaps for b in swaps if a[0] < b[0] and a[1] != b[1]]
        for (i, f), (j, g) in rng.sample(pairs, min(len(pairs), 300)):
            candidates.append([f if n == i else g if n == j else x for n, x in enumerate(facts)])
    for fs in candidates:
        text = render(fs)
        if text and _acceptable(text, constraints, violate):
            return text
    return None


def _wanted(fact: str, c: dict) -> int:
    """How much a fact helps meet `c` (positive), or hurts it (negative); 0: neutral."""
    kind = c["type"]
    if kind == "keyword" or kind == "keyword_frequency":
        return count_word(fact, c["word"])
    if kind == "forbidden_words":
        return -sum(count_word(fact, w) for w in c["words"])
    if kind == "no_commas":
        return -fact.count(",")
    if kind == "letter_frequency":
        n = fact.lower().count(c["letter"])
        return n if c["relation"] == "at least" else -n
    return 0


def _fact_order(rng: random.Random, facts: list[str], by: dict, violate: str | None) -> list[str]:
    """Facts, most helpful first (for the violated kind, most harmful first); ties in random order."""
    def key(f: str) -> int:
        return sum(-_wanted(f, c) if kind == violate else _wanted(f, c) for kind, c in by.items())
    shuffled = rng.sample(facts, len(facts))
    return sorted(shuffled, key=key, reverse=True)


def _off_by(rng: random.Random, n: int, low: int, high: int, extra: tuple = ()) -> int:
    """A count that misses `n` (by 1-2, or one of `extra`), within [low, high]."""
    return rng.choice([m for m in (n - 2, n - 1, n + 1, n + 2, *extra) if low <= m <= high and m != n])


def _plan(rng: random.Random, by: dict, violate: str | None, n_facts: int) -> dict:
    """The response's layout and decorations, with the violated kind's part broken."""
    def param(kind: str, key: str | None, broken):
        """The constraint's parameter (True for one without), `broken(it)` for the violated kind, None if absent."""
        if kind not in by:
            return None
        value = by[kind][key] if key else True
        return broken(value) if violate == kind else value

    def other(pool: list[str], phrase: str) -> str | None:
        return rng.choice([None] + [p for p in pool if p.lower() != phrase.lower()])

    plan = {
        "bullets": param("bullets", "n", lambda n: _off_by(rng, n, 0, n_facts, (0,))) or 0,
        "paragraphs": param("paragraphs", "n", lambda n: _off_by(rng, n, 1, 4, (1,))) or 0,
        "highlights": param("highlights", "n", rng.randrange) or 0,
        "placeholders": param("placeholders", "n", rng.randrange) or 0,
        "title": param("title", None, lambda _: rng.choice([False, "plain"])),
        "start": param("start_with", "phrase", lambda p: other(START_PHRASES, p)),
        "end": param("end_with", "phrase", lambda p: other(END_PHRASES, p)),
        "postscript": param("postscript", "marker", lambda _: None),
        "quote": param("quotation", None, lambda _: rng.choice([False, "single"])),
        "json": "json_format" in by and violate != "json_format",
        "case": ("lower" if "lowercase" in by and violate != "lowercase" else
                 "upper" if "uppercase" in by and violate != "uppercase" else None),
    }
    plan["comma"] = violate == "no_commas"
    plan["exact_facts"] = plan["bullets"]
    plan["min_facts"] = max(plan["paragraphs"], plan["highlights"], 1)
    return plan


def _render(rng: random.Random, topic: dict, facts: list[str], plan: dict) -> str:
    """Assemble the response: start phrase / title, body, placeholders, end phrase / postscript; quote; case."""
    name = topic["name"]
    if plan["comma"] and len(facts) >= 2 and not any("," in f for f in facts):
        # A comma that a fluent writer would put there: two facts joined by ', and'.
        facts = [f"{facts[0][:-1]}, and {facts[1][0].lower()}{facts[1][1:]}"] + facts[2:]
        if len(facts) < plan["min_facts"]:
            return ""  # not enough facts left for the layout; the caller tries another size
    hl = set(rng.sample(range(len(facts)), plan["highlights"])) if plan["highlights"] else set()
    facts = [f"*{f}*" if i in hl else f for i, f in enumerate(facts)]
    extra = rng.sample(PLACEHOLDER_SENTENCES, plan["placeholders"])
    if plan["json"]:
        keys = rng.choice(JSON_KEYS)
        body = json.dumps({keys[0]: name, keys[1]: facts}, ensure_ascii=False, indent=rng.choice([None, 2]))
    elif plan["bullets"]:
        lines = [f"- {f}" for f in facts]
        if rng.random() < 0.4:
            lines.insert(0, rng.choice(BULLET_INTROS).format(topic=name))
        body = "\n".join(lines + ([" ".join(extra)] if extra else []))
    elif plan["paragraphs"]:
        n = min(plan["paragraphs"], len(facts))  # fewer after a comma join: _acceptable re-checks the count
        cuts = sorted(rng.sample(range(1, len(facts)), n - 1)) if n > 1 else []
        blocks = [facts[a:b] for a, b in zip([0] + cuts, cuts + [len(facts)])]
        blocks[-1] = blocks[-1] + extra
        body = "\n\n".join(" ".join(b) for b in blocks)
    else:
        body = " ".join(facts + extra)
    head = []
    if plan["start"]:
        head.append(plan["start"])
    if plan["title"]:
        title = rng.choice(TITLES).format(Topic=_title_case(name))
        head.append(f"<<{title}>>" if plan["title"] is True else title)
    sep = "\n" if plan["bullets"] or plan["json"] or plan["title"] else " "
    text = sep.join(head + [body]) if head else body
    if plan["end"]:
        text += ("\n" if plan["bullets"] else " ") + plan["end"]
    if plan["postscript"]:
        text += f"\n{plan['postscript']} {rng.choice(POSTSCRIPTS)}"
    if plan["quote"]:
        q = '"' if plan["quote"] is True else "'"
        text = f"{q}{text}{q}"
    if plan["case"] == "lower":
        text = text.lower()
    elif plan["case"] == "upper":
        text = text.upper()
    return text


def _title_case(name: str) -> str:
    small = {"the", "of", "and", "a", "in"}
    return " ".join(w if w.isupper() or (w in small and i) else w[:1].upper() + w[1:]
                    for i, w in enumerate(name.split()))


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
    if violate == "max_sentences":
        return count_sentences(text) >= main["n"] + 2
    if violate == "min_sentences":
        return count_sentences(text) <= max(1, main["n"] - 2)
    return True


# -- rows and files ---------------------------------------------------------------------------------------------

FORCED_LONGER = {"max_words", "max_sentences"}  # the violation itself fixes which response is longer
FORCED_SHORTER = {"min_words", "min_sentences"}
FREE_KINDS = len(set(TRAIN_KINDS) - FORCED_LONGER - FORCED_SHORTER)  # the kinds that can even out the file


def make_item(rng: random.Random, main: str, topic: dict, phrasing: str, used: set[str],
              pairs: bool, balance: dict[str, int], twins: bool = False) -> dict:
    """One prompt (unique across all files) with its constraints, chosen and maybe rejected response.

    `balance` holds the running sums of len(chosen) - len(rejected) in words over this file's pairs: per kind,
    and over the file ("all"). Where the violation leaves the direction free, the rejected response is made
    longer more often while chosen ones have been longer, and shorter otherwise, weighing the kind's own sum
    plus an equal share of the file's, so that length predicts preference neither within a kind nor over the
    file. (With the file's sum alone the free kinds made up for the forced ones unevenly: keyword's chosen answer
    was the shorter one in 72% of the training pairs and in 46% of the held-out-phrasing ones, a shortcut a
    reward model learned.) `twins`: a kind of ONE_EDIT_KINDS gets `one_edit_twin` of its chosen response."""
    for _ in range(600):
        constraints = sample_constraints(rng, main, topic)
        prompt, template = prompt_text(rng, topic["name"], constraints, phrasing)
        if prompt in used:
            continue
        parts = _compose(rng, topic, constraints, None, None, None)
        if not parts:
            continue
        chosen, rejected = parts[0], ""
        if pairs:
            n = count_words(chosen)
            if twins and main in ONE_EDIT_KINDS:
                rejected = one_edit_twin(rng, topic, constraints, parts, main)
            else:
                lean = balance.get(main, 0) + balance.get("all", 0) / FREE_KINDS
                longer = main in FORCED_LONGER or (main not in FORCED_SHORTER
                                                   and rng.random() < (0.8 if lean > 0 else 0.2))
                rejected = compose(rng, topic, constraints, violate=main,
                                   longer_than=n if longer else None, shorter_than=None if longer else n)
            if rejected is None:
                continue
            for key in (main, "all"):
                balance[key] = balance.get(key, 0) + n - count_words(rejected)
        used.add(prompt)
        return {"prompt": prompt, "template": template, "constraints": constraints, "chosen": chosen,
                "rejected": rejected}
    raise RuntimeError(f"no example found for {main} / {topic['name']}")


def build_file(rng: random.Random, spec: tuple, topics: list[dict], used: set[str], prefix: str,
               twins: bool = False) -> list[dict]:
    """Rows of one file; kinds and topics are cycled so both stay balanced in any prefix."""
    split, kind_pool, phrasing, pairs, size = spec
    kinds = TRAIN_KINDS if kind_pool == "train" else HELDOUT_KINDS
    kinds = rng.sample(kinds, len(kinds))
    order = rng.sample(topics, len(topics))
    rows, balance = [], {}
    for i in range(size):
        main = kinds[i % len(kinds)]
        # Every topic once per round; each round shifts by one so that a kind meets every topic (with 16 kinds
        # and 96 topics, a plain i % 96 would pair each kind with the same 6 topics forever).
        topic = order[(i + i // len(order)) % len(order)]
        item = make_item(rng, main, topic, phrasing, used, pairs, balance, twins)
        rows.append(_row(pairs, f"{prefix}-{i + 1:05d}", split, main, item))
    return rows


def _row(pairs: bool, row_id: str, split: str, category: str, item: dict) -> dict:
    """An item in the file's row contract (SFT messages, or a preference pair)."""
    user = [{"role": "user", "content": item["prompt"]}]
    meta = {"id": row_id, "split": split, "category": category, "constraints": item["constraints"],
            "template": item["template"]}
    if not pairs:
        return {**meta, "messages": user + [{"role": "assistant", "content": item["chosen"]}]}
    return {**meta, "prompt": user, "chosen": [{"role": "assistant", "content": item["chosen"]}],
            "rejected": [{"role": "assistant", "content": item["rejected"]}], "label_source": "human"}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def length_preference_stats(rows: list[dict]) -> dict:
    """Pearson correlation of response length (words) with the label (chosen 1, rejected 0), and the fraction
    of pairs whose chosen response is the longer one: near 0 and 0.5 when length does not predict preference."""
    lens = [count_words(r[key][0]["content"]) for r in rows for key in ("chosen", "rejected")]
    labels = [1.0, 0.0] * len(rows)
    ml, my = sum(lens) / len(lens), 0.5
    cov = sum((x - ml) * (y - my) for x, y in zip(lens, labels))
    sx = math.sqrt(sum((x - ml) ** 2 for x in lens))
    sy = math.sqrt(sum((y - my) ** 2 for y in labels))
    is_longer = [count_words(r["chosen"][0]["content"]) > count_words(r["rejected"][0]["content"]) for r in rows]
    by_kind: dict[str, list[bool]] = {}
    for r, x in zip(rows, is_longer):
        by_kind.setdefault(r["category"], []).append(x)
    free = [sum(v) / len(v) for k, v in by_kind.items() if k not in FORCED_LONGER | FORCED_SHORTER]
    return {"corr": cov / (sx * sy), "chosen_longer": sum(is_longer) / len(rows),
            "free_kinds_chosen_longer": (min(free), max(free)) if free else None}


def check_rows(rows: list[dict], pairs: bool, kinds: set[str]) -> None:
    """Build-time guarantees: chosen passes everything, rejected fails exactly the row's category."""
    for r in rows:
        assert {c["type"] for c in r["constraints"]} <= kinds, r["id"]
        if not pairs:
            assert passes(r["messages"][-1]["content"], r["constraints"]), r["id"]
            continue
        assert passes(r["chosen"][0]["content"], r["constraints"]), r["id"]
        failed = [c["type"] for c in r["constraints"] if not check(r["rejected"][0]["content"], c)]
        assert failed == [r["category"]], (r["id"], failed)


def main(argv: list[str] | None = None) -> None:
    args = (sys.argv[1:] if argv is None else argv)
    out = Path(args[args.index("--out") + 1]) if "--out" in args else ROOT / "data"
    rng = random.Random(0)
    topics = all_topics()
    used: set[str] = set()
    for name, spec in [*FILES.items(), *SEALED.items(), *ONE_EDIT.items()]:
        if name in SEALED:  # each sealed file its own stream: the files before it stay byte-identical
            rng = random.Random(1 + list(SEALED).index(name))
        if name in ONE_EDIT:
            rng = random.Random(1 + len(SEALED))
        rows = build_file(rng, spec, topics, used, name.replace(".jsonl", "").replace("/", "-"), name in ONE_EDIT)
        kinds = set(TRAIN_KINDS) | (set(HELDOUT_KINDS) if spec[1] == "heldout" else set())
        check_rows(rows, spec[3], kinds)
        write_jsonl(out / name, rows)
        cats = Counter(r["category"] for r in rows)
        n_cons = Counter(len(r["constraints"]) for r in rows)
        line = (f"data/{name}: {len(rows)} rows, {len(cats)} kinds ({min(cats.values())}-{max(cats.values())} "
                f"rows each), constraints per prompt {dict(sorted(n_cons.items()))}, "
                f"{len({r['template'] for r in rows})} distinct templates")
        if spec[3]:
            s = length_preference_stats(rows)
            line += f"; length/preference corr {s['corr']:+.3f}, chosen longer in {s['chosen_longer']:.1%}"
            if s["free_kinds_chosen_longer"]:
                low, high = s["free_kinds_chosen_longer"]
                line += f" ({low:.0%}-{high:.0%} per kind where the violation leaves it free)"
        print(line)
        if spec[0] == "train":
            uses = Counter(c["type"] for r in rows for c in r["constraints"])
            print("  constraints per kind (any position): " + ", ".join(f"{k} {v}" for k, v in uses.most_common()))
    general = [{"id": f"general-{i + 1:03d}", "text": t} for i, t in enumerate(PARAGRAPHS)]
    write_jsonl(out / "general/heldout.jsonl", general)
    print(f"data/general/heldout.jsonl: {len(general)} paragraphs, "
          f"{sum(count_words(t) for t in PARAGRAPHS)} words (the forgetting perplexity text)")
    print(f"{len(topics)} topics; training kinds ({len(TRAIN_KINDS)}): {', '.join(TRAIN_KINDS)}; "
          f"held-out kinds ({len(HELDOUT_KINDS)}): {', '.join(HELDOUT_KINDS)}")


if __name__ == "__main__":
    main()
