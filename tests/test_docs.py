"""The README stays a short entry point and every relative link in it and in docs/ leads somewhere.

No ComfyUI, torch or network needed: markdown files are read as text.
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 12 * 1024

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target), not images
DOC_MENTION = re.compile(r"(?<![\w/.-])(docs/[\w.-]+\.md)")  # docs/x.md named anywhere, linked or not
FENCE = re.compile(r"^(```|~~~)")


def prose(text: str) -> str:
    """The text outside fenced code blocks (a link-like string inside code is not a link)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return "\n".join(out)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (letters, digits, '-', '_' and spaces
    kept), spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    """Relative links of a markdown file whose file, or whose #anchor in a markdown file, does not exist."""
    bad = []
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{path.relative_to(ROOT)}: {target} (no heading #{anchor} in {dest.name})")
    return bad


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes, over {README_MAX_BYTES}: move detail to docs/ and link it")


def test_readme_keeps_the_set_up_commands():
    text = README.read_text(encoding="utf-8")
    for command in ("./dev demo", "./dev test"):  # CI and the issue ask for these two, verbatim
        assert re.search(re.escape(command) + r"(?![\w-])", text), f"README.md no longer shows `{command}`"


def test_docs_named_in_readme_exist():
    named = set(DOC_MENTION.findall(prose(README.read_text(encoding="utf-8"))))
    assert named, "README.md links no docs/*.md"
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"README.md names docs that do not exist: {missing}"


def test_every_doc_is_reachable_from_readme():
    named = set(DOC_MENTION.findall(prose(README.read_text(encoding="utf-8"))))
    orphans = sorted(f"docs/{p.name}" for p in DOCS.glob("*.md") if f"docs/{p.name}" not in named)
    assert not orphans, f"docs not linked from README.md: {orphans}"


def test_relative_links_resolve():
    bad = []
    for path in [README, *sorted(DOCS.glob("*.md"))]:
        bad += broken_links(path)
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_slug_matches_githubs_rule():
    assert slug("Weight sharding (FSDP2) and fp8 weights") == "weight-sharding-fsdp2-and-fp8-weights"
    assert slug("FLUX.2") == "flux2"
    assert slug("Which degrees? `layout = auto` and `plan`") == "which-degrees-layout--auto-and-plan"


def test_readme_recipes_are_the_planners():
    """The README's recipes table is what `python scripts/recipes.py --readme` prints from the planner today (builds
    each model on the meta device: no weights, about 20 s on one CPU core)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipes", ROOT / "scripts" / "recipes.py")
    recipes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipes)
    table = recipes.readme_table()
    assert table in README.read_text(encoding="utf-8"), (
        "README.md's recipes table differs from the planner's; paste `python scripts/recipes.py --readme`:\n" + table)
