"""A tiny run config on the built-in dataset: seconds per run on a CPU, for pipeline tests."""

TINY = [
    "data.train_length=16", "data.val_length=4", "data.batch_size=2", "data.val_batch_size=2",
    "data.size=[32, 48]", "data.crop_size=[32, 48]",
    "model.options={head_channels: 16, key_channels: 8, value_channels: 8, aux_channels: 8}",
    "train.max_iters=4", "train.checkpoint_every=2", "train.val_every=4", "train.log_every=2",
    "eval.crop_size=[32, 32]", "eval.stride=[16, 16]",
]


def tiny_cli_args(*extra: str) -> list[str]:
    """TINY (plus ``extra`` overrides) as ``--set`` arguments of the annseg command."""
    args: list[str] = []
    for item in (*TINY, *extra):
        args += ["--set", item]
    return args


def tiny_checkpoint(path, *extra: str, classes: int = 3):
    """A TINY-config model with random BatchNorm statistics saved by ``save_model``; returns the network.

    Random statistics and a non-zero W spread the logits, so label maps hold several classes
    and folding or export mistakes change them.
    """
    import torch

    from annseg.data.meta import generated_palette
    from annseg.engine.builders import build_model
    from annseg.engine.checkpoint import model_meta, save_model
    from annseg.engine.config import load_config

    config = load_config(None, [*TINY, *extra])
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the initial weights too: the same network whatever ran before
    network = build_model(config.model, classes, load_backbone_weights=False)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
    network.eval()
    with torch.no_grad():  # centre each class's logits on a random image: no class wins everywhere
        network.classifier.weight.mul_(10)
        network.classifier.bias.zero_()
        logits = network(torch.rand(1, 3, 64, 64, generator=generator))
        network.classifier.bias.copy_(-logits.mean(dim=(0, 2, 3)))
    names = [f"class{i}" for i in range(classes)]
    save_model(path, network, model_meta(config, names, generated_palette(classes)))
    return network
