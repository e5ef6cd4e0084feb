"""Online: shard sets -> augmented, normalised, mixed device batches, one loader per stage.

:mod:`.loader` is the public API over the backends (:mod:`.backend` is their contract): ``dali``
(:mod:`.dali`, GPU or CPU) and ``opencv`` (:mod:`.opencv`, anywhere). :mod:`.sampler` decides which
sample each rank reads at each step; :mod:`.geometry` where each image is cut; :mod:`.mix` mixup and
cutmix on the device.
"""

from .loader import BatchSpec, EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from .sampler import SampleTable, epoch_order

__all__ = ["BatchSpec", "EvalLoader", "SampleTable", "TrainLoader", "build_eval_loader", "build_train_loader",
           "epoch_order"]
