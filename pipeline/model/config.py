"""Read a sentence-transformers model directory: its module list and its model-level settings.

``modules.json`` lists the modules; each entry's "type" picks a module class from the registry
(pipeline/model/modules/registry.py) and that class reads its own folder. Which feature each module
reads and writes is checked along the chain, so a model that could not produce a sentence embedding is
refused here. ``config_sentence_transformers.json`` holds the prompts (sentence-transformers always adds
empty "query" and "document" ones), ``default_prompt_name``, ``similarity_fn_name`` and ``truncate_dim``.

A directory without ``modules.json`` is loaded as sentence-transformers 6.2 loads it: a Transformer
(nothing read from sentence_bert_config.json or config_sentence_transformers.json) and a Pooling,
``lasttoken`` for a ``*ForCausalLM`` architecture (unless its config says ``is_causal: false``), ``mean``
otherwise. Nothing here loads weights or imports code from the model.

Roles: ``resolve_role`` / ``choose_prompt`` pick the prompt and the route for texts encoded as queries or
documents exactly as ``SentenceTransformer.encode_query`` / ``encode_document`` do.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.model.files import ModelConfigError, read_json
from pipeline.model.modules import (
    MODULE_CLASSES,
    ModuleConfig,
    ModuleSpec,
    NormalizeConfig,
    Pooling,
    PoolingConfig,
    RouterConfig,
    Transformer,
    TransformerConfig,
    module_class,
)
from pipeline.model.modules.base import chain_flow
from pipeline.model.similarity import SIMILARITY_FUNCTIONS

__all__ = [
    "ROLES",
    "ModelConfig",
    "ModelConfigError",
    "ModuleSpec",
    "RoleSettings",
    "choose_prompt",
    "load_model_config",
    "read_json",
    "resolve_role",
]

ROLES = ("query", "document")
# sentence-transformers' encode_document takes the first of these prompts the model defines.
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")
# sentence-transformers always defines these (empty unless the model sets them).
DEFAULT_PROMPTS = {"query": "", "document": ""}
ST_MODEL_TYPE = "SentenceTransformer"
ROLE_KWARGS = {"task", "modality"}  # the forward arguments sentence-transformers passes by itself


@dataclass(frozen=True)
class RoleSettings:
    """How texts of one role are encoded: the prompt prepended (or the chat system message), the ``task``
    the modules see (a Router's route, a Transformer's query_length / document_length, a chat template's
    ``task`` variable) and the Router route it selects (None without a Router)."""

    prompt: str
    task: str | None
    route: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    root: Path
    modules: tuple[ModuleSpec, ...]
    prompts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PROMPTS))
    default_prompt_name: str | None = None
    similarity_fn_name: str = "cosine"
    has_modules_json: bool = True
    truncate_dim: int | None = None  # config_sentence_transformers.json's
    fallback: str | None = None  # for a directory without modules.json: what was assumed, in words

    def all_specs(self) -> list[ModuleSpec]:
        """Every module spec, a Router's sub-modules (default route first) before the modules after it."""
        found: list[ModuleSpec] = []
        for spec in self.modules:
            if isinstance(spec.config, RouterConfig):
                router = spec.config
                order = (
                    [router.default_route, *router.structure]
                    if router.default_route
                    else list(router.structure)
                )
                for route in dict.fromkeys(order):
                    found += [s for s in router.route_specs(route) if s not in found]
            else:
                found.append(spec)
        return found

    def config_of(self, cls: type) -> ModuleConfig | None:
        """The config of the first module of class ``cls``, if any (inside a Router: its default route's)."""
        return next((m.config for m in self.all_specs() if issubclass(m.module_class, cls)), None)

    @property
    def transformer(self) -> TransformerConfig | None:
        return self.config_of(Transformer)  # type: ignore[return-value]

    @property
    def pooling(self) -> PoolingConfig | None:
        return self.config_of(Pooling)  # type: ignore[return-value]

    @property
    def router(self) -> RouterConfig | None:
        first = self.modules[0].config
        return first if isinstance(first, RouterConfig) else None

    @property
    def normalized(self) -> bool:
        """True when the last module touching the sentence embedding is a Normalize (in every route)."""
        return normalized_chain(self.modules)

    def role(
        self, role: str | None, prompt_name: str | None = None, prompt: str | None = None
    ) -> RoleSettings:
        return resolve_role(self, role, prompt_name, prompt)


