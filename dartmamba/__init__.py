"""dartmamba: Vision Mamba (Vim) and ViT/DeiT backbones that see images through DART.

Importing the package registers its models with timm (``timm.create_model("vim_small_dart")``). Nothing here
needs CUDA, mamba-ssm, causal-conv1d, deepspeed or triton at import time.
"""
from . import backends, models
from .models import DartVisionTransformer, VisionMamba
from .models.checkpoints import load_model, load_official_checkpoint, save_model
from .tokenizer import DartGeometry, DartTokenizer, DartTokens, partition, resample_patches, resample_pos_embed

__version__ = "0.1.0"
