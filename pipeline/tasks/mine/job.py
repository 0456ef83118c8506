"""The mine job: hard negatives for (anchor, positive) pairs with sentence-transformers' semantics, on Ray.

Steps: list the inputs and stream them once on the driver (``inputs.scan_inputs``: every text checked,
digested for the plan key and hashed, then dropped), group them as sentence-transformers does, check
every option, all before Ray starts or anything is written; encode the corpus chunks and the anchors of
the parts still missing on EncoderActors (each reads its own texts; the vectors stay in Ray's object
store); corpus slice actors each hold a run of the corpus (vectors and texts) and return every anchor
block's candidate window over their slice (with a cross-encoder, its scores too); the driver merges,
applies the rules and commits one output part (and its receipt) per anchor block
(``blocks.finish_block``). A re-run with the same input and options skips the committed parts (and
needs no Ray at all when every part is there); ``.embedpipe/report.json`` is built from the receipts
and the ``.embedpipe/scores/`` parts, so it is the same either way.

``--from-candidates OUTPUT`` re-applies ranges, margins, sampling, formats and filters to the
``.embedpipe/candidates/`` an earlier ``--save-candidates`` run kept: no model is loaded and nothing is encoded
(slice actors hold only the texts); the inputs are read again to check they are the ones the candidates
were made from and for the texts.

Differences from ``mine_hard_negatives``: scores use the model's own similarity function and
normalization, where sentence-transformers always normalizes and uses cosine (for the usual cosine
models the two agree); ``exclude_duplicates`` and ``max_positive_similarity`` are ours.
"""

from __future__ import annotations

import fnmatch
import sys
import time
from dataclasses import asdict, replace

import numpy as np

from pipeline.compute import negatives as rules
from pipeline.io.output import BOOKKEEPING_DIR, OutputFolder, plan_key
from pipeline.io.storage import parse_storage_options, redact
from pipeline.io.training_formats import build_table
from pipeline.spec import MineSpec, explicit_keys
from pipeline.tasks.mine.blocks import CANDIDATES_DIR, SCORES_DIR, BlockWriter
from pipeline.tasks.mine.inputs import MineError, MinePlan, list_inputs, scan_inputs

REPORT_FILE = f"{BOOKKEEPING_DIR}/report.json"
EXAMPLES_PER_RULE = 5
OPTION_NAMES = (
    "range_min",
    "range_max",
    "max_score",
    "min_score",
    "absolute_margin",
    "relative_margin",
    "num_negatives",
    "sampling_strategy",
    "seed",
    "include_positives",
    "output_format",
    "output_scores",
    "max_positive_similarity",
    "exclude_duplicates",
)


def mining_options(spec: MineSpec, max_positives: int) -> rules.MiningOptions:
    values = {name: getattr(spec, name) for name in OPTION_NAMES}
    values = rules.apply_preset(values, spec.preset, set(explicit_keys(spec)))
    values["cross_encoder"] = bool(spec.cross_encoder)
    return rules.resolve_options(rules.MiningOptions(**values), max_positives)


def prompts_for(spec: MineSpec, description: dict) -> tuple[str, str]:
    """Anchors use the 'query' prompt and the corpus the 'document' prompt, as encode_query/encode_document."""
    prompts = description.get("prompts") or {}

    def pick(literal: str | None, name: str | None, default_name: str) -> str:
        if literal is not None:
            return literal
        if name is not None:
            if name not in prompts:
                raise ValueError(
                    f"prompt name {name!r} is not defined by the model "
                    f"(defined: {', '.join(sorted(prompts)) or 'none'})"
                )
            return prompts[name]
        return prompts.get(default_name, "")

    return (
        pick(spec.query_prompt, spec.query_prompt_name, "query"),
        pick(spec.corpus_prompt, spec.corpus_prompt_name, "document"),
    )


# The top-level names a mining output owns (glob patterns, recorded in its plan): what --overwrite removes.
# Only the training set's parts are visible; the report, scores and candidates sit in the hidden folder.
OWNED = ("part-*", BOOKKEEPING_DIR)


def is_mine_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OWNED)


