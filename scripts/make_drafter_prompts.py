"""Varied, offline prompts for training a drafter (issue 22), and a held-out set of novel prompts.

A drafter learns the AR model's own replies; replies to a few hundred templated prompts teach
template replies that do not transfer. This script draws prompts from sources already on the
machine, each through several templates:

- the Python standard library's own functions and their docstrings ("write a function that ...",
  "explain what X does", "show an example of X");
- passages of a plain-text book given with `--text` (public domain, e.g. Jane Austen's novels:
  continue, summarise, rewrite, questions about the passage);
- sayings from Debian's `fortunes` package when installed (`apt-get install fortunes`; optional);
- programming tasks built from verbs and data (several languages).

HumanEval's prompts are not used (keep them out if HumanEval scores are reported).

The held-out file is novel on purpose: its prompts come from other modules of the standard library,
from another part of the text, from other fortune files, and through templates the training file
never uses. Output is deterministic for a given seed and inputs:

    python scripts/make_drafter_prompts.py --text ../shared/data/austen.txt \\
        --out /work/data/drafter-prompts.jsonl --heldout /work/data/drafter-heldout.jsonl
"""

from __future__ import annotations

import argparse
import builtins
import hashlib
import importlib
import inspect
import json
import random
import re
from pathlib import Path

# Standard-library modules whose public functions become prompts. The held-out set takes every
# module whose name hashes into the held-out share (see `_is_heldout`).
STDLIB_MODULES = [
    "string", "textwrap", "re", "difflib", "unicodedata", "datetime", "calendar", "collections", "heapq",
    "bisect", "array", "copy", "pprint", "enum", "math", "cmath", "decimal", "fractions", "random",
    "statistics", "itertools", "functools", "operator", "os.path", "pathlib", "fnmatch", "glob",
    "shutil", "pickle", "copyreg", "shelve", "zlib", "gzip", "bz2", "lzma", "zipfile", "tarfile", "csv",
    "configparser", "hashlib", "hmac", "secrets", "os", "io", "time", "argparse", "logging", "getpass",
    "platform", "errno", "threading", "subprocess", "sched", "queue", "json", "base64", "binascii",
    "quopri", "html", "urllib.parse", "http.cookies", "uuid", "ipaddress", "wave", "colorsys", "gettext",
    "locale", "shlex", "inspect", "ast", "keyword", "tokenize", "dis", "types", "weakref", "contextlib",
    "abc", "numbers", "struct", "codecs", "email.utils", "mimetypes", "tempfile", "filecmp", "stat",
    "sys", "warnings", "traceback", "gc", "site", "zoneinfo", "graphlib", "reprlib", "textwrap",
    "string", "doctest", "unittest", "timeit", "cProfile", "pdb", "sqlite3", "socket", "select",
    "signal", "mmap", "ssl", "xml.etree.ElementTree", "xml.dom.minidom", "webbrowser", "wsgiref.util",
    "plistlib", "netrc", "linecache", "tomllib", "dataclasses", "typing", "asyncio", "concurrent.futures",
]

STDLIB_TRAIN = [
    "Write a Python function that {doc_3rd}",
    "Explain what `{name}` from Python's `{module}` module does.",
    "Show a short example of using `{module}.{name}` in Python.",
    "In Python, how would I {doc_verb}? Mention `{module}.{name}`.",
    "Implement `{name}` yourself in plain Python, without importing `{module}`. It {doc_3rd}",
]
STDLIB_HELDOUT = [
    "What is `{module}.{name}` for, and when would you avoid it?",
    "Describe the arguments of Python's `{module}.{name}` and give one example call.",
    "I need to {doc_verb} in Python. Which standard-library function helps, and how?",
]

TEXT_TRAIN = [
    "Continue this passage in the same style:\n\n{passage}",
    "Summarise this passage in two sentences:\n\n{passage}",
    "Rewrite this passage in plain modern English:\n\n{passage}",
    "Who are the people in this passage, and what do we learn about them?\n\n{passage}",
    "What is the mood of this passage? Explain briefly.\n\n{passage}",
]
TEXT_HELDOUT = [
    "Write the next paragraph of this story:\n\n{passage}",
    "Give this passage a title and explain your choice:\n\n{passage}",
    "List three facts stated in this passage:\n\n{passage}",
]

