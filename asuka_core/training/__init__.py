"""Training the SD1.5 aligner with the inpainting model frozen (pure PyTorch).

``AlignerTrainer`` runs the loop; the frozen UNet and VAE come in as callables
(``FrozenModels``), built by the ComfyUI glue (``nodes/training_glue.py``) or by tests.
``DecoderTrainer`` fine-tunes an SD1.5 masked decoder with ASUKA's colour and latent
augmentation (``decoder_loop``, ``decoder_augment``, ``decoder_losses``).
See docs/training.md for both recipes.
"""

from .data import ImageSet, image_sets, list_images
from .decoder_loop import (DecoderFrozen, DecoderTrainConfig, DecoderTrainer, decoder_from_vae, ldm_state_dict,
                           start_decoder)
from .ema import EMA
from .loop import (AlignerTrainer, FrozenModels, TrainConfig, mae_prior, masked_image, new_aligner,
                   warm_start_aligner)
from .schedule import learning_rate, substitution_probability

__all__ = ["AlignerTrainer", "DecoderFrozen", "DecoderTrainConfig", "DecoderTrainer", "EMA", "FrozenModels",
           "ImageSet", "TrainConfig", "decoder_from_vae", "image_sets", "ldm_state_dict", "learning_rate",
           "list_images", "mae_prior", "masked_image", "new_aligner", "start_decoder", "substitution_probability",
           "warm_start_aligner"]
