"""Corpus slice actors: each holds a contiguous run of corpus indices, their vectors *and their texts*, and
optionally a CrossEncoder, so that search, texts for the output, positive similarities and
cross-encoder rescoring all happen where the corpus already is, and never on the driver.

The actor class extends ``runtime.actors.IndexShardActor`` (exact top-k, ``rows``) and keeps its name,
so process titles and tooling that look for index actors see the same name. A slice is re-made from its
loader when its actor is lost (``ActorPool`` slot semantics): the loader reads the slice's texts from
the input pieces itself and its vectors from the encoded chunks in Ray's object store (or from the
parts of an embed output whose vectors are reused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.runtime import actors as runtime_actors


@dataclass(frozen=True)
class SliceChunk:
    """One corpus chunk of a slice: where its texts are, and where its vectors are (an ObjectRef of
    encoded vectors, ``"embed"`` for an embed part's own vectors, or None: texts only)."""

    piece: Any  # inputs.Piece
    column: str
    rows: np.ndarray
    vectors: Any = None


@dataclass(frozen=True)
class SliceLoader:
    """Picklable: (vectors [n, d] float32, or [n, 0] without vectors; texts) of a slice's chunks."""

    chunks: tuple[SliceChunk, ...]
    storage_options: dict
    embed_metadata: dict | None = None

    def __call__(self) -> tuple[np.ndarray, list[str]]:
        import ray

        from pipeline.io.dataset import float_vectors
        from pipeline.io.output import OutputFolder
        from pipeline.tasks.mine.inputs import texts_of

        texts: list[str] = []
        arrays: list[np.ndarray] = []
        refs = [c.vectors for c in self.chunks if c.vectors is not None and not isinstance(c.vectors, str)]
        fetched = iter(ray.get(refs)) if refs else iter(())
        for chunk in self.chunks:
            table = chunk.piece.read([chunk.column], self.storage_options)
            values = texts_of(table, chunk.column, chunk.piece)
            texts.extend(values[int(r)] for r in chunk.rows)
            if chunk.vectors is None:
                continue
            if isinstance(chunk.vectors, str):  # "embed": the part's own vectors
                part = OutputFolder(chunk.piece.root, self.storage_options).read_part(
                    chunk.piece.entry, ["embedding"]
                )
                arrays.append(float_vectors(part, self.embed_metadata or {}, chunk.piece.url)[chunk.rows])
            else:
                arrays.append(np.asarray(next(fetched), dtype=np.float32))
        if arrays:
            vectors = np.concatenate(arrays).astype(np.float32, copy=False)
            if len(vectors) != len(texts):
                raise ValueError(f"a corpus slice has {len(texts)} texts but {len(vectors)} vectors")
        else:
            vectors = np.zeros((len(texts), 0), dtype=np.float32)
        return vectors, texts


class IndexShardActor(runtime_actors.IndexShardActor):
    """An index actor that also holds its slice's texts (and, for rescoring, a CrossEncoder)."""

    def __init__(
        self, loader: SliceLoader, offset: int, threads: int = 1, cross_encoder: dict | None = None
    ) -> None:
        vectors, texts = loader()
        self.texts = texts
        super().__init__(lambda: vectors, offset, threads)
        self.cross_encoder = None
        if cross_encoder is not None:
            from pipeline.model.cross_encoder import load_cross_encoder

            self.cross_encoder = load_cross_encoder(
                cross_encoder["path"],
                cross_encoder.get("storage_options"),
                allow_pickle=cross_encoder.get("allow_pickle", False),
                max_batch_tokens=cross_encoder.get("max_batch_tokens"),
            )

    def _positions(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(local positions, mask of the indices that live in this slice), same shape as ``indices``."""
        indices = np.asarray(indices, dtype=np.int64)
        if not len(self.global_rows):
            return np.zeros(indices.shape, np.int64), np.zeros(indices.shape, bool)
        position = np.clip(np.searchsorted(self.global_rows, indices), 0, len(self.global_rows) - 1)
        return position, self.global_rows[position] == indices

    def texts_of(self, global_indices: Any) -> tuple[np.ndarray, list[str]]:
        """(indices, texts) of the requested corpus indices that live in this slice."""
        wanted = np.asarray(global_indices, dtype=np.int64)
        position, hit = self._positions(wanted)
        return wanted[hit], [self.texts[int(p)] for p in position[hit]]

    def positive_scores(self, queries: Any, positives: Any, ptr: Any, fn: str) -> np.ndarray:
        """The anchors' scores to their positives that live in this slice (anchor i's positives are
        ``positives[ptr[i]:ptr[i + 1]]``), NaN for the others: what ST's ``similarity_pairwise`` gives."""
        import torch

        from pipeline.model.similarity import similarity

        positives = np.asarray(positives, dtype=np.int64)
        ptr = np.asarray(ptr, dtype=np.int64)
        queries = np.asarray(queries, dtype=np.float32)
        out = np.full(positives.shape, np.nan, dtype=np.float32)
        position, hit = self._positions(positives)
        for row in range(len(ptr) - 1):
            span = np.arange(ptr[row], ptr[row + 1])
            span = span[hit[span]]
            if len(span):
                mine = self.vectors[torch.as_tensor(position[span]).to(self.vectors.device)]
                out[span] = similarity(queries[row][None, :], mine, fn)[0]
        return out

    def positive_similarity(self, candidates: Any, positive_vectors: Any, ptr: Any, fn: str) -> np.ndarray:
        """[n, k] float32: each candidate's best score to one of its anchor's positives (document vectors,
        the model's similarity), for the candidates in this slice, NaN elsewhere. Anchor i's positive
        vectors are ``positive_vectors[ptr[i]:ptr[i + 1]]``."""
        import torch

        from pipeline.model.similarity import pairwise_scores

        candidates = np.asarray(candidates, dtype=np.int64)
        out = np.full(candidates.shape, np.nan, dtype=np.float32)
        position, hit = self._positions(candidates)
        hit &= candidates >= 0
        positives = torch.as_tensor(np.asarray(positive_vectors, dtype=np.float32)).to(self.vectors.device)
        ptr = np.asarray(ptr, dtype=np.int64)
        for row in np.flatnonzero(hit.any(axis=1)).tolist():
            columns = np.flatnonzero(hit[row])
            mine = self.vectors[torch.as_tensor(position[row, columns]).to(self.vectors.device)]
            scores = pairwise_scores(mine, positives[ptr[row] : ptr[row + 1]], fn).to(torch.float32)
            out[row, columns] = scores.max(dim=1).values.cpu().numpy()
        return out

    def rescore(
        self, anchors: list[str], candidates: Any, positives: Any, ptr: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cross-encoder scores of (anchor, text) for the candidates ([n, k]) and the positives (flat: anchor
        i's are ``positives[ptr[i]:ptr[i + 1]]``) that live in this slice, NaN elsewhere. One predict
        call, candidates then positives, row-major."""
        if self.cross_encoder is None:
            raise RuntimeError("this index actor was started without a cross-encoder")
        candidates = np.asarray(candidates, dtype=np.int64)
        positives = np.asarray(positives, dtype=np.int64)
        ptr = np.asarray(ptr, dtype=np.int64)
        owner = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
        out_c = np.full(candidates.shape, np.nan, dtype=np.float32)
        out_p = np.full(positives.shape, np.nan, dtype=np.float32)
        position_c, hit_c = self._positions(candidates)
        hit_c &= candidates >= 0
        rows, columns = np.nonzero(hit_c)
        position_p, hit_p = self._positions(positives)
        at_p = np.flatnonzero(hit_p)
        queries = [anchors[r] for r in rows.tolist()] + [anchors[r] for r in owner[at_p].tolist()]
        documents = [self.texts[int(p)] for p in position_c[rows, columns].tolist()]
        documents += [self.texts[int(p)] for p in position_p[at_p].tolist()]
        scores = self.cross_encoder.predict(queries, documents)
        out_c[rows, columns] = scores[: len(rows)]
        out_p[at_p] = scores[len(rows) :]
        return out_c, out_p


def slice_pool(
    loaders: list[tuple[SliceLoader, int]],
    num_gpus: float,
    num_cpus: float,
    cross_encoder: dict | None = None,
    **kwargs: Any,
):
    """One slice actor per (loader, first corpus index) (not started yet: use ``with``); a lost one is
    re-made from the same loader."""
    return runtime_actors.ActorPool.of(
        IndexShardActor,
        len(loaders),
        lambda slot: (loaders[slot][0], loaders[slot][1], max(1, int(num_cpus)), cross_encoder),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        what="index actor",
        **kwargs,
    )
