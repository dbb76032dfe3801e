"""The pipeline report: written from the metadata store, and rendered by a real headless browser
(Debian's chromium) with every plot decoded."""

import os
import shutil
import subprocess

import numpy as np
import pytest

from pipeline.artifacts import MODEL, MODEL_BLESSING, MODEL_EVALUATION, PUSHED_MODEL, Artifact
from pipeline.metadata import MetadataStore
from pipeline.report import paper_points, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _record_run(store, root, clean, robust, with_metrics=True):
    run_id = store.start_run("report-test", str(root), code_version="c0de" * 16, git_commit="abc")
    trainer = store.start_execution(run_id, "Trainer", {}, f"t{run_id}", {})
    model_dir = root / f"model{run_id}"
    model_dir.mkdir()
    if with_metrics:
        (model_dir / "metrics.csv").write_text(
            "epoch,loss,clean_acc,val_clean_acc_advbn,val_pgd5_acc_advbn,lr\n"
            "1,4.5,0.12,0.15,0.09,0.1\n2,3.1,0.16,0.20,0.11,0.1\n3,2.7,0.19,0.26,0.14,0.01\n")
    model = store.complete_execution(trainer, {"model": Artifact(
        MODEL, str(model_dir), {"method": "arat", "model": "resnet", "dataset": "cifar10"},
        "m" * 64)})["model"]
    evaluator = store.start_execution(run_id, "Evaluator", {}, f"e{run_id}", {"model": model})
    per_attack = [{"name": "pgd10", "robust_accuracy": robust + 0.02},
                  {"name": "apgd-ce", "robust_accuracy": robust}]
    outputs = store.complete_execution(evaluator, {
        "evaluation": Artifact(MODEL_EVALUATION, str(root / f"evaluation{run_id}"), {
            "dataset": "cifar10", "clean_accuracy": clean, "robust_accuracy": robust,
            "n_examples": 500, "suite": "pgd10+apgd-ce", "eps": 8 / 255, "norm": "linf",
            "branch": "adv", "per_attack": per_attack, "evaluation_key": "k"}, "e" * 64),
        "blessing": Artifact(MODEL_BLESSING, str(root / f"blessing{run_id}"),
                             {"blessed": True, "reasons": ["no model is pushed yet"]}, "b" * 64)})
    pusher = store.start_execution(run_id, "Pusher", {}, f"p{run_id}", outputs)
    store.complete_execution(pusher, {"pushed_model": Artifact(
        PUSHED_MODEL, str(root / f"push{run_id}"),
        {"pushed": True, "version": run_id, "serving_path": str(root / "serving" / str(run_id))},
        "p" * 64)})
    store.finish_run(run_id, "complete")
    return run_id


@pytest.fixture
def report(tmp_path):
    store = MetadataStore(str(tmp_path / "metadata.sqlite"))
    _record_run(store, tmp_path, 0.30, 0.19)
    run_id = _record_run(store, tmp_path, 0.35, 0.21)
    path = write_report(store, run_id, str(tmp_path))
    store.close()
    return path


def test_report_files_and_content(report):
    directory = os.path.dirname(report)
    assert sorted(os.listdir(directory)) == ["attacks.png", "index.html", "tradeoff.png",
                                             "training_curves.png"]
    text = open(report).read()
    for expected in ("run 2", "35.00%", "apgd-ce", "BLESSED", "version 2",
                     "src='tradeoff.png'", "src='attacks.png'", "src='training_curves.png'",
                     "reference, not a like-for-like"):
        assert expected in text
    assert len(paper_points("cifar10")) == 9 and paper_points("mnist") == []


def _chromium(*args):
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y "
                                             "chromium): the report's browser test cannot run")
def test_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    url = "file://" + os.path.abspath(report)
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # Set by the page's script once every <img> has decoded (naturalWidth > 0).
    assert 'data-images-loaded="true"' in dom.stdout, dom.stdout[:2000]

    screenshot = tmp_path / "report.png"
    shot = _chromium(f"--screenshot={screenshot}", "--window-size=1200,2600", url)
    assert shot.returncode == 0 and screenshot.exists(), shot.stderr[-2000:]
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    assert pixels.std() > 20  # not a blank page
    # The plots' colours are on screen: matplotlib's red (this run's star, the attack bars),
    # green (the clean bar) and blue (the paper's points).
    for colour in ((214, 39, 40), (44, 160, 44), (31, 119, 180)):
        close = (np.abs(pixels - colour).sum(axis=-1) < 30).sum()
        assert close > 200, f"colour {colour} not found in the screenshot: a plot did not render"


def test_a_broken_image_is_detected(report, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    os.remove(os.path.join(os.path.dirname(report), "attacks.png"))
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", "file://" + os.path.abspath(report))
    assert 'data-images-loaded="false"' in dom.stdout
