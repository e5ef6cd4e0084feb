"""Export: each format loads back in the tool it is for and gives our outputs on real photos.

Models have random weights AND random BN statistics (``randomise``), so that a wrong name mapping or padding
cannot hide behind identity BatchNorm. The timm check runs timm where it imports, else in the interpreter
named by ``EFFNETV2_PEER_PYTHON`` (torch + timm; effnetv2 not needed), else it is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from effnetv2.model import CONFIGS, EfficientNetV2, create_model, load_weights
from effnetv2.model.config_file import config_from_dict
from effnetv2.model.make_timm_manifest import MANIFEST, randomise
from effnetv2.pipeline.loaders.geometry import centre_crop_window, eval_crop_ratio
from effnetv2.recipes.inference import export
from effnetv2.recipes.inference.export import ExportError, ExportMeta, export_model

CLASSES = ["cat", "coffee", "rocket", "space"]
TOL = 1e-4  # fp32, eval: the bar the issue sets for every format


def _model(name: str, tf_padding: bool, num_classes: int = 4) -> EfficientNetV2:
    torch.manual_seed(0)
    model = create_model(name, num_classes, tf_padding=tf_padding).eval()
    randomise(model)
    return model


def _batch(photos: list[np.ndarray], info: dict) -> torch.Tensor:
    """The photos prepared as the export's JSON says: centre crop, resize, (x/255 - mean) / std, NCHW."""
    p = info["preprocess"]
    size, mean, std = p["image_size"], np.array(p["mean"]), np.array(p["std"])
    out = []
    for img in photos:
        x0, y0, w, h = centre_crop_window(img.shape[0], img.shape[1], p["crop_ratio"])
        crop = Image.fromarray(img[y0:y0 + h, x0:x0 + w]).resize((size, size), Image.BILINEAR)
        out.append((np.asarray(crop) / 255.0 - mean) / std)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().contiguous()


@torch.no_grad()
def _outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def test_safetensors_round_trip_and_the_json(photos, tmp_path):
    model = _model("efficientnetv2-demo", tf_padding=False)
    done = export_model(model, "safetensors", tmp_path / "demo.safetensors",
                        meta=ExportMeta(classes=CLASSES, source="test"))
    info = json.loads(done.sidecar.read_text())
    assert done.sidecar == tmp_path / "demo.safetensors.json" and info == done.info
    assert info["classes"] == CLASSES and info["architecture"] == "efficientnetv2-demo" and not info["official"]
    p = info["preprocess"]
    size = CONFIGS["efficientnetv2-demo"].eval_size
    assert p["image_size"] == size and p["crop_ratio"] == eval_crop_ratio(size) and p["channels"] == "RGB"
    u8 = np.arange(256, dtype=np.float64)  # the JSON's mean/std are the loaders' (u8 - 128) / 128
    np.testing.assert_allclose((u8 / 255 - p["mean"][0]) / p["std"][0], (u8 - 128) / 128, atol=1e-12)

    # the JSON alone rebuilds the network; load_weights reads the file; outputs are identical
    fresh = create_model(config_from_dict(info["config"]), info["num_classes"],
                         tf_padding=info["tf_padding"], bn_eps=info["bn_eps"]).eval()
    load_weights(fresh, done.path)
    x = _batch(photos, info)
    assert torch.equal(_outputs(fresh, x), _outputs(model, x))
    assert sorted(q.name for q in tmp_path.iterdir()) == ["demo.safetensors", "demo.safetensors.json"]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("tf_padding", [False, True])
