"""Errors a user can act on. Each message names the problem and the fix."""


class EdgeMoEError(Exception):
    """Base of every error edgemoe raises on purpose."""


class CheckpointError(EdgeMoEError):
    """The source checkpoint cannot be converted (missing files, shards, tensors)."""


class UnsupportedArchitectureError(EdgeMoEError):
    """The checkpoint's model_type is not one edgemoe implements."""


class UnsupportedConfigError(UnsupportedArchitectureError, NotImplementedError):
    """The architecture is one edgemoe runs, but its config asks for a variant (a RoPE scaling,
    a routing method) that it does not implement yet."""


class ModelDirectoryError(EdgeMoEError):
    """A converted model directory is damaged, truncated or from a newer format."""


class CorruptExpertError(ModelDirectoryError):
    """An expert blob failed its checksum or size check (raised by the native core)."""


class ExpertReadError(ModelDirectoryError):
    """Reading an expert from the experts file failed: an I/O error, or the file shrank or is being
    rewritten under the running model (raised by the native core). The request fails; the model
    keeps serving, and reads the expert again on its next use."""


class BudgetError(EdgeMoEError):
    """The memory budget cannot hold what one layer needs."""


class TokenizerError(EdgeMoEError):
    """The model directory has no usable tokenizer."""


class ClusterError(EdgeMoEError):
    """The Ray cluster cannot serve the model's experts: it does not answer, no node offers the
    `edgemoe` resource, or a device's copy of an expert fails its checksum."""


class DeviceProfileError(EdgeMoEError, ValueError):
    """A device or link profile is unknown, or its file lacks a field or a field's source."""


class PlacementError(EdgeMoEError, ValueError):
    """The experts cannot be placed on the devices given (a memory budget too small or negative)."""


class ChatTemplateError(EdgeMoEError, ValueError):
    """A chat template does not parse, or refuses a conversation (its raise_exception)."""


class MixtureError(EdgeMoEError, ValueError):
    """A mixture of specialists cannot be planned or run (docs/mixture.md)."""


class MixtureBudgetError(MixtureError):
    """No specialist fits the latency and energy budgets given."""


class MixtureTokenizerError(MixtureError):
    """A specialist's tokenizer is not the one the mixture's specialists share."""


class GateMismatchError(MixtureError):
    """The gate was trained for other specialists than the mixture's."""


class MixtureSpecError(MixtureError):
    """A mixture directory's mixture.json, gate.onnx or heldout.npz is missing, damaged or from a
    newer format, or names files that are not there."""
