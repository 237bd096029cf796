"""Background descriptions and the prompt template of MSIBench."""

from __future__ import annotations

from collections import Counter
from importlib import resources

_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
# Irregular or invariant plurals among the 80 COCO category names.
_PLURALS = {
    "person": "people",
    "mouse": "mice",
    "knife": "knives",
    "sheep": "sheep",
    "skis": "pairs of skis",
    "scissors": "pairs of scissors",
}
_SINGULAR_PHRASE = {"skis": "a pair of skis", "scissors": "a pair of scissors"}


def load_backgrounds() -> list[str]:
    text = (resources.files("msibench") / "data" / "backgrounds.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def plural(name: str) -> str:
    if name in _PLURALS:
        return _PLURALS[name]
    head, _, last = name.rpartition(" ")
    if last.endswith(("s", "sh", "ch", "x")):
        last = last + "es"
    else:
        last = last + "s"
    return f"{head} {last}".strip()


def with_article(name: str) -> str:
    if name in _SINGULAR_PHRASE:
        return _SINGULAR_PHRASE[name]
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def subjects_phrase(categories: list[str]) -> str:
    """'a dog', 'two dogs and a cat', 'a person, a dog and a kite' (order of first appearance)."""
    counts = Counter(categories)
    parts = []
    for name in dict.fromkeys(categories):
        n = counts[name]
        parts.append(with_article(name) if n == 1 else f"{_NUMBER_WORDS.get(n, str(n))} {plural(name)}")
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def make_prompt(categories: list[str], background: str) -> str:
    return f"a photo of {subjects_phrase(categories)} {background}"