SAYING_TRAIN = [
    "Explain this saying: \"{saying}\"",
    "Is this funny or wise? Explain: \"{saying}\"",
    "Rewrite this in your own words: \"{saying}\"",
]
SAYING_HELDOUT = [
    "What does this quote tell us about people? \"{saying}\"",
    "Write a short story that ends with: \"{saying}\"",
]

CODE_VERBS = ["sorts", "filters", "counts", "groups", "reverses", "deduplicates", "validates", "parses",
              "formats", "merges", "splits", "searches", "compresses", "summarises", "normalises", "ranks",
              "samples", "rotates", "transposes", "encodes"]
CODE_DATA = ["a list of integers", "a list of strings", "a dictionary of scores", "lines of a CSV file",
             "a list of dates", "a matrix given as nested lists", "words of a sentence", "a queue of tasks",
             "a list of (name, age) pairs", "a binary tree", "a linked list", "an email address",
             "a URL", "a list of temperatures", "a shopping cart of (item, price) pairs", "a JSON string",
             "a log file", "a list of intervals", "a phone number", "a graph given as an adjacency list"]
CODE_LANGS = ["Python", "Python", "JavaScript", "C", "Java", "Rust", "Go", "TypeScript", "Ruby", "C++"]
CODE_TRAIN = [
    "Write a {lang} function that {verb} {data}.",
    "Write a {lang} function that {verb} {data}, with a short docstring or comment.",
    "Write unit tests for a {lang} function that {verb} {data}.",
]
CODE_HELDOUT = [
    "Explain step by step how you would write code that {verb} {data}.",
    "What can go wrong in a function that {verb} {data}? Give a fixed {lang} version.",
]


def _is_heldout(key: str, share: float) -> bool:
    """Stable split of sources: a key goes to the held-out set when its hash falls in the share."""
    h = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < share


def _first_sentence(doc: str) -> str | None:
    """The docstring's first sentence, or None when it is not a plain description."""
    text = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    sentence = m.group(1) if m else text
    if len(sentence) < 20 or len(sentence) > 200 or "(" in sentence[:3] or "->" in sentence or "--" in sentence:
        return None
    if not sentence[0].isalpha():
        return None
    return sentence


def _third_person(sentence: str) -> str:
    """'Return the sum of x.' -> 'returns the sum of x.' (a docstring's imperative after 'a function that')."""
    word, _, rest = sentence.partition(" ")
    w = word.lower()
    if not w.endswith("s"):
        w = w[:-1] + "ies" if re.search(r"[^aeiou]y$", w) else w + ("es" if re.search(r"(sh|ch|x|z|o)$", w) else "s")
    return f"{w} {rest}".strip()


def _as_verb(sentence: str) -> str:
    """'Return the sum of x.' -> 'return the sum of x' (used after 'how would I' / 'I need to')."""
    s = sentence.rstrip(".!?")
    return s[0].lower() + s[1:]


def stdlib_items() -> list[dict]:
    """One item per public, documented function of the listed standard-library modules."""
    items, seen, seen_names = [], set(), set()
    for module_name in dict.fromkeys(STDLIB_MODULES):
        try:
            module = importlib.import_module(module_name)
        except Exception:  # a module missing on this Python build is simply skipped
            continue
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            if hasattr(builtins, name) or name in seen_names:  # re-exported builtins and duplicates
                continue
            doc = _first_sentence(inspect.getdoc(obj) or "")
            key = f"{module_name}.{name}"
            if doc is None or key in seen:
                continue
            seen.add(key)
            seen_names.add(name)
            items.append({"module": module_name, "name": name, "doc": doc, "doc_verb": _as_verb(doc),
                          "doc_3rd": _third_person(doc),
                          "key": module_name})
    return items


