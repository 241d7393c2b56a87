"""Config -> objects: the datasets and the network a run uses. One place for each mapping."""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import Dataset, Subset

from annseg.data.synthetic import Synthetic
from annseg.data.transforms import Normalization, eval_transforms, train_transforms
from annseg.engine.config import Config, ConfigError, DataConfig, ModelConfig, check_options
from annseg.models.ann import ANN
from annseg.models.zoo import create_model


def normalization(data: DataConfig) -> Normalization:
    return Normalization(mean=data.mean, std=data.std)


def build_dataset(data: DataConfig, split: str, transforms: Callable | None, length: int | None = None) -> Dataset:
    """The dataset named by ``data.dataset`` for ``split``; ``length`` keeps the first items only.

    The returned dataset has ``classes`` and ``palette`` (a Subset carries them over).
    """
    if data.dataset == "synthetic":
        return Synthetic(split, size=data.size, length=length, transforms=transforms)
    from annseg.data import DATASETS  # the file datasets

    if data.root is None:
        raise ConfigError(f"data.root is required for dataset {data.dataset!r}: the folder that holds it")
    dataset = DATASETS[data.dataset](data.root, split, transforms=transforms)
    if length is not None and length < len(dataset):
        subset = Subset(dataset, range(length))
        subset.classes, subset.palette = dataset.classes, dataset.palette  # type: ignore[attr-defined]
        return subset
    return dataset


def build_train_dataset(config: Config) -> Dataset:
    data = config.data
    transforms = train_transforms(
        data.crop_size, scale=data.scale, aspect=data.aspect, flip=data.flip, brightness=data.brightness,
        normalization=normalization(data),
    )
    return build_dataset(data, data.train_split, transforms, data.train_length)


def build_val_dataset(config: Config, split: str | None = None) -> Dataset:
    data = config.data
    return build_dataset(data, split or data.val_split, eval_transforms(normalization(data)), data.val_length)


def build_model(model: ModelConfig, num_classes: int, load_backbone_weights: bool = True) -> ANN:
    """``create_model(f"{variant}_{backbone}")`` with the config's options, typed and range-checked.

    ``load_backbone_weights=False`` skips the ImageNet file (the weights come from a
    checkpoint next anyway, and the file may not exist on the machine that evaluates).
    """
    options = check_options(model.options)  # a ModelConfig built in code is checked as a loaded one
    weights = model.backbone_weights if load_backbone_weights else None
    return create_model(model.name, num_classes=num_classes, backbone_weights=weights, **options)
