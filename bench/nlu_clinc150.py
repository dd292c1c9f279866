#!/usr/bin/env python3
"""Benchmark the built-in ``nlu-train`` model on CLINC150 (in-scope intents).

Trains on train + val, measures on test, exactly as the trainer runs (same code path,
``mangwale_cli.nlu.model.train``), and prints a table and writes JSON. The data set is not in
the repository: pass ``--data`` or keep ``../shared/data/clinc150/data_full.json`` beside the
checkout. Without it the script says so and exits 0 (nothing to measure).

    python bench/nlu_clinc150.py [--data PATH] [--epochs 8] [--out bench/results/nlu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "clinc150" / "data_full.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--validation-fraction", type=float, default=0.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "nlu_clinc150.json")
    args = ap.parse_args()
    if not args.data.is_file():
        print(f"CLINC150 not found at {args.data}; nothing to measure")
        return 0
    sys.path.insert(0, str(ROOT))
    from sklearn.metrics import accuracy_score, f1_score

    from mangwale_cli.nlu.model import IntentModel, normalize, train

    raw = json.loads(args.data.read_text())
    examples = [{"text": t, "intent": i} for t, i in raw["train"] + raw["val"]]
    test = raw["test"]
    epochs_seen: list[dict] = []

    def emit(progress, message=None, metrics=None, eta=None):
        if metrics:
            epochs_seen.append(metrics)

    params = {"epochs": args.epochs, "seed": args.seed, "validationFraction": args.validation_fraction, "alpha": None}
    out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"mangwale-bench-{os.getpid()}"
    t0 = time.monotonic()
    final = train(examples, params, emit, out_dir)
    wall = time.monotonic() - t0
    model = IntentModel.load(out_dir)
    X = model.vectorizer.transform([normalize(t) for t, _ in test])
    y = [i for _, i in test]
    t1 = time.monotonic()
    pred = model.classifier.predict(X)
    predict_s = time.monotonic() - t1
    acc = float(accuracy_score(y, pred))
    f1 = float(f1_score(y, pred, average="macro"))
    result = {
        "dataset": "CLINC150 in-scope (train+val -> test)",
        "trainExamples": len(examples),
        "testExamples": len(test),
        "epochs": args.epochs,
        "testAccuracy": round(acc, 4),
        "testMacroF1": round(f1, 4),
        "trainSeconds": round(wall, 2),
        "predictMsPerUtterance": round(1000 * predict_s / len(test), 4),
        "modelBytes": final.get("modelBytes"),
        "epochsSeen": epochs_seen,
        "cpuCount": os.cpu_count(),
    }
    print(f"{'metric':<28}{'value':>12}")
    for k in ("trainExamples", "testExamples", "epochs", "testAccuracy", "testMacroF1", "trainSeconds", "predictMsPerUtterance", "modelBytes"):
        print(f"{k:<28}{result[k]!s:>12}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    ok = acc >= 0.93 and wall <= 20
    print("target (accuracy >= 0.93, <= 20 s):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
