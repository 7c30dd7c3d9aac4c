"""Build-time helpers of the documentation site (an MkDocs hook and a Griffe extension).

Nothing in the pages is retyped from the code or from benchmark output; this module generates it
while ``mkdocs build`` runs:

* ``<!-- cli-reference -->`` in a page becomes the reference of every ``singan-insert`` command,
  generated from :func:`singan_insert.cli.build_parser` (usage, and one table of options per
  command with their defaults and help).
* ``<!-- benchmark-results -->`` becomes every ``benchmarks/results/*.md`` table present at build
  time, each with the date and machine from the JSON file written beside it.
* ``<!-- include: PATH -->`` becomes the text of ``PATH`` (relative to the repository root), for
  generated markdown such as the metrics written by ``docs/figures/make_demo_figure.py``. A
  missing file fails the build.
* :class:`RstToMarkdown` (a Griffe extension, configured in ``mkdocs.yml``) turns the
  reStructuredText idioms of the package's docstrings into Markdown for mkdocstrings: math
  (``:math:`` and ``.. math::``), section titles, literal blocks, simple tables, definition lists
  and cross-references. A reference to a ``singan_insert`` object becomes a link, so a reference
  to something that does not exist fails ``mkdocs build --strict``.

It also writes the MathJax configuration that ``mkdocs.yml`` loads (``javascripts/mathjax.js``)
into the built site. ``python docs/hooks.py`` prints the generated CLI reference.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "singan_insert"

CLI_MARKER = "<!-- cli-reference -->"
BENCHMARK_MARKER = "<!-- benchmark-results -->"
INCLUDE = re.compile(r"<!--\s*include:\s*(\S+)\s*-->")


# ---------------------------------------------------------------------------- MkDocs hook
def on_page_markdown(markdown: str, page, config, files) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference_markdown())
    if BENCHMARK_MARKER in markdown:
        markdown = markdown.replace(BENCHMARK_MARKER, benchmark_markdown())

    def include(match: re.Match) -> str:
        path = ROOT / match.group(1)
        if not path.is_file():
            from mkdocs.exceptions import PluginError

            raise PluginError(f"{page.file.src_path}: included file {match.group(1)} does not exist; "
                              "run the script in docs/figures/ that generates it.")
        return path.read_text().strip()

    return INCLUDE.sub(include, markdown)


MATHJAX_CONFIG = """\
// MathJax configuration for pymdownx.arithmatex (generic mode), written by docs/hooks.py.
window.MathJax = {
  tex: {inlineMath: [["\\\\(", "\\\\)"]], displayMath: [["\\\\[", "\\\\]"]],
        processEscapes: true, processEnvironments: true},
  options: {ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex"}
};
document$.subscribe(() => { MathJax.typesetPromise && MathJax.typesetPromise(); });
"""


def on_post_build(config) -> None:
    """Write the MathJax configuration that ``extra_javascript`` in mkdocs.yml loads."""
    path = Path(config["site_dir"]) / "javascripts" / "mathjax.js"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(MATHJAX_CONFIG)


# ---------------------------------------------------------------------------- CLI reference
def _cell(text: str) -> str:
    """Help text as Markdown: ``<name>`` would otherwise be read as an HTML tag."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _option_name(action: argparse.Action) -> str:
    if action.option_strings:
        names = ", ".join(f"`{name}`" for name in action.option_strings)
        if action.nargs == 0:
            return names
        metavar = action.metavar
        if metavar is None and action.choices is not None:
            metavar = "{" + ",".join(map(str, action.choices)) + "}"
        if metavar is None:
            metavar = action.dest.upper()
        if isinstance(metavar, tuple):
            metavar = " ".join(metavar)
        elif action.nargs == "+":
            metavar = f"{metavar} [{metavar} ...]"
        elif isinstance(action.nargs, int) and action.nargs > 1:
            metavar = " ".join([metavar] * action.nargs)
        return f"{names} `{metavar}`"
    return f"`{action.metavar or action.dest}`"


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    exclusive = {}
    for group in parser._mutually_exclusive_groups:  # argparse has no public accessor
        members = list(group._group_actions)
        for action in members:
            others = ", ".join(f"`{o.option_strings[0]}`" for o in members if o is not action)
            everyone = ", ".join(f"`{o.option_strings[0]}`" for o in members)
            exclusive[action] = (group.required, everyone if group.required else others)
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) \
                or action.help == argparse.SUPPRESS:
            continue
        if not action.option_strings:
            required = "positional"
        elif action in exclusive:
            group_required, others = exclusive[action]
            required = ("exactly one of " if group_required else "not with ") + others
        else:
            required = "required" if action.required else ""
        default = action.default
        if action.nargs == 0 or default is None or action.required:
            default_text = ""
        elif isinstance(default, (list, tuple)):
            default_text = "`" + " ".join(map(str, default)) + "`"
        else:
            default_text = f"`{default}`"
        choices = ""
        if action.choices is not None and action.option_strings and action.metavar is not None:
            choices = " (" + ", ".join(map(str, action.choices)) + ")"
        rows.append(f"| {_option_name(action)} | {_cell(required)} | {default_text} | "
                    f"{_cell((action.help or '') + choices)} |")
    return rows


