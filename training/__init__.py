"""Fine-tuning timm CNNs in PyTorch; checkpoints carry the model card.

Importing the package is cheap: the torch-free parts (``sources``, ``splits``,
``crops``, ``data``, ``run``, ``threshold``) load without torch, so a run's split
and folder can be read where torch is not installed. The entry points that need
torch and timm (``train``, ``distributed``) check for them first and name the
extra to install (``pip install 'edgedx[train]'``).
"""
