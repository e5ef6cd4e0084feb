"""The DALI backend: decode, crop, resize, flip and RandAugment on the GPU or the CPU.

:func:`augment` is the whole augmentation graph, for training and evaluation, in one function; GPU
and CPU differ only in the ``device`` passed through ("gpu" puts the decoder on ``mixed``, nvJPEG
with the hardware decoder where present, and everything after it on the GPU).

Samples come from :class:`~effnetv2.pipeline.loaders.sampler.SampleTable` through
``fn.external_source``, one batch per call, in the order given by the loader. Every random choice
(crop window, flip, RandAugment ops, signs, cutout boxes) is drawn on the host from numpy generators
seeded by ``(seed, epoch, step)`` and fed as per-sample inputs: the same seed gives the same images, a
resumed run continues exactly, and the RandAugment magnitude is data, not a build-time constant. The
crop window needs the image size, read from the JPEG header
(:func:`~effnetv2.pipeline.format.jpeg.checked_jpeg_size`); that same check rejects corrupt samples
before DALI sees them, because one undecodable image fails a DALI batch as a whole.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from effnetv2.pipeline.format.jpeg import checked_jpeg_size

from .. import forks
from ..backend import AugmentSpec
from ..geometry import centre_crop_window, noise_cutout, random_crop_window
from ..sampler import SampleTable
from . import randaugment as randaugment_dali


# -- host side: what the external source computes per batch -----------------------------------------
def resize_matrices(windows: np.ndarray, size: int, flip: np.ndarray | None = None) -> np.ndarray:
    """Inverse maps (pixel-index coordinates) that resize each window to ``size`` x ``size``
    (pixel-area aligned, as ``cv2.resize``) and optionally flip it horizontally."""
    n = len(windows)
    sx, sy = windows[:, 2] / size, windows[:, 3] / size
    m = np.zeros((n, 3, 3))
    m[:, 0, 0], m[:, 0, 2] = sx, 0.5 * sx - 0.5
    m[:, 1, 1], m[:, 1, 2] = sy, 0.5 * sy - 0.5
    m[:, 2, 2] = 1.0
    if flip is not None:
        m[flip, 0, 0] *= -1
        m[flip, 0, 2] += sx[flip] * (size - 1)
    return m.astype(np.float32)


NOISE_NODES = ("noise", "noise_a", "noise_s", "noise_at")  # fine-tune cutout: pixels, anchor, shape, -anchor


@dataclass(frozen=True)
class DaliConfig:
    """The spec plus where the pipeline runs: ``device_id`` None puts everything on the CPU."""

    spec: AugmentSpec
    device_id: int | None = None
    num_threads: int = 1

    @property
    def on_gpu(self) -> bool:
        return self.device_id is not None

    @property
    def layers(self) -> int:
        """RandAugment layers in the graph: none when it is off (no conditionals are traced at all)."""
        return self.spec.layers

    def names(self) -> list[str]:
        """The external source's outputs, in order."""
        if self.spec.finetune:
            extra = list(NOISE_NODES)
        else:
            extra = randaugment_dali.param_names(self.layers) if self.spec.train else []
        return ["jpeg", "crop_a", "crop_s", "resize", *extra]


