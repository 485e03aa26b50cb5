"""The docs' build check: they are plain Markdown, so this file is what "warnings as errors" means for them.

* every relative link and image in README.md, CHANGELOG.md and docs/*.md points to a file that exists (and
  a ``#anchor`` into a Markdown file to one of its headings); all broken links are reported at once;
* docs/configuration.md names every ``FOAM(...)`` argument, every ``optim_args`` key and every
  ``FoamConfig`` field, and the defaults it states are the code's;
* every error message docs/configuration.md quotes is still what the code raises for the bad value the
  page gives next to it: each row of a table marked ``<!-- checked-errors: KIND -->`` is run.

Table conventions (docs/configuration.md explains them to readers too): the first cell holds the input as a
code span, the last cell the error as a code span ``Type: message``, where ``…`` stands for omitted text.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = ROOT / "docs" / "configuration.md"


def doc_files() -> list[Path]:
    return [p for p in (ROOT / "README.md", ROOT / "CHANGELOG.md") if p.exists()] + sorted((ROOT / "docs").glob("*.md"))


# ----------------------------------------------------------------------------------------- Markdown parsing

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")
_INLINE_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
_REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ID = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) for every line outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if match:
            marker = match.group(1)
            if fence is None:
                fence = marker
            elif marker[0] == fence[0] and len(marker) >= len(fence):
                fence = None
            continue
        if fence is None:
            lines.append((number, line))
    return lines


def code_spans(text: str) -> list[str]:
    """Contents of the code spans of ``text``, one leading and trailing space stripped as CommonMark does."""
    spans = []
    for match in _CODE_SPAN.finditer(text):
        content = match.group(2)
        if len(content) > 2 and content.startswith(" ") and content.endswith(" "):
            content = content[1:-1]
        spans.append(content)
    return spans


def heading_anchors(text: str) -> set[str]:
    """The anchors the repository host gives the headings of a page (lower case, punctuation dropped,
    spaces to hyphens, ``-1``, ``-2`` for repeats), plus explicit ``<a id=...>`` anchors."""
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for _, line in prose_lines(text):
        anchors.update(_HTML_ID.findall(line))
        match = _HEADING.match(line)
        if not match:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(2)).replace("`", "")
        slug = "".join(ch for ch in title.lower() if ch in " -_" or unicodedata.category(ch)[0] in "LN").replace(
            " ", "-"
        )
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every inline link, image and reference definition outside code."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        prose = _CODE_SPAN.sub("", line)
        found += [(number, target) for target in _INLINE_LINK.findall(prose)]
        found += [(number, target) for target in _REFERENCE_DEF.findall(prose)]
    return found


def broken_links(pages: list[Path], root: Path = ROOT) -> list[str]:
    """``file:line: why`` for every link of ``pages`` whose file (or heading anchor) does not exist."""
    problems = []
    for page in pages:
        where = page.relative_to(root).as_posix()
        for number, target in links(page):
            if not target:
                problems.append(f"{where}:{number}: empty link target")
                continue
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
                continue
            file_part, _, anchor = target.partition("#")
            file_part = file_part.split("?", 1)[0]
            resolved = (page.parent / file_part).resolve() if file_part else page
            rel = resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else str(resolved)
            if not resolved.exists():
                problems.append(f"{where}:{number}: {target!r} -> {rel} does not exist")
                continue
            if anchor and resolved.suffix == ".md" and resolved.is_file():
                if anchor not in heading_anchors(resolved.read_text(encoding="utf-8")):
                    problems.append(f"{where}:{number}: {target!r}: {rel} has no heading with anchor #{anchor}")
    return problems


# ------------------------------------------------------------------------------------ cited tests

# `tests/test_x.py::test_name`, or `::test_name` after one (the same file), in a code span; parametrize ids dropped.
_CITED_TEST = re.compile(r"`((?:tests/[\w/]+\.py)?)::(test_\w+)(?:\[[^\]`]*\])?`")


def cited_tests(path: Path) -> list[tuple[int, str, str]]:
    """(line, file, test name) of every test a page cites; ``::name`` cites the file named last before it."""
    found, current = [], ""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        for file, name in _CITED_TEST.findall(line):
            current = file or current
            found.append((number, current, name))
    return found


def missing_tests(pages: list[Path], root: Path = ROOT) -> list[str]:
    """``page:line: why`` for every cited test whose file or top-level function does not exist."""
    problems, defined = [], {}
    for page in pages:
        where = page.relative_to(root).as_posix()
        for number, file, name in cited_tests(page):
            if not file:
                problems.append(f"{where}:{number}: ::{name} cites no file before it")
                continue
            if file not in defined:
                source = root / file
                tree = ast.parse(source.read_text(encoding="utf-8")) if source.is_file() else None
                defined[file] = None if tree is None else {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            if defined[file] is None:
                problems.append(f"{where}:{number}: {file} does not exist")
            elif name not in defined[file]:
                problems.append(f"{where}:{number}: {file} has no test {name}")
    return problems


# ------------------------------------------------------------------------------------ checked tables

_MARKER = re.compile(r"<!--\s*checked-(errors|defaults|setup)(?::\s*(\S+))?\s*-->")


@dataclass(frozen=True)
class Row:
    kind: str  # "errors" or "defaults"
    target: str  # errors: python | optim_args | trainer; defaults: FOAM | FoamConfig | TrainingArguments
    line: int
    cells: tuple[str, ...]


def split_cells(line: str) -> tuple[str, ...]:
    """Cells of a GFM table row; ``\\|`` is a literal pipe (also inside code spans)."""
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return tuple(cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", body))


def checked_tables(path: Path = CONFIGURATION) -> tuple[list[Row], str | None, list[str]]:
    """Rows of every marked table, the setup code, and the markers not followed by a table."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rows: list[Row] = []
    setup: str | None = None
    orphans: list[str] = []
    for index, line in enumerate(lines):
        match = _MARKER.search(line)
        if not match:
            continue
        kind, target = match.group(1), match.group(2) or ""
        j = index + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if kind == "setup":
            if j < len(lines) and lines[j].startswith("```python"):
                end = lines.index("```", j + 1)
                setup = "\n".join(lines[j + 1 : end])
            else:
                orphans.append(f"line {index + 1}: checked-setup is not followed by a ```python block")
            continue
        if j + 1 >= len(lines) or not lines[j].lstrip().startswith("|") or "---" not in lines[j + 1]:
            orphans.append(f"line {index + 1}: checked-{kind} is not followed by a table")
            continue
        j += 2
        before = len(rows)
        while j < len(lines) and lines[j].lstrip().startswith("|"):
            rows.append(Row(kind, target, j + 1, split_cells(lines[j])))
            j += 1
        if len(rows) == before:
            orphans.append(f"line {index + 1}: checked-{kind} table has no rows")
    return rows, setup, orphans


