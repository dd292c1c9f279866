"""The intent model: TF-IDF word and character n-grams and a linear classifier trained by epochs.

``train`` fits the model epoch by epoch (``SGDClassifier.partial_fit``, modified Huber loss, so
``predict_proba`` gives a confidence) on a stratified training split and reports each epoch's
loss and validation accuracy through ``emit``. ``fine_tune`` starts from a trained model and may
add intents. A model is saved with skops as ``model.skops`` beside ``metrics.json``
(``modelfile``: no pickle, so a model file can never run code on the machine that loads it).

Everything here runs in a trainer's child process (or, for ``predict``, in the predictor's
child process, ``predictor.py``); it never touches the event loop, and the server never imports
it: scikit-learn and numpy stay out of the server's memory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelRefused
from . import modelfile
from .entities import EntityExtractor
from .eta import Eta, save_seconds
from .features import (
    CHAR_MIN_DF,
    CHAR_NGRAMS,
    WORD_NGRAMS,
    TrainingDataError,
    check_examples,
    normalize,
    usable_features,
)
from .modelfile import FORMAT_VERSION, MODEL_FILE

METRICS_FILE = "metrics.json"

Emit = Callable[..., None]

__all__ = ["IntentModel", "normalize", "train"]


@dataclass
class IntentModel:
    vectorizer: Any
    classifier: Any
    entities: EntityExtractor
    intents: list[str]
    trained_at: int
    meta: dict[str, Any]

    def predict(self, text: str, top: int = 5) -> dict[str, Any]:
        x = self.vectorizer.transform([normalize(text)])
        proba = self.classifier.predict_proba(x)[0]
        order = np.argsort(proba)[::-1][:top]
        classes = self.classifier.classes_
        ranking = [{"intent": str(classes[i]), "confidence": round(float(proba[i]), 4)} for i in order]
        return {
            "text": text,
            "intent": ranking[0]["intent"],
            "confidence": ranking[0]["confidence"],
            "ranking": ranking,
            "entities": self.entities.extract(text),
        }

    def save(self, directory: Path) -> Path:
        """Write ``model.skops`` (``modelfile``): the scikit-learn parts through skops, the rest
        as plain JSON. Nothing of it is pickled, so loading it runs no code from the file."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / MODEL_FILE
        header = {
            "intents": self.intents,
            "trainedAt": self.trained_at,
            "entities": {
                "values": self.entities.values,
                "patterns": self.entities.patterns,
                "counts": self.entities.counts,
            },
            "meta": self.meta,
        }
        # The vocabularies (term -> column, most of a model) go in as plain JSON: as skops nodes,
        # one per term, they made the file 5 MB of schema and its load 10x slower than joblib's.
        fitted = [t for _, t in self.vectorizer.transformer_list]
        vocabularies = {name: t.__dict__.pop("vocabulary_") for name, t in self.vectorizer.transformer_list}
        try:
            members = {modelfile.VOCABULARY: json.dumps({k: {w: int(i) for w, i in v.items()} for k, v in vocabularies.items()})}
            modelfile.dump({"vectorizer": self.vectorizer, "classifier": self.classifier}, header, path, members)
        finally:
            for t, vocab in zip(fitted, vocabularies.values()):
                t.vocabulary_ = vocab
        return path

    @staticmethod
    def load(directory: Path) -> IntentModel:
        """Rebuild a model from ``directory/model.skops``. ``ModelRefused`` (nothing in the file
        was run) for a pickle, a type outside ``modelfile.TRUSTED``, another format or
        scikit-learn version."""
        path = modelfile.model_file(directory)
        parts, header = modelfile.load_parts(path)
        vocabularies = modelfile.read_vocabularies(path)
        for name, t in getattr(parts["vectorizer"], "transformer_list", None) or []:
            if name not in vocabularies:
                raise ModelRefused(f"{path.name} has no vocabulary for its {name!r} features")
            t.vocabulary_ = vocabularies[name]
        ents = header.get("entities") or {}
        return IntentModel(
            vectorizer=parts["vectorizer"],
            classifier=parts["classifier"],
            entities=EntityExtractor(
                values=dict(ents.get("values") or {}),
                patterns=dict(ents.get("patterns") or {}),
                counts=dict(ents.get("counts") or {}),
            ),
            intents=list(header.get("intents") or []),
            trained_at=int(header.get("trainedAt") or 0),
            meta=dict(header.get("meta") or {}),
        )


