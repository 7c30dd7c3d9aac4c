"""The documentation cannot drift from the code.

* Every ```python block of every page in docs/ is executed, in order, in one namespace per page,
  in a fresh temporary working directory. A block is skipped only when the line before its fence
  says so explicitly: ``<!-- docs-test: skip REASON -->``, or
  ``<!-- docs-test: requires PACKAGE -->`` (run when PACKAGE is importable).
* Every ``singan-insert ...`` command shown in a shell block parses with the real parser.
* Every image a page shows is drawn by a script in docs/figures/ (no hand-pasted pictures).
* ``mkdocs build --strict`` passes (a broken cross-reference fails it), and the generated pages
  hold what they are generated from (the CLI reference has every option of the parser).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "figures" not in p.parts)

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)\s*(?P<info>[^\n`]*)$")
MARKER = re.compile(r"<!--\s*docs-test:\s*(?P<kind>skip|requires)\b\s*(?P<arg>[^>]*?)\s*-->")
PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "shell", "console"}
MAX_SKIPPED = 6  # skipped blocks must stay rare: each one is code nobody checks


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    marker: tuple[str, str] | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def extract_blocks(page: Path) -> list[Block]:
    """Fenced code blocks of a markdown page, with the docs-test marker just above each."""
    lines = page.read_text().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = match.group("indent"), match.group("fence")
        language = (match.group("info").split() or [""])[0].strip("{.").lower()
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        previous = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.search(previous)
        blocks.append(Block(page, i + 1, language, "\n".join(body),
                            (marker.group("kind"), marker.group("arg")) if marker else None))
        i = j + 1
    return blocks


def python_pages() -> list[Path]:
    return [p for p in PAGES if any(b.language in PYTHON for b in extract_blocks(p))]


@pytest.fixture
def one_thread():
    """Docs examples run with one torch thread (the test machine's cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("page", python_pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_python_blocks_run(page, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for block in extract_blocks(page):
        if block.language not in PYTHON:
            continue
        if block.marker is not None:
            kind, argument = block.marker
            if kind == "skip":
                continue
            if importlib.util.find_spec(argument) is None:
                continue
        code = compile(block.code, block.where, "exec")
        try:
            exec(code, namespace)  # noqa: S102 - executing the documentation is the point
        except Exception as error:  # show where in the docs it broke
            raise AssertionError(f"The example at {block.where} fails: {error!r}") from error
        ran += 1
    assert ran > 0, f"{page} has Python blocks but none ran"


def test_skipped_blocks_are_rare_and_explained():
    skipped = [b for p in PAGES for b in extract_blocks(p) if b.language in PYTHON and b.marker]
    for block in skipped:
        assert block.marker[1], f"{block.where}: say why the block is skipped or what it requires"
    assert len([b for b in skipped if b.marker[0] == "skip"]) <= MAX_SKIPPED


def test_every_python_fence_is_recognised():
    """A typo in a fence's language (e.g. ```pyhton) would silently exempt a block."""
    for page in PAGES:
        for block in extract_blocks(page):
            assert block.language in PYTHON | SHELL | {"text", "yaml", "json", "csv", "toml", ""}, \
                f"{block.where}: unknown code block language {block.language!r}"


def _shell_commands(code: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.split("\n"):
        for part in re.split(r"&&|;|\|\|", line.split(" #")[0]):
            part = part.strip()
            if part.startswith("$ "):
                part = part[2:]
            if part.startswith("singan-insert "):
                commands.append(part)
    return commands


def test_cli_commands_in_the_docs_parse():
    from singan_insert.cli import build_parser

    commands = [(block, command) for page in PAGES for block in extract_blocks(page)
                if block.language in SHELL for command in _shell_commands(block.code)]
    assert len(commands) >= 5
    for block, command in commands:
        argv = shlex.split(command)[1:]
        try:
            build_parser().parse_args(argv)
        except SystemExit as exit_:
            assert exit_.code == 0, f"{block.where}: `{command}` does not parse"


def test_every_figure_is_made_by_a_script():
    scripts = {p: p.read_text() for p in (DOCS / "figures").glob("*.py")}
    shown = {name for page in PAGES for name in re.findall(r"figures/([\w.-]+\.png)", page.read_text())}
    assert shown, "the docs show no figure"
    for name in shown:
        assert (DOCS / "figures" / name).is_file(), f"docs/figures/{name} is missing"
        assert any(name in text for text in scripts.values()), \
            f"no script in docs/figures/ produces {name}"


def test_cli_reference_is_generated_from_the_parser():
    sys.path.insert(0, str(DOCS))
    try:
        from hooks import cli_reference_markdown
    finally:
        sys.path.remove(str(DOCS))
    from singan_insert.cli import build_parser

    reference = cli_reference_markdown()
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        assert f"## `singan-insert {name}`" in reference
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help") and action.help != argparse.SUPPRESS:
                    assert f"`{option}`" in reference, f"{name} {option} missing from the reference"


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs/mkdocstrings are not installed: pip install -e '.[docs]'")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    cli = (site / "cli.html").read_text()
    assert "--data-root" in cli and "singan-insert demo" in cli
    api = (site / "api" / "insertion.html").read_text()
    assert 'id="singan_insert.integrations.torchio.RandomTumorInsertion"' in api
    assert (site / "javascripts" / "mathjax.js").is_file()


def test_docstring_conversion_of_the_rest_idioms():
    """The Griffe extension's reST -> Markdown conversion on one docstring of each idiom."""
    sys.path.insert(0, str(DOCS))
    try:
        from hooks import rst_to_markdown
    finally:
        sys.path.remove(str(DOCS))
    text = "\n".join([
        "Title",
        "-----",
        "Inline :math:`a + b` and a block:",
        "",
        ".. math:: x = 1",
        "",
        "Example::",
        "",
        "    code()",
        "",
        "``fast``",
        "    the default preset.",
        "",
        "Args:",
        "    seed, generator: noise source.",
    ])
    out = rst_to_markdown(text)
    assert "**Title**" in out and "-----" not in out
    assert r"\(a + b\)" in out and "$$\nx = 1\n$$" in out
    assert "Example:\n\n```text\ncode()\n```" in out
    assert "``fast``\n:   the default preset." in out
    assert "    seed: noise source.\n    generator: noise source." in out