ROWS, SETUP, ORPHANS = checked_tables() if CONFIGURATION.exists() else ([], None, ["docs/configuration.md missing"])
ERROR_ROWS = [row for row in ROWS if row.kind == "errors"]


def first_span(cell: str, what: str, row: Row) -> str:
    spans = code_spans(cell)
    assert spans, f"configuration.md:{row.line}: the {what} cell {cell!r} holds no code span"
    return spans[0]


def normalize(text: str) -> str:
    return " ".join(text.split())


def assert_documented_error(row: Row, error: BaseException) -> None:
    documented = first_span(row.cells[-1], "error", row)
    type_name, sep, message = documented.partition(": ")
    assert sep, f"configuration.md:{row.line}: write the error as `Type: message`, got {documented!r}"
    actual = normalize(str(error))
    assert type(error).__name__ == type_name, (
        f"configuration.md:{row.line}: documented {type_name}, the code raises {type(error).__name__}: {actual}"
    )
    # The pieces between "…" appear in order; the message starts with the first and ends with the last, unless
    # the documented message starts or ends with "…" (text left out there).
    pieces = [normalize(p) for p in message.split("…")]
    position = 0
    for index, piece in enumerate(pieces):
        found = actual.find(piece, position)
        assert found >= 0, (
            f"configuration.md:{row.line}: the documented message is no longer what the code says.\n"
            f"  missing: {piece!r}\n  actual:  {actual!r}"
        )
        assert index > 0 or found == 0, (
            f"configuration.md:{row.line}: the code's message starts with text the table leaves out (start the "
            f"cell with '…' or quote it).\n  actual:  {actual!r}"
        )
        position = found + len(piece)
    assert pieces[-1] == "" or position == len(actual), (
        f"configuration.md:{row.line}: the code's message goes on after the documented text (end the cell with "
        f"'…' or quote the rest).\n  actual:  {actual!r}"
    )


