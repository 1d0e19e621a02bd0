"""Fine-tuning timm CNNs in PyTorch; checkpoints carry the model card."""

from edgedx.deps import require

require(("torch", "timm"), extra="train", purpose="Training")
