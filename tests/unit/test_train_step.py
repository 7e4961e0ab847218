"""Our training step (losses summed on the device, no host sync per step) does the same math as the
torchvision-references loop that bench/gpu_train.py times it against."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instseg.engine.loops import NonFiniteLossError, train_one_epoch
from instseg.metrics.names import TRAIN_LOSS, train_key
from tests.helpers import BENCH, load_bench, tiny_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bench():
    return load_bench()


def test_our_step_matches_the_reference_loop_in_fp32(bench):
    batches = bench.synthetic_batches(3, 2, 128)
    ours_model, reference_model = tiny_model(), tiny_model()
    ours_optimizer, reference_optimizer = (
        bench.reference_optimizer(ours_model),
        bench.reference_optimizer(reference_model),
    )
    torch.manual_seed(7)  # proposal and RoI sampling draw from the global generator: the same draws for both
    ours = train_one_epoch(ours_model, ours_optimizer, batches, CPU, log_every=2)
    torch.manual_seed(7)
    reference = bench.reference_train_steps(
        reference_model, reference_optimizer, bench.as_reference_batches(batches), CPU
    )
    assert ours[TRAIN_LOSS] == pytest.approx(sum(reference) / len(reference), rel=1e-5)
    assert ours[train_key("loss_mask")] > 0
    for (name, ours_param), reference_param in zip(ours_model.named_parameters(), reference_model.parameters()):
        assert torch.allclose(ours_param, reference_param, atol=1e-6), name


def test_a_non_finite_loss_stops_the_epoch_without_a_sync_per_step(bench):
    model = tiny_model()
    with torch.no_grad():
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.fill_(float("nan"))
    optimizer = bench.reference_optimizer(model)
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan by step 2 .*loss_mask': nan"):
        train_one_epoch(model, optimizer, bench.synthetic_batches(2, 1, 128), CPU, log_every=10)


def test_bench_self_test_runs_on_cpu(tmp_path):
    """bench/gpu_train.py --device cpu --arch tiny: every section that runs without a GPU, in a few seconds."""

    out = tmp_path / "rows.json"
    command = [
        sys.executable,
        str(BENCH),
        "--device",
        "cpu",
        "--arch",
        "tiny",
        "--size",
        "96",
        "--batch",
        "1",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--val-warmup",
        "1",
        "--val-batches",
        "1",
        "--sections",
        "train",
        "validate",
        "levers",
        "syncs",
        "--json",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failed" not in done.stdout, done.stdout
    rows = json.loads(out.read_text())
    assert {row["section"] for row in rows} == {"train", "validate", "levers", "syncs"}
    syncs = {row["loop"]: row for row in rows if row["section"] == "syncs"}
    # our loop reads no loss per step and our RPN filters without a sync: fewer waits than the reference
    assert 0 < syncs["ours"]["total"] < syncs["reference"]["total"]
    assert not [place for place in syncs["ours"]["by_function"] if place.startswith(("loops.py", "boxes.py"))]
    assert syncs["reference"]["by_function"]["gpu_train.py:reference_train_steps"] > 0


def _module(name: str, file: Path, source: str) -> dict:
    """Functions that run as if defined in module `name`, loaded from `file`."""
    namespace = {"__name__": name, "torch": torch}
    exec(compile(source, str(file), "exec"), namespace)
    return namespace


def test_host_waits_are_charged_by_module_not_by_path(bench, tmp_path):
    """A checkout whose .venv lives under folders named instseg, torchvision and gpu_train (a clone into
    ~/instseg): torch's own frames there are still not ours, and the wait is charged to the instseg function
    that called into torch."""
    site = tmp_path / "instseg" / "torchvision" / "gpu_train" / ".venv" / "lib" / "python3.11" / "site-packages"
    in_torch = _module(
        "torch._fake_ops", site / "torch" / "_fake_ops.py", "def inner():\n    torch.ones(3).nonzero()\n"
    )
    ours = _module("instseg.engine.fake_loop", tmp_path / "src" / "fake_loop.py", "def outer(f):\n    f()\n")
    with bench.SyncCounter() as counter:
        ours["outer"](in_torch["inner"])
    assert dict(counter.calls) == {"fake_loop.py:outer": 1}
    with bench.SyncCounter() as counter:
        in_torch["inner"]()  # called from this test: nobody's
    assert dict(counter.calls) == {"?": 1}


def test_bf16_autocast_gives_the_fp32_losses_to_bf16_tolerance(bench):
    """Boxes are decoded in float32 under autocast (instseg.models.box_coding): with torchvision's bf16
    decoding, loss_box_reg on this batch is 12% off its fp32 value, and detections come out in bf16."""
    images, targets = bench.synthetic_batches(1, 2, 128)[0]
    images = [image.float() / 255 for image in images]
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model().train()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is torch.bfloat16):
            losses[dtype] = {key: value.item() for key, value in model(images, targets).items()}
    for key, value in losses[torch.float32].items():
        assert losses[torch.bfloat16][key] == pytest.approx(value, rel=0.01), key
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        detections = model.eval()([images[0]])[0]
    assert detections["boxes"].dtype == torch.float32