class BatchSource:
    """The pipeline's external source: per call the next step's encoded images and random choices.

    Labels do not go through DALI: they wait in :attr:`pending` with their step (DALI returns batches
    in call order).
    A sample that is not a complete JPEG is reported (:meth:`SampleTable.mark_corrupt`), replaced by a
    good sample of the same batch for decoding, and its labels are ``()`` so the loader can drop it.
    """

    def __init__(self, table: SampleTable, cfg: DaliConfig):
        self.table, self.cfg = table, cfg
        self.pending: deque[tuple[int, list[tuple[int, ...]]]] = deque()  # (step, labels) in flight
        self.start(np.zeros(0, np.int64), 1, 0, 0)

    def start(self, order: np.ndarray, batch_size: int, epoch: int, start_step: int) -> None:
        self.order, self.batch_size, self.epoch = order, batch_size, epoch
        self.step, self.steps = start_step, len(order) // batch_size
        self.pending.clear()

    def stop(self) -> None:
        self.steps = self.step

    def __call__(self):
        if self.step >= self.steps:
            raise StopIteration
        b, step, cfg, spec = self.batch_size, self.step, self.cfg, self.cfg.spec
        self.step += 1
        ids = self.order[step * b : (step + 1) * b]
        jpegs, labels, hw = self._read(ids)
        self.pending.append((step, labels))
        crop_rng = np.random.default_rng([spec.seed, self.epoch, step, 0])
        if spec.finetune:
            win = windows(centre_crop_window(h, w, 1.0) for h, w in hw)
            resize = resize_matrices(win, spec.image_size, crop_rng.random(b) < 0.5)
            noise_rng = np.random.default_rng([spec.seed, self.epoch, step, 1])
            cuts = [noise_cutout(noise_rng, spec.image_size) for _ in range(b)]
            box = windows(c[0] for c in cuts).astype(np.float32)
            anchor, shape = box[:, [1, 0]], box[:, [3, 2]]  # (y, x) and (h, w): axis order "HW"
            params = {"noise": [c[1] for c in cuts], "noise_a": anchor, "noise_s": shape, "noise_at": -anchor}
        elif spec.train:
            win = windows(random_crop_window(crop_rng, h, w, spec.crop_area) for h, w in hw)
            resize = resize_matrices(win, spec.image_size, crop_rng.random(b) < 0.5)
            ra_rng = np.random.default_rng([spec.seed, self.epoch, step, 1])
            params = randaugment_dali.sample_params(ra_rng, b, spec.image_size, spec.randaug_magnitude,
                                                    spec.layers)
        else:
            win = windows(centre_crop_window(h, w, spec.eval_ratio) for h, w in hw)
            resize, params = resize_matrices(win, spec.image_size), {}
        nodes = {"crop_a": win[:, :2], "crop_s": win[:, 2:], "resize": resize, **params}
        return (jpegs, *(_contiguous(nodes[name]) for name in cfg.names()[1:]))

    def _read(self, ids: np.ndarray):
        jpegs, labels, hw, bad = [], [], [], []
        for i in ids:
            i = int(i)
            data, lab = self.table.read_sample(i)
            try:
                if i in self.table.corrupt:
                    raise ValueError("reported before")
                hw.append(checked_jpeg_size(data))
            except ValueError as e:
                self.table.mark_corrupt(i, str(e))
                bad.append(len(jpegs))
                data, lab = None, ()
                hw.append((0, 0))
            jpegs.append(data)
            labels.append(lab)
        if bad:
            good = [k for k in range(len(ids)) if jpegs[k] is not None]
            if good:
                donor_data, donor_hw = jpegs[good[0]], hw[good[0]]
            else:
                donor = self._any_good_sample()
                donor_data, donor_hw = self.table.read_sample(donor)[0], checked_jpeg_size(self.table.read_sample(donor)[0])
            for k in bad:
                jpegs[k], hw[k] = donor_data, donor_hw
        return jpegs, labels, np.asarray(hw, np.int64)

    def _any_good_sample(self) -> int:
        for i in range(len(self.table)):
            if i not in self.table.corrupt:
                try:
                    checked_jpeg_size(self.table.read_sample(i)[0])
                    return i
                except ValueError as e:
                    self.table.mark_corrupt(i, str(e))
        raise RuntimeError(f"no decodable sample in {self.table.files[0].parent}")


def windows(rows) -> np.ndarray:
    """Per-image windows ``(x0, y0, w, h)`` as one (n, 4) int32 array."""
    return np.array(list(rows), np.int32).reshape(-1, 4)


def _contiguous(node):
    """An external-source output: one array for the batch, or a list of per-sample arrays as is."""
    return node if isinstance(node, list) else np.ascontiguousarray(node)


# -- the graph --------------------------------------------------------------------------------------
# nvJPEG's buffers in the ``mixed`` decoder, preallocated per DALI thread (one device buffer, two pinned
# host buffers for double buffering); an image that does not fit makes nvJPEG reallocate, which is slow
# but correct, so these are sized for the images we shard, not for the worst one. Device: a decoded RGB
# image of up to 5.5 MPix (2048 x 2048 x 3 = 12 MiB fits: ImageNet-sized photos, or any set sharded
# with --max-side 2048 or less). Host: nvJPEG's pinned staging for its host (Huffman) stage, which needs
# less than the decoded image; DALI's default 8 MiB. Per node that is threads x (16 MiB of GPU memory +
# 16 MiB pinned), and the threads are the cores shared among the node's ranks
# (loaders.backend.default_workers), so the total no longer grows with the GPU count: 224 cores on 8
# GPUs give 448 MiB per GPU and 3.5 GiB pinned per node, where 64/16 MiB with every rank taking all 224
# cores made 14 GiB per GPU and 56 GiB pinned.
DECODER_DEVICE_PADDING = 16 << 20
DECODER_HOST_PADDING = 8 << 20