def text_items(path: Path, heldout_share: float, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Passages of 300-900 characters; the held-out ones come from the text's last part."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))]
    paragraphs = [p for p in paragraphs if 300 <= len(p) <= 900 and not p.isupper()]
    cut = int(len(paragraphs) * (1 - heldout_share))
    train = [{"passage": p, "key": f"text{i}"} for i, p in enumerate(paragraphs[:cut])]
    heldout = [{"passage": p, "key": f"text{cut + i}"} for i, p in enumerate(paragraphs[cut:])]
    return train, heldout


def fortune_items(folder: Path) -> list[dict]:
    """Short sayings (one to three lines) from a fortunes folder: files of entries split by '%'."""
    items = []
    if not folder.is_dir():
        return items
    for f in sorted(folder.iterdir()):
        if f.suffix or not f.is_file() or f.name in {"off"}:
            continue
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for entry in text.split("\n%\n"):
            entry = entry.strip()
            lines = [line for line in entry.splitlines() if line.strip()]
            if 1 <= len(lines) <= 3 and 20 <= len(entry) <= 240 and "\t" not in entry:
                items.append({"saying": " ".join(line.strip() for line in lines), "key": f.name})
    return items


def code_items() -> list[dict]:
    return [{"verb": v, "data": d, "lang": lang, "key": f"{v}|{d}"}
            for v in CODE_VERBS for d in CODE_DATA for lang in CODE_LANGS[:3]]


def _render(items: list[dict], templates: list[str], rng: random.Random, n: int) -> list[str]:
    """n prompts: each item at most once per template, items and templates shuffled."""
    pairs = [(i, t) for i in range(len(items)) for t in range(len(templates))]
    rng.shuffle(pairs)
    out = []
    for i, t in pairs[:n]:
        item = dict(items[i])
        if "lang" in item:
            item["lang"] = rng.choice(CODE_LANGS)
        out.append(templates[t].format(**item))
    return out


def build(text: Path | None, fortunes: Path | None, n: int, heldout_n: int, seed: int,
          heldout_share: float = 0.15) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): sources split by `_is_heldout`, then templated."""
    rng = random.Random(seed)
    sources: list[tuple[list[dict], list[dict], list[str], list[str], float]] = []
    std = stdlib_items()
    sources.append(_split(std, heldout_share) + (STDLIB_TRAIN, STDLIB_HELDOUT, 0.35))
    if text is not None:
        sources.append(text_items(text, heldout_share, rng) + (TEXT_TRAIN, TEXT_HELDOUT, 0.25))
    if fortunes is not None:
        says = fortune_items(fortunes)
        if says:
            sources.append(_split(says, heldout_share) + (SAYING_TRAIN, SAYING_HELDOUT, 0.15))
    sources.append(_split(code_items(), heldout_share) + (CODE_TRAIN, CODE_HELDOUT, 0.25))
    total_weight = sum(s[4] for s in sources)
    train, heldout = [], []
    for tr_items, ho_items, tr_t, ho_t, weight in sources:
        train += _render(tr_items, tr_t, rng, round(n * weight / total_weight))
        heldout += _render(ho_items, ho_t, rng, round(heldout_n * weight / total_weight))
    rng.shuffle(train)
    rng.shuffle(heldout)
    seen = set(train)
    heldout = [p for p in heldout if p not in seen]
    return train, heldout


def _split(items: list[dict], share: float) -> tuple[list[dict], list[dict]]:
    train = [i for i in items if not _is_heldout(i["key"], share)]
    heldout = [i for i in items if _is_heldout(i["key"], share)]
    return train, heldout


def write_jsonl(prompts: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, help="a plain-text book (e.g. ../shared/data/austen.txt); optional")
    ap.add_argument("--fortunes", type=Path, default=Path("/usr/share/games/fortunes"),
                    help="Debian fortunes folder (skipped when missing)")
    ap.add_argument("--out", type=Path, required=True, help="training prompts (.jsonl)")
    ap.add_argument("--heldout", type=Path, required=True, help="held-out novel prompts (.jsonl)")
    ap.add_argument("-n", type=int, default=20000, help="training prompts to write (at most)")
    ap.add_argument("--heldout-n", type=int, default=200, help="held-out prompts to write (at most)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.text is not None and not args.text.is_file():
        ap.error(f"--text {args.text} does not exist")
    train, heldout = build(args.text, args.fortunes, args.n, args.heldout_n, args.seed)
    write_jsonl(train, args.out)
    write_jsonl(heldout, args.heldout)
    print(f"{len(train)} training prompts -> {args.out}; {len(heldout)} held-out prompts -> {args.heldout}")


if __name__ == "__main__":
    main()
