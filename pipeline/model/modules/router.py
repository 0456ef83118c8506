"""Router: one module chain per route ("query", "document", ...), chosen by the role, as sentence-transformers.

Config: ``router_config.json`` (or, for the ``Asym`` module of older releases, ``config.json``) with
``types`` (sub-module id -> modules.json-style type), ``structure`` (route -> sub-module ids, in order;
a sub-module may serve several routes) and ``parameters`` (``default_route``, ``allow_empty_key``,
``route_mappings``). Each sub-module reads its own folder ``<router folder>/<id>``; each route starts
with an input module (Transformer or StaticEmbedding). The route for a role follows sentence-transformers'
rules: ``route_mappings`` for (role, "text"), then (role, any), (any, "text"), (any, any); then a route
named after the role or "text"; a role with no route is an error; no role takes the default route (the
first route when ``allow_empty_key`` and none is named).
"""

from __future__ import annotations

import ast
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import Tensor, nn

from pipeline.model.files import ModelConfigError
from pipeline.model.modules.base import (
    Features,
    InputModule,
    LoadContext,
    ModuleChain,
    ModuleConfig,
    ModuleSpec,
    Tokenized,
    chain_flow,
)

MODALITY = "text"  # embedpipe encodes texts: sentence-transformers infers this modality for strings


@dataclass(frozen=True)
class RouterConfig(ModuleConfig):
    modules: dict[str, ModuleSpec] = field(default_factory=dict)  # sub-module id -> spec
    structure: dict[str, tuple[str, ...]] = field(default_factory=dict)  # route -> sub-module ids
    default_route: str | None = None
    route_mappings: dict[tuple[str | None, str | None], str] = field(default_factory=dict)
    source: Path | None = None

    def route_specs(self, route: str) -> list[ModuleSpec]:
        return [self.modules[module_id] for module_id in self.structure[route]]

    def resolve(self, task: str | None) -> str:
        """The route for texts of role ``task`` (None: no role), or a ValueError as sentence-transformers."""
        mappings = self.route_mappings
        for key in ((task, MODALITY), (task, None), (None, MODALITY), (None, None)):
            if key in mappings:
                return mappings[key]
        if task and task in self.structure:
            return task
        if MODALITY in self.structure:
            return MODALITY
        if task is not None:
            raise ValueError(
                f"{self.source}: no Router route for role {task!r} (routes: {', '.join(self.structure)})"
            )
        if self.default_route is None:
            raise ValueError(
                f"{self.source}: the Router has no default route; encode with a role "
                f"(routes: {', '.join(self.structure)})"
            )
        return self.default_route


