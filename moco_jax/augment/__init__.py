"""The views MoCo trains on, in JAX (no TensorFlow): colour augmentation and
normalisation (colour.py, normalization.py), torchvision's RandomResizedCrop
window (crop_window.py; the host's TensorFlow twin data/crops.py imports its
constants), the antialiased resized crop and flip (resize.py), and the two
views of a device-resident batch (views.py)."""
