import json
import re
import subprocess
import sys

import pytest

from instseg.config import Config, apply_overrides, flatten, load, resolve_paths
from instseg.errors import ConfigError
from instseg.redaction import redact, redact_tree
from tests.helpers import DEMO_CONFIG


def test_demo_config_loads_and_every_key_is_documented():
    cfg = load(DEMO_CONFIG)
    assert cfg.model.arch == "tiny" and cfg.tune.num_samples >= 4
    # every section and key (not the entries of a mapping value) carries a `# description`
    key_lines = [line for line in DEMO_CONFIG.read_text().splitlines() if re.match(r"^ {0,2}\w+:", line)]
    undocumented = [line for line in key_lines if "#" not in line]
    assert len(key_lines) > 40 and not undocumented, undocumented


def test_overrides_parse_yaml_values():
    cfg = load(DEMO_CONFIG, ["train.epochs=7", "ray.use_gpu=true", "run_name=abc", "ray.address=null"])
    assert (cfg.train.epochs, cfg.ray.use_gpu, cfg.run_name, cfg.ray.address) == (7, True, "abc", None)


def test_unknown_key_names_the_closest_key_or_the_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load(DEMO_CONFIG, ["train.epochz=3"])
    assert str(err.value).endswith("unknown config key 'train.epochz' (did you mean train.epochs?)")
    with pytest.raises(ConfigError) as err:
        load(DEMO_CONFIG, ["train.speed=3"])
    message = str(err.value)
    assert "train.speed" in message and "epochs" in message and "lr" in message


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        load(DEMO_CONFIG, ["train.epochs=many"])
    assert "train.epochs" in str(err.value) and "many" in str(err.value)


def test_search_space_keys_must_be_config_keys():
    with pytest.raises(ConfigError, match="train.lrr"):
        load(DEMO_CONFIG, ["tune.search_space={train.lrr: {type: uniform, low: 0.1, high: 0.2}}"])


@pytest.mark.parametrize(
    "space, expected",
    [
        ("{train.lr: {type: choice, values: []}}", "tune.search_space.train.lr: type choice needs a non-empty"),
        (
            "{train.lr: {type: uniform, low: 0.2, high: 0.1}}",
            "tune.search_space.train.lr: type uniform needs low < high",
        ),
        ("{train.lr: {type: loguniform, low: 0, high: 0.1}}", "tune.search_space.train.lr: loguniform needs low > 0"),
        ("{train.epochs: {type: randint, low: 0, high: 3}}", "tune.search_space.train.epochs: "),
        ("{data.hflip_prob: {type: choice, values: [0.5, 2]}}", "tune.search_space.data.hflip_prob: "),
    ],
)
def test_a_search_space_is_checked_once_when_the_config_loads(space, expected):
    # every value a dimension can produce must be valid for its key: refused before any command runs
    with pytest.raises(ConfigError) as err:
        load(DEMO_CONFIG, [f"tune.search_space={space}"])
    assert str(err.value).startswith(expected), str(err.value)


def test_apply_overrides_validates_sampled_parameters():
    cfg = load(DEMO_CONFIG)
    assert apply_overrides(cfg, {"train.lr": 0.5}).train.lr == 0.5
    with pytest.raises(ConfigError, match="train.optimizer"):
        apply_overrides(cfg, {"train.optimizer": "lion"})


def test_flatten_gives_dotted_scalars():
    flat = flatten(Config())
    assert flat["train.lr"] == Config().train.lr
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in flat.values())


def test_resolve_paths_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = resolve_paths(load(DEMO_CONFIG), base=tmp_path)
    assert cfg.data.root == str(tmp_path / "data" / "synth")
    assert cfg.ray.storage_path == str(tmp_path / "ray_results")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    given = resolve_paths(load(DEMO_CONFIG, ["tracking.uri=http://127.0.0.1:5000"]), base=tmp_path)
    assert given.tracking.uri == "http://127.0.0.1:5000"


