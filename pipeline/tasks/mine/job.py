"""The mine job: hard negatives for (anchor, positive) pairs with sentence-transformers' semantics, on Ray.

Steps: read the pairs and group them as sentence-transformers does (distinct anchors, a de-duplicated
corpus of extra corpus + positives) and check every input and option, all on the driver before Ray
starts or anything is written; encode the corpus and the anchors of the parts still missing on
EncoderActors (the encoded chunks stay in Ray's object store); IndexShardActors each hold a slice of the
corpus vectors and return every anchor block's top candidates over their slice; the driver merges them,
applies the rules (``pipeline.compute.negatives``) and commits one output part (and its receipt under
``_parts/``) per anchor block, so memory does not grow with the output. A re-run with the same input and
options skips the committed parts (and needs no Ray at all when every part is there); report.json is
built from the receipts, so it is the same either way.

The one difference from ``mine_hard_negatives``: scores use the model's own similarity function and
normalization, where sentence-transformers always normalizes and uses cosine. For the usual cosine
models the two agree.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict

import numpy as np

from pipeline.compute import negatives as rules
from pipeline.io.output import MANIFEST_FILE, PLAN_FILE, RECEIPTS_DIR, SUCCESS_FILE, OutputFolder, plan_key
from pipeline.io.storage import parse_storage_options
from pipeline.io.training_formats import build_table
from pipeline.spec import MineSpec, explicit_keys
from pipeline.tasks.mine.inputs import MineError, pair_columns, read_corpus, read_table, texts
from pipeline.tasks.mine.search import mine_blocks

REPORT_FILE = "report.json"


def mining_options(spec: MineSpec, max_positives: int) -> rules.MiningOptions:
    names = (
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
    )
    values = {name: getattr(spec, name) for name in names}
    values = rules.apply_preset(values, spec.preset, set(explicit_keys(spec)))
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


def is_mine_file(name: str) -> bool:
    return name.startswith("part-") or name in (
        SUCCESS_FILE,
        PLAN_FILE,
        MANIFEST_FILE,
        REPORT_FILE,
        RECEIPTS_DIR,
    )


def histogram(values: np.ndarray, bins: int = 20) -> dict:
    values = values[np.isfinite(values)]
    if not len(values):
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(values, bins=bins)
    return {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist()}


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


def committed_parts(output: OutputFolder, count: int) -> dict[int, dict]:
    """Receipts of the parts a previous run committed (part and receipt both present), as dicts."""
    return {
        n: r.to_dict() for n, r in output.committed().items() if n < count and "positive_scores" in r.details
    }


def run_mine(spec: MineSpec, log=None) -> dict:
    """Run the mining job; returns report.json's content."""
    from tqdm import tqdm

    from pipeline.model.config import load_model_config
    from pipeline.model.files import fingerprint, local_model_dir
    from pipeline.model.modules import check_model

    log = log or (lambda message: print(message, file=sys.stderr))
    started = time.perf_counter()
    storage_options = parse_storage_options(spec.storage_option)
    output = OutputFolder(spec.output, storage_options)

    # Everything that can be wrong with the input or the options is found before Ray starts and
    # before anything is written: columns, texts, model, prompts, corpus, grouping, options, names.
    where = ", ".join(spec.input)
    pairs = read_table(spec.input, storage_options, "pairs")
    anchor_col, positive_col = pair_columns(pairs, spec, where)
    anchors_in, positives_in = texts(pairs, anchor_col, where), texts(pairs, positive_col, where)
    model_dir = local_model_dir(spec.model, storage_options)
    check_model(model_dir, spec.allow_pickle)
    model_fingerprint = fingerprint(model_dir, {"truncate_dim": None})
    model_config = load_model_config(model_dir)
    query_prompt, corpus_prompt = prompts_for(spec, {"prompts": model_config.prompts})
    extra = read_corpus(spec, storage_options, model_fingerprint, corpus_prompt)
    try:
        groups = rules.group_pairs(anchors_in, positives_in, extra.texts)
    except ValueError as exc:
        raise MineError(f"pairs {where}: {exc}") from None
    options = mining_options(spec, groups.max_positives)
    check_output_columns(options, anchor_col, positive_col)
    fn = model_config.similarity_fn_name
    k = rules.candidate_count(options, groups.max_positives, len(groups.corpus))
    key = plan_key(
        {
            "model": model_fingerprint,
            "pairs": hashlib.sha256(json.dumps([anchors_in, positives_in]).encode()).hexdigest(),
            "corpus": hashlib.sha256(json.dumps(extra.texts).encode()).hexdigest(),
            "options": asdict(options),
            "query_prompt": query_prompt,
            "corpus_prompt": corpus_prompt,
            "columns": [anchor_col, positive_col],
            "block": spec.anchors_per_block,
        }
    )
    output.claim("mine", key, {}, overwrite=spec.overwrite, owned=is_mine_file, log=log)

    blocks = list(range(0, len(groups.anchors), spec.anchors_per_block))
    done = committed_parts(output, len(blocks))
    todo = [number for number in range(len(blocks)) if number not in done]
    log(
        f"{len(pairs)} pairs: {len(groups.anchors)} anchors, corpus of {len(groups.corpus)} texts; "
        f"{k} candidates per anchor; {len(blocks)} part(s), {len(done)} already committed"
    )
    timings: dict = {}
    workers = replaced = 0
    if todo:
        output.mark_incomplete()  # a part went missing since a complete run: not complete until it is back
        workers, replaced = mine_blocks(
            spec,
            groups,
            extra,
            options,
            fn,
            k,
            query_prompt,
            corpus_prompt,
            blocks,
            todo,
            done,
            output,
            anchor_col,
            positive_col,
            model_dir,
            storage_options,
            timings,
            tqdm,
            log,
        )

    # The report comes from the receipts, so a resumed run reports exactly what a single run would.
    totals = rules.MiningStats()
    for number in range(len(blocks)):
        totals = totals + rules.MiningStats(**done[number]["stats"])
    positive_scores_all = np.concatenate(
        [np.asarray(done[n]["positive_scores"], np.float32) for n in sorted(done)]
    )
    negative_scores_all = np.concatenate(
        [np.asarray(done[n]["negative_scores"], np.float32) for n in sorted(done)]
    )
    timings["total_seconds"] = round(time.perf_counter() - started, 3)
    report = {
        "output": output.url,
        "output_format": options.output_format,
        "pairs_in": len(pairs),
        "anchors_in": len(groups.anchors),
        "anchors_out": sum(done[n]["anchors_out"] for n in done),
        "corpus_size": len(groups.corpus),
        "corpus_reused_from": extra.reused_from,
        "rows_out": sum(done[n]["rows"] for n in done),
        "parts": len(blocks),
        "parts_written": len(todo),
        "parts_resumed": len(blocks) - len(todo),
        "candidates_per_anchor": k,
        "anchors_short_of_negatives": totals.short_anchors,
        "negatives": totals.negatives,
        "dropped": totals.dropped,
        "padding": totals.padding,
        "similarity_fn_name": fn,
        "options": asdict(options),
        "query_prompt": query_prompt,
        "corpus_prompt": corpus_prompt,
        "positive_score_histogram": histogram(positive_scores_all),
        "negative_score_histogram": histogram(negative_scores_all),
        "timings": timings,
        "workers": workers,
        "actors_replaced": replaced,
    }
    output.write_json(REPORT_FILE, report)
    output.finish({"job": "mine"}, expected={"": list(range(len(blocks)))})
    return report
