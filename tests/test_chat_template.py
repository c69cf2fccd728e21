"""Chat templates render as transformers' apply_chat_template renders them (text and token
ids), the converter keeps them in the model directory, and a model without one gets the
documented transcript fallback."""

from __future__ import annotations

import shutil

import pytest
import tiny

import edgemoe
from edgemoe.converters.convert import convert
from edgemoe.errors import ChatTemplateError
from edgemoe.runtime.chat import FALLBACK_STOP, ChatTemplate

# Written for these tests in the styles checkpoints use: ChatML with a default system prompt,
# [INST] blocks that refuse a bad role order, tools as JSON, loop controls and namespaces,
# and the {% generation %} marker.
CHATML = """{% for message in messages %}
{% if loop.first and message['role'] != 'system' %}<|im_start|>system
You are helpful.<|im_end|>
{% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

INST = """{{ bos_token }}{% for message in messages %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{% endif %}
{% if message['role'] == 'user' %}
{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}
{% else %}
{{ ' ' + message['content'] | trim + eos_token }}
{% endif %}
{% endfor %}"""

TOOLS = """{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- if tools -%}<tools>{{ tools | tojson }}</tools>
{% endif -%}
{%- for m in messages -%}
  {%- if m.role == 'system' and not loop.first -%}{%- continue -%}{%- endif -%}
  <{{ m.role }}{% if loop.index0 == ns.last_user %} last{% endif %}>{{ m.content }}</{{ m.role }}>
{% if m.role == 'assistant' %}{% generation %}{{ m.content | length }} chars{% endgeneration %}
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<assistant>{%- endif -%}"""

CONVERSATION = [
    {"role": "system", "content": 'Answer briefly, in "quotes" & <tags>.'},
    {"role": "user", "content": "Where is the robot?"},
    {"role": "assistant", "content": "  By the river.  "},
    {"role": "user", "content": "And the rain? é ✓"},
]
TOOL_SCHEMA = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def hf_tokenizer():
    return tiny.make_tokenizer()


@pytest.mark.parametrize("source", [CHATML, INST, TOOLS], ids=["chatml", "inst", "tools"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_render_matches_transformers(tmp_path, hf_tokenizer, source, generation_prompt):
    messages = CONVERSATION[1:] if source == INST else CONVERSATION
    tools = TOOL_SCHEMA if source == TOOLS else None
    hf_tokenizer.chat_template = source
    hf_tokenizer.save_pretrained(tmp_path)  # writes chat_template.jinja, as checkpoints carry it
    assert (tmp_path / "chat_template.jinja").is_file()
    want = hf_tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False
    )
    want_ids = hf_tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
    )
    ours = ChatTemplate.from_model_dir(tmp_path)
    got = ours.render(messages, add_generation_prompt=generation_prompt, tools=tools)
    assert got == want
    assert not ours.is_fallback and ours.stop == []
    from edgemoe.runtime.tokenizer import Tokenizer

    assert Tokenizer(tmp_path).encode(got, add_special_tokens=False) == list(want_ids)


def test_template_in_tokenizer_config_and_named_templates(tmp_path, hf_tokenizer):
    hf_tokenizer.chat_template = None
    hf_tokenizer.save_pretrained(tmp_path)
    import json

    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": TOOLS}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert ChatTemplate.from_model_dir(tmp_path).source == CHATML
    assert ChatTemplate.from_model_dir(tmp_path, "tool_use").source == TOOLS
    with pytest.raises(ChatTemplateError, match="no chat template named 'nope'.*tool_use"):
        ChatTemplate.from_model_dir(tmp_path, "nope")


def test_raise_exception_is_a_named_error(tmp_path, hf_tokenizer):
    hf_tokenizer.chat_template = INST
    hf_tokenizer.save_pretrained(tmp_path)
    t = ChatTemplate.from_model_dir(tmp_path)
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for m in messages %}", name="broken")


def test_sandbox_refuses_python_internals():
    t = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        t.render([{"role": "user", "content": "x"}])


@pytest.fixture(scope="module")
def converted_with_template(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    src = root / "hf"
    shutil.copytree(tiny_checkpoint("mixtral"), src)
    (src / "chat_template.jinja").write_text(CHATML)
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "tool_use.jinja").write_text(TOOLS)
    convert(src, root / "model", bits=8, progress=False)
    return src, root / "model"


def test_converter_keeps_the_template_and_encode_chat_matches_transformers(converted_with_template):
    import transformers

    src, model_dir = converted_with_template
    assert (model_dir / "chat_template.jinja").read_text() == CHATML
    assert (model_dir / "additional_chat_templates" / "tool_use.jinja").read_text() == TOOLS
    hf = transformers.AutoTokenizer.from_pretrained(str(src))
    want = hf.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False)
    m = edgemoe.load(model_dir)
    assert m.encode_chat(CONVERSATION) == list(want)
    assert not m.chat_template.is_fallback


def test_model_without_template_gets_the_transcript_fallback(tiny_checkpoint, tmp_path):
    convert(tiny_checkpoint("mixtral"), tmp_path / "m", bits=8, progress=False)
    m = edgemoe.load(tmp_path / "m")
    t = m.chat_template
    assert t.is_fallback and t.stop == list(FALLBACK_STOP)
    text = t.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<s>System: Be brief.\nUser: Hi\nAssistant:"
    ids = m.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == m.bos_id and ids.count(m.bos_id) == 1  # the template's BOS, not a second one
