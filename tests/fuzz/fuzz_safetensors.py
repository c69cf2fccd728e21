"""Fuzz the safetensors reader: a whole file (header and data) opened with SafetensorsFile,
every tensor read and viewed, as the converter and the model's backbone loading do."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from edgemoe.errors import EdgeMoEError
    from edgemoe.format.safetensors import SafetensorsFile

from common import model_arg, run, scratch_dir

_, ARGV = model_arg(sys.argv)
PATH = scratch_dir() / "fuzz.safetensors"


@atheris.instrument_func
def one_input(data: bytes) -> None:
    PATH.write_bytes(data)
    try:
        st = SafetensorsFile(PATH)
        for name in st.names():
            st.read(name)
            st.view(name).sum()
            if st.shape(name) and st.shape(name)[0] > 0:
                st.read(name, 0)
    except EdgeMoEError:
        pass


if __name__ == "__main__":
    run(one_input, ARGV)
