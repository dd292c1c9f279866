"""Examples shared by the trainer tests: an intent the sample data set does not have."""

from __future__ import annotations

import random

# tip_driver: fine-tune tests add it to a model trained on the food-delivery sample.
TIP_UTTERANCES = [
    "I want to tip my driver",
    "add a tip for the delivery guy",
    "can I leave a tip for the rider",
    "tip the driver five dollars",
    "how do I give my courier a tip",
    "I'd like to add a gratuity for the driver",
    "give the delivery person a tip please",
    "increase the tip for my rider",
    "add 3 dollars tip to the driver",
    "leave a bigger tip for the courier",
    "tip my delivery driver",
    "want to tip the rider extra",
    "add gratuity for delivery",
    "let me tip the driver",
]


def synthetic_examples(n: int, intents: int = 40, seed: int = 0) -> list[dict[str, str]]:
    """``n`` random utterances over ``intents`` labels (nlu-train takes ~80 ms an epoch on 6000)."""
    rnd = random.Random(seed)
    words = [f"w{i}" for i in range(2000)]
    return [
        {"text": " ".join(rnd.choices(words, k=12)), "intent": f"intent{rnd.randrange(intents)}"}
        for _ in range(n)
    ]
