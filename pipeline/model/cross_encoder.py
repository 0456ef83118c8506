"""CrossEncoder: a sentence-transformers reranker directory, loaded and run as sentence-transformers 6.2 does.

What ``sentence_transformers.CrossEncoder(dir).predict(pairs)`` computes, without importing
sentence-transformers and without running any code shipped with the model:

* **Layout.** A directory saved by ``CrossEncoder.save`` (``modules.json`` with one Transformer module at
  the root, ``sentence_bert_config.json`` with ``transformer_task: sequence-classification``,
  ``config_sentence_transformers.json`` with ``activation_fn``), or an older plain Hugging Face directory
  (``config.json`` of a ``*ForSequenceClassification``, no ``modules.json``). Anything else (more modules,
  a decoder scored through ``LogitScore``, several labels) is refused with the file and the reason.
* **Safety.** Weights from ``*.safetensors``; pickle checkpoints only with ``allow_pickle``; an
  ``auto_map`` in ``config.json`` or ``tokenizer_config.json`` is refused (the same checks as the
  bi-encoder's Transformer module).
* **Tokens.** ``tokenizer(queries, documents, truncation="longest_first", max_length=L)``: the pair in
  one sequence (``[CLS] q [SEP] d [SEP]`` for BERT, with token type ids). ``L`` is
  ``sentence_bert_config.json``'s ``max_seq_length`` when present, else the tokenizer's
  ``model_max_length`` capped at the model's ``max_position_embeddings`` (sentence-transformers'
  ``Transformer.__init__``). ``do_lower_case`` lowercases as sentence-transformers does. The model's
  default prompt (``default_prompt_name``) is prepended to the first text of each pair
  (``InputFormatter.prepend_prompt_to_texts``).
* **Scores.** ``AutoModelForSequenceClassification`` logits, upcast to float32, then the activation:
  ``activation_fn`` from ``config_sentence_transformers.json``, else ``config.json``'s
  ``sentence_transformers.activation_fn`` or legacy ``sbert_ce_default_activation_function``; only
  ``torch.*`` paths are honoured (sentence-transformers without ``trust_remote_code`` falls back to the
  default for others, so do we); the default is ``Sigmoid`` for one label. ``[n, 1]`` is squeezed to
  ``[n]`` (``CrossEncoder._inference``).
* **Batches.** Pairs sorted by token length and cut by a budget of padded tokens (not by count), as the
  bi-encoder does; scores come back in input order. Batching changes only float rounding.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.model.files import ModelConfigError, fingerprint, local_model_dir, read_json
from pipeline.model.modules.transformer import quiet_weight_loading

logger = logging.getLogger(__name__)

DEFAULT_CPU_BATCH_TOKENS = 4096
DEFAULT_GPU_BATCH_TOKENS = 65536
# modules.json "type" strings of sentence-transformers' Transformer module (<= 5.3, >= 5.4 and import paths)
TRANSFORMER_TYPES = (
    "sentence_transformers.models.Transformer",
    "sentence_transformers.base.modules.transformer.Transformer",
    "sentence_transformers.base.modules.Transformer",
    "sentence_transformers.cross_encoder.modules.Transformer",
    "sentence_transformers.sentence_transformer.modules.Transformer",
)
ST_CONFIG = "config_sentence_transformers.json"
TRANSFORMER_CONFIG = "sentence_bert_config.json"


@dataclass(frozen=True)
class CrossEncoderConfig:
    """What the directory says, read without loading any weights."""

    root: Path
    architecture: str
    num_labels: int
    activation: str  # a torch.nn class name: "Sigmoid", "Identity", ...
    max_seq_length: int | None  # None: the tokenizer's limit capped at max_position_embeddings
    do_lower_case: bool
    prompt: str  # the default prompt, prepended to each pair's first text ("" when none)


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path}: expected a JSON object")
    return data


def _check_no_remote_code(root: Path, hf_config: dict) -> None:
    for name, config in (
        ("config.json", hf_config),
        ("tokenizer_config.json", _json(root / "tokenizer_config.json")),
    ):
        if config.get("auto_map"):
            raise ModelConfigError(
                f"{root / name}: auto_map asks for remote code; embedpipe never runs code shipped with a model"
            )


def _check_weights(root: Path, allow_pickle: bool) -> None:
    if any(root.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
    if pickles and not allow_pickle:
        raise ModelConfigError(
            f"{root / pickles[0]}: pickle checkpoint refused (it can run arbitrary code when loaded); "
            "convert it to safetensors or pass --allow-pickle if you trust it"
        )
    if not pickles:
        raise ModelConfigError(f"{root}: no model weights (expected model.safetensors)")


def _activation_name(path: object, where: Path) -> str | None:
    """A ``torch.*`` activation path -> its torch.nn class name; other paths are not trusted (None)."""
    import torch

    if path is None:
        return None
    if not isinstance(path, str):
        raise ModelConfigError(f"{where}: activation_fn must be a dotted path, got {path!r}")
    if not path.startswith("torch."):
        logger.warning(
            "%s: activation function %r is not a torch path; using the default, as sentence-transformers "
            "does without trust_remote_code",
            where,
            path,
        )
        return None
    name = path.rsplit(".", 1)[-1]
    cls = getattr(torch.nn, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ModelConfigError(f"{where}: activation_fn {path!r} is not a torch.nn module class")
    return name


def read_cross_encoder_config(root: Path) -> CrossEncoderConfig:
    """Parse and check the directory's configs (no weights, no code): errors name the file and key."""
    root = Path(root)
    hf_config_path = root / "config.json"
    if not hf_config_path.is_file():
        raise ModelConfigError(f"{hf_config_path}: file not found (not a CrossEncoder directory)")
    hf_config = _json(hf_config_path)
    _check_no_remote_code(root, hf_config)
    modules_path = root / "modules.json"
    if modules_path.is_file():
        modules = read_json(modules_path)
        if not isinstance(modules, list) or not modules:
            raise ModelConfigError(f"{modules_path}: expected a non-empty list of modules")
        types = [m.get("type") if isinstance(m, dict) else None for m in modules]
        if len(modules) != 1 or types[0] not in TRANSFORMER_TYPES:
            raise ModelConfigError(
                f"{modules_path}: a CrossEncoder of one Transformer module is supported; this one has "
                f"{types} (Dense/LogitScore heads are not)"
            )
        if (modules[0].get("path") or "") not in ("", "."):
            raise ModelConfigError(f"{modules_path}: the Transformer module must sit at the model root")
    transformer_config = _json(root / TRANSFORMER_CONFIG)
    task = transformer_config.get("transformer_task", "sequence-classification")
    if task != "sequence-classification":
        raise ModelConfigError(
            f"{root / TRANSFORMER_CONFIG}: transformer_task {task!r}: only sequence-classification "
            "CrossEncoders are supported"
        )
    architectures = hf_config.get("architectures") or []
    architecture = architectures[0] if architectures else ""
    if architecture.endswith("ForCausalLM"):
        raise ModelConfigError(
            f"{hf_config_path}: {architecture} is a decoder reranker (scored through LogitScore); not supported"
        )
    if architecture.endswith("ForSequenceClassification"):
        labels = hf_config.get("id2label")
        num_labels = (
            len(labels) if isinstance(labels, dict) and labels else int(hf_config.get("num_labels", 2))
        )
    else:  # sentence-transformers gives a non-classification backbone one label
        num_labels = 1
    if num_labels != 1:
        raise ModelConfigError(
            f"{hf_config_path}: the CrossEncoder has {num_labels} labels; mining needs one score per pair "
            "(num_labels=1), as sentence-transformers' mine_hard_negatives does"
        )
    max_seq_length = transformer_config.get("max_seq_length")
    if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length < 1):
        raise ModelConfigError(f"{root / TRANSFORMER_CONFIG}: max_seq_length must be a positive integer")
    if transformer_config.get("processing_kwargs"):
        raise ModelConfigError(
            f"{root / TRANSFORMER_CONFIG}: processing_kwargs are not supported for CrossEncoders"
        )
    st_config = _json(root / ST_CONFIG)
    activation = _activation_name(st_config.get("activation_fn"), root / ST_CONFIG)
    if activation is None:
        nested = hf_config.get("sentence_transformers") or {}
        legacy = nested.get("activation_fn") if isinstance(nested, dict) else None
        legacy = legacy or hf_config.get("sbert_ce_default_activation_function")
        activation = _activation_name(legacy, hf_config_path)
    prompts = st_config.get("prompts") or {}
    default_name = st_config.get("default_prompt_name")
    prompt = prompts.get(default_name, "") if default_name else ""
    return CrossEncoderConfig(
        root=root,
        architecture=architecture,
        num_labels=num_labels,
        activation=activation or ("Sigmoid" if num_labels == 1 else "Identity"),
        max_seq_length=max_seq_length,
        do_lower_case=bool(transformer_config.get("do_lower_case", False)),
        prompt=prompt or "",
    )


