"""pipeline.ray_data.Embed in a Ray Data pipeline on the local Ray cluster, and an embed output read by
ray.data.read_parquet as it is."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support.tiny_models import build_tiny_model
from tests.tasks.test_embed import embed, make_texts

ray_data = pytest.importorskip("ray.data")


@pytest.fixture(scope="module")
def prompted_model(tmp_path_factory: pytest.TempPathFactory):
    """A tiny model with query / document prompts, so that the role changes the vectors."""
    return build_tiny_model(
        tmp_path_factory.mktemp("ray-data-models") / "tiny-prompts",
        prompts={"query": "query: ", "document": "passage: "},
    )


@pytest.mark.parametrize("role", [None, "query"])
def test_embed_in_map_batches_matches_encoder(ray_local, prompted_model, role) -> None:
    import ray

    from pipeline.model import load_encoder
    from pipeline.ray_data import Embed

    texts = make_texts(40, seed=3)
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)])
    out = ds.map_batches(
        Embed,
        fn_constructor_args=(str(prompted_model),),
        fn_constructor_kwargs={"role": role},
        concurrency=1,
        batch_size=16,
        num_cpus=1,
    ).take_all()
    assert len(out) == len(texts)
    rows = sorted(out, key=lambda r: r["id"])
    assert [r["text"] for r in rows] == texts
    got = np.stack([np.asarray(r["embedding"], dtype=np.float32) for r in rows])
    expected = load_encoder(prompted_model, device="cpu").encode(texts, role=role)
    assert got.dtype == np.float32 and got.shape == expected.shape
    # other batch compositions, other padding: equal within float32 summation noise
    np.testing.assert_allclose(got, expected, atol=1e-5)
    if role is not None:
        plain = load_encoder(prompted_model, device="cpu").encode(texts)
        assert np.abs(plain - expected).max() > 1e-3  # the role's prompt is in effect


def test_embed_batch_formats(prompted_model) -> None:
    import pandas as pd

    from pipeline.ray_data import Embed

    texts = make_texts(5, seed=4)
    embed_fn = Embed(str(prompted_model), text_column="body", output_column="vec")
    expected = embed_fn.encode(texts)
    table = embed_fn(pa.table({"body": texts}))
    assert np.allclose(np.stack(table.column("vec").to_numpy(zero_copy_only=False)), expected, atol=1e-6)
    frame = embed_fn(pd.DataFrame({"body": texts}))
    assert np.allclose(np.stack(frame["vec"].to_list()), expected, atol=1e-6)
    numpy_batch = embed_fn({"body": np.array(texts, dtype=object)})
    assert numpy_batch["vec"].shape == (5, embed_fn.dim)
    with pytest.raises(ValueError, match="'body'"):
        embed_fn({"body": np.array(["a", None], dtype=object)})


def test_read_parquet_reads_an_embed_output(ray_local, tiny_model_dir, tmp_path) -> None:
    import ray

    corpus = tmp_path / "c.parquet"
    texts = make_texts(30, seed=5)
    pq.write_table(pa.table({"id": list(range(30)), "text": texts}), corpus)
    output = tmp_path / "out"
    embed(tiny_model_dir, corpus, output, rows_per_shard=10)
    rows = sorted(ray.data.read_parquet(str(output)).take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(30))
    vectors = np.stack([np.asarray(r["embedding"], dtype=np.float32) for r in rows])
    from pipeline.io.dataset import read_dataset

    table = read_dataset(str(output), None)
    order = np.argsort(np.asarray(table.column("id").to_pylist()))
    stored = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))[order]
    np.testing.assert_array_equal(vectors, stored)
