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
