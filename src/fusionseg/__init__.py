"""fusionseg: open-vocabulary semantic segmentation on frozen foundation models (after Fusioner, BMVC 2022)."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Segmenter", "Prediction", "BatchPredictor", "load_model", "train", "evaluate", "__version__"]


def __getattr__(name: str):
    # Lazy: `import fusionseg` stays cheap (no torch import) until something is used.
    if name in ("Segmenter", "Prediction"):
        from . import segmenter
        return getattr(segmenter, name)
    if name == "BatchPredictor":  # for Ray Data map_batches / Spark predict_batch_udf (fusionseg.batch)
        from .batch import BatchPredictor
        return BatchPredictor
    if name == "load_model":
        from .model.checkpoint import load_model
        return load_model
    if name == "train":
        from .engine.train import train
        return train
    if name == "evaluate":
        from .engine.evaluate import evaluate
        return evaluate
    raise AttributeError(f"module 'fusionseg' has no attribute {name!r}")
