"""The DALI graph itself: every RandAugment op against the numpy reference, op order, host-side crop
and JPEG checks, and the GPU pipeline (``-m gpu``)."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from conftest import jpeg_bytes, random_crops
from PIL import Image

from effnetv2.pipeline.format.jpeg import checked_jpeg_size
from effnetv2.pipeline.loaders.dali import randaugment as ra
from effnetv2.pipeline.loaders.dali.backend import resize_matrices
from effnetv2.pipeline.loaders.opencv import randaugment as rnp

dali = pytest.importorskip("nvidia.dali")
S = 64


def _run_graph(images: list[np.ndarray], params: dict, layers: int) -> np.ndarray:
    """RandAugment's graph on the CPU over fixed images and per-sample inputs; one batch out."""
    from nvidia.dali import fn, pipeline_def

    names = ra.param_names(layers)

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, enable_conditionals=True)
    def pipe():
        x = fn.external_source(source=lambda: images, layout="HWC")
        nodes = fn.external_source(source=lambda: tuple(np.ascontiguousarray(params[n]) for n in names),
                                   num_outputs=len(names))
        return ra.apply(x, dict(zip(names, nodes)), layers, "cpu")

    p = pipe()
    p.build()
    return p.run()[0].as_array()


@pytest.fixture(scope="module")
def small_images(photos):
    return [np.asarray(Image.fromarray(c).resize((S, S), Image.BILINEAR)) for c in random_crops(photos, 20, seed=3)]


def _value(op: str, magnitude: float) -> float:
    lv = ra.Levels(magnitude)
    return {"Rotate": lv.degrees, "ShearX": lv.shear, "ShearY": lv.shear, "TranslateX": lv.translate,
            "TranslateY": lv.translate}[op]


def _reference(op: str, img: np.ndarray, policy: rnp.RandAugment, sign: float) -> np.ndarray:
    geometric = {"Rotate": rnp.rotate, "ShearX": rnp.shear_x, "ShearY": rnp.shear_y,
                 "TranslateX": rnp.translate_x, "TranslateY": rnp.translate_y}
    if op in geometric:
        return geometric[op](img, sign * _value(op, policy.magnitude))
    return policy.apply(op, img, np.random.default_rng(0))


def test_levels_match_the_numpy_policy():
    for magnitude in (0.0, 2.0, 6.67, 10.0, 15.0, 25.0):
        lv, ref = ra.Levels(magnitude), rnp.RandAugment(magnitude, 2)
        assert (lv.degrees, lv.shear, lv.translate, lv.cutout_pad, lv.factor) == pytest.approx(
            (ref.degrees, ref.shear, ref.translate, ref.cutout_pad, ref.factor))
        assert lv.addition == min(ref.addition, 255) and lv.threshold == min(ref.threshold, 256)
        table = np.arange(256, dtype=np.uint8)
        mask = (0xFF << (8 - lv.bits)) & 0xFF
        assert np.array_equal(table & mask, rnp.posterize_lut(ref.bits))


def test_every_op_and_the_layer_order_match_the_numpy_reference(small_images):
    """Sample i < 16 applies op i (second layer: no op, code -1); the last four pin the order of two
    layers: a colour op after a geometric one transforms its fill, before it does not; two geometric
    ops lose what the first pushes out of the image."""
    magnitude = 7.5  # fractional on purpose: 3 bits, threshold 192, addition 82, cutout 30 px
    none = -1
    pairs = [(i, none) for i in range(16)]
    pairs += [(ra.CODE["TranslateX"], ra.CODE["Invert"]), (ra.CODE["Invert"], ra.CODE["TranslateX"]),
              (ra.CODE["Rotate"], ra.CODE["ShearY"]), (ra.CODE["Posterize"], ra.CODE["Rotate"])]
    ops = np.array(pairs)
    sign = np.where(np.arange(40).reshape(20, 2) % 3 == 0, -1.0, 1.0)
    params = ra.sample_params(np.random.default_rng(0), 20, S, magnitude, 2, ops=ops, sign=sign)
    out = _run_graph(small_images, params, layers=2)
    policy = rnp.RandAugment(magnitude, 1)
    exact = {"Invert", "Posterize", "Solarize", "SolarizeAdd", "Rotate", "ShearX", "ShearY", "TranslateX",
             "TranslateY"}
    for i in range(16):
        op = ra.OPS[i]
        got, img = out[i].astype(int), small_images[i]
        if op == "Cutout":
            (y0, x0), (h, w) = params["cut_a0"][i].astype(int), params["cut_s0"][i].astype(int)
            assert h == w == 2 * ra.Levels(magnitude).cutout_pad or min(y0, x0) == 0 or max(y0 + h, x0 + w) == S
            inside = np.zeros((S, S), bool)
            inside[y0 : y0 + h, x0 : x0 + w] = True
            assert (got[inside] == 128).all() and np.array_equal(got[~inside], img[~inside])
            continue
        if op == "Equalize":  # DALI's is OpenCV's table, not PIL's (documented difference)
            ref = np.stack([cv2.equalizeHist(np.ascontiguousarray(img[..., c])) for c in range(3)], -1)
            assert np.array_equal(got, ref)
            continue
        diff = np.abs(got - _reference(op, img, policy, sign[i, 0]).astype(int))
        if op == "Sharpness":  # the one-pixel border is smoothed too (documented difference)
            diff = diff[1:-1, 1:-1]
        assert diff.max() <= (0 if op in exact else 1), (op, diff.max())
    for i in range(16, 20):
        a, b = (ra.OPS[c] for c in ops[i])
        ref = _reference(b, _reference(a, small_images[i], policy, sign[i, 0]), policy, sign[i, 1])
        off = (np.abs(out[i].astype(int) - ref.astype(int)).max(-1) > 1).mean()
        assert off == 0, (a, b, off)  # two geometric layers are two warps: sequential, as the official ops
    assert (out[16] == 127).all(-1).mean() > 0.1 and (out[17] == 128).all(-1).mean() > 0.1  # fill inverted or not


