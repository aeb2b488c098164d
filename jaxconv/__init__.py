"""jaxconv: the classic image-classification convnets in JAX/Flax, numerically
identical to torchvision.

A model is ``(module, variables)``: ``model = get_model(name)``, variables from
``model.init(rng, x)`` or ``from_torchvision(name, weights)``, logits from
``model.apply(variables, x, train=False)`` with ``x`` an NHWC float batch.
"""
from jaxconv.convert import MappingError, PthError, from_torchvision, read_pth
from jaxconv.pretrained import load_pretrained
from jaxconv.registry import Preprocessing, get_model, list_models, model_info
from jaxconv.serialization import load_variables, save_variables
from jaxconv.summary import intermediates, summary

__version__ = "0.1.0"

__all__ = ["MappingError", "Preprocessing", "PthError", "from_torchvision", "get_model",
           "intermediates", "list_models", "load_variables", "model_info", "read_pth",
           "save_variables", "summary"]
