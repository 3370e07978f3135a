"""Training batches: packing aligned samples into one row, noise, the validation split."""

import json

import pytest
import torch
from train_fixtures import write_random_states

from speculators.errors import SpeculatorsError
from speculators.train.data import (
    BatchLoader,
    HiddenStatesData,
    SampleRef,
    empty_batch,
    load_sample,
    noise_generator,
    pack_batch,
)


def _sample(n, start, width=2):
    """An aligned sample of length n whose every field encodes `start + position`."""
    vals = torch.arange(start, start + n)
    return {
        "input_ids": vals,
        "aux": vals[:, None].float().repeat(1, 3 * width),
        "last": vals[:, None].float().repeat(1, width),
        "loss_mask": torch.ones(n, dtype=torch.long),
        "position_ids": torch.arange(1, n + 1),
    }


def test_pack_batch_concatenates_documents_and_pads_with_document_minus_one():
    batch = pack_batch([_sample(3, 100), _sample(2, 200)], capacity=8)
    assert all(v.shape[:2] == (1, 8) for v in batch.values())
    assert batch["input_ids"][0].tolist() == [100, 101, 102, 200, 201, 0, 0, 0]
    assert batch["document_ids"][0].tolist() == [0, 0, 0, 1, 1, -1, -1, -1]
    assert batch["position_ids"][0].tolist() == [1, 2, 3, 1, 2, 0, 0, 0]
    assert batch["loss_mask"][0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert batch["aux"][0, :, 0].tolist() == [100, 101, 102, 200, 201, 0, 0, 0]
    assert batch["aux"].dtype == batch["last"].dtype == torch.float32


def test_pack_batch_truncates_a_sample_longer_than_the_budget():
    batch = pack_batch([_sample(10, 0)], capacity=4)
    assert batch["input_ids"][0].tolist() == [0, 1, 2, 3]
    assert batch["document_ids"][0].tolist() == [0, 0, 0, 0]


def test_empty_batch_is_all_padding():
    batch = empty_batch(5, aux_width=6, hidden_size=2)
    assert batch["document_ids"].eq(-1).all() and batch["loss_mask"].eq(0).all()
    assert batch["aux"].shape == (1, 5, 6)


def test_noise_depends_only_on_batch_position():
    a = torch.rand(4, generator=noise_generator(0, 1, 2, 0))
    assert torch.equal(a, torch.rand(4, generator=noise_generator(0, 1, 2, 0)))
    assert not torch.equal(a, torch.rand(4, generator=noise_generator(0, 1, 3, 0)))
    assert not torch.equal(a, torch.rand(4, generator=noise_generator(0, 1, 2, 1)))


def test_loader_adds_bounded_noise_to_aux_states_only(tiny_llama, tmp_path):
    folder = write_random_states(tmp_path / "hs", tiny_llama, [30, 20])
    vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    data = HiddenStatesData.open([folder], hidden_size=128, vocab_size=vocab, num_layers=4)
    clean = BatchLoader(data, [0, 1], 64).batch([0, 1], epoch=0, step=0, rank=0)
    noisy = BatchLoader(data, [0, 1], 64, noise=0.05).batch([0, 1], epoch=0, step=0, rank=0)
    diff = noisy["aux"] - clean["aux"]
    real = clean["document_ids"][0] >= 0
    assert diff[0, real].abs().max() <= 0.05 and diff[0, real].abs().max() > 0.04
    assert diff[0, ~real].abs().max() == 0  # padding untouched
    assert torch.equal(noisy["last"], clean["last"])  # target states never noised
    # Aligned: 30 + 20 stored tokens pack as 29 + 19.
    assert (clean["document_ids"][0] == 0).sum() == 29 and (
        clean["document_ids"][0] == 1
    ).sum() == 19


def test_validation_split_is_seeded_and_disjoint():
    data = HiddenStatesData([], [1, 2], 8, [SampleRef(f"s{i}", 10) for i in range(50)], 1)
    train, val = data.split(0.1, seed=0)
    assert len(val) == 5 and not set(train) & set(val) and len(train) + len(val) == 50
    assert (train, val) == data.split(0.1, seed=0)
    assert val != data.split(0.1, seed=1)[1]
    assert data.split(0.0, seed=0) == (list(range(50)), [])


def test_single_token_samples_are_counted_not_silently_dropped(tiny_llama, tmp_path, caplog):
    folder = write_random_states(tmp_path / "hs", tiny_llama, [1, 20, 30])
    vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    data = HiddenStatesData.open([folder], hidden_size=128, vocab_size=vocab, num_layers=4)
    assert data.dropped == 1 and [s.length for s in data.samples] == [19, 29]
    assert "1 single-token samples left out" in caplog.text


@pytest.mark.parametrize(
    "change,problem",
    [
        (lambda s: s.pop("loss_mask"), "no loss_mask tensor"),
        (lambda s: s.update(input_ids=[1, 2]), "no input_ids tensor"),
        (lambda s: s.update(input_ids=s["input_ids"][:-1]), "input_ids length != 20"),
    ],
)
def test_a_sample_missing_or_misshaping_its_tokens_is_named(tiny_llama, tmp_path, change, problem):
    folder = write_random_states(tmp_path / "hs", tiny_llama, [20])
    path = folder / "data_0.pt"
    sample = torch.load(path, weights_only=True)
    change(sample)
    torch.save(sample, path)
    with pytest.raises(SpeculatorsError, match=problem) as e:
        load_sample(SampleRef(path, 19), num_states=4, hidden_size=128)
    assert str(e.value).startswith(str(path))


def test_metrics_log_writes_strict_json_and_skips_missing_loggers(tmp_path, caplog, monkeypatch):
    import builtins

    from speculators.train.metrics import MetricsLog

    real_import = builtins.__import__

    def no_wandb(name, *a, **kw):
        if name == "wandb":
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    log = MetricsLog(tmp_path, ["tensorboard", "wandb"], enabled=True, run_config={})
    assert "'wandb' requested but the package is not installed" in caplog.text
    log.write({"split": "train", "epoch": 0, "step": 1, "loss": float("nan"), "loss_k": [1.0]})
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] is None
    assert list((tmp_path / "tensorboard").iterdir())  # TensorBoard events written
