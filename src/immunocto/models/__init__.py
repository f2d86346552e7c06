"""Models: the 12-channel bootstrap classifier (H&E + mask + 8 IF) and its expansion to every
candidate (V0 -> V1). Needs the ``train`` extra (torch, torchvision)."""
