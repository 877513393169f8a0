"""The task suite: small text-to-text tasks with seeded generators and exact-match metrics.

Each :class:`Task` has a one-sentence description (what an expert for it is for), its training phrasings, and a
generator of ``(input, target)`` pairs seeded per split. Held-in tasks also have dev phrasings (to tune on) and
unseen phrasings (held out of the experts' training, their stored examples and the routers' data, to report on).
The dev and test splits never share an input (a hash of the input assigns it to one). ``HELD_IN`` tasks get an
expert in the zoo; ``HELD_OUT`` tasks relate to or compose them and get none, to measure generalisation.

A prompt puts the instruction before the input (``"{instruction}\\n\\n{input}"``), after it, or inline, and may be
polite or carry typos (:func:`styled`), in every split alike; it is sent as the user turn of the base model's chat
template, and the target is the assistant's whole answer. The metric is exact match after stripping whitespace
(case-sensitive).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Task", "Example", "TASKS", "HELD_IN", "HELD_OUT", "get_task", "exact_match", "make_examples",
           "SPLIT_SEEDS", "UNSEEN_PHRASINGS", "DEV_PHRASINGS", "unseen_examples", "routing_examples", "phrasings",
           "styled"]

SPLIT_SEEDS = {"train": 1_000, "test": 2_000, "dev": 3_000}


@dataclass(frozen=True)
class Example:
    """One prompt of a task: ``instruction`` as written (styles applied), placed by ``layout`` around ``input``
    (``"before"``, ``"after"`` or ``"inline"``); ``phrasing`` is the phrasing it was written from."""

    task: str
    instruction: str
    input: str
    target: str
    layout: str = "before"
    phrasing: str = ""

    @property
    def prompt(self) -> str:
        if self.layout == "after":
            return f"{self.input}\n\n{self.instruction}"
        if self.layout == "inline":
            return f"{self.instruction.rstrip(' .:')}: {self.input}"
        return f"{self.instruction}\n\n{self.input}"


def _split_of(task: str, x: str) -> str:
    """Which third of the inputs an input belongs to (a hash of it): the test split's, the dev split's, or the
    rest, from which the examples stored with the experts (routing data) are drawn. The three never share an
    input; the experts' training examples are drawn from all inputs (a task with few, such as ``plural``, is
    partly a lookup its expert must learn)."""
    return ("test", "dev", "train")[hashlib.sha256(f"{task}|{x}".encode()).digest()[0] % 3]


@dataclass(frozen=True)
class Task:
    """A text-to-text task. ``generate(rng) -> (input, target)``; ``instructions`` are its training phrasings."""

    name: str
    description: str
    instructions: tuple[str, ...]
    generate: Callable[[random.Random], tuple[str, str]]
    held_out: bool = False
    related: tuple[str, ...] = field(default_factory=tuple)

    def examples(self, n: int, split: str = "train", seed: int = 0, instructions: tuple[str, ...] | str | None = None,
                 styles: bool = True) -> list[Example]:
        """``n`` examples of ``split`` (``"train"``, ``"dev"`` or ``"test"``; dev and test never share an input).

        Each is asked in one of ``instructions`` drawn at random: a phrasing set's name (``"train"``, ``"dev"``,
        ``"unseen"``: :func:`phrasings`) or the phrasings themselves; by default the dev split's own phrasings for
        ``"dev"``, else the training ones. ``styles``: written in the styles of :func:`styled` (else the
        instruction as is, before the input).
        """
        if split not in SPLIT_SEEDS:
            raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
        rng = random.Random(f"{self.name}/{split}/{SPLIT_SEEDS[split] + seed}")
        if instructions is None:
            instructions = "dev" if split == "dev" and not self.held_out else "train"
        phr = phrasings(self.name, instructions) if isinstance(instructions, str) else tuple(instructions)
        out = []
        for _ in range(n):
            x, y = self.generate(rng)
            while split != "train" and _split_of(self.name, x) != split:
                x, y = self.generate(rng)
            p = rng.choice(phr)
            text, layout = styled(p, rng) if styles else (p, "before")
            out.append(Example(self.name, text, x, y, layout, p))
        return out


def exact_match(prediction: str, target: str) -> bool:
    """Exact match after stripping surrounding whitespace (and a trailing period the model may add)."""
    p = prediction.strip()
    t = target.strip()
    return p == t or (p.endswith(".") and not t.endswith(".") and p[:-1].rstrip() == t)


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary for the generators
# ----------------------------------------------------------------------------------------------------------------
WORDS = ("apple river stone cloud green house music paper light dream window garden silver ocean forest yellow "
         "winter summer bridge castle rabbit pencil market orange planet candle doctor engine button mirror "
         "island jacket ladder monkey number pocket rocket saddle tunnel violin wallet basket camera dinner "
         "flower guitar hammer lemon magnet needle parrot salad tiger").split()
FIRST = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar",
         "peggy", "trent", "victor", "walter"]
DOMAINS = ["example.com", "mail.org", "company.net", "school.edu", "post.io", "web.de"]
FILLERS = ["Please contact {e} for details.", "You can reach me at {e} any time.", "Send the report to {e} today.",
           "My work address is {e}, not the old one.", "Questions? Write to {e} and we will reply."]
POS = ["wonderful", "excellent", "delightful", "fantastic", "great", "superb", "lovely", "brilliant"]
NEG = ["terrible", "awful", "disappointing", "horrible", "bad", "dreadful", "boring", "poor"]
ITEMS = ["movie", "restaurant", "phone", "book", "hotel", "concert", "laptop", "game"]
REVIEW = ["The {i} was {a}.", "What a {a} {i}, honestly.", "I found this {i} {a} from start to end.",
          "Overall a {a} {i}.", "This {i} is {a} and I would say so again."]
PLURALS = {"cat": "cats", "box": "boxes", "city": "cities", "child": "children", "mouse": "mice", "man": "men",
           "woman": "women", "tooth": "teeth", "foot": "feet", "leaf": "leaves", "knife": "knives",
           "wife": "wives", "bus": "buses", "church": "churches", "baby": "babies", "toy": "toys", "day": "days",
           "potato": "potatoes", "tomato": "tomatoes", "hero": "heroes", "sheep": "sheep", "fish": "fish",
           "goose": "geese", "person": "people", "ox": "oxen", "cactus": "cacti", "party": "parties",
           "dish": "dishes", "brush": "brushes", "wolf": "wolves", "shelf": "shelves", "lady": "ladies",
           "key": "keys", "glass": "glasses", "fox": "foxes", "dog": "dogs", "book": "books", "car": "cars",
           "story": "stories", "class": "classes", "wish": "wishes", "half": "halves", "life": "lives",
           "calf": "calves", "boy": "boys", "photo": "photos", "piano": "pianos", "echo": "echoes"}
KEYS = ["name", "city", "age", "color", "job", "team", "pet", "food"]
VALUES = {"name": FIRST, "city": ["paris", "tokyo", "lima", "oslo", "cairo", "rome"], "age": None,
          "color": ["red", "blue", "green", "black"], "job": ["pilot", "chef", "nurse", "judge"],
          "team": ["red", "blue", "alpha", "omega"], "pet": ["cat", "dog", "fish", "bird"],
          "food": ["rice", "soup", "bread", "pasta"]}
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def number_words(n: int) -> str:
    """English words for 0 ≤ n ≤ 999 ("three hundred forty-two")."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def _words(rng: random.Random, lo: int = 3, hi: int = 6) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def _numbers(rng: random.Random) -> list[int]:
    return [rng.randint(1, 99) for _ in range(rng.randint(4, 6))]


