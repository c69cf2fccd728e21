"""Fuzz the model config reader: config.json of a model directory or checkpoint as
`edgemoe info`, the converter and a loaded model read it (planning.fit.read_config, then
models.config_from_dict: the architecture's from_dict), and what the runtime sizes from it."""

from __future__ import annotations

import importlib
import sys

import atheris
from common import model_arg, run, scratch_dir

from edgemoe.errors import EdgeMoEError
from edgemoe.models import ALIASES, config_from_dict
from edgemoe.planning.fit import read_config

# The architecture modules load lazily (models.get): import them now, then instrument every
# loaded function in place (an editable install's import hook hides modules from instrument_imports)
for _module in sorted(set(ALIASES.values())):
    importlib.import_module(f"edgemoe.models.{_module}")
atheris.instrument_all()

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
