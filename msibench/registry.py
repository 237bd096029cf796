"""Name -> method class, as lazy ``"module:Class"`` strings so listing never imports torch."""

from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from msibench.methods.base import Method

# Method modules keep torch/diffusers imports inside functions or in companion modules, so that
# constructing a method (cheap, no weights) and reading its capabilities stays light.
METHODS: dict[str, str] = {
    "paste": "msibench.methods.paste:PasteMethod",
    "ip-adapter": "baselines.ip_adapter:IPAdapterMethod",
    "lambda-eclipse": "baselines.lambda_eclipse:LambdaEclipseMethod",
    "ssr-encoder": "baselines.ssr_encoder:SSREncoderMethod",
    "customnet": "baselines.customnet:CustomNetMethod",
    "mscustomnet": "mscustomnet.adapter:MSCustomNetMethod",
    "qwen-image-edit": "baselines.qwen_image_edit:QwenImageEditMethod",
}


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this one is meant to be read
        return str(self.args[0])


class MethodUnavailableError(ImportError):
    """The method is registered but its module is not present in this installation."""


def resolve(name: str) -> type[Method]:
    """Import and return the class registered under ``name``."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=3, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownMethodError(f"unknown method {name!r}.{hint} Known methods: {', '.join(sorted(METHODS))}")
    module_name, _, class_name = METHODS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise MethodUnavailableError(f"method {name!r}: module {module_name} is not installed") from err
        raise
    try:
        return getattr(module, class_name)
    except AttributeError as err:
        raise MethodUnavailableError(f"method {name!r}: {module_name} has no class {class_name}") from err


def build(name: str, options: dict[str, Any] | None = None) -> Method:
    """Construct the method ``name`` with ``-M`` style options (cheap: no weights are loaded)."""
    return resolve(name)(**(options or {}))
