"""The OpenCV backend: torch DataLoader workers decode and augment whole batches with OpenCV and numpy
(:mod:`.backend`), with the official RandAugment op suite written for uint8 arrays (:mod:`.randaugment`)."""