def check_output_columns(options: rules.MiningOptions, anchor_col: str, positive_col: str) -> None:
    """Column names that would clash with the format's own columns fail now, not after the encoding."""
    build_table(
        options.output_format,
        anchors=[],
        positives=[],
        positive_scores=[],
        negatives=[],
        negative_scores=[],
        num_negatives=options.num_negatives,
        output_scores=options.output_scores,
        anchor_column=anchor_col,
        positive_column=positive_col,
    )


def committed_blocks(output: OutputFolder, count: int, save_candidates: bool) -> dict[int, dict]:
    """Receipts of the blocks a previous run finished: output part, scores part (and candidates part
    when they are saved) all committed."""
    parts = {n: r for n, r in output.committed().items() if n < count and "stats" in r.details}
    needed = [set(output.committed(SCORES_DIR))]
    if save_candidates:
        needed.append(set(output.committed(CANDIDATES_DIR)))
    return {n: r.to_dict() for n, r in parts.items() if all(n in have for have in needed)}


def load_duplicates(spec: MineSpec, storage_options: dict, log):
    if not spec.exclude_duplicates:
        return None
    from pipeline.tasks.mine.duplicates import load_duplicate_groups

    groups = load_duplicate_groups(spec.exclude_duplicates, storage_options)
    log(f"{len(groups.by_hash)} grouped texts in the dedup output {redact(groups.source)}")
    return groups


# -- the report ------------------------------------------------------------------------------------------


def histogram_edges(low: float | None, high: float | None, bins: int = 20) -> np.ndarray | None:
    if low is None:
        return None
    return np.histogram_bin_edges(np.asarray([low, high], dtype=np.float64), bins=bins)


def build_report(output: OutputFolder, count: int, done: dict[int, dict]) -> dict:
    """Statistics, examples and histograms from the receipts and the .embedpipe/scores/ parts (one at a time)."""
    totals = rules.MiningStats()
    cross_encoder_pairs = 0
    examples: dict[str, list] = {}
    ranges: dict[str, list] = {}
    for number in range(count):
        receipt = done[number]
        totals = totals + rules.MiningStats(**receipt["stats"])
        cross_encoder_pairs += receipt.get("cross_encoder_pairs", 0)
        for rule, picked in (receipt.get("samples") or {}).items():
            room = EXAMPLES_PER_RULE - len(examples.setdefault(rule, []))
            examples[rule].extend(picked[: max(0, room)])
        for kind, (low, high, n) in (receipt.get("score_ranges") or {}).items():
            seen = ranges.setdefault(kind, [None, None, 0])
            if n:
                seen[0] = low if seen[0] is None else min(seen[0], low)
                seen[1] = high if seen[1] is None else max(seen[1], high)
                seen[2] += n
    edges = {kind: histogram_edges(low, high) for kind, (low, high, _) in ranges.items()}
    counts = {kind: np.zeros(20, dtype=np.int64) for kind in edges}
    receipts = output.committed(SCORES_DIR)
    for number in range(count):
        table = output.read_part(receipts[number])
        for kind in table.column_names:
            values = np.asarray(table.column(kind)[0].as_py(), dtype=np.float64)
            values = values[np.isfinite(values)]
            if edges.get(kind) is not None and len(values):
                counts[kind] += np.histogram(values, bins=edges[kind])[0]
    histograms = {
        kind: (
            {"edges": [round(float(e), 6) for e in edges[kind]], "counts": counts[kind].tolist()}
            if edges[kind] is not None
            else {"edges": [], "counts": []}
        )
        for kind in edges
    }
    empty = {"edges": [], "counts": []}
    out = {
        "totals": totals,
        "examples": {rule: examples[rule] for rule in rules.RULES if examples.get(rule)},
        "positive": histograms.get("positive", empty),
        "negative": histograms.get("negative", empty),
    }
    if "negative_bi_encoder" in histograms:
        out["rescoring"] = {
            "cross_encoder_pairs": cross_encoder_pairs,
            "negative_bi_encoder_score_histogram": histograms["negative_bi_encoder"],
            "negative_cross_encoder_score_histogram": histograms.get("negative", empty),
            "positive_bi_encoder_score_histogram": histograms.get("positive_bi_encoder", empty),
            "positive_cross_encoder_score_histogram": histograms.get("positive", empty),
        }
    return out


