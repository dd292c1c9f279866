"""Shell completion: the checked-in scripts are current, bash really completes, and Tab stays light.

Every Tab press runs ``mangwale``, so completion (and ``--help``) must not import the server
stack (fastapi, uvicorn, scikit-learn) nor the follower's (websockets, rich, httpx).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HEAVY = ("fastapi", "uvicorn", "sklearn", "starlette", "websockets", "rich", "httpx", "pydantic")


def app_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("_MANGWALE")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def test_checked_in_completions_are_current() -> None:
    """completions/ equals what scripts/gen-completions produces from the Typer app now."""
    r = subprocess.run([str(ROOT / "scripts" / "gen-completions"), "--check"], env=app_env(PYTHON=sys.executable),
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    for name in ("mangwale.bash", "_mangwale", "mangwale.fish"):
        assert "_MANGWALE_COMPLETE" in (ROOT / "completions" / name).read_text()
    assert (ROOT / "completions" / "_mangwale").read_text().startswith("#compdef mangwale\n")


def test_gen_completions_detects_stale_files(tmp_path: Path) -> None:
    """--check fails, naming the file, when a checked-in script differs from the generated one."""
    copy = tmp_path / "repo"
    (copy / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "gen-completions", copy / "scripts")
    shutil.copytree(ROOT / "completions", copy / "completions")
    (copy / "completions" / "mangwale.fish").write_text("# old\n")
    cmd = [str(copy / "scripts" / "gen-completions")]
    r = subprocess.run([*cmd, "--check"], env=app_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1 and "completions/mangwale.fish" in r.stderr
    r = subprocess.run(cmd, env=app_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and "wrote completions/mangwale.fish" in r.stdout
    assert (copy / "completions" / "mangwale.fish").read_text() == (ROOT / "completions" / "mangwale.fish").read_text()


def bash_complete(*words: str) -> list[str]:
    """Source completions/mangwale.bash in a real bash, set COMP_WORDS/COMP_CWORD, call the function."""
    quoted = " ".join(f"'{w}'" for w in words)
    script = (
        f"source '{ROOT / 'completions' / 'mangwale.bash'}'\n"
        f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}\n"
        "complete -p mangwale >/dev/null || exit 9\n"
        "_mangwale_completion mangwale\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], env=app_env(), capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if line]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completes_commands_and_options() -> None:
    """Tab in bash completes commands, subcommands, options and option values."""
    assert {"jobs", "datasets", "watch", "serve"} <= set(bash_complete("mangwale", ""))
    assert bash_complete("mangwale", "wa") == ["watch"]
    assert bash_complete("mangwale", "watch", "--j") == ["--json"]
    assert {"--all", "--latest", "--timeout", "--give-up-after", "--cancel-on-interrupt"} <= set(bash_complete("mangwale", "watch", "--"))
    assert bash_complete("mangwale", "watch", "--output", "") == ["tty", "plain", "json"]
    assert "create" in bash_complete("mangwale", "jobs", "")
    assert bash_complete("mangwale", "jobs", "create", "--wa") == ["--watch"]
    assert bash_complete("mangwale", "datasets", "li") == ["list"]


def test_zsh_and_fish_protocols_answer() -> None:
    """The app answers the zsh and fish completion requests the checked-in scripts make."""
    zsh = subprocess.run([str(BIN / "mangwale")], env=app_env(_MANGWALE_COMPLETE="complete_zsh", _TYPER_COMPLETE_ARGS="mangwale wat"),
                         capture_output=True, text=True, timeout=30, check=False)
    assert "watch" in zsh.stdout
    fish = subprocess.run([str(BIN / "mangwale")], env=app_env(_MANGWALE_COMPLETE="complete_fish", _TYPER_COMPLETE_FISH_ACTION="get-args",
                                                              _TYPER_COMPLETE_ARGS="mangwale watch --la"),
                          capture_output=True, text=True, timeout=30, check=False)
    assert "--latest" in fish.stdout


def imported(args: list[str], **env: str) -> set[str]:
    """Top-level packages a ``mangwale`` run imports, from ``python -X importtime``."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "mangwale_cli", *args], env=app_env(**env),
                       capture_output=True, text=True, timeout=30, check=False)
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", r.stderr, re.MULTILINE)
    return {n.split(".")[0] for n in names}


def test_completion_and_help_do_not_import_the_server_stack() -> None:
    """A Tab press and `--help` import neither the server stack nor the follower's websockets/httpx."""
    # The console entry point's error path (cli.main.run -> render) loads rich, so rich is only
    # checked on the app module itself below; typer itself loads pydantic to show a command's help.
    heavy = set(HEAVY) - {"rich"}
    tab = imported([], _MANGWALE_COMPLETE="complete_bash", COMP_WORDS="mangwale watch --", COMP_CWORD="2")
    assert "typer" in tab  # the measurement works
    assert not tab & heavy, tab & heavy
    for args in (["--help"], ["watch", "--help"], ["jobs", "create", "--help"]):
        assert not imported(args) & (heavy - {"pydantic"}), args
    # A None entry marks a module as never to be imported (cli.main does that to httpx's own CLI).
    code = ("import sys, mangwale_cli.cli.main; print(sorted(m for m, mod in sys.modules.items() "
            f"if mod is not None and m.split('.')[0] in {HEAVY!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False)
    assert r.stdout.strip() == "[]", r.stdout


def test_watch_help_documents_exit_codes() -> None:
    """`watch --help` lists every exit code of the contract and the backoff settings."""
    r = subprocess.run([sys.executable, "-m", "mangwale_cli", "watch", "--help"], env=app_env(COLUMNS="120"),
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0
    for code in ("0", "1", "2", "3", "4", "5", "6", "7", "130"):
        assert re.search(rf"^\s+{code}\s+\S", r.stdout, re.MULTILINE), code
    assert "MANGWALE_BACKOFF_INITIAL" in r.stdout and "MANGWALE_BACKOFF_MAX" in r.stdout
