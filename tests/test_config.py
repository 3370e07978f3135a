"""Config validation: the default passes, each kind of bad config fails naming the key."""

import copy

import pytest
import yaml
from conftest import REPO, run_snakemake

from speculators.config import validate_config
from speculators.errors import SpeculatorsError


@pytest.fixture
def default_config():
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_default_config_is_valid_and_gets_defaults(default_config):
    cfg = validate_config(default_config)
    run = cfg["runs"]["smollm2-chitchat"]
    assert run["train"]["ttt_steps"] == 3  # schema default filled in
    assert run["train"]["epochs"] == 4  # explicit value kept
    assert run["hidden_states"]["layer_ids"] is None
    assert cfg["cleanup_hidden_states"] is False


def test_defaults_are_not_shared_between_runs(default_config):
    default_config["runs"]["second"] = {"target": "smollm2", "datasets": {"chitchat": {}}}
    cfg = validate_config(default_config)
    cfg["runs"]["second"]["train"]["lr"] = 1.0
    assert cfg["runs"]["smollm2-chitchat"]["train"]["lr"] != 1.0
    third = validate_config(copy.deepcopy(default_config))
    assert third["runs"]["smollm2-chitchat"]["prepare"]["seq_length"] == 512


@pytest.mark.parametrize(
    "mutate, named",
    [
        (
            lambda c: c["runs"]["smollm2-chitchat"]["train"].update(epoch=3),
            "runs.smollm2-chitchat.train.epoch",
        ),
        (
            lambda c: c["runs"]["smollm2-chitchat"]["train"].update(lr="fast"),
            "runs.smollm2-chitchat.train.lr",
        ),
        (lambda c: c.update(extra_key=1), "extra_key"),
        (lambda c: c["runs"]["smollm2-chitchat"].pop("target"), "runs.smollm2-chitchat"),
        (
            lambda c: c["runs"]["smollm2-chitchat"].update(target="missing"),
            "runs.smollm2-chitchat.target",
        ),
        (
            lambda c: c["runs"]["smollm2-chitchat"]["datasets"].update(nope={}),
            "runs.smollm2-chitchat.datasets.nope",
        ),
        (lambda c: c["models"]["smollm2"].update(path="/x"), "models.smollm2"),
        (lambda c: c["models"]["smollm2"].pop("gguf_file"), "models.smollm2"),
        (lambda c: c["datasets"]["chitchat"].pop("source"), "datasets.chitchat"),
        (  # each K once, as each temperature (evaluate refuses a repeated --k)
            lambda c: c["runs"]["smollm2-chitchat"]["evaluate"].update(k=[1, 3, 1]),
            "runs.smollm2-chitchat.evaluate.k: [1, 3, 1] has non-unique elements",
        ),
        (
            lambda c: c["runs"]["smollm2-chitchat"]["vocab"].update(draft_vocab_size=0),
            "runs.smollm2-chitchat.vocab.draft_vocab_size",
        ),
        (
            lambda c: (
                c["runs"]["smollm2-chitchat"]
                .setdefault("hidden_states", {})
                .update(layer_ids=[2, 2, 5])
            ),
            "runs.smollm2-chitchat.hidden_states.layer_ids",
        ),
        (
            lambda c: (
                c["runs"]["smollm2-chitchat"]
                .setdefault("hidden_states", {})
                .update(layer_ids=[15, 2, 27, 30])
            ),
            "layer_ids: ids must be distinct and ascending",
        ),
        (
            lambda c: c["runs"]["smollm2-chitchat"]["train"].update(scheduler="step"),
            "runs.smollm2-chitchat.train.scheduler",
        ),
    ],
)
def test_bad_config_fails_naming_the_key(default_config, mutate, named):
    mutate(default_config)
    with pytest.raises(SpeculatorsError) as err:
        validate_config(default_config)
    assert named in str(err.value)


def test_workflow_stops_before_any_job_on_bad_config(tmp_path, default_config):
    default_config["runs"]["smollm2-chitchat"]["train"]["epoch"] = 3
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(default_config))
    proc = run_snakemake(tmp_path, "-n", configfile=cfg)
    assert proc.returncode != 0
    assert "runs.smollm2-chitchat.train.epoch: unknown key" in proc.stdout + proc.stderr
