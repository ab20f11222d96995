"""Data quality: what a dataset holds before anything trains on it, and a cleaner that records what it drops.

`align data inspect FILE...` reports, per file: rows, rows per category and the imbalance between them,
prompt/response length histograms (tokens of a run's tokenizer with `--tokenizer`, else words), exact and
near duplicates, and, for every file after the first, how many of its rows also occur in the first (the
train/eval overlap that inflates held-out scores). A table on the terminal, a PNG, optionally JSON.

`align data clean FILE --out FILE` keeps the first of each group of duplicates, drops rows outside the
length bounds and rows that occur in `--against` files (the eval sets), and writes beside the output a
report naming every dropped row and why.

Near duplicates: MinHash (datasketch; 128 permutations) over character 5-gram shingles of the normalised
row text, candidates from LSH a little below the Jaccard threshold, each candidate confirmed with the exact Jaccard
of the two shingle sets, so the reported pairs are exact at the threshold and LSH only saves the O(n^2).
A row is a near duplicate of the earliest earlier row it matches.

Rows: the SFT contract (`messages`, or `prompt` + `completion`) and the preference contract (`prompt`,
`chosen`, `rejected`; the text is the prompt + chosen response).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from alignment.data import read_rows
from alignment.errors import DataError
from alignment.outputs import atomic_target, check_output, check_plot, save_png, write_text

SHINGLE = 5
NUM_PERM = 128
_SPACE = re.compile(r"\s+")


# -- rows as text ---------------------------------------------------------------------------------------------
def _content(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return ""


def row_texts(row: dict) -> tuple[str, str]:
    """(prompt text, response text) of an SFT or preference row; ('', '') when it is neither."""
    if isinstance(row.get("messages"), list) and row["messages"]:
        msgs = row["messages"]
        last = msgs[-1] if isinstance(msgs[-1], dict) else {}
        if last.get("role") == "assistant":
            return _content(msgs[:-1]), _content([last])
        return _content(msgs), ""
    if "prompt" in row:
        return _content(row["prompt"]), _content(row.get("completion", row.get("chosen", "")))
    return "", ""


def normalise(text: str) -> str:
    return _SPACE.sub(" ", text.lower()).strip()


def shingles(text: str, k: int = SHINGLE) -> set[str]:
    t = normalise(text)
    return {t[i:i + k] for i in range(max(1, len(t) - k + 1))} if t else set()


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass
class Row:
    file: str
    number: int
    """Line number (JSONL) or record index: what the user's editor jumps to."""
    raw: dict
    prompt: str
    response: str
    category: str | None
    shingles: set = field(default_factory=set)

    @property
    def text(self) -> str:
        return self.prompt + "\n" + self.response

    @property
    def label(self) -> str:
        return f"{self.file}: row {self.number}" + (f" ({self.raw['id']})" if "id" in self.raw else "")


def load(path: str) -> list[Row]:
    if Path(path).is_dir():  # else the datasets library tries it as a dataset folder: noise, then a vague error
        raise DataError(f"{path}: is a folder; name a JSONL, JSON or Parquet file")
    rows = []
    for number, raw in read_rows(path):
        prompt, response = row_texts(raw)
        if not prompt and not response:
            raise DataError(f"{path}: row {number}: neither an SFT row (messages, prompt + completion) nor a "
                            f"preference row (prompt, chosen, rejected); has: {', '.join(sorted(raw)) or 'nothing'}")
        cat = raw.get("category")
        row = Row(path, number, raw, prompt, response, None if cat is None else str(cat))
        row.shingles = shingles(row.text)
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


# -- duplicates ------------------------------------------------------------------------------------------------
class NearIndex:
    """MinHash LSH over rows' shingles; `match` confirms candidates with the exact Jaccard."""

    def __init__(self, threshold: float):
        from datasketch import MinHashLSH

        self.threshold = threshold
        # LSH below the threshold: pairs just above it are then found almost surely (LSH is an S-curve around
        # its own threshold), and the exact Jaccard check drops the extra candidates.
        self.lsh = MinHashLSH(threshold=min(0.9, max(0.1, threshold - 0.1)), num_perm=NUM_PERM)
        self.rows: dict[str, Row] = {}

    @staticmethod
    def minhash(row: Row):
        from datasketch import MinHash

        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch([s.encode() for s in row.shingles])
        return m

    def match(self, row: Row, m=None) -> tuple[Row, float] | None:
        """The earliest indexed row at least `threshold` similar, with the similarity; None when none is."""
        m = m if m is not None else self.minhash(row)
        best = None
        for key in self.lsh.query(m):
            other = self.rows[key]
            j = jaccard(row.shingles, other.shingles)
            if j >= self.threshold and (best is None or (other.file, other.number) < (best[0].file, best[0].number)):
                best = (other, j)
        return best

    def add(self, row: Row, m=None) -> None:
        key = f"{row.file}\0{row.number}"
        self.rows[key] = row
        self.lsh.insert(key, m if m is not None else self.minhash(row))