def finish(
    output: OutputFolder,
    report: dict,
    plan: MinePlan,
    blocks: list[int],
    done: dict,
    todo: list[int],
    save_candidates: bool,
    started: float,
) -> dict:
    summary = build_report(output, len(blocks), done)
    totals = summary["totals"]
    report.update(
        {
            "pairs_in": plan.pairs,
            "anchors_in": plan.anchors,
            "anchors_out": sum(done[n]["anchors_out"] for n in done),
            "corpus_size": plan.corpus_size,
            "rows_out": sum(done[n]["rows"] for n in done),
            "parts": len(blocks),
            "parts_written": len(todo),
            "parts_resumed": len(blocks) - len(todo),
            "anchors_short_of_negatives": totals.short_anchors,
            "negatives": totals.negatives,
            "dropped": totals.dropped,
            "dropped_examples": summary["examples"],
            "padding": totals.padding,
            "positive_score_histogram": summary["positive"],
            "negative_score_histogram": summary["negative"],
        }
    )
    if "rescoring" in summary:
        report["rescoring"] = summary["rescoring"]
    report["timings"]["total_seconds"] = round(time.perf_counter() - started, 3)
    output.write_json(REPORT_FILE, report)
    expected = {"": list(range(len(blocks))), SCORES_DIR: list(range(len(blocks)))}
    if save_candidates:
        expected[CANDIDATES_DIR] = list(range(len(blocks)))
    output.finish({"job": "mine"}, expected=expected)
    return report


# -- a full run ------------------------------------------------------------------------------------------