def normalized_chain(specs: tuple[ModuleSpec, ...] | list[ModuleSpec], normalized: bool = False) -> bool:
    """Whether the sentence embedding leaves ``specs`` L2-normalized: a Normalize wrote it last."""
    for spec in specs:
        if isinstance(spec.config, RouterConfig):
            router = spec.config
            normalized = all(normalized_chain(router.route_specs(r), normalized) for r in router.structure)
        elif isinstance(spec.config, NormalizeConfig):
            normalized = normalized or spec.config.module_output_name == "sentence_embedding"
        elif spec.module_class is not Transformer:
            # Pooling, StaticEmbedding, LayerNorm and a Dense writing the sentence embedding change it
            normalized = normalized and getattr(spec.config, "module_output_name", "") not in (
                "",
                "sentence_embedding",
            )
    return normalized


def choose_prompt(
    model: ModelConfig, prompt_name: str | None = None, prompt: str | None = None, role: str | None = None
) -> str:
    """The prompt sentence-transformers uses: an explicit prompt wins, then a prompt name, then (for a role)
    the role's prompt ("query"; "document", "passage" or "corpus"), then the default prompt, else none."""
    if role is not None:
        check_role(role)
    if prompt is not None:
        return prompt
    if prompt_name is None and role == "query" and "query" in model.prompts:
        prompt_name = "query"
    if prompt_name is None and role == "document":
        prompt_name = next((name for name in DOCUMENT_PROMPT_NAMES if name in model.prompts), None)
    if prompt_name is not None:
        if prompt_name not in model.prompts:
            known = ", ".join(sorted(model.prompts)) or "none"
            raise ValueError(f"prompt name {prompt_name!r} is not defined by the model (defined: {known})")
        return model.prompts[prompt_name]
    if model.default_prompt_name is not None:
        return model.prompts.get(model.default_prompt_name, "")
    return ""


def check_role(role: str | None) -> None:
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)} (or none), got {role!r}")


def resolve_role(
    model: ModelConfig, role: str | None, prompt_name: str | None = None, prompt: str | None = None
) -> RoleSettings:
    """The prompt, task and route for texts of ``role`` (None: plain ``encode``), as sentence-transformers'
    ``encode`` / ``encode_query`` / ``encode_document``. A Router without a route for the role is a
    ValueError, as there."""
    check_role(role)
    text = choose_prompt(model, prompt_name, prompt, role)
    router = model.router
    return RoleSettings(prompt=text, task=role, route=router.resolve(role) if router else None)


def module_dir(root: Path, relative: str, where: Path) -> Path:
    """Resolve a module folder and refuse paths that escape the model directory."""
    resolved = (root / relative).resolve()
    if resolved != root.resolve() and root.resolve() not in resolved.parents:
        raise ModelConfigError(f"{where}: module path {relative!r} escapes the model directory")
    return resolved


def parse_st_config(root: Path) -> dict[str, Any]:
    """Prompts, default prompt name, similarity function and truncate_dim from config_sentence_transformers.json."""
    path = root / "config_sentence_transformers.json"
    config = read_json(path) if path.exists() else {}
    if not isinstance(config, dict):
        raise ModelConfigError(f"{path}: expected a JSON object")
    model_type = config.get("model_type", ST_MODEL_TYPE)
    if model_type != ST_MODEL_TYPE:
        raise ModelConfigError(
            f"{path}: model_type {model_type!r} is not a SentenceTransformer model (sentence-transformers would "
            "replace its modules by a plain Transformer + Pooling); embedpipe encodes SentenceTransformer models"
        )
    saved = config.get("prompts") or {}
    if not isinstance(saved, dict) or not all(v is None or isinstance(v, str) for v in saved.values()):
        raise ModelConfigError(f"{path}: prompts must map names to strings")
    prompts = dict(DEFAULT_PROMPTS)
    prompts.update({name: text or "" for name, text in saved.items()})
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
    truncate_dim = config.get("truncate_dim")
    if truncate_dim is not None and (
        isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int) or truncate_dim <= 0
    ):
        raise ModelConfigError(f"{path}: truncate_dim must be a positive integer, got {truncate_dim!r}")
    return {
        "prompts": prompts,
        "default_prompt_name": default_prompt_name,
        "similarity_fn_name": similarity,
        "truncate_dim": truncate_dim,
    }


