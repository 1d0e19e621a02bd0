"""Torch-free inference: card-driven preprocessing, sliding crops, ONNX Runtime or TensorRT.

Embed it with::

    from edgedx.runtime import load_model
    model = load_model("model.onnx")
    print(model.diagnose("field.png").label)
"""

from edgedx.runtime.model import Diagnosis, Model, load_model

__all__ = ["Diagnosis", "Model", "load_model"]
