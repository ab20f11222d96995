"""Stage `generate`: Self-Instruct, a model writes new instruction data from seed tasks (docs/selfinstruct.md).

Reads seed tasks (the bundled instructions or any SFT file), asks a generator (the run's `base`/`sft` model
in-process, or any OpenAI-compatible endpoint) for new tasks and answers, attaches verifiable constraints
where the seeds have them, and keeps what passes the filters (`alignment/selfinstruct.py`: parse, lengths,
ROUGE-L novelty against the pool, refusals, the gold checker). Writes `train.jsonl` in the SFT contract with
provenance per row; an SFT mixture reads it with a source `from_stage: generate`.

Robustness: `shard_size` requests make a shard, written atomically to `shards/` as they finish (every
candidate with the filter that dropped it), so a killed run resumes with the next shard and rebuilds the
pool from the finished ones. The manifest carries the acceptance per filter and a diversity figure;
`plots/filters.png` shows both.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from pathlib import Path

from alignment import preemption
from alignment.config import StageConfig
from alignment.data import read_rows
from alignment.errors import DataError
from alignment.hardware import peak_rss_mb
from alignment.labeling import read_jsonl, shard_path, shards, write_jsonl
from alignment.selfinstruct import (DEFAULT_TEMPLATE, FILTERS, FilterSpec, GeneratorSpec, LocalGenerator,
                                    OpenAIGenerator, Pool, acceptance, diversity, prepare_requests, run_shard,
                                    seed_from_row, sft_row, template_digest)

log = logging.getLogger("align")


class Config(StageConfig):
    seeds: str = "data/instruct/train.jsonl"
    """Seed tasks: an SFT file (JSONL/Parquet/`datasets`); each row's last user turn is a task, its
    `constraints` (if any) the verifiable family new tasks draw theirs from."""
    seeds_split: str = "train"
    max_seeds: int | None = None
    """Use only the first N seed rows."""
    requests: int = 64
    """New tasks to propose (each one generator call for the task, one for the answer if it survives)."""
    shard_size: int = 16
    """Requests per shard: the unit of resumption after a kill."""
    examples_per_prompt: int = 6
    """Seed tasks shown in each proposal prompt (Self-Instruct: 6)."""
    machine_examples: int = 2
    """Accepted machine tasks shown beside them (Self-Instruct: 2)."""
    constraint_rate: float = 1.0
    """Fraction of new tasks given a seed's verifiable constraints (0: plain open-ended tasks)."""
    template: str | None = None
    """A file holding the proposal prompt, with `{examples}` where the numbered tasks go; None: the built-in."""
    instruction_tokens: int = 64
    """Max new tokens of a proposed task."""
    response_tokens: int = 192
    """Max new tokens of an answer."""
    generator: GeneratorSpec = GeneratorSpec()
    filters: FilterSpec = FilterSpec()

    def problems(self):
        out = self.generator.problems("generator") + self.filters.problems("filters")
        for key in ("requests", "shard_size", "examples_per_prompt", "instruction_tokens", "response_tokens"):
            if getattr(self, key) < 1:
                out.append((key, "expected at least 1"))
        if self.machine_examples < 0:
            out.append(("machine_examples", "expected 0 or more"))
        if not 0 <= self.constraint_rate <= 1:
            out.append(("constraint_rate", "expected a fraction in [0, 1]"))
        if self.template is not None:
            if not Path(self.template).is_file():
                out.append(("template", f"{self.template}: file not found"))
            elif "{examples}" not in Path(self.template).read_text(encoding="utf-8"):
                out.append(("template", f"{self.template}: has no {{examples}} placeholder for the seed tasks"))
        return out


def upstream(cfg: Config) -> tuple[str, ...]:
    return (cfg.generator.model,) if cfg.generator.kind == "local" else ()


def load_seeds(cfg: Config) -> list:
    seeds = []
    for rowno, row in read_rows(cfg.seeds, cfg.seeds_split):
        if cfg.max_seeds is not None and len(seeds) >= cfg.max_seeds:
            break
        seed = seed_from_row(row, rowno)
        if seed is not None:
            seeds.append(seed)
    if not seeds:
        raise DataError(f"{cfg.seeds}: no seed task (rows need a user turn in `messages` or a `prompt`)")
    return seeds


def build_generator(cfg: Config, ctx):
    if cfg.generator.kind == "openai":
        return OpenAIGenerator(cfg.generator)
    from alignment.models import load_tokenizer
    from alignment.policy import load_policy

    art = ctx.inputs[cfg.generator.model]
    return LocalGenerator(load_policy(art, cfg.precision).eval(), load_tokenizer(art.model_dir),
                          cfg.generator.generation, name=f"local:{art.stage}:{art.manifest_sha256[:12]}")


def replay(records: list[dict], pool: Pool, accepted: list) -> None:
    """Rebuild the pool from a finished shard exactly as the run that wrote it grew it."""
    for rec in records:
        if rec["dropped"] not in ("parse", "instruction_length", "novelty"):
            pool.add(rec["instruction"])
        if rec["dropped"] is None:
            accepted.append((f"gen:{rec['request']}", rec["instruction"]))


