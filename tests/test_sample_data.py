"""The shipped sample data set, measured the way a user meets it: the default ``nlu-train`` on
``food-delivery-sample``, scored on utterances written apart from it
(``fixtures/food_delivery_heldout.jsonl``, never trained on), and the README's predict example.

In-process (``nlu.model.train``, the trainer's own code): a model takes well under a second.
"""

from __future__ import annotations

import json
import re
from collections import Counter
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