def test_inside_a_ray_job_copy_relative_paths_that_would_miss_or_lose_data_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job_copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_123"
    job_copy.mkdir(parents=True)
    cfg = load(DEMO_CONFIG, [])  # data/synth, ray_results, sqlite:///mlflow.db: all relative
    with pytest.raises(ConfigError) as refused:
        resolve_paths(cfg, job_copy)
    message = str(refused.value)
    assert message.startswith("data.root 'data/synth' is relative, and inside a Ray job it resolves against")
    assert "e.g. data.root=$PWD/data/synth (also: ray.storage_path=$PWD/ray_results" in message
    assert "tracking.uri=sqlite:///$PWD/mlflow.db" in message
    # absolute paths from the submitting side pass; outside a job copy relative ones still resolve
    absolute = [
        f"data.root={tmp_path}/data",
        f"ray.storage_path={tmp_path}/rr",
        f"tracking.uri=sqlite:///{tmp_path}/m.db",
    ]
    assert resolve_paths(load(DEMO_CONFIG, absolute), job_copy).data.root == f"{tmp_path}/data"
    assert resolve_paths(cfg, tmp_path).data.root == str(tmp_path / "data" / "synth")
    # a user's own checkout in a folder that happens to share a name with Ray's is not a job copy
    checkout = tmp_path / "working_dir_files" / "runtime_resources" / "instseg"
    checkout.mkdir(parents=True)
    assert resolve_paths(cfg, checkout).data.root == str(checkout / "data" / "synth")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train.epochz=3"], "unknown config key 'train.epochz'"),
        (["train.epochs=abc"], "invalid value for 'train.epochs'"),
        (["data.root=/nonexistent/data"], "/nonexistent/data/annotations/instances_train.json is missing"),
    ],
)
@pytest.mark.parametrize("module", ["ray_jobs.train", "tuning.tune"])
def test_entry_points_report_bad_input_in_one_line_with_status_2(module, args, expected, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", module, "--config", str(DEMO_CONFIG), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert expected in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    if "missing" in expected:
        assert "instseg data synth" in proc.stderr


def test_missing_config_file_is_a_usage_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ray_jobs.train", "--config", "nope.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "config file not found: nope.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_flatten_redacts_credentials_in_uris():
    cfg = load(DEMO_CONFIG, ["tracking.uri=https://alice:s3cret@mlflow.example:5000"])
    assert flatten(cfg)["tracking.uri"] == "https://***@mlflow.example:5000"


@pytest.mark.parametrize(
    "uri, shown",
    [
        ("https://alice:s3/cr@t@mlflow.example:5000/x", "https://***@mlflow.example:5000/x"),  # / and @ in the password
        ("http://alice:pa%2Fss%40w0rd@127.0.0.1:5000", "http://***@127.0.0.1:5000"),  # percent-encoded
        ("postgresql://mlflow:p@ss:w0rd@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("https://mlflow.example/api?token=abc123&x=1", "https://mlflow.example/api?token=***&x=1"),
        ("s3://b/k?X-Amz-Signature=abc&X-Amz-Credential=def", "s3://b/k?X-Amz-Signature=***&X-Amz-Credential=***"),
        ("run (https://u:secret@h:1) and http://v:other@h2/p", "run (https://***@h:1) and http://***@h2/p"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ],
)
def test_redact_hides_every_kind_of_credential(uri, shown):
    assert redact(uri) == shown


def test_a_config_dump_and_its_params_carry_no_password():
    overrides = ["tracking.uri=https://alice:s3/cr@t@mlflow.example:5000", "ray.storage_path=s3://b/p?token=tok"]
    cfg = load(DEMO_CONFIG, overrides)
    dump = json.dumps(redact_tree(cfg.model_dump())) + json.dumps(flatten(cfg))
    assert "s3/cr" not in dump and "cr@t" not in dump and "tok" not in dump.replace("token", "")
