"""Every kind of model sentence-transformers 6.2 loads: the same vectors as ``SentenceTransformer(dir)``, or a refusal.

Each model is built with sentence-transformers' own modules (tiny seeded weights, the packaged MiniLM
WordPiece tokenizer; decoders are tiny Llama-style causal LMs behind the same tokenizer), saved by
``SentenceTransformer.save``, and encoded by both libraries on 256 real texts of mixed length (some longer
than the 128-token limit, plus empty and blank ones), through ``encode``, ``encode_query`` and
``encode_document``.

Tolerance: sentence-transformers' own batch-to-batch difference on that model (its batch size 32 against 1;
1.5 times it, since embedpipe's token-budget batches are one more such draw) or 1e-5, whichever is larger,
against its batch size 32. With one text per batch the two compute the
same thing: embedpipe's vectors must then equal sentence-transformers' ``batch_size=1`` ones within 1e-6
(for float16 / bfloat16 models that means bit for bit), which catches a wrong dtype or pooling detail the
half-precision noise would hide.

Refusals: everything sentence-transformers loads that embedpipe does not reproduce is refused when the
directory is read or loaded, with one line naming the file, the module or key, and why.
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
from pipeline.model.config import choose_prompt, load_model_config, resolve_role
from pipeline.model.encoder import Encoder
from pipeline.model.modules import check_model
from tests.support.tiny_models import (
    FLAT_CHAT_TEMPLATE,
    STRUCTURED_CHAT_TEMPLATE,
    TASK_CHAT_TEMPLATE,
    build_decoder_model,
    build_encoder_chain,
    build_router_model,
    copy_tokenizer,
    mixed_texts,
    read_json,
    save_st_model,
    st_dense,
    st_layer_norm,
    st_normalize,
    st_pooling,
    st_static_embedding,
    st_transformer,
    write_decoder_backbone,
    write_hf_backbone,
    write_json,
)

TEXTS = mixed_texts(256, seed=5)
ONE_BY_ONE = 40  # texts encoded one per batch on both sides (the first ones of TEXTS)
# embedpipe's batches are one more draw of the same rounding: one of sentence-transformers' own batch-to-batch
# differences (float16 / bfloat16: 1e-3 to 3e-2 here) underestimates the largest possible one.
NOISE_FACTOR = 1.5
QUERY_PROMPT = "Instruct: find the answer to this question\nQuery: "
MAX_DIFFERENCES: dict[str, dict[str, float]] = {}  # model kind -> {"diff": ours vs ST, "noise": ST vs ST}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, tiny forwards are much faster without spinning."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(previous)


# -- the models, by name (built once per test module, on first use) -----------------------------------

CHAT_TEMPLATES = {
    "flat": FLAT_CHAT_TEMPLATE,
    "structured": STRUCTURED_CHAT_TEMPLATE,
    "task": TASK_CHAT_TEMPLATE,
}


def decoder(side: str) -> Callable[[Path], Path]:
    return lambda p: build_decoder_model(p, padding_side=side, prompts={"query": QUERY_PROMPT})


def chat_decoder(template: str, side: str) -> Callable[[Path], Path]:
    return lambda p: build_decoder_model(
        p, padding_side=side, chat_template=CHAT_TEMPLATES[template], prompts={"query": "Find the answer."}
    )


def static_and_transformer_router(path: Path) -> Path:
    return build_router_model(
        path,
        lambda work: [st_static_embedding(32, seed=1)],
        lambda work: [
            st_transformer(write_hf_backbone(work / "doc", seed=2), document_length=40),
            st_pooling(32, "mean"),
        ],
        [st_normalize()],
        prompts={"query": "query: ", "document": "passage: "},
    )


def two_transformer_router(path: Path) -> Path:
    return build_router_model(
        path,
        lambda work: [
            st_transformer(write_hf_backbone(work / "q", seed=3), query_length=16),
            st_pooling(32, ["cls", "max"]),
        ],
        lambda work: [st_transformer(write_hf_backbone(work / "d", seed=4)), st_pooling(32, ["mean", "max"])],
        [st_dense(64, 16, seed=5), st_normalize()],
        default_route="query",
    )


def half_encoder(dtype: str | None) -> Callable[[Path], Path]:
    return lambda p: build_encoder_chain(p, lambda d: [st_dense(d, 24, seed=10), st_normalize()], dtype=dtype)


def half_decoder(dtype: str) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        backbone = write_decoder_backbone(path.parent / f".{path.name}-backbone", dtype=dtype, seed=11)
        modules = [
            st_transformer(backbone),
            st_pooling(32, "lasttoken"),
            st_dense(32, 16, seed=12),
            st_normalize(),
        ]
        return save_st_model(path, modules)

    return make


BUILDERS: dict[str, Callable[[Path], Path]] = {
    **{f"decoder-{side}": decoder(side) for side in ("left", "right")},
    **{f"chat-{t}-{side}": chat_decoder(t, side) for t in CHAT_TEMPLATES for side in ("left", "right")},
    "static": lambda p: save_st_model(
        p, [st_static_embedding(32), st_normalize()], prompts={"query": "query: "}
    ),
    "router-static": static_and_transformer_router,
    "router-transformers": two_transformer_router,
    "layer-norm": lambda p: build_encoder_chain(p, lambda d: [st_layer_norm(d, seed=6)]),
    "token-dense": lambda p: build_encoder_chain(
        p,
        lambda d: [st_dense(d, d, seed=8, activation="GELU", use_residual=True), st_normalize()],
        before_pooling=lambda d: [st_dense(d, 24, seed=7, module_input_name="token_embeddings")],
    ),
    "truncate": lambda p: build_encoder_chain(
        p, lambda d: [st_dense(d, 24, seed=9), st_normalize()], truncate_dim=16
    ),
    "processing": lambda p: build_encoder_chain(
        p,
        lambda d: [st_normalize()],
        transformer_options={
            "processing_kwargs": {"text": {"max_length": 24}},
            "query_length": 12,
            "document_length": 40,
        },
        prompts={"query": "query: find "},
    ),
    "role-lengths": lambda p: build_encoder_chain(
        p, lambda d: [st_normalize()], transformer_options={"query_length": 12, "document_length": 40}
    ),
    "prompts": lambda p: build_encoder_chain(
        p,
        lambda d: [st_normalize()],
        prompts={"query": "query: ", "passage": "passage: "},
        default_prompt_name="passage",
    ),
    "bert-float32": half_encoder(None),
    **{f"bert-{t}": half_encoder(t) for t in ("float16", "bfloat16")},
    **{f"decoder-{t}": half_decoder(t) for t in ("float16", "bfloat16")},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """built(name): the model BUILDERS[name] makes, built once per test module."""
    root = tmp_path_factory.mktemp("formats")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = BUILDERS[name](root / name)
        return cache[name]

    return get


def st_encode(
    st: SentenceTransformer, texts: list[str], role: str | None, batch_size: int, **kwargs: Any
) -> np.ndarray:
    method = {"query": st.encode_query, "document": st.encode_document, None: st.encode}[role]
    return method(texts, batch_size=batch_size, convert_to_numpy=True, **kwargs).astype(np.float64)


def assert_parity(
    path: Path,
    kind: str,
    *,
    role: str | None = None,
    prompt_name: str | None = None,
    prompt: str | None = None,
    load: dict[str, Any] | None = None,
    st_options: dict[str, Any] | None = None,
    texts: list[str] = TEXTS,
) -> tuple[np.ndarray, Encoder, SentenceTransformer]:
    """Encode ``texts`` with both libraries in ``role``; check the batched vectors within sentence-transformers'
    batch-to-batch noise and the one-per-batch vectors within 1e-6. Returns ours (batched)."""
    st = SentenceTransformer(str(path), device="cpu", **(st_options or {}))
    ours = load_encoder(path, device="cpu", **(load or {}))
    prompts = {"prompt_name": prompt_name, "prompt": prompt}
    want, alone = (st_encode(st, texts, role, size, **prompts) for size in (32, 1))
    noise = float(np.abs(want - alone).max())
    one_by_one = alone[:ONE_BY_ONE]
    got = ours.encode(texts, prompt_name, prompt, role=role, max_batch_tokens=2048)
    assert got.dtype == np.float32 and got.shape == want.shape == (len(texts), ours.dim)
    diff = float(np.abs(got.astype(np.float64) - want).max())
    tolerance = max(NOISE_FACTOR * noise, 1e-5)
    assert diff <= tolerance, (
        f"{kind}: off by {diff:.3g}; sentence-transformers' own batches differ by up to {noise:.3g}"
    )
    single = ours.encode(texts[:ONE_BY_ONE], prompt_name, prompt, role=role, max_batch_tokens=1)
    single_diff = float(np.abs(single.astype(np.float64) - one_by_one).max())
    assert single_diff <= 1e-6, f"{kind}: one text per batch off by {single_diff:.3g}"
    entry = MAX_DIFFERENCES.setdefault(kind, {"diff": 0.0, "noise": 0.0, "one_by_one": 0.0})
    entry["diff"] = max(entry["diff"], diff)
    entry["noise"] = max(entry["noise"], noise)
    entry["one_by_one"] = max(entry["one_by_one"], single_diff)
    return got, ours, st


ROLES = [None, "query", "document"]


# -- decoders: padding sides, prompts, chat templates -------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_decoder_both_padding_sides(built, side: str) -> None:
    path = built(f"decoder-{side}")
    for role in ROLES if side == "left" else ["query"]:
        _, ours, _ = assert_parity(path, f"decoder, {side} padding", role=role)
    assert ours.tokenizer.padding_side == side
    assert ours.describe()["module_settings"][0]["padding_side"] == side
    assert ours.tokenize(TEXTS).lengths.max() == 128  # long texts were cut at the model's limit
    assert ours.describe()["roles"]["query"] == {"prompt": QUERY_PROMPT}


@pytest.mark.parametrize("template", sorted(CHAT_TEMPLATES))
@pytest.mark.parametrize("side", ["left", "right"])
def test_decoder_chat_template(built, template: str, side: str) -> None:
    # sentence-transformers 6.2 saves a "message" modality for a tokenizer with a chat template: every text
    # becomes a user message, the prompt a system message, and a text cut at the limit gets the template's tail.
    path = built(f"chat-{template}-{side}")
    modality = read_json(path / "sentence_bert_config.json")["modality_config"]
    assert "message" in modality
    for role in ["query", "document"] if (template, side) == ("flat", "left") else ["query"]:
        _, ours, _ = assert_parity(path, f"decoder + chat template ({template}), {side} padding", role=role)
    expected_format = "structured" if template == "structured" else "flat"
    assert ours.describe()["module_settings"][0]["prompt"] == (
        f"system message of the chat template ({expected_format} messages)"
    )
    tokens = ours.tokenize(TEXTS, "Find the answer.", role="query")
    sep = ours.tokenizer.sep_token_id
    cut = [ids for ids in tokens.input_ids if len(ids) == 128]
    assert cut and all(ids[-1] == sep for ids in cut)  # the template's closing token written back
    if template == "task":  # the role reached the template
        query = ours.tokenizer.decode(ours.tokenize(["x"], role="query").input_ids[0])
        assert query.startswith("[ query ]")


def test_decoder_chat_template_restore_suffix_off(built, tmp_path: Path) -> None:
    path = tmp_path / "no-restore"
    shutil.copytree(built("chat-flat-left"), path)
    edit_json(
        path / "sentence_bert_config.json",
        lambda c: c.update(processing_kwargs={"chat_template": {"restore_suffix": False}}),
    )
    assert_parity(path, "decoder + chat template, restore_suffix off")


# -- other module types -------------------------------------------------------------------------------


def test_static_embedding(built) -> None:
    path = built("static")
    for role in (None, "query"):
        _, ours, _ = assert_parity(path, "StaticEmbedding", role=role)
    settings = ours.describe()["module_settings"][0]
    assert settings["type"] == "StaticEmbedding" and settings["vocab_size"] == 30522
    assert ours.max_seq_length is None and ours.describe()["pooling"] == []


def test_static_embedding_model2vec_weights(built, tmp_path: Path) -> None:
    # model2vec's layout (a smaller table, a token -> row mapping, per-token weights): both fold it alike.
    from safetensors.torch import load_file, save_file

    path = copy_of(built, "static", tmp_path)
    table = load_file(str(path / "model.safetensors"))["embedding.weight"]
    rows = torch.arange(table.shape[0]) % 5000
    save_file(
        {
            "embeddings": table[:5000].contiguous(),
            "mapping": rows,
            "weights": torch.rand(table.shape[0]) + 0.5,
        },
        str(path / "model.safetensors"),
    )
    _, ours, _ = assert_parity(path, "StaticEmbedding (model2vec weights)")
    assert ours.describe()["module_settings"][0]["vocab_size"] == 30522


def test_router_static_query_transformer_document(built) -> None:
    path = built("router-static")
    for role in ROLES:
        _, ours, _ = assert_parity(path, "Router (StaticEmbedding query / Transformer document)", role=role)
    description = ours.describe()
    routes = description["module_settings"][0]["routes"]
    assert [m["type"] for m in routes["query"]] == ["StaticEmbedding"]
    assert [m["type"] for m in routes["document"]] == ["Transformer", "Pooling"]
    assert routes["document"][0]["document_length"] == 40
    assert description["roles"] == {
        "query": {"prompt": "query: ", "route": "query"},
        "document": {"prompt": "passage: ", "route": "document"},
    }
    assert description["default_route"] == "document"
    # The role travels with the tokens: tokenize on one thread, encode_tokens on another.
    settings = ours.role_settings("document")
    tokens = ours.tokenize(TEXTS, settings.prompt, role=settings.task)
    assert (tokens.task, tokens.route) == ("document", "document") and tokens.lengths.max() == 40
    np.testing.assert_array_equal(
        ours.encode_tokens(tokens, 2048), ours.encode_document(TEXTS, max_batch_tokens=2048)
    )


def test_router_two_transformers_dense_after(built) -> None:
    path = built("router-transformers")
    for role in ROLES:
        _, ours, _ = assert_parity(path, "Router (two Transformers) + Dense", role=role)
    assert ours.dim == 16 and ours.describe()["default_route"] == "query"
    assert ours.tokenize(TEXTS, role="query").lengths.max() == 16
    assert ours.tokenize(TEXTS, role="document").lengths.max() == 128


def test_layer_norm(built) -> None:
    path = built("layer-norm")
    _, ours, _ = assert_parity(path, "LayerNorm")
    assert ours.describe()["module_settings"][-1] == {
        "type": "LayerNorm",
        "path": "2_LayerNorm",
        "dimension": 32,
        "eps": 1e-5,
        "dtype": "float32",
    }
    assert not ours.normalized


def test_dense_on_token_embeddings(built) -> None:
    # A Dense reading token_embeddings (module_input_name) before Pooling, and a residual one after it.
    path = built("token-dense")
    _, ours, _ = assert_parity(path, "Dense on token embeddings + residual Dense")
    first = ours.describe()["module_settings"][1]
    assert (first["module_input_name"], first["module_output_name"]) == (
        "token_embeddings",
        "token_embeddings",
    )
    assert ours.dim == 24


def test_truncate_dim_in_config(built) -> None:
    path = built("truncate")
    assert read_json(path / "config_sentence_transformers.json")["truncate_dim"] == 16
    got, ours, _ = assert_parity(path, "truncate_dim in config_sentence_transformers.json")
    assert ours.dim == ours.truncate_dim == 16 and ours.full_dim == 24
    assert ours.describe()["truncate_dim"] == 16
    # An explicit truncate_dim wins, as sentence-transformers' argument does.
    smaller, ours8, _ = assert_parity(
        path,
        "truncate_dim in config_sentence_transformers.json",
        load={"truncate_dim": 8},
        st_options={"truncate_dim": 8},
    )
    assert ours8.dim == 8
    np.testing.assert_allclose(smaller, got[:, :8], rtol=0, atol=1e-6)


def test_processing_kwargs_and_role_lengths(built) -> None:
    path = built("processing")
    config = read_json(path / "sentence_bert_config.json")
    assert config["processing_kwargs"] == {"text": {"max_length": 24}} and config["query_length"] == 12
    for role in ROLES:
        _, ours, _ = assert_parity(path, "processing_kwargs + query_length / document_length", role=role)
    # processing_kwargs' max_length wins over the role lengths, as in 6.2
    assert {ours.tokenize(TEXTS, role=r).lengths.max() for r in ROLES} == {24}
    assert ours.describe()["module_settings"][0]["max_length"] == {"none": 24, "query": 24, "document": 24}


def test_role_lengths_without_processing_kwargs(built) -> None:
    path = built("role-lengths")
    for role in ("query", "document"):
        _, ours, _ = assert_parity(path, "query_length / document_length", role=role)
    lengths = {r: int(ours.tokenize(TEXTS, role=r).lengths.max()) for r in ROLES}
    assert lengths == {None: 128, "query": 12, "document": 40}
    assert ours.describe()["module_settings"][0]["max_length"] == {"none": 128, "query": 12, "document": 40}


def test_prompts_and_roles(built) -> None:
    # encode_query takes "query", encode_document "document" (always defined, empty here) before "passage",
    # and both override default_prompt_name; encode keeps the default.
    path = built("prompts")
    for role in ROLES:
        assert_parity(path, "prompts and roles", role=role)
    assert_parity(path, "prompts and roles", role="document", prompt_name="passage")
    config = load_model_config(path)
    assert choose_prompt(config) == "passage: "
    assert choose_prompt(config, role="query") == "query: "
    assert choose_prompt(config, role="document") == ""
    assert choose_prompt(config, prompt_name="query", role="document") == "query: "
    assert resolve_role(config, "query").task == "query"
    with pytest.raises(ValueError, match="role must be one of"):
        resolve_role(config, "passage")


def test_model_without_document_prompt_in_config(built, tmp_path: Path) -> None:
    # A config written before 6 (no "query" / "document"): sentence-transformers adds them empty.
    path = tmp_path / "old-prompts"
    shutil.copytree(built("prompts"), path)
    edit_json(
        path / "config_sentence_transformers.json",
        lambda c: c.update(prompts={"passage": "passage: "}, default_prompt_name="passage"),
    )
    _, ours, _ = assert_parity(path, "prompts and roles", role="document")
    assert ours.prompts == {"query": "", "document": "", "passage": "passage: "}


# -- model_kwargs, processor_kwargs, config_kwargs ----------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["6.x names", "5.x names"])
def test_kwargs_from_sentence_bert_config(built, tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "kwargs"
    shutil.copytree(built("role-lengths"), path)
    names = (
        ("model_args", "tokenizer_args", "config_args")
        if legacy
        else ("model_kwargs", "processor_kwargs", "config_kwargs")
    )
    kwargs = {
        names[0]: {"attn_implementation": "eager", "trust_remote_code": True},
        names[1]: {"model_max_length": 20},  # no cap, and wins over max_seq_length
        names[2]: {"layer_norm_eps": 0.5},  # changes every vector
    }
    edit_json(path / "sentence_bert_config.json", lambda c: c.update(kwargs))
    got, ours, st = assert_parity(path, "model / processor / config kwargs")
    assert ours.max_seq_length == st.max_seq_length == 20
    assert ours.transformer.model.config.layer_norm_eps == 0.5
    assert ours.transformer.model.config._attn_implementation == "eager"
    plain = load_encoder(built("role-lengths"), device="cpu").encode(TEXTS, max_batch_tokens=2048)
    assert np.abs(got - plain).max() > 1e-3


def test_encoder_decoder_loads_its_encoder(tmp_path: Path) -> None:
    # A T5 checkpoint: sentence-transformers runs T5EncoderModel (no decoder), and so does embedpipe.
    from transformers import T5Config, T5Model

    backbone = tmp_path / "t5-backbone"
    copy_tokenizer(backbone)
    torch.manual_seed(13)
    config = T5Config(
        vocab_size=30522, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, pad_token_id=0
    )
    T5Model(config).save_pretrained(str(backbone))
    path = save_st_model(tmp_path / "t5", [st_transformer(backbone), st_pooling(32, "mean"), st_normalize()])
    _, ours, _ = assert_parity(path, "T5 (encoder alone)", texts=TEXTS[:128])
    assert ours.describe()["module_settings"][0]["architecture"] == "T5EncoderModel"


# -- directories without modules.json -----------------------------------------------------------------


def test_fallback_causal_lm_uses_lasttoken(tmp_path: Path) -> None:
    path = write_decoder_backbone(tmp_path / "llama", padding_side="left")
    # 6.2 reads neither file without modules.json: their prompts and lengths must not apply.
    write_json(
        path / "config_sentence_transformers.json",
        {"prompts": {"query": "q: "}, "default_prompt_name": "query"},
    )
    write_json(path / "sentence_bert_config.json", {"max_seq_length": 8})
    with pytest.warns(UserWarning, match="lasttoken pooling"):
        ours = load_encoder(path, device="cpu")
    assert ours.pooling_modes == ("lasttoken",) and not ours.normalized and ours.max_seq_length == 128
    assert ours.describe()["fallback"] == (
        "no modules.json: Transformer + lasttoken pooling (LlamaForCausalLM is a causal LM), "
        "as sentence-transformers 6.2 loads it"
    )
    assert ours.prompts == {"query": "", "document": ""} and ours.default_prompt_name is None
    for role in (None, "query"):
        assert_parity(path, "no modules.json: causal LM (lasttoken)", role=role)


def test_fallback_bidirectional_decoder_uses_mean(tmp_path: Path) -> None:
    path = write_decoder_backbone(tmp_path / "llama", padding_side="right")
    edit_json(path / "config.json", lambda c: c.update(is_causal=False))
    with pytest.warns(UserWarning, match="mean pooling"):
        ours = load_encoder(path, device="cpu")
    assert ours.pooling_modes == ("mean",)
    assert_parity(path, "no modules.json: is_causal false (mean)")


def test_fallback_decoder_with_chat_template(tmp_path: Path) -> None:
    path = write_decoder_backbone(tmp_path / "llama-chat", chat_template=STRUCTURED_CHAT_TEMPLATE)
    with pytest.warns(UserWarning, match="no modules.json"):
        ours = load_encoder(path, device="cpu")
    assert (
        ours.describe()["module_settings"][0]["prompt"]
        == "system message of the chat template (structured messages)"
    )
    assert_parity(path, "no modules.json: chat template", role="query", prompt="Find the answer.")


def test_fallback_encoder_uses_mean(tmp_path: Path) -> None:
    path = write_hf_backbone(tmp_path / "bert")
    with pytest.warns(UserWarning, match="BertModel is not a causal LM"):
        ours = load_encoder(path, device="cpu")
    assert ours.pooling_modes == ("mean",)
    assert_parity(path, "no modules.json: encoder (mean)")


# -- weights dtype ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_encoder_with_dense(built, dtype: str) -> None:
    path = built(f"bert-{dtype}")
    assert read_json(path / "config.json")["dtype"] == dtype
    _, ours, st = assert_parity(path, f"{dtype} encoder + Dense")
    assert str(st[2].linear.weight.dtype) == f"torch.{dtype}"  # 6.2 runs the Dense in the backbone's dtype
    description = ours.describe()
    assert description["dtype"] == description["compute_dtype"] == dtype
    assert {m.get("dtype") for m in description["module_settings"]} >= {dtype}
    assert description["module_settings"][2]["dtype"] == dtype  # the Dense


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_decoder_with_dense(built, dtype: str) -> None:
    path = built(f"decoder-{dtype}")
    assert read_json(path / "2_Dense/config.json")["out_features"] == 16
    _, ours, _ = assert_parity(path, f"{dtype} decoder + Dense")
    assert ours.describe()["module_settings"][2]["dtype"] == dtype


def test_half_precision_dense_weights_behind_float32_backbone(built, tmp_path: Path) -> None:
    # A Dense saved in float16 behind a float32 backbone runs in float32, as 6.2 loads it.
    path = tmp_path / "dense16"
    shutil.copytree(built("truncate"), path)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path / "2_Dense/model.safetensors"))
    save_file({k: v.half() for k, v in weights.items()}, str(path / "2_Dense/model.safetensors"))
    _, ours, _ = assert_parity(path, "float16 Dense weights, float32 backbone")
    assert ours.describe()["module_settings"][2]["dtype"] == "float32"


@pytest.mark.parametrize(("saved", "override"), [("float16", "float32"), (None, "bfloat16")])
def test_dtype_override(built, saved: str | None, override: str) -> None:
    path = built(f"bert-{saved or 'float32'}")
    _, ours, _ = assert_parity(
        path,
        f"dtype={override} override ({saved or 'float32'} checkpoint)",
        load={"dtype": override},
        st_options={"model_kwargs": {"dtype": getattr(torch, override)}},
    )
    assert ours.describe()["dtype"] == override
    assert {m["dtype"] for m in ours.describe()["module_settings"] if "dtype" in m} == {override}


def test_dtype_argument_is_checked(built) -> None:
    with pytest.raises(ValueError, match="dtype must be auto, float32, float16 or bfloat16"):
        load_encoder(built("layer-norm"), device="cpu", dtype="float8")


# -- module type names of older releases --------------------------------------------------------------


def test_older_type_names_of_router_static_layer_norm(built, tmp_path: Path) -> None:
    path = tmp_path / "older"
    shutil.copytree(built("router-static"), path)
    edit_json(
        path / "modules.json",
        lambda m: [e.update(type=f"sentence_transformers.models.{e['type'].rsplit('.', 1)[-1]}") for e in m],
    )
    config_path = path / "router_config.json"
    edit_json(
        config_path,
        lambda c: c["types"].update(
            {k: f"sentence_transformers.models.{v.rsplit('.', 1)[-1]}" for k, v in c["types"].items()}
        ),
    )
    config_path.rename(path / "config.json")  # the Asym layout of sentence-transformers <= 3
    edit_json(path / "modules.json", lambda m: m[0].update(type="sentence_transformers.models.Asym"))
    assert_parity(path, "Router (StaticEmbedding query / Transformer document)", role="query")
    layer = tmp_path / "older-layer-norm"
    shutil.copytree(built("layer-norm"), layer)
    edit_json(layer / "modules.json", lambda m: m[2].update(type="sentence_transformers.models.LayerNorm"))
    assert_parity(layer, "LayerNorm")


# -- refusals -----------------------------------------------------------------------------------------


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def refused(path: Path, *fragments: str, **load: Any) -> str:
    """load_encoder refuses with one line holding every fragment; check_model (no weights) refuses too when the
    reason is in the files alone."""
    with pytest.raises(ModelConfigError) as error:
        load_encoder(path, device="cpu", **load)
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def copy_of(built: Callable[[str], Path], name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(built(name), target)
    return target


@pytest.fixture()
def plain(built, tmp_path: Path) -> Path:
    """A fresh copy of a Transformer + Pooling + Normalize model to break."""
    return copy_of(built, "role-lengths", tmp_path)


@pytest.mark.parametrize(
    ("type_name", "why"),
    [
        ("mypkg.modules.CustomPooling", "custom module code is never imported"),
        ("sentence_transformers.models.WordEmbeddings", "word-vector models (GloVe-style) are not supported"),
        ("sentence_transformers.sparse_encoder.modules.SpladePooling", "sparse encoders are not supported"),
        (
            "sentence_transformers.sentence_transformer.modules.WeightedLayerPooling",
            "pooling over all layers",
        ),
    ],
)
def test_refused_module_types(plain: Path, type_name: str, why: str) -> None:
    edit_json(plain / "modules.json", lambda m: m[1].update(type=type_name))
    refused(plain, str(plain / "modules.json"), "unknown module type", repr(type_name), why)


def test_refused_module_needing_arguments(plain: Path) -> None:
    # modules.json may list forward arguments a module wants from encode() (e.g. truncate_dim); embedpipe
    # passes the role only.
    edit_json(plain / "modules.json", lambda m: m[0].update(kwargs=["task", "truncate_dim"]))
    refused(
        plain, str(plain / "modules.json"), "declares forward argument(s) ['truncate_dim']", "cannot pass"
    )
    edit_json(plain / "modules.json", lambda m: m[0].update(kwargs=["task"]))
    assert_parity(plain, "query_length / document_length", role="query")


SBERT = "sentence_bert_config.json"


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (
            {"transformer_task": "text-generation"},
            ["transformer_task 'text-generation'", "not an embedding model"],
        ),
        ({"query_expansion": {"strategy": "fixed", "length": 32}}, ["query_expansion", "not supported"]),
        (
            {"tokenizer_name_or_path": "bert-base-uncased"},
            ["tokenizer_name_or_path", "loads a tokenizer from elsewhere"],
        ),
        ({"pooling_mode": "mean"}, ["unknown Transformer key(s) 'pooling_mode'"]),
        ({"processing_kwargs": {"text": {"stride": 4}}}, ["processing_kwargs.text.stride", "not supported"]),
        (
            {"processing_kwargs": {"common": {"padding": False}}},
            ["processing_kwargs.common.padding", "padded"],
        ),
        ({"processing_kwargs": {"text": {"max_length": "long"}}}, ["processing_kwargs.text", "max_length"]),
        (
            {"model_kwargs": {"quantization_config": {"load_in_8bit": True}}},
            ["model_kwargs key(s) 'quantization_config'"],
        ),
        ({"model_kwargs": {"dtype": "float8"}}, ["model_kwargs.dtype 'float8'"]),
        (
            {"model_kwargs": {"attn_implementation": "flash_attention_2"}},
            ["attn_implementation 'flash_attention_2'"],
        ),
        (
            {"processor_kwargs": {"vocab_file": "/etc/passwd"}},
            ["processor_kwargs key(s) 'vocab_file'", "other files"],
        ),
        (
            {
                "modality_config": {
                    "text": {"method": "forward", "method_output_name": "last_hidden_state"},
                    "image": {"method": "forward", "method_output_name": "last_hidden_state"},
                },
                "module_output_name": "token_embeddings",
            },
            ["modality_config.image", "text only"],
        ),
        (
            {
                "modality_config": {
                    "text": {"method": "get_text_features", "method_output_name": "pooler_output"}
                },
                "module_output_name": "sentence_embedding",
            },
            ["module_output_name 'sentence_embedding'"],
        ),
        (
            {
                "modality_config": {"text": {"method": "get_text_features", "method_output_name": None}},
                "module_output_name": "token_embeddings",
            },
            ["modality_config.text", "only method 'forward'"],
        ),
        ({"query_length": 0}, ["query_length must be a positive integer"]),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_refused_transformer_keys(plain: Path, change: dict, fragments: list[str]) -> None:
    edit_json(plain / SBERT, lambda c: c.update(change))
    refused(plain, str(plain / SBERT), *fragments)
    with pytest.raises(ModelConfigError):
        check_model(plain)  # refused on the driver, before any weights load


def test_refused_chat_modality_without_template(plain: Path) -> None:
    edit_json(
        plain / SBERT,
        lambda c: c.update(
            modality_config={"message": {"method": "forward", "method_output_name": "last_hidden_state"}},
            module_output_name="token_embeddings",
        ),
    )
    refused(plain, str(plain / SBERT), "'message' entry", "the tokenizer has no chat template")


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"model_type": "SparseEncoder"}, ["model_type 'SparseEncoder' is not a SentenceTransformer model"]),
        ({"truncate_dim": 0}, ["truncate_dim must be a positive integer"]),
        ({"truncate_dim": "16"}, ["truncate_dim must be a positive integer"]),
        ({"default_prompt_name": "nope"}, ["default_prompt_name 'nope'"]),
        ({"similarity_fn_name": "maxsim"}, ["similarity_fn_name 'maxsim'"]),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_refused_model_settings(plain: Path, change: dict, fragments: list[str]) -> None:
    edit_json(plain / "config_sentence_transformers.json", lambda c: c.update(change))
    refused(plain, str(plain / "config_sentence_transformers.json"), *fragments)


def test_refused_remote_code_inside_a_router(built, tmp_path: Path) -> None:
    path = copy_of(built, "router-static", tmp_path)
    transformer = next(path.glob("document_*Transformer"))
    edit_json(transformer / "config.json", lambda c: c.update(auto_map={"AutoModel": "modeling_evil.Evil"}))
    refused(path, str(transformer / "config.json"), "auto_map", "remote code")
    with pytest.raises(ModelConfigError, match="auto_map"):
        check_model(path)


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (
            lambda c: c["types"].update(
                {k: "sentence_transformers.base.modules.router.Router" for k in list(c["types"])[:1]}
            ),
            ["a Router inside a Router is not supported"],
        ),
        (
            lambda c: c["structure"].update(query=list(reversed(c["structure"]["document"]))),
            ["route 'query' must start with a Transformer or StaticEmbedding, not Pooling"],
        ),
        (
            lambda c: c["parameters"].update(default_route="passage"),
            ["default_route 'passage' is not one of the routes"],
        ),
        (
            lambda c: c["parameters"].update(route_mappings={"('query', None)": "passage"}),
            ["route_mappings maps ('query', None) to 'passage'"],
        ),
        (lambda c: c["parameters"].update(temperature=1), ["unknown Router parameter(s) 'temperature'"]),
        (
            lambda c: c["structure"].update(query=["nowhere"]),
            ["names module(s) ['nowhere'] missing from 'types'"],
        ),
        (
            lambda c: c.update(types={("../" + k): v for k, v in c["types"].items()}),
            ["escapes the model directory"],
        ),
    ],
    ids=["nested", "first-not-input", "default-route", "mapping-target", "parameter", "missing-id", "escape"],
)
def test_refused_router_configs(built, tmp_path: Path, change: Callable, fragments: list[str]) -> None:
    path = copy_of(built, "router-static", tmp_path)
    config = path / "router_config.json"
    edit_json(config, change)
    refused(path, str(config), *fragments)


def test_refused_router_routes_of_different_sizes(built, tmp_path: Path) -> None:
    path = build_router_model(
        tmp_path / "sizes",
        lambda work: [st_static_embedding(16)],
        lambda work: [st_transformer(write_hf_backbone(work / "d")), st_pooling(32, "mean")],
    )
    refused(
        path,
        str(path / "router_config.json"),
        "different sizes",
        "'query': 16",
        "'document': 32",
    )


def test_refused_role_without_route(built, tmp_path: Path) -> None:
    # sentence-transformers' encode_query fails on a Router without a "query" route; so does embedpipe, before
    # encoding anything, and describe() says so.
    path = copy_of(built, "router-static", tmp_path)
    edit_json(
        path / "router_config.json",
        lambda c: c["structure"].update(passage=c["structure"].pop("query")),
    )
    ours = load_encoder(path, device="cpu")
    with pytest.raises(ValueError, match="no Router route for role 'query'"):
        ours.encode_query(TEXTS[:3])
    with pytest.raises(ValueError, match="No route found for task type 'query'"):
        SentenceTransformer(str(path), device="cpu").encode_query(TEXTS[:3])
    assert ours.describe()["roles"]["query"].startswith("refused: ")
    assert_parity(path, "Router (StaticEmbedding query / Transformer document)", role="document")


def test_refused_static_embedding_files(built, tmp_path: Path) -> None:
    path = copy_of(built, "static", tmp_path)
    (path / "tokenizer.json").rename(path / "tokenizer.json.bak")
    refused(path, str(path / "tokenizer.json"), "file not found", "StaticEmbedding")
    (path / "tokenizer.json.bak").rename(path / "tokenizer.json")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path / "model.safetensors"))
    save_file({"vectors": weights["embedding.weight"]}, str(path / "model.safetensors"))
    refused(path, str(path), "neither 'embedding.weight' nor model2vec's 'embeddings'", "found: vectors")
    save_file({"embedding.weight": weights["embedding.weight"][:100]}, str(path / "model.safetensors"))
    refused(path, str(path), "shape (100, 32)", "30522 tokens")


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (lambda c: c.update(elementwise_affine=False), ["unknown LayerNorm key(s) 'elementwise_affine'"]),
        (lambda c: c.pop("dimension"), ["missing key 'dimension'"]),
    ],
    ids=["unknown-key", "no-dimension"],
)
def test_refused_layer_norm_configs(built, tmp_path: Path, change: Callable, fragments: list[str]) -> None:
    path = copy_of(built, "layer-norm", tmp_path)
    edit_json(path / "2_LayerNorm" / "config.json", change)
    refused(path, str(path / "2_LayerNorm" / "config.json"), *fragments)


def test_refused_feature_flow(built, plain: Path, tmp_path: Path) -> None:
    # A module reading a feature no module before it produced fails in sentence-transformers at encode time;
    # embedpipe refuses the directory.
    edit_json(plain / "modules.json", lambda m: m.pop(1))  # drop Pooling: nothing makes a sentence embedding
    refused(plain, str(plain / "modules.json"), "no module produces a sentence embedding")
    dense = copy_of(built, "token-dense", tmp_path)
    edit_json(dense / "1_Dense" / "config.json", lambda c: c.update(module_input_name="word_embeddings"))
    refused(
        dense, str(dense / "modules.json"), "Dense module '1_Dense'", "reads the feature 'word_embeddings'"
    )
    static = copy_of(built, "static", tmp_path)
    pooling = static / "1_Pooling"
    pooling.mkdir()
    write_json(pooling / "config.json", {"embedding_dimension": 32, "pooling_mode": "mean"})
    edit_json(
        static / "modules.json",
        lambda m: m.insert(
            1, {"idx": 1, "name": "p", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
        ),
    )
    refused(
        static,
        "Pooling module '1_Pooling'",
        "reads the feature 'token_embeddings'",
        "available: sentence_embedding",
    )


def test_refused_wrong_embedding_dimension(plain: Path) -> None:
    # sentence-transformers trusts Pooling's embedding_dimension (and reports it); the vectors have the
    # backbone's size. embedpipe runs one text through the model at load and refuses the mismatch.
    edit_json(plain / "1_Pooling" / "config.json", lambda c: c.update(embedding_dimension=48))
    assert SentenceTransformer(str(plain), device="cpu").encode(["a"]).shape == (1, 32)
    refused(plain, str(plain), "promise 48-dimensional embeddings", "computes 32", "embedding_dimension")


def test_refused_tokenizer_without_pad_token(plain: Path) -> None:
    edit_json(plain / "tokenizer_config.json", lambda c: c.update(pad_token=None))
    tokenizer = json.loads((plain / "tokenizer.json").read_text())
    tokenizer["padding"] = None
    (plain / "tokenizer.json").write_text(json.dumps(tokenizer))
    (plain / "special_tokens_map.json").unlink(missing_ok=True)
    message = refused(plain, "tokenizer_config.json", "no pad_token")
    assert str(plain) in message


@pytest.mark.parametrize(
    ("name", "fragments"),
    [
        ("adapter_config.json", ["a PEFT adapter"]),
        ("preprocessor_config.json", ["an image or audio processor"]),
    ],
)
def test_refused_non_text_or_adapter_directories(plain: Path, name: str, fragments: list[str]) -> None:
    write_json(plain / name, {})
    refused(plain, str(plain / name), *fragments, "text models only")


def test_refused_unsupported_model_type(plain: Path) -> None:
    edit_json(plain / "config.json", lambda c: c.update(model_type="marian"))
    refused(plain, str(plain / "config.json"), "model_type 'marian'", "encoder-decoder")


# -- report -------------------------------------------------------------------------------------------


def test_report_max_differences() -> None:
    """The largest differences seen per model kind (run with -s to read them)."""
    print(
        "MAX_DIFFERENCES",
        json.dumps({k: {n: f"{v:.2e}" for n, v in d.items()} for k, d in MAX_DIFFERENCES.items()}, indent=1),
    )


@pytest.mark.parametrize("role", ["query", "document"])
def test_embed_job_with_a_role_equals_sentence_transformers(ray_local, tmp_path, role) -> None:
    """`embed --role` through the whole job (a Router model: a static route for queries, a transformer with
    document_length for documents) gives sentence-transformers' encode_query / encode_document vectors,
    and records the role in the parts' metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.io.dataset import dataset_metadata, embeddings_of, read_dataset
    from pipeline.spec import EmbedSpec, build_spec
    from pipeline.tasks.embed import run_embed

    model = static_and_transformer_router(tmp_path / "router")
    texts = TEXTS[:64]
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), tmp_path / "c.parquet")
    out = str(tmp_path / "out")
    run_embed(
        build_spec(
            EmbedSpec,
            {
                "model": str(model),
                "input": [str(tmp_path / "c.parquet")],
                "output": out,
                "role": role,
                "rows_per_shard": 20,
                "progress": False,
            },
        ),
        log=lambda _m: None,
    )
    got = embeddings_of(read_dataset(out))
    reference = SentenceTransformer(str(model), device="cpu")
    want = getattr(reference, f"encode_{role}")(texts, batch_size=32, convert_to_numpy=True)
    noise = np.abs(
        want - getattr(reference, f"encode_{role}")(texts, batch_size=1, convert_to_numpy=True)
    ).max()
    assert np.abs(got - want).max() <= 1.5 * max(float(noise), 1e-5)
    assert dataset_metadata(out, None)["role"] == role