def augment(jpegs, p: dict, *, image_size: int, layers: int, train: bool, device: str,
            finetune: bool = False):
    """The augmentation graph: ROI decode of the crop window; one bilinear warp that resizes it to
    S x S (and flips it, in training: the flip is part of the per-sample matrix); then RandAugment in
    training, or the noise cutout in fine-tuning. ``p`` maps :meth:`DaliConfig.names` to the external
    source's nodes; ``device`` is "gpu" or "cpu" and is the only thing that differs. The resize is a
    bilinear ``warp_perspective`` (it carries the flip, and costs a third of DALI's CPU ``resize``)."""
    from nvidia.dali import fn, types

    decoder = {"device": "mixed", "device_memory_padding": DECODER_DEVICE_PADDING,
               "host_memory_padding": DECODER_HOST_PADDING, "hw_decoder_load": 0.75} if device == "gpu" \
        else {"device": "cpu"}
    x = fn.decoders.image_slice(jpegs, p["crop_a"], p["crop_s"], output_type=types.RGB,
                                adjust_orientation=False, **decoder)
    x = randaugment_dali.warp(x, p["resize"], nearest=False, size=image_size)
    if finetune:
        x = paste_noise(x, p, image_size, device)
    elif train:
        x = randaugment_dali.apply(x, p, layers, device)
    return x


def paste_noise(x, p: dict, size: int, device: str):
    """Fill each image's cutout box with its noise pixels: erase the box to 0, then add the noise
    placed on an S x S canvas of zeros (a slice of the noise tile starting at minus the anchor)."""
    from nvidia.dali import fn

    noise = p["noise"].gpu() if device == "gpu" else p["noise"]
    placed = fn.slice(noise, p["noise_at"], [float(size), float(size)], axes=[0, 1],
                      normalized_anchor=False, normalized_shape=False, out_of_bounds_policy="pad", fill_values=0)
    x = fn.erase(x, anchor=p["noise_a"], shape=p["noise_s"], axis_names="HW", fill_value=0.0)
    return x + placed


def build_pipeline(cfg: DaliConfig, batch_size: int, source: BatchSource):
    pipe = define_pipeline(cfg, batch_size, source)
    pipe.build()
    return pipe


def define_pipeline(cfg: DaliConfig, batch_size: int, source):
    """The traced, not yet built pipeline (building it needs the device; tracing does not)."""
    from nvidia.dali import fn, pipeline_def

    names, spec = cfg.names(), cfg.spec

    @pipeline_def(batch_size=batch_size, num_threads=max(cfg.num_threads, 1), device_id=cfg.device_id, seed=spec.seed,
                  enable_conditionals=True, prefetch_queue_depth=2, exec_dynamic=True)
    def pipeline():
        nodes = dict(zip(names, fn.external_source(source=source, num_outputs=len(names), batch=True)))
        return augment(nodes["jpeg"], nodes, image_size=spec.image_size, layers=cfg.layers,
                       train=spec.train, device="gpu" if cfg.on_gpu else "cpu", finetune=spec.finetune)

    return pipeline()