def _date(rng: random.Random) -> tuple[int, int, int]:
    return rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)


def _email(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)}.{rng.choice(FIRST)}{rng.randint(1, 99)}@{rng.choice(DOMAINS)}"


def _kv(rng: random.Random) -> list[tuple[str, str]]:
    keys = rng.sample(KEYS, rng.randint(2, 3))
    return [(k, str(rng.randint(18, 80)) if VALUES[k] is None else rng.choice(VALUES[k])) for k in keys]


def _g_reverse(rng):
    w = _words(rng)
    return " ".join(w), " ".join(reversed(w))


def _g_upper(rng):
    w = " ".join(_words(rng))
    return w, w.upper()


def _g_sort(rng):
    n = _numbers(rng)
    return ", ".join(map(str, n)), ", ".join(map(str, sorted(n)))


def _g_add(rng):
    a, b = rng.randint(10, 499), rng.randint(10, 499)
    return f"{a} + {b}", str(a + b)


def _g_date(rng):
    y, m, d = _date(rng)
    return f"{y:04d}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y:04d}"


def _g_email(rng):
    e = _email(rng)
    return rng.choice(FILLERS).format(e=e), e


def _g_count(rng):
    w = _words(rng, 2, 9)
    return " ".join(w), str(len(w))


def _g_json(rng):
    kv = _kv(rng)
    return "; ".join(f"{k}: {v}" for k, v in kv), json.dumps(dict(kv))


