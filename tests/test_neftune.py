"""NEFTune: the noise lowrank adds to the input embeddings is, for the same generator state,
bit for bit what transformers' own neftune_post_forward_hook adds; none in eval mode; the loop
adds it in training steps only and removes it when the run ends."""

import pytest
import torch

import lowrank
from lowrank.train.loop import TrainConfig, build_run, evaluate, finetune, step_share, epoch_batches, train_step
from lowrank.train.neftune import add_neftune, neftune_hook, remove_neftune
from tests.train_helpers import tiny_model_dir, write_pretokenized


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("neftune")
    return tiny_model_dir(root / "model"), write_pretokenized(root / "data.jsonl", 9, seed=2)


@pytest.mark.parametrize("alpha,shape", [(5.0, (3, 17)), (0.7, (1, 29))])
def test_noise_equals_transformers_hook(alpha, shape):
    from transformers.integrations.neftune import neftune_post_forward_hook

    embed = torch.nn.Embedding(101, 24)
    torch.nn.init.normal_(embed.weight)
    embed.neftune_noise_alpha = alpha
    ids = torch.randint(0, 101, shape)
    plain = embed(ids)
    torch.manual_seed(1234)
    ours = neftune_hook(embed, (ids,), plain)
    torch.manual_seed(1234)
    theirs = neftune_post_forward_hook(embed, (ids,), plain)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    noise = ours - plain
    mag = alpha / (shape[1] * 24) ** 0.5  # L: the batch's (padded) sequence length
    assert noise.abs().max() <= mag * (1 + 1e-6) and noise.abs().max() > mag / 2


def test_registered_on_a_model_in_training_only(setup):
    from transformers.integrations.neftune import neftune_post_forward_hook

    model = lowrank.load_model(setup[0])
    ids = torch.randint(0, 257, (2, 13))
    embed = model.model.embed_tokens
    plain = embed(ids)
    add_neftune(model, 5.0)
    model.train()
    torch.manual_seed(7)
    noisy = embed(ids)
    torch.manual_seed(7)
    torch.testing.assert_close(noisy, neftune_post_forward_hook(embed, (ids,), plain), atol=0, rtol=0)
    assert not torch.equal(noisy, plain)
    model.eval()
    torch.testing.assert_close(embed(ids), plain, atol=0, rtol=0)
    remove_neftune(model)
    model.train()
    torch.testing.assert_close(embed(ids), plain, atol=0, rtol=0)


def test_the_loop_trains_with_noise_evaluates_without_and_removes_it(setup, tmp_path):
    model, data = setup
    base = dict(model=str(model), data=str(data), output=str(tmp_path / "x"), eval_split=0.3, lr=1e-2,
                device="cpu", progress=False, max_steps=2)
    noisy, plain = build_run(TrainConfig(**base, neftune_noise_alpha=5.0)), build_run(TrainConfig(**base))
    assert evaluate(noisy) == evaluate(plain)  # same weights; eval sees no noise
    batches = epoch_batches(plain, 0)
    assert train_step(noisy, step_share(noisy, batches, 0), 0)["loss"] != \
        pytest.approx(train_step(plain, step_share(plain, batches, 0), 0)["loss"], rel=1e-6)

    result = finetune(TrainConfig(**dict(base, output=str(tmp_path / "run")), neftune_noise_alpha=5.0))
    assert not result.model.model.embed_tokens._forward_hooks  # generation after training sees no noise
