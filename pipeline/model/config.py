"""Read a sentence-transformers model directory: its module list and its model-level settings.

``modules.json`` lists the modules; each entry's "type" picks a module class from the registry
(pipeline/model/modules/registry.py) and that class reads its own folder.
``config_sentence_transformers.json`` holds the prompts and the similarity function. A directory
without ``modules.json`` is a plain Hugging Face model: Transformer + mean pooling. Nothing here loads
weights or imports code from the model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.model.files import ModelConfigError, read_json
from pipeline.model.modules import (
    MODULE_CLASSES,
    LoadContext,
    Module,
    ModuleConfig,
    Normalize,
    Pooling,
    PoolingConfig,
    Transformer,
    TransformerConfig,
    module_class,
)
from pipeline.model.similarity import SIMILARITY_FUNCTIONS

__all__ = ["ModelConfig", "ModelConfigError", "ModuleSpec", "choose_prompt", "load_model_config", "read_json"]


@dataclass(frozen=True)
class ModuleSpec:
    """One module of the model, read: its class (from the registry) and its parsed config."""

    module_class: type[Module]
    config: ModuleConfig
    type_name: str = ""  # as written in modules.json; "" for the modules of a plain Hugging Face directory

    @property
    def path(self) -> Path:
        return self.config.path

    def load(self, context: LoadContext) -> Module:
        return self.module_class(self.config, context)


@dataclass(frozen=True)
class ModelConfig:
    root: Path
    modules: tuple[ModuleSpec, ...]
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    similarity_fn_name: str = "cosine"
    has_modules_json: bool = True

    def config_of(self, cls: type[Module]) -> ModuleConfig | None:
        """The config of the first module of class ``cls``, if any."""
        return next((m.config for m in self.modules if issubclass(m.module_class, cls)), None)

    @property
    def transformer(self) -> TransformerConfig:
        return self.config_of(Transformer)  # type: ignore[return-value]  # load_model_config checked it

    @property
    def pooling(self) -> PoolingConfig | None:
        return self.config_of(Pooling)  # type: ignore[return-value]

    @property
    def normalized(self) -> bool:
        return self.config_of(Normalize) is not None


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


def module_dir(root: Path, relative: str, where: Path) -> Path:
    """Resolve a module folder and refuse paths that escape the model directory."""
    resolved = (root / relative).resolve()
    if resolved != root.resolve() and root.resolve() not in resolved.parents:
        raise ModelConfigError(f"{where}: module path {relative!r} escapes the model directory")
    return resolved


def parse_st_config(root: Path) -> tuple[dict[str, str], str | None, str]:
    """Prompts, default prompt name and similarity function from config_sentence_transformers.json."""
    path = root / "config_sentence_transformers.json"
    config = read_json(path) if path.exists() else {}
    if not isinstance(config, dict):
        raise ModelConfigError(f"{path}: expected a JSON object")
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ModelConfigError(f"{path}: prompts must map names to strings")
    default_prompt_name = config.get("default_prompt_name")
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise ModelConfigError(
            f"{path}: default_prompt_name {default_prompt_name!r} is not one of the prompts"
        )
    similarity = config.get("similarity_fn_name") or "cosine"
    if similarity not in SIMILARITY_FUNCTIONS:
        raise ModelConfigError(
            f"{path}: similarity_fn_name {similarity!r} is not one of {', '.join(SIMILARITY_FUNCTIONS)}"
        )
    return dict(prompts), default_prompt_name, similarity


def default_modules(root: Path) -> tuple[ModuleSpec, ...]:
    """A directory without modules.json: Transformer + mean Pooling over its hidden size."""
    transformer = Transformer.read_config(root)
    pooling = PoolingConfig(path=root, embedding_dimension=Transformer.hidden_size(root), modes=("mean",))
    return ModuleSpec(Transformer, transformer), ModuleSpec(Pooling, pooling)


def read_modules(root: Path) -> tuple[ModuleSpec, ...]:
    """modules.json's entries in idx order, each read by the class the registry gives for its type."""
    modules_path = root / "modules.json"
    entries = read_json(modules_path)
    if not isinstance(entries, list) or not entries:
        raise ModelConfigError(f"{modules_path}: expected a non-empty list of modules")
    if not all(isinstance(entry, dict) for entry in entries):
        raise ModelConfigError(f"{modules_path}: every module entry must be an object with a type and a path")
    try:
        entries = sorted(entries, key=lambda e: int(e.get("idx", 0)))
    except (TypeError, ValueError):
        raise ModelConfigError(f"{modules_path}: every module's idx must be an integer") from None
    specs: list[ModuleSpec] = []
    for entry in entries:
        type_name = entry.get("type", "")
        cls = module_class(type_name, modules_path)
        folder = module_dir(root, entry.get("path", "") or "", modules_path)
        specs.append(ModuleSpec(cls, cls.read_config(folder), type_name))
    input_names = " / ".join(c.__name__ for c in MODULE_CLASSES if c.is_input_module)
    if not specs[0].module_class.is_input_module:
        raise ModelConfigError(f"{modules_path}: the first module must be a {input_names}")
    if sum(spec.module_class.is_input_module for spec in specs) != 1:
        raise ModelConfigError(f"{modules_path}: exactly one {input_names} module is supported")
    return tuple(specs)


def load_model_config(root: str | Path) -> ModelConfig:
    """Read a model directory; a plain Hugging Face directory becomes Transformer + mean pooling."""
    root = Path(root)
    if not root.is_dir():
        raise ModelConfigError(f"{root}: not a model directory")
    prompts, default_prompt_name, similarity = parse_st_config(root)
    if not (root / "modules.json").exists():
        warnings.warn(
            f"{root}: no modules.json; loading as a plain Hugging Face model with mean pooling",
            stacklevel=2,
        )
        return ModelConfig(
            root, default_modules(root), prompts, default_prompt_name, similarity, has_modules_json=False
        )
    return ModelConfig(root, read_modules(root), prompts, default_prompt_name, similarity)