def _g_sentiment(rng):
    pos = rng.random() < 0.5
    return rng.choice(REVIEW).format(i=rng.choice(ITEMS), a=rng.choice(POS if pos else NEG)), (
        "positive" if pos else "negative")


def _g_plural(rng):
    noun = rng.choice(sorted(PLURALS))
    return noun, PLURALS[noun]


def _g_words(rng):
    n = rng.randint(0, 999)
    return str(n), number_words(n)


def _g_acronym(rng):
    w = _words(rng, 2, 5)
    return " ".join(w), "".join(x[0] for x in w).upper()


# held-out generators
def _g_reverse_upper(rng):
    w = _words(rng)
    return " ".join(w), " ".join(reversed(w)).upper()


def _g_sort_desc(rng):
    n = _numbers(rng)
    return ", ".join(map(str, n)), ", ".join(map(str, sorted(n, reverse=True)))


def _g_subtract(rng):
    a, b = rng.randint(100, 999), rng.randint(10, 99)
    return f"{a} - {b}", str(a - b)


def _g_date_long(rng):
    y, m, d = _date(rng)
    return f"{y:04d}-{m:02d}-{d:02d}", f"{MONTHS[m - 1]} {d}, {y}"


def _g_count_upper(rng):
    w = _words(rng, 2, 7)
    k = rng.randint(0, len(w))
    w = [x.upper() if i < k else x for i, x in enumerate(w)]
    rng.shuffle(w)
    return " ".join(w), str(sum(x.isupper() for x in w))