def text_key(row: Row) -> str:
    return hashlib.sha256(normalise(row.text).encode()).hexdigest()


def duplicates(rows: list[Row], threshold: float) -> tuple[list[tuple[Row, Row]], list[tuple[Row, Row, float]]]:
    """(exact pairs, near pairs) within one file: each later row with the earliest row it repeats."""
    first: dict[str, Row] = {}
    exact, near = [], []
    index = NearIndex(threshold)
    for row in rows:
        key = text_key(row)
        if key in first:
            exact.append((row, first[key]))
            continue
        first[key] = row
        m = index.minhash(row)
        hit = index.match(row, m)
        if hit:
            near.append((row, hit[0], round(hit[1], 4)))
        index.add(row, m)
    return exact, near


def overlap(rows: list[Row], reference: list[Row], threshold: float) -> dict:
    """Rows of `rows` that also occur in `reference`: same prompt, or near-duplicate text."""
    prompts = {normalise(r.prompt) for r in reference}
    index = NearIndex(threshold)
    for r in reference:
        index.add(r)
    same_prompt = [r for r in rows if normalise(r.prompt) in prompts]
    near = [(r, hit[0], round(hit[1], 4)) for r in rows for hit in [index.match(r)] if hit]
    return {"same_prompt": len(same_prompt), "near_duplicate": len(near),
            "examples": [[r.label, o.label, j] for r, o, j in near[:5]]}


# -- inspect ---------------------------------------------------------------------------------------------------
def lengths(rows: list[Row], tokenizer=None) -> dict[str, list[int]]:
    if tokenizer is None:
        count = lambda t: len(t.split())  # noqa: E731
    else:
        count = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    return {"prompt": [count(r.prompt) for r in rows], "response": [count(r.response) for r in rows]}


def imbalance(counts: dict[str, int]) -> dict:
    """max/min category ratio and normalised entropy (1.0: perfectly balanced)."""
    if not counts:
        return {"ratio": None, "entropy": None}
    n, values = sum(counts.values()), list(counts.values())
    h = -sum(v / n * math.log(v / n) for v in values if v)
    return {"ratio": round(max(values) / min(values), 3),
            "entropy": round(h / math.log(len(values)), 4) if len(values) > 1 else 1.0}


def _pct(values: list[int], q: float) -> int:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0


