"""A mangwale command trainer: learns word -> intent counts, one progress report per epoch."""

import collections
import json
import os
import pathlib
import time

params = json.loads(os.environ["MANGWALE_PARAMS"])  # the job's params, a JSON object
epochs, pause = int(params.get("epochs", 3)), float(params.get("secondsPerEpoch", 0.2))
data = pathlib.Path(os.environ["MANGWALE_DATASET"]).read_text(encoding="utf-8")  # JSON Lines
examples = [json.loads(line) for line in data.splitlines()]  # {"text", "intent", "entities"?}
print(f"loaded {len(examples)} examples")  # not a JSON report: a log line
words = collections.defaultdict(collections.Counter)
for epoch in range(1, epochs + 1):
    for e in examples[epoch - 1 :: epochs]:  # each epoch learns one slice of the data
        for w in e["text"].lower().split():
            words[w][e["intent"]] += 1
    time.sleep(pause)  # stands in for real work
    metrics = {"epoch": epoch, "epochs": epochs, "vocabulary": len(words)}
    report = {"progress": 100 * epoch / epochs, "message": f"epoch {epoch}/{epochs}"}
    print(json.dumps({**report, "metrics": metrics, "eta": round((epochs - epoch) * pause, 2)}))
model = {w: c.most_common(1)[0][0] for w, c in words.items()}
pathlib.Path(os.environ["MANGWALE_OUTPUT_DIR"], "model.json").write_text(json.dumps(model))
