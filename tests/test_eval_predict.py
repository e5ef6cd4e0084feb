"""``effnetv2 eval`` and ``effnetv2 predict`` on runs the trainer makes in the test, from real photos.

The shared run overfits three very different photos (hubble deep field, flower, coffee) at 40 px in 30
steps: with BatchNorm frozen (it normalises with its running statistics in training too) what the
network learns is what it predicts in eval mode; each photo is in the training set in colour and in grey,
so a grey file has a true class too. Eval's numbers are checked against the trainer's own evaluation
and against computations written out here (flip TTA, average precision through scikit-learn).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_shard_set, random_crops
from PIL import Image
from trainer_fixtures import DISTINCT, multilabel_shards, one_thread, photo_shards, tiny_config  # noqa: F401

from effnetv2.pipeline.format import read_shard_set
from effnetv2.pipeline.format.shards import ShardWriter, shard_name, write_manifest
from effnetv2.pipeline.loaders import build_eval_loader
from effnetv2.recipes.cli.main import main
from effnetv2.recipes.engine import checkpoint, distributed
from effnetv2.recipes.engine.evaluate import eval_loader
from effnetv2.recipes.engine.trainer import train
from effnetv2.recipes.inference.predict import load_image, to_input
from effnetv2.recipes.inference.run import CLASSES_FILE, load_run

CLASSES = 3
# overfit on purpose: no RandAugment, mixup or dropout, crops of 80-100 % and the whole image at eval
FIT = dict(epochs=10.0, image_size=(40, 40), eval_size=40, eval_crop=1.0, randaug_layers=0, randaug=(0.0, 0.0),
           dropout=(0.0, 0.0), crop_area=(0.8, 1.0), lr_per_256=0.1, warmup_epochs=1.0, label_smoothing=0.0,
           drop_path_rate=0.0, freeze_bn=True, ema_decay=0.9)


def _small(img: np.ndarray, width: int = 64) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((width, round(width * img.shape[0] / img.shape[1])),
                                                  Image.BILINEAR))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, photos):
    """A finished run on 3 photos (each 4x in colour, 4x in grey), its val split random crops of them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fitted")
    small = [_small(photos[i]) for i in DISTINCT[:CLASSES]]
    grey = [np.asarray(Image.fromarray(p).convert("L").convert("RGB")) for p in small]
    val = random_crops([photos[i] for i in DISTINCT[:CLASSES]], 16, seed=3, size=(48, 72))
    shards = make_shard_set(root / "shards", (small + grey) * 4, list(range(CLASSES)) * 8, CLASSES,
                            extra_splits={"val": (val, [i % CLASSES for i in range(16)])})
    result = train(tiny_config(shards, root / "run", **FIT))
    torch.set_num_threads(threads)
    stored = root / "run" / CLASSES_FILE  # what the trainer left, before any command could add it
    return SimpleNamespace(root=root, shards=shards, run=root / "run", result=result, small=small,
                           stored=json.loads(stored.read_text()) if stored.is_file() else None)


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory, photos):
    """A short run on the 21k-style multi-label set (6 classes, two labels per sample)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("multilabel")
    shards = multilabel_shards(root / "shards", photos)
    result = train(tiny_config(shards, root / "run", **{**FIT, "epochs": 2.0}))
    torch.set_num_threads(threads)
    return SimpleNamespace(shards=shards, run=root / "run", result=result)


def cli(capsys, *argv) -> tuple[int, str, str]:
    """``effnetv2 ARGV`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _eval_json(capsys, *argv) -> dict:
    code, out, err = cli(capsys, "eval", *argv, "--json", "-", "--no-progress")
    assert code == 0, err
    return json.loads(out)


# -- eval ---------------------------------------------------------------------------------------------
def test_eval_equals_the_trainers_final_evaluation(fitted, capsys, tmp_path):
    last = fitted.result.stages[-1]
    report = _eval_json(capsys, fitted.run)
    assert {k: report["metrics"][k] for k in last.keys() & report["metrics"].keys()} == {
        k: last[k] for k in ("top1", "top5", "eval_loss", "eval_samples", "eval_size")}
    assert report["metrics"]["eval_samples"] == 16 and report["metrics"]["top1"] >= 0.75
    # the run's defaults: its eval split, size and crop, the EMA weights of its newest checkpoint
    assert (report["split"], report["image_size"], report["crop_ratio"], report["weights"]) == ("val", 40, 1.0, "ema")
    assert report["checkpoint"] == str(fitted.result.checkpoint) and report["step"] == fitted.result.step == 30

    # the checkpoint named directly, text output and --json FILE: the same numbers
    code, out, err = cli(capsys, "eval", fitted.result.checkpoint, "--json", tmp_path / "r.json")
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["metrics"] == report["metrics"]
    m = report["metrics"]
    assert f"top-1 {100 * m['top1']:.2f}%  top-5 {100 * m['top5']:.2f}%  loss {m['eval_loss']:.4f}" in out
    assert "eval: 100%" in err  # the progress bar (imgs/s) goes to stderr
    raw = _eval_json(capsys, fitted.run, "--weights", "model")["metrics"]
    assert raw["eval_loss"] != m["eval_loss"]  # another set of weights


def test_flip_tta_is_the_mean_of_the_two_views(fitted, capsys, tmp_path):
    report = _eval_json(capsys, fitted.run, "--tta", "flip")
    assert report["tta"] == "flip"
    # by hand: two separate forward passes per batch (the image, then its mirror), their mean scored
    model = load_run(fitted.run).model
    loader = build_eval_loader(fitted.shards, 16, 40, crop_ratio=1.0, split="val", num_workers=0)
    correct = loss = n = 0.0
    with torch.no_grad():
        for x, targets, valid in loader:
            logits = (model(x) + model(torch.flip(x, dims=[3]))) / 2
            truth = targets.argmax(1)
            correct += float(((logits.argmax(1) == truth) & valid).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, truth, reduction="none")[valid].sum())
            n += float(valid.sum())
    loader.close()
    assert report["metrics"]["top1"] == correct / n and n == 16
    assert report["metrics"]["eval_loss"] == pytest.approx(loss / n, rel=1e-6)
    assert report["metrics"]["eval_loss"] != pytest.approx(fitted.result.stages[-1]["eval_loss"], rel=1e-6)

    # a mirror-symmetric image gives the same prediction with and without flip TTA; another one gives the
    # softmax of the mean of its two views
    half = fitted.small[1][:, :32]
    Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)).save(tmp_path / "symmetric.png")
    Image.fromarray(fitted.small[2]).save(tmp_path / "coffee.png")
    plain, flip = (_predict(capsys, fitted.run, tmp_path, *extra) for extra in ((), ("--tta", "flip")))
    assert plain["symmetric.png"] == pytest.approx(flip["symmetric.png"], abs=1e-6)
    x = to_input(load_image(tmp_path / "coffee.png", 40, 1.0)[None])
    with torch.no_grad():
        want = ((model(x) + model(x.flip(3))) / 2).softmax(1)[0]
    assert flip["coffee.png"] == pytest.approx(want.tolist(), abs=1e-6)


def _predict(capsys, run, folder: Path, *extra) -> dict[str, list[float]]:
    """Every class's score per file name (predict's JSON lines with --top-k = all classes)."""
    code, out, err = cli(capsys, "predict", run, folder, "--format", "jsonl", "--top-k", "100", "--no-progress",
                         *extra)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    return {Path(r["file"]).name: [t["score"] for t in sorted(r["top"], key=lambda t: t["index"])] for r in rows}


def test_per_class_table_and_confusion_matrix_sum_to_the_samples(fitted, capsys, tmp_path):
    code, out, err = cli(capsys, "eval", fitted.run, "--per-class", "--plot", tmp_path / "cm.png", "--json",
                         tmp_path / "r.json", "--no-progress")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    n, rows, confusion = report["metrics"]["eval_samples"], report["per_class"], np.array(report["confusion"])
    assert [r["name"] for r in rows] == list(read_shard_set(fitted.shards).classes) == ["c0", "c1", "c2"]
    assert [r["samples"] for r in rows] == [6, 5, 5] and sum(r["samples"] for r in rows) == n == 16
    assert confusion.shape == (3, 3) and confusion.sum() == n
    assert confusion.sum(1).tolist() == [r["samples"] for r in rows]
    assert np.trace(confusion) == sum(r["correct"] for r in rows) == round(report["metrics"]["top1"] * n)
    for r in rows:
        assert r["top1"] == r["correct"] / r["samples"]
        assert f"{r['name']:<12}  {r['samples']:>7}  {r['correct']:>7}  {100 * r['top1']:6.2f}%" in out
    with Image.open(tmp_path / "cm.png") as png:
        assert png.format == "PNG" and min(png.size) >= 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png", "r.json"]  # no temporary file left


def test_multilabel_map_matches_scikit_learn(multilabel, capsys):
    from sklearn.metrics import average_precision_score

    report = _eval_json(capsys, multilabel.run, "--per-class")
    m, last = report["metrics"], multilabel.result.stages[-1]
    assert report["multilabel"] and m["eval_samples"] == 16
    for key in ("top1", "top5", "precision@1", "precision@5", "eval_loss"):
        assert m[key] == last[key], key  # the trainer's numbers
    # by hand: softmax scores of every val sample, average precision per class by scikit-learn
    loaded = load_run(multilabel.run)
    cfg = loaded.cfg
    loader = eval_loader(cfg, read_shard_set(cfg.data), distributed.DistInfo(0, 1, 0, torch.device("cpu")), 6, 40)
    scores, labels = [], []
    with torch.no_grad():
        for x, targets, valid in loader:
            scores.append(loaded.model(x).softmax(1)[valid])
            labels.append(targets[valid] > 0)
    loader.close()
    scores, labels = torch.cat(scores).numpy(), torch.cat(labels).numpy()
    assert labels.sum(1).tolist() == [2] * 16 and labels.any(0).all()  # two labels each, every class present
    want = average_precision_score(labels, scores, average=None)
    got = [r["ap"] for r in report["per_class"]]
    assert got == pytest.approx(want.tolist(), abs=1e-12)
    assert m["mAP"] == pytest.approx(float(want.mean()), abs=1e-12) and m["map_classes"] == 6
    assert [r["positives"] for r in report["per_class"]] == labels.sum(0).tolist()
    assert m["top1"] == labels[np.arange(16), scores.argmax(1)].mean()  # top-1 is right if any label is
    code, _, err = cli(capsys, "eval", multilabel.run, "--plot", "x.png", "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "is multi-label" in err


_WORKER = textwrap.dedent("""
    import json, sys
    from effnetv2.recipes.cli import eval as eval_cli
    from effnetv2.recipes.engine import distributed

    parser = eval_cli.argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    info = distributed.init("cpu")
    reports = [eval_cli.evaluate_run(parser.parse_args(json.loads(a)), info) for a in sys.argv[1:]]
    if info.is_main:
        print("REPORTS", json.dumps(reports))
    distributed.shutdown()
""")


@pytest.mark.slow
def test_two_processes_count_every_sample_once(fitted, multilabel, capsys, tmp_path):
    """2 gloo ranks, batch 3 each: 16 samples are 8 per rank, the last batch of each padded by one."""
    runs = [[str(fitted.run), "--per-class", "--batch-size", "6", "--no-progress"],
            [str(multilabel.run), "--per-class", "--batch-size", "6", "--no-progress"]]
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *map(json.dumps, runs)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("REPORTS ")]
    two = json.loads(line[8:])
    for args, got in zip(runs, two):
        want = _eval_json(capsys, *args)
        assert got["world_size"] == 2 and want["world_size"] == 1
        for key in ("top1", "top5", "eval_samples", "precision@1", "precision@5"):
            assert got["metrics"].get(key) == want["metrics"].get(key), key
        assert got["metrics"]["eval_samples"] == 16
        assert got["metrics"]["eval_loss"] == pytest.approx(want["metrics"]["eval_loss"], rel=1e-5)
        if want["multilabel"]:
            assert got["metrics"]["mAP"] == pytest.approx(want["metrics"]["mAP"], abs=1e-6)
            assert [r["positives"] for r in got["per_class"]] == [r["positives"] for r in want["per_class"]]
        else:
            assert got["confusion"] == want["confusion"] and got["per_class"] == want["per_class"]


# -- predict ------------------------------------------------------------------------------------------
def test_predict_ranks_the_true_class_first_in_every_format(fitted, capsys, tmp_path):
    for i, img in enumerate(Image.fromarray(a) for a in fitted.small):
        img.save(tmp_path / f"{i}-rgb.jpg", quality=90)
        img.save(tmp_path / f"{i}.png")
        img.save(tmp_path / f"{i}.webp", quality=90)
        img.convert("CMYK").save(tmp_path / f"{i}-cmyk.jpg", quality=90)
        img.convert("L").save(tmp_path / f"{i}-grey.png")
        img.convert("L").save(tmp_path / f"{i}-grey.jpg", quality=90)
    with Image.open(tmp_path / "0-cmyk.jpg") as cmyk, Image.open(tmp_path / "0-grey.png") as grey:
        assert (cmyk.mode, grey.mode) == ("CMYK", "L")
    code, out, err = cli(capsys, "predict", fitted.run, tmp_path, "--format", "jsonl", "--out", tmp_path / "p.jsonl",
                         "--no-progress")
    assert code == 0 and out == "" and err == ""
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * CLASSES
    for row in rows:
        name = Path(row["file"]).name
        top = row["top"]
        assert len(top) == CLASSES and top[0]["index"] == int(name[0]), row  # the photo it is
        assert top[0]["class"] == f"c{name[0]}"  # named from the run's classes.json
        assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
        assert sum(t["score"] for t in top) == pytest.approx(1.0, abs=1e-5)
    # CSV to stdout: a header, then one row per image
    code, out, _ = cli(capsys, "predict", fitted.run, tmp_path / "1.png", tmp_path / "2-cmyk.jpg", "--top-k", "2",
                       "--no-progress")
    table = list(csv.reader(io.StringIO(out)))
    assert code == 0 and table[0] == ["file", "class_1", "index_1", "score_1", "class_2", "index_2", "score_2"]
    assert [(Path(r[0]).name, r[1], r[2]) for r in table[1:]] == [("1.png", "c1", "1"), ("2-cmyk.jpg", "c2", "2")]


def test_predict_prepares_an_image_as_the_eval_loader_does(photo_paths, tmp_path):
    """The photos' own JPEG bytes in a shard and on disk: the same input tensor, bit for bit, also where the
    loader decodes at a reduced scale (a 1411 px photo at 40 px decodes at 1/8)."""
    jpegs = [p for p in photo_paths if p.suffix == ".jpg"]
    with ShardWriter(tmp_path / shard_name("val", 0)) as w:
        for i, p in enumerate(jpegs):
            w.write(f"v{i:04d}", {"jpg": p.read_bytes(), "cls": b"0"})
    write_manifest(tmp_path, {"splits": {"val": {"num_samples": len(jpegs), "filenames": [shard_name("val", 0)],
                                                 "shard_lengths": [len(jpegs)]}}, "classes": ["a"]})
    assert max(max(Image.open(p).size) for p in jpegs) > 8 * 40
    for size in (40, 64, 224):
        loader = build_eval_loader(tmp_path, len(jpegs), size, num_workers=0, backend="opencv")
        ((x, _, _),) = list(loader)
        loader.close()
        assert torch.equal(to_input(np.stack([load_image(p, size) for p in jpegs])), x), size


def test_predict_skips_unreadable_files_and_says_so(fitted, capsys, tmp_path):
    Image.fromarray(fitted.small[0]).save(tmp_path / "good.png")
    (tmp_path / "notes.jpg").write_text("not an image")
    png = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "empty.webp").write_bytes(b"")
    code, out, err = cli(capsys, "predict", fitted.run, tmp_path, tmp_path / "missing.jpg", "--no-progress")
    assert code == 1
    assert [Path(r[0]).name for r in csv.reader(io.StringIO(out))][1:] == ["good.png"]
    lines = err.splitlines()
    assert len(lines) == 5 and lines[-1] == "effnetv2 predict: 4 of 5 input(s) could not be read; the others are written"
    for name in ("missing.jpg", "notes.jpg", "cut.png", "empty.webp"):
        (line,) = [x for x in lines if f"{name}:" in x]
        assert line.startswith(f"effnetv2 predict: {tmp_path / name}: ")


def test_class_names_stay_with_the_run(fitted, capsys, tmp_path):
    # the trainer stored the shard set's names at the start of the run
    assert fitted.stored["classes"] == ["c0", "c1", "c2"] and fitted.stored["data"] == str(fitted.shards)
    Image.fromarray(fitted.small[1]).save(tmp_path / "flower.png")
    state = checkpoint.load(fitted.result.checkpoint)

    def run_folder(name: str, data: Path, classes: bool) -> Path:
        state["config"]["data"] = str(data)
        checkpoint.save(tmp_path / name, {k: v for k, v in state.items() if k != "format"})
        if classes:
            shutil.copy(fitted.run / CLASSES_FILE, tmp_path / name / CLASSES_FILE)
        return tmp_path / name

    gone = tmp_path / "gone"  # the shard set moved away
    code, out, err = cli(capsys, "predict", run_folder("kept", gone, True), tmp_path / "flower.png", "--no-progress")
    assert code == 0 and err == "" and out.splitlines()[1].split(",")[1] == "c1"
    code, out, err = cli(capsys, "predict", run_folder("lost", gone, False), tmp_path / "flower.png", "--no-progress")
    assert code == 0 and out.splitlines()[1].split(",")[1] == "class_1"
    assert err.count("\n") == 1 and "no class names for the run" in err and str(gone) in err
    # an older run without classes.json whose shards are still there: stored on first use
    old = run_folder("old", fitted.shards, False)
    code, out, err = cli(capsys, "predict", old, tmp_path / "flower.png", "--no-progress")
    assert code == 0 and err == "" and out.splitlines()[1].split(",")[1] == "c1"
    assert json.loads((old / CLASSES_FILE).read_text())["classes"] == ["c0", "c1", "c2"]


# -- bad input ----------------------------------------------------------------------------------------
def test_bad_inputs_give_one_line_and_an_exit_status(fitted, capsys, tmp_path, photos):
    (tmp_path / "empty-run").mkdir()
    (tmp_path / "ckpt-000000001.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    other = photo_shards(tmp_path / "other", photos, classes=4, n_train=16, n_val=8)
    img = tmp_path / "x.png"
    Image.fromarray(fitted.small[0]).save(img)
    cases = [  # (argv, exit status, what the one line says)
        (["eval", tmp_path / "nothing-here"], 1, f"effnetv2 eval: {tmp_path / 'nothing-here'}: no such checkpoint"),
        (["predict", tmp_path / "empty-run", img], 1,
         f"effnetv2 predict: {tmp_path / 'empty-run'}: no checkpoint (ckpt-*.pt) in this folder"),
        (["export", tmp_path / "ckpt-000000001.pt", "--format", "safetensors", "--out", tmp_path / "m.safetensors"],
         1, f"effnetv2 export: {tmp_path / 'ckpt-000000001.pt'}: not a checkpoint that loads as data"),
        (["eval", fitted.run, "--model", "efficientnetv2-b0"], 1,
         f"effnetv2 eval: {fitted.result.checkpoint}: its ema weights are of model 'efficientnetv2-demo' (3 classes) "
         "and do not fit 'efficientnetv2-b0'"),
        (["eval", fitted.run, "--data", other], 1,
         f"effnetv2 eval: {other}: 4 classes, but the model in {fitted.result.checkpoint} has 3 outputs"),
        (["eval", fitted.run, "--split", "test"], 2, f"effnetv2 eval: {fitted.shards}: no split 'test'"),
        (["eval", fitted.run, "--crop-ratio", "1.5"], 2, "effnetv2 eval: --crop-ratio: crop_ratio must be in (0, 1]"),
        (["predict", fitted.run, img, "--top-k", "0"], 2, "effnetv2 predict: --top-k must be >= 1, got 0"),
    ]
    for argv, status, line in cases:
        code, out, err = cli(capsys, *argv, *(["--no-progress"] if argv[0] != "export" else []))
        assert code == status and err.startswith(line) and err.count("\n") == 1, (argv, code, err)
    # an unreadable image: its line, then the count (the exit status says that something failed)
    code, out, err = cli(capsys, "predict", fitted.run, tmp_path / "ckpt-000000001.pt", "--no-progress")
    assert code == 1 and err.splitlines() == [
        f"effnetv2 predict: {tmp_path / 'ckpt-000000001.pt'}: not an image format PIL can read",
        "effnetv2 predict: 1 of 1 input(s) could not be read; the others are written"]
    assert not (tmp_path / "m.safetensors").exists()
    code, _, err = cli(capsys, "export", fitted.run, "--format", "tflite", "--out", tmp_path / "m.tflite")
    assert code == 2 and "invalid choice: 'tflite'" in err
