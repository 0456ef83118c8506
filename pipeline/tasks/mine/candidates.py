"""``embedpipe mine --from-candidates OUTPUT``: other ranges, margins, sampling, formats and filters over the
candidate windows an earlier ``--save-candidates`` run kept, without a model and without encoding.

The earlier output's plan (``.embedpipe/plan.json``) records what its candidates were made from (model and cross-encoder
fingerprints, digests of the pairs and of the extra corpus, columns, prompts, ``k``). This run:

* takes the inputs and columns from there unless given, reads them again (the texts of the output
  come from them) and refuses them when their digests differ ("made from other pairs / corpus");
* refuses ``--model`` / ``--cross-encoder`` other than the ones the candidates were made with, prompts
  (they would need re-encoding), and options whose window needs more than the ``k`` candidates kept;
* resolves the options exactly as a full run would (``--cross-encoder`` given: rescoring with the saved
  cross-encoder scores when a score rule is set), cuts each saved window to this run's ``k`` (a prefix:
  same rank order), and finishes every block as a full run does (``blocks.finish_block``).

So the rows equal those of a full run with the same options; cross-encoder scores can differ from a
full run's in the last float bits when that run's window (``k``) differs, since the pairs are batched
differently. Texts come from slice actors holding only the corpus texts.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict

from pipeline.compute import negatives as rules
from pipeline.io.output import DatasetError, OutputFolder, plan_key
from pipeline.io.storage import parse_storage_options, redact
from pipeline.spec import MineSpec
from pipeline.tasks.mine.blocks import CANDIDATES_DIR, BlockWriter, CandidateBlock, finish_block
from pipeline.tasks.mine.inputs import MineError, list_inputs, scan_inputs


def saved_candidates(source: OutputFolder) -> dict:
    plan = source.plan()
    if plan is None:
        raise DatasetError(f"{redact(source.url)}: not a mining output (no .embedpipe/plan.json)")
    if plan.get("job") != "mine" or "candidates" not in plan:
        raise DatasetError(
            f"{redact(source.url)}: holds no saved candidates (mine it with --save-candidates first)"
        )
    return dict(plan["candidates"], key=plan["key"])


def check_compatible(spec: MineSpec, saved: dict, storage_options: dict) -> None:
    """Refuse what the candidates cannot give without a model: another model or cross-encoder, prompts."""
    from pipeline.model.files import fingerprint, local_model_dir

    where = redact(spec.from_candidates)
    if spec.model:
        given = fingerprint(local_model_dir(spec.model, storage_options), {"truncate_dim": None})
        if given != saved["model_fingerprint"]:
            raise MineError(
                f"{where}: the candidates were made with another model (fingerprint "
                f"{saved['model_fingerprint']}, --model {spec.model} has {given}); mine again with that "
                "model, or leave --model out"
            )
    if spec.cross_encoder:
        from pipeline.model.cross_encoder import cross_encoder_fingerprint

        if saved.get("cross_encoder_fingerprint") is None:
            raise MineError(
                f"{where}: the candidates were saved without a cross-encoder; mine again with "
                f"--cross-encoder {spec.cross_encoder} --save-candidates"
            )
        given = cross_encoder_fingerprint(local_model_dir(spec.cross_encoder, storage_options))
        if given != saved["cross_encoder_fingerprint"]:
            raise MineError(
                f"{where}: the candidates were rescored with another cross-encoder (fingerprint "
                f"{saved['cross_encoder_fingerprint']}, --cross-encoder has {given})"
            )
    for name in ("query_prompt", "query_prompt_name", "corpus_prompt", "corpus_prompt_name"):
        if getattr(spec, name) is not None:
            raise MineError(
                f"{name}: the candidates were encoded with query prompt {saved['query_prompt']!r} and corpus "
                f"prompt {saved['corpus_prompt']!r}; another prompt needs a new full run"
            )


def run_from_candidates(spec: MineSpec, log) -> dict:
    from pipeline.tasks.mine.job import (
        OWNED,
        check_output_columns,
        committed_blocks,
        finish,
        load_duplicates,
        mining_options,
        with_defaults,
    )

    started = time.perf_counter()
    storage_options = parse_storage_options(spec.storage_option)
    output = OutputFolder(spec.output, storage_options)
    source = OutputFolder(spec.from_candidates, storage_options)
    if source.url == output.url:
        raise MineError(f"{redact(output.url)}: --output must differ from --from-candidates")
    saved = saved_candidates(source)
    check_compatible(spec, saved, storage_options)
    spec = with_defaults(spec, saved)
    inputs = list_inputs(spec, storage_options, None, None)
    log(inputs.columns_line())
    for role, name in (("anchor", inputs.anchor_column), ("positive", inputs.positive_column)):
        if name != saved[f"{role}_column"]:
            raise MineError(
                f"{role}_column: the candidates were made with {saved[f'{role}_column']!r}, not {name!r}"
            )
    duplicates = load_duplicates(spec, storage_options, log)
    plan = scan_inputs(inputs, storage_options, duplicates.map_corpus if duplicates else None)
    for what, digest in (("pairs", plan.pairs_digest), ("corpus", plan.corpus_digest)):
        if digest != saved[f"{what}_digest"]:
            raise MineError(
                f"{redact(source.url)}: the candidates were made from other {what} than "
                f"{', '.join(spec.input if what == 'pairs' else spec.corpus) or 'none'}; mine again"
            )
    options = mining_options(spec, plan.max_positives)
    check_output_columns(options, inputs.anchor_column, inputs.positive_column)
    k = rules.candidate_count(options, plan.max_positives, plan.corpus_size)
    if k > saved["k"]:
        raise MineError(
            f"{redact(source.url)}: holds {saved['k']} candidates per anchor, these options need {k} "
            f"(range_max {options.range_max} + {plan.max_positives} positives); lower range_max or mine again "
            "with a larger one"
        )
    per_block = saved["anchors_per_block"]
    blocks = list(range(0, plan.anchors, per_block))
    available = source.committed(CANDIDATES_DIR)
    missing = [n for n in range(len(blocks)) if n not in available]
    if missing:
        raise MineError(f"{redact(source.url)}: {len(missing)} candidates part(s) missing, e.g. {missing[0]}")
    key = plan_key(
        {
            "from_candidates": saved["key"],
            "options": asdict(options),
            "duplicates": duplicates.digest if duplicates else None,
            "columns": [inputs.anchor_column, inputs.positive_column],
        }
    )
    output.claim("mine", key, {"from_candidates": source.url}, overwrite=spec.overwrite, owned=OWNED, log=log)
    done = committed_blocks(output, len(blocks), False)
    todo = [n for n in range(len(blocks)) if n not in done]
    log(
        f"re-filtering {len(blocks)} part(s) of candidates from {redact(source.url)}; {len(done)} already committed"
    )
    timings: dict = {"plan_seconds": round(time.perf_counter() - started, 3)}
    workers = replaced = 0
    if todo:
        output.mark_incomplete()
        writer = BlockWriter(
            options,
            plan.max_positives,
            inputs.anchor_column,
            inputs.positive_column,
            output,
            duplicates,
            False,
        )
        workers, replaced = refilter(
            spec, plan, writer, source, available, blocks, todo, done, k, storage_options, timings
        )
    report = {
        "output": output.url,
        "columns": inputs.columns_record(),
        "output_format": options.output_format,
        "from_candidates": source.url,
        "corpus_reused_from": None,
        "candidates_per_anchor": k,
        "similarity_fn_name": saved["similarity_fn_name"],
        "options": asdict(options),
        "query_prompt": saved["query_prompt"],
        "corpus_prompt": saved["corpus_prompt"],
        "cross_encoder": (
            {
                "path": spec.cross_encoder,
                "fingerprint": saved["cross_encoder_fingerprint"],
                "rescored": options.rescore,
            }
            if spec.cross_encoder
            else None
        ),
        "duplicate_groups": (
            {"source": duplicates.source, "corpus_texts_in_groups": duplicates.mapped} if duplicates else None
        ),
        "candidates_saved": False,
        "timings": timings,
        "workers": workers,
        "actors_replaced": replaced,
    }
    return finish(output, report, plan, blocks, done, todo, False, started)


def refilter(spec, plan, writer, source, available, blocks, todo, done, k, storage_options, timings) -> tuple:
    """Text-only slice actors; each block's saved window, cut to ``k``, finished as a full run does."""
    from tqdm import tqdm

    from pipeline.runtime import cluster
    from pipeline.tasks.mine.search import TextCache, fetch_texts, plan_slices
    from pipeline.tasks.mine.slices import slice_pool

    cluster.connect(spec.ray_address)
    workers = cluster.plan_actors(spec.workers)
    loaders = plan_slices(plan, workers.workers, lambda number: None, storage_options)
    texts = TextCache(storage_options)
    started = time.perf_counter()
    with slice_pool(loaders, 0, workers.num_cpus if not workers.num_gpus else 1) as index:
        fetch = fetch_texts(index)
        with tqdm(total=len(todo), unit="parts", disable=not spec.progress, file=sys.stderr) as bar:
            for number in todo:
                block = CandidateBlock.from_table(source.read_part(available[number]), number).window(k)
                start = blocks[number]
                stop = blocks[number + 1] if number + 1 < len(blocks) else plan.anchors
                if block.start != start or block.anchors != stop - start:
                    raise DatasetError(
                        f"{redact(source.url_of(available[number].part))}: holds anchors {block.start}.."
                        f"{block.start + block.anchors - 1}, the plan says {start}..{stop - 1}"
                    )
                anchors = texts.read(plan.anchor_selection(start, stop))
                done[number] = finish_block(writer, block, anchors, fetch)
                bar.update(1)
        replaced = index.stats.actors_replaced
    timings["mine_seconds"] = round(time.perf_counter() - started, 3)
    return workers.workers, replaced
