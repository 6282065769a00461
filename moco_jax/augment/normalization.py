"""Per-channel mean and std (of images scaled to [0, 1]) that `data.normalization`
names: ImageNet's (torchvision's constants) and CIFAR-10's (the MoCo CIFAR demo's)."""

MEAN_STD = {
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}
