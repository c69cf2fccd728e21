"""Use `edgemoe serve` through the official OpenAI client: a completion and a chat completion,
each whole and streamed, with token usage.

    edgemoe serve --memory-budget 10MB            # in another terminal (prints its address)
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="none", help="the key the server was started with (--api-key), if any")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id  # the server serves one model
    print(f"model: {model}")

    done = client.completions.create(model=model, prompt="The Linux kernel", max_tokens=args.max_tokens, seed=1)
    print(f"completion: {done.choices[0].text!r}")
    print(f"  usage: {done.usage.prompt_tokens} prompt + {done.usage.completion_tokens} completion tokens")

    print("streamed completion: ", end="", flush=True)
    stream = client.completions.create(
        model=model,
        prompt="The Linux kernel",
        max_tokens=args.max_tokens,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].text, end="", flush=True)
        if chunk.usage:
            print(f"\n  usage: {chunk.usage.completion_tokens} completion tokens")

    messages = [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "What does a package manager do?"},
    ]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens, seed=1)
    print(f"chat: {chat.choices[0].message.content!r} ({chat.choices[0].finish_reason})")
    print(f"  usage: {chat.usage.prompt_tokens} prompt + {chat.usage.completion_tokens} completion tokens")

    print("streamed chat: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=args.max_tokens,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\n  usage: {chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} completion tokens")


if __name__ == "__main__":
    main()
