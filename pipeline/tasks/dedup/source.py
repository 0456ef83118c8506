"""Dedup stage 1, the source: the embedding dataset dedup works on (an embed output as it is, or a raw
corpus embedded into ``<output>/embeddings`` first), and reading its rows back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.io import corpus
from pipeline.io.dataset import PartsLoader, complete_manifest, dataset_metadata, float_vectors
from pipeline.io.output import PLAN_FILE, DatasetError, OutputFolder
from pipeline.model.similarity import check_threshold
from pipeline.spec import DedupSpec, EmbedSpec


class DedupError(RuntimeError):
    """The dedup cannot run as asked; the message says why."""


@dataclass(frozen=True)
class Source:
    """The embedding dataset dedup works on."""

    folder: OutputFolder
    metadata: dict
    parts: tuple[dict, ...]  # manifest entries (part, rows, sha256) in corpus order
    raw: bool  # embedded from a raw corpus by this job

    @property
    def root(self) -> str:
        return self.folder.url

    @property
    def rows(self) -> int:
        return sum(int(p["rows"]) for p in self.parts)

    def offsets(self) -> list[int]:
        return [0, *np.cumsum([int(p["rows"]) for p in self.parts]).tolist()]

    def text_column(self, fallback: str) -> str:
        """The column holding the texts (the embed's own, else ``fallback``), checked to be in the parts:
        a raw corpus always has it, an embed output only when it kept it."""
        column = self.metadata.get("text_column") or fallback
        if self.parts and column not in self.folder.read_schema(self.parts[0]["part"]).names:
            where = self.folder.url_of(self.parts[0]["part"])
            raise DedupError(f"{where}: no text column {column!r} (embed with --keep-columns {column})")
        return column

    def loader(self, indices) -> PartsLoader:
        """A picklable reader of the given parts' vectors (for an actor)."""
        return PartsLoader(
            self.root, tuple(self.parts[i] for i in indices), self.folder.storage_options, self.metadata
        )

    def read_part(self, index: int, columns: list[str] | None = None) -> pa.Table:
        """Part ``index``, checked against its manifest checksum."""
        return self.folder.read_part(self.parts[index], columns)

    def ids(self, column: str = "id") -> pa.Array:
        """Every row's id, in corpus order, as one Arrow array (compact: no Python object per id)."""
        chunks = [self.read_part(index, [column]).column(column) for index in range(len(self.parts))]
        return pa.chunked_array(
            [c for chunk in chunks for c in chunk.chunks], chunks[0].type
        ).combine_chunks()

    def lengths_of(self, rows, column: str) -> dict[int, int]:
        """The text length of each given global row (for ``--keep longest``), streaming part by part."""
        offsets = self.offsets()
        wanted = np.asarray(sorted(rows), dtype=np.int64)
        out: dict[int, int] = {}
        for index, part in enumerate(self.parts):
            local = wanted[(wanted >= offsets[index]) & (wanted < offsets[index + 1])] - offsets[index]
            if not len(local):
                continue
            table = self.read_part(index)
            if column not in table.column_names:
                where = self.folder.url_of(part["part"])
                raise DedupError(f"{where}: no column {column!r} (embed with --keep-columns {column})")
            texts = table.column(column).take(pa.array(local)).to_pylist()
            out.update((int(r), len(t or "")) for r, t in zip(local + offsets[index], texts, strict=True))
        return out

    def rows_of(self, rows, column: str) -> dict:
        """The given global rows' values of one column (embeddings as float32), streaming part by part."""
        offsets = self.offsets()
        wanted = np.asarray(sorted(rows), dtype=np.int64)
        out: dict = {}
        for index, part in enumerate(self.parts):
            local = wanted[(wanted >= offsets[index]) & (wanted < offsets[index + 1])] - offsets[index]
            if not len(local):
                continue
            table = self.read_part(index)
            where = self.folder.url_of(part["part"])
            if column not in table.column_names:
                raise DedupError(f"{where}: no column {column!r} (embed with --keep-columns {column})")
            picked = table.take(pa.array(local))
            values = (
                float_vectors(picked, self.metadata, where)
                if column == "embedding"
                else picked.column(column).to_pylist()
            )
            for row, value in zip(local + offsets[index], values, strict=True):
                out[int(row)] = value
        return out


def load_source(folder: OutputFolder, raw: bool) -> Source:
    metadata = dataset_metadata(folder.url, folder.storage_options)
    source = Source(folder, metadata, tuple(complete_manifest(folder).get("parts", [])), raw)
    if source.rows == 0:
        raise DatasetError(f"{folder.url}: the corpus is empty (0 rows); nothing to deduplicate")
    return source


def resolve_source(
    spec: DedupSpec, output: OutputFolder, log, inputs: list[str] | None = None, folder: str = "embeddings"
) -> Source:
    """An embed output as it is, or a raw corpus embedded into <output>/<folder> first (``inputs``: the
    input, or the reference set of a decontamination)."""
    inputs = list(spec.input if inputs is None else inputs)
    storage_options = output.storage_options
    url = inputs[0].rstrip("/") if len(inputs) == 1 else None
    given = OutputFolder(url, storage_options) if url else None
    if given is not None and given.read_json(PLAN_FILE) is not None and not given.is_complete():
        raise DatasetError(
            f"{url}: an embed output that is not complete (no .embedpipe/SUCCESS); finish the embed first"
        )
    if given is not None and given.is_complete():
        source = load_source(given, raw=False)
        if spec.model:
            check_same_model(spec, source.metadata, storage_options, url)
        return source
    if not spec.model:
        raise DedupError(f"{', '.join(inputs)}: not an embedpipe dataset; pass --model to embed it first")
    from pipeline.model.config import load_model_config
    from pipeline.model.files import local_model_dir
    from pipeline.stages.embed import run_embed

    config = load_model_config(local_model_dir(spec.model, storage_options))
    fn = spec.similarity or config.similarity_fn_name
    if spec.threshold is not None:
        check_threshold(fn, spec.threshold, config.normalized)

    target = output.child(folder)
    sources = corpus.list_sources(inputs, storage_options)
    if not sources:
        raise DedupError(f"{', '.join(inputs)}: the corpus is empty")
    names = corpus.source_schema(sources[0], storage_options).names
    id_column = spec.id_column or ("id" if "id" in names else None)
    log(f"embedding the raw corpus into {target.url}")
    run_embed(
        EmbedSpec(
            model=spec.model,
            input=inputs,
            output=target.url,
            text_column=spec.text_column,
            id_column=spec.id_column,
            keep_columns=[n for n in names if n != id_column],
            rows_per_shard=spec.rows_per_shard,
            workers=spec.workers,
            ray_address=spec.ray_address,
            storage_option=list(spec.storage_option),
            progress=spec.progress,
            overwrite=spec.overwrite,
        ),
        log=log,
    )
    return load_source(target, raw=True)


def check_same_model(spec: DedupSpec, metadata: dict, storage_options: dict, url: str) -> None:
    from pipeline.model.files import fingerprint, local_model_dir

    expected = fingerprint(local_model_dir(spec.model, storage_options), {"truncate_dim": None})
    if metadata.get("fingerprint") != expected:
        raise DatasetError(
            f"{url}: was embedded with model fingerprint {metadata.get('fingerprint')}, but --model {spec.model} "
            f"has {expected}; drop --model to use the dataset's own embeddings, or re-embed"
        )
