"""examples/openai_client.py against a live `edgemoe serve` of the default model: the official
openai client gets completions and chat completions, whole and streamed, with usage; the
streamed text is the whole one (same seed)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from serving import Served

from edgemoe.planning.default_model import default_model_path

EXAMPLE = Path(__file__).parent.parent / "examples" / "openai_client.py"


def test_openai_client_example_against_a_live_server():
    s = Served(default_model_path(progress=False), "--memory-budget", "10MB", "--api-key", "k3y")
    try:
        r = subprocess.run(
            [sys.executable, str(EXAMPLE), "--base-url", s.url + "/v1", "--api-key", "k3y", "--max-tokens", "24"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        s.stop()
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert re.search(r"^model: default-8bit-", out, re.M)
    whole = re.search(r"^completion: '(.*)'$", out, re.M)
    assert whole and whole.group(1)
    usages = re.findall(r"usage: (?:(\d+) prompt \+ )?(\d+) completion tokens", out)
    assert len(usages) == 4 and usages[0] == ("4", "24") and usages[1] == ("", "24"), usages
    streamed = out.split("streamed completion: ", 1)[1].split("\n  usage:", 1)[0]
    assert streamed == ast.literal_eval("'" + whole.group(1) + "'")  # the whole one is printed as a repr
    assert re.search(r"^chat: '.+' \((stop|length)\)$", out, re.M)
    assert int(usages[2][0]) > 10 and usages[3][0] == usages[2][0]