_T = Task
TASKS: dict[str, Task] = {t.name: t for t in [
    _T("reverse_words", "Reverse the order of the words in a sentence.", (
        "Reverse the order of the words.", "Write these words in reverse order.",
        "Put the words below in the opposite order.", "Output the same words, last word first.",
        "Flip the word order of this text.", "Rewrite the sequence of words backwards, keeping each word intact.", "reverse word order:", "Can you reverse these words?"),
       _g_reverse),
    _T("uppercase", "Convert text to upper-case letters.", (
        "Convert the text to uppercase.", "Write this in capital letters.", "Make every letter upper case.",
        "Rewrite the following in ALL CAPS.", "Change all letters below to uppercase.",
        "Shout this text: same words, capital letters only.", "caps:", "Could you put this in upper case?"), _g_upper),
    _T("sort_numbers", "Sort a list of numbers in ascending order.", (
        "Sort these numbers from smallest to largest.", "Put the numbers in ascending order.",
        "Order the list below in increasing order.", "Arrange the numbers from low to high.",
        "Return the numbers sorted ascending, comma-separated.", "Sort the following list of integers.", "sort asc:", "Can you sort these numbers for me?"),
       _g_sort),
    _T("add_integers", "Add two integers and give the sum.", (
        "Compute the sum.", "Add the two numbers.", "What is the result of this addition?",
        "Calculate the total of the two integers.", "Give the answer to this sum as a number.",
        "Work out the addition below.", "sum:", "What do these two numbers add up to?"), _g_add),
    _T("date_format", "Reformat an ISO date (YYYY-MM-DD) as DD/MM/YYYY.", (
        "Rewrite the date in DD/MM/YYYY format.", "Convert this ISO date to day/month/year.",
        "Change the date format to DD/MM/YYYY.", "Express the date as day, month and year separated by slashes.",
        "Reformat the following YYYY-MM-DD date as DD/MM/YYYY.", "Turn the date around: day first, year last.", "to DD/MM/YYYY:", "Can you rewrite this date as DD/MM/YYYY?"),
       _g_date),
    _T("extract_email", "Extract the email address from a sentence.", (
        "Extract the email address.", "What email address appears in this text?",
        "Find the e-mail address in the sentence and output only it.", "Return just the email mentioned below.",
        "Pull out the email address.", "Copy the email address from this message.", "email:", "Could you find the email address here?"), _g_email),
    _T("count_words", "Count the words in a text.", (
        "How many words are there?", "Count the words in this text.", "Give the number of words below.",
        "Output the word count.", "Tell me how many words the following contains.",
        "Count how many space-separated words there are.", "word count:", "Can you count the words for me?"), _g_count),
    _T("kv_to_json", "Turn 'key: value' pairs into a JSON object.", (
        "Convert these key-value pairs to JSON.", "Write the following as a JSON object.",
        "Turn the pairs below into JSON.", "Format this data as a JSON dictionary.",
        "Output a JSON object with these keys and values.", "Serialize the key: value list as JSON.", "json:", "Could you turn this into JSON?"), _g_json),
    _T("sentiment", "Classify the sentiment of a review as positive or negative.", (
        "Is this review positive or negative?", "Classify the sentiment of the review.",
        "Answer positive or negative: how does the writer feel?", "Label the review's sentiment.",
        "What is the sentiment (positive/negative) of this text?", "Decide if the opinion below is positive or "
        "negative.", "sentiment:", "Would you say this review is positive or negative?"), _g_sentiment),
    _T("plural", "Give the plural form of an English noun.", (
        "Give the plural of this noun.", "What is the plural form?", "Write the plural.",
        "Turn this noun into its plural.", "How do you say more than one of these?",
        "Output the plural form of the word below.", "plural:", "Could you tell me the plural of this word?"), _g_plural),
    _T("number_to_words", "Write a number (0-999) in English words.", (
        "Write this number in words.", "Spell out the number in English.", "Convert the digits to English words.",
        "How is this number written in words?", "Express the number below in words.",
        "Give the English words for this number.", "in words:", "Can you write this number out in words?"), _g_words),
    _T("acronym", "Make an upper-case acronym from the first letters of the words.", (
        "Make an acronym from these words.", "Give the acronym of the words below.",
        "Take the first letter of each word, in capitals.", "Abbreviate the words into an acronym.",
        "Form an acronym from the initials.", "What acronym do these words make?", "acronym:", "Could you make an acronym out of these words?"), _g_acronym),
    # held-out tasks: no expert; they relate to or compose the ones above
    _T("reverse_then_uppercase", "Reverse the order of the words, then write them in upper case.", (
        "Reverse the word order and write everything in capitals.", "Put the words in reverse order, in uppercase.",
        "Flip the order of the words and convert them to upper case.",
        "Write the words backwards (last word first) in ALL CAPS.",
        "Uppercase the text and reverse its word order."), _g_reverse_upper, True,
       ("reverse_words", "uppercase")),
    _T("sort_descending", "Sort a list of numbers in descending order.", (
        "Sort these numbers from largest to smallest.", "Put the numbers in descending order.",
        "Order the list from high to low.", "Arrange the numbers in decreasing order.",
        "Return the numbers sorted descending, comma-separated."), _g_sort_desc, True, ("sort_numbers",)),
    _T("subtract_integers", "Subtract one integer from another.", (
        "Compute the difference.", "Subtract the second number from the first.",
        "What is the result of this subtraction?", "Calculate the difference of the two integers.",
        "Work out the subtraction below."), _g_subtract, True, ("add_integers",)),
    _T("date_long_format", "Write an ISO date with the month spelled out, as in 'March 5, 2021'.", (
        "Write the date with the month spelled out.", "Convert this ISO date to the form 'Month D, YYYY'.",
        "Express the date as month name, day and year.", "Reformat the date in long form.",
        "Spell out the month of this date."), _g_date_long, True, ("date_format",)),
    _T("count_uppercase_words", "Count the words written in upper case.", (
        "How many words are in capitals?", "Count the uppercase words.", "Give the number of ALL-CAPS words.",
        "How many words below are written in upper case?", "Count the words in capital letters."),
       _g_count_upper, True, ("count_words", "uppercase")),
]}

