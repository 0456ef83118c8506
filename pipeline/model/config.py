"""Parse a sentence-transformers model directory into plain dataclasses.

Everything the encoder does comes from the model's own files: ``modules.json`` lists the modules,
``1_Pooling/config.json`` the pooling (legacy boolean schema or the v6 ``pooling_mode`` schema),
``config_sentence_transformers.json`` the prompts and the similarity function, and
``sentence_bert_config.json`` the maximum sequence length. Nothing here touches torch weights.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.model.similarity import SIMILARITY_FUNCTIONS

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")

# Legacy boolean keys in sentence-transformers' concatenation order.
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}

MODULE_KINDS = ("Transformer", "Pooling", "Dense", "Normalize")


class ModelConfigError(ValueError):
    """A model directory that cannot be loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class TransformerConfig:
    path: Path
    max_seq_length: int | None
    do_lower_case: bool


@dataclass(frozen=True)
class PoolingConfig:
    path: Path
    embedding_dimension: int
    modes: tuple[str, ...]
    include_prompt: bool = True


@dataclass(frozen=True)
class DenseConfig:
    path: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # a torch.nn class name, e.g. "Tanh" or "Identity"
    use_residual: bool = False  # add the input (projected when in != out) to the output


@dataclass(frozen=True)
class NormalizeConfig:
    path: Path


ModuleConfig = TransformerConfig | PoolingConfig | DenseConfig | NormalizeConfig


@dataclass(frozen=True)
class ModelConfig:
    root: Path
    modules: tuple[ModuleConfig, ...]
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    similarity_fn_name: str = "cosine"
    has_modules_json: bool = True

    @property
    def transformer(self) -> TransformerConfig:
        return next(m for m in self.modules if isinstance(m, TransformerConfig))

    @property
    def pooling(self) -> PoolingConfig | None:
        return next((m for m in self.modules if isinstance(m, PoolingConfig)), None)

    @property
    def normalized(self) -> bool:
        return any(isinstance(m, NormalizeConfig) for m in self.modules)


def choose_prompt(model: ModelConfig, prompt_name: str | None = None, prompt: str | None = None) -> str:
    """An explicit prompt wins, then a prompt name, then the model's default prompt, else none."""
    if prompt is not None:
        return prompt
    if prompt_name is not None:
        if prompt_name not in model.prompts:
            known = ", ".join(sorted(model.prompts)) or "none"
            raise ValueError(f"prompt name {prompt_name!r} is not defined by the model (defined: {known})")
        return model.prompts[prompt_name]
    if model.default_prompt_name is not None:
        return model.prompts[model.default_prompt_name]
    return ""


