"""A small float64 ANN trained one step: the network-level check of a training speed-up."""

import torch
from torch import nn

from annseg.models import create_model


def one_training_step(**options: object) -> tuple[nn.Module, list[torch.Tensor]]:
    """ANN-R18 with narrow heads, built from seed 0 with ``options``, after one backward of a fixed
    loss on a fixed 2x3x40x56 input: the model, and its (main, aux) outputs followed by every
    parameter's gradient."""
    torch.manual_seed(0)
    model = create_model("ann_resnet18", num_classes=3, head_channels=16, key_channels=8, value_channels=8,
                         aux_channels=8, **options).double().train()
    torch.manual_seed(1)
    main, aux = model(torch.randn(2, 3, 40, 56, dtype=torch.float64))
    (main.square().mean() + aux.square().mean()).backward()
    return model, [main.detach(), aux.detach()] + [p.grad for p in model.parameters()]