def _vectorizer(kinds: list[str]) -> Any:
    """Word and character TF-IDF features; ``kinds`` (from ``features.usable_features``) leaves
    out a kind that would learn nothing from this data (scikit-learn would refuse to fit it)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import FeatureUnion

    parts = {
        "words": TfidfVectorizer(ngram_range=WORD_NGRAMS, sublinear_tf=True, dtype=np.float32),
        "chars": TfidfVectorizer(
            analyzer="char_wb", ngram_range=CHAR_NGRAMS, sublinear_tf=True, min_df=CHAR_MIN_DF, dtype=np.float32
        ),
    }
    return FeatureUnion([(k, parts[k]) for k in ("words", "chars") if k in kinds])


def auto_alpha(n_train: int) -> float:
    """Regularisation by data size: small sets (hundreds of examples) need much more of it."""
    return float(min(1e-2, max(1e-4, 1.0 / max(n_train, 1))))


def split(
    texts: list[str], labels: list[str], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Stratified train/validation indices. Intents with one example stay in training."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    train: list[int] = []
    val: list[int] = []
    for idx in by_label.values():
        idx = list(rng.permutation(idx))
        n_val = round(len(idx) * fraction) if fraction > 0 else 0
        n_val = min(n_val, len(idx) - 1)
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return sorted(train), sorted(val)


def _loss(clf: Any, X: Any, y: np.ndarray, rng: np.random.Generator, cap: int = 4000) -> float:
    """The objective SGD minimises, on (a sample of) the training split: the mean one-vs-rest
    modified Huber loss plus the L2 penalty ``alpha / 2 * |w|^2`` (averaged over the classes).

    The penalty belongs in it: without it the figure rises again once the weights have fitted
    the training split and the regularisation starts shrinking them, which reads as
    divergence while the model is in fact converging."""
    if X.shape[0] > cap:
        pick = rng.choice(X.shape[0], cap, replace=False)
        X, y = X[pick], y[pick]
    scores = clf.decision_function(X)
    if scores.ndim == 1:
        scores = np.stack([-scores, scores], axis=1)
    target = np.where(clf.classes_[None, :] == y[:, None], 1.0, -1.0)
    z = target * scores
    loss = np.where(z >= 1, 0.0, np.where(z >= -1, (1 - z) ** 2, -4 * z))
    penalty = 0.5 * clf.alpha * float(np.mean(np.einsum("ij,ij->i", clf.coef_, clf.coef_)))
    return float(loss.mean()) + penalty


def _scores(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, f1_score

    if not y_true:
        return {}
    per = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
        "macroF1": round(float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)), 4),
        "perIntentF1": {lab: round(float(f), 4) for lab, f in zip(labels, per)},
    }


def train(
    examples: list[dict[str, Any]],
    params: dict[str, Any],
    emit: Emit,
    out_dir: Path | None,
    base: IntentModel | None = None,
) -> dict[str, Any]:
    """Train (or, with ``base``, fine-tune) and save a model; returns the final metrics.

    ``emit(progress, message, metrics=..., eta=...)`` follows the seed's steps with real work;
    ``emit.log(line)``, where the emitter has it, writes the job's log: the data, one line per
    epoch, the final scores. Data it cannot learn from raises ``TrainingDataError``.
    """
    import skops.io  # noqa: F401 - the save needs it: its import (~1 s) is paid before any ETA is given
    from sklearn.linear_model import SGDClassifier

    # The job's log, as its stdout: what the trainer says it did (jobs logs prints it on stdout).
    emit_log = getattr(emit, "log", None)

    def log(line: str) -> None:
        if emit_log is not None:
            emit_log(line, "stdout")

    started = time.monotonic()
    epochs: int = params["epochs"]
    seed: int = params["seed"]
    rng = np.random.default_rng(seed)

    emit(5, "Preprocessing data...")
    if base is None:
        check_examples(examples)
    texts = [normalize(e["text"]) for e in examples]
    labels = [e["intent"] for e in examples]
    train_idx, val_idx = split(texts, labels, params["validationFraction"], seed)
    train_texts = [texts[i] for i in train_idx]
    if base is None:
        kinds = usable_features(train_texts)
        if not kinds:
            raise TrainingDataError(
                "the training split gives nlu-train nothing to learn from: no word of 2 or more "
                "letters or digits, and no two examples share a run of 2-5 characters"
            )
        vectorizer = _vectorizer(kinds)
        X_train = vectorizer.fit_transform(train_texts)
    else:
        vectorizer = base.vectorizer
        X_train = vectorizer.transform(train_texts)
    y_train = np.array([labels[i] for i in train_idx])
    X_val = vectorizer.transform([texts[i] for i in val_idx]) if val_idx else None
    y_val = [labels[i] for i in val_idx]
    classes = sorted(set(labels) | (set(base.intents) if base is not None else set()))
    if len(classes) < 2:
        raise TrainingDataError(f"the data has examples of one intent only ({classes[0]!r}); at least 2 are needed")
    emit(
        15,
        f"Preprocessed {len(examples)} examples: {len(train_idx)} to train, {len(val_idx)} to validate, "
        f"{len(classes)} intents, {X_train.shape[1]} features",
    )
    log(_describe_data(examples, labels, len(train_idx), len(val_idx), X_train.shape[1], base))

    before: dict[str, Any] = {}
    if base is not None and X_val is not None:
        before = _scores(y_val, [str(p) for p in base.classifier.predict(X_val)], sorted(set(y_val)))

    alpha = params.get("alpha") or auto_alpha(len(train_idx))
    clf = SGDClassifier(loss="modified_huber", alpha=alpha, random_state=seed)
    if base is not None:
        _warm_start(clf, base.classifier, classes, X_train, y_train)
    history: list[dict[str, Any]] = []
    eta = Eta(epochs)
    for epoch in range(1, epochs + 1):
        t_epoch = time.monotonic()
        order = rng.permutation(X_train.shape[0])
        clf.partial_fit(X_train[order], y_train[order], classes=np.array(classes))
        metrics: dict[str, Any] = {"epoch": epoch, "epochs": epochs, "loss": round(_loss(clf, X_train, y_train, rng), 5)}
        t_val = time.monotonic()
        if X_val is not None:
            metrics["valAccuracy"] = round(float(np.mean(clf.predict(X_val) == np.array(y_val))), 4)
        now = time.monotonic()
        if epoch == 1:  # the save's cost, once the weights exist (outside the timed epochs)
            eta.save = save_seconds(vectorizer, clf)
        eta.epoch_done(now - t_epoch, validation=now - t_val)
        history.append(metrics)
        line = f"epoch {epoch}/{epochs}: loss {metrics['loss']:.5f}"
        if "valAccuracy" in metrics:
            line += f", valAccuracy {metrics['valAccuracy']:.4f}"
        log(f"{line} ({now - t_epoch:.2f} s)")
        emit(
            15 + 55 * epoch / epochs,
            f"Training intent classifier... epoch {epoch}/{epochs}",
            metrics=metrics,
            eta=round(eta.left(), 2),
        )

    train_examples = [examples[i] for i in train_idx]
    n_spans = sum(len(e.get("entities") or []) for e in train_examples)
    emit(72, f"Training entity extractor... ({n_spans} annotated spans)" if n_spans else "Training entity extractor... (no annotations)")
    extractor = EntityExtractor.fit(train_examples)
    if base is not None:
        merged = dict(base.entities.values)
        merged.update(extractor.values)
        extractor.values = merged
        for ent, pats in base.entities.patterns.items():
            extractor.patterns.setdefault(ent, [])
            extractor.patterns[ent] = list(dict.fromkeys(extractor.patterns[ent] + pats))[:20]
        extractor._compiled = None

    emit(85, "Validating model...")
    final: dict[str, Any] = {"examples": len(examples), "intents": len(classes), "epochs": epochs, "alpha": alpha}
    if X_val is not None:
        scores = _scores(y_val, [str(p) for p in clf.predict(X_val)], sorted(set(y_val)))
        final.update(scores)
        final["validationSize"] = len(val_idx)
        val_examples = [examples[i] for i in val_idx]
        if any(e.get("entities") for e in val_examples):
            final["entityScores"] = extractor.evaluate(val_examples)
    if history:
        final["loss"] = history[-1]["loss"]
    if base is not None:
        final["before"] = {k: v for k, v in before.items() if k != "perIntentF1"}
        final["after"] = {k: final[k] for k in ("accuracy", "macroF1") if k in final}
        final["newIntents"] = sorted(set(labels) - set(base.intents))
        final["baseJobId"] = params.get("baseJobId")
    for line in _describe_scores(final):
        log(line)

    emit(95, "Saving model...")
    model = IntentModel(
        vectorizer=vectorizer,
        classifier=clf,
        entities=extractor,
        intents=classes,
        trained_at=int(time.time() * 1000),
        meta={"format": FORMAT_VERSION, "params": params, "history": history},
    )
    final["trainSeconds"] = round(time.monotonic() - started, 3)
    if out_dir is not None:
        path = model.save(out_dir)
        final["modelBytes"] = path.stat().st_size
        (out_dir / METRICS_FILE).write_text(json.dumps(final, indent=2))
    saved = f", model saved ({final['modelBytes'] / 1e6:.1f} MB)" if "modelBytes" in final else ""
    log(f"done in {time.monotonic() - started:.2f} s{saved}")
    return final


def _describe_data(
    examples: list[dict[str, Any]], labels: list[str], n_train: int, n_val: int, n_features: int, base: IntentModel | None
) -> str:
    """The job log's first line: what the model is trained on."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    spans: dict[str, int] = {}
    for ex in examples:
        for span in ex.get("entities") or []:
            spans[span["entity"]] = spans.get(span["entity"], 0) + 1
    line = (
        f"data: {len(examples)} examples of {len(counts)} intents "
        f"({min(counts.values())}-{max(counts.values())} each), {n_train} to train, {n_val} to validate; "
        f"{n_features} features"
    )
    if spans:
        line += f"; {sum(spans.values())} entity spans ({', '.join(f'{k} {v}' for k, v in sorted(spans.items()))})"
    if base is not None:
        new = sorted(set(counts) - set(base.intents))
        line += f"; base model knows {len(base.intents)} intents, new here: {', '.join(new) or 'none'}"
    return line


