"""What a model module is, as in sentence-transformers: a torch module that reads its own folder.

A module class owns everything about its kind of module:

- ``type_names``: the ``modules.json`` "type" strings that mean it (the registry's keys), old and new;
- ``config_file_names`` and ``config_key_renames``: its config file (legacy file names after the current
  one) and its legacy key names;
- ``read_config(folder)``: its keys parsed and validated into a frozen dataclass, with errors
  (ModelConfigError) that name the file and the key; no weights are read, no model code is imported;
- ``check_files(config, context)``: the cheap checks of its other files (weights present, safe formats);
- ``__init__(config, context)``: the torch module, weights loaded;
- ``flow(config, available, where)``: which features (``token_embeddings``, ``sentence_embedding``, ...) it
  reads and writes, checked for the whole chain when the model directory is read, so a module reading a
  feature nothing produced is refused before any weights load;
- ``output_dim(input_dim)``, ``describe()`` and ``forward(features, **kwargs)``: features dict in, features
  dict out. Keyword arguments a module names in ``forward_kwargs`` (a route such as ``task="query"``)
  reach it through ModuleChain; the others never do.

Input modules (Transformer, StaticEmbedding, Router) also turn texts into token ids: ``tokenize(texts,
prompt, task)`` gives a :class:`Tokenized` (unpadded, in input order) and ``collate(tokens, indices)`` one
batch of model inputs, so tokenizing (on a background thread) and encoding stay separate steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.model.files import ModelConfigError, read_json

Features = dict[str, Any]  # tensors, plus plain values such as "prompt_length"


@dataclass(frozen=True)
class LoadContext:
    """What building a module may depend on besides its own config."""

    allow_pickle: bool = False  # load pickle checkpoints (.bin / .pt); refused by default
    dtype: torch.dtype | None = (
        None  # load the weights in this dtype (None: as saved, like transformers' "auto")
    )


@dataclass
class Tokenized:
    """Token ids of the texts (prompt included), in input order, not padded.

    ``task`` is the role the texts were tokenized for ("query", "document" or None) and ``route`` the
    Router route that tokenized them (None without a Router); encoding uses the same ones.
    """

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    prompt_length: int = 0
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    task: str | None = None
    route: str | None = None


@dataclass(frozen=True)
class ModuleConfig:
    """A module's parsed config; each module class has a subclass holding its own keys."""

    path: Path  # the module's folder


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


class Module(nn.Module):
    """Base class of the model modules; see the module docstring for what a subclass defines."""

    type_names: ClassVar[tuple[str, ...]] = ()
    config_file_names: ClassVar[tuple[str, ...]] = ("config.json",)
    config_key_renames: ClassVar[dict[str, str]] = {}  # legacy key -> current key
    is_input_module: ClassVar[bool] = False  # turns texts into features; first in the chain
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

    @classmethod
    def flow(cls, config: ModuleConfig, available: frozenset[str], where: str) -> frozenset[str]:
        """The features present after this module, given those present before it (unchanged by default).

        Raises a ModelConfigError naming ``where`` (the file and module) when a feature it reads is absent.
        """
        return available

    @classmethod
    def sub_specs(cls, config: ModuleConfig) -> Sequence[Any]:
        """The module specs nested in this one (a Router's routes); none by default."""
        return ()

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
        what = type(self).__name__
        state = read_weights(folder, allow_pickle, what)
        try:
            self.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelConfigError(f"{folder}: {what} weights do not match its config.json ({exc})") from None


def read_weights(folder: Path, allow_pickle: bool, what: str) -> dict[str, Tensor]:
    """The tensors of ``model.safetensors`` (or, when allowed, of a pickle checkpoint) in ``folder``."""
    check_weights(folder, allow_pickle)
    safetensors_file = folder / "model.safetensors"
    if safetensors_file.exists():
        from safetensors.torch import load_file

        weights_file = safetensors_file
        read = load_file
    else:
        weights_file = next(iter(sorted(folder.glob("*.bin"))), None)
        read = partial(torch.load, map_location="cpu", weights_only=True)
    try:
        return read(str(weights_file))
    except Exception as exc:  # a corrupt or truncated file
        raise ModelConfigError(
            f"{weights_file}: cannot read the {what} weights ({type(exc).__name__}: {exc})"
        ) from None


def require(feature: str, available: frozenset[str], where: str, what: str) -> None:
    """A module reading ``feature`` is refused when no module before it wrote it."""
    if feature not in available:
        produced = ", ".join(sorted(available)) or "nothing"
        raise ModelConfigError(
            f"{where}: {what} reads the feature {feature!r}, which no module before it produces "
            f"(available: {produced})"
        )


def chain_flow(specs: Sequence[ModuleSpec], available: frozenset[str], where: str) -> frozenset[str]:
    """The features after ``specs`` run in order; the first module reading a missing feature is refused."""
    for spec in specs:
        folder = spec.path.name or str(spec.path)
        available = spec.module_class.flow(
            spec.config, available, f"{where}: {spec.module_class.__name__} module {folder!r}"
        )
    return available


class InputModule(Module):
    """The first module: texts -> token ids (``tokenize``), a batch of them -> tensors (``collate``)."""

    is_input_module: ClassVar[bool] = True

    @property
    def max_seq_length(self) -> int | None:
        """Longest input in tokens (prompt and special tokens included); None when unlimited."""
        return None

    @property
    def tokenizer(self) -> Any:
        return None

    def tokenize(self, texts: Sequence[str], prompt: str = "", task: str | None = None) -> Tokenized:
        raise NotImplementedError

    def collate(self, tokens: Tokenized, indices: np.ndarray) -> dict[str, Tensor]:
        """One batch of the model's inputs (CPU tensors) for the texts at ``indices``."""
        raise NotImplementedError

    def prompt_length(self, prompt: str, task: str | None = None) -> int:
        """Tokens the prompt occupies at the start of each text (for Pooling's include_prompt=False)."""
        return 0


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


def str_key(config: dict[str, Any], key: str, where: Path, *, default: str | None = None) -> str | None:
    """``config[key]`` as a non-empty string (``default`` when absent or null); errors name the file and key."""
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or not value:
        raise ModelConfigError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value