# Phrasings of the held-in tasks held out of everything the experts and the routers are built from (training
# examples, the examples stored with each expert, routing data, tuning): the test split's unseen phrasings.
UNSEEN_PHRASINGS: dict[str, tuple[str, ...]] = {
    "reverse_words": ("Read the words from right to left and write them out.",
                      "Give me this word list backwards.", "Mirror the order of the words in the sentence.",
                      "backwards:", "Would you mind writing the words in the opposite sequence?"),
    "uppercase": ("Capitalize every single character.", "Transform the sentence into block capitals.",
                  "Switch every lowercase letter to its capital.", "upper:",
                  "Could you capitalise all of the letters?"),
    "sort_numbers": ("Rank these values, lowest first.", "Can you order the integers ascending?",
                     "List the numbers in sorted order, starting from the minimum.", "ascending:",
                     "Would you arrange these from the smallest up?"),
    "add_integers": ("Sum these two values.", "What do you get when you add them together?",
                     "Find the total of the two numbers given.", "total:", "Mind adding these up for me?"),
    "date_format": ("Show this date as day/month/year.", "Convert the date into the European DD/MM/YYYY style.",
                    "Write the date with the day first, then the month, then the year, using slashes.", "dd/mm/yyyy:",
                    "Could you give me this date in British format?"),
    "extract_email": ("Which e-mail address is mentioned here?", "Give me only the email contact from this text.",
                      "Identify the electronic mail address in the message.", "address?",
                      "Would you pick out the email for me?"),
    "count_words": ("What is the number of words in the passage?", "Tally the words.",
                    "Report how many words the sentence has.", "n words:", "Could you tell me the word total?"),
    "kv_to_json": ("Encode these fields as a JSON object.", "Produce JSON from the key/value lines.",
                   "Convert the list of keys and values into a JSON map.", "to json:",
                   "Would you express these fields in JSON?"),
    "sentiment": ("Does the customer like it or not? Answer positive or negative.",
                  "Determine the polarity of this review.", "Is the reviewer's opinion favourable or unfavourable?",
                  "polarity:", "Could you tell whether this person liked it? positive or negative"),
    "plural": ("What do we call several of these?", "Pluralize the noun.", "Give the form used for many of them.",
               "plural form?", "Would you give me the word for more than one?"),
    "number_to_words": ("Spell the number with letters instead of digits.", "Say this number in English.",
                        "Write out the numeral as words.", "spell out:", "Could you write the number in letters?"),
    "acronym": ("Shorten these words to their capitalised initials.", "Build an abbreviation from the initials.",
                "Combine the first letters into an acronym.", "initials:",
                "Would you abbreviate this to its initials?"),
}

# Phrasings of the dev split, to tune settings on: disjoint from the training phrasings and the unseen ones.
DEV_PHRASINGS: dict[str, tuple[str, ...]] = {
    "reverse_words": ("Invert the word order.", "Write the sentence starting from its last word.",
                      "reverse:", "Could you turn the word order around?"),
    "uppercase": ("Print the text in capitals.", "Make the letters uppercase, keep the words.", "allcaps:",
                  "Would you write this all in caps?"),
    "sort_numbers": ("Order these integers, smallest to biggest.", "Give the list in rising order.", "sorted:",
                     "Could you sort the values in increasing order?"),
    "add_integers": ("Add them up.", "What is the sum of the two numbers?", "add:",
                     "Could you compute this addition?"),
    "date_format": ("Format the date as day/month/year with slashes.", "Day, month, year: rewrite this date.",
                    "date dd/mm/yyyy:", "Would you write this date day first?"),
    "extract_email": ("Output the email address found in the text.", "Get the email out of this sentence.",
                      "e-mail:", "Could you copy out the email address?"),
    "count_words": ("Number of words?", "How long is this text in words?", "count words:",
                    "Would you count how many words there are?"),
    "kv_to_json": ("Make a JSON object from the pairs.", "Write these fields as JSON.", "as json:",
                   "Could you convert the pairs into JSON?"),
    "sentiment": ("Positive or negative review?", "Tell me the sentiment of this review.", "label sentiment:",
                  "Would you classify this opinion as positive or negative?"),
    "plural": ("Make this noun plural.", "Plural of the word?", "pluralize:", "Could you pluralise this noun?"),
    "number_to_words": ("Write the number as English words.", "Digits to words, please.", "as words:",
                        "Would you spell this number out?"),
    "acronym": ("Initials of these words, capitalised.", "Turn the words into an acronym.", "abbreviate:",
                "Could you give the acronym of these words?"),
}

