"""A tiny mixture directory in seconds, for tests (needs torch, transformers, onnx).

    mix = make_mixture(tmp / "mix")          # 3 random tiny Mixtral specialists of different
    spec = MixtureSpec.load(mix)             # sizes, one shared tokenizer, a trained gate.onnx,
    gate = Gate.load(mix)                    # heldout.npz scored by the specialists

The specialists are HF checkpoint folders (what edgemoe.load accepts); their sizes differ in
experts per layer (2, 4, 8) so their parameter counts, hence costs, differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tiny

from edgemoe.mixture.features import FeatureSpec
from edgemoe.mixture.spec import write_spec
from edgemoe.mixture.training import export_gate, make_heldout, train_gate

# Documents of three made-up domains; a gate can tell them apart by their tokens.
DOMAINS = {
    "prose": [
        "The quick brown fox jumps over the lazy dog. The lazy dog sleeps in the sun.",
        "Once upon a time there was a little robot who loved to read books about the sea.",
        "Every morning the robot walked to the harbour and counted the boats.",
        "The dog and the fox were friends; they read books in the sun every morning.",
    ],
    "code": [
        "def add(a, b):\n    return a + b\nfor i in range(10):\n    print(i, i * i)",
        "for i in range(3):\n    print(add(i, i))\ndef add(a, b):\n    return a + b",
        "def square(i):\n    return i * i\nprint(square(10))",
        "for a in range(5):\n    for b in range(5):\n        print(add(a, b))",
    ],
    "numbers": [
        "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000 2024.",
        "20 19 18 17 16 15 14 13 12 11 10 9 8 7 6 5 4 3 2 1 0 1000 100 2024.",
        "1 2 3 4 5 6 7 8 9 10 100 1000 2024 2024 1000 100 10 9 8 7 6 5 4 3 2 1",
        "2024 1000 100 20 10 5 4 3 2 1 0 0 1 2 3 4 5 10 20 100 1000 2024.",
    ],
}
SIZES = {"small": 2, "medium": 4, "large": 8}  # experts per layer
FEATURES = FeatureSpec(buckets=32, prompt_tokens=8)


def documents(tokenizer) -> tuple[list[np.ndarray], list[str]]:
    docs, domains = [], []
    for domain, texts in DOMAINS.items():
        for t in texts:
            docs.append(np.array([tokenizer.bos_token_id, *tokenizer.encode(t, add_special_tokens=False)]))
            domains.append(domain)
    return docs, domains


def make_mixture(path, seed: int = 0, sizes: dict[str, int] | None = None, gate_steps: int = 200) -> Path:
    """Write a tiny mixture directory at `path` and return it."""
    import transformers

    path = Path(path)
    sizes = sizes or SIZES
    specialists, models = [], {}
    for i, (name, experts) in enumerate(sizes.items()):
        rel = f"specialists/{name}"
        tiny.make_checkpoint("mixtral", path / rel, seed=seed + i, num_local_experts=experts)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path / rel), dtype="float32").eval()
        models[name] = model
        params = sum(p.numel() for p in model.parameters())
        specialists.append({"name": name, "path": rel, "params": params, "domains": [], "made_by": "random (tests)"})
    docs, domains = documents(tiny.make_tokenizer())
    h = make_heldout(models, docs, domains, FEATURES, score_tokens=24)
    net = train_gate(h, hidden=16, steps=gate_steps, seed=seed)
    names = list(models)
    export_gate(net, path / "gate.onnx", names, FEATURES)
    h.save(path / "heldout.npz")
    write_spec(path, specialists, FEATURES, names, top_k=2)
    return path
