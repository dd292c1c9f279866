"""The model file: ``model.skops``, a zip that loads without running any code from it.

A joblib/pickle file runs whatever its author wrote when it is loaded, and a model may come
from a remote worker, so models are stored with skops (``skops.io``) instead: its loader
rebuilds only the types it is told to trust and refuses a file that names any other.

One file holds a model:

* the skops members (``schema.json`` and the arrays): ``{"vectorizer": FeatureUnion,
  "classifier": SGDClassifier}``, the only scikit-learn objects an ``IntentModel`` has;
* ``mangwale.json``, plain JSON that needs nothing to read: the format version, the
  scikit-learn and skops versions the model was built with, and the rest of the model (intents,
  the entity extractor's gazetteer and patterns, training metadata);
* ``vocabulary.json``, plain JSON: each vectorizer's ``vocabulary_`` (term to column), kept out
  of the skops tree because skops writes one schema node per term (slow to read and audit).

``read_header`` and ``check_header`` use only ``zipfile`` and ``json``, so the server can
refuse a model of another format or scikit-learn version (409 ``incompatible_model``) without
importing scikit-learn. ``load_parts`` and ``audit`` import skops and run where scikit-learn
already is: the trainers' and the predictor's child processes.

``TRUSTED`` is the complete list of non-builtin types an intent model is made of. It was
computed once from a model built by ``nlu.model.train`` (word and character TF-IDF, SGD
classifier): ``skops.io.get_untrusted_types`` (empty under skops 0.16, which trusts every
scikit-learn estimator) plus every type its ``schema.json`` names, and reviewed by hand; a test
(tests/test_models.py) builds a model and fails when the list no longer matches. Nothing a file
or a user says is ever added to it: ``audit`` refuses a file that names any type outside it.
"""

from __future__ import annotations

import json
import os
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import ModelRefused

MODEL_FILE = "model.skops"
LEGACY_FILE = "model.joblib"  # what earlier versions saved: a pickle, never loaded any more
HEADER = "mangwale.json"
VOCABULARY = "vocabulary.json"  # the vectorizers' term -> column maps, by feature kind
FORMAT = "mangwale-intent-model"
FORMAT_VERSION = 2  # 1 was the joblib pickle

#: The scikit-learn and numpy types of an intent model, passed to ``skops.io.load(trusted=...)``.
TRUSTED: list[str] = [
    "numpy.float32",  # the vectorizers' ``dtype``
    "numpy.ndarray",
    "sklearn.feature_extraction.text.TfidfTransformer",
    "sklearn.feature_extraction.text.TfidfVectorizer",
    "sklearn.linear_model._sgd_fast.ModifiedHuber",
    "sklearn.linear_model._stochastic_gradient.SGDClassifier",
    "sklearn.pipeline.FeatureUnion",
]
#: Plain values skops writes as JSON or containers.
PLAIN: list[str] = [f"builtins.{t}" for t in ("dict", "list", "tuple", "str", "int", "float", "bool", "NoneType")]
#: Every type a model file may name: skops trusts all of scikit-learn's estimators by default
#: (0.16), which is more than an intent model needs; ``audit`` holds a file to this list.
ALLOWED = frozenset(TRUSTED + PLAIN)


