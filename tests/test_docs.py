"""The docs name only real things: every `musc-stream ...` command line in README.md, docs/*.md and
deploy/**/README.md parses with the real CLI parser, every MUSC_* variable they name is a setting
(or one of the few variables the CLI reads itself), and docs that other files point at exist.

A doc that shows a removed option or a misspelt variable sends an operator into an error (or, for
a variable, used to send them into silence); these tests fail the build instead."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from musc_stream import cli
from musc_stream.service.config import CONFIG_ENV, ENV_PREFIX, Settings, _env_names

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "deploy").glob("**/README.md")])
# Variables the CLI reads itself (not settings), e.g. replay's MUSC_REPLAY_PASSWORD.
CLI_VARIABLES = set(re.findall(r"\b(MUSC_[A-Z0-9_]+)\b", Path(cli.__file__).read_text()))
SETTINGS_VARIABLES = set(_env_names(Settings, ENV_PREFIX)) | {CONFIG_ENV}

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`([^`]+)`")
_VARIABLE = re.compile(r"\bMUSC_[A-Za-z0-9_]*")
_OPERATORS = {"|", "||", "&", "&&", ";", "(", ")", "<", ">", ">>", "2>", "2>&1"}
_PREFIXES = {"sudo", "exec", "env", "nohup", "time"}


def _doc_id(path: Path) -> str:
    return str(path.relative_to(REPO))


def _snippets(text: str) -> list[str]:
    """Shell text of a doc: each line of a fenced block (backslash continuations joined), and each
    inline code span of the prose."""
    out = []
    for block in _FENCE.findall(text):
        out.extend(line for line in block.replace("\\\n", " ").splitlines() if line.strip())
    prose = _FENCE.sub("", text)
    out.extend(span.replace("\n", " ") for span in _INLINE.findall(prose))
    return out


def _words(snippet: str) -> list[str] | None:
    lexer = shlex.shlex(snippet, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote in prose ("the camera's"): not a command line
        return None


def musc_stream_commands(text: str) -> list[list[str]]:
    """The argument lists of every musc-stream invocation in a doc's shell text.

    A simple command (split at |, &&, ;, parentheses) invokes musc-stream when its first word,
    after VAR=value assignments and sudo/env, is a path whose last part is "musc-stream", so
    `systemctl status musc-stream` or `cd /opt/musc-stream` are not invocations."""
    commands = []
    for snippet in _snippets(text):
        words = _words(snippet)
        if not words:
            continue
        simple: list[str] = []
        for word in [*words, ";"]:
            if word not in _OPERATORS:
                simple.append(word)
                continue
            while simple and (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", simple[0]) or simple[0] in _PREFIXES):
                simple.pop(0)
            if len(simple) > 1 and simple[0].rsplit("/", 1)[-1] == "musc-stream":  # a bare name is a mention
                commands.append(simple[1:])
            simple = []
    return commands


def _parse(argv: list[str]) -> str | None:
    """None when the real parser accepts argv (help included), else argparse's message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            cli.build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return stderr.getvalue().strip().splitlines()[-1]
    return None


def _subcommands() -> set[str]:
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return set(action.choices)


# -- the parsing above, on cases that could fool it ------------------------------------------------


def test_command_finder_tells_invocations_from_mentions():
    text = """
```bash
MUSC_MQTT__HOST=localhost .venv/bin/musc-stream serve --ready-timeout 60
systemctl status musc-stream        # a unit name, not a command
git clone x /opt/musc-stream && cd /opt/musc-stream
( set -a; . /etc/env; set +a
  X=1 /opt/musc-stream/.venv/bin/musc-stream config )
.venv/bin/musc-stream eval data --model ViT-B-16 \\
  --image-size 224
```
Prose: `musc-stream serve | demo | replay`, `journalctl -u musc-stream -f`, the user `musc-stream`, the camera's `line`.
"""
    assert musc_stream_commands(text) == [
        ["serve", "--ready-timeout", "60"], ["config"], ["eval", "data", "--model", "ViT-B-16", "--image-size", "224"],
        ["serve"],
    ]
    assert _parse(["eval", "--stream", "--windows", "8"]) is not None  # an option that does not exist
    assert _parse(["bench"]) is not None  # a command that does not exist
    assert _parse(["replay", "folder", "--line", "l1", "--fps", "2"]) is None


# -- the docs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_every_musc_stream_command_in_the_docs_parses(doc):
    commands = musc_stream_commands(doc.read_text())
    problems = {" ".join(argv): error for argv in commands if (error := _parse(argv)) is not None}
    assert problems == {}


def test_the_docs_show_every_subcommand():
    shown = {argv[0] for doc in DOCS for argv in musc_stream_commands(doc.read_text()) if argv}
    assert _subcommands() <= shown


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_every_musc_variable_in_the_docs_exists(doc):
    unknown = set()
    for line in doc.read_text().splitlines():
        if "did you mean" in line:  # an error message quoting a misspelt name on purpose
            continue
        for name in _VARIABLE.findall(line):
            if name.endswith("_"):  # a pattern: MUSC_<AREA>__<FIELD>, MUSC_*
                continue
            if name not in SETTINGS_VARIABLES | CLI_VARIABLES:
                unknown.add(name)
    assert unknown == set()


def test_the_help_lists_exactly_the_commands_that_exist():
    # The first line of --help once listed a `bench` command that did not exist.
    first_line = cli.__doc__.splitlines()[0]
    listed = re.search(r"`musc-stream ([^`]+)`", first_line).group(1)
    assert {word.strip() for word in listed.split("|")} == _subcommands()


def test_docs_named_elsewhere_exist():
    # The unit's Documentation= and the README point at these; a missing page is a dead end.
    unit = (REPO / "deploy" / "systemd" / "musc-stream.service").read_text()
    named = set(re.findall(r"file:/opt/musc-stream/(\S+)", unit))
    for doc in DOCS:
        named |= set(re.findall(r"(?<![\w./-])(docs/[\w.-]+\.md)\b", doc.read_text()))
    assert named, "no doc is named anywhere: the pattern above is broken"
    missing = sorted(name for name in named if not (REPO / name).is_file())
    assert missing == []


def test_package_layout_table_names_every_module_once():
    """README's package table is how a newcomer finds a file: each module of the package is in it, in
    its package's row group, and no module name is used twice in the package (the house plan)."""
    section = _readme_section("## Package layout")
    modules = sorted(p for p in (REPO / "musc_stream").rglob("*.py") if p.name != "__init__.py")
    names = [p.name for p in modules]
    assert len(names) == len(set(names)), f"module names used twice: {sorted({n for n in names if names.count(n) > 1})}"
    missing = [str(p.relative_to(REPO)) for p in modules if f"`{p.name}`" not in section]
    assert not missing, f"README's package layout does not name: {missing}"
    for package in sorted({p.parent.relative_to(REPO / "musc_stream").parts[0] for p in modules if p.parent != REPO / "musc_stream"}):
        assert f"`{package}/`" in section, f"README's package layout has no row for {package}/"


def _readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start:end if end != -1 else None]
