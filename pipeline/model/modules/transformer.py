"""Transformer: a Hugging Face model turning token ids into per-token embeddings, as sentence-transformers 6.2.

Config: ``sentence_bert_config.json`` (older releases named it after the architecture:
``sentence_distilbert_config.json``, ``sentence_xlm-roberta_config.json``, ...; the first with content
wins). Every key sentence-transformers 6.2's Transformer takes is read, and any other is refused (it
fails on them too):

- ``max_seq_length`` / ``do_lower_case`` (<= 5 releases; 6 stores the limit as the tokenizer's
  ``model_max_length``, capped at ``max_position_embeddings`` unless set explicitly);
- ``processing_kwargs``: tokenizer call settings per section (``text``, ``common``, ``chat_template``),
  e.g. ``{"text": {"max_length": 24}}``; the keys that change token ids are applied, others refused;
- ``query_length`` / ``document_length``: the max length for texts encoded in that role;
- ``modality_config`` / ``module_output_name`` / ``transformer_task``: text through ``forward`` to
  ``last_hidden_state`` (token embeddings); a ``message`` entry means texts go through the tokenizer's
  chat template (the prompt becomes the system message), as 6.2 does;
- ``model_kwargs`` / ``processor_kwargs`` / ``config_kwargs`` (and 5.x's ``model_args`` /
  ``tokenizer_args`` / ``config_args``): passed to ``from_pretrained`` as sentence-transformers passes
  them (hub keys and ``trust_remote_code`` dropped, as it drops them);
- ``unpad_inputs`` (flash-attention unpadding: no effect on the vectors) is accepted;
  ``query_expansion`` (ColBERT) and ``tokenizer_name_or_path`` (another tokenizer) are refused.

A directory without ``modules.json`` reads no ``sentence_bert_config.json`` (as 6.2), and goes through
the chat template when its tokenizer has one. Nothing in the folder is ever run: an ``auto_map`` is
refused, pickle checkpoints load only on request.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, get_args, get_type_hints

import numpy as np
import torch
from torch import Tensor

from pipeline.model.files import ModelConfigError, read_json
from pipeline.model.modules.base import (
    Features,
    InputModule,
    LoadContext,
    ModuleConfig,
    Tokenized,
    check_no_remote_code,
    check_weights,
    int_key,
    read_config_json,
)

# Keys of sentence_bert_config.json that sentence-transformers 6.2's Transformer takes.
LEGACY_KWARGS_KEYS = {
    "model_args": "model_kwargs",
    "tokenizer_args": "processor_kwargs",
    "config_args": "config_kwargs",
}
KNOWN_KEYS = {
    "max_seq_length",
    "do_lower_case",
    "transformer_task",
    "modality_config",
    "module_output_name",
    "processing_kwargs",
    "unpad_inputs",
    "query_length",
    "document_length",
    "query_expansion",
    "tokenizer_name_or_path",
    "model_kwargs",
    "processor_kwargs",
    "config_kwargs",
    "cache_dir",  # a download location: no effect on a local directory
    "backend",  # replaced by the caller's backend in sentence-transformers
    *LEGACY_KWARGS_KEYS,
}
# Overwritten by sentence-transformers with its own loading arguments, whatever the file says.
HUB_KEYS = {
    "subfolder",
    "token",
    "cache_dir",
    "revision",
    "local_files_only",
    "trust_remote_code",
    "use_auth_token",
}
# model_kwargs that change nothing in the vectors (loading mechanics) or are applied as given.
MODEL_KWARGS_IGNORED = {"device_map", "low_cpu_mem_usage", "use_safetensors"}
MODEL_KWARGS_PASSED = {"dtype", "torch_dtype", "attn_implementation", "add_pooling_layer"}
DTYPE_NAMES = {"auto", "float32", "float16", "bfloat16"}
ATTENTION_IMPLEMENTATIONS = {"eager", "sdpa"}
# processing_kwargs sections and the tokenizer call keys embedpipe applies (others are refused).
PROCESSING_SECTIONS = {"common", "text", "audio", "image", "video", "chat_template"}
TEXT_CALL_KEYS = {
    "max_length",
    "truncation",
    "padding",
    "padding_side",
    "add_special_tokens",
    "pad_to_multiple_of",
}
TEXT_IGNORED_KEYS = {"return_tensors", "logits_to_keep"}
NO_LIMIT = 1 << 31  # model_max_length at or above this means "no limit" (transformers uses 1e30)
CHAT_SIZE_KEYS = {"padding", "truncation", "max_length", "return_tensors"}  # apply_chat_template's own
TRUNCATIONS = {True, False, "longest_first", "only_first", "only_second", "do_not_truncate"}
# sentence-transformers' known message formats by model_type (base/modality.py).
KNOWN_MESSAGE_FORMATS = {"apertus": "flat", "deepseek_v3": "flat", "gpt_oss": "flat", "seed_oss": "flat"}
STRUCTURED_TEMPLATE_PATTERNS = ("content[0]", ".type", "'type'", '"type"', "item.type", "message.content[")
# Encoder-decoder types whose encoder sentence-transformers loads alone (transformers class names), and those
# it loads from a module path embedpipe does not follow.
ENCODER_ONLY_CLASSES = {
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
    "longt5": "LongT5EncoderModel",
    "switch_transformers": "SwitchTransformersEncoderModel",
}
UNSUPPORTED_MODEL_TYPES = {
    # encoder-decoders whose encoder sentence-transformers loads from a module path
    "udop", "prophetnet", "blenderbot", "blenderbot-small", "m2m_100", "pegasus", "pegasus_x", "moonshine",
    "whisper", "marian", "t5gemma", "t5gemma2", "t5gemma2_text",
    # vision, audio and multimodal models sentence-transformers special-cases
    "blip", "blip-2", "sam3", "flava", "git", "visual_bert", "kosmos-2", "grounding-dino", "paligemma", "vilt",
    "layoutlmv3", "idefics", "hubert", "sew", "sew-d", "unispeech-sat", "unispeech", "wav2vec2",
    "wav2vec2-conformer", "wavlm", "voxtral_realtime",
}  # fmt: skip


@contextlib.contextmanager
def quiet_weight_loading() -> Iterator[None]:
    """No "Loading weights" bar per model load (one per worker on a cluster, and in library use); the
    user's own setting comes back afterwards."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