def _dali_decodes(data: np.ndarray, cfg: DaliConfig) -> bool:
    """Whether DALI's decoder (on the configured device) accepts one encoded image."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=cfg.device_id, prefetch_queue_depth=1)
    def one():
        jpeg = fn.external_source(source=lambda: [np.array(data)], batch=True)
        return fn.decoders.image(jpeg, device="mixed" if cfg.on_gpu else "cpu", adjust_orientation=False)

    try:
        pipe = one()
        pipe.build()
        pipe.run()
    except RuntimeError:
        return False
    return True


class DaliBackend:
    """Runs the DALI pipeline over a given sample order: the :class:`~effnetv2.pipeline.loaders.backend.Backend`
    on DALI, on the GPU (``device_id``) or the CPU (``device_id=None``).

    The pipeline is built once per batch size and kept across epochs; :meth:`close` frees it (stage
    switch). If DALI still fails on a batch (a file that passes :func:`checked_jpeg_size` but not the
    decoder), the culprit is found by decoding the batch's samples one by one, reported, and the
    pipeline rebuilt to continue at the same step.
    """

    name = "dali"

    def __init__(self, table: SampleTable, spec: AugmentSpec, *, device_id: int | None = None,
                 num_threads: int = 1):
        self.spec = spec
        self.cfg = DaliConfig(spec, device_id, num_threads)
        self.source = BatchSource(table, self.cfg)
        self._pipe, self._batch = None, 0
        self._pid = forks.register(self)  # a forked child must never run or shut down this pipeline

    def batches(self, order: np.ndarray, batch_size: int, epoch: int,
                start_step: int = 0) -> Iterator[tuple[torch.Tensor, list[tuple[int, ...]]]]:
        pipe = self._pipeline(batch_size)
        self.source.start(order, batch_size, epoch, start_step)
        done = False
        try:
            while True:
                stream = self._stream()
                try:
                    (out,) = pipe.run(stream)
                except StopIteration:
                    done = True
                    return
                except RuntimeError as err:  # a sample passed the header check but broke the decoder
                    step = self.source.pending[0][0]
                    self._drop_undecodable(order[step * batch_size : (step + 1) * batch_size], err)
                    self._pipe = None  # a DALI pipeline that raised is no longer usable
                    pipe = self._pipeline(batch_size)
                    self.source.start(order, batch_size, epoch, step)
                    continue
                _, labels = self.source.pending.popleft()
                yield self._to_torch(out, stream), labels
        finally:
            if forks.owned(self._pid):  # a generator collected in a forked child: DALI's threads are not there
                self._rewind(pipe, drain=not done)

    def _pipeline(self, batch_size: int):
        if self._pipe is None or self._batch != batch_size:
            self.close()
            self._pipe, self._batch = build_pipeline(self.cfg, batch_size, self.source), batch_size
        return self._pipe

    def _drop_undecodable(self, ids: np.ndarray, err: Exception) -> None:
        """Find the samples of a failed batch that DALI's decoder rejects, one by one, and report them
        (the source then substitutes them); re-raise if none is to blame."""
        culprits = [int(i) for i in ids if not _dali_decodes(self.source.table.read_sample(int(i))[0], self.cfg)]
        if not culprits:
            raise RuntimeError(f"DALI pipeline failed on a batch whose samples all decode alone: {err}") from err
        for i in culprits:
            self.source.table.mark_corrupt(i, "DALI's decoder rejects it")

    def _rewind(self, pipe, drain: bool) -> None:
        """Ready the pipeline for the next ``batches`` call; if abandoned mid-epoch, first drain the
        batches DALI has prefetched. Tolerates a pipeline already torn down (interpreter exit)."""
        try:
            if drain:
                self.source.stop()
                try:
                    while True:
                        pipe.run()
                except StopIteration:
                    pass
            pipe.reset()
        except AttributeError:
            if getattr(pipe, "_pipe", None) is not None:  # DALI sets it to None when torn down
                raise

    def _stream(self):
        """Torch's current stream on the pipeline's GPU (None on the CPU). Given to ``pipe.run``, it makes
        DALI's outputs stream-ordered: that stream waits for DALI's work on the GPU, the host does not.
        Without it the outputs are host-ordered, and the non-blocking copy below then makes the host
        wait for the copy, i.e. for everything already queued on torch's stream (the previous training
        steps): the CPU could never run ahead of the GPU."""
        return torch.cuda.current_stream(self.cfg.device_id) if self.cfg.on_gpu else None

    def _to_torch(self, out, stream) -> torch.Tensor:
        """The batch as a torch tensor: on the GPU a copy into torch's memory, queued on ``stream``
        after DALI's work (``out`` is bound to it); on the CPU a view of DALI's array."""
        if self.cfg.on_gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = out.as_tensor()
            dst = torch.empty(t.shape(), dtype=torch.uint8, device=torch.device("cuda", self.cfg.device_id))
            feed_ndarray(t, dst, cuda_stream=stream)
            return dst
        return torch.from_numpy(out.as_array())

    def close(self) -> None:
        """Drop the pipeline; on a GPU also hand DALI's pooled device memory back (stage switch).
        A no-op in a forked child (the pipeline is the parent's)."""
        if self._pipe is not None and forks.owned(self._pid):
            self._pipe = None
            if self.cfg.on_gpu:
                from nvidia.dali.backend import ReleaseUnusedMemory

                ReleaseUnusedMemory()
