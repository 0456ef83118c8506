"""What a model module is, as in sentence-transformers: a torch module that reads its own folder.

A module class owns everything about its kind of module:

- ``type_names``: the ``modules.json`` "type" strings that mean it (the registry's keys), old and new;
- ``config_file_names`` and ``config_key_renames``: its config file (legacy file names after the current
  one) and its legacy key names;
- ``read_config(folder)``: its keys parsed and validated into a frozen dataclass, with errors
  (ModelConfigError) that name the file and the key; no weights are read, no model code is imported;
- ``check_files(config, context)``: the cheap checks of its other files (weights present, safe formats);
- ``__init__(config, context)``: the torch module, weights loaded;
- ``output_dim(input_dim)``, ``describe()`` and ``forward(features, **kwargs)``: features dict in, features
  dict out. Keyword arguments a module names in ``forward_kwargs`` (a route such as ``task="query"``)
  reach it through ModuleChain; the others never do.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.model.files import ModelConfigError, read_json

Features = dict[str, Any]  # tensors, plus plain values such as "prompt_length"


@dataclass(frozen=True)
class LoadContext:
    """What building a module may depend on besides its own config."""

    allow_pickle: bool = False  # load pickle checkpoints (.bin / .pt); refused by default


@dataclass(frozen=True)
class ModuleConfig:
    """A module's parsed config; each module class has a subclass holding its own keys."""

    path: Path  # the module's folder


class Module(nn.Module):
    """Base class of the model modules; see the module docstring for what a subclass defines."""

    type_names: ClassVar[tuple[str, ...]] = ()
    config_file_names: ClassVar[tuple[str, ...]] = ("config.json",)
    config_key_renames: ClassVar[dict[str, str]] = {}  # legacy key -> current key
    is_input_module: ClassVar[bool] = False  # turns token ids into features; first in the chain
    creates_sentence_embedding: ClassVar[bool] = False  # writes features["sentence_embedding"]
    forward_kwargs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: ModuleConfig, context: LoadContext | None = None) -> None:
        super().__init__()
        self.config = config

    # -- reading the folder (no weights) --------------------------------------------------------

    @classmethod
    def read_config_file(cls, folder: Path, *, required: bool = True) -> tuple[dict[str, Any], Path]:
        """The first non-empty file of ``config_file_names``, as sentence-transformers reads them.

        Legacy keys are renamed to the current ones. Returns ``({}, path of the first name)`` when no
        file has content, or raises when none exists and ``required``.
        """
        first = folder / cls.config_file_names[0]
        found = False
        for name in cls.config_file_names:
            path = folder / name
            if not path.is_file():
                continue
            found = True
            config = read_json(path)
            if not isinstance(config, dict):
                raise ModelConfigError(f"{path}: expected a JSON object")
            if config:
                for old, new in cls.config_key_renames.items():
                    if old in config and new not in config:
                        config[new] = config.pop(old)
                return config, path
        if required and not found:
            raise ModelConfigError(f"{first}: file not found")
        return {}, first

    @classmethod
    def read_config(cls, folder: Path) -> ModuleConfig:
        """Parse and validate this module's config files in ``folder``."""
        return ModuleConfig(path=folder)

    @classmethod
    def check_files(cls, config: ModuleConfig, context: LoadContext) -> None:
        """Cheap checks of the module's other files, without loading them (none by default)."""

    @classmethod
    def load(cls, folder: Path, context: LoadContext | None = None) -> Module:
        """Read the folder and build the module."""
        return cls(cls.read_config(folder), context or LoadContext())

    # -- the module -----------------------------------------------------------------------------

    def output_dim(self, input_dim: int | None) -> int | None:
        """Size of the embedding this module leaves, given the size it receives (unchanged by default)."""
        return input_dim

    def describe(self) -> dict[str, Any]:
        """The module's settings, JSON-serializable, for `embedpipe inspect`."""
        return {}

    def forward(self, features: Features, **kwargs: Any) -> Features:
        raise NotImplementedError

    # -- helpers for modules with weights -------------------------------------------------------

    def load_weights(self, folder: Path, allow_pickle: bool) -> None:
        """Load ``model.safetensors`` (or, when allowed, a pickle checkpoint) into this module."""
        check_weights(folder, allow_pickle)
        what = type(self).__name__
        safetensors_file = folder / "model.safetensors"
        if safetensors_file.exists():
            from safetensors.torch import load_file

            weights_file = safetensors_file
            read = load_file
        else:
            weights_file = next(iter(sorted(folder.glob("*.bin"))), None)
            read = partial(torch.load, map_location="cpu", weights_only=True)
        try:
            state = read(str(weights_file))
        except Exception as exc:  # a corrupt or truncated file
            raise ModelConfigError(
                f"{weights_file}: cannot read the {what} weights ({type(exc).__name__}: {exc})"
            ) from None
        try:
            self.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelConfigError(f"{folder}: {what} weights do not match its config.json ({exc})") from None


class ModuleChain(nn.ModuleList):
    """The modules in ``modules.json`` order; each gets only the keyword arguments it declares."""

    def __init__(self, modules: Iterable[Module]) -> None:
        super().__init__(modules)

    def forward(self, features: Features, **kwargs: Any) -> Features:
        for module in self:
            wanted = {key: value for key, value in kwargs.items() if key in module.forward_kwargs}
            features = module(features, **wanted)
        return features

    def output_dim(self) -> int | None:
        dim: int | None = None
        for module in self:
            dim = module.output_dim(dim)
        return dim


# -- checks shared by the modules -------------------------------------------------------------------


def read_config_json(folder: Path, name: str = "config.json") -> dict:
    """A JSON object from ``folder``, or {} when the file is absent."""
    path = folder / name
    return read_json(path) if path.exists() else {}


def check_no_remote_code(folder: Path, hf_config: dict) -> None:
    """A model or tokenizer config naming code to import (auto_map) is refused: it is never run."""
    for name, config in (
        ("config.json", hf_config),
        ("tokenizer_config.json", read_config_json(folder, "tokenizer_config.json")),
    ):
        if config.get("auto_map"):
            raise ModelConfigError(
                f"{folder / name}: auto_map asks for remote code; embedpipe never runs code shipped with a model"
            )


def check_weights(folder: Path, allow_pickle: bool) -> None:
    """Safetensors only, unless the user explicitly opts in to pickle checkpoints."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickles and not allow_pickle:
        raise ModelConfigError(
            f"{folder / pickles[0]}: pickle checkpoint refused (it can run arbitrary code when loaded); "
            "convert it to safetensors or pass allow_pickle=True / --allow-pickle if you trust it"
        )
    if not pickles:
        raise ModelConfigError(f"{folder}: no model weights (expected model.safetensors)")


def int_key(config: dict[str, Any], key: str, where: Path, *, default: int | None = None) -> int | None:
    """``config[key]`` as a positive int (``default`` when absent); errors name the file and key."""
    value = config.get(key)
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number <= 0:
        raise ModelConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
    return number