def versions() -> dict[str, str]:
    """The scikit-learn and skops versions installed here (read from package metadata: importing
    scikit-learn to ask would cost the server 100 MB)."""
    return {"sklearn": metadata.version("scikit-learn"), "skops": metadata.version("skops")}


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a model file; ``ModelRefused`` for anything that is not one (a pickle,
    a zip without the header, a header of an unknown format)."""
    try:
        with zipfile.ZipFile(path) as zf:
            if HEADER not in zf.namelist() or "schema.json" not in zf.namelist():
                raise ModelRefused(f"{path.name} is not a mangwale model file (no {HEADER} or schema.json in it)")
            if zf.getinfo(HEADER).file_size > 16 * 1024 * 1024:
                raise ModelRefused(f"{path.name}: its {HEADER} is implausibly large")
            header = json.loads(zf.read(HEADER))
    except (zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError):
        raise ModelRefused(
            f"{path.name} is not a mangwale model file (models are skops zip files; "
            "pickles and joblib files are never loaded)"
        ) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelRefused(f"{path.name} is not a mangwale intent model (its header names no {FORMAT!r})")
    return header


def check_header(header: dict[str, Any], here: dict[str, str] | None = None) -> None:
    """Refuse a model of another format version or built under another scikit-learn: its
    objects would be rebuilt against classes whose attributes may have changed, and predict
    wrong or crash instead of saying why."""
    here = here or versions()
    version = header.get("formatVersion")
    if version != FORMAT_VERSION:
        raise ModelRefused(
            f"the model is in format version {version}, this server reads version {FORMAT_VERSION}; "
            "retrain it with this server"
        )
    built = header.get("sklearn")
    if built != here["sklearn"]:
        raise ModelRefused(
            f"the model was built with scikit-learn {built}, this server has scikit-learn "
            f"{here['sklearn']}; retrain it here, or serve it from a server with scikit-learn {built}"
        )


def model_file(directory: Path) -> Path:
    """The model in a job's directory; ``ModelRefused`` naming the way out for a model saved by
    an older mangwale as a pickle (``model.joblib``)."""
    path = directory / MODEL_FILE
    if not path.is_file() and (directory / LEGACY_FILE).is_file():
        raise legacy_refusal(directory.name)
    return path


def legacy_refusal(job_id: str) -> ModelRefused:
    return ModelRefused(
        f"job {job_id}'s model was saved by an older mangwale as a pickle (model.joblib), which "
        "this version never loads (a pickle runs code when it is loaded); retrain it: "
        f"mangwale jobs create nlu-train -d DATASET, or fine-tune from a retrained job",
        code="legacy_model",
    )


def check_file(path: Path) -> dict[str, Any]:
    """Header checks of ``path`` (no scikit-learn needed); returns the header."""
    header = read_header(path)
    check_header(header)
    return header


def dump(parts: dict[str, Any], header: dict[str, Any], path: Path, members: dict[str, str] | None = None) -> None:
    """Write ``parts`` (scikit-learn objects), ``header`` and ``members`` (JSON texts by member
    name) to ``path`` atomically and durably: a temp file, fsynced, renamed in."""
    import skops.io

    tmp = path.with_name(path.name + ".tmp")
    skops.io.dump(parts, tmp, compression=zipfile.ZIP_DEFLATED, compresslevel=3)
    full = {"format": FORMAT, "formatVersion": FORMAT_VERSION, **versions(), **header}
    with zipfile.ZipFile(tmp, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=3) as zf:
        for name, text in (members or {}).items():
            zf.writestr(name, text)
        zf.writestr(HEADER, json.dumps(full))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def audit(path: Path, *, skops_audit: bool = True) -> dict[str, Any]:
    """Everything but building the objects: the header checks, the types the schema names
    (only ``ALLOWED``) and, with ``skops_audit``, skops's own audit (``load_parts`` leaves it to
    ``skops.io.load``, which runs it again). Returns the header."""
    import skops.io

    header = check_file(path)
    try:
        named = schema_types(path)
        untrusted = skops.io.get_untrusted_types(file=path) if skops_audit else []
    except Exception as exc:  # noqa: BLE001 - a malformed schema raises anything
        raise ModelRefused(f"{path.name} is not a readable skops file ({type(exc).__name__}: {exc})") from None
    unknown = sorted((set(untrusted) | named) - ALLOWED)
    if unknown:
        raise ModelRefused(f"{path.name} holds types a mangwale model never has: {', '.join(unknown)}")
    if skops_audit:
        read_vocabularies(path)
    return header


def schema_types(path: Path) -> set[str]:
    """Every ``module.Class`` the skops schema of ``path`` names, at any depth."""
    with zipfile.ZipFile(path) as zf:
        schema = json.loads(zf.read("schema.json"))
    found: set[str] = set()
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "__class__" in node or "__module__" in node:
                found.add(f"{node.get('__module__')}.{node.get('__class__')}")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def read_vocabularies(path: Path) -> dict[str, dict[str, int]]:
    """The ``vocabulary.json`` member: ``{kind: {term: column}}``, checked to be just that."""
    try:
        with zipfile.ZipFile(path) as zf:
            data = json.loads(zf.read(VOCABULARY))
    except (KeyError, zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError):
        raise ModelRefused(f"{path.name} has no readable {VOCABULARY}") from None
    ok = isinstance(data, dict) and all(
        isinstance(v, dict) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(v) for i in v.values())
        for v in data.values()
    )
    if not ok:
        raise ModelRefused(f"{path.name}: {VOCABULARY} is not a map of terms to columns")
    return data


def load_parts(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The scikit-learn parts and the header of a model file, after ``audit``."""
    import skops.io

    header = audit(path, skops_audit=False)
    try:
        parts = skops.io.load(path, trusted=TRUSTED)
    except Exception as exc:  # noqa: BLE001 - skops refuses with several exception types
        raise ModelRefused(f"{path.name} could not be loaded ({type(exc).__name__}: {exc})") from None
    if not isinstance(parts, dict) or not {"vectorizer", "classifier"} <= parts.keys():
        raise ModelRefused(f"{path.name} is not a mangwale intent model (no vectorizer and classifier)")
    return parts, header