@pytest.fixture(scope="module")
def setup_namespace() -> dict:
    assert SETUP is not None, "docs/configuration.md has no <!-- checked-setup --> python block"
    namespace: dict = {}
    exec(SETUP, namespace)  # the page's own setup code, exactly as readers see it
    return namespace


# ----------------------------------------------------------------------------------------------- tests


def test_relative_links_point_to_existing_files():
    problems = broken_links(doc_files())
    assert not problems, "broken links in the docs:\n" + "\n".join(problems)


def test_link_checker_catches_what_it_should(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "img.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title `x`\n\n[ok](#title-x) [bad](#nope) [file](missing.md)\n\n```\n[in code](nowhere.md)\n```\n"
        "`[span](nowhere.md)` ![img](img.png) [web](https://example.org/x.md)\n"
        "[sub](docs/benchmarks.md) [anchor](page.md#title-x) [ref]: other.md\n",
        encoding="utf-8",
    )
    assert links(page) == [
        (3, "#title-x"),
        (3, "#nope"),
        (3, "missing.md"),
        (8, "img.png"),
        (8, "https://example.org/x.md"),
        (9, "docs/benchmarks.md"),
        (9, "page.md#title-x"),
    ]
    assert heading_anchors(page.read_text(encoding="utf-8")) == {"title-x"}
    assert broken_links([page], root=tmp_path) == [
        "page.md:3: '#nope': page.md has no heading with anchor #nope",
        "page.md:3: 'missing.md' -> missing.md does not exist",
        "page.md:9: 'docs/benchmarks.md' -> docs/benchmarks.md does not exist",
    ]


def test_cited_tests_exist():
    """docs/guarantees.md names the test that proves each promise: a renamed or deleted test must not leave a
    promise that cites nothing."""
    cited = [c for page in doc_files() for c in cited_tests(page)]
    assert len(cited) >= 50, f"only {len(cited)} cited tests found: the pattern no longer matches the docs"
    problems = missing_tests(doc_files())
    assert not problems, "the docs cite tests that do not exist:\n" + "\n".join(problems)


