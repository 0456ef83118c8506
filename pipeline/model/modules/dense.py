"""Dense: a linear layer and a torch.nn activation applied to one feature (the sentence embedding by default).

Config: ``config.json`` with ``in_features``, ``out_features``, ``bias``, ``activation_function`` (a
``torch.nn`` class path; Tanh when absent, as in sentence-transformers), ``use_residual`` (add the
input, projected when the sizes differ) and, from sentence-transformers 6, ``module_input_name`` /
``module_output_name`` (the feature it reads and writes, e.g. ``token_embeddings`` before Pooling; the
output defaults to the input). Other keys are ignored, as sentence-transformers ignores them.
Weights: ``model.safetensors`` (pickle only on request). Only ``torch.nn`` module classes are accepted
as activations, by name: no code is imported from the model's files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from pipeline.model.files import ModelConfigError
from pipeline.model.modules.base import (
    Features,
    LoadContext,
    Module,
    ModuleConfig,
    check_weights,
    int_key,
    require,
    str_key,
)

DEFAULT_ACTIVATION = "torch.nn.modules.activation.Tanh"


@dataclass(frozen=True)
class DenseConfig(ModuleConfig):
    in_features: int = 0
    out_features: int = 0
    bias: bool = True
    activation: str = "Tanh"  # a torch.nn class name, e.g. "Tanh" or "Identity"
    use_residual: bool = False  # add the input (projected when in != out) to the output
    module_input_name: str = "sentence_embedding"  # the feature it reads
    module_output_name: str = "sentence_embedding"  # the feature it writes


class Dense(Module):
    """Linear layer + a torch.nn activation, applied to the sentence embedding."""

    type_names: ClassVar[tuple[str, ...]] = (
        "sentence_transformers.models.Dense",  # written by sentence-transformers <= 5.3
        "sentence_transformers.base.modules.dense.Dense",  # written by >= 5.4
        "sentence_transformers.base.modules.Dense",  # the import paths of >= 5.4
        "sentence_transformers.sentence_transformer.modules.Dense",
    )

    config: DenseConfig

    @classmethod
    def read_config(cls, folder: Path) -> DenseConfig:
        config, where = cls.read_config_file(folder)
        activation = config.get("activation_function", DEFAULT_ACTIVATION)
        activation = str(activation or "torch.nn.modules.linear.Identity")
        class_name = activation.rsplit(".", 1)[-1]
        if not activation.startswith("torch.nn.") or not is_torch_nn_module_class(class_name):
            raise ModelConfigError(
                f"{where}: activation_function {activation!r} is not a torch.nn activation class; "
                "only torch.nn modules are accepted (no code is imported from model files)"
            )
        check_builds_without_arguments(class_name, where)
        for key in ("in_features", "out_features"):
            if key not in config:
                raise ModelConfigError(f"{where}: missing key {key!r}")
        input_name = str_key(config, "module_input_name", where) or "sentence_embedding"
        return DenseConfig(
            path=folder,
            in_features=int_key(config, "in_features", where),
            out_features=int_key(config, "out_features", where),
            bias=bool(config.get("bias", True)),
            activation=class_name,
            use_residual=bool(config.get("use_residual", False)),
            module_input_name=input_name,
            module_output_name=str_key(config, "module_output_name", where) or input_name,
        )

    @classmethod
    def flow(cls, config: ModuleConfig, available: frozenset[str], where: str) -> frozenset[str]:
        assert isinstance(config, DenseConfig)
        require(config.module_input_name, available, where, "Dense")
        return available | {config.module_output_name}

    @classmethod
    def check_files(cls, config: ModuleConfig, context: LoadContext) -> None:
        check_weights(config.path, context.allow_pickle)

    def __init__(self, config: DenseConfig, context: LoadContext | None = None) -> None:
        super().__init__(config, context)
        context = context or LoadContext()
        self.linear = nn.Linear(config.in_features, config.out_features, bias=config.bias)
        self.activation = getattr(nn, config.activation)()
        self.use_residual = config.use_residual
        if self.use_residual and config.in_features != config.out_features:
            self.residual = nn.Linear(config.in_features, config.out_features, bias=False)
        self.load_weights(config.path, context.allow_pickle)

    def output_dim(self, input_dim: int | None) -> int | None:
        if self.config.module_output_name != "sentence_embedding":
            return input_dim  # a token-level Dense: the Pooling after it sets the size
        return self.config.out_features

    def describe(self) -> dict[str, Any]:
        config = self.config
        return {
            "in_features": config.in_features,
            "out_features": config.out_features,
            "bias": config.bias,
            "activation_function": f"torch.nn.{config.activation}",
            "use_residual": config.use_residual,
            "module_input_name": config.module_input_name,
            "module_output_name": config.module_output_name,
        }

    def forward(self, features: Features, **kwargs: Any) -> Features:
        x = features[self.config.module_input_name]
        out = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (self.residual(x) if hasattr(self, "residual") else x)
        features[self.config.module_output_name] = out
        return features


def is_torch_nn_module_class(name: str) -> bool:
    candidate = getattr(nn, name, None)
    return isinstance(candidate, type) and issubclass(candidate, nn.Module)


def check_builds_without_arguments(class_name: str, where: Path) -> None:
    """sentence-transformers builds the activation without arguments; a class that needs some is refused."""
    try:
        getattr(nn, class_name)()
    except TypeError as exc:
        raise ModelConfigError(
            f"{where}: activation_function torch.nn.{class_name} cannot be built without arguments ({exc})"
        ) from None