def inspect(paths: list[str], *, tokenizer_path: str | None = None, threshold: float = 0.8) -> dict:
    """The report `align data inspect` prints and plots."""
    tok = None
    if tokenizer_path:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(tokenizer_path)
        except (OSError, ValueError) as e:
            raise DataError(f"--tokenizer {tokenizer_path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    loaded = {p: load(p) for p in paths}
    report = {"unit": "tokens" if tok is not None else "words", "tokenizer": tokenizer_path, "threshold": threshold,
              "files": {}}
    first = paths[0]
    for p, rows in loaded.items():
        exact, near = duplicates(rows, threshold)
        cats = dict(sorted(Counter(r.category or "(none)" for r in rows).items()))
        lens = lengths(rows, tok)
        entry = {
            "rows": len(rows), "categories": cats, "imbalance": imbalance(cats),
            "lengths": lens,
            "length_summary": {k: {"median": _pct(v, 0.5), "p95": _pct(v, 0.95), "max": max(v)} for k, v in lens.items()},
            "exact_duplicates": len(exact), "near_duplicates": len(near),
            "duplicate_examples": [[a.label, b.label, 1.0] for a, b in exact[:5]] + [[a.label, b.label, j]
                                                                                      for a, b, j in near[:5]],
        }
        if p != first:
            entry["overlap_with"] = {first: overlap(rows, loaded[first], threshold)}
        report["files"][p] = entry
    return report


def print_table(report: dict, examples: bool = True) -> None:
    from rich.console import Console
    from rich.table import Table

    unit = report["unit"]
    t = Table(title=f"data inspect (lengths in {unit}; near duplicate: Jaccard >= {report['threshold']})")
    for col in ("file", "rows", "categories", "imbalance max/min", "entropy", f"prompt median/p95",
                "response median/p95", "exact dup", "near dup", "overlap (prompt / near)"):
        t.add_column(col, overflow="fold")
    for p, e in report["files"].items():
        ov = next(iter(e.get("overlap_with", {}).values()), None)
        ls = e["length_summary"]
        t.add_row(p, str(e["rows"]), ", ".join(f"{k} {v}" for k, v in e["categories"].items()),
                  str(e["imbalance"]["ratio"]), str(e["imbalance"]["entropy"]),
                  f"{ls['prompt']['median']}/{ls['prompt']['p95']}", f"{ls['response']['median']}/{ls['response']['p95']}",
                  str(e["exact_duplicates"]), str(e["near_duplicates"]),
                  "-" if ov is None else f"{ov['same_prompt']} / {ov['near_duplicate']}")
    Console(width=200).print(t)
    if not examples:
        return
    for p, e in report["files"].items():
        for a, b, j in e["duplicate_examples"][:3]:
            print(f"  duplicate: {a} ~ {b} (Jaccard {j})")


def _short(path: str) -> str:
    return "/".join(Path(path).parts[-2:])


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = list(report["files"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    cats = sorted({c for e in report["files"].values() for c in e["categories"]})
    width = 0.8 / len(files)
    for i, p in enumerate(files):
        e = report["files"][p]
        axes[0].bar([k + i * width for k in range(len(cats))], [e["categories"].get(c, 0) for c in cats], width,
                    label=_short(p))
        totals = [a + b for a, b in zip(e["lengths"]["prompt"], e["lengths"]["response"])]
        axes[1].hist(totals, bins=30, alpha=0.5, label=_short(p))
    axes[0].set_xticks([k + 0.4 - width / 2 for k in range(len(cats))], cats, rotation=30, ha="right")
    axes[0].set_title("rows per category")
    axes[1].set_title(f"row lengths, prompt + response ({report['unit']})")
    names = [_short(p) for p in files]
    ex = [report["files"][p]["exact_duplicates"] for p in files]
    nd = [report["files"][p]["near_duplicates"] for p in files]
    ov = [next(iter(report["files"][p].get("overlap_with", {}).values()), {}).get("near_duplicate", 0) for p in files]
    x = range(len(files))
    axes[2].bar([k - 0.25 for k in x], ex, 0.25, label="exact dup")
    axes[2].bar(list(x), nd, 0.25, label="near dup")
    axes[2].bar([k + 0.25 for k in x], ov, 0.25, label=f"near-duplicate of a row in {_short(files[0])}")
    axes[2].set_xticks(list(x), names)
    axes[2].set_title("duplicates")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, "--out", dpi=100)
    plt.close(fig)
    return path


# -- clean -----------------------------------------------------------------------------------------------------
def clean(path: str, *, against: list[str] = (), threshold: float = 0.8, min_words: int = 1,
          max_words: int | None = None) -> tuple[list[Row], list[dict]]:
    """(kept rows, dropped [{row, kind, reason, of}]): duplicates (the first stays), lengths, eval overlap."""
    rows = load(path)
    reference = [r for p in against for r in load(p)]
    ref_index = NearIndex(threshold)
    for r in reference:
        ref_index.add(r)
    ref_prompts = {normalise(r.prompt) for r in reference}
    index, seen, kept, dropped = NearIndex(threshold), {}, [], []
    for row in rows:
        words = len(row.text.split())
        kind, reason, of = None, None, None
        if words < min_words or (max_words is not None and words > max_words):
            kind, reason = "length", f"{words} words, outside [{min_words}, {max_words if max_words is not None else 'inf'}]"
        elif text_key(row) in seen:
            kind, reason, of = "exact_duplicate", "same text", seen[text_key(row)].label
        elif normalise(row.prompt) in ref_prompts:
            kind, reason = "eval_overlap", "its prompt occurs in " + ", ".join(against)
        else:
            m = index.minhash(row)
            hit = index.match(row, m)
            ref_hit = None if hit else ref_index.match(row, m)
            if hit or ref_hit:
                kind = "near_duplicate" if hit else "eval_overlap"
                reason, of = f"near duplicate, Jaccard {(hit or ref_hit)[1]:.3f}", (hit or ref_hit)[0].label
            else:
                index.add(row, m)
                seen[text_key(row)] = row
        if kind:
            dropped.append({"row": row.label, "kind": kind, "reason": reason, "of": of})
        else:
            kept.append(row)
    return kept, dropped


def report_path(out: Path) -> Path:
    return out.with_name(out.name + ".report.json")


def write_clean(kept: list[Row], dropped: list[dict], out: Path, settings: dict) -> Path:
    """The kept rows, verbatim, and `<out>.report.json` naming every dropped row (targets checked by the caller)."""
    with atomic_target(out, "--out") as tmp, tmp.open("w", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps(r.raw, ensure_ascii=False) + "\n")
    report = report_path(out)
    reasons = Counter(d["kind"] for d in dropped)
    write_text(report, "--out", json.dumps({**settings, "kept": len(kept), "dropped": len(dropped),
                                            "dropped_by_reason": dict(reasons), "rows": dropped}, indent=2))
    return report


# -- the CLI ---------------------------------------------------------------------------------------------------
def add_parser(sub, flags) -> None:
    """`align data inspect|clean`: registered by alignment/cli.py; `flags`: its -q/-v, taken after the sub-command
    too (`align data inspect -q FILE`), as every other command does."""
    from alignment.cli import _with_flags

    d = sub.add_parser("data", help="data quality: inspect files, clean duplicates and eval overlap")
    dsub = _with_flags(d.add_subparsers(dest="data_cmd", required=True), flags)
    ins = dsub.add_parser("inspect", help="rows, categories, lengths, duplicates, overlap: a table and a PNG")
    ins.add_argument("files", nargs="+", metavar="FILE", help="JSONL/Parquet files; overlap is measured against the first")
    ins.add_argument("--tokenizer", metavar="PATH", help="count tokens with this tokenizer (a model folder); else words")
    ins.add_argument("--threshold", type=float, default=0.8, help="near-duplicate Jaccard threshold (default 0.8)")
    ins.add_argument("--out", default="data_inspect.png", metavar="PNG")
    ins.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    cl = dsub.add_parser("clean", help="drop duplicates, out-of-range lengths and eval overlap; report what went")
    cl.add_argument("file", metavar="FILE")
    cl.add_argument("--out", required=True, metavar="FILE", help="the cleaned JSONL (+ FILE.report.json)")
    cl.add_argument("--against", nargs="*", default=[], metavar="EVAL", help="drop rows that occur in these files")
    cl.add_argument("--threshold", type=float, default=0.8)
    cl.add_argument("--min-words", type=int, default=1)
    cl.add_argument("--max-words", type=int, default=None)
    cl.add_argument("--force", action="store_true", help="replace an existing --out and its report")
    d.set_defaults(func=command)


def command(args) -> None:
    if not 0 < args.threshold <= 1:
        raise DataError(f"--threshold: expected a Jaccard threshold in (0, 1], got {args.threshold}")
    if args.data_cmd == "inspect":
        _inspect_command(args)
    else:
        _clean_command(args)


def _quiet() -> bool:
    from alignment.logs import verbosity

    return verbosity() < 0


def _inspect_command(args) -> None:
    # Both targets are checked before the (slow) inspection, so a refusal costs nothing and writes nothing.
    out = check_plot(args.out, "--out", inputs=args.files)
    if args.json:
        check_output(args.json, "--json", inputs=args.files, suffixes=(".json",), force_flag=None)
    report = inspect(args.files, tokenizer_path=args.tokenizer, threshold=args.threshold)
    # -q keeps the table, the command's answer (as `align status -q` does), and drops the example lines and the
    # plot's path, which --out already names.
    print_table(report, examples=not _quiet())
    written = plot(report, out)
    if not _quiet():
        print(f"plot: {written}")
    if args.json:
        write_text(Path(args.json), "--json", json.dumps(report, indent=2))


def _clean_command(args) -> None:
    if args.max_words is not None and args.min_words > args.max_words:
        raise DataError(f"--min-words {args.min_words} > --max-words {args.max_words}: no row could be kept")
    inputs = [args.file, *args.against]
    out = check_output(args.out, "--out", inputs=inputs, force=args.force)
    check_output(report_path(out), "--out", inputs=inputs, force=args.force)
    kept, dropped = clean(args.file, against=args.against, threshold=args.threshold, min_words=args.min_words,
                          max_words=args.max_words)
    report = write_clean(kept, dropped, out, {"input": args.file, "against": args.against,
                                              "threshold": args.threshold, "min_words": args.min_words,
                                              "max_words": args.max_words})
    if not _quiet():  # the output is the file (and its report, beside it), as with `align run -q`
        print(f"kept {len(kept)} of {len(kept) + len(dropped)} rows -> {out}; dropped rows and reasons: {report}")