def run_mine(spec: MineSpec, log=None) -> dict:
    """Run the mining job; returns the report's content."""
    log = log or (lambda message: print(message, file=sys.stderr))
    if spec.from_candidates:
        from pipeline.tasks.mine.candidates import run_from_candidates

        return run_from_candidates(spec, log)

    from pipeline.model.config import load_model_config
    from pipeline.model.files import fingerprint, local_model_dir
    from pipeline.model.modules import check_model

    started = time.perf_counter()
    storage_options = parse_storage_options(spec.storage_option)
    output = OutputFolder(spec.output, storage_options)

    # Everything that can be wrong with the input or the options is found before Ray starts and
    # before anything is written: columns, texts, model, prompts, corpus, grouping, options, names.
    model_dir = local_model_dir(spec.model, storage_options)
    check_model(model_dir, spec.allow_pickle)
    model_fingerprint = fingerprint(model_dir, {"truncate_dim": None})
    model_config = load_model_config(model_dir)
    query_prompt, corpus_prompt = prompts_for(spec, {"prompts": model_config.prompts})
    cross_encoder = None
    if spec.cross_encoder:
        from pipeline.model.cross_encoder import check_cross_encoder, cross_encoder_fingerprint

        ce_dir = local_model_dir(spec.cross_encoder, storage_options)
        check_cross_encoder(ce_dir, spec.allow_pickle)
        cross_encoder = {
            "path": str(ce_dir),
            "fingerprint": cross_encoder_fingerprint(ce_dir),
            "allow_pickle": spec.allow_pickle,
            "max_batch_tokens": spec.max_batch_tokens,
        }
    inputs = list_inputs(spec, storage_options, model_fingerprint, corpus_prompt)
    log(inputs.columns_line())
    duplicates = load_duplicates(spec, storage_options, log)
    plan = scan_inputs(inputs, storage_options, duplicates.map_corpus if duplicates else None)
    options = mining_options(spec, plan.max_positives)
    check_output_columns(options, inputs.anchor_column, inputs.positive_column)
    fn = model_config.similarity_fn_name
    k = rules.candidate_count(options, plan.max_positives, plan.corpus_size)
    material = {
        "model": model_fingerprint,
        "cross_encoder": cross_encoder["fingerprint"] if cross_encoder else None,
        "pairs": plan.pairs_digest,
        "corpus": plan.corpus_digest,
        "options": asdict(options),
        "duplicates": duplicates.digest if duplicates else None,
        "query_prompt": query_prompt,
        "corpus_prompt": corpus_prompt,
        "columns": [inputs.anchor_column, inputs.positive_column],
        "block": spec.anchors_per_block,
        "save_candidates": spec.save_candidates,
    }
    key = plan_key(material)
    stored = {}
    if spec.save_candidates:
        stored["candidates"] = {
            "model": spec.model,
            "model_fingerprint": model_fingerprint,
            "cross_encoder": spec.cross_encoder,
            "cross_encoder_fingerprint": material["cross_encoder"],
            "input": list(spec.input),
            "corpus": list(spec.corpus),
            "corpus_text_column": spec.corpus_text_column,
            "anchor_column": inputs.anchor_column,
            "positive_column": inputs.positive_column,
            "pairs_digest": plan.pairs_digest,
            "corpus_digest": plan.corpus_digest,
            "query_prompt": query_prompt,
            "corpus_prompt": corpus_prompt,
            "similarity_fn_name": fn,
            "k": k,
            "max_positives": plan.max_positives,
            "corpus_size": plan.corpus_size,
            "anchors": plan.anchors,
            "anchors_per_block": spec.anchors_per_block,
        }
    output.claim("mine", key, stored, overwrite=spec.overwrite, owned=OWNED, log=log)

    blocks = list(range(0, plan.anchors, spec.anchors_per_block))
    done = committed_blocks(output, len(blocks), spec.save_candidates)
    todo = [number for number in range(len(blocks)) if number not in done]
    log(
        f"{plan.pairs} pairs: {plan.anchors} anchors, corpus of {plan.corpus_size} texts; "
        f"{k} candidates per anchor; {len(blocks)} part(s), {len(done)} already committed"
    )
    timings: dict = {"plan_seconds": round(time.perf_counter() - started, 3)}
    workers = replaced = 0
    if todo:
        from pipeline.tasks.mine.search import SearchContext, mine_blocks

        output.mark_incomplete()  # a part went missing since a complete run: not complete until it is back
        needs_ce = cross_encoder is not None and (options.rescore or spec.save_candidates)
        context = SearchContext(
            spec=spec,
            plan=plan,
            writer=BlockWriter(
                options,
                plan.max_positives,
                inputs.anchor_column,
                inputs.positive_column,
                output,
                duplicates,
                spec.save_candidates,
            ),
            fn=fn,
            k=k,
            query_prompt=query_prompt,
            corpus_prompt=corpus_prompt,
            model_dir=str(model_dir),
            storage_options=storage_options,
            cross_encoder=dict(cross_encoder, storage_options=storage_options) if needs_ce else None,
            need_positive_similarity=options.max_positive_similarity is not None or spec.save_candidates,
        )
        workers, replaced = mine_blocks(context, blocks, todo, done, timings, log)

    report = {
        "output": output.url,
        "columns": inputs.columns_record(),
        "output_format": options.output_format,
        "corpus_reused_from": inputs.reused_from,
        "candidates_per_anchor": k,
        "similarity_fn_name": fn,
        "options": asdict(options),
        "query_prompt": query_prompt,
        "corpus_prompt": corpus_prompt,
        "cross_encoder": (
            {
                "path": spec.cross_encoder,
                "fingerprint": cross_encoder["fingerprint"],
                "rescored": options.rescore,
            }
            if cross_encoder
            else None
        ),
        "duplicate_groups": (
            {"source": duplicates.source, "corpus_texts_in_groups": duplicates.mapped} if duplicates else None
        ),
        "candidates_saved": spec.save_candidates,
        "timings": timings,
        "workers": workers,
        "actors_replaced": replaced,
    }
    return finish(output, report, plan, blocks, done, todo, spec.save_candidates, started)


def with_defaults(spec: MineSpec, saved: dict) -> MineSpec:
    """The spec with the inputs and columns of the saved candidates wherever it names none."""
    filled = replace(
        spec,
        input=list(spec.input) or list(saved["input"]),
        corpus=list(spec.corpus) or list(saved["corpus"]),
        corpus_text_column=spec.corpus_text_column
        if "corpus_text_column" in explicit_keys(spec)
        else saved["corpus_text_column"],
        anchor_column=spec.anchor_column or saved["anchor_column"],
        positive_column=spec.positive_column or saved["positive_column"],
    )
    filled.__dict__["explicit_keys"] = explicit_keys(spec)  # presets still yield to what the user set
    return filled


__all__ = ["MineError", "mining_options", "run_mine"]