@dataclass(frozen=True)
class TransformerConfig(ModuleConfig):
    max_seq_length: int | None = None  # None: the tokenizer's limit capped at max_position_embeddings
    do_lower_case: bool = False
    query_length: int | None = None  # max length of texts encoded as queries
    document_length: int | None = None  # ... as documents
    processing_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # validated sections
    # None: plain text; "flat" / "structured" / "auto": through the chat template in that message format;
    # "infer": a directory without modules.json (the chat template when the tokenizer has one)
    message_format: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)
    config_kwargs: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None  # the config file read, for messages


class Transformer(InputModule):
    """A Hugging Face model returning per-token embeddings; never runs code from the model directory."""

    type_names: ClassVar[tuple[str, ...]] = (
        "sentence_transformers.models.Transformer",  # written by sentence-transformers <= 5.3
        "sentence_transformers.base.modules.transformer.Transformer",  # written by >= 5.4
        "sentence_transformers.base.modules.Transformer",  # the import paths of >= 5.4
        "sentence_transformers.sentence_transformer.modules.Transformer",
    )
    # sentence-transformers reads the first of these with content.
    config_file_names: ClassVar[tuple[str, ...]] = (
        "sentence_bert_config.json",
        "sentence_roberta_config.json",
        "sentence_distilbert_config.json",
        "sentence_camembert_config.json",
        "sentence_albert_config.json",
        "sentence_xlm-roberta_config.json",
        "sentence_xlnet_config.json",
    )

    config: TransformerConfig

    # -- reading the folder ---------------------------------------------------------------------

    @classmethod
    def read_config(cls, folder: Path) -> TransformerConfig:
        config, path = cls.read_config_file(folder, required=False)
        unknown = sorted(set(config) - KNOWN_KEYS)
        if unknown:
            raise ModelConfigError(
                f"{path}: unknown Transformer key(s) {', '.join(map(repr, unknown))} "
                "(sentence-transformers 6.2 cannot load them either)"
            )
        for old, new in LEGACY_KWARGS_KEYS.items():  # as sentence-transformers: the old name wins
            if old in config:
                config[new] = config.pop(old)
        task = config.get("transformer_task")
        if task not in (None, "feature-extraction"):
            raise ModelConfigError(
                f"{path}: transformer_task {task!r} is not an embedding model (only 'feature-extraction' is)"
            )
        if config.get("query_expansion") is not None:
            raise ModelConfigError(
                f"{path}: query_expansion (ColBERT-style multi-vector queries) is not supported by embedpipe"
            )
        if config.get("tokenizer_name_or_path") is not None:
            raise ModelConfigError(
                f"{path}: tokenizer_name_or_path {config['tokenizer_name_or_path']!r} loads a tokenizer from "
                "elsewhere; embedpipe only reads the model directory"
            )
        message_format = read_modality_config(config, path)
        return TransformerConfig(
            path=folder,
            max_seq_length=int_key(config, "max_seq_length", path),
            do_lower_case=bool(config.get("do_lower_case", False)),
            query_length=int_key(config, "query_length", path),
            document_length=int_key(config, "document_length", path),
            processing_kwargs=read_processing_kwargs(config.get("processing_kwargs"), path, message_format),
            message_format=message_format,
            model_kwargs=read_model_kwargs(config.get("model_kwargs"), path),
            tokenizer_kwargs=read_tokenizer_kwargs(config.get("processor_kwargs"), path),
            config_kwargs=read_kwargs_dict(config.get("config_kwargs"), path, "config_kwargs"),
            source=path,
        )

    @classmethod
    def fallback_config(cls, folder: Path) -> TransformerConfig:
        """A directory without modules.json: nothing from sentence_bert_config.json, as 6.2."""
        return TransformerConfig(path=folder, message_format="infer", source=folder / "config.json")

    @classmethod
    def hidden_size(cls, folder: Path) -> int:
        """The model's hidden size from its config.json, without loading it."""
        config = read_json(folder / "config.json")
        size = config.get("hidden_size") or config.get("d_model") or config.get("dim")
        if not isinstance(size, int):
            raise ModelConfigError(f"{folder / 'config.json'}: no hidden_size to infer the pooling dimension")
        return size

    @classmethod
    def check_files(cls, config: ModuleConfig, context: LoadContext) -> None:
        """config.json present, a text model, no remote code asked for, safe weights present."""
        folder = config.path
        hf_config = read_config_json(folder)
        if not hf_config:
            raise ModelConfigError(f"{folder / 'config.json'}: file not found")
        check_no_remote_code(folder, hf_config)
        model_type = hf_config.get("model_type")
        if model_type in UNSUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"{folder / 'config.json'}: model_type {model_type!r} is not supported by embedpipe "
                "(a multimodal, audio or encoder-decoder model sentence-transformers special-cases)"
            )
        for name, what in (
            ("adapter_config.json", "a PEFT adapter (its base model lives elsewhere)"),
            ("processor_config.json", "a multimodal processor"),
            ("preprocessor_config.json", "an image or audio processor"),
        ):
            if (folder / name).exists():
                raise ModelConfigError(
                    f"{folder / name}: {what} is not supported by embedpipe (text models only)"
                )
        check_weights(folder, context.allow_pickle)

    @classmethod
    def flow(cls, config: ModuleConfig, available: frozenset[str], where: str) -> frozenset[str]:
        return available | {"token_embeddings"}

    # -- loading --------------------------------------------------------------------------------

    def __init__(self, config: TransformerConfig, context: LoadContext | None = None) -> None:
        super().__init__(config, context)
        from transformers import AutoConfig, AutoTokenizer

        context = context or LoadContext()
        folder = config.path
        self.check_files(config, context)
        use_safetensors = any(folder.glob("*.safetensors"))
        common = {"trust_remote_code": False, "local_files_only": True}
        try:
            hf_config = AutoConfig.from_pretrained(str(folder), **common, **config.config_kwargs)
            if hasattr(hf_config, "use_cache"):  # as sentence-transformers: no key/value cache for embeddings
                hf_config.use_cache = config.config_kwargs.get("use_cache", False)
            model_kwargs = dict(config.model_kwargs)
            if context.dtype is not None:
                model_kwargs.pop("torch_dtype", None)
                model_kwargs["dtype"] = context.dtype
            with quiet_weight_loading():
                self.model = model_class(hf_config).from_pretrained(
                    str(folder), config=hf_config, use_safetensors=use_safetensors, **common, **model_kwargs
                )
        except Exception as exc:  # safetensors, torch and transformers each raise their own kinds
            raise ModelConfigError(
                f"{folder}: cannot load the transformer weights ({type(exc).__name__}: {exc})"
            ) from None
        self.model.eval()
        if "last_hidden_state" not in (output_fields(self.model.forward) or ["last_hidden_state"]):
            raise ModelConfigError(
                f"{folder / 'config.json'}: {type(self.model).__name__} returns no last_hidden_state (token "
                "embeddings); not a text embedding backbone embedpipe supports"
            )
        # Only the inputs the model's forward takes (as sentence-transformers): a tokenizer may return
        # token_type_ids for a model that has none.
        params = inspect.signature(self.model.forward).parameters
        inputs = {"input_ids", "attention_mask", "token_type_ids"}
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.forward_inputs = inputs if takes_any else inputs & set(params)

        tokenizer_kwargs = dict(config.tokenizer_kwargs)
        if config.max_seq_length is not None and "model_max_length" not in tokenizer_kwargs:
            tokenizer_kwargs["model_max_length"] = config.max_seq_length
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(folder), **common, **tokenizer_kwargs)
        except Exception as exc:
            raise ModelConfigError(
                f"{folder}: cannot load the tokenizer ({type(exc).__name__}: {exc})"
            ) from None
        if not self._tokenizer.is_fast:
            raise ModelConfigError(
                f"{folder}: the tokenizer is not a fast (Rust) tokenizer; embedpipe needs one"
            )
        if "model_max_length" not in tokenizer_kwargs:  # sentence-transformers' cap
            max_pos = getattr(self.model.config, "max_position_embeddings", None)
            if isinstance(max_pos, int) and max_pos != -1:
                self._tokenizer.model_max_length = min(self._tokenizer.model_max_length, max_pos)
        if self._tokenizer.pad_token_id is None:
            raise ModelConfigError(
                f"{folder / 'tokenizer_config.json'}: the tokenizer has no pad_token, so sentence-transformers "
                "cannot pad a batch either; set one"
            )
        if config.do_lower_case:
            add_lowercase(self._tokenizer)
        self.chat = ChatTemplate.create(self._tokenizer, config, self.model.config.model_type)
        self._call_kwargs: dict[str | None, tuple[dict[str, Any], str]] = {}
        self._prompt_lengths: dict[str, int] = {}
        self._backends: dict[str | None, Any] = {}

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_seq_length(self) -> int:
        return int(self._tokenizer.model_max_length)

    def output_dim(self, input_dim: int | None) -> int | None:
        model_config = self.model.config
        size = getattr(model_config, "hidden_size", None) or getattr(model_config, "d_model", None)
        return size if isinstance(size, int) else None

    def describe(self) -> dict[str, Any]:
        config = self.config
        settings: dict[str, Any] = {
            "architecture": type(self.model).__name__,
            "max_seq_length": self.max_seq_length,
            "do_lower_case": config.do_lower_case,
            "padding_side": self.call_kwargs(None)[1],
            "prompt": self.chat.placement if self.chat else "prepended to the text",
        }
        if self.chat is not None:
            settings["chat_template_gets_role"] = self.chat.declares_task
        if config.query_length is not None or config.document_length is not None:
            settings["query_length"] = config.query_length
            settings["document_length"] = config.document_length
        # what the texts are cut at, per role (None: not cut), after every setting above
        settings["max_length"] = {
            role or "none": self.call_kwargs(role)[0].get("max_length")
            for role in (None, "query", "document")
        }
        if config.processing_kwargs:
            settings["processing_kwargs"] = config.processing_kwargs
        return settings

    # -- tokens ---------------------------------------------------------------------------------

    def call_kwargs(self, task: str | None) -> tuple[dict[str, Any], str]:
        """The tokenizer call settings for texts of this role, and the padding side, as 6.2 builds them.

        Defaults (truncate to the model's limit), then the role's length (query_length / document_length),
        then processing_kwargs' ``text``, then ``common`` (which wins on a plain tokenizer call).
        """
        if task not in self._call_kwargs:
            length = {"query": self.config.query_length, "document": self.config.document_length}.get(
                task or ""
            )
            text: dict[str, Any] = {"truncation": "longest_first"}
            if length is not None:
                text["max_length"] = length
            sections = self.config.processing_kwargs
            if self.chat is None:
                kwargs = {**text, **sections.get("text", {}), **sections.get("common", {})}
            else:
                kwargs = self.chat.token_kwargs(text, sections)
            side = kwargs.pop("padding_side", None) or self._tokenizer.padding_side
            for key in ("padding", "pad_to_multiple_of", *TEXT_IGNORED_KEYS):
                kwargs.pop(key, None)
            # No max_length: the tokenizer's own limit, as sentence-transformers leaves it to the tokenizer; a
            # tokenizer without one reports a huge sentinel, which is no limit (and too big to pass on).
            limited = self.max_seq_length < NO_LIMIT
            if truncates(kwargs.get("truncation")) and kwargs.get("max_length") is None and limited:
                kwargs["max_length"] = self.max_seq_length
            self._call_kwargs[task] = (kwargs, side)
        return self._call_kwargs[task]

    def prompt_length(self, prompt: str, task: str | None = None) -> int:
        """Tokens the prompt occupies at the start of each text, excluding a trailing special token.

        As sentence-transformers: the prompt tokenized alone with the settings of a text without role; 0
        through a chat template (the prompt is a system message there, and never excluded from pooling).
        """
        if not prompt or self.chat is not None:
            return 0
        if prompt not in self._prompt_lengths:
            kwargs, _ = self.call_kwargs(None)
            ids = self._tokenizer([prompt], **kwargs)["input_ids"][0]
            length = len(ids)
            if ids and ids[-1] in set(self._tokenizer.all_special_ids):
                length -= 1
            self._prompt_lengths[prompt] = length
        return self._prompt_lengths[prompt]

    def tokenize(self, texts: Sequence[str], prompt: str = "", task: str | None = None) -> Tokenized:
        kwargs, _ = self.call_kwargs(task)
        if self.chat is not None:
            ids, types = self.chat.tokenize(texts, prompt, task, kwargs)
        else:
            texts = [prompt + t for t in texts] if prompt else list(texts)
            if not texts:  # the tokenizer fails on an empty batch
                return Tokenized([], None, self.prompt_length(prompt, task), task=task)
            backend = self.backend_for(task, kwargs)
            if (
                backend is not None
            ):  # the Rust tokenizer directly: the same ids, without transformers' wrapper
                encodings = backend.encode_batch(texts, add_special_tokens=True)
                ids = [e.ids for e in encodings]
                types = [e.type_ids for e in encodings] if self._returns_types else None
            else:
                encoded = self._tokenizer(texts, padding=False, **kwargs)
                ids, types = encoded["input_ids"], encoded.get("token_type_ids")
        return Tokenized(
            input_ids=ids,
            token_type_ids=types,
            prompt_length=self.prompt_length(prompt, task),
            lengths=np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids)),
            task=task,
        )

    def backend_for(self, task: str | None, kwargs: dict[str, Any]) -> Any:
        """A copy of the fast tokenizer's Rust backend set up as the transformers call with ``kwargs`` sets it
        (truncation to ``max_length`` on the tokenizer's truncation side, no padding), or None when the call
        takes any other setting (then the wrapper runs). A copy per role, so that threads never reset it."""
        if task not in self._backends:
            backend = None
            plain = set(kwargs) <= {"truncation", "max_length"} and kwargs.get("truncation") in (
                True,
                "longest_first",
            )
            length = kwargs.get("max_length")
            if plain and isinstance(length, int) and length > 0:
                from tokenizers import Tokenizer

                backend = Tokenizer.from_str(self._tokenizer.backend_tokenizer.to_str())
                backend.no_padding()
                backend.enable_truncation(
                    length, stride=0, strategy="longest_first", direction=self._tokenizer.truncation_side
                )
            self._backends[task] = backend
        return self._backends[task]

    @property
    def _returns_types(self) -> bool:
        return "token_type_ids" in self._tokenizer.model_input_names

    def collate(self, tokens: Tokenized, indices: np.ndarray) -> dict[str, Tensor]:
        """Pad one batch on the padding side of the texts' role.

        Vectorized: the batch's ids are concatenated into one flat array and scattered into the padded
        matrix through the attention mask (row-major order is the rows' order on either side)."""
        lengths = tokens.lengths[indices]
        width = int(lengths.max()) if len(indices) else 0
        left = self.call_kwargs(tokens.task)[1] == "left"
        columns = np.arange(width, dtype=np.int64)
        mask = columns >= (width - lengths)[:, None] if left else columns < lengths[:, None]
        input_ids = np.full((len(indices), width), self._tokenizer.pad_token_id, dtype=np.int64)
        input_ids[mask] = flatten(tokens.input_ids, indices, int(lengths.sum()))
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
        }
        if tokens.token_type_ids:
            types = np.zeros((len(indices), width), dtype=np.int64)
            types[mask] = flatten(tokens.token_type_ids, indices, int(lengths.sum()))
            batch["token_type_ids"] = torch.from_numpy(types)
        return batch

    def forward(self, features: Features, **kwargs: Any) -> Features:
        inputs = {k: v for k, v in features.items() if k in self.forward_inputs}
        output = self.model(**inputs, return_dict=True)
        features["token_embeddings"] = output.last_hidden_state
        return features


