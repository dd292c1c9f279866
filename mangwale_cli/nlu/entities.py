"""An entity extractor learned from annotated examples: a gazetteer plus shape patterns.

From every ``{start, end, value, entity}`` span it learns (1) the value itself, matched again
case-insensitively on word boundaries, and (2) the value's *shape* (``ORD-1234`` becomes
``[A-Z]{3}-\\d{4}``-like patterns) for entity types whose values look like codes, so unseen ids
and coupon codes are found too. Longer matches win; matches never overlap.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

_WORDISH = re.compile(r"\w")


def shape_pattern(value: str) -> str | None:
    """A regex for values shaped like ``value`` (digits and letters by runs); None for words."""
    if not any(c.isdigit() for c in value):
        return None  # plain words are better served by the gazetteer
    out = []
    for run in re.finditer(r"\d+|[A-Za-z]+|\s+|.", value):
        tok = run.group()
        if tok.isdigit():
            lo, hi = max(1, len(tok) - 1), len(tok) + 1
            out.append(rf"\d{{{lo},{hi}}}")
        elif tok.isalpha():
            cls = "[A-Z]" if tok.isupper() else "[a-z]" if tok.islower() else "[A-Za-z]"
            out.append(f"{cls}{{{len(tok)}}}")
        elif tok.isspace():
            out.append(r"\s+")
        else:
            out.append(re.escape(tok))
    return "".join(out)


@dataclass
class EntityExtractor:
    values: dict[str, dict[str, str]] = field(default_factory=dict)  # lower(value) -> {entity, value}
    patterns: dict[str, list[str]] = field(default_factory=dict)  # entity -> shape regexes
    counts: dict[str, int] = field(default_factory=dict)
    _compiled: Any = None

    @classmethod
    def fit(cls, examples: list[dict[str, Any]]) -> EntityExtractor:
        votes: dict[str, Counter[str]] = defaultdict(Counter)
        shapes: dict[str, Counter[str]] = defaultdict(Counter)
        counts: Counter[str] = Counter()
        for ex in examples:
            for span in ex.get("entities") or []:
                value, entity = span["value"], span["entity"]
                votes[value.lower()][entity] += 1
                counts[entity] += 1
                shape = shape_pattern(value)
                if shape:
                    shapes[entity][shape] += 1
        values = {v: {"entity": c.most_common(1)[0][0], "value": v} for v, c in votes.items()}
        patterns = {e: [s for s, _ in c.most_common(20)] for e, c in shapes.items()}
        return cls(values=values, patterns=patterns, counts=dict(counts))

    def _matchers(self) -> list[tuple[re.Pattern[str], str | None]]:
        if self._compiled is None:
            compiled: list[tuple[re.Pattern[str], str | None]] = []
            if self.values:
                alts = sorted(self.values, key=len, reverse=True)
                body = "|".join(re.escape(v) for v in alts)
                compiled.append((re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE), None))
            for entity, pats in self.patterns.items():
                for p in pats:
                    compiled.append((re.compile(rf"(?<![\w-])(?:{p})(?![\w-])"), entity))
            self._compiled = compiled
        return self._compiled

    def extract(self, text: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for rx, entity in self._matchers():
            for m in rx.finditer(text):
                name = entity or self.values[m.group().lower()]["entity"]
                found.append(
                    {
                        "start": m.start(),
                        "end": m.end(),
                        "value": m.group(),
                        "entity": name,
                        "source": "pattern" if entity else "gazetteer",
                    }
                )
        found.sort(key=lambda s: (-(s["end"] - s["start"]), s["start"]))
        taken: list[dict[str, Any]] = []
        for s in found:
            if all(s["end"] <= t["start"] or s["start"] >= t["end"] for t in taken):
                taken.append(s)
        return sorted(taken, key=lambda s: s["start"])

    def evaluate(self, examples: list[dict[str, Any]]) -> dict[str, float]:
        """Span-level precision, recall and F1 on annotated examples."""
        tp = fp = fn = 0
        for ex in examples:
            gold = {(s["start"], s["end"], s["entity"]) for s in ex.get("entities") or []}
            pred = {(s["start"], s["end"], s["entity"]) for s in self.extract(ex["text"])}
            tp += len(gold & pred)
            fp += len(pred - gold)
            fn += len(gold - pred)
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f1, 4)}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_compiled"] = None
        return state
