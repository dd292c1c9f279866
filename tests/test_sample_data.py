"""The shipped sample data set, measured the way a user meets it: the default ``nlu-train`` on
``food-delivery-sample``, scored on utterances written apart from it
(``fixtures/food_delivery_heldout.jsonl``, never trained on), and the README's predict example.

In-process (``nlu.model.train``, the trainer's own code): a model takes well under a second.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

import pytest

from mangwale_cli.datafile import load_sample_examples
from mangwale_cli.nlu.model import IntentModel, train
from mangwale_cli.trainers.nlu import NluTrainer

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = Path(__file__).resolve().parent / "fixtures" / "food_delivery_heldout.jsonl"
SEEDS = (0, 1, 2)


def held_out() -> list[dict[str, Any]]:
    return [json.loads(line) for line in HELD_OUT.read_text().splitlines() if line.strip()]


def key(text: str) -> str:
    """Text as the model compares it: case, punctuation and spacing aside."""
    return " ".join(re.findall(r"\w+", text.lower()))


def readme_example() -> str:
    """The text of the README's predict request."""
    found = re.search(r"""-d '\{"text": "([^"]+)"\}'""", (ROOT / "README.md").read_text())
    assert found, "the README has no predict example"
    return found.group(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, IntentModel]:
    """The default nlu-train on the sample, once per seed."""
    examples = load_sample_examples()
    out: dict[int, IntentModel] = {}
    for seed in SEEDS:
        directory = tmp_path_factory.mktemp(f"seed{seed}")
        params = NluTrainer().validate_params({"seed": seed})
        train(examples, params, lambda *a, **k: None, directory)
        out[seed] = IntentModel.load(directory)
    return out


def test_held_out_set_is_apart_and_covers_every_intent() -> None:
    """At least 100 held-out utterances, at least 5 per sample intent, none in the sample."""
    examples = held_out()
    trained = {key(e["text"]) for e in load_sample_examples()}
    sample_intents = {e["intent"] for e in load_sample_examples()}
    counts = Counter(e["intent"] for e in examples)
    assert len(examples) >= 100
    assert set(counts) == sample_intents and min(counts.values()) >= 5, counts
    assert [e["text"] for e in examples if key(e["text"]) in trained] == []
    assert len({key(e["text"]) for e in examples}) == len(examples), "a held-out utterance twice"
    for e in examples:
        for span in e.get("entities") or []:
            assert e["text"][span["start"] : span["end"]] == span["value"], e


# Two utterances of 3 words or more are near-duplicates when their word sets overlap this much
# (Jaccard), or their words, spelled out, are this close (edit distance over length): one
# template with a slot swapped ("they forgot the fries" / "... the rice"), or a word or two
# added or respelled ("thank u so much!!" / "Thank you so much!"). Shorter ones are exempt:
# "hi" and "hii" are two greetings, not a template.
NEAR_MIN_WORDS = 3
NEAR_JACCARD = 0.7
NEAR_DISTANCE = 0.15


def near_duplicate(a: str, b: str) -> str | None:
    """Why ``a`` and ``b`` count as near-duplicates ("jaccard 0.75", "distance 0.06"), or None."""
    wa, wb = key(a).split(), key(b).split()
    if min(len(wa), len(wb)) < NEAR_MIN_WORDS:
        return None
    sa, sb = set(wa), set(wb)
    if (jaccard := len(sa & sb) / len(sa | sb)) >= NEAR_JACCARD:
        return f"jaccard {jaccard:.2f}"
    x, y = " ".join(wa), " ".join(wb)
    if 2 * min(len(x), len(y)) / (len(x) + len(y)) < 1 - NEAR_DISTANCE:  # the ratio's upper bound
        return None
    matcher = SequenceMatcher(None, x, y, autojunk=False)
    if matcher.quick_ratio() < 1 - NEAR_DISTANCE:
        return None
    distance = 1 - matcher.ratio()
    return f"distance {distance:.2f}" if distance <= NEAR_DISTANCE else None


def test_near_duplicate_tells_a_template_from_a_new_sentence() -> None:
    """The measure below: a swapped slot or a respelling is a near-duplicate; a reworded sentence and a short greeting are not."""
    assert near_duplicate("they forgot the fries", "they forgot the rice")
    assert near_duplicate("thank u so much!!", "Thank you so much!")
    assert near_duplicate("I received somebody else's food", "i received someone else's food")
    assert not near_duplicate("this bag was meant for another customer", "I received someone else's food")
    assert not near_duplicate("hi", "hii")


def test_the_sample_has_no_templated_near_duplicates() -> None:
    """No held-out utterance is a near-duplicate of a training one (of any intent: it would
    measure memory, not generalisation), and no two training utterances of one intent are
    near-duplicates (padding, not data). Across intents, training pairs such as "repeat my last
    order" / "rate my last order" are kept: they teach the difference."""
    trained = load_sample_examples()
    found = [
        f"held-out {h['text']!r} ~ training {t['text']!r} ({why})"
        for h in held_out()
        for t in trained
        if (why := near_duplicate(h["text"], t["text"]))
    ]
    found += [
        f"training {a['text']!r} ~ {b['text']!r} ({a['intent']}: {why})"
        for a, b in itertools.combinations(trained, 2)
        if a["intent"] == b["intent"] and (why := near_duplicate(a["text"], b["text"]))
    ]
    assert found == [], "\n".join(found)


def test_default_nlu_train_scores_on_the_held_out_set(models: dict[int, IntentModel]) -> None:
    """Mean accuracy over three seeds on the held-out utterances is at least 0.85."""
    examples = held_out()
    accuracy = {
        seed: sum(m.predict(e["text"])["intent"] == e["intent"] for e in examples) / len(examples)
        for seed, m in models.items()
    }
    mean = sum(accuracy.values()) / len(accuracy)
    print(f"\nheld-out accuracy per seed {accuracy}, mean {mean:.3f}")
    assert mean >= 0.85, accuracy


def test_readme_example_comes_back_right_and_sure(models: dict[int, IntentModel]) -> None:
    """The README's predict example (not in the sample) is track_order at confidence >= 0.7,
    with its order id found, whatever the seed."""
    text = readme_example()
    assert key(text) not in {key(e["text"]) for e in load_sample_examples()}
    for seed, model in models.items():
        got = model.predict(text)
        assert got["intent"] == "track_order" and got["confidence"] >= 0.7, (seed, got)
        assert [(s["entity"], s["value"]) for s in got["entities"]] == [("order_id", "#48213")], got