def cli_reference_markdown() -> str:
    """Markdown reference of every command, generated from ``singan_insert.cli.build_parser()``."""
    from singan_insert.cli import build_parser

    parser = build_parser()

    def fixed_width(prog):
        return argparse.HelpFormatter(prog, width=88)

    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in subparsers._choices_actions}
    parser.formatter_class = fixed_width
    lines = [f"```text\n{parser.format_usage().strip()}\n```", "",
             "| command | what it does |", "|---|---|"]
    lines += [f"| [`{name}`](#singan-insert-{name}) | {_cell(helps.get(name, ''))} |"
              for name in subparsers.choices]
    for name, sub in subparsers.choices.items():
        sub.formatter_class = fixed_width
        lines += ["", f"## `singan-insert {name}`", "", _cell(sub.description or helps.get(name, "")), "",
                  f"```text\n{sub.format_usage().strip()}\n```", "",
                  "| argument | required | default | description |", "|---|---|---|---|",
                  *_option_rows(sub)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- benchmarks
def benchmark_markdown(results: Path = ROOT / "benchmarks" / "results") -> str:
    """Every ``benchmarks/results/*.md`` with the date and machine of its JSON twin."""
    tables = sorted(results.glob("*.md")) if results.is_dir() else []
    if not tables:
        return ("!!! note \"No results at build time\"\n"
                "    `benchmarks/results/` held no tables when this site was built. Run the "
                "benchmark scripts (see above) and rebuild.")
    parts = []
    for path in tables:
        machine = {}
        twin = path.with_suffix(".json")
        if twin.is_file():
            try:
                machine = json.loads(twin.read_text()).get("machine", {})
            except json.JSONDecodeError:
                machine = {}
        parts.append(f"### `{path.stem}`")
        if machine:
            cuda = machine.get("cuda") or "no GPU"
            parts.append(
                f"*Run {machine.get('date', '?')} on {machine.get('cpu_count', '?')} CPUs "
                f"({machine.get('platform', '?')}), {cuda}, torch {machine.get('torch', '?')}, "
                f"{machine.get('torch_threads', '?')} torch threads"
                + (f", load average {machine['load_average_1min']:.1f}"
                   if isinstance(machine.get("load_average_1min"), (int, float)) else "")
                + f". Source: `benchmarks/results/{path.name}`.*")
        else:
            parts.append(f"*Source: `benchmarks/results/{path.name}` (no JSON with the machine "
                         "beside it).*")
        body = path.read_text().strip()
        # Headings inside a result file must not outrank the section they are included in.
        body = re.sub(r"^(#{1,3}) ", lambda m: "#" * 4 + " ", body, flags=re.MULTILINE)
        parts += ["", body, ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------- docstrings
try:
    from griffe import Extension
except ImportError:  # the MkDocs hook works without griffe
    Extension = object

_GOOGLE_SECTIONS = {
    "args", "arguments", "parameters", "params", "returns", "return", "yields", "yield",
    "raises", "raise", "attributes", "examples", "example", "note", "notes", "warning",
    "warnings", "warns", "other parameters", "receives", "methods", "functions", "classes",
    "modules", "see also", "references", "todo",
}
_ROLE = re.compile(r":(class|func|meth|mod|attr|data|exc|obj|const):`(~?)([^`<>]+?)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<(https?://[^>]+)>`__?")
_UNDERLINE = re.compile(r"^([-=~^\"'`#*+])\1{2,}\s*$")
_TABLE_RULE = re.compile(r"^=+( +=+)+\s*$")
_TWO_COLUMNS = re.compile(r"^(``[^`]+``)\s{2,}(\S.*)$")
_NUMBERED = re.compile(r"^\d+[.)]\s")


class RstToMarkdown(Extension):
    """Griffe extension: reStructuredText idioms of the package's docstrings to Markdown."""

    def on_package(self, *, pkg, **kwargs) -> None:
        if pkg.path != PACKAGE:
            return
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = rst_to_markdown(obj.docstring.value, obj, pkg)


def _walk(obj, seen=None):
    seen = set() if seen is None else seen
    if obj.path in seen or obj.is_alias:
        return
    seen.add(obj.path)
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member, seen)


def _lookup(pkg, path: str):
    """The Griffe object at ``path`` (aliases followed), or None."""
    parts = path.split(".")
    if parts[0] != pkg.path:
        return None
    obj = pkg
    try:
        for part in parts[1:]:
            obj = obj.members[part]
            if obj.is_alias:
                obj = obj.final_target
    except Exception:  # noqa: BLE001 - unresolvable alias or missing member
        return None
    return obj


def _resolve(target: str, obj, pkg) -> tuple[str | None, bool]:
    """(canonical path, qualified) of a reference written in ``obj``'s docstring."""
    module = obj if obj.is_module else obj.module
    candidates = []
    qualified = target.startswith(PACKAGE + ".") or target == PACKAGE or target.startswith(".")
    if target.startswith("."):
        base = module.path.split(".") if module.is_init_module else module.path.split(".")[:-1]
        dots = len(target) - len(target.lstrip("."))
        base = base[: len(base) - (dots - 1)] if dots > 1 else base
        candidates.append(".".join(base + [target.lstrip(".")]))
    elif qualified:
        candidates.append(target)
    else:
        scope = obj if obj.is_class or obj.is_module else obj.parent
        while scope is not None:
            candidates.append(f"{scope.path}.{target}")
            scope = scope.parent
    for candidate in candidates:
        found = _lookup(pkg, candidate)
        if found is not None:
            return found.path, qualified
    return (candidates[0] if qualified and candidates else None), qualified


def _is_rendered(path: str) -> bool:
    return not any(part.startswith("_") and not part.startswith("__") for part in path.split("."))


def rst_to_markdown(text: str, obj=None, pkg=None) -> str:
    """Convert one docstring (see :class:`RstToMarkdown`)."""
    text = _MATH_ROLE.sub(lambda m: f"\\({m.group(1)}\\)", text)
    text = _RST_LINK.sub(lambda m: f"[{m.group(1)}]({m.group(2)})", text)

    def role(match: re.Match) -> str:
        short, target = match.group(2) == "~", match.group(3).strip()
        shown = target.lstrip(".").split(".")[-1] if short else target.lstrip(".")
        if match.group(1) in ("func", "meth"):
            shown += "()"
        if obj is None or pkg is None:
            return f"`{shown}`"
        path, qualified = _resolve(target, obj, pkg)
        if path is not None and (_is_rendered(path) or _lookup(pkg, path) is None):
            return f"[`{shown}`][{path}]"  # a missing target fails `mkdocs build --strict`
        return f"`{shown}`"

    text = _ROLE.sub(role, text)
    return "\n".join(_blocks(_split_grouped_parameters(text.split("\n"))))


_PARAMETER_SECTIONS = {"args", "arguments", "parameters", "params", "attributes", "other parameters"}
_GROUP = re.compile(r"^(\s*)((?:\*{0,2}\w+\s*,\s*)+\*{0,2}\w+)\s*:(.*)$")
_OPEN_GROUP = re.compile(r"^(\s*)((?:\*{0,2}\w+\s*,\s*)+)$")


def _split_grouped_parameters(lines: list[str]) -> list[str]:
    """``a, b: text`` in an Args/Attributes section becomes one entry per name (same text).

    Google style has one name per entry; the package's docstrings group parameters that share a
    description, which Griffe would report as unknown parameters. A group may wrap over lines.
    """
    out: list[str] = []
    i, section_indent, entry_indent = 0, None, None
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        indent = _indent(line)
        if stripped.endswith(":") and stripped[:-1].strip().lower() in _PARAMETER_SECTIONS:
            section_indent, entry_indent = indent, None
            out.append(line)
            i += 1
            continue
        if section_indent is not None and stripped and indent <= section_indent:
            section_indent = None
        if section_indent is None or not stripped:
            out.append(line)
            i += 1
            continue
        entry_indent = indent if entry_indent is None else entry_indent
        if indent == entry_indent:
            # join a group of names that wraps onto the next line(s)
            while _OPEN_GROUP.match(line) and i + 1 < len(lines) and _indent(lines[i + 1]) == indent:
                i += 1
                line = line.rstrip() + " " + lines[i].strip()
            match = _GROUP.match(line)
            if match:
                body, j = _take_indented(lines, i + 1, indent)
                for name in (n.strip() for n in match.group(2).split(",")):
                    out.append(f"{match.group(1)}{name}:{match.group(3)}")
                    out += body
                i = j
                continue
        out.append(line)
        i += 1
    return out


def _is_section(line: str) -> bool:
    """A Google-style section header such as ``Args:`` (its body must stay as it is)."""
    stripped = line.strip()
    return stripped.endswith(":") and stripped[:-1].strip().lower() in _GOOGLE_SECTIONS


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _take_indented(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
    """Lines from ``start`` indented deeper than ``base`` (blank lines inside kept)."""
    block, i = [], start
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
        block.append(lines[i])
        i += 1
    while block and not block[-1].strip():
        block.pop()
        i -= 1
    return block, i


def _blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        indent = _indent(line)
        # .. math:: (inline form or indented block)
        if stripped.startswith(".. math::"):
            inline = stripped[len(".. math::"):].strip()
            body, i = _take_indented(lines, i + 1, indent)
            maths = [inline] if inline else []
            maths += textwrap.dedent("\n".join(body)).strip("\n").split("\n") if body else []
            pad = " " * indent
            out += ["", pad + "$$", *[pad + m for m in maths], pad + "$$", ""]
            continue
        # a literal block introduced by "::"
        if stripped.endswith("::") and i + 1 < len(lines) and not lines[i + 1].strip():
            intro = line.rstrip()[:-2].rstrip()
            out.append(intro + (":" if intro and not intro.endswith(" ") and stripped != "::" else ""))
            body, i = _take_indented(lines, i + 2, indent)
            pad = " " * indent
            out += ["", pad + "```text",
                    *[pad + b for b in textwrap.dedent("\n".join(body)).split("\n")],
                    pad + "```", ""]
            continue
        # a simple RST table
        if _TABLE_RULE.match(stripped) and indent == 0:
            table, i = _rst_table(lines, i)
            out += table
            continue
        # a section title underlined with ---- or ====
        if stripped and i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1].strip()) \
                and len(lines[i + 1].strip()) >= len(stripped) and indent == 0:
            out += [f"**{stripped}**", ""]
            i += 2
            continue
        # a two-column list: ``term``   text (continued on indented lines)
        two_columns = _TWO_COLUMNS.match(line)
        if two_columns:
            body, j = _take_indented(lines, i + 1, 0)
            out += ["", two_columns.group(1),
                    ":   " + " ".join([two_columns.group(2).strip(), *[b.strip() for b in body]])]
            if j >= len(lines) or not _TWO_COLUMNS.match(lines[j]):
                out.append("")
            i = j
            continue
        # a definition list: a term (one or more lines at column 0) followed by an indented body
        previous_blank = i == 0 or not lines[i - 1].strip()
        if stripped and indent == 0 and previous_blank and not _NUMBERED.match(stripped) \
                and not stripped.startswith(("*", "-", "$$", "|", "```", ":", ">>>")):
            term_end = i
            while term_end + 1 < len(lines) and lines[term_end + 1].strip() \
                    and _indent(lines[term_end + 1]) == 0 and not lines[term_end].rstrip().endswith("::") \
                    and not _is_section(lines[term_end + 1]):
                term_end += 1
            follows = lines[term_end + 1] if term_end + 1 < len(lines) else ""
            term = " ".join(line.strip() for line in lines[i:term_end + 1])
            section = _is_section(lines[term_end])
            if follows.strip() and _indent(follows) > 0 and not section \
                    and not lines[term_end].rstrip().endswith("::"):
                body, j = _take_indented(lines, term_end + 1, 0)
                body_lines = _blocks(textwrap.dedent("\n".join(body)).split("\n"))
                while body_lines and not body_lines[0].strip():
                    body_lines.pop(0)
                out += [term, ":   " + body_lines[0],
                        *["    " + b if b else "" for b in body_lines[1:]], ""]
                i = j
                continue
        # a bullet whose continuation lines are indented by 2 (reST) needs 4 (Markdown)
        if stripped.startswith(("* ", "- ")):
            if out and out[-1].strip() and not out[-1].strip().startswith(("* ", "- ")) \
                    and _indent(out[-1]) >= indent:
                out.append("")  # a list item right after a paragraph line would be read as text
            body, j = _take_indented(lines, i + 1, indent)
            if body and any(b.strip() and _indent(b) < indent + 4 for b in body):
                out.append(line)
                out += _blocks(["  " + b if b.strip() else b for b in body])
                i = j
                continue
        out.append(line)
        i += 1
    return out


def _rst_table(lines: list[str], start: int) -> tuple[list[str], int]:
    rule = lines[start]
    spans = [(m.start(), m.end()) for m in re.finditer(r"=+", rule)]

    def cells(row: str) -> list[str]:
        by_gaps = re.split(r"\s{2,}", row.strip())
        if len(by_gaps) == len(spans):  # robust to a cell wider than its column rule
            return by_gaps
        bounds = [s for s, _ in spans] + [None]
        return [row[bounds[k]:bounds[k + 1]].strip() if bounds[k] < len(row) else ""
                for k in range(len(spans))]

    rows, i, rules = [], start + 1, 1
    while i < len(lines) and rules < 3:
        if _TABLE_RULE.match(lines[i].strip()):
            rules += 1
        elif lines[i].strip():
            rows.append(cells(lines[i]))
        i += 1
    if not rows:
        return [rule], start + 1
    table = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(spans)]
    table += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return ["", *table, ""], i


if __name__ == "__main__":
    print(cli_reference_markdown())