def test_torchscript_matches_pytorch(photos, tmp_path, tf_padding):
    model = _model("efficientnetv2-demo", tf_padding)
    done = export_model(model, "torchscript", tmp_path / "demo.pt", meta=ExportMeta(classes=CLASSES))
    extra = {export.TORCHSCRIPT_EXTRA: ""}
    loaded = torch.jit.load(str(done.path), _extra_files=extra)
    assert json.loads(extra[export.TORCHSCRIPT_EXTRA]) == done.info
    x = _batch(photos, done.info)
    for batch in (x, x[:1]):  # traced at batch 2: other batch sizes must work
        assert (_outputs(loaded, batch) - _outputs(model, batch)).abs().max().item() <= TOL
    other = _batch(photos, {**done.info, "preprocess": {**done.info["preprocess"], "image_size": 64}})
    if tf_padding:  # padding amounts were fixed at the export size: another size is refused, not padded wrongly
        size = done.info["preprocess"]["image_size"]
        with pytest.raises(torch.jit.Error, match=f"{size}x{size} inputs only"):
            loaded(other)
    else:
        assert (_outputs(loaded, other) - _outputs(model, other)).abs().max().item() <= TOL


def test_onnx_matches_pytorch_in_onnxruntime(photos, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (dev extra)")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed: torch's ONNX exporter needs it")
    onnx = pytest.importorskip("onnx", reason="onnx is not installed")
    model = _model("efficientnetv2-demo", tf_padding=True)
    done = export_model(model, "onnx", tmp_path / "demo.onnx", meta=ExportMeta(classes=CLASSES))
    proto = onnx.load(str(done.path))
    assert {o.domain: o.version for o in proto.opset_import}[""] == export.ONNX_OPSET
    assert json.loads({p.key: p.value for p in proto.metadata_props}["effnetv2"]) == done.info
    session = ort.InferenceSession(str(done.path), providers=["CPUExecutionProvider"])
    x = _batch(photos, done.info)
    for batch in (x, x[:1]):  # dynamic batch axis
        (got,) = session.run([export.OUTPUT_NAME], {export.INPUT_NAME: batch.numpy()})
        assert np.abs(got - _outputs(model, batch).numpy()).max() <= TOL


@pytest.mark.parametrize("tf_padding", [False, True])
def test_timm_layout_reads_back_through_load_weights(photos, tmp_path, tf_padding):
    model = _model("efficientnetv2-b0", tf_padding)
    done = export_model(model, "timm", tmp_path / "b0.safetensors", meta=ExportMeta(image_size=64))
    from safetensors.torch import load_file

    keys = set(load_file(str(done.path)))
    assert keys == set(json.loads(MANIFEST.read_text())["models"]["tf_efficientnetv2_b0"]["keys"])
    assert done.info["timm"]["model_name"] == "tf_efficientnetv2_b0"
    assert ("pad_type" in done.info["timm"]["create_model"]) == (not tf_padding)
    assert "timm.create_model('tf_efficientnetv2_b0', pretrained=True, num_classes=4" in done.describe()
    assert str(done.path.resolve()) in done.describe()  # the printed call names the file wherever it runs
    fresh = create_model("efficientnetv2-b0", 4, tf_padding=tf_padding).eval()
    load_weights(fresh, done.path)  # detects the timm layout and maps it back
    x = _batch(photos, done.info)
    assert torch.equal(_outputs(fresh, x), _outputs(model, x))


_PEER = r"""
import json, sys
from pathlib import Path
import timm, torch
from safetensors.torch import load_file, save_file
sidecar, inputs, outputs = map(Path, sys.argv[1:])
spec = json.loads(sidecar.read_text())["timm"]
kwargs = dict(spec["create_model"])
overlay = dict(kwargs.pop("pretrained_cfg_overlay"), file=str(sidecar.parent / spec["create_model"]["pretrained_cfg_overlay"]["file"]))
model = timm.create_model(spec["model_name"], pretrained_cfg_overlay=overlay, **kwargs).eval()
with torch.no_grad():
    save_file({"y": model(load_file(str(inputs))["x"]).contiguous()}, str(outputs))
config = timm.data.resolve_data_config(model=model)
print(json.dumps({"timm": timm.__version__, "torch": torch.__version__, "data_config": config,
                  "label_names": model.pretrained_cfg.get("label_names")}))
"""


