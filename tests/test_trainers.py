"""Trainers in-process: params validation, the NLU model and entity extractor, and the
operator's command trainers (config validation, the progress protocol, one supervised run).

Runs in this process or through the in-process app (``api``); what needs a real server
(kill -9, cancel, timeouts, live events) is in test_training_process.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from fastapi.testclient import TestClient
from trainingdata import TIP_UTTERANCES

from mangwale_cli.datafile import load_sample_examples
from mangwale_cli.errors import ConfigError, InvalidInput
from mangwale_cli.nlu.entities import EntityExtractor, shape_pattern
from mangwale_cli.nlu.model import IntentModel, train
from mangwale_cli.settings import Settings, load
from mangwale_cli.trainers import Registry, builtin
from mangwale_cli.trainers.base import TrainingContext
from mangwale_cli.trainers.command import (
    MAX_PARAMS_BYTES,
    CommandFailed,
    CommandTrainer,
    command_trainers,
    parse_spec,
)
from mangwale_cli.trainers.nlu import NluTrainer
from mangwale_cli.trainers.supervisor import Report, parse_report
from mangwale_cli.wire import Dataset, Job

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "examples"


def assert_invalid(resp: Any, field: str) -> None:
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["field"] == field, err
    assert field in err["message"] or field.removeprefix("params.") in err["message"], err


# --- params ------------------------------------------------------------------------------------

BAD_PARAMS = [
    # (kind, params, field)
    ("nlu-train", {"epochs": 0}, "params.epochs"),
    ("nlu-train", {"epochs": 201}, "params.epochs"),
    ("nlu-train", {"epochs": "many"}, "params.epochs"),
    ("nlu-train", {"epochs": 2.5}, "params.epochs"),
    ("nlu-train", {"validationFraction": 0.9}, "params.validationFraction"),
    ("nlu-train", {"validationFraction": True}, "params.validationFraction"),
    ("nlu-train", {"seed": -1}, "params.seed"),
    ("nlu-train", {"alpha": 0}, "params.alpha"),
    ("nlu-train", {"learningRate": 0.1}, "params.learningRate"),
    ("fine-tune", {}, "params.baseJobId"),
    ("fine-tune", {"baseJobId": 42}, "params.baseJobId"),
    ("fine-tune", {"baseJobId": "job-0-nope", "epochs": 0}, "params.epochs"),
    ("simulate", {"steps": 0}, "params.steps"),
    ("simulate", {"stepMs": "fast"}, "params.stepMs"),
    ("simulate", {"failAt": 0}, "params.failAt"),
]


@pytest.mark.parametrize(
    ("kind", "params", "field"), BAD_PARAMS, ids=[f"{k}-{f}-{p}" for k, p, f in BAD_PARAMS]
)
def test_bad_params_are_422_naming_the_field(
    api: TestClient, kind: str, params: dict[str, Any], field: str
) -> None:
    """A bad param value is a 422 whose error names params.<field>, and no job is created."""
    sample = api.get("/training/datasets").json()[0]["id"]
    body: dict[str, Any] = {"kind": kind, "params": params}
    if kind != "simulate":
        body["datasetId"] = sample
    assert_invalid(api.post("/training/jobs", json=body), field)
    assert api.get("/training/jobs").json() == []


def test_fine_tune_of_an_unknown_base_job_is_404(api: TestClient) -> None:
    """A baseJobId naming no job is a 404 naming params.baseJobId, as an unknown datasetId is."""
    sample = api.get("/training/datasets").json()[0]["id"]
    body = {"kind": "fine-tune", "datasetId": sample, "params": {"baseJobId": "job-0-nope"}}
    resp = api.post("/training/jobs", json=body)
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"]["field"] == "params.baseJobId"
    assert api.get("/training/jobs").json() == []


def test_fine_tune_base_must_be_a_succeeded_model_job(api: TestClient) -> None:
    """fine-tune refuses a base job without a model: 422 naming params.baseJobId."""
    sample = api.get("/training/datasets").json()[0]["id"]
    sim = api.post(
        "/training/jobs", json={"kind": "simulate", "params": {"steps": 1, "stepMs": 0}}
    ).json()
    resp = api.post(
        "/training/jobs",
        json={"kind": "fine-tune", "datasetId": sample, "params": {"baseJobId": sim["id"]}},
    )
    assert_invalid(resp, "params.baseJobId")
    assert "simulate" in resp.json()["error"]["message"]


UNUSABLE = [
    # (examples, what the 422 must say)
    ([{"text": "hi there", "intent": "greet"}, {"text": "hello", "intent": "greet"}], "at least 2 intents"),
    ([{"text": "a", "intent": "x"}, {"text": "b", "intent": "y"}, {"text": "?", "intent": "y"}], "nothing to learn"),
    ([{"text": "1", "intent": "x"}, {"text": "!", "intent": "y"}], "nothing to learn"),
]


@pytest.mark.parametrize(("examples", "says"), UNUSABLE, ids=["one-intent", "letters", "symbols"])
def test_nlu_train_on_data_it_cannot_learn_is_422_naming_the_dataset(
    api: TestClient, examples: list[dict[str, Any]], says: str
) -> None:
    """nlu-train on a dataset with one intent, or with text that yields no feature, is refused
    when the job is created: 422 naming datasetId, the dataset and what it lacks, in mangwale's
    words (never scikit-learn's), and no job is created."""
    ds = api.post("/training/datasets", json={"name": "tiny", "examples": examples}).json()
    resp = api.post("/training/jobs", json={"kind": "nlu-train", "datasetId": ds["id"]})
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["field"] == "datasetId" and err["code"] == "unusable_dataset", err
    assert says in err["message"] and "'tiny'" in err["message"] and ds["id"] in err["message"], err
    for sklearn_words in ("number of classes", "pruning", "vocabulary", "stop words"):
        assert sklearn_words not in err["message"]
    assert api.get("/training/jobs").json() == []


def test_features_account_agrees_with_scikit_learn() -> None:
    """What nlu.features says each feature kind keeps is what scikit-learn's vectorizers keep."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from mangwale_cli.nlu.features import CHAR_MIN_DF, CHAR_NGRAMS, normalize, usable_features

    corpora = [
        ["a", "b"], ["ab", "cd"], ["a b", "b c"], ["!", "?!"], ["x  y", "y"], ["hello there", "goodbye now"],
        ["ü", "ü"], ["12", "34"], ["a\tb", "ab"], ["?", "?"], ["ok", "ok ok"], ["abcdefgh", "bcdefghi"],
    ]
    for texts in corpora:
        texts = [normalize(t) for t in texts]
        kinds = usable_features(texts)
        for kind, vec in (
            ("words", TfidfVectorizer()),
            ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=CHAR_NGRAMS, min_df=CHAR_MIN_DF)),
        ):
            try:
                vec.fit(texts)
                fits = True
            except ValueError:
                fits = False
            assert (kind in kinds) == fits, (texts, kind, kinds)


def test_nlu_train_learns_from_the_features_the_data_has(tmp_path: Path) -> None:
    """Two-letter texts that share no character run train on their words alone (scikit-learn
    alone would stop at "After pruning, no terms remain")."""
    examples = [{"text": "ab", "intent": "x"}, {"text": "cd", "intent": "y"}] * 3
    params = NluTrainer().validate_params({"epochs": 2, "validationFraction": 0})
    train(examples, params, lambda *a, **k: None, tmp_path)
    assert IntentModel.load(tmp_path).predict("cd")["intent"] == "y"


def test_unlearnable_data_fails_the_job_in_mangwale_words() -> None:
    """Data that changed after the job was created fails it with the same words, alone: the
    job's error carries no exception class name and no scikit-learn message."""
    from mangwale_cli.nlu.features import TrainingDataError
    from mangwale_cli.trainers.process import describe_failure

    params = NluTrainer().validate_params({})
    with pytest.raises(TrainingDataError) as info:
        train([{"text": "hello", "intent": "greet"}] * 4, params, lambda *a, **k: None, None)
    assert describe_failure(info.value) == "the data set has examples only of intent 'greet'; nlu-train needs examples of at least 2 intents"
    assert describe_failure(KeyError("x")) == "KeyError: 'x'"


def test_declared_params_get_defaults() -> None:
    """nlu-train fills in its defaults and keeps the values it was given."""
    out = NluTrainer().validate_params({"epochs": 3})
    assert out == {"epochs": 3, "validationFraction": 0.1, "seed": 0, "alpha": None}


# --- the NLU model -------------------------------------------------------------------------------


def test_nlu_model_learns_the_sample_dataset(tmp_path: Path) -> None:
    """Training on the sample reports per-epoch metrics and saves a model that knows it."""
    examples = load_sample_examples()
    reports: list[tuple[float, str | None, dict[str, Any]]] = []

    def emit(progress: float, message: str | None = None, **extra: Any) -> None:
        reports.append((progress, message, extra))

    params = NluTrainer().validate_params({"epochs": 6})
    final = train(examples, params, emit, tmp_path)

    steps = [m for _, m, _ in reports]
    for step in (
        "Preprocessing data...",
        "Training intent classifier...",
        "Training entity extractor...",
        "Validating model...",
        "Saving model...",
    ):
        assert any(s and s.startswith(step) for s in steps), (step, steps)
    progress = [p for p, _, _ in reports]
    assert progress == sorted(progress) and progress[-1] < 100
    epochs = [extra for _, _, extra in reports if extra.get("metrics")]
    assert [e["metrics"]["epoch"] for e in epochs] == [1, 2, 3, 4, 5, 6]
    for e in epochs:
        assert set(e["metrics"]) >= {"epoch", "epochs", "loss", "valAccuracy"}
        assert e["metrics"]["loss"] >= 0 and 0 <= e["metrics"]["valAccuracy"] <= 1 and e["eta"] >= 0
    assert set(final) >= {"accuracy", "macroF1", "perIntentF1", "examples", "intents"}
    assert final["intents"] == 20 and len(final["perIntentF1"]) == 20
    assert final["accuracy"] > 0.4  # 20 intents: chance is 0.05

    model = IntentModel.load(tmp_path)
    right = sum(model.predict(e["text"])["intent"] == e["intent"] for e in examples[::10])
    assert right >= 0.9 * len(examples[::10])
    pizza = model.predict("I'd like to order a Margherita Pizza please")
    assert {"entity": "dish", "value": "Margherita Pizza"}.items() <= pizza["entities"][0].items()
    assert 0 < pizza["confidence"] <= 1 and pizza["ranking"][0]["intent"] == pizza["intent"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nlu_loss_falls_epoch_by_epoch_on_the_sample(seed: int) -> None:
    """The reported loss (what SGD minimises) never rises from one epoch to the next on the
    sample, and ends well below its epoch-3 value."""
    losses: list[float] = []

    def emit(progress: float, message: str | None = None, **extra: Any) -> None:
        if extra.get("metrics"):
            losses.append(extra["metrics"]["loss"])

    train(load_sample_examples(), NluTrainer().validate_params({"seed": seed}), emit, None)
    assert len(losses) == 8
    assert all(b <= a * 1.01 for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.8 * losses[2], losses


def test_nlu_train_writes_its_log(tmp_path: Path) -> None:
    """train() logs the data, one line per epoch and the final scores through emit.log."""
    lines: list[str] = []

    class Emit:
        def __call__(self, progress: float, message: str | None = None, **extra: Any) -> None:
            pass

        def log(self, line: str, stream: str = "trainer") -> None:
            lines.append(line)

    final = train(load_sample_examples(), NluTrainer().validate_params({"epochs": 4}), Emit(), tmp_path)
    assert lines[0].startswith("data: 917 examples of 20 intents (39-50 each), ") and "entity spans (" in lines[0]
    assert [ln.split(":")[0] for ln in lines[1:5]] == [f"epoch {i}/4" for i in range(1, 5)]
    assert lines[5] == (
        f"final: accuracy {final['accuracy']:.4f}, macroF1 {final['macroF1']:.4f} on {final['validationSize']} "
        f"examples; entities precision {final['entityScores']['precision']:.4f}, recall "
        f"{final['entityScores']['recall']:.4f}, F1 {final['entityScores']['f1']:.4f}"
    )
    assert lines[-1].startswith("done in ") and "model saved" in lines[-1]


def test_simulate_writes_its_log(api: TestClient) -> None:
    """simulate logs its plan and its end, or the step it failed at."""
    def logs(params: dict[str, Any]) -> list[str]:
        job = api.post("/training/jobs", json={"kind": "simulate", "params": params}).json()
        wait_for(
            lambda: api.get(f"/training/jobs/{job['id']}").json()["status"] in ("succeeded", "failed"),
            what="the simulate job to end",
        )
        return [e["line"] for e in api.get(f"/training/jobs/{job['id']}/logs").json()]

    ok = logs({"steps": 2, "stepMs": 1})
    assert ok[0] == "simulating 2 steps of 1 ms" and ok[1].startswith("done: 2 steps in ") and len(ok) == 2
    assert logs({"steps": 3, "stepMs": 1, "failAt": 2}) == [
        "simulating 3 steps of 1 ms, failing at step 2",
        "failing at step 2 of 3, as params.failAt asks",
    ]


def test_fine_tune_adds_an_intent_in_process(tmp_path: Path) -> None:
    """Fine-tuning on data with a new intent learns it and reports metrics before and after."""
    examples = load_sample_examples()
    params = NluTrainer().validate_params({"epochs": 4})
    train(examples, params, lambda *a, **k: None, tmp_path)
    base = IntentModel.load(tmp_path)
    tips = [{"text": t, "intent": "tip_driver"} for t in TIP_UTTERANCES]
    final = train(
        examples[::3] + tips,
        {**params, "baseJobId": "job-base"},
        lambda *a, **k: None,
        tmp_path / "tuned",
        base=base,
    )
    assert final["newIntents"] == ["tip_driver"] and final["intents"] == 21
    assert set(final["before"]) == {"accuracy", "macroF1"} and set(final["after"]) == {
        "accuracy",
        "macroF1",
    }
    tuned = IntentModel.load(tmp_path / "tuned")
    assert tuned.predict("please add a tip for my driver")["intent"] == "tip_driver"
    assert (
        tuned.predict("where is my order")["intent"] == base.predict("where is my order")["intent"]
    )




# --- the entity extractor ------------------------------------------------------------------------


def test_entity_extractor_learns_values_and_shapes() -> None:
    """Learned values match in any case, code-like values match by shape, longest match wins."""
    examples = [
        {
            "text": "order pad thai",
            "intent": "o",
            "entities": [{"start": 6, "end": 14, "value": "pad thai", "entity": "dish"}],
        },
        {
            "text": "order thai curry",
            "intent": "o",
            "entities": [{"start": 6, "end": 16, "value": "thai curry", "entity": "dish"}],
        },
        {
            "text": "where is ORD-1234",
            "intent": "t",
            "entities": [{"start": 9, "end": 17, "value": "ORD-1234", "entity": "order_id"}],
        },
        {
            "text": "from Thai House",
            "intent": "o",
            "entities": [{"start": 5, "end": 15, "value": "Thai House", "entity": "restaurant"}],
        },
    ]
    ext = EntityExtractor.fit(examples)
    found = ext.extract("PAD THAI from thai house, and where is ORD-9876?")
    assert [(e["value"], e["entity"], e["source"]) for e in found] == [
        ("PAD THAI", "dish", "gazetteer"),
        ("thai house", "restaurant", "gazetteer"),
        ("ORD-9876", "order_id", "pattern"),
    ]
    assert found[0]["start"] == 0 and found[0]["end"] == 8
    assert ext.extract("spad thaiX and ORD-12") == []  # no partial words, no wrong shapes
    assert shape_pattern("words only") is None
    assert ext.evaluate(examples) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


# --- command trainers: config --------------------------------------------------------------------


def spec_error(body: Any, kind: str = "my-train", base: Path = EXAMPLES_DIR) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_spec(kind, body, base_dir=base, where="test.toml")
    return info.value


PY = sys.executable
BAD_SPECS = [
    # (body, field)
    ({}, "trainers.my-train.command"),
    ({"command": "python3 train.py"}, "trainers.my-train.command"),
    ({"command": []}, "trainers.my-train.command"),
    ({"command": [""]}, "trainers.my-train.command"),
    ({"command": [PY, 3]}, "trainers.my-train.command"),
    ({"command": ["no-such-program-mangwale"]}, "trainers.my-train.command"),
    ({"command": ["./missing.py"]}, "trainers.my-train.command"),
    ({"command": [PY], "shell": True}, "trainers.my-train.shell"),
    ({"command": [PY], "env": ["A=b"]}, "trainers.my-train.env"),
    ({"command": [PY], "env": {"A": 1}}, "trainers.my-train.env.A"),
    ({"command": [PY], "env": {"A-B": "x"}}, "trainers.my-train.env.A-B"),
    (
        {"command": [PY], "env": {"MANGWALE_DATASET": "/etc/passwd"}},
        "trainers.my-train.env.MANGWALE_DATASET",
    ),
    ({"command": [PY], "cwd": "no/such/dir"}, "trainers.my-train.cwd"),
    ({"command": [PY], "cwd": 5}, "trainers.my-train.cwd"),
    ({"command": [PY], "timeout": 0}, "trainers.my-train.timeout"),
    ({"command": [PY], "timeout": "1h"}, "trainers.my-train.timeout"),
    ({"command": [PY], "timeout": True}, "trainers.my-train.timeout"),
    ({"command": [PY], "description": ["x"]}, "trainers.my-train.description"),
    ({"command": [PY], "requires_dataset": "yes"}, "trainers.my-train.requires_dataset"),
    ("python3 train.py", "trainers.my-train"),
]


@pytest.mark.parametrize(("body", "field"), BAD_SPECS, ids=[f"{f}-{b}" for b, f in BAD_SPECS])
def test_bad_trainer_config_names_the_key(body: Any, field: str) -> None:
    """Each mistake in a [trainers.<kind>] section is a ConfigError naming trainers.<kind>.<key>."""
    err = spec_error(body)
    assert err.field == field
    assert field in err.message and "test.toml" in err.message


def test_bad_kind_name_and_shadowed_builtin(tmp_path: Path) -> None:
    """A kind with a bad name, or one that would replace a built-in kind, is a ConfigError."""
    assert spec_error({"command": [PY]}, kind="my train").field == "trainers.my train"
    cfg = tmp_path / "mangwale.toml"
    cfg.write_text(f'[trainers.nlu-train]\ncommand = ["{PY}"]\n')
    with pytest.raises(ConfigError) as info:
        command_trainers(load({"config_file": cfg}, env={}))
    assert info.value.field == "trainers.nlu-train" and "built-in" in info.value.message
    cfg.write_text("trainers = 5\n")
    with pytest.raises(ConfigError) as info:
        command_trainers(load({"config_file": cfg}, env={}))
    assert info.value.field == "trainers"


def test_a_bad_trainer_stops_the_service_from_starting(tmp_path: Path) -> None:
    """Service construction (server start-up) fails on a bad trainer section."""
    from mangwale_cli.service import Service

    cfg = tmp_path / "mangwale.toml"
    cfg.write_text('[trainers.my-train]\ncommand = "python3 train.py"\n')
    settings = load({"config_file": cfg, "data_dir": tmp_path / "data"}, env={})
    with pytest.raises(ConfigError, match=r"trainers\.my-train\.command"):
        Service(settings)


def test_shipped_example_config_registers_the_example() -> None:
    """examples/mangwale.toml registers train-intents: argv, cwd = the examples dir, timeout."""
    settings = load({"config_file": EXAMPLES_DIR / "mangwale.toml"}, env={})
    (trainer,) = command_trainers(settings)
    assert trainer.kind == "train-intents" and trainer.requires_dataset
    assert trainer.spec.command == ["python3", "train_intents.py"]
    assert trainer.spec.cwd == EXAMPLES_DIR and (trainer.spec.cwd / "train_intents.py").is_file()
    assert trainer.spec.timeout == 600 and trainer.spec.env == {"PYTHONHASHSEED": "0"}
    registry = Registry([*builtin(), *command_trainers(settings)])
    assert [t.kind for t in registry.kinds()] == [
        "fine-tune",
        "nlu-train",
        "simulate",
        "train-intents",
    ]
    with pytest.raises(InvalidInput) as info:
        registry.get("rm-rf")
    assert info.value.field == "kind"


def test_docs_show_the_shipped_example() -> None:
    """docs/trainers.md quotes examples/train_intents.py as it is."""
    example = (EXAMPLES_DIR / "train_intents.py").read_text()
    assert f"```python\n{example}```" in (ROOT / "docs" / "trainers.md").read_text()


def test_relative_cwd_starts_at_the_config_file(tmp_path: Path) -> None:
    """A relative cwd and a relative program path are resolved from the config file's directory."""
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "train.sh").write_text("#!/bin/sh\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[trainers.sh-train]\ncommand = ["./train.sh"]\ncwd = "jobs"\ntimeout = 5\n')
    (trainer,) = command_trainers(load({"config_file": cfg}, env={}))
    assert trainer.spec.cwd == (tmp_path / "jobs").resolve() and trainer.spec.timeout == 5.0


def test_command_params_are_any_json_object_within_a_bound() -> None:
    """A command kind accepts any JSON object as params, up to MAX_PARAMS_BYTES (422 on params)."""
    trainer = CommandTrainer(parse_spec("t", {"command": [PY]}, base_dir=EXAMPLES_DIR))
    params = {"nested": {"list": [1, "two", None]}, "lr": 0.1}
    assert trainer.validate_params(params) == params
    with pytest.raises(InvalidInput) as info:
        trainer.validate_params({"blob": "x" * MAX_PARAMS_BYTES})
    assert info.value.field == "params"


# --- command trainers: the protocol --------------------------------------------------------------

REPORTS = [
    ('{"progress": 40}', Report(40.0)),
    ('  {"progress": 40.5, "message": "epoch 2", "eta": 3}  ', Report(40.5, "epoch 2", None, 3.0)),
    ('{"metrics": {"loss": 0.3}}', Report(None, None, {"loss": 0.3})),
    ('{"progress": 0, "metrics": {"acc": 1}}', Report(0.0, None, {"acc": 1})),
    ("plain text", None),
    ('{"loss": 0.3}', None),  # a JSON object without progress or metrics is a log line
    ('{"progress": 4', None),
    ("[1, 2]", None),
    ('{"progress": NaN}', None),  # not JSON at all
]


@pytest.mark.parametrize(("line", "report"), REPORTS, ids=[r[0] for r in REPORTS])
def test_parse_report(line: str, report: Report | None) -> None:
    """Report lines become Reports; everything else is a log line (None)."""
    assert parse_report(line) == report


@pytest.mark.parametrize(
    "line",
    [
        '{"progress": 150}',
        '{"progress": -1}',
        '{"progress": "50%"}',
        '{"progress": true}',
        '{"metrics": [1]}',
        '{"progress": null}',
        '{"progress": 5, "message": 7}',
        '{"progress": 5, "eta": -2}',
        '{"metrics": {"loss": 1e999}}',
    ],
)
def test_bad_report_says_why(line: str) -> None:
    """A JSON object that tries to be a report but has a bad value raises ValueError."""
    with pytest.raises(ValueError):
        parse_report(line)


# --- command trainers: one supervised run, in process ---------------------------------------------


class Recorder:
    """A Reporter that keeps what it was told."""

    def __init__(self) -> None:
        self.progress_calls: list[
            tuple[float, str | None, dict[str, Any] | None, float | None]
        ] = []
        self.lines: list[tuple[str, str]] = []

    async def progress(
        self,
        progress: float,
        message: str | None = None,
        *,
        metrics: dict[str, Any] | None = None,
        eta: float | None = None,
    ) -> None:
        self.progress_calls.append((progress, message, metrics, eta))

    async def log(self, stream: str, line: str) -> None:
        self.lines.append((stream, line))


SCRIPT = r"""
import json, os, sys
print("argv " + json.dumps(sys.argv[1:]))
env = {k: v for k, v in os.environ.items() if k.startswith(("MANGWALE_", "EXTRA"))}
print("env " + json.dumps(env))
rows = open(os.environ["MANGWALE_DATASET"]).read().splitlines()
print("dataset " + json.dumps([json.loads(r)["intent"] for r in rows]))
print(json.dumps({"progress": 30, "message": "half", "eta": 2}))
print(json.dumps({"metrics": {"loss": 0.5}}))
print(json.dumps({"progress": 300}))
print("x" * 70000)
print("to stderr", file=sys.stderr)
sys.stdout.write("no newline at the end")
sys.exit(int(json.loads(os.environ["MANGWALE_PARAMS"]).get("exit", 0)))
"""


def run_command(
    tmp_path: Path, params: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> tuple[Recorder, Any]:
    monkeypatch.setenv("MANGWALE_TOKEN", "secret-token")  # the server's own settings stay out
    spec = parse_spec(
        "probe",
        {
            "command": [PY, "-c", SCRIPT, "{dataset}", "{params_file}", "{output_dir}", "{job_id}"],
            "env": {"EXTRA": "1"},
        },
        base_dir=tmp_path,
    )
    trainer = CommandTrainer(spec)
    rec = Recorder()
    job = Job(id="job-1-abc", kind="probe", dataset_id="ds-1", attempt=1)
    dataset = Dataset(
        id="ds-1",
        name="d",
        examples=[{"text": "hi", "intent": "greet"}, {"text": "bye", "intent": "bye"}],
    )
    ctx = TrainingContext(job, dataset, trainer.validate_params(params), rec, tmp_path / "out", 1.0)

    async def go() -> Any:
        try:
            return await trainer.run(ctx)
        except CommandFailed as exc:
            return exc

    return rec, asyncio.run(go())


def test_command_run_relays_reports_logs_and_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command gets its inputs; reports become progress, other lines logs; 0 returns metrics."""
    rec, result = run_command(tmp_path, {"lr": 0.1}, monkeypatch)
    assert result == {"loss": 0.5}
    out = tmp_path / "out"
    logs = {line.split(" ", 1)[0]: line for stream, line in rec.lines if stream == "stdout"}
    argv = json.loads(logs["argv"].removeprefix("argv "))
    assert argv == [
        str(out / ".input" / "dataset.jsonl"),
        str(out / ".input" / "params.json"),
        str(out),
        "job-1-abc",
    ]
    env = json.loads(logs["env"].removeprefix("env "))
    assert env == {
        "MANGWALE_DATASET": argv[0],
        "MANGWALE_PARAMS": '{"lr":0.1}',
        "MANGWALE_PARAMS_FILE": argv[1],
        "MANGWALE_OUTPUT_DIR": str(out),
        "MANGWALE_JOB_ID": "job-1-abc",
        "MANGWALE_ATTEMPT": "1",
        "EXTRA": "1",
    }
    assert logs["dataset"] == 'dataset ["greet", "bye"]'
    assert rec.progress_calls == [(30.0, "half", None, 2.0), (30.0, None, {"loss": 0.5}, None)]
    assert ("stdout", '{"progress": 300}') in rec.lines
    assert any(
        s == "trainer" and "progress must be a number from 0 to 100" in ln for s, ln in rec.lines
    )
    long = [ln for s, ln in rec.lines if set(ln) == {"x"}]
    assert [len(ln) for ln in long] == [65536, 70000 - 65536]
    assert ("stderr", "to stderr") in rec.lines
    assert [ln for s, ln in rec.lines if s == "stdout"][-1] == "no newline at the end"
    assert not (out / ".input").exists()  # inputs are removed after the run


def test_command_failure_quotes_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-zero exit fails the run with the code and the last stderr lines."""
    _, result = run_command(tmp_path, {"exit": 3}, monkeypatch)
    assert isinstance(result, CommandFailed)
    assert f"{PY} exited with code 3" in str(result) and str(result).endswith("to stderr")


def test_command_that_cannot_start_fails_clearly(tmp_path: Path) -> None:
    """A program removed after start-up fails the run with 'cannot start', not a traceback."""
    script = tmp_path / "train.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    trainer = CommandTrainer(parse_spec("gone", {"command": ["./train.sh"]}, base_dir=tmp_path))
    script.unlink()
    job = Job(id="job-2-abc", kind="gone", dataset_id=None, attempt=1)
    ctx = TrainingContext(job, None, {}, Recorder(), tmp_path / "out")
    with pytest.raises(CommandFailed, match="cannot start './train.sh'"):
        asyncio.run(trainer.run(ctx))


def test_settings_without_trainers_register_none() -> None:
    """No [trainers] section: no command kinds, and the built-ins stay."""
    assert command_trainers(Settings(data_dir=Path(os.devnull))) == []
    assert {t.kind for t in builtin()} == {"nlu-train", "fine-tune", "simulate"}
