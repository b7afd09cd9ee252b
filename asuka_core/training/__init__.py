"""Training the SD1.5 aligner with the inpainting model frozen (pure PyTorch).

``AlignerTrainer`` runs the loop; the frozen UNet and VAE come in as callables
(``FrozenModels``), built by the ComfyUI glue (``nodes/training_glue.py``) or by tests.
See docs/training.md for the recipe.
"""

from .data import ImageSet, image_sets, list_images
from .ema import EMA
from .loop import (AlignerTrainer, FrozenModels, TrainConfig, mae_prior, masked_image, new_aligner,
                   warm_start_aligner)
from .schedule import learning_rate, substitution_probability

__all__ = ["AlignerTrainer", "EMA", "FrozenModels", "ImageSet", "TrainConfig", "image_sets", "learning_rate",
           "list_images", "mae_prior", "masked_image", "new_aligner", "substitution_probability", "warm_start_aligner"]