class Router(InputModule):
    """Routes each batch through the chain of its role's route."""

    type_names: ClassVar[tuple[str, ...]] = (
        "sentence_transformers.models.Router",  # written by sentence-transformers 4.x to 5.3
        "sentence_transformers.models.Asym",  # written by <= 3.x
        "sentence_transformers.base.modules.router.Router",  # written by >= 5.4
        "sentence_transformers.base.modules.Router",  # the import paths of >= 5.4
        "sentence_transformers.sentence_transformer.modules.Router",
        "sentence_transformers.sentence_transformer.modules.Asym",
    )
    config_file_names: ClassVar[tuple[str, ...]] = ("router_config.json", "config.json")
    forward_kwargs: ClassVar[frozenset[str]] = frozenset({"task"})

    config: RouterConfig

    @classmethod
    def read_config(cls, folder: Path) -> RouterConfig:
        from pipeline.model.modules.registry import module_class  # the registry imports this module

        config, where = cls.read_config_file(folder)
        types, structure = config.get("types"), config.get("structure")
        if not isinstance(types, dict) or not isinstance(structure, dict) or not structure:
            raise ModelConfigError(
                f"{where}: expected 'types' (id -> type) and a non-empty 'structure' (route -> ids)"
            )
        modules: dict[str, ModuleSpec] = {}
        for module_id, type_name in types.items():
            sub_folder = sub_module_dir(folder, module_id, where)
            sub_class = module_class(type_name, where)
            if sub_class is Router:
                raise ModelConfigError(
                    f"{where}: module {module_id!r}: a Router inside a Router is not supported"
                )
            modules[module_id] = ModuleSpec(sub_class, sub_class.read_config(sub_folder), type_name)
        routes: dict[str, tuple[str, ...]] = {}
        for route, ids in structure.items():
            if not isinstance(ids, list) or not ids:
                raise ModelConfigError(f"{where}: route {route!r} must list its module ids")
            missing = [i for i in ids if i not in modules]
            if missing:
                raise ModelConfigError(
                    f"{where}: route {route!r} names module(s) {missing} missing from 'types'"
                )
            if not modules[ids[0]].module_class.is_input_module:
                raise ModelConfigError(
                    f"{where}: route {route!r} must start with a Transformer or StaticEmbedding, "
                    f"not {modules[ids[0]].module_class.__name__}"
                )
            later = [i for i in ids[1:] if modules[i].module_class.is_input_module]
            if later:
                raise ModelConfigError(f"{where}: route {route!r} has more than one input module ({later})")
            routes[str(route)] = tuple(ids)
        parameters = config.get("parameters") or {}
        unknown = sorted(set(parameters) - {"default_route", "allow_empty_key", "route_mappings"})
        if unknown:
            raise ModelConfigError(f"{where}: unknown Router parameter(s) {', '.join(map(repr, unknown))}")
        default_route = parameters.get("default_route")
        if default_route is not None and default_route not in routes:
            raise ModelConfigError(
                f"{where}: default_route {default_route!r} is not one of the routes {list(routes)}"
            )
        if parameters.get("allow_empty_key", True) and default_route is None:
            default_route = next(iter(routes))
        return RouterConfig(
            path=folder,
            modules=modules,
            structure=routes,
            default_route=default_route,
            route_mappings=read_route_mappings(parameters.get("route_mappings"), routes, where),
            source=where,
        )

    @classmethod
    def sub_specs(cls, config: ModuleConfig) -> Sequence[ModuleSpec]:
        assert isinstance(config, RouterConfig)
        return list(config.modules.values())

    @classmethod
    def check_files(cls, config: ModuleConfig, context: LoadContext) -> None:
        for spec in cls.sub_specs(config):
            spec.module_class.check_files(spec.config, context)

    @classmethod
    def flow(cls, config: ModuleConfig, available: frozenset[str], where: str) -> frozenset[str]:
        assert isinstance(config, RouterConfig)
        outputs = [
            chain_flow(config.route_specs(route), available, f"{config.source}: route {route!r}")
            for route in config.structure
        ]
        return frozenset.intersection(*outputs)

    def __init__(self, config: RouterConfig, context: LoadContext | None = None) -> None:
        super().__init__(config, context)
        context = context or LoadContext()
        built = {module_id: spec.load(context) for module_id, spec in config.modules.items()}
        self.routes = nn.ModuleDict(
            {route: ModuleChain(built[i] for i in ids) for route, ids in config.structure.items()}
        )
        dims = {route: chain.output_dim() for route, chain in self.routes.items()}
        if len(set(dims.values())) > 1:
            raise ModelConfigError(
                f"{config.source}: the routes give embeddings of different sizes ({dims}); embedpipe needs one size"
            )

    def route(self, task: str | None) -> str:
        return self.config.resolve(task)

    def input_module(self, route: str) -> InputModule:
        return self.routes[route][0]  # type: ignore[return-value]  # read_config checked it

    @property
    def tokenizer(self) -> Any:
        for route in self.routes:
            if (tokenizer := self.input_module(route).tokenizer) is not None:
                return tokenizer
        return None

    @property
    def max_seq_length(self) -> int | None:
        """The longest limit of the routes, as sentence-transformers reports it."""
        limits = [self.input_module(r).max_seq_length for r in self.routes]
        limits = [limit for limit in limits if limit]
        return max(limits) if limits else None

    def output_dim(self, input_dim: int | None) -> int | None:
        return next(iter(self.routes.values())).output_dim()

    def describe(self) -> dict[str, Any]:
        routes = {}
        for route, chain in self.routes.items():
            routes[route] = []
            for module_id, module in zip(self.config.structure[route], chain, strict=True):
                settings = {"id": module_id, "type": type(module).__name__, **module.describe()}
                if (param := next(module.parameters(), None)) is not None:
                    settings["dtype"] = str(param.dtype).removeprefix("torch.")
                routes[route].append(settings)
        mappings = {
            f"role={task!r}, modality={modality!r}": r
            for (task, modality), r in self.config.route_mappings.items()
        }
        return {
            "routes": routes,
            "default_route": self.config.default_route,
            "query_route": self.route_or_error("query"),
            "document_route": self.route_or_error("document"),
            **({"route_mappings": mappings} if mappings else {}),
        }

    def route_or_error(self, task: str) -> str | None:
        try:
            return self.route(task)
        except ValueError:
            return None

    def prompt_length(self, prompt: str, task: str | None = None) -> int:
        return self.input_module(self.route(task)).prompt_length(prompt, task)

    def tokenize(self, texts: Sequence[str], prompt: str = "", task: str | None = None) -> Tokenized:
        route = self.route(task)
        tokens = self.input_module(route).tokenize(texts, prompt, task)
        tokens.route = route
        return tokens

    def collate(self, tokens: Tokenized, indices: np.ndarray) -> dict[str, Tensor]:
        route = tokens.route if tokens.route is not None else self.route(tokens.task)
        return self.input_module(route).collate(tokens, indices)

    def forward(self, features: Features, task: str | None = None, **kwargs: Any) -> Features:
        return self.routes[self.route(task)](features, task=task)


def sub_module_dir(folder: Path, module_id: Any, where: Path) -> Path:
    """A sub-module's folder inside the Router's; ids that leave it are refused."""
    if not isinstance(module_id, str) or not module_id:
        raise ModelConfigError(f"{where}: module id {module_id!r} must be a folder name")
    resolved = (folder / module_id).resolve()
    if folder.resolve() not in resolved.parents:
        raise ModelConfigError(f"{where}: module path {module_id!r} escapes the model directory")
    return resolved


def read_route_mappings(
    value: Any, routes: dict[str, tuple[str, ...]], where: Path
) -> dict[tuple[str | None, str | None], str]:
    """``{"('query', None)": "query", ...}`` as sentence-transformers writes it; unparsable keys are skipped
    (with a warning) as it skips them."""
    if not value:
        return {}
    if not isinstance(value, dict):
        raise ModelConfigError(f"{where}: route_mappings must be an object, got {value!r}")
    mappings: dict[tuple[str | None, str | None], str] = {}
    for key, route in value.items():
        try:
            task, modality = ast.literal_eval(key)
        except (ValueError, SyntaxError, TypeError):
            warnings.warn(f"{where}: route_mappings key {key!r} cannot be read; skipped", stacklevel=2)
            continue
        if route not in routes:
            raise ModelConfigError(f"{where}: route_mappings maps {key} to {route!r}, which is not a route")
        if isinstance(modality, tuple | list):
            modality = tuple(sorted(modality))
        mappings[(task, modality)] = route
    return mappings
