"""The gate: prompt features -> one weight per specialist, run from gate.onnx with onnxruntime.

It is trained once over all specialists. Restricted to any enabled subset, its weights are
renormalised over that subset (a softmax over the enabled logits), which is what keeps it
near-optimal for every subset without retraining (docs/mixture-training.md measures it).

gate.onnx: input `features` float32 [B, F] -> output `logits` float32 [B, N], and metadata
`edgemoe.gate.specialists` (JSON list of names in output order) and `edgemoe.gate.features`
(JSON FeatureSpec), checked against mixture.json on load.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from edgemoe.errors import GateMismatchError, MixtureSpecError
from edgemoe.mixture.features import FeatureSpec, batch_features, prompt_features
from edgemoe.mixture.spec import MixtureSpec

INPUT = "features"
OUTPUT = "logits"
META_SPECIALISTS = "edgemoe.gate.specialists"
META_FEATURES = "edgemoe.gate.features"


def restrict(logits: np.ndarray, enabled_mask: np.ndarray) -> np.ndarray:
    """Softmax of `logits` [..., N] over the entries where `enabled_mask` [N] is true; zeros elsewhere."""
    mask = np.asarray(enabled_mask, dtype=bool)
    if not mask.any():
        raise ValueError("no specialist is enabled: enable at least one")
    z = np.where(mask, logits.astype(np.float64), -np.inf)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


class Gate:
    """Weights over a mixture's specialists for a prompt, from its gate.onnx."""

    def __init__(self, session, names: Sequence[str], features: FeatureSpec, path: Path | None = None):
        self._session = session
        self.names = list(names)
        self.features = features
        self.path = path

    @classmethod
    def load(cls, mix_dir: str | Path | MixtureSpec, threads: int = 1) -> Gate:
        spec = mix_dir if isinstance(mix_dir, MixtureSpec) else MixtureSpec.load(mix_dir, check_tokenizers=False)
        return cls.from_file(spec.gate.onnx, spec.gate.specialists, spec.gate.features, threads=threads)

    @classmethod
    def from_file(cls, path: str | Path, names: Sequence[str], features: FeatureSpec, threads: int = 1) -> Gate:
        """Open `path` and check that it was trained for `names` (in this order) and `features`."""
        import onnxruntime as ort

        path = Path(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # cores are shared
        try:
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for a damaged file
            raise MixtureSpecError(f"the gate {path} cannot be loaded ({e}): export the gate again") from e
        meta = sess.get_modelmeta().custom_metadata_map
        try:
            trained_for = json.loads(meta[META_SPECIALISTS])
            trained_features = json.loads(meta[META_FEATURES])
        except (KeyError, json.JSONDecodeError):
            raise GateMismatchError(
                f"the gate {path} does not say which specialists it was trained for (metadata "
                f"{META_SPECIALISTS!r}): export it with tools/mixture/train_gate.py"
            ) from None
        if list(trained_for) != list(names):
            raise GateMismatchError(
                f"the gate {path} was trained for specialists {trained_for}, the mixture lists {list(names)} "
                "in the gate's order: train the gate again over these specialists (tools/mixture/train_gate.py)"
            )
        if FeatureSpec.from_dict(trained_features) != features:
            raise GateMismatchError(
                f"the gate {path} was trained on features {trained_features}, mixture.json says "
                f"{features.to_dict()}: write mixture.json from the gate's training run again"
            )
        ins, outs = sess.get_inputs(), sess.get_outputs()
        if [i.name for i in ins] != [INPUT] or [o.name for o in outs] != [OUTPUT]:
            raise GateMismatchError(
                f"the gate {path} must map input {INPUT!r} to output {OUTPUT!r}; it has inputs "
                f"{[i.name for i in ins]} and outputs {[o.name for o in outs]}: export it again"
            )
        f_dim, n_out = ins[0].shape[-1], outs[0].shape[-1]
        if isinstance(f_dim, int) and f_dim != features.dim or isinstance(n_out, int) and n_out != len(names):
            raise GateMismatchError(
                f"the gate {path} maps {f_dim} features to {n_out} specialists; the mixture has "
                f"{features.dim} features and {len(names)} specialists: train the gate again"
            )
        return cls(sess, names, features, path)

    def enabled_mask(self, enabled: Iterable[str | int] | None) -> np.ndarray:
        """A boolean mask [N] from names or indices of specialists; None enables all."""
        n = len(self.names)
        if enabled is None:
            return np.ones(n, dtype=bool)
        mask = np.zeros(n, dtype=bool)
        for e in enabled:
            if isinstance(e, str):
                if e not in self.names:
                    raise ValueError(f"no specialist {e!r} in the mixture; it has {self.names}")
                mask[self.names.index(e)] = True
            elif isinstance(e, (int, np.integer)) and 0 <= int(e) < n:
                mask[int(e)] = True
            else:
                raise ValueError(f"{e!r} is not a specialist's name or an index below {n}")
        return mask

    def logits_from_features(self, features: np.ndarray) -> np.ndarray:
        """The gate's raw logits float32 [B, N] for features [B, F]."""
        x = np.ascontiguousarray(features, dtype=np.float32)
        assert x.ndim == 2 and x.shape[1] == self.features.dim, (x.shape, self.features.dim)
        (out,) = self._session.run([OUTPUT], {INPUT: x})
        return out

    def weights_from_features(self, features: np.ndarray, enabled: Iterable[str | int] | None = None) -> np.ndarray:
        """Weights [B, N]: softmax over the enabled specialists, zero outside them; rows sum to 1."""
        return restrict(self.logits_from_features(features), self.enabled_mask(enabled))

    def weights(self, token_ids: Sequence[int] | np.ndarray, enabled: Iterable[str | int] | None = None) -> np.ndarray:
        """Weights [N] over all specialists for one prompt, zero outside `enabled`, summing to 1."""
        x = prompt_features(token_ids, self.features)[None, :]
        return self.weights_from_features(x, enabled)[0]

    def batch_weights(
        self, prompts: Sequence[Sequence[int] | np.ndarray], enabled: Iterable[str | int] | None = None
    ) -> np.ndarray:
        return self.weights_from_features(batch_features(prompts, self.features), enabled)
