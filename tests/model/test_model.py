"""pipeline.model against sentence-transformers loading the same directory.

Tiny random-weight BERT models (tests/support/tiny_models.py) are saved by sentence-transformers
itself, loaded by both sides, and must agree within float32 rounding of a forward pass
(tests/support/float32.py: forward_error) on real, mixed-length texts, so padding, truncation and
batching are all exercised. Broken model directories must fail with a
ModelConfigError that names the file and the problem.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from pipeline.model import ModelConfigError, load_encoder
from pipeline.model.encoder import Encoder, plan_batches
from tests.support.float32 import forward_error, score_error, sum_error
from tests.support.paths import TEST_DATA
from tests.support.tiny_models import (
    DenseSpec,
    build_fallback_max_seq_length_model,
    build_plain_hf_model,
    build_tiny_model,
    expected_fallback_max_seq_length,
    real_model_path,
)

POOLING_MODES = ["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]


def load_texts(n: int, seed: int, max_chars: int = 3000) -> list[str]:
    """Real texts of mixed lengths (tests/data: fortunes, FAQ questions and answers, man pages), and three
    degenerate ones."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    pools = [
        pq.read_table(TEST_DATA / "fortunes.parquet", columns=["text"]).column("text").to_pylist(),
        pq.read_table(TEST_DATA / "faq_pairs.parquet", columns=["query"]).column("query").to_pylist(),
        pq.read_table(TEST_DATA / "faq_pairs.parquet", columns=["positive"]).column("positive").to_pylist(),
        pq.read_table(TEST_DATA / "manpages_pairs.parquet", columns=["positive"])
        .column("positive")
        .to_pylist(),
    ]
    texts = ["", " \t\n", "A"]
    counts = [n - 3 - 3 * (n // 5), n // 5, n // 5, n // 5]  # fortunes, FAQ questions, FAQ answers, man pages
    for pool, count in zip(pools, counts, strict=True):
        picks = rng.choice(len(pool), size=count, replace=False)
        texts += [pool[i][:max_chars] for i in picks]
    rng.shuffle(texts)
    return texts


TEXTS = load_texts(64, seed=7, max_chars=1200)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def assert_same_encoding(got: np.ndarray, want: np.ndarray, model_dir: Path) -> None:
    """Two float32 encodings of the same texts by one model: equal up to forward_error, row by row."""
    assert got.shape == want.shape, (got.shape, want.shape)
    excess = np.abs(got.astype(np.float64) - want.astype(np.float64)) - forward_error(want, model_dir)
    assert excess.max(initial=-1.0) <= 0, f"off by up to {excess.max():g} beyond float32 rounding"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, tiny forwards are 10x faster without spinning."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """build_tiny_model(**options), cached per option set for the module."""
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("tiny")

    def make(**options: Any) -> Path:
        key = json.dumps(options, sort_keys=True, default=repr)
        if key not in cache:
            cache[key] = build_tiny_model(root / f"m{len(cache)}", **options)
        return cache[key]

    return make


def pair(path: Path, truncate_dim: int | None = None, **load: Any) -> tuple[Encoder, SentenceTransformer]:
    ours = load_encoder(path, device="cpu", truncate_dim=truncate_dim, **load)
    theirs = SentenceTransformer(str(path), device="cpu", truncate_dim=truncate_dim)
    return ours, theirs


def assert_parity(
    path: Path,
    texts: list[str] = TEXTS,
    *,
    prompt_name: str | None = None,
    prompt: str | None = None,
    truncate_dim: int | None = None,
    max_batch_tokens: int = 1024,
    **load: Any,
) -> tuple[np.ndarray, Encoder, SentenceTransformer]:
    """Encode with both sides; return our embeddings after checking they match to float32 rounding."""
    ours, theirs = pair(path, truncate_dim, **load)
    got = ours.encode(texts, prompt_name=prompt_name, prompt=prompt, max_batch_tokens=max_batch_tokens)
    want = theirs.encode(texts, prompt_name=prompt_name, prompt=prompt, convert_to_numpy=True)
    assert got.dtype == np.float32
    assert got.shape == (len(texts), ours.dim)
    assert_same_encoding(got, want, path)
    return got, ours, theirs


# -- pooling --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pooling_mode_matches(tiny: Callable[..., Path], mode: str) -> None:
    got, ours, _ = assert_parity(tiny(pooling=mode, normalize=False))
    assert ours.pooling_modes == (mode,)
    assert ours.counters.padded_tokens > ours.counters.tokens  # batches really were padded


@pytest.mark.parametrize(
    "modes", [["max", "cls", "mean"], ["mean", "max", "cls"], ["weightedmean", "lasttoken"]]
)
def test_several_pooling_modes_concatenate_in_order(tiny: Callable[..., Path], modes: list[str]) -> None:
    got, ours, _ = assert_parity(tiny(pooling=modes, normalize=False))
    assert ours.dim == 32 * len(modes)
    single = load_encoder(tiny(pooling=modes[0], normalize=False), device="cpu").encode(TEXTS)
    assert_same_encoding(got[:, :32], single, tiny(pooling=modes[0], normalize=False))


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_include_prompt_false_excludes_the_prompt(tiny: Callable[..., Path], mode: str) -> None:
    path = tiny(pooling=mode, include_prompt=False, prompts={"query": "query: find the answer to "})
    got, _, _ = assert_parity(path, prompt_name="query")
    with_prompt = load_encoder(
        tiny(pooling=mode, prompts={"query": "query: find the answer to "}), device="cpu"
    )
    if mode != "lasttoken":  # the last token is never a prompt token
        assert max_abs_diff(got, with_prompt.encode(TEXTS, prompt_name="query")) > 1e-4


@pytest.mark.parametrize("schema", ["v6", "legacy"])
def test_both_pooling_schemas(tiny: Callable[..., Path], schema: str) -> None:
    path = tiny(pooling=["cls", "mean_sqrt_len_tokens"], include_prompt=False, pooling_schema=schema)
    config = json.loads((path / "1_Pooling" / "config.json").read_text())
    assert ("pooling_mode" in config) == (schema == "v6")
    assert ("word_embedding_dimension" in config) == (schema == "legacy")
    got, ours, _ = assert_parity(path, prompt="query: ")
    assert ours.pooling_modes == ("cls", "mean_sqrt_len_tokens")
    assert ours.describe()["include_prompt"] is False


# -- Dense, Normalize, truncate_dim ---------------------------------------------------------------


@pytest.mark.parametrize(
    "dense",
    [
        [DenseSpec(16, "Tanh")],
        [DenseSpec(24, "GELU")],
        [DenseSpec(20, "ReLU", bias=False), DenseSpec(8, "Tanh")],
        [DenseSpec(12, "Identity")],
    ],
    ids=["tanh", "gelu", "relu-nobias+tanh", "identity"],
)
def test_dense_layers(tiny: Callable[..., Path], dense: list[DenseSpec]) -> None:
    got, ours, _ = assert_parity(tiny(pooling=["mean", "max"], dense=dense))
    assert ours.dim == dense[-1].out_features
    # unit rows up to the rounding of dim float32 components
    norms = np.linalg.norm(got.astype(np.float64), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=0, atol=sum_error(ours.dim))


@pytest.mark.parametrize("out_features", [32, 16], ids=["same-size", "projected"])
def test_dense_residual(tiny: Callable[..., Path], out_features: int) -> None:
    assert_parity(tiny(pooling="mean", dense=[DenseSpec(out_features, "GELU", residual=True)]))


def test_dense_without_activation_key_defaults_to_tanh(broken: Path) -> None:
    # sentence-transformers' Dense defaults to Tanh when the config names no activation.
    edit_json(broken / "2_Dense" / "config.json", lambda c: c.pop("activation_function"))
    assert_parity(broken)


def test_without_normalize(tiny: Callable[..., Path]) -> None:
    got, ours, _ = assert_parity(tiny(pooling="mean", dense=[DenseSpec(16, "Tanh")], normalize=False))
    assert not ours.normalized
    assert np.abs(np.linalg.norm(got, axis=1) - 1.0).max() > 1e-2


@pytest.mark.parametrize("truncate_dim", [8, 32])
def test_truncate_dim(tiny: Callable[..., Path], truncate_dim: int) -> None:
    path = tiny(pooling=["mean", "cls"])
    got, ours, _ = assert_parity(path, truncate_dim=truncate_dim)
    assert ours.dim == truncate_dim and ours.describe()["truncate_dim"] == truncate_dim
    full = load_encoder(path, device="cpu").encode(TEXTS)
    assert_same_encoding(got, full[:, :truncate_dim], path)
    assert load_encoder(path, device="cpu").fingerprint != ours.fingerprint
    with pytest.raises(ValueError, match="truncate_dim"):
        load_encoder(path, device="cpu", truncate_dim=65)


# -- prompts --------------------------------------------------------------------------------------

PROMPTS = {
    "query": "query: ",
    "passage": "passage: ",
    "long": "Instruct: retrieve the most relevant document. Query: ",
}


@pytest.fixture(scope="module")
def prompt_model(tiny: Callable[..., Path]) -> Path:
    return tiny(pooling="mean", prompts=PROMPTS, default_prompt_name="query")


@pytest.mark.parametrize("prompt_name", ["query", "passage", "long", "document"])
def test_prompt_by_name(prompt_model: Path, prompt_name: str) -> None:
    # sentence-transformers 6 adds an empty "document" prompt on save; naming it disables the default.
    assert_parity(prompt_model, prompt_name=prompt_name)


def test_default_prompt_applies_when_none_given(prompt_model: Path) -> None:
    got, ours, _ = assert_parity(prompt_model)
    assert ours.describe()["default_prompt_name"] == "query"
    assert_same_encoding(got, ours.encode(TEXTS, prompt="query: "), prompt_model)
    assert max_abs_diff(got, ours.encode(TEXTS, prompt="")) > 1e-4


@pytest.mark.parametrize("prompt", ["", "Represent this sentence: ", "zzz qqq "])
def test_explicit_prompt_string(prompt_model: Path, prompt: str) -> None:
    assert_parity(prompt_model, prompt=prompt)


def test_unknown_prompt_name(prompt_model: Path) -> None:
    with pytest.raises(ValueError, match="nope"):
        load_encoder(prompt_model, device="cpu").encode(TEXTS[:2], prompt_name="nope")


# -- max_seq_length and lower-casing --------------------------------------------------------------


def test_max_seq_length_truncates_long_texts(tiny: Callable[..., Path]) -> None:
    path = tiny(pooling=["mean", "lasttoken"], max_seq_length=16, prompts={"q": "query: "})
    _, ours, theirs = assert_parity(path)
    assert ours.max_seq_length == theirs.max_seq_length == 16
    assert_parity(path, prompt_name="q")
    lengths = ours.tokenize(TEXTS).lengths
    assert lengths.max() == 16 and (lengths == 16).sum() >= 5


def test_legacy_max_seq_length_wins_over_tokenizer(tiny: Callable[..., Path]) -> None:
    path = tiny(pooling="mean", legacy_max_seq_length=24)
    assert json.loads((path / "tokenizer_config.json").read_text())["model_max_length"] == 512
    _, ours, theirs = assert_parity(path)
    assert ours.max_seq_length == theirs.max_seq_length == 24


@pytest.mark.parametrize("tokenizer_max_length", [512, None, 40])
def test_max_seq_length_fallback_rule(tmp_path: Path, tokenizer_max_length: int | None) -> None:
    path = build_fallback_max_seq_length_model(
        tmp_path / "m", tokenizer_max_length=tokenizer_max_length, max_position_embeddings=64
    )
    sbert = json.loads((path / "sentence_bert_config.json").read_text())
    assert "max_seq_length" not in sbert
    expected = expected_fallback_max_seq_length(tokenizer_max_length, 64)
    _, ours, theirs = assert_parity(path)
    assert ours.max_seq_length == theirs.max_seq_length == expected
    assert ours.describe()["max_seq_length"] == expected


@pytest.mark.parametrize("name", ["sentence_distilbert_config.json", "sentence_xlm-roberta_config.json"])
def test_older_transformer_config_names(tiny: Callable[..., Path], tmp_path: Path, name: str) -> None:
    # Older sentence-transformers releases named the file after the architecture; both libraries read it.
    path = tmp_path / "older"
    shutil.copytree(tiny(pooling="mean", legacy_max_seq_length=24), path)
    (path / "sentence_bert_config.json").rename(path / name)
    _, ours, theirs = assert_parity(path)
    assert ours.max_seq_length == theirs.max_seq_length == 24


def test_model_without_token_type_ids(tiny: Callable[..., Path], tmp_path: Path) -> None:
    # A DistilBERT encoder (no token type embeddings) behind a BERT tokenizer, which returns token_type_ids:
    # another architecture than BERT, and inputs the model has no use for, still give the same vectors.
    from transformers import DistilBertConfig, DistilBertModel

    path = tmp_path / "distilbert"
    shutil.copytree(tiny(pooling="mean"), path)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128
    )
    for name in ("config.json", "model.safetensors"):
        (path / name).unlink()
    DistilBertModel(config).save_pretrained(path)
    assert "token_type_ids" in load_encoder(path, device="cpu").tokenizer("a text")
    assert_parity(path)


def test_do_lower_case(tiny: Callable[..., Path]) -> None:
    path = tiny(pooling="mean", do_lower_case=True)
    got, ours, _ = assert_parity(path)
    assert ours.describe()["do_lower_case"] is True
    assert ours.tokenizer.tokenize("Hello WORLD") == ["hello", "world"]
    # Without the flag the (cased) tokenizer sees unknown upper-case words: the vectors differ.
    sbert = path / "sentence_bert_config.json"
    cased = path.parent / "cased-copy"
    shutil.copytree(path, cased)
    (cased / sbert.name).write_text(json.dumps({"do_lower_case": False}))
    assert max_abs_diff(got, load_encoder(cased, device="cpu").encode(TEXTS)) > 1e-4


# -- batching -------------------------------------------------------------------------------------


def test_results_do_not_depend_on_batch_budget(tiny: Callable[..., Path]) -> None:
    path = tiny(pooling=["weightedmean", "max"], include_prompt=False)
    ours = load_encoder(path, device="cpu")
    reference = ours.encode(TEXTS, prompt="query: ", max_batch_tokens=1)  # one text per batch
    for budget in (64, 300, 2048, 1 << 20):
        got = ours.encode(TEXTS, prompt="query: ", max_batch_tokens=budget)
        assert_same_encoding(got, reference, path)
    # Input order is preserved: a permutation of the inputs permutes the rows.
    order = np.random.default_rng(3).permutation(len(TEXTS))
    permuted = ours.encode([TEXTS[i] for i in order], prompt="query: ", max_batch_tokens=300)
    assert_same_encoding(permuted, reference[order], path)
    assert ours.encode([]).shape == (0, ours.dim)
    with pytest.raises(TypeError):
        ours.encode("a single string")  # type: ignore[arg-type]


def test_counters(tiny: Callable[..., Path]) -> None:
    ours = load_encoder(tiny(pooling="mean"), device="cpu")
    tokens = ours.tokenize(TEXTS)
    ours.encode(TEXTS, max_batch_tokens=256)
    counters = ours.counters
    assert counters.texts == len(TEXTS)
    assert counters.tokens == int(tokens.lengths.sum())
    assert counters.padded_tokens >= counters.tokens
    assert counters.batches == len(plan_batches(tokens.lengths, 256))
    assert 0.0 <= counters.padding_ratio < 1.0


@pytest.mark.parametrize("budget", [1, 7, 64, 500, 4096])
def test_plan_batches(budget: int) -> None:
    rng = np.random.default_rng(budget)
    lengths = np.concatenate([rng.integers(1, 300, size=500), [1000, 1000, 2, 2]])
    batches = plan_batches(lengths, budget)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))  # every index exactly once
    for batch in batches:
        assert len(batch) >= 1
        if len(batch) > 1:  # only a single over-long text may exceed the budget
            assert len(batch) * int(lengths[batch].max()) <= budget
    again = plan_batches(lengths.copy(), budget)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    assert plan_batches(np.zeros(0, dtype=np.int64), budget) == []


# -- similarity -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["cosine", "dot", "euclidean", "manhattan"])
def test_similarity_matches(tiny: Callable[..., Path], fn: str) -> None:
    path = tiny(pooling="mean", dense=[DenseSpec(16, "Tanh")], normalize=False, similarity_fn_name=fn)
    got, ours, theirs = assert_parity(path, TEXTS[:40])
    assert ours.similarity_fn_name == fn == theirs.similarity_fn_name
    want = theirs.similarity(torch.from_numpy(got[:15]), torch.from_numpy(got[15:])).numpy()
    scores = ours.similarity(got[:15], got[15:])
    assert scores.shape == (15, 25)
    assert (np.abs(scores - want) <= 2 * score_error(got[:15], got[15:], fn)).all()  # two float32 evaluations


# -- real model -----------------------------------------------------------------------------------


def test_real_all_minilm_l6_v2() -> None:
    texts = load_texts(64, seed=11, max_chars=1500)
    path = real_model_path()
    got, ours, _ = assert_parity(path, texts, max_batch_tokens=4096)
    description = ours.describe()
    assert description["pooling"] == ["mean"]
    assert description["normalized"] is True
    assert description["dim"] == ours.dim == 384
    assert description["similarity_fn_name"] == "cosine"
    assert description["max_seq_length"] == 256
    assert ours.tokenize(texts).lengths.max() == 256  # some texts were truncated


# -- plain Hugging Face directory and pickles -----------------------------------------------------


def test_plain_hf_directory_loads_as_mean_pooling(tmp_path: Path) -> None:
    path = build_plain_hf_model(tmp_path / "plain")
    with pytest.warns(UserWarning, match="no modules.json"):
        ours = load_encoder(path, device="cpu")
    assert ours.pooling_modes == ("mean",) and not ours.normalized
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_parity(path)


def test_pickle_checkpoint_needs_allow_pickle(tiny: Callable[..., Path]) -> None:
    path = tiny(pooling="cls", dense=[DenseSpec(8, "ReLU")], safe_serialization=False)
    assert not list(path.rglob("*.safetensors"))
    with pytest.raises(ModelConfigError, match="pytorch_model.bin") as error:
        load_encoder(path, device="cpu")
    assert "allow_pickle" in str(error.value) and str(path) in str(error.value)
    assert_parity(path, allow_pickle=True)


# -- broken model directories ---------------------------------------------------------------------


@pytest.fixture()
def broken(tiny: Callable[..., Path], tmp_path: Path) -> Path:
    """A fresh copy of a valid model (Transformer, Pooling, Dense, Normalize) to break."""
    source = tiny(pooling="mean", dense=[DenseSpec(8, "Tanh")])
    target = tmp_path / "broken"
    shutil.copytree(source, target)
    return target


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def expect_config_error(path: Path, *fragments: str, **load: Any) -> ModelConfigError:
    with pytest.raises(ModelConfigError) as error:
        load_encoder(path, device="cpu", **load)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, message
    return error.value


def test_unknown_module_type(broken: Path) -> None:
    edit_json(broken / "modules.json", lambda m: m[1].update(type="mypkg.modules.EvilPooling"))
    expect_config_error(
        broken, str(broken / "modules.json"), "unknown module type", "mypkg.modules.EvilPooling"
    )


def test_known_class_name_outside_sentence_transformers_is_refused(broken: Path) -> None:
    # Only the registry's type strings load: sentence-transformers itself would import this class (and
    # refuses to without trust_remote_code), so a matching class name is not enough.
    edit_json(broken / "modules.json", lambda m: m[1].update(type="mypkg.models.Pooling"))
    expect_config_error(broken, str(broken / "modules.json"), "unknown module type", "'mypkg.models.Pooling'")


# -- module registry ------------------------------------------------------------------------------


def test_registry_keys_are_sentence_transformers_names() -> None:
    # Every type string we accept is one sentence-transformers 6.2 resolves, to the class of the same name.
    from sentence_transformers.util.misc import import_from_string

    from pipeline.model.modules import MODULE_CLASSES, MODULE_TYPES

    assert set(MODULE_TYPES.values()) == set(MODULE_CLASSES)
    for type_name, cls in MODULE_TYPES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert import_from_string(type_name).__name__ == cls.__name__, type_name


# modules.json "type" strings as each sentence-transformers release wrote them (the tiny models have 6.x's).
RELEASE_TYPE_NAMES = {
    "<=5.3": {
        "Transformer": "sentence_transformers.models.Transformer",
        "Pooling": "sentence_transformers.models.Pooling",
        "Dense": "sentence_transformers.models.Dense",
        "Normalize": "sentence_transformers.models.Normalize",
    },
    "5.4-5.7": {
        "Transformer": "sentence_transformers.base.modules.transformer.Transformer",
        "Pooling": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
        "Dense": "sentence_transformers.base.modules.dense.Dense",
        "Normalize": "sentence_transformers.sentence_transformer.modules.normalize.Normalize",
    },
}


@pytest.mark.parametrize("release", sorted(RELEASE_TYPE_NAMES))
def test_older_module_type_names(tiny: Callable[..., Path], tmp_path: Path, release: str) -> None:
    path = tmp_path / "older-types"
    shutil.copytree(tiny(pooling="mean", dense=[DenseSpec(8, "Tanh")]), path)
    names = RELEASE_TYPE_NAMES[release]
    edit_json(
        path / "modules.json", lambda m: [e.update(type=names[e["type"].rsplit(".", 1)[-1]]) for e in m]
    )
    _, ours, _ = assert_parity(path)
    loaded = [m["type"] for m in ours.describe()["module_settings"]]
    assert loaded == ["Transformer", "Pooling", "Dense", "Normalize"]


def test_module_chain_passes_only_declared_keywords() -> None:
    # A route (task="query") reaches the modules that declare it, and no other.
    from pipeline.model.modules import Module, ModuleChain, ModuleConfig

    class Recorder(Module):
        def forward(self, features, **kwargs):
            features.setdefault("seen", []).append(kwargs)
            return features

    class Routed(Recorder):
        forward_kwargs = frozenset({"task"})

    config = ModuleConfig(path=Path("."))
    chain = ModuleChain([Recorder(config), Routed(config)])
    assert chain({}, task="query", other=1)["seen"] == [{}, {"task": "query"}]


def test_first_transformer_config_with_content_wins(tiny: Callable[..., Path], tmp_path: Path) -> None:
    # As sentence-transformers: an empty sentence_bert_config.json does not hide an older-named file.
    path = tmp_path / "empty-first"
    shutil.copytree(tiny(pooling="mean", legacy_max_seq_length=24), path)
    (path / "sentence_bert_config.json").rename(path / "sentence_distilbert_config.json")
    (path / "sentence_bert_config.json").write_text("{}")
    _, ours, theirs = assert_parity(path)
    assert ours.max_seq_length == theirs.max_seq_length == 24


@pytest.mark.parametrize(
    ("file", "key", "value"),
    [
        ("2_Dense/config.json", "in_features", "many"),
        ("2_Dense/config.json", "out_features", 0),
        ("sentence_bert_config.json", "max_seq_length", "long"),
        ("1_Pooling/config.json", "embedding_dimension", -3),
    ],
)
def test_invalid_config_values_name_file_and_key(broken: Path, file: str, key: str, value: Any) -> None:
    edit_json(broken / file, lambda c: c.update({key: value}))
    expect_config_error(broken, str(broken / file), key)


def test_missing_transformer_weights(broken: Path) -> None:
    (broken / "model.safetensors").unlink()
    expect_config_error(broken, str(broken), "no model weights", "model.safetensors")


@pytest.mark.parametrize("module", ["", "2_Dense"])
def test_corrupt_weights_name_the_file(broken: Path, module: str) -> None:
    # Present and named right, so the cheap checks pass; reading them fails, and the error says where.
    weights = broken / module / "model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{corrupt")
    expect_config_error(broken, str(weights.parent), "SafetensorError", "weights")


def test_missing_dense_weights(broken: Path) -> None:
    (broken / "2_Dense" / "model.safetensors").unlink()
    expect_config_error(broken, str(broken / "2_Dense"), "no model weights")


@pytest.mark.parametrize(
    "activation", ["os.system", "builtins.eval", "mypkg.Act", "torch.nn.functional.relu", "torch.os.system"]
)
def test_dense_activation_outside_torch_nn(broken: Path, activation: str) -> None:
    edit_json(broken / "2_Dense" / "config.json", lambda c: c.update(activation_function=activation))
    expect_config_error(broken, str(broken / "2_Dense" / "config.json"), repr(activation), "torch.nn")


def test_dense_activation_needing_arguments(broken: Path) -> None:
    # A torch.nn class, but sentence-transformers builds the activation without arguments.
    edit_json(broken / "2_Dense" / "config.json", lambda c: c.update(activation_function="torch.nn.Linear"))
    expect_config_error(
        broken, str(broken / "2_Dense" / "config.json"), "torch.nn.Linear", "without arguments"
    )


def test_auto_map_is_refused(broken: Path) -> None:
    edit_json(broken / "config.json", lambda c: c.update(auto_map={"AutoModel": "modeling_evil.EvilModel"}))
    expect_config_error(broken, str(broken / "config.json"), "auto_map")


@pytest.mark.parametrize("escape", ["../../etc", "/etc", "1_Pooling/../../outside"])
def test_module_path_escaping_the_directory(broken: Path, escape: str) -> None:
    edit_json(broken / "modules.json", lambda m: m[1].update(path=escape))
    expect_config_error(broken, str(broken / "modules.json"), "escapes the model directory", repr(escape))


def test_unknown_pooling_mode(broken: Path) -> None:
    edit_json(broken / "1_Pooling" / "config.json", lambda c: c.update(pooling_mode="median"))
    expect_config_error(broken, str(broken / "1_Pooling" / "config.json"), "'median'")


def test_invalid_json(broken: Path) -> None:
    (broken / "modules.json").write_text("[{not json")
    expect_config_error(broken, str(broken / "modules.json"), "not valid JSON")


def test_not_a_directory(tmp_path: Path) -> None:
    expect_config_error(tmp_path / "missing", str(tmp_path / "missing"), "not a model directory")


# -- remote model directories ---------------------------------------------------------------------


@pytest.fixture()
def memory_model(
    tiny: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Path]:
    """A tiny model copied into fsspec's in-memory filesystem at memory://models/tiny."""
    import fsspec

    monkeypatch.setenv("EMBEDPIPE_CACHE", str(tmp_path / "cache"))
    source = tiny(pooling=["mean", "cls"], dense=[DenseSpec(8, "GELU")], prompts={"q": "query: "})
    fs = fsspec.filesystem("memory")
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        fs.pipe_file(f"/models/tiny/{file.relative_to(source).as_posix()}", file.read_bytes())
    yield source
    fs.rm("/models/tiny", recursive=True)


def test_load_from_fsspec_url(memory_model: Path, tmp_path: Path) -> None:
    remote = load_encoder("memory://models/tiny", device="cpu")
    local = load_encoder(memory_model, device="cpu")
    assert remote.fingerprint == local.fingerprint
    assert remote.name == "tiny"
    assert Path(remote.config.root).is_relative_to(tmp_path / "cache")
    np.testing.assert_array_equal(remote.encode(TEXTS, prompt_name="q"), local.encode(TEXTS, prompt_name="q"))


def test_file_url_is_local(tiny: Callable[..., Path]) -> None:
    path = tiny(pooling="mean")
    encoder = load_encoder(f"file://{path}", device="cpu")
    assert Path(encoder.config.root) == path