def default_modules(root: Path) -> tuple[tuple[ModuleSpec, ...], str]:
    """A directory without modules.json: Transformer + Pooling over its hidden size, as sentence-transformers 6.2
    builds it (``lasttoken`` for a causal LM, ``mean`` otherwise); and that choice in words."""
    hf_config = read_json(root / "config.json") if (root / "config.json").exists() else {}
    if not isinstance(hf_config, dict):
        raise ModelConfigError(f"{root / 'config.json'}: expected a JSON object")
    architectures = hf_config.get("architectures") or []
    causal = (
        bool(architectures)
        and str(architectures[0]).endswith("ForCausalLM")
        and hf_config.get("is_causal", True)
    )
    mode = "lasttoken" if causal else "mean"
    transformer = Transformer.fallback_config(root)
    pooling = PoolingConfig(path=root, embedding_dimension=Transformer.hidden_size(root), modes=(mode,))
    why = (
        f"{architectures[0]} is a causal LM"
        if causal
        else f"{architectures[0] if architectures else 'the model'} is not a causal LM"
    )
    fallback = f"no modules.json: Transformer + {mode} pooling ({why}), as sentence-transformers 6.2 loads it"
    return (ModuleSpec(Transformer, transformer), ModuleSpec(Pooling, pooling)), fallback


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
        kwargs = entry.get("kwargs") or []
        extra = sorted(set(kwargs) - ROLE_KWARGS) if isinstance(kwargs, list) else kwargs
        if extra:
            raise ModelConfigError(
                f"{modules_path}: module {entry.get('name', entry.get('idx'))!r} ({type_name}) declares forward "
                f"argument(s) {extra} that embedpipe cannot pass (only the role, as 'task')"
            )
        cls = module_class(type_name, modules_path)
        folder = module_dir(root, entry.get("path", "") or "", modules_path)
        specs.append(ModuleSpec(cls, cls.read_config(folder), type_name))
    input_names = " / ".join(c.__name__ for c in MODULE_CLASSES if c.is_input_module)
    if not specs[0].module_class.is_input_module:
        raise ModelConfigError(f"{modules_path}: the first module must be a {input_names}")
    if sum(spec.module_class.is_input_module for spec in specs) != 1:
        raise ModelConfigError(f"{modules_path}: exactly one {input_names} module is supported")
    check_sentence_embedding(specs, str(modules_path))
    return tuple(specs)


def check_sentence_embedding(specs: list[ModuleSpec] | tuple[ModuleSpec, ...], where: str) -> None:
    if "sentence_embedding" not in chain_flow(specs, frozenset(), where):
        raise ModelConfigError(
            f"{where}: no module produces a sentence embedding (no Pooling after the Transformer)"
        )


def load_model_config(root: str | Path) -> ModelConfig:
    """Read a model directory; a plain Hugging Face directory becomes Transformer + Pooling as in 6.2."""
    root = Path(root)
    if not root.is_dir():
        raise ModelConfigError(f"{root}: not a model directory")
    if not (root / "modules.json").exists():
        modules, fallback = default_modules(root)
        warnings.warn(f"{root}: {fallback}", stacklevel=2)
        return ModelConfig(root, modules, has_modules_json=False, fallback=fallback)
    return ModelConfig(root, read_modules(root), **parse_st_config(root))
