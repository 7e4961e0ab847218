"""A training checkpoint holds everything a resume needs, and loads with weights_only=True."""

import torch

from instseg.engine.checkpoint import load_checkpoint, save_checkpoint


def test_checkpoint_holds_everything_a_resume_needs(tmp_path):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(
        tmp_path,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        epoch=3,
        config={"seed": 0},
        label_map={"names": ["a"]},
        metrics={"fitness": 0.5},
        early_stopping={"best": 0.5},
        scaler={"scale": 1024.0},
        results=[{"epoch": 1, "train/loss": 2.0}, {"epoch": 2, "train/loss": 1.5}],
    )
    state = load_checkpoint(tmp_path)  # weights_only=True: plain tensors and builtins only
    assert state["epoch"] == 3 and state["scaler"] == {"scale": 1024.0} and state["early_stopping"] == {"best": 0.5}
    assert state["results"] == [{"epoch": 1, "train/loss": 2.0}, {"epoch": 2, "train/loss": 1.5}]
    assert set(state) == {
        "model",
        "optimizer",
        "scheduler",
        "epoch",
        "config",
        "label_map",
        "metrics",
        "early_stopping",
        "scaler",
        "results",
    }
