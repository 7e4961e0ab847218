"""The markdown a flow run leaves in the Prefect UI: trials best first with why each ended and a link to its
MLflow run when the server is reachable over HTTP; the promotion decision with both sides' numbers."""

from flows.reports import promotion_markdown, run_link, trials_markdown
from tuning.summary import TrialSummary, TuneSummary


def test_trials_are_listed_best_first_with_links_on_an_http_server():
    trials = [
        TrialSummary(
            "t-low",
            "a" * 32,
            {"train.lr": 0.001},
            2,
            0.1,
            0.15,
            "stopped_early",
            "stopped by the asha scheduler after epoch 2",
        ),
        TrialSummary("t-high", "b" * 32, {"train.lr": 0.002}, 4, 0.5, 0.6, "completed", "all 4 epochs"),
        TrialSummary("t-err", None, {"train.lr": 0.003}, 0, None, None, "error", "RuntimeError: boom"),
    ]
    summary = TuneSummary("p" * 32, "http://127.0.0.1:5000", "t-high", "b" * 32, {}, 0.6, "runs:/b/bundle", trials)
    rows = [line for line in trials_markdown(summary, "7").splitlines() if line.startswith("| `t-")]
    assert [row.split("`")[1] for row in rows] == ["t-high", "t-low", "t-err"]
    assert (
        "| completed | 4 | 0.60000 | train.lr=0.002 | all 4 epochs | [bbbbbbbb](http://127.0.0.1:5000/#/experiments/7/runs/"
        in rows[0]
    )
    assert rows[2].endswith("| error | 0 | - | train.lr=0.003 | RuntimeError: boom | - |")
    assert run_link("sqlite:////tmp/m.db", "7", "c" * 32) == f"`{'c' * 32}`"  # no server to link to


def test_the_promotion_decision_shows_both_sides_and_the_data():
    result = {
        "model_name": "m",
        "challenger_version": "3",
        "challenger_fitness": 0.5,
        "champion_version": "2",
        "champion_fitness": 0.55,
        "promoted": False,
        "champion_after": "2",
        "challenger_metrics": {"val/segm_map": 0.41},
        "champion_metrics": {"val/segm_map": 0.45},
        "split": "val",
        "data_fingerprint": "abc123",
        "min_improvement": 0.01,
        "decided_by": "instseg promote by me@host (pid 1)",
        "decided_at": "2026-11-28T01:00:00+0000",
        "record_run_id": "r" * 32,
    }
    text = promotion_markdown(result)
    assert text.startswith("# m: kept champion\n")
    assert "split `val` of the dataset with fingerprint `abc123` (minimum gain 0.01); `champion` is now v2" in text
    assert "by instseg promote by me@host (pid 1)" in text and f"MLflow run `{'r' * 32}`" in text
    assert "| fitness | 0.50000 | 0.55000 |" in text and "| val/segm_map | 0.41000 | 0.45000 |" in text