def test_resize_warp_flips_and_scales_like_opencv(small_images):
    from nvidia.dali import fn, pipeline_def

    imgs = small_images[:4]
    windows = np.array([[0, 0, S, S]] * 4, np.int32)
    flip = np.array([True, False, True, False])
    mats = [resize_matrices(windows, S, flip), resize_matrices(windows, 40)]

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: imgs, layout="HWC")
        return (ra.warp(x, fn.external_source(source=lambda: mats[0]), nearest=False, size=S),
                ra.warp(x, fn.external_source(source=lambda: mats[1]), nearest=False, size=40))

    p = pipe()
    p.build()
    same, small = (o.as_array() for o in p.run())
    for i in range(4):
        assert np.array_equal(same[i], imgs[i][:, ::-1] if flip[i] else imgs[i])
        ref = cv2.resize(imgs[i], (40, 40), interpolation=cv2.INTER_LINEAR).astype(int)
        assert np.abs(small[i].astype(int) - ref).max() <= 1


def test_jpeg_size_reads_headers_and_rejects_broken_files(photos):
    img = random_crops(photos, 1, seed=2)[0]
    data = jpeg_bytes(img)
    assert checked_jpeg_size(np.frombuffer(data, np.uint8)) == img.shape[:2] == Image.open(io.BytesIO(data)).size[::-1]
    assert checked_jpeg_size(data + b"trailing bytes") == img.shape[:2]  # harmless junk after the end marker
    progressive = io.BytesIO()
    Image.fromarray(img).save(progressive, format="JPEG", progressive=True)
    assert checked_jpeg_size(progressive.getvalue()) == img.shape[:2]
    for broken, why in ((data[: len(data) // 2], "truncated"), (b"\x89PNG\r\n" + data, "start-of-image"),
                        (data[:2] + b"\xff\xd9", "frame header")):
        with pytest.raises(ValueError, match=why):
            checked_jpeg_size(broken)


# -- GPU ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_pipeline_delivers_on_the_device_and_agrees_with_the_cpu_one(small_shards):
    from effnetv2.pipeline.loaders import build_eval_loader, build_train_loader

    cpu = build_train_loader(small_shards, 16, 96, 9.0, backend="dali", seed=4)
    gpu = build_train_loader(small_shards, 16, 96, 9.0, 0.2, 0.2, backend="dali", seed=4, device="cuda",
                             dtype=torch.bfloat16)
    assert gpu.backend_name == "dali" and gpu.backend.cfg.on_gpu
    plain = build_train_loader(small_shards, 16, 96, 9.0, backend="dali", seed=4, device="cuda")
    for (x_cpu, _), (x_gpu, t_gpu), (x_plain, _) in zip(cpu, gpu, plain):
        assert x_gpu.is_cuda and t_gpu.is_cuda and x_gpu.dtype == torch.bfloat16
        assert x_gpu.shape == (16, 3, 96, 96) and x_gpu.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(t_gpu.sum(1), torch.ones(16, device="cuda"), atol=1e-3)
        # same random choices; nvJPEG vs libjpeg-turbo and kernel rounding differ by a few grey levels
        assert (x_plain.cpu() - x_cpu).abs().mean() * 128 < 4
    for x, t, v in build_eval_loader(small_shards, 8, 96, device="cuda", backend="dali"):
        assert x.is_cuda and t.is_cuda and v.is_cuda and x.shape == (8, 3, 96, 96)
    for loader in (cpu, gpu, plain):
        loader.close()


@pytest.mark.parametrize("train,policy", [(True, "randaugment"), (True, "finetune"), (False, "randaugment")])
def test_the_gpu_graph_puts_every_image_op_on_the_gpu_with_an_operator_dali_has_there(train, policy):
    """Runs without a GPU: the GPU pipeline is traced (not built) and every operator is checked against
    DALI's registry for the device it is placed on; everything downstream of the decoder must be on
    the GPU (only the per-sample parameters from the host may stay on the CPU)."""
    from nvidia.dali.ops import _registry

    from effnetv2.pipeline.loaders.backend import AugmentSpec
    from effnetv2.pipeline.loaders.dali.backend import DaliConfig, define_pipeline

    spec = AugmentSpec(64, train, policy, 9.0 if policy == "randaugment" and train else None, 2)
    cfg = DaliConfig(spec, device_id=0)
    pipe = define_pipeline(cfg, 4, source=lambda: None)
    pipe._build_graph()
    registry = {"cpu": set(_registry.cpu_ops()), "gpu": set(_registry.gpu_ops()), "mixed": set(_registry.mixed_ops())}
    image_ops, placement = set(), {}
    for op in pipe._ops:  # in topological order
        name, device = getattr(op._op, "schema_name", type(op._op).__name__), op._op.device
        placement[op.id] = device
        if name != "ExternalSource":
            assert name in registry[device], (name, device)
        if device == "mixed" or any(node.source.id in image_ops for node in op.inputs):
            image_ops.add(op.id)
            assert device in ("mixed", "gpu"), (name, device)
    assert [placement[i] for i in image_ops].count("mixed") == 1  # one decoder, the rest on the GPU
    assert len(image_ops) > (40 if train and policy == "randaugment" else 1)


def _keep_gpu_busy(seconds: float) -> None:
    """Queue about ``seconds`` of GPU work on torch's current stream (``torch.cuda._sleep``, calibrated)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10**7)
    end.record()
    end.synchronize()
    per_cycle = start.elapsed_time(end) / 1e3 / 1e7
    torch.cuda._sleep(int(seconds / per_cycle))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["dali", "opencv"])
def test_the_loader_runs_ahead_of_the_gpu_from_pinned_memory(small_shards, backend, monkeypatch):
    """The real path from shards to a mixed CUDA batch never waits for the GPU: with ~2 s of work queued on
    torch's stream, the next batch (DALI's outputs bound to torch's stream, or the DataLoader's pinned
    batch; targets; mixup and cutmix) is handed over while that work still runs, every host-to-device
    copy it made went from pinned memory without blocking, and torch's sync debug mode saw no sync."""
    import time

    from effnetv2.pipeline.loaders import build_train_loader

    loader = build_train_loader(small_shards, 16, 64, 9.0, 0.5, 0.5, backend=backend, device="cuda",
                                num_workers=2)
    assert loader.backend_name == backend
    batches = iter(loader)
    next(batches)  # builds the pipeline or starts the workers
    time.sleep(1.0)  # lets the loader's prefetching finish: the next batch waits on nothing but the handover
    torch.cuda.synchronize()
    copies, to = [], torch.Tensor.to

    def recorded_to(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type == "cuda":
            copies.append((tuple(self.shape), self.is_pinned(), kwargs.get("non_blocking", False)))
        return out

    monkeypatch.setattr(torch.Tensor, "to", recorded_to)
    _keep_gpu_busy(2.0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        t0 = time.perf_counter()
        images, targets = next(batches)
        handover_s = time.perf_counter() - t0
    finally:
        torch.cuda.set_sync_debug_mode("default")
    still_busy = not torch.cuda.current_stream().query()
    monkeypatch.undo()
    assert still_busy and handover_s < 1.0, handover_s
    assert copies and all(pinned and non_blocking for _, pinned, non_blocking in copies), copies
    if backend == "opencv":
        assert copies[0][0] == (16, 64, 64, 3)  # the images themselves come from the host
    torch.cuda.synchronize()
    assert images.is_cuda and images.shape == (16, 3, 64, 64) and torch.isfinite(images).all()
    assert torch.allclose(targets.sum(1), torch.ones(16, device="cuda"))
    batches.close()
    loader.close()


def test_a_sample_that_fools_the_header_check_is_found_and_dropped(tmp_path, photos, monkeypatch):
    """If DALI's decoder fails on a batch anyway, the backend finds the culprit, reports it with its
    shard and key, rebuilds the pipeline and continues at the same step (nothing repeated or lost)."""
    from effnetv2.pipeline.format.shards import ShardWriter
    from effnetv2.pipeline.loaders.dali import backend as dali_pipeline
    from effnetv2.pipeline.loaders.sampler import CorruptSampleWarning, SampleTable

    with ShardWriter(tmp_path / "train-000000.tar") as w:
        for i, img in enumerate(random_crops(photos, 8, seed=5)):
            data = jpeg_bytes(img)
            w.write(f"k{i}", {"jpg": data[: len(data) // 2] if i == 6 else data, "cls": str(i).encode()})
    check = dali_pipeline.checked_jpeg_size
    monkeypatch.setattr(dali_pipeline, "checked_jpeg_size", lambda data: check(bytes(data) + b"\xff\xd9"))
    table = SampleTable.from_shards([tmp_path / "train-000000.tar"], num_classes=8)
    from effnetv2.pipeline.loaders.backend import AugmentSpec

    backend = dali_pipeline.DaliBackend(table, AugmentSpec(32, False))
    with pytest.warns(CorruptSampleWarning, match=r"train-000000.tar sample 'k6'.*rejects"):
        got = [labels for _, labels in backend.batches(np.arange(8), 2, 0)]
    assert got == [[(0,), (1,)], [(2,), (3,)], [(4,), (5,)], [(), (7,)]]
    backend.close()