def check_cross_encoder(root: Path, allow_pickle: bool = False) -> CrossEncoderConfig:
    """The configs and the weight files, checked without loading anything (for the driver)."""
    config = read_cross_encoder_config(root)
    _check_weights(Path(root), allow_pickle)
    return config


def cross_encoder_fingerprint(root: Path) -> str:
    return fingerprint(Path(root), {"kind": "cross-encoder"})


def plan_batches(lengths: np.ndarray, max_batch_tokens: int) -> list[np.ndarray]:
    """Indices longest first (stable), cut so that no batch holds more than ``max_batch_tokens`` padded
    tokens; a pair longer than the budget gets a batch of its own."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        end = min(len(order), start + max(1, max_batch_tokens // longest))
        batches.append(order[start:end])
        start = end
    return batches


class CrossEncoder:
    """One score per (query, document) pair, as sentence-transformers' ``CrossEncoder.predict``."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        device: str | None = None,
        allow_pickle: bool = False,
        dtype: str = "auto",
        max_batch_tokens: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        self.root = Path(root)
        self.config = check_cross_encoder(self.root, allow_pickle)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.autocast_dtype = _autocast(self.device, dtype)
        try:
            hf_config = AutoConfig.from_pretrained(
                str(self.root), trust_remote_code=False, local_files_only=True
            )
            if not self.config.architecture.endswith("ForSequenceClassification"):
                hf_config.num_labels = 1
            with quiet_weight_loading():
                self.model = AutoModelForSequenceClassification.from_pretrained(
                    str(self.root),
                    config=hf_config,
                    trust_remote_code=False,
                    use_safetensors=any(self.root.glob("*.safetensors")),
                    local_files_only=True,
                )
        except Exception as exc:  # safetensors, torch and transformers each raise their own kinds
            raise ModelConfigError(
                f"{self.root}: cannot load the CrossEncoder weights ({type(exc).__name__}: {exc})"
            ) from None
        self.model.to(self.device).eval()
        params = inspect.signature(self.model.forward).parameters
        inputs = {"input_ids", "attention_mask", "token_type_ids"}
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.forward_inputs = inputs if takes_any else inputs & set(params)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.root), local_files_only=True)
        self.max_seq_length = self._max_seq_length()
        self.tokenizer.model_max_length = self.max_seq_length
        if self.config.do_lower_case:
            _add_lowercase(self.tokenizer)
        self.activation = getattr(torch.nn, self.config.activation)()
        self.max_batch_tokens = max_batch_tokens or int(
            os.environ.get("EMBEDPIPE_MAX_BATCH_TOKENS")
            or (DEFAULT_GPU_BATCH_TOKENS if self.device.type == "cuda" else DEFAULT_CPU_BATCH_TOKENS)
        )
        self.fingerprint = cross_encoder_fingerprint(self.root)
        self.pairs_scored = 0
        self.tokens = 0

    def _max_seq_length(self) -> int:
        if self.config.max_seq_length is not None:
            return self.config.max_seq_length
        limit = int(self.tokenizer.model_max_length)
        max_pos = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(max_pos, int) and max_pos > 0:
            limit = min(limit, max_pos)
        return limit

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.root),
            "architecture": self.config.architecture,
            "activation_fn": self.config.activation,
            "max_seq_length": self.max_seq_length,
            "prompt": self.config.prompt,
            "fingerprint": self.fingerprint,
        }

    def tokenize(self, queries: Sequence[str], documents: Sequence[str]) -> dict[str, list]:
        if self.config.prompt:
            queries = [self.config.prompt + q for q in queries]
        return self.tokenizer(
            list(queries),
            list(documents),
            truncation="longest_first",
            max_length=self.max_seq_length,
            padding=False,
        )

    def predict(self, queries: Sequence[str], documents: Sequence[str]) -> np.ndarray:
        """float32 scores, one per (queries[i], documents[i]), in input order."""
        import torch

        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries but {len(documents)} documents")
        out = np.empty(len(queries), dtype=np.float32)
        if not len(queries):
            return out
        encoded = self.tokenize(queries, documents)
        ids = encoded["input_ids"]
        types = encoded.get("token_type_ids")
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        left = self.tokenizer.padding_side == "left"
        for batch in plan_batches(lengths, self.max_batch_tokens):
            width = int(lengths[batch].max())
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            token_types = torch.zeros((len(batch), width), dtype=torch.long) if types is not None else None
            for row, index in enumerate(batch):
                n = len(ids[index])
                span = slice(width - n, width) if left else slice(0, n)
                input_ids[row, span] = torch.tensor(ids[index], dtype=torch.long)
                attention[row, span] = 1
                if token_types is not None:
                    token_types[row, span] = torch.tensor(types[index], dtype=torch.long)
            features = {"input_ids": input_ids, "attention_mask": attention}
            if token_types is not None:
                features["token_type_ids"] = token_types
            features = {k: v.to(self.device) for k, v in features.items() if k in self.forward_inputs}
            with torch.inference_mode(), self._autocast():
                logits = self.model(**features, return_dict=True).logits
            scores = self.activation(logits.float())
            if scores.ndim > 1:
                scores = scores.squeeze(-1)
            out[batch] = scores.cpu().numpy()
            self.tokens += int(lengths[batch].sum())
        self.pairs_scored += len(queries)
        return out

    def _autocast(self):
        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def _autocast(device, dtype: str):
    """fp16/bf16 autocast on GPU only (float32 on CPU), as the bi-encoder."""
    import torch

    if device.type != "cuda" or dtype == "float32":
        return None
    if dtype == "float16":
        return torch.float16
    if dtype in ("auto", "bfloat16"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")


def _add_lowercase(tokenizer) -> None:
    """Lowercase before the tokenizer's own normalizer, as sentence-transformers' do_lower_case."""
    if not getattr(tokenizer, "is_fast", False):
        tokenizer.do_lower_case = True
        return
    from tokenizers.normalizers import Lowercase
    from tokenizers.normalizers import Sequence as NormalizerSequence

    backend = tokenizer.backend_tokenizer
    current = backend.normalizer
    if current is not None and "Lowercase" in repr(current):
        return
    steps = [Lowercase()] + ([current] if current is not None else [])
    backend.normalizer = NormalizerSequence(steps)


def load_cross_encoder(
    path_or_url: str | os.PathLike, storage_options: dict | None = None, **kwargs: Any
) -> CrossEncoder:
    """A CrossEncoder from a local directory or any fsspec URL (fetched into the model cache)."""
    return CrossEncoder(local_model_dir(path_or_url, storage_options), **kwargs)