# -- chat templates ---------------------------------------------------------------------------------


class ChatTemplate:
    """Texts through the tokenizer's chat template, as sentence-transformers 6.2 encodes them.

    Each text becomes one user message (``flat``: the text as content; ``structured``: a list with one
    text item); a prompt becomes a system message before it. The rendered conversations are tokenized
    without special tokens (the template writes its own); a row cut at the max length gets the
    template's closing tokens (the "suffix", found by rendering two fillers) written back over its tail.
    A template that names a ``task`` variable receives the role.
    """

    def __init__(self, tokenizer: Any, message_format: str, sections: dict[str, dict[str, Any]]) -> None:
        self.tokenizer = tokenizer
        self.format = message_format
        chat = dict(sections.get("chat_template", {}))
        self.restore_suffix = bool(chat.pop("restore_suffix", True))
        self.size_kwargs = {k: chat.pop(k) for k in CHAT_SIZE_KEYS & chat.keys()}
        self.template_kwargs = chat
        self.declares_task = template_declares_task(tokenizer.chat_template)
        self._suffixes: dict[tuple[str, str | None], list[int]] = {}

    @classmethod
    def create(cls, tokenizer: Any, config: TransformerConfig, model_type: str) -> ChatTemplate | None:
        fmt = config.message_format
        template = getattr(tokenizer, "chat_template", None)
        if fmt is None or (fmt == "infer" and template is None):
            return None
        if template is None:
            raise ModelConfigError(
                f"{config.source}: modality_config has a 'message' entry (texts through the chat template), "
                "but the tokenizer has no chat template"
            )
        if fmt in ("auto", "infer"):
            fmt = KNOWN_MESSAGE_FORMATS.get(model_type) or infer_message_format(template)
        return cls(tokenizer, fmt, config.processing_kwargs)

    @property
    def placement(self) -> str:
        return f"system message of the chat template ({self.format} messages)"

    def token_kwargs(self, text: dict[str, Any], sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The tokenizer call settings: text ones win over common ones, chat_template's size keys over both."""
        common = {k: v for k, v in sections.get("common", {}).items() if k in CHAT_SIZE_KEYS}
        return {**common, **text, **sections.get("text", {}), **self.size_kwargs}

    def conversation(self, text: str, prompt: str) -> list[dict[str, Any]]:
        def message(role: str, content: str) -> dict[str, Any]:
            if self.format == "flat":
                return {"role": role, "content": content}
            return {"role": role, "content": [{"type": "text", "text": content}]}

        messages = [message("user", text)]
        return [message("system", prompt), *messages] if prompt else messages

    def render(self, conversations: list[list[dict[str, Any]]], task: str | None) -> list[str]:
        kwargs = dict(self.template_kwargs)
        if task is not None and self.declares_task:
            kwargs = {"task": task, **kwargs}
        return self.tokenizer.apply_chat_template(conversations, tokenize=False, **kwargs)

    def tokenize(
        self, texts: Sequence[str], prompt: str, task: str | None, kwargs: dict[str, Any]
    ) -> tuple[list[list[int]], list[list[int]] | None]:
        if not texts:
            return [], None
        rendered = self.render([self.conversation(t, prompt) for t in texts], task)
        encoded = self.tokenizer(rendered, add_special_tokens=False, padding=False, **kwargs)
        ids, types = encoded["input_ids"], encoded.get("token_type_ids")
        truncation = kwargs.get("truncation")
        if self.restore_suffix and truncates(truncation) and truncation != "do_not_truncate":
            limit = kwargs.get("max_length") or self.tokenizer.model_max_length or 0
            suffix = self.suffix(prompt, task, kwargs)
            for row in ids:
                keep = min(len(suffix), len(row))
                if len(row) >= limit and keep:
                    row[len(row) - keep :] = suffix[len(suffix) - keep :]
        return ids, types

    def suffix(self, prompt: str, task: str | None, kwargs: dict[str, Any]) -> list[int]:
        """The tokens the template writes after the text: the common tail of two renders with other fillers."""
        key = (prompt, task)
        if key not in self._suffixes:
            extra = {k: v for k, v in kwargs.items() if k not in CHAT_SIZE_KEYS}
            first, second = (
                self.tokenizer(
                    self.render([self.conversation(filler, prompt)], task),
                    add_special_tokens=False,
                    truncation=False,
                    **extra,
                )["input_ids"][0]
                for filler in ("0", "1 2 3 4")
            )
            count = 0
            for left, right in zip(reversed(first), reversed(second), strict=False):
                if left != right:
                    break
                count += 1
            found = first[len(first) - count :] if 0 < count < min(len(first), len(second)) else []
            self._suffixes[key] = list(found)
        return self._suffixes[key]


def flatten(rows: Sequence[Sequence[int]], indices: np.ndarray, total: int) -> np.ndarray:
    """The rows at ``indices`` concatenated into one int64 array of ``total`` items."""
    return np.fromiter(itertools.chain.from_iterable(rows[i] for i in indices), dtype=np.int64, count=total)


def template_declares_task(template: Any) -> bool:
    """Whether the chat template reads a ``task`` variable (then the role is passed to it)."""
    try:
        from transformers.utils.chat_template_utils import _get_template_variables
    except ImportError:  # as sentence-transformers: without the introspection, passing it is harmless
        return True
    templates = template.values() if isinstance(template, dict) else [template]
    return any(isinstance(t, str) and "task" in _get_template_variables(t) for t in templates)


def infer_message_format(template: Any) -> str:
    """sentence-transformers' guess: a template indexing into the content wants structured messages."""
    if not isinstance(template, str) or not template:
        return "structured"
    return "structured" if any(p in template for p in STRUCTURED_TEMPLATE_PATTERNS) else "flat"


# -- reading sentence_bert_config.json --------------------------------------------------------------


def truncates(truncation: Any) -> bool:
    return truncation not in (None, False, "do_not_truncate")


def read_modality_config(config: dict[str, Any], path: Path) -> str | None:
    """None for plain text, or the message format when texts go through the chat template."""
    modality_config = config.get("modality_config")
    if modality_config is None:  # saved before 6.0: text only (module_output_name is then ignored, as in 6.2)
        return None
    if not isinstance(modality_config, dict):
        raise ModelConfigError(f"{path}: modality_config must be an object, got {modality_config!r}")
    if config.get("module_output_name") != "token_embeddings":
        raise ModelConfigError(
            f"{path}: module_output_name {config.get('module_output_name')!r} is not supported "
            "(embedpipe takes token embeddings from the transformer: 'token_embeddings')"
        )
    message_format = None
    for key, params in modality_config.items():
        parts = key.split("+")
        if not all(part in {"text", "image", "audio", "video", "message"} for part in parts):
            continue  # sentence-transformers ignores unknown modality keys
        if key not in ("text", "message"):
            raise ModelConfigError(f"{path}: modality_config.{key}: embedpipe encodes text only")
        output = params.get("method_output_name") if isinstance(params, dict) else None
        if (
            not isinstance(params, dict)
            or params.get("method") != "forward"
            or output
            not in (
                "last_hidden_state",
                ["last_hidden_state"],
            )
        ):
            raise ModelConfigError(
                f"{path}: modality_config.{key} {params!r} is not supported "
                "(only method 'forward' with method_output_name 'last_hidden_state')"
            )
        if key == "message":
            message_format = params.get("format", "auto")
            if message_format not in ("auto", "flat", "structured"):
                raise ModelConfigError(
                    f"{path}: modality_config.message.format {message_format!r} is not one of auto, flat, structured"
                )
    if "text" not in modality_config and message_format is None:
        raise ModelConfigError(f"{path}: modality_config has neither a 'text' nor a 'message' entry")
    return message_format


def read_kwargs_dict(value: Any, path: Path, key: str) -> dict[str, Any]:
    """A model_kwargs / processor_kwargs / config_kwargs object, without the keys 6.2 overwrites."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ModelConfigError(f"{path}: {key} must be an object, got {value!r}")
    return {k: v for k, v in value.items() if k not in HUB_KEYS}


def read_model_kwargs(value: Any, path: Path) -> dict[str, Any]:
    kwargs = read_kwargs_dict(value, path, "model_kwargs")
    unknown = sorted(set(kwargs) - MODEL_KWARGS_IGNORED - MODEL_KWARGS_PASSED)
    if unknown:
        raise ModelConfigError(
            f"{path}: model_kwargs key(s) {', '.join(map(repr, unknown))} are not supported by embedpipe "
            f"(supported: {', '.join(sorted(MODEL_KWARGS_PASSED))})"
        )
    for key in ("dtype", "torch_dtype"):
        if key in kwargs and kwargs[key] is not None and kwargs[key] not in DTYPE_NAMES:
            raise ModelConfigError(
                f"{path}: model_kwargs.{key} {kwargs[key]!r} is not one of {', '.join(sorted(DTYPE_NAMES))}"
            )
    attention = kwargs.get("attn_implementation")
    if attention is not None and attention not in ATTENTION_IMPLEMENTATIONS:
        raise ModelConfigError(
            f"{path}: model_kwargs.attn_implementation {attention!r} is not supported "
            f"(supported: {', '.join(sorted(ATTENTION_IMPLEMENTATIONS))})"
        )
    return {k: v for k, v in kwargs.items() if k in MODEL_KWARGS_PASSED and v is not None}


def read_tokenizer_kwargs(value: Any, path: Path) -> dict[str, Any]:
    kwargs = read_kwargs_dict(value, path, "processor_kwargs")
    files = sorted(k for k in kwargs if k.endswith("_file") or k.endswith("_files"))
    if files:
        raise ModelConfigError(
            f"{path}: processor_kwargs key(s) {', '.join(map(repr, files))} point at other files; "
            "embedpipe only reads the model directory's own tokenizer files"
        )
    if "model_max_length" in kwargs:
        int_key(kwargs, "model_max_length", path)
    return kwargs


def read_processing_kwargs(value: Any, path: Path, message_format: str | None) -> dict[str, dict[str, Any]]:
    """processing_kwargs' sections; keys that would change token ids in a way embedpipe does not follow are
    refused. Unknown sections are ignored, as sentence-transformers ignores them."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ModelConfigError(f"{path}: processing_kwargs must be an object, got {value!r}")
    sections: dict[str, dict[str, Any]] = {}
    for name in ("text", "common", "chat_template"):
        section = value.get(name)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ModelConfigError(f"{path}: processing_kwargs.{name} must be an object, got {section!r}")
        if name == "chat_template":
            sections[name] = dict(section)
            continue
        allowed = TEXT_CALL_KEYS | TEXT_IGNORED_KEYS
        if message_format is not None:
            allowed = allowed - {"add_special_tokens"}  # apply_chat_template sets it itself
        for key, item in section.items():
            where = f"{path}: processing_kwargs.{name}.{key}"
            if key not in allowed:
                raise ModelConfigError(
                    f"{where} is not supported by embedpipe (supported: {', '.join(sorted(allowed))})"
                )
            if key in ("max_length", "pad_to_multiple_of") and item is not None:
                int_key(section, key, Path(f"{path}: processing_kwargs.{name}"))
            if key == "truncation" and item not in TRUNCATIONS:
                raise ModelConfigError(f"{where} {item!r} is not a truncation strategy")
            if key == "padding" and item not in (True, "longest", "max_length"):
                raise ModelConfigError(f"{where} {item!r}: sentence-transformers needs padded batches")
            if key == "padding_side" and item not in ("left", "right"):
                raise ModelConfigError(f"{where} {item!r} is not 'left' or 'right'")
            if key == "return_tensors" and item not in (None, "pt"):
                raise ModelConfigError(f"{where} {item!r}: sentence-transformers needs torch tensors")
        sections[name] = {k: v for k, v in section.items() if k not in TEXT_IGNORED_KEYS}
    return sections


# -- models -----------------------------------------------------------------------------------------


def model_class(hf_config: Any) -> Any:
    """The class sentence-transformers loads: an encoder-decoder's encoder alone, else AutoModel."""
    import transformers

    name = ENCODER_ONLY_CLASSES.get(getattr(hf_config, "model_type", ""))
    return getattr(transformers, name) if name else transformers.AutoModel


def output_fields(method: Any) -> list[str] | None:
    """The fields of the ModelOutput a model method is annotated to return (None when unknown)."""
    from transformers.utils import ModelOutput

    def find(annotation: Any) -> Any:
        if isinstance(annotation, type) and issubclass(annotation, ModelOutput):
            return annotation
        for sub in get_args(annotation):
            if (found := find(sub)) is not None:
                return found
        return None

    try:
        annotation = get_type_hints(method).get("return")
    except Exception:
        return None
    output = find(annotation)
    return None if output is None else [f.name for f in fields(output)]


def add_lowercase(tokenizer) -> None:
    """Lowercase through the fast tokenizer's normalizer, as sentence-transformers does for do_lower_case."""
    from tokenizers.normalizers import Lowercase
    from tokenizers.normalizers import Sequence as NormalizerSequence

    backend = tokenizer.backend_tokenizer
    current = backend.normalizer
    if current is not None and "Lowercase" in repr(current):
        return
    parts = [Lowercase()]
    if isinstance(current, NormalizerSequence):
        parts += list(current)
    elif current is not None:
        parts.append(current)
    backend.normalizer = NormalizerSequence(parts)
