"""Command groups that build a command only when it is named.

Typer turns every command of an app into a click command up front: it reads each function's
annotations and builds its parameters, ~35 ms for mangwale's 25 commands before the one asked
for runs. ``LazyGroup`` keeps a builder per name instead. The root (``RootGroup``) imports a
noun's module (``serve``, ``watch``, ``datasets``, ``jobs``, ``tokens``, ``workers``) only when that noun is
named, and a noun's group builds only the verb named. ``list_commands`` still knows every name,
so ``--help`` and Tab completion see the same commands as before: they build what they list.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import typer
from typer.core import TyperGroup
from typer.main import get_command_from_info, get_command_name, get_group_from_info
from typer.models import CommandInfo, TyperInfo

# The root's commands, in the order `mangwale --help` lists them: name -> the module under
# mangwale_cli.cli whose ``register(app)`` adds it.
NOUNS: dict[str, str] = {
    "serve": "serve",
    "watch": "watch",
    "datasets": "datasets",
    "jobs": "jobs",
    "tokens": "tokens",
    "worker": "workers",
    "workers": "workers",
}

Builder = Callable[[], Any]  # -> a click command (typer's vendored click: no public type)


class LazyGroup(TyperGroup):
    """A ``TyperGroup`` whose commands may be builders, run on first use."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: dict[str, Builder] = {}

    def list_commands(self, ctx: Any) -> list[str]:
        return [*self.pending, *(n for n in self.commands if n not in self.pending)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        builder = self.pending.get(cmd_name)
        if builder is not None and cmd_name not in self.commands:
            self.commands[cmd_name] = builder()
        return self.commands.get(cmd_name)

    def build(self, info: TyperInfo | CommandInfo) -> Any:
        """A click command or group for what a noun module registered, built as typer builds the
        commands of an app (the root's markup mode and exception settings), its own commands
        left pending when it is a group."""
        if isinstance(info, CommandInfo):
            return get_command_from_info(info, pretty_exceptions_short=True, rich_markup_mode=self.rich_markup_mode)
        sub = info.typer_instance
        assert sub is not None
        commands, sub.registered_commands = sub.registered_commands, []
        try:  # typer builds the group with no commands; ours are added as builders below
            group = get_group_from_info(
                info, pretty_exceptions_short=True, rich_markup_mode=self.rich_markup_mode,
                suggest_commands=self.suggest_commands,
            )
        finally:
            sub.registered_commands = commands
        for command in commands:
            name = _name(command)
            if isinstance(group, LazyGroup):
                group.pending[name] = partial(group.build, command)
            else:  # a group not made to be lazy (no cls=LazyGroup) gets every command now
                group.commands[name] = self.build(command)
        return group


class RootGroup(LazyGroup):
    """``mangwale`` itself: each noun's module is imported when the noun is first named."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name, module in NOUNS.items():
            self.pending[name] = partial(self._load, name, module)

    def _load(self, name: str, module: str) -> Any:
        holder = typer.Typer()
        # __import__, not importlib.import_module: only the import statement's path is timed by
        # `python -X importtime`, which the bench and the import tests read.
        __import__(f"{__package__}.{module}", fromlist=["register"]).register(holder)
        infos: list[TyperInfo | CommandInfo] = [*holder.registered_commands, *holder.registered_groups]
        found = [i for i in infos if _name(i) == name]
        assert len(found) == 1, f"{module}.register must add the command {name!r}"
        return self.build(found[0])


def _name(info: TyperInfo | CommandInfo) -> str:
    """The name typer gives what ``info`` registers: its own, else its function's, dashed."""
    if isinstance(info.name, str) and info.name:
        return info.name
    callback = info.callback
    return get_command_name(getattr(callback, "__name__", ""))
