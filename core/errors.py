"""Typed errors of the engine and domain; `api/` maps them to HTTP answers in one place."""


class SteerError(Exception):
    """Base class of every error Steer raises on purpose."""


class ModelLoadError(SteerError):
    """The base model could not be found or loaded."""


class ArtifactError(SteerError):
    """A prefix artifact is malformed, corrupted, or belongs to another base model."""


class IncompatibleBaseModel(ArtifactError):
    """A prefix was trained on a different base model than the one it is loaded against."""


class CorruptArtifact(ArtifactError):
    """A prefix artifact fails its checksum or cannot be parsed."""


class TrainingCancelled(SteerError):
    """Training stopped because cancellation was requested."""


class InvalidTrainingData(SteerError):
    """The writing samples cannot be turned into training data (empty, too short, ...)."""


class InvalidRequest(SteerError):
    """A generation request is malformed (bad sampling parameters, prompt too long, ...)."""
