"""Per-channel (mean, std) pairs, kept in one place because a checkpoint is only accurate with the
normalisation it was trained with."""

# The official AdderNet CIFAR checkpoint's: the widely copied CIFAR values, whose std is not the data set's.
CIFAR_ADDERNET_NORM = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
# APoT's CIFAR training scripts (the data set's true std).
CIFAR_APOT_NORM = ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262))
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