def _timm_python() -> str:
    """An interpreter where timm imports: this one, else $EFFNETV2_PEER_PYTHON; skips with the reason."""
    try:
        import timm  # noqa: F401
        return sys.executable
    except Exception as e:  # noqa: BLE001 - timm is optional; anything its import raises means "not here"
        reason = f"timm does not import here ({type(e).__name__}: {e})"
    peer = os.environ.get("EFFNETV2_PEER_PYTHON")
    if not peer:
        pytest.skip(f"{reason}; set EFFNETV2_PEER_PYTHON to an interpreter with torch and timm")
    return peer


@pytest.mark.parametrize("name, tf_padding", [("efficientnetv2-s", True), ("efficientnetv2-b0", False)])
def test_timm_loads_the_export_and_matches(photos, tmp_path, name, tf_padding):
    python = _timm_python()
    model = _model(name, tf_padding)
    done = export_model(model, "timm", tmp_path / "w.safetensors", meta=ExportMeta(classes=CLASSES, image_size=96))
    x = _batch(photos, done.info)
    from safetensors.torch import load_file, save_file

    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    (tmp_path / "peer.py").write_text(_PEER)
    proc = subprocess.run([python, str(tmp_path / "peer.py"), str(done.sidecar), str(tmp_path / "x.safetensors"),
                           str(tmp_path / "y.safetensors")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{python}: {proc.stderr[-3000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    got, want = load_file(str(tmp_path / "y.safetensors"))["y"], _outputs(model, x)
    assert want.abs().max().item() > 1000 * TOL  # the bar is far below the size of the logits
    assert (got - want).abs().max().item() <= TOL
    p, config = done.info["preprocess"], report["data_config"]  # timm prepares images as we do
    assert config["input_size"] == [3, 96, 96] and config["crop_pct"] == p["crop_ratio"]
    assert config["mean"] == p["mean"] and config["std"] == p["std"] and config["interpolation"] == "bilinear"
    assert report["label_names"] == CLASSES


def test_timm_refuses_what_timm_cannot_build(tmp_path):
    with pytest.raises(ExportError, match="efficientnetv2-demo is not an official EfficientNetV2 architecture"):
        export_model(_model("efficientnetv2-demo", True), "timm", tmp_path / "demo.safetensors")
    custom = EfficientNetV2(replace(CONFIGS["efficientnetv2-b0"], head_ch=1024), 4, tf_padding=True)
    with pytest.raises(ExportError, match="differ from the official efficientnetv2-b0"):
        export_model(custom, "timm", tmp_path / "custom.safetensors")
    assert list(tmp_path.iterdir()) == []  # refused before any file was touched


def test_bad_requests_name_the_problem(tmp_path):
    model = _model("efficientnetv2-demo", False)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ExportError, match=r"a-file/m\.pt: cannot write here"):
        export_model(model, "torchscript", tmp_path / "a-file" / "m.pt")
    with pytest.raises(ExportError, match="is a folder"):
        export_model(model, "torchscript", tmp_path)
    with pytest.raises(ExportError, match=r"must be named \*\.safetensors"):
        export_model(model, "safetensors", tmp_path / "m.pt")
    with pytest.raises(ExportError, match="3 class names for a model with 4 classes"):
        export_model(model, "safetensors", tmp_path / "m.safetensors", meta=ExportMeta(classes=CLASSES[:3]))
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_model(model, "tflite", tmp_path / "m.tflite")
    assert [q.name for q in tmp_path.iterdir()] == ["a-file"]


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    model = _model("efficientnetv2-demo", False)
    out = tmp_path / "m.safetensors"
    good = export_model(model, "safetensors", out)
    before = out.read_bytes(), good.sidecar.read_bytes()

    def disk_full(net, path: Path, info) -> None:
        path.write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_write_safetensors", disk_full)
    with pytest.raises(ExportError, match="m.safetensors: cannot write: No space left on device"):
        export_model(model, "safetensors", out, meta=ExportMeta(classes=CLASSES))
    assert (out.read_bytes(), good.sidecar.read_bytes()) == before
    assert sorted(q.name for q in tmp_path.iterdir()) == ["m.safetensors", "m.safetensors.json"]


# -- the command: effnetv2 export CKPT_OR_RUN --format ... --out FILE ------------------------------------
@pytest.fixture(scope="module")
def short_run(tmp_path_factory, photos):
    """Two steps of the trainer (its checkpoint, config.json and classes.json): what the command reads."""
    from trainer_fixtures import photo_shards, tiny_config

    from effnetv2.recipes.engine.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export-run")
    shards = photo_shards(root / "shards", photos, classes=2, n_train=16, n_val=8)
    result = train(tiny_config(shards, root / "run", stop_at=2))
    torch.set_num_threads(threads)
    return result


def _cli(capsys, *argv) -> tuple[int, str, str]:
    from effnetv2.recipes.cli.main import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_export_command_round_trips_through_load_weights(short_run, photos, tmp_path, capsys):
    from effnetv2.recipes.engine import checkpoint
    from effnetv2.recipes.inference.run import load_run

    run = short_run.out
    code, out, err = _cli(capsys, "export", run, "--format", "safetensors", "--out", tmp_path / "m.safetensors")
    assert code == 0 and err == "", err
    assert out.startswith(f"wrote {tmp_path / 'm.safetensors'} (safetensors, efficientnetv2-demo, 2 classes)")
    info = json.loads((tmp_path / "m.safetensors.json").read_text())
    assert info["classes"] == ["c0", "c1"]  # the run's classes.json
    assert info["preprocess"]["image_size"] == 40 and info["preprocess"]["crop_ratio"] == 40 / 72  # its eval
    assert info["source"] == f"{short_run.checkpoint} (ema weights, step 2)"
    model = load_run(run).model.to(memory_format=torch.contiguous_format)  # the trainer's is channels_last
    fresh = create_model(config_from_dict(info["config"]), info["num_classes"], tf_padding=info["tf_padding"],
                         bn_eps=info["bn_eps"]).eval()
    load_weights(fresh, tmp_path / "m.safetensors")
    x = _batch(photos, info)
    assert torch.equal(_outputs(fresh, x), _outputs(model, x))
    # --weights model: the raw weights of the checkpoint
    code, _, err = _cli(capsys, "export", short_run.checkpoint, "--format", "safetensors", "--weights", "model",
                        "--out", tmp_path / "raw.safetensors")
    assert code == 0, err
    load_weights(fresh, tmp_path / "raw.safetensors")
    raw = checkpoint.load(short_run.checkpoint)["model"]
    assert all(torch.equal(v, raw[k]) for k, v in fresh.state_dict().items())
    assert any(not torch.equal(v, raw[k]) for k, v in model.state_dict().items() if v.is_floating_point())


def test_export_command_onnx_matches_in_onnxruntime(short_run, photos, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (dev extra)")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed: torch's ONNX exporter needs it")
    from effnetv2.recipes.inference.run import load_run

    code, out, err = _cli(capsys, "export", short_run.out, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert code == 0, err
    info = json.loads((tmp_path / "m.onnx.json").read_text())
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = _batch(photos, info)
    (got,) = session.run([export.OUTPUT_NAME], {export.INPUT_NAME: x.numpy()})
    assert np.abs(got - _outputs(load_run(short_run.out).model, x).numpy()).max() <= TOL


def test_export_command_refuses_in_one_line(short_run, tmp_path, capsys):
    code, out, err = _cli(capsys, "export", short_run.out, "--format", "timm", "--out", tmp_path / "t.safetensors")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("effnetv2 export: efficientnetv2-demo is not an official EfficientNetV2 architecture")
    code, _, err = _cli(capsys, "export", tmp_path / "no-run", "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert code == 1 and err == f"effnetv2 export: {tmp_path / 'no-run'}: no such checkpoint or run folder\n"
    code, _, err = _cli(capsys, "export", short_run.out, "--format", "onnx")
    assert code == 2 and "the following arguments are required: --out" in err
    assert list(tmp_path.iterdir()) == []
