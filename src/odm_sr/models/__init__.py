"""SR backbones (`SRModel`s with official module names) and their FP weights loader (``models.weights``).

Every model has `name`, `scale`, `pixel_range` (255.0 for EDSR/RDN/SRResNet, 1.0 for SwinIR/HAT/IMDN/PAN; forward takes
and returns images in [0, pixel_range]), `pad_mode` and `official_eval_pad_mode` (declared by `SRModel`).
"""

from odm_sr.models.base import SRModel
from odm_sr.models.build import MODEL_NAMES, SUPPORTED_SCALES, build_model
from odm_sr.models.edsr import EDSR, MeanShift
from odm_sr.models.hat import HAT
from odm_sr.models.imdn import IMDN
from odm_sr.models.pan import PAN
from odm_sr.models.rdn import RDN
from odm_sr.models.srresnet import SRResNet
from odm_sr.models.swinir import SwinIR
from odm_sr.models.weights import extract_state_dict, guess_scale, is_quantizer_key, load_pretrained
from odm_sr.models.windows import pad_to_multiple

__all__ = [
    "EDSR",
    "HAT",
    "IMDN",
    "MODEL_NAMES",
    "RDN",
    "SUPPORTED_SCALES",
    "SRModel",
    "SRResNet",
    "MeanShift",
    "PAN",
    "SwinIR",
    "build_model",
    "extract_state_dict",
    "guess_scale",
    "is_quantizer_key",
    "load_pretrained",
    "pad_to_multiple",
]
