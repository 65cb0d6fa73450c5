"""The reference guides stay true to the lessons ("Teach the why", item 7).

- lessons/GLOSSARY.md: one `- **term**: definition ([NN](path), ...)` line per term, sorted
  (case-insensitive), no duplicates; every link goes to a lesson's .md, and every lesson an entry
  links uses the term, in its .md or .py.
- lessons/GLOSSARY.md and lessons/PATTERNS.md: every relative link points to a file that exists
  (and to a heading that exists, where it names one).
- lessons/PATTERNS.md: every `name_kernel` a pattern's section cites is defined in the .py of a
  lesson that section links, and every section says when to use it, when not, and its cost.
- every lesson's .md ends with a "## Further reading" section of at least 2 items.

Pure text: nothing is compiled or launched. Each check is a function that returns what is wrong,
and a test feeds it a known-bad input to prove it can fail.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.lessons import LESSONS, REPO

GUIDES = REPO / "lessons"
GLOSSARY = GUIDES / "GLOSSARY.md"
PATTERNS = GUIDES / "PATTERNS.md"
LESSON_BY_MARKDOWN = {lesson.markdown.resolve(): lesson for lesson in LESSONS}

ENTRY = re.compile(r"^- \*\*(?P<term>[^*]+)\*\*: (?P<definition>.+?) "
                   r"\((?P<links>\[\d\d\]\([^)\s]+\)(?:, \[\d\d\]\([^)\s]+\))*)\)$")
LINK = re.compile(r"\[(?P<label>[^\]]*)\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


@dataclass(frozen=True)
class Entry:
    term: str
    definition: str
    links: tuple[tuple[str, str], ...]  # (label "NN", relative path)


def parse_glossary(text: str) -> list[Entry]:
    """The glossary's entries; a list line that is not a well-formed entry raises ValueError."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.startswith("- "):
            continue
        match = ENTRY.match(line)
        if not match:
            raise ValueError(f"GLOSSARY.md line {number} is not `- **term**: definition ([NN](path))`: {line[:80]}")
        links = tuple((m["label"], m["target"]) for m in LINK.finditer(match["links"]))
        entries.append(Entry(match["term"].strip(), match["definition"], links))
    return entries


def order_problems(terms: list[str]) -> list[str]:
    """Duplicates (case-insensitive) and the first place where the list is out of order."""
    keys = [term.casefold() for term in terms]
    problems = [f"duplicate term: {term}" for i, term in enumerate(terms) if keys[i] in keys[:i]]
    for before, after in zip(terms, terms[1:]):
        if after.casefold() < before.casefold():
            problems.append(f"not alphabetical: '{after}' comes after '{before}'")
            break
    return problems


def term_pattern(term: str) -> re.Pattern:
    """The term as a whole word or phrase, any case, across line breaks, with a plural or -ed/-ing ending."""
    words = r"\s+".join(re.escape(word) for word in term.split())
    return re.compile(rf"(?<!\w){words}(?:s|es|ed|ing)?(?!\w)", re.I)


def lesson_text(lesson) -> str:
    return lesson.markdown.read_text() + "\n" + lesson.script.read_text()


def entry_problems(entry: Entry, guide_dir: Path = GUIDES) -> list[str]:
    """What is wrong with one entry's links: a file that is missing or not a lesson, or a lesson
    that never uses the term (so the link would send a newcomer to the wrong place)."""
    problems = []
    if not entry.links:
        problems.append(f"'{entry.term}' links no lesson")
    for label, target in entry.links:
        path = (guide_dir / target).resolve()
        lesson = LESSON_BY_MARKDOWN.get(path)
        if lesson is None:
            problems.append(f"'{entry.term}' links {target}, which is not a lesson's .md")
        elif label != lesson.number:
            problems.append(f"'{entry.term}' labels {target} as [{label}], it is lesson {lesson.number}")
        elif not term_pattern(entry.term).search(lesson_text(lesson)):
            problems.append(f"'{entry.term}' links lesson {lesson.number}, whose .md and .py never use it")
    return problems


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(markdown: str) -> list[str]:
    return re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", markdown), re.M)