def test_cited_test_checker_catches_what_it_should(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("def test_one():\n    pass\n\n\ndef helper():\n    pass\n")
    page = tmp_path / "page.md"
    page.write_text(
        "| `tests/test_a.py::test_one`, `::test_two` |\n`::test_one[x-1]` `tests/test_b.py::test_one`\n"
        "`::test_orphan` is fine: it follows test_b\n",
        encoding="utf-8",
    )
    assert cited_tests(page) == [
        (1, "tests/test_a.py", "test_one"),
        (1, "tests/test_a.py", "test_two"),
        (2, "tests/test_a.py", "test_one"),
        (2, "tests/test_b.py", "test_one"),
        (3, "tests/test_b.py", "test_orphan"),
    ]
    assert missing_tests([page], root=tmp_path) == [
        "page.md:1: tests/test_a.py has no test test_two",
        "page.md:2: tests/test_b.py does not exist",
        "page.md:3: tests/test_b.py does not exist",
    ]
    lone = tmp_path / "lone.md"
    lone.write_text("`::test_one`\n", encoding="utf-8")
    assert missing_tests([lone], root=tmp_path) == ["lone.md:1: ::test_one cites no file before it"]


def test_marked_tables_parse():
    assert not ORPHANS, "\n".join(ORPHANS)
    # A parser that silently found nothing would make every check below pass vacuously.
    assert len(ERROR_ROWS) >= 40, f"only {len(ERROR_ROWS)} checked error rows found in docs/configuration.md"
    assert {row.target for row in ERROR_ROWS} == {"python", "optim_args", "trainer"}


def test_error_check_rejects_a_stale_message():
    from foam_hf import FoamConfigError

    error = FoamConfigError("FOAM: lr=-0.001 is invalid: it must be finite and >= 0.\nFix: pass e.g. lr=1e-3.")
    documented = "`FoamConfigError: FOAM: lr=-0.001 is invalid: … Fix: pass e.g. lr=1e-3.`"
    assert_documented_error(Row("errors", "python", 1, ("`x`", documented)), error)
    for stale in (
        "`FoamConfigError: FOAM: lr=-0.001 is invalid: … Fix: pass lr=1e-3.`",  # message changed
        "`TypeError: FOAM: lr=-0.001 is invalid`",  # type changed
        "`FoamConfigError: Fix: pass e.g. lr=1e-3. … FOAM: lr=-0.001`",  # pieces out of order
    ):
        with pytest.raises(AssertionError):
            assert_documented_error(Row("errors", "python", 1, ("`x`", stale)), error)


def test_every_option_is_documented():
    from foam_hf import FOAM, FoamConfig
    from foam_hf.config import OPTIM_ARGS_KEYS

    text = CONFIGURATION.read_text(encoding="utf-8")
    spans = set(code_spans(text))
    names = {
        "FOAM argument": list(inspect.signature(FOAM.__init__).parameters)[1:],
        "optim_args key": list(OPTIM_ARGS_KEYS),
        "FoamConfig field": [f.name for f in dataclasses.fields(FoamConfig)],
    }
    missing = [f"{what} `{name}`" for what, keys in names.items() for name in keys if name not in spans]
    assert not missing, "docs/configuration.md does not mention (as `code`): " + ", ".join(missing)


def _defaults(target: str) -> dict[str, object]:
    if target == "FOAM":
        from foam_hf import FOAM

        params = list(inspect.signature(FOAM.__init__).parameters.values())[1:]
        return {p.name: p.default for p in params}
    if target == "FoamConfig":
        from foam_hf import FoamConfig

        return {
            f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(FoamConfig)
        }
    if target == "TrainingArguments":
        from transformers import TrainingArguments

        return {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    raise AssertionError(f"unknown checked-defaults target {target!r}")


#: transformers' default optim on torch >= 2.8 (what the page shows), and on older torch.
OPTIM_DEFAULTS = ("adamw_torch_fused", "adamw_torch")


def _torch_at_least(major: int, minor: int) -> bool:
    import torch

    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (major, minor)


@pytest.mark.parametrize("target", ["FOAM", "FoamConfig", "TrainingArguments"])
def test_documented_defaults_are_the_code_defaults(target):
    rows = [row for row in ROWS if row.kind == "defaults" and row.target == target]
    assert rows, f"no <!-- checked-defaults: {target} --> table in docs/configuration.md"
    defaults = _defaults(target)
    problems, seen = [], set()
    for row in rows:
        name = first_span(row.cells[0], "name", row)
        seen.add(name)
        spans = code_spans(row.cells[1])
        if name not in defaults:
            if spans:
                problems.append(f"line {row.line}: {name!r} is not a {target} option but has a default {spans[0]}")
            continue
        if not spans:
            if defaults[name] is not inspect.Parameter.empty:
                problems.append(f"line {row.line}: {name!r} has default {defaults[name]!r}; the page gives none")
            continue
        documented = ast.literal_eval(spans[0])
        older_torch = (target, name, documented, defaults[name]) == ("TrainingArguments", "optim", *OPTIM_DEFAULTS)
        if older_torch and not _torch_at_least(2, 8):
            continue  # the page gives torch >= 2.8's default and says that older torch gets 'adamw_torch'
        if documented != defaults[name]:
            problems.append(f"line {row.line}: {name!r} default documented {documented!r}, code {defaults[name]!r}")
    if target != "TrainingArguments":  # only the fields that feed FOAM are listed for TrainingArguments
        problems += [f"{name!r} has no row" for name in defaults if name not in seen]
    assert not problems, f"checked-defaults: {target} in docs/configuration.md:\n" + "\n".join(problems)


@pytest.mark.parametrize("row", ERROR_ROWS, ids=[f"configuration.md:{row.line}" for row in ERROR_ROWS])
def test_documented_error_is_raised(row, setup_namespace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # TrainingArguments(output_dir="out") and Trainer write nothing elsewhere
    namespace = dict(setup_namespace)
    code = first_span(row.cells[0], "input", row)
    if row.target == "python":
        with pytest.raises(Exception) as info:
            exec(code, namespace)
        assert_documented_error(row, info.value)
    elif row.target == "optim_args":
        value = ast.literal_eval(code)
        with pytest.raises(Exception) as info:
            namespace["FoamConfig"].from_optim_args(value)
        assert_documented_error(row, info.value)
        with pytest.raises(Exception) as info:
            namespace["TrainingArguments"](output_dir="out", optim="foam", optim_args=value)
        assert_documented_error(row, info.value)
    elif row.target == "trainer":
        stage = first_span(row.cells[1], "raised at", row)
        kwargs = eval(f"dict({code})", namespace)
        try:
            args = namespace["TrainingArguments"](output_dir="out", **kwargs)
        except Exception as error:
            assert stage.startswith("TrainingArguments"), (
                f"configuration.md:{row.line}: documented at {stage}, raised by TrainingArguments: {error}"
            )
            assert_documented_error(row, error)
            return
        assert stage.startswith("create_optimizer"), (
            f"configuration.md:{row.line}: documented at {stage}, but TrainingArguments({code}) passed"
        )
        trainer = namespace["Trainer"](model=namespace["model"], args=args)
        with pytest.raises(Exception) as info:
            trainer.create_optimizer()
        assert_documented_error(row, info.value)
    else:
        raise AssertionError(f"configuration.md:{row.line}: unknown checked-errors kind {row.target!r}")


def test_figures_are_small():
    for png in (ROOT / "docs" / "figures").glob("*.png"):
        assert png.stat().st_size < 150_000, f"{png.name} is {png.stat().st_size} bytes; keep figures < 150 KB"


MEMORY_SECTIONS = re.findall(r"^## ([\w.\-]+): ", (ROOT / "docs" / "memory.md").read_text(), re.M)


@pytest.mark.parametrize("model", MEMORY_SECTIONS)
def test_memory_page_sections_are_what_the_calculator_prints(model, capsys):
    # docs/memory.md says "regenerate any section with foam-hf memory NAME": each section must be that output.
    from foam_hf.tools.cli import main

    text = (ROOT / "docs" / "memory.md").read_text()
    start = text.index(f"## {model}: ")
    following = text.find("\n## ", start + 1)
    section = text[start : following if following >= 0 else len(text)].strip()
    assert main(["memory", model]) == 0
    assert section == capsys.readouterr().out.strip(), f"regenerate with: foam-hf memory {model}"


def test_the_memory_page_has_every_built_in_model():
    from foam_hf.tools.model_shapes import KNOWN_MODELS

    assert MEMORY_SECTIONS == list(KNOWN_MODELS)
