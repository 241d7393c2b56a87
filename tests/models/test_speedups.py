"""The network's speed-ups on by default compute the plain network's function.

- ``fuse_for_inference`` / ``annseg.load``: every BatchNorm folded into its conv. Logits within
  1e-4 of their largest value, and the same argmax on the built-in validation set.
- ``channels_last``: NHWC weights and activations; the same outputs and gradients up to fp32
  re-association (1e-4 relative).
- ``checkpoint_backbone``: the backbone's activations recomputed in the backward; the same loss,
  gradients and BatchNorm statistics.
"""

import pytest
import torch
from torch import nn

from annseg.layers.folding import fold_conv_batchnorms
from annseg.models import create_model
from tests.engine.tiny import TINY, tiny_checkpoint

SMALL = dict(head_channels=16, key_channels=8, value_channels=8, aux_channels=8)


def _randomized(name: str = "ann_resnet18", **options) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, **SMALL, **options)
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=generator) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    for block in (model.afnb, model.apnb):  # a non-zero W: the attention branch counts
        torch.nn.init.normal_(block.out.conv.weight, std=0.1)
    return model


def test_fuse_for_inference_folds_every_batchnorm_and_keeps_the_logits():
    model = _randomized().eval()
    image = torch.randn(2, 3, 72, 88)
    with torch.no_grad():
        before = model(image)
        model.fuse_for_inference()
        after = model(image)
    left = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    # The blocks' fusion BatchNorms are folded into FoldedOutput; the aux head is not run in eval mode.
    assert all(name.startswith("aux_head") for name in left), left
    # AFNB's affine output and the context conv are one FoldedContext: the conv's own weight is gone.
    assert model.afnb_context is not None and isinstance(model.context[0], nn.Identity)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-4 * before.abs().max().item())


def test_folding_afnb_into_the_context_conv_is_exact_in_float64():
    model = _randomized().double().eval()
    for m in model.modules():  # non-zero shifts, so the border-aware bias map matters
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.bias, -1, 1)
    image = torch.randn(2, 3, 45, 77, dtype=torch.float64)
    with torch.no_grad():
        before = model(image)
        model.fuse_for_inference()
        after = model(image)
    assert model.afnb_context is not None
    torch.testing.assert_close(after, before, rtol=0, atol=1e-10 * before.abs().max().item())
    assert model.fuse_for_inference() is model  # folding twice is a no-op


def test_a_conv_read_twice_is_not_folded():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.other = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(3, 4, 1)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y + self.bn2(self.other(x))

    module = Twice().eval()
    module.bn.running_mean.fill_(0.3)
    assert fold_conv_batchnorms(module, torch.randn(1, 3, 8, 8)) == 1
    assert isinstance(module.bn, nn.BatchNorm2d) and isinstance(module.bn2, nn.Identity)


def test_folding_refuses_a_training_network():
    with pytest.raises(RuntimeError, match="eval"):
        fold_conv_batchnorms(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)), torch.randn(1, 3, 4, 4))


def test_annseg_load_folds_and_keeps_the_argmax_on_the_built_in_validation_set(tmp_path):
    import annseg
    from annseg.engine.builders import build_dataset
    from annseg.engine.config import load_config

    tiny_checkpoint(tmp_path / "m.ckpt")
    folded, plain = annseg.load(tmp_path / "m.ckpt"), annseg.load(tmp_path / "m.ckpt", fuse=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.network.backbone.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.network.backbone.modules())
    assert folded.network.afnb_context is not None and plain.network.afnb_context is None
    config = load_config(None, [*TINY, "data.val_length=12"])
    dataset = build_dataset(config.data, config.data.val_split, None, config.data.val_length)
    images = [dataset[i]["image"].as_subclass(torch.Tensor) for i in range(len(dataset))]
    labels_folded, labels_plain = folded.predict(images), plain.predict(images)
    for a, b in zip(labels_folded, labels_plain):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    assert len(torch.unique(torch.as_tensor(labels_plain[0]))) > 1  # not one class everywhere
    logits_folded = torch.as_tensor(folded.predict(images[0], output="logits"))
    logits_plain = torch.as_tensor(plain.predict(images[0], output="logits"))
    torch.testing.assert_close(logits_folded, logits_plain, rtol=0, atol=1e-4 * logits_plain.abs().max().item())


@pytest.mark.parametrize("train", [False, True])
def test_channels_last_gives_the_contiguous_networks_outputs_and_gradients(train):
    """In float64: training-mode BatchNorms amplify fp32 rounding too much to compare gradients in fp32."""
    plain, fast = _randomized(channels_last=False).double(), _randomized(channels_last=True).double()
    assert fast.backbone.body.conv1[0].weight.is_contiguous(memory_format=torch.channels_last) if isinstance(
        fast.backbone.body.conv1, nn.Sequential) else fast.backbone.body.conv1.weight.is_contiguous(
        memory_format=torch.channels_last)
    image = torch.randn(2, 3, 64, 80, dtype=torch.float64)
    results = []
    for model in (plain, fast):
        model.train(train)
        torch.manual_seed(3)
        out = model(image)
        main = out[0] if train else out
        if train:
            (main.square().mean() + out[1].square().mean()).backward()
        results.append((main.detach(), [p.grad for p in model.parameters()] if train else []))
    (out_plain, grads_plain), (out_fast, grads_fast) = results
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-9, atol=1e-9 * out_plain.abs().max().item())
    for fast_grad, plain_grad in zip(grads_fast, grads_plain):
        if plain_grad is None:
            assert fast_grad is None
            continue
        torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-7, atol=1e-9 * plain_grad.abs().max().item() + 1e-14)


def test_checkpoint_backbone_gives_the_same_gradients_and_statistics():
    plain, checkpointed = _randomized(), _randomized()
    checkpointed.checkpoint_backbone = True
    image = torch.randn(2, 3, 64, 64)
    grads = []
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(3)
        main, aux = model(image)
        (main.square().mean() + aux.square().mean()).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for (name, a), b in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)  # running statistics moved once
