"""The lint gate stays a gate: its tools pinned, its settings strict, CI running it, and every
exception to it (a noqa or type-ignore comment) saying why it is there.

This file spells those comments with ``HASH`` where it quotes a bad one, so that its own check
does not find them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

NOQA = re.compile(r"#\s*noqa\b(?P<rest>.*)$")
IGNORE = re.compile(r"#\s*type:\s*ignore\b(?P<rest>.*)$")
# Accepted: "noqa: CODE - reason" (or "--"; codes as "F811, F401"); "type: ignore[code]  # reason".
NOQA_WITH_REASON = re.compile(r"^: [A-Z]+[0-9]+(?:, ?[A-Z]+[0-9]+)* +-{1,2} +\S")
IGNORE_WITH_REASON = re.compile(r"^\[[a-z0-9-]+(?:, ?[a-z0-9-]+)*\] +# +\S")
HASH = "#"


def unexplained(text: str) -> list[tuple[int, str]]:
    """The lines of ``text`` whose noqa or type-ignore comment names no code or no reason."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for marker, explained in ((NOQA, NOQA_WITH_REASON), (IGNORE, IGNORE_WITH_REASON)):
            hit = marker.search(line)
            if hit and not explained.match(hit.group("rest")):
                found.append((n, line.strip()))
    return found


def test_the_reason_check_tells_a_reason_from_none() -> None:
    """The check below accepts a code and a reason, and refuses a bare marker, a code alone or a reason alone."""
    assert unexplained("x = 1  # noqa: BLE001 - the last guard\ny = 2  # type: ignore[misc]  # a mixin\n") == []
    assert unexplained("z = 3  # noqa: F811, F401 -- fixtures by name\n") == []
    bad = [f"a  {HASH} noqa", f"a  {HASH} noqa: E501", f"a  {HASH} noqa  - why", f"a  {HASH} type: ignore",
           f"a  {HASH} type: ignore[misc]", f"a  {HASH} type: ignore  {HASH} why", f"a  {HASH} noqa: BLE001  (why)"]  # fmt: skip
    assert [n for n, _ in unexplained("\n".join(bad))] == list(range(1, len(bad) + 1))


def test_every_noqa_and_type_ignore_says_why() -> None:
    """Every noqa and type-ignore comment in mangwale_cli/ and tests/ names its code and gives a reason."""
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line}"
        for folder in ("mangwale_cli", "tests")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for n, line in unexplained(path.read_text())
    ]
    assert found == [], "\n".join(found)


def test_ruff_and_mypy_are_pinned_in_the_test_extra() -> None:
    """ruff and mypy are pinned to exact versions in the test extra: a new release cannot turn the gate red on its own."""
    extra = PYPROJECT["project"]["optional-dependencies"]["test"]
    for tool in ("ruff", "mypy"):
        pins = [r for r in extra if re.match(rf"{tool}\b", r)]
        assert len(pins) == 1 and re.fullmatch(rf"{tool}==\d+(\.\d+)+", pins[0]), pins


def test_mypy_checks_untyped_code_and_unused_ignores() -> None:
    """pyproject's mypy settings check the bodies of untyped functions and flag a type-ignore comment no longer needed."""
    mypy = PYPROJECT["tool"]["mypy"]
    assert mypy.get("check_untyped_defs") is True
    assert mypy.get("warn_unused_ignores") is True


def test_ci_runs_the_one_test_script() -> None:
    """.ci/run ends in scripts/test (which runs the lint gate first), not a second way to run the tests."""
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.split("#")[0].strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert any(re.fullmatch(r"(exec )?scripts/test( .*)?", c) for c in commands), commands
    script = (ROOT / "scripts" / "test").read_text()
    assert "ruff check ." in script and "mypy mangwale_cli" in script
