"""`edgemoe chat` driven through its standard input: replies stream with the model's chat
template (each the Python API's reply to the conversation so far, same seed), /stats prints the
runtime's statistics, /reset forgets the conversation, end of input ends it."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import edgemoe
from edgemoe.converters.convert import convert

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("chatcli")
    shutil.copytree(tiny_checkpoint("mixtral"), root / "hf")
    (root / "hf" / "chat_template.jinja").write_text(TEMPLATE)
    convert(root / "hf", root / "model", bits=8, progress=False)
    return root / "model"


def api_reply(m, messages, n):
    ids = m.encode_chat(messages)
    steps = m.stream(ids, max_new_tokens=n, temperature=1.0, top_p=1.0, seed=3, stop=m.chat_template.stop)
    return "".join(s.text for s in steps)


def test_chat_streams_replies_and_obeys_commands(model_dir):
    session = "hello robot\nwhere is the river?\n/stats\n/reset\nhello robot\n/nope\n"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgemoe.cli",
            "chat",
            str(model_dir),
            "--temperature",
            "1",
            "--top-p",
            "1",
            "--seed",
            "3",
            "-n",
            "8",
            "--memory-budget",
            "60KB",
            "--system",
            "Be brief.",
        ],
        input=session,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "chat template: model:default" in r.stderr and "/reset" in r.stderr
    m = edgemoe.load(model_dir)
    system = {"role": "system", "content": "Be brief."}
    first = api_reply(m, [system, {"role": "user", "content": "hello robot"}], 8)
    second = api_reply(
        m,
        [
            system,
            {"role": "user", "content": "hello robot"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "where is the river?"},
        ],
        8,
    )
    assert first and second != first
    turns = r.stdout.split("> ")
    assert turns[0] == "" and turns[1] == first + "\n" and turns[2] == second + "\n"
    assert "decode" in turns[3] and "expert cache" in turns[3] and "hit rate" in turns[3]
    assert turns[4] == "[conversation forgotten]\n"
    assert turns[5] == first + "\n"  # after /reset the same question gets the first answer again
    assert turns[6].startswith("[unknown command /nope]")
    assert turns[7] == "\n"  # end of input