def read_json(path: Path) -> Any:
    """Read a JSON file; errors name the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelConfigError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{path}: not valid JSON ({exc})") from None


def module_kind(type_string: str, where: Path) -> str:
    """Match a module by its class name, so v2 to v6 type strings all load."""
    name = str(type_string).rsplit(".", 1)[-1]
    if name not in MODULE_KINDS:
        raise ModelConfigError(
            f"{where}: unknown module type {type_string!r}; supported: {', '.join(MODULE_KINDS)}"
        )
    return name


def module_dir(root: Path, relative: str, where: Path) -> Path:
    """Resolve a module folder and refuse paths that escape the model directory."""
    resolved = (root / relative).resolve()
    if resolved != root.resolve() and root.resolve() not in resolved.parents:
        raise ModelConfigError(f"{where}: module path {relative!r} escapes the model directory")
    return resolved


def parse_pooling(config: dict[str, Any], where: Path) -> tuple[int, tuple[str, ...], bool]:
    """Both pooling schemas: legacy booleans and v6 ``pooling_mode``; returns (dim, modes, include_prompt)."""
    dim = config.get("embedding_dimension", config.get("word_embedding_dimension"))
    if not isinstance(dim, int) or dim <= 0:
        raise ModelConfigError(f"{where}: missing or invalid embedding_dimension / word_embedding_dimension")
    raw = config.get("pooling_mode")
    if raw is None:
        modes = tuple(mode for key, mode in LEGACY_POOLING_KEYS.items() if config.get(key, False))
        modes = modes or ("mean",)
    elif isinstance(raw, str):
        modes = (raw,)
    elif isinstance(raw, list | tuple) and raw:
        modes = tuple(raw)
    else:
        raise ModelConfigError(f"{where}: pooling_mode must be a string or a non-empty list, got {raw!r}")
    for mode in modes:
        if mode not in POOLING_MODES:
            raise ModelConfigError(f"{where}: unknown pooling mode {mode!r}; valid: {', '.join(POOLING_MODES)}")
    return dim, modes, bool(config.get("include_prompt", True))


def parse_dense(config: dict[str, Any], folder: Path, where: Path) -> DenseConfig:
    """Dense config; only torch.nn activation classes are accepted, by name.

    Without an ``activation_function`` key, sentence-transformers' Dense uses its default, Tanh.
    """
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    activation = str(activation or "torch.nn.modules.linear.Identity")
    class_name = activation.rsplit(".", 1)[-1]
    if not activation.startswith("torch.nn.") or not is_torch_nn_module_class(class_name):
        raise ModelConfigError(
            f"{where}: activation_function {activation!r} is not a torch.nn activation class; "
            "only torch.nn modules are accepted (no code is imported from model files)"
        )
    check_builds_without_arguments(class_name, where)
    try:
        return DenseConfig(
            path=folder,
            in_features=int(config["in_features"]),
            out_features=int(config["out_features"]),
            bias=bool(config.get("bias", True)),
            activation=class_name,
            use_residual=bool(config.get("use_residual", False)),
        )
    except KeyError as exc:
        raise ModelConfigError(f"{where}: missing key {exc.args[0]!r}") from None


def is_torch_nn_module_class(name: str) -> bool:
    import torch.nn

    candidate = getattr(torch.nn, name, None)
    return isinstance(candidate, type) and issubclass(candidate, torch.nn.Module)


# sentence-transformers reads the first of these that exists (older releases named it after the architecture).
TRANSFORMER_CONFIG_NAMES = (
    "sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json",
    "sentence_camembert_config.json", "sentence_albert_config.json", "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
)


def check_builds_without_arguments(class_name: str, where: Path) -> None:
    """sentence-transformers builds the activation with no arguments; a class that needs some is refused here."""
    import torch.nn

    try:
        getattr(torch.nn, class_name)()
    except TypeError as exc:
        raise ModelConfigError(
            f"{where}: activation_function torch.nn.{class_name} cannot be built without arguments ({exc})"
        ) from None


def parse_transformer(folder: Path) -> TransformerConfig:
    found = next((folder / name for name in TRANSFORMER_CONFIG_NAMES if (folder / name).exists()), None)
    config = read_json(found) if found else {}
    if not isinstance(config, dict):
        raise ModelConfigError(f"{found}: expected a JSON object")
    max_len = config.get("max_seq_length")
    return TransformerConfig(
        path=folder,
        max_seq_length=int(max_len) if max_len is not None else None,
        do_lower_case=bool(config.get("do_lower_case", False)),
    )


def parse_st_config(root: Path) -> tuple[dict[str, str], str | None, str]:
    """Prompts, default prompt name and similarity function from config_sentence_transformers.json."""
    path = root / "config_sentence_transformers.json"
    config = read_json(path) if path.exists() else {}
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ModelConfigError(f"{path}: prompts must map names to strings")
    default_prompt_name = config.get("default_prompt_name")
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise ModelConfigError(f"{path}: default_prompt_name {default_prompt_name!r} is not one of the prompts")
    similarity = config.get("similarity_fn_name") or "cosine"
    if similarity not in SIMILARITY_FUNCTIONS:
        raise ModelConfigError(
            f"{path}: similarity_fn_name {similarity!r} is not one of {', '.join(SIMILARITY_FUNCTIONS)}"
        )
    return dict(prompts), default_prompt_name, similarity


def hidden_size(root: Path) -> int:
    config = read_json(root / "config.json")
    size = config.get("hidden_size") or config.get("d_model") or config.get("dim")
    if not isinstance(size, int):
        raise ModelConfigError(f"{root / 'config.json'}: no hidden_size to infer the pooling dimension")
    return size


def load_model_config(root: str | Path) -> ModelConfig:
    """Read a model directory; a plain Hugging Face directory becomes Transformer + mean pooling."""
    root = Path(root)
    if not root.is_dir():
        raise ModelConfigError(f"{root}: not a model directory")
    prompts, default_prompt_name, similarity = parse_st_config(root)
    modules_path = root / "modules.json"
    if not modules_path.exists():
        warnings.warn(
            f"{root}: no modules.json; loading as a plain Hugging Face model with mean pooling",
            stacklevel=2,
        )
        modules: tuple[ModuleConfig, ...] = (
            parse_transformer(root),
            PoolingConfig(path=root, embedding_dimension=hidden_size(root), modes=("mean",)),
        )
        return ModelConfig(root, modules, prompts, default_prompt_name, similarity, has_modules_json=False)

    entries = read_json(modules_path)
    if not isinstance(entries, list) or not entries:
        raise ModelConfigError(f"{modules_path}: expected a non-empty list of modules")
    parsed: list[ModuleConfig] = []
    for entry in sorted(entries, key=lambda e: int(e.get("idx", 0))):
        kind = module_kind(entry.get("type", ""), modules_path)
        folder = module_dir(root, entry.get("path", "") or "", modules_path)
        if kind == "Transformer":
            parsed.append(parse_transformer(folder))
        elif kind == "Pooling":
            config_path = folder / "config.json"
            dim, modes, include_prompt = parse_pooling(read_json(config_path), config_path)
            parsed.append(PoolingConfig(folder, dim, modes, include_prompt))
        elif kind == "Dense":
            config_path = folder / "config.json"
            parsed.append(parse_dense(read_json(config_path), folder, config_path))
        else:
            parsed.append(NormalizeConfig(folder))
    if not isinstance(parsed[0], TransformerConfig):
        raise ModelConfigError(f"{modules_path}: the first module must be a Transformer")
    if sum(isinstance(m, TransformerConfig) for m in parsed) != 1:
        raise ModelConfigError(f"{modules_path}: exactly one Transformer module is supported")
    return ModelConfig(root, tuple(parsed), prompts, default_prompt_name, similarity)