# How a prompt puts an instruction and its input together, and the styles it may be written in. Every split draws
# them the same way (:func:`styled`): instruction before the input, after it, or inline; sometimes polite; sometimes
# with typos. Only the phrasings differ between splits.
LAYOUTS = {"before": 0.5, "after": 0.3, "inline": 0.2}
POLITE = ("Please: {i}", "{i} Thank you!", "Hello! {i}", "Hi, quick one. {i}", "{i} Thanks a lot.",
          "Kindly help with this. {i}")
P_POLITE = 0.2
P_TYPOS = 0.2
PHRASING_SETS = ("train", "dev", "unseen")


ANSWER_WORDS = {"positive", "negative"}  # words an instruction asks the model to answer with


def _typos(text: str, rng: random.Random) -> str:
    """``text`` with one or two typing slips (adjacent letters swapped, a letter dropped or doubled) in words of
    four letters or more."""
    words = text.split(" ")
    long = [i for i, w in enumerate(words)  # plain lower-case words only: "DD/MM/YYYY" or "JSON" keep their sense,
            if len(w.rstrip(".,:;?!")) >= 4 and w.rstrip(".,:;?!").isalpha() and w[1:].rstrip(".,:;?!").islower()
            and w.rstrip(".,:;?!").lower() not in ANSWER_WORDS]  # and so do the answers an instruction names
    for i in rng.sample(long, min(len(long), rng.randint(1, 2))):
        w = words[i]
        letters = [j for j, c in enumerate(w) if c.isalpha()]
        j = rng.choice(letters[1:-1] or letters)
        kind = rng.choice(("swap", "drop", "double"))
        if kind == "swap" and j + 1 < len(w) and w[j + 1].isalpha():
            w = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        elif kind == "drop":
            w = w[:j] + w[j + 1:]
        else:
            w = w[:j] + w[j] + w[j:]
        words[i] = w
    return " ".join(words)


def styled(phrasing: str, rng: random.Random) -> tuple[str, str]:
    """``(instruction as written, layout)`` for ``phrasing``: a layout of :data:`LAYOUTS`, maybe polite, maybe
    with typos."""
    layout = rng.choices(list(LAYOUTS), weights=list(LAYOUTS.values()))[0]
    text = phrasing
    if rng.random() < P_POLITE:
        text = rng.choice(POLITE).format(i=text)
    if rng.random() < P_TYPOS:
        text = _typos(text, rng)
    return text, layout


def phrasings(name: str, which: str) -> tuple[str, ...]:
    """The phrasings of held-in task ``name`` in set ``which``: ``"train"`` (the experts are trained on these and
    store examples in them), ``"dev"`` (tuning) or ``"unseen"`` (held out of both)."""
    if which == "train":
        return get_task(name).instructions
    table = {"dev": DEV_PHRASINGS, "unseen": UNSEEN_PHRASINGS}.get(which)
    if table is None:
        raise ValueError(f"phrasings must be one of {PHRASING_SETS}, got {which!r}")
    if name not in table:
        raise KeyError(f"task {name!r} has no {which} phrasings (held-out tasks have training phrasings only)")
    return table[name]

HELD_IN = [n for n, t in TASKS.items() if not t.held_out]
HELD_OUT = [n for n, t in TASKS.items() if t.held_out]


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; tasks: {sorted(TASKS)}")
    return TASKS[name]


def routing_examples(name: str, n: int, seed: int = 0) -> list[Example]:
    """``n`` training examples of ``name`` whose inputs are in neither the dev nor the test split: what an expert
    stores as its example prompts, which the routers build their data from."""
    out: list[Example] = []
    k = 4 * n
    while len(out) < n:
        out = [e for e in get_task(name).examples(k, "train", seed) if _split_of(name, e.input) == "train"][:n]
        k *= 2
    return out


def unseen_examples(name: str, n: int, split: str = "test", seed: int = 0) -> list[Example]:
    """``n`` examples of held-in task ``name`` asked in phrasings no expert or router saw (:data:`UNSEEN_PHRASINGS`,
    in the styles of :func:`styled`)."""
    return get_task(name).examples(n, split, seed, instructions="unseen")


def make_examples(names: list[str], n: int, split: str, seed: int = 0) -> list[Example]:
    """``n`` examples of each task in ``names``."""
    return [e for name in names for e in get_task(name).examples(n, split, seed)]
