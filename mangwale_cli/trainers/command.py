"""Trainers registered by the operator: a ``[trainers.<kind>]`` section runs a command.

Config (read at start-up; a bad entry is a ``ConfigError`` naming ``trainers.<kind>.<key>``)::

    [trainers.my-train]
    command = ["python3", "train.py", "--epochs", "3"]   # an argv list, never a shell string
    env = { FOO = "bar" }
    cwd = "/path"              # default: the config file's directory
    timeout = 3600             # seconds
    description = "..."
    requires_dataset = true

API clients pick a kind and send ``params`` (any JSON object); the command is the operator's.
What a command gets and prints is documented in docs/trainers.md.

``CommandTrainer.run`` writes the inputs (dataset as JSON Lines, params) into the job's
artifact dir and runs ``supervisor.supervise`` in a child process (``run_in_process``); the
supervisor runs the command, and this side turns its outcome into the job's result or error.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import wire
from ..errors import ConfigError, InvalidInput
from ..settings import Settings
from .base import Trainer, TrainingContext
from .process import run_in_process
from .supervisor import supervise

KEYS = ("command", "env", "cwd", "timeout", "description", "requires_dataset")
KIND_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PLACEHOLDER_RE = re.compile(r"\{(dataset|params_file|output_dir|job_id)\}")
# Set by the runner for every run; the config may not override them.
RESERVED_ENV = (
    "MANGWALE_DATASET",
    "MANGWALE_PARAMS",
    "MANGWALE_PARAMS_FILE",
    "MANGWALE_OUTPUT_DIR",
    "MANGWALE_JOB_ID",
    "MANGWALE_ATTEMPT",
)
MAX_PARAMS_BYTES = 64 * 1024  # params travel in an environment variable too
INPUT_DIR = ".input"  # in the job's artifact dir, removed after each run


# --- config ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandSpec:
    """One ``[trainers.<kind>]`` section, validated."""

    kind: str
    command: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None
    description: str = ""
    requires_dataset: bool = True


def parse_spec(kind: str, body: Any, *, base_dir: Path, where: str = "config") -> CommandSpec:
    """Validate one section. ``base_dir`` anchors a relative ``cwd`` (the config file's dir)."""
    name = f"trainers.{kind}"

    def fail(key: str | None, problem: str) -> ConfigError:
        at = f"{name}.{key}" if key else name
        return ConfigError(f"{where}: {at} {problem}", field=at)

    if not KIND_RE.fullmatch(kind):
        raise fail(None, "is not a valid kind: use letters, digits, '-', '_' and '.' (at most 100)")
    if not isinstance(body, dict):
        raise fail(None, f"must be a [{name}] table, got {body!r}")
    for key in body:
        if key not in KEYS:
            raise fail(key, f"is not a known key (known: {', '.join(KEYS)})")

    command = body.get("command")
    if command is None:
        raise fail("command", 'is required: an argv list such as ["python3", "train.py"]')
    if isinstance(command, str):
        raise fail(
            "command",
            f'must be an argv list such as ["python3", "train.py"], not a shell string: '
            f"{command!r}",
        )
    if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        raise fail("command", f"must be a list of strings, got {command!r}")
    if not command or not command[0]:
        raise fail("command", "must not be empty")

    env = body.get("env", {})
    if not isinstance(env, dict):
        raise fail("env", f'must be a table of NAME = "value", got {env!r}')
    for key, value in env.items():
        if not ENV_NAME_RE.fullmatch(key):
            raise fail(f"env.{key}", "is not a valid environment variable name")
        if key in RESERVED_ENV:
            raise fail(f"env.{key}", "is set by mangwale for every run and cannot be configured")
        if not isinstance(value, str):
            raise fail(f"env.{key}", f"must be a string (quote it), got {value!r}")

    raw_cwd = body.get("cwd")
    if raw_cwd is not None and (not isinstance(raw_cwd, str) or not raw_cwd):
        raise fail("cwd", f"must be a directory path, got {raw_cwd!r}")
    cwd = (base_dir / Path(raw_cwd).expanduser()) if raw_cwd else base_dir
    if not cwd.is_dir():
        raise fail("cwd", f"{str(cwd)!r} is not a directory")

    timeout = body.get("timeout")
    if timeout is not None:
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not 0 < timeout < float("inf")
        ):
            raise fail("timeout", f"must be a number of seconds > 0, got {timeout!r}")
        timeout = float(timeout)

    description = body.get("description", f"operator command: {' '.join(command)}"[:200])
    if not isinstance(description, str):
        raise fail("description", f"must be a string, got {description!r}")
    requires_dataset = body.get("requires_dataset", True)
    if not isinstance(requires_dataset, bool):
        raise fail("requires_dataset", f"must be true or false, got {requires_dataset!r}")

    program = command[0]
    if "/" in program:
        if not (cwd / program).is_file():
            raise fail("command", f"program {program!r} does not exist (relative to {str(cwd)!r})")
    elif shutil.which(program, path=env.get("PATH", os.environ.get("PATH"))) is None:
        raise fail("command", f"program {program!r} is not on PATH")

    return CommandSpec(
        kind=kind,
        command=list(command),
        cwd=cwd.resolve(),
        env=dict(env),
        timeout=timeout,
        description=description,
        requires_dataset=requires_dataset,
    )


