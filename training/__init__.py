"""Fine-tuning timm CNNs in PyTorch; checkpoints carry the model card."""