def broken_links(markdown: str, where: Path) -> list[str]:
    """Relative links of `markdown` (a file in directory `where`) to a missing file or heading."""
    problems = []
    for match in LINK.finditer(re.sub(r"`[^`\n]*`", "", FENCE.sub("", markdown))):
        target = match["target"]
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (where / path_part).resolve() if path_part else None
        if path is not None and not path.exists():
            problems.append(f"{target}: no such file")
            continue
        if anchor and (path is None or path.suffix == ".md"):
            text = path.read_text() if path is not None else markdown
            if anchor not in {github_anchor(h) for h in headings(text)}:
                problems.append(f"{target}: no heading with anchor #{anchor}")
    return problems


def sections(markdown: str) -> list[tuple[str, str]]:
    """(title, body) of each `## ` section, code fences left out."""
    parts = re.split(r"^## +", FENCE.sub("", markdown), flags=re.M)[1:]
    return [(part.split("\n", 1)[0].strip(), part.split("\n", 1)[1] if "\n" in part else "") for part in parts]


def defines(script: str, name: str) -> bool:
    """A `def name(` or a module-level `name = ...` (an autotuned kernel) in the script."""
    return re.search(rf"^\s*def\s+{re.escape(name)}\s*\(|^{re.escape(name)}\s*=", script, re.M) is not None


def kernel_problems(section_body: str, guide_dir: Path = GUIDES) -> list[str]:
    """`*_kernel` names cited in backticks that no lesson linked from the same section defines."""
    lessons = [LESSON_BY_MARKDOWN[p] for p in ((guide_dir / m["target"].partition("#")[0]).resolve()
                                                for m in LINK.finditer(section_body)) if p in LESSON_BY_MARKDOWN]
    cited = {name for span in re.findall(r"`([^`]+)`", section_body) for name in re.findall(r"\b(\w+_kernel)\b", span)}
    if cited and not lessons:
        return [f"cites {sorted(cited)} but links no lesson"]
    scripts = [lesson.script.read_text() for lesson in lessons]
    numbers = ", ".join(lesson.number for lesson in lessons)
    return [f"`{name}` is defined in none of the linked lessons ({numbers})"
            for name in sorted(cited) if not any(defines(script, name) for script in scripts)]


PATTERN_PARTS = ("**Use it when**", "**Not when**", "**Cost**", "**In the course**")


def further_reading(markdown: str) -> list[str] | None:
    """The items of the last `## ` section if it is "Further reading", else None."""
    found = sections(markdown)
    if not found or found[-1][0].casefold() != "further reading":
        return None
    return [item.strip() for item in re.split(r"^- (?=\S)", found[-1][1], flags=re.M)[1:]]


def reference_problems(items: list[str] | None) -> list[str]:
    if items is None:
        return ["the last section is not '## Further reading'"]
    problems = [] if len(items) >= 2 else [f"'## Further reading' has {len(items)} item(s), at least 2 wanted"]
    for url in re.findall(r"https?://\S+", " ".join(items)):
        url = url.rstrip(".,;)")
        if not url.startswith("https://"):
            problems.append(f"{url}: not https")
        if "arxiv.org" in url and not re.fullmatch(r"https://arxiv\.org/abs/\d{4}\.\d{4,5}", url):
            problems.append(f"{url}: not an arxiv.org/abs/NNNN.NNNNN address")
    return problems


# --- the guides as they are ------------------------------------------------------------------

def test_glossary_entries_parse():
    entries = parse_glossary(GLOSSARY.read_text())
    assert len(entries) >= 50, f"only {len(entries)} glossary entries"


def test_glossary_is_sorted_without_duplicates():
    problems = order_problems([entry.term for entry in parse_glossary(GLOSSARY.read_text())])
    assert not problems, "\n".join(problems)


