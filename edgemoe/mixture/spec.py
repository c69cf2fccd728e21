"""mixture.json: what a mixture directory holds, read and checked before anything runs.

{"format": 1,
 "specialists": [{"name", "path" (model directory relative to the mixture directory),
                  "params", "domains", "made_by"}, ...],
 "tokenizer_sha256": the tokenizer every specialist shares (`tokenizer_sha256`),
 "gate": {"onnx": "gate.onnx", "features": FeatureSpec.to_dict(),
          "specialists": [names in the order of the gate's outputs]},
 "heldout": "heldout.npz",
 "top_k": int}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from edgemoe.errors import GateMismatchError, MixtureSpecError, MixtureTokenizerError
from edgemoe.mixture.features import FeatureSpec

FORMAT = 1
SPEC_FILE = "mixture.json"


def tokenizer_sha256(model_dir: str | Path) -> str:
    """A digest of what decides token ids in `model_dir`/tokenizer.json: the model (vocabulary,
    merges), the special tokens, normalizer and pre-tokenizer; not padding or truncation."""
    path = Path(model_dir) / "tokenizer.json"
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MixtureTokenizerError(
            f"{model_dir} has no tokenizer.json: every specialist needs the mixture's shared tokenizer "
            "next to its config.json"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MixtureTokenizerError(f"{path} cannot be read ({e}): copy the mixture's tokenizer.json there") from e
    if not isinstance(tj, dict) or "model" not in tj:
        raise MixtureTokenizerError(f"{path} is not a Hugging Face tokenizer.json (no 'model')")
    added = sorted((t.get("id"), t.get("content")) for t in tj.get("added_tokens") or [] if isinstance(t, dict))
    canon = {
        "model": tj["model"],
        "added_tokens": added,
        "normalizer": tj.get("normalizer"),
        "pre_tokenizer": tj.get("pre_tokenizer"),
    }
    return hashlib.sha256(json.dumps(canon, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class SpecialistSpec:
    name: str
    path: Path  # absolute: the mixture directory joined with mixture.json's relative path
    params: int
    domains: tuple[str, ...]
    made_by: str


@dataclass(frozen=True)
class GateSpec:
    onnx: Path  # absolute
    features: FeatureSpec
    specialists: tuple[str, ...]  # the gate's output order


@dataclass(frozen=True)
class MixtureSpec:
    root: Path
    specialists: tuple[SpecialistSpec, ...]
    tokenizer_sha256: str
    gate: GateSpec
    heldout: Path  # absolute
    top_k: int
    raw: dict = field(repr=False, compare=False, default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specialists]

    def specialist(self, name: str) -> SpecialistSpec:
        for s in self.specialists:
            if s.name == name:
                return s
        raise MixtureSpecError(f"the mixture has no specialist {name!r}; it has {self.names}")

    @classmethod
    def load(cls, mix_dir: str | Path, check_tokenizers: bool = True) -> MixtureSpec:
        """Read and check MIX/mixture.json. `check_tokenizers` hashes every specialist's tokenizer."""
        root = Path(mix_dir).resolve()
        path = root / SPEC_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MixtureSpecError(
                f"{root} has no {SPEC_FILE}: it is not a mixture directory "
                "(make one with tools/mixture/make_specialists.py and tools/mixture/train_gate.py)"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MixtureSpecError(f"{path} is damaged ({e}): write the mixture again") from e
        spec = cls._parse(root, raw)
        spec._check_files()
        if check_tokenizers:
            spec.check_tokenizers()
        return spec

    @classmethod
    def _parse(cls, root: Path, raw: object) -> MixtureSpec:
        where = root / SPEC_FILE

        def bad(msg: str) -> MixtureSpecError:
            return MixtureSpecError(f"{where}: {msg}; write the mixture again")

        if not isinstance(raw, dict):
            raise bad("the top level is not an object")
        fmt = raw.get("format")
        if fmt != FORMAT:
            if isinstance(fmt, int) and fmt > FORMAT:
                raise MixtureSpecError(f"{where} is format {fmt}; this edgemoe reads format {FORMAT}: upgrade edgemoe")
            raise bad(f"'format' is {fmt!r}, expected {FORMAT}")
        for key, typ in (("specialists", list), ("tokenizer_sha256", str), ("gate", dict), ("heldout", str)):
            if not isinstance(raw.get(key), typ):
                raise bad(f"'{key}' is missing or not a {typ.__name__}")
        specs = []
        for i, s in enumerate(raw["specialists"]):
            if not isinstance(s, dict):
                raise bad(f"specialist {i} is not an object")
            name, rel, params = s.get("name"), s.get("path"), s.get("params")
            domains, made_by = s.get("domains", []), s.get("made_by", "")
            if not (isinstance(name, str) and name):
                raise bad(f"specialist {i} has no 'name'")
            if not (isinstance(rel, str) and rel):
                raise bad(f"specialist {name!r} has no 'path'")
            if not (isinstance(params, int) and params > 0):
                raise bad(f"specialist {name!r} has no positive integer 'params'")
            if not (isinstance(domains, list) and all(isinstance(d, str) for d in domains)):
                raise bad(f"specialist {name!r}: 'domains' must be a list of strings")
            if not isinstance(made_by, str):
                raise bad(f"specialist {name!r}: 'made_by' must be a string")
            specs.append(SpecialistSpec(name, (root / rel).resolve(), params, tuple(domains), made_by))
        if not specs:
            raise bad("'specialists' is empty")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise bad(f"specialist names repeat: {names}")
        top_k = raw.get("top_k")
        if not (isinstance(top_k, int) and 1 <= top_k <= len(specs)):
            raise bad(f"'top_k' is {top_k!r}, expected an integer from 1 to {len(specs)}")
        g = raw["gate"]
        if not isinstance(g.get("onnx"), str) or not isinstance(g.get("specialists"), list):
            raise bad("'gate' needs 'onnx' (a file name) and 'specialists' (names in output order)")
        gate_names = tuple(g["specialists"])
        if sorted(map(str, gate_names)) != sorted(names) or len(gate_names) != len(names):
            raise GateMismatchError(
                f"the gate in {where} was trained for specialists {list(gate_names)}, but the mixture has "
                f"{names}: train the gate again over these specialists (tools/mixture/train_gate.py)"
            )
        gate = GateSpec((root / g["onnx"]).resolve(), FeatureSpec.from_dict(g.get("features")), gate_names)
        return cls(root, tuple(specs), raw["tokenizer_sha256"], gate, (root / raw["heldout"]).resolve(), top_k, raw)

    def _check_files(self) -> None:
        for s in self.specialists:
            if not s.path.is_dir():
                raise MixtureSpecError(
                    f"specialist {s.name!r}: {s.path} is not a directory; make the specialists again "
                    "or fix its 'path' in mixture.json"
                )
        for what, p in (("the gate", self.gate.onnx), ("the held-out set", self.heldout)):
            if not p.is_file():
                raise MixtureSpecError(
                    f"{what} {p} named in {self.root / SPEC_FILE} is missing: write the mixture again"
                )

    def check_tokenizers(self) -> None:
        for s in self.specialists:
            got = tokenizer_sha256(s.path)
            if got != self.tokenizer_sha256:
                raise MixtureTokenizerError(
                    f"specialist {s.name!r} ({s.path}) has another tokenizer than the mixture's "
                    f"(sha256 {got[:12]}… against {self.tokenizer_sha256[:12]}…): its tokens are not the others' "
                    "tokens, so their distributions cannot be mixed; make it with the shared tokenizer"
                )


def write_spec(
    mix_dir: str | Path,
    specialists: list[dict],
    features: FeatureSpec,
    gate_names: list[str],
    top_k: int,
    gate_onnx: str = "gate.onnx",
    heldout: str = "heldout.npz",
) -> Path:
    """Write MIX/mixture.json. `specialists`: dicts with name, path (relative to MIX), params,
    domains, made_by; the shared tokenizer's digest is taken from the first one and every
    other one must have the same."""
    root = Path(mix_dir)
    digests = {s["name"]: tokenizer_sha256(root / s["path"]) for s in specialists}
    first = specialists[0]["name"]
    for name, d in digests.items():
        if d != digests[first]:
            raise MixtureTokenizerError(
                f"specialist {name!r} has another tokenizer than {first!r}: make every specialist with one tokenizer"
            )
    raw = {
        "format": FORMAT,
        "specialists": [
            {
                "name": s["name"],
                "path": str(s["path"]),
                "params": int(s["params"]),
                "domains": list(s.get("domains", [])),
                "made_by": s.get("made_by", ""),
            }
            for s in specialists
        ],
        "tokenizer_sha256": digests[first],
        "gate": {"onnx": gate_onnx, "features": features.to_dict(), "specialists": list(gate_names)},
        "heldout": heldout,
        "top_k": int(top_k),
    }
    path = root / SPEC_FILE
    path.write_text(json.dumps(raw, indent=2) + "\n")
    return path
