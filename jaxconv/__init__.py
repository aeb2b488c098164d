"""jaxconv: the classic image-classification convnets in JAX/Flax, numerically
identical to torchvision.

A model is ``(module, variables)``: ``model = get_model(name)``, variables from
``model.init(rng, x)`` or ``from_torchvision(name, weights)``, logits from
``model.apply(variables, x, train=False)`` with ``x`` an NHWC float batch.
"""
import jaxconv.runtime  # noqa: F401  (first: XLA flags and the compilation cache, before JAX's backend starts)
from jaxconv.convert import MappingError, PthError, from_torchvision, read_pth
from jaxconv.convolutionize import (ConvolutionizeError, DensePrediction, FullyConvolutional,
                                   convolutionize, dense_predict)
from jaxconv.fuse import fuse_bn
from jaxconv.pretrained import load_pretrained
from jaxconv.registry import Preprocessing, get_model, list_models, model_info
from jaxconv.serialization import load_variables, save_variables
from jaxconv.summary import intermediates, summary

__version__ = "0.1.0"

__all__ = ["ConvolutionizeError", "DensePrediction", "FullyConvolutional", "MappingError",
           "Preprocessing", "PthError", "convolutionize", "dense_predict", "from_torchvision",
           "fuse_bn", "get_model", "intermediates", "list_models", "load_pretrained",
           "load_variables", "model_info", "read_pth", "save_variables", "summary"]