def _describe_scores(final: dict[str, Any]) -> list[str]:
    """The job log's closing lines: the scores on the validation split."""
    if "accuracy" not in final:
        return ["final: no validation split (validationFraction 0), so no scores"]
    line = f"final: accuracy {final['accuracy']:.4f}, macroF1 {final['macroF1']:.4f} on {final['validationSize']} examples"
    ents = final.get("entityScores")
    if ents:
        line += f"; entities precision {ents['precision']:.4f}, recall {ents['recall']:.4f}, F1 {ents['f1']:.4f}"
    lines = [line]
    weakest = sorted(final["perIntentF1"].items(), key=lambda kv: kv[1])[:3]
    if weakest and weakest[0][1] < 1:
        lines.append("weakest intents (F1): " + ", ".join(f"{k} {v:.2f}" for k, v in weakest))
    if "before" in final:
        b, a = final["before"], final["after"]
        if "accuracy" in b and "accuracy" in a:
            lines.append(f"fine-tune: accuracy {b['accuracy']:.4f} before, {a['accuracy']:.4f} after")
    return lines


def _warm_start(clf: Any, old: Any, classes: list[str], X: Any, y: np.ndarray) -> None:
    """Give ``clf`` the base model's weights for the intents it knew; new intents start at 0."""
    clf.partial_fit(X[:1], y[:1], classes=np.array(classes))
    if clf.coef_.shape[0] != len(clf.classes_) or old.coef_.shape[0] != len(old.classes_):
        return  # a two-class model has one weight row; start fresh rather than guess
    old_index = {str(c): i for i, c in enumerate(old.classes_)}
    for row, c in enumerate(clf.classes_):
        j = old_index.get(str(c))
        if j is not None:
            clf.coef_[row] = old.coef_[j]
            clf.intercept_[row] = old.intercept_[j]
        else:
            clf.coef_[row] = 0.0
            clf.intercept_[row] = 0.0
    clf.t_ = max(getattr(old, "t_", 1.0), 1.0)
