"""Fuzz the model config reader: config.json of a model directory or checkpoint as
`edgemoe info`, the converter and a loaded model read it (planning.fit.read_config, then
models.config_from_dict: the architecture's from_dict), and what the runtime sizes from it."""

from __future__ import annotations

import importlib
import inspect
import sys
from types import ModuleType

import atheris
from common import model_arg, run, scratch_dir

from edgemoe.errors import EdgeMoEError
from edgemoe.models import ALIASES, config_from_dict
from edgemoe.planning.fit import read_config


def instrument(module: ModuleType) -> None:
    """Instrument a module's own functions and methods in place: an editable install's import
    hook hides modules from atheris.instrument_imports, and instrument_all takes minutes."""
    for value in list(vars(module).values()):
        members = vars(value).values() if isinstance(value, type) else [value]
        for f in members:
            f = getattr(f, "__func__", f)  # classmethod, staticmethod
            if inspect.isfunction(f) and f.__module__ == module.__name__:
                atheris.instrument_func(f)


# the architecture modules load lazily (models.get): import them all first
for _name in ["models", "models.decoder", "models.blocks", "planning.fit"] + [
    f"models.{m}" for m in sorted(set(ALIASES.values()))
]:
    instrument(importlib.import_module(f"edgemoe.{_name}"))

MODEL, ARGV = model_arg(sys.argv)  # unused: the config needs no model beside it
DIR = scratch_dir()


@atheris.instrument_func
def one_input(data: bytes) -> None:
    (DIR / "config.json").write_bytes(data)
    try:
        cfg = config_from_dict(read_config(DIR), str(DIR))
        cfg.kv_values_per_token()
        cfg.attention_values_per_token()
        cfg.tensor_shapes()
    except EdgeMoEError:
        pass


if __name__ == "__main__":
    run(one_input, ARGV)
