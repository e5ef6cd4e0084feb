"""The DALI backend: one augmentation graph for the GPU and the CPU (:mod:`.backend`) and the official
RandAugment op suite written as DALI operators (:mod:`.randaugment`)."""