def test_every_glossary_term_is_used_by_the_lessons_it_links():
    problems = [p for entry in parse_glossary(GLOSSARY.read_text()) for p in entry_problems(entry)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("guide", [GLOSSARY, PATTERNS], ids=lambda path: path.name)
def test_guide_links_resolve(guide):
    problems = broken_links(guide.read_text(), guide.parent)
    assert not problems, f"{guide.name}:\n" + "\n".join(problems)


def test_patterns_cite_kernels_their_lessons_define():
    found = sections(PATTERNS.read_text())
    assert len(found) >= 9, [title for title, _ in found]
    problems = [f"{title}: {p}" for title, body in found for p in kernel_problems(body)]
    assert not problems, "\n".join(problems)


def test_every_pattern_says_when_when_not_and_what_it_costs():
    missing = [f"{title}: no {part}" for title, body in sections(PATTERNS.read_text())
               for part in PATTERN_PARTS if part not in body]
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("lesson", [lesson for lesson in LESSONS if lesson.markdown.exists()],
                         ids=lambda lesson: lesson.stem)
def test_lesson_ends_with_further_reading(lesson):
    problems = reference_problems(further_reading(lesson.markdown.read_text()))
    assert not problems, f"{lesson.markdown.name}: " + "; ".join(problems)


def test_readme_links_both_guides():
    readme = (REPO / "README.md").read_text()
    for guide in (GLOSSARY, PATTERNS):
        assert f"({guide.relative_to(REPO).as_posix()})" in readme, f"README.md does not link {guide.name}"


# --- each check rejects a known-bad input ----------------------------------------------------

def test_parse_rejects_a_malformed_entry():
    good = "- **mask**: lanes switched off ([01](beginner/01_vector_add.md))"
    assert parse_glossary(good)[0] == Entry("mask", "lanes switched off", (("01", "beginner/01_vector_add.md"),))
    for bad in ("- **mask** lanes switched off ([01](beginner/01_vector_add.md))",  # no colon
                "- **mask**: lanes switched off",  # no lesson link
                "- mask: lanes switched off ([01](beginner/01_vector_add.md))"):  # term not bold
        with pytest.raises(ValueError, match="is not"):
            parse_glossary(bad)


def test_order_check_rejects_unsorted_and_duplicate_terms():
    assert order_problems(["block", "BLOCK_SIZE", "grid", "warp"]) == []
    assert order_problems(["grid", "block"]) == ["not alphabetical: 'block' comes after 'grid'"]
    assert order_problems(["mask", "Mask"]) == ["duplicate term: Mask"]


def test_term_check_rejects_an_unused_term_and_a_wrong_link():
    assert term_pattern("warp").search("4 warps per program")
    assert term_pattern("arithmetic intensity").search("the arithmetic\nintensity, in flops")
    assert not term_pattern("mma").search("gamma and wgmma")
    unused = Entry("frobnicator", "no such thing", (("01", "beginner/01_vector_add.md"),))
    assert entry_problems(unused) == ["'frobnicator' links lesson 01, whose .md and .py never use it"]
    missing = Entry("mask", "lanes switched off", (("01", "beginner/01_nowhere.md"),))
    assert entry_problems(missing) == ["'mask' links beginner/01_nowhere.md, which is not a lesson's .md"]
    mislabelled = Entry("mask", "lanes switched off", (("02", "beginner/01_vector_add.md"),))
    assert "labels" in entry_problems(mislabelled)[0]


def test_link_check_rejects_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n\n## Online reductions (softmax, logsumexp)\n")
    good = "[a](other.md) [b](other.md#online-reductions-softmax-logsumexp) [c](https://example.org/x)"
    assert broken_links(good, tmp_path) == []
    bad = "[a](gone.md) [b](other.md#no-such-heading) [c](#nor-here)\n```\n[d](inside-a-fence.md)\n```"
    assert broken_links(bad, tmp_path) == ["gone.md: no such file", "other.md#no-such-heading: no heading with "
                                           "anchor #no-such-heading", "#nor-here: no heading with anchor #nor-here"]


def test_kernel_check_rejects_a_kernel_the_linked_lesson_lacks():
    body = "`add_kernel` in [lesson 01](beginner/01_vector_add.md)"
    assert kernel_problems(body) == []
    assert kernel_problems(body + ", and `frobnicate_kernel` there") == [
        "`frobnicate_kernel` is defined in none of the linked lessons (01)"]
    # softmax_kernel exists, but in lesson 06: a section linking only lesson 01 may not cite it
    assert kernel_problems("`softmax_kernel` in [lesson 01](beginner/01_vector_add.md)") == [
        "`softmax_kernel` is defined in none of the linked lessons (01)"]
    assert kernel_problems("`add_kernel` and nothing linked") == ["cites ['add_kernel'] but links no lesson"]


def test_further_reading_check_rejects_a_missing_or_short_section():
    good = "# L\n\n## Exercises\n\ntext\n\n## Further reading\n\n- A, *B*, 2019.\n- C, *D*, 2020.\n  more\n"
    assert reference_problems(further_reading(good)) == []
    assert reference_problems(further_reading("# L\n\n## Exercises\n\ntext\n")) == [
        "the last section is not '## Further reading'"]
    assert reference_problems(further_reading(good + "\n## Exercises\n")) == [
        "the last section is not '## Further reading'"]
    assert reference_problems(further_reading("## Further reading\n\n- A, *B*, 2019.\n")) == [
        "'## Further reading' has 1 item(s), at least 2 wanted"]
    fenced = "## Further reading\n\n- A, 2019.\n- B, 2020.\n```\n## Not a heading\n```\n"
    assert reference_problems(further_reading(fenced)) == []
    urls = "## Further reading\n\n- A, 2019. http://example.org/a.\n- B, 2020. https://arxiv.org/abs/22.1.\n"
    assert reference_problems(further_reading(urls)) == [
        "http://example.org/a: not https", "https://arxiv.org/abs/22.1: not an arxiv.org/abs/NNNN.NNNNN address"]


# --------------------------------------------------------------------------- what the GPU printed

def excerpt_problems(markdown: str, run: dict | None) -> list[str]:
    """What is wrong with a lesson md's "What the GPU printed" block against its recorded run."""
    from common.report import EXCERPT_END, EXCERPT_START, excerpt_block
    if run is None:
        return []
    if EXCERPT_START not in markdown or EXCERPT_END not in markdown:
        return ["no 'What the GPU printed' block (python -m common results lessons/results writes it)"]
    block = EXCERPT_START + markdown.split(EXCERPT_START, 1)[1].split(EXCERPT_END, 1)[0] + EXCERPT_END
    if block != excerpt_block(run):
        return ["its 'What the GPU printed' block differs from lessons/results: re-run "
                "python -m common results lessons/results"]
    return []


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda lesson: lesson.number)
def test_md_shows_what_the_gpu_printed(lesson):
    import json
    path = REPO / "lessons" / "results" / f"{lesson.stem}.json"
    run = json.loads(path.read_text()) if path.exists() else None
    assert excerpt_problems(lesson.markdown.read_text(), run) == []


def test_excerpt_check_rejects_a_stale_or_missing_block():
    from common.report import excerpt_block
    run = {"gpu": "GPU", "versions": "v", "date": "d", "tables": [{"title": "t", "markdown": "| a |"}],
           "bars": [{"kernel": "k", "shape": "s", "vs": "ceiling", "baseline": "copy ceiling", "value": 90.0,
                     "bar": 80, "unit": "%", "higher_is_better": True, "passed": True, "benchmark": "t"}]}
    good = "# L\n\n" + excerpt_block(run) + "\n"
    assert excerpt_problems(good, run) == []
    assert excerpt_problems("# L\n", run) and excerpt_problems(good.replace("90.00", "99.00"), run)