def command_trainers(settings: Settings, reserved: set[str] | None = None) -> list[CommandTrainer]:
    """The trainers ``settings.extra["trainers"]`` registers; ``ConfigError`` on a bad entry or
    on a kind that shadows a built-in one (``reserved``, by default the built-ins)."""
    raw = settings.extra.get("trainers")
    if raw is None:
        return []
    where = str(settings.config_file or "config")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: trainers must be [trainers.<kind>] tables, got {raw!r}", field="trainers"
        )
    if reserved is None:
        from . import builtin

        reserved = {t.kind for t in builtin()}
    base_dir = settings.config_file.parent.resolve() if settings.config_file else Path.cwd()
    out = []
    for kind, body in raw.items():
        if kind in reserved:
            raise ConfigError(
                f"{where}: trainers.{kind} would replace the built-in kind {kind!r}; "
                "choose another name",
                field=f"trainers.{kind}",
            )
        out.append(CommandTrainer(parse_spec(kind, body, base_dir=base_dir, where=where)))
    return out


# --- the trainer (server side) -------------------------------------------------------------------


class CommandFailed(RuntimeError):
    """The command failed: a non-zero exit, a signal, a timeout, or it could not start."""


class CommandTrainer(Trainer):
    """A job kind whose training is an operator's command."""

    requires_examples = False

    def __init__(self, spec: CommandSpec) -> None:
        self.spec = spec
        self.kind = spec.kind
        self.description = spec.description
        self.requires_dataset = spec.requires_dataset

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Any JSON object up to ``MAX_PARAMS_BYTES``; the command checks the rest."""
        if not isinstance(params, dict):
            raise InvalidInput("params must be a JSON object", field="params")
        size = len(wire.dumps(params).encode())
        if size > MAX_PARAMS_BYTES:
            raise InvalidInput(
                f"params take {size} bytes as JSON; kind {self.kind!r} accepts at most "
                f"{MAX_PARAMS_BYTES}",
                field="params",
                code="too_large",
            )
        return dict(params)

    async def run(self, ctx: TrainingContext) -> dict[str, Any] | None:
        inputs = ctx.artifacts_dir / INPUT_DIR
        try:
            payload = await asyncio.to_thread(self._prepare, ctx, inputs)
            # The supervisor gets the command's grace period (runner.kill_grace), plus time
            # to reap it.
            result = await run_in_process(
                supervise, payload, ctx.reporter, kill_grace=ctx.kill_grace + 2.0
            )
        finally:
            shutil.rmtree(inputs, ignore_errors=True)
        assert result is not None
        return self._outcome(result)

    def _prepare(self, ctx: TrainingContext, inputs: Path) -> dict[str, Any]:
        """Write the dataset and params files; return the supervisor's payload."""
        shutil.rmtree(inputs, ignore_errors=True)  # left by a run the server did not see end
        inputs.mkdir(parents=True)
        params_text = wire.dumps(ctx.params)
        params_file = inputs / "params.json"
        params_file.write_text(params_text, encoding="utf-8")
        dataset_file = ""
        if ctx.dataset is not None:
            path = inputs / "dataset.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(wire.dumps(example) + "\n" for example in ctx.dataset.examples)
            dataset_file = str(path)
        values = {
            "dataset": dataset_file,
            "params_file": str(params_file),
            "output_dir": str(ctx.artifacts_dir),
            "job_id": ctx.job.id,
        }
        argv = [PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], arg) for arg in self.spec.command]
        # The server's own settings (and any token) stay out of the command's environment.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MANGWALE_")}
        env["PYTHONUNBUFFERED"] = "1"  # progress lines from Python scripts arrive as printed
        env.update(self.spec.env)
        env.update(
            {
                "MANGWALE_PARAMS": params_text,
                "MANGWALE_PARAMS_FILE": str(params_file),
                "MANGWALE_OUTPUT_DIR": str(ctx.artifacts_dir),
                "MANGWALE_JOB_ID": ctx.job.id,
                "MANGWALE_ATTEMPT": str(ctx.job.attempt),
            }
        )
        if dataset_file:
            env["MANGWALE_DATASET"] = dataset_file
        return {
            "argv": argv,
            "env": env,
            "cwd": str(self.spec.cwd),
            "timeout": self.spec.timeout,
            "killGrace": ctx.kill_grace,
        }

    def _outcome(self, result: dict[str, Any]) -> dict[str, Any] | None:
        if result.get("startError"):
            raise CommandFailed(result["startError"])
        if result.get("stopped") == "timeout":
            raise CommandFailed(f"timed out after {self.spec.timeout:g} s")
        code = result["returncode"]
        if code == 0 and not result.get("stopped"):
            metrics: dict[str, Any] | None = result.get("metrics")
            return metrics
        if code < 0:
            try:
                what = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                what = f"was killed by signal {-code}"
        else:
            what = f"exited with code {code}"
        tail = result.get("stderrTail") or []
        detail = "; last stderr lines:\n" + "\n".join(tail) if tail else " (no stderr output)"
        raise CommandFailed(f"{self.spec.command[0]} {what}{detail}")