def generate_shards(cfg: Config, generator, seeds: list, template: str, folder: Path) -> tuple[list, int] | None:
    """Every candidate record, shard by shard (finished shards are read back, not asked again), and how many
    requests a previous run had done; None when preemption was requested (the runner then requeues)."""
    from tqdm.auto import tqdm

    pool, accepted, records, done_before = Pool(), [], [], 0
    for s in seeds:
        pool.add(s.task)
    plan = shards(cfg.requests, cfg.shard_size)
    for index, start, stop in tqdm(plan, desc="[generate] shards", unit="shard", leave=False, disable=None):
        path = shard_path(folder, "gen", index)
        if path.is_file():
            shard = read_jsonl(path)
            replay(shard, pool, accepted)
            done_before += len(shard)
        else:
            if preemption.requested():
                return None
            rng = random.Random(f"{cfg.seed}:{index}")  # per shard: a resumed run asks exactly the same
            requests = prepare_requests(rng, seeds, accepted, start, stop, template=template,
                                        n_seed=cfg.examples_per_prompt, n_machine=cfg.machine_examples,
                                        constraint_rate=cfg.constraint_rate)
            # run_shard grows the pool in place with every instruction that passes the instruction filters.
            shard = run_shard(generator, requests, pool, cfg.filters, instruction_tokens=cfg.instruction_tokens,
                              response_tokens=cfg.response_tokens, seed=cfg.seed * 100_003 + index * 2)
            write_jsonl(path, shard)
            accepted += [(f"gen:{r['request']}", r["instruction"]) for r in shard if r["dropped"] is None]
        records += shard
    return records, done_before


def run(cfg: Config, ctx) -> None:
    from transformers import set_seed

    # -- set up --------------------------------------------------------------------------------
    set_seed(cfg.seed)
    seeds = load_seeds(cfg)
    template = Path(cfg.template).read_text(encoding="utf-8") if cfg.template else DEFAULT_TEMPLATE
    generator = build_generator(cfg, ctx)
    generator.check()  # a dead endpoint fails in seconds, before any work
    log.info("[generate] %d seed tasks (%d with constraints), %d requests in shards of %d; generator %s",
             len(seeds), sum(bool(s.constraints) for s in seeds), cfg.requests, cfg.shard_size, generator.name)

    # -- propose, answer, filter: shard by shard (finished shards are kept across a kill) ------------
    t0 = time.perf_counter()
    done = generate_shards(cfg, generator, seeds, template, ctx.out_dir / "shards")
    if done is None:
        return  # preempted: the runner requeues; finished shards are kept
    records, done_before = done
    generator.close()
    seconds = time.perf_counter() - t0

    # -- save ----------------------------------------------------------------------------------
    provenance = {"generator": generator.name, "template": "builtin" if cfg.template is None else cfg.template,
                  "template_sha256": template_digest(template)}
    kept = [r for r in records if r["dropped"] is None]
    rows = [sft_row(i, r, provenance) for i, r in enumerate(kept, start=1)]
    if not rows:
        raise DataError(f"generate: no row passed the filters out of {len(records)} proposals "
                        f"({_summary(acceptance(records))}); see {ctx.out_dir / 'shards'} for every candidate")
    write_jsonl(ctx.out_dir / "train.jsonl", rows)
    filters, div = acceptance(records), diversity([r["instruction"] for r in kept])
    plot_filters(filters, div, ctx.out_dir / "plots" / "filters.png")
    log.info("[generate] kept %d of %d (%s); distinct first-bigram ratio %s", len(rows), len(records),
             _summary(filters), div["distinct_first_bigram_ratio"])
    ctx.lineage = {"kind": "sft_data", "generator": generator.name,
                   "parent": str(ctx.inputs[cfg.generator.model].path) if cfg.generator.kind == "local" else None,
                   "adapter": False}
    ctx.metrics.update({
        "rows": len(rows), "proposed": len(records), "acceptance_rate": round(len(rows) / len(records), 4),
        "filters": filters, "diversity": div, "generator": generator.name, **provenance,
        "categories": dict(sorted(Counter(r["category"] for r in rows).items())),
        "resumed_requests": done_before, "seconds": round(seconds, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
    })


def _summary(filters: dict) -> str:
    return ", ".join(f"{name} {f['passed']}/{f['entered']}" for name, f in filters.items())


def plot_filters(filters: dict, div: dict, path: Path) -> Path:
    """Pass rate per filter (of the candidates that reached it) and the most common first bigrams."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(FILTERS)
    rates = [filters[n]["rate"] or 0.0 for n in names]
    a.barh(names[::-1], rates[::-1], color="tab:blue")
    for y, n in enumerate(names[::-1]):
        a.text(0.01, y, f"{filters[n]['passed']}/{filters[n]['entered']}", va="center", color="white", fontsize=8)
    a.set_xlim(0, 1)
    a.set_xlabel("pass rate (of candidates reaching the filter)")
    a.set_title("Self-Instruct filters")
    top = div["top_first_bigrams"]
    b.barh([k for k, _ in top][::-1], [v for _, v in top][::-1], color="tab:green")
    b.set_title(f"first bigrams: {div['distinct_first_bigrams']} distinct "
                f"(ratio {div['distinct_first_bigram_ratio']})")
    b.set_xlabel("accepted tasks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
