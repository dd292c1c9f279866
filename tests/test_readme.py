"""The README's Quick start, followed word for word in a fresh shell, leaves a working command
line; and what it says about the suite and the first events holds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.DOTALL)


def test_quick_start_leaves_mangwale_and_websockets_on_the_path() -> None:
    """The install command, run in a fresh shell (no venv on PATH), puts mangwale and the
    python that has websockets on the PATH before it starts the server. Here the checkout's
    .venv already exists, so the shell runs what the command does besides creating it,
    installing into it and serving."""
    install = bash_blocks(section("Quick start"))[0].strip()
    steps = [s.strip() for s in install.split("&&")]
    assert steps[-1] == "mangwale serve", steps  # as printed: no path, so it must be on PATH
    setup = [s for s in steps if not s.startswith(("python3 -m venv", "pip install", "mangwale serve"))]
    assert setup, f"nothing in {install!r} puts the virtualenv on the PATH"
    if not (ROOT / ".venv" / "bin" / "activate").is_file():
        raise AssertionError("run the suite from a checkout with .venv (the Quick start's own install)")
    script = " && ".join([*setup, "command -v mangwale", "python -c 'import websockets, mangwale_cli'"])
    env = {"HOME": os.environ.get("HOME", "/tmp"), "PATH": "/usr/local/bin:/usr/bin:/bin"}
    proc = subprocess.run(
        [shutil.which("bash") or "/bin/bash", "--noprofile", "--norc", "-c", script],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, (script, proc.stderr)
    assert proc.stdout.strip().splitlines()[0] == str(ROOT / ".venv" / "bin" / "mangwale")


def test_blocks_that_open_a_terminal_activate_the_virtualenv() -> None:
    """The seed's manual test opens two terminals; each starts by activating the virtualenv,
    and the README says every later command runs with it active."""
    manual = bash_blocks(section("The seed's manual test, against mangwale"))[0]
    assert manual.lstrip().splitlines()[1].startswith(". .venv/bin/activate"), manual
    ws = next(line for line in manual.splitlines() if "python -m websockets" in line)
    assert ws.startswith(". .venv/bin/activate && "), ws
    assert "in each new terminal" in section("Quick start")


def test_readme_states_the_suite_time_and_that_it_needs_no_server() -> None:
    """The Quick start says the suite needs no running server and how long it takes on 2 cores."""
    quick = " ".join(section("Quick start").split())
    assert "needs no running server" in quick
    assert re.search(r"2-core VM the whole run takes about \d+ minutes", quick), quick


def test_readme_says_the_first_training_update_is_running() -> None:
    """The first training_update of a job is `running` (job_created carries `queued`)."""
    manual = " ".join(section("The seed's manual test, against mangwale").split())
    assert "from `queued`" not in manual
    assert 'then `training_update` messages from `status: "running"`' in manual
