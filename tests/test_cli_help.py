"""Every command documents itself: the whole argparse tree, walked from build_parser(), answers --help."""

from __future__ import annotations

import argparse

import pytest

from mnistlab.cli import build_parser


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = (), summary: str | None = None):
    """(path, parser, its one-line help in the parent's listing) for the parser and every subparser below it."""
    yield path, parser, summary
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        listed = {a.dest: a.help for a in action._choices_actions}  # name -> help=, when one was given
        seen = set()
        for name, sub in action.choices.items():
            if id(sub) in seen:  # an alias of a command already walked
                continue
            seen.add(id(sub))
            yield from walk(sub, (*path, name), listed.get(name))


def flat(text: str | None) -> str:
    """Whitespace removed: argparse rewraps descriptions and help to the terminal width, also at hyphens."""
    return "".join((text or "").split())


COMMANDS = list(walk(build_parser()))


def help_text(path: tuple[str, ...], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*path, "--help"])
    assert e.value.code in (0, None)
    return capsys.readouterr().out


def test_the_walk_finds_every_command_at_every_depth():
    paths = {path for path, _, _ in COMMANDS}
    assert {("train",), ("eval",), ("models",), ("plot",), ("lab",), ("data",)} <= paths
    assert max(len(p) for p in paths) >= 2  # the subcommands of plot and data as well


@pytest.mark.parametrize("path, parser, summary", COMMANDS, ids=[" ".join(c[0]) or "mnistlab" for c in COMMANDS])
def test_every_command_has_help(path, parser, summary, capsys):
    out = help_text(path, capsys)
    assert out.startswith(f"usage: {parser.prog}"), out[:200]
    assert flat(parser.description) or flat(summary), f"{parser.prog}: neither a description nor a help string"
    if flat(parser.description):
        assert flat(parser.description) in flat(out)
    if path:  # the parent's --help lists this command with its one-line help
        parent = help_text(path[:-1], capsys)
        assert path[-1] in parent
        if flat(summary):
            assert flat(summary) in flat(parent)


@pytest.mark.parametrize("path, parser, summary", COMMANDS, ids=[" ".join(c[0]) or "mnistlab" for c in COMMANDS])
def test_every_argument_of_every_command_has_a_help_string(path, parser, summary):
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions
               if not isinstance(a, argparse._SubParsersAction) and not flat(a.help)]
    assert missing == [], f"{parser.prog}: no help for {missing}"
