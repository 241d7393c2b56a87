"""The paper's building blocks: pure nn.Modules, no training code, no I/O."""

from annseg.layers.afnb import AFNB
from annseg.layers.apnb import APNB
from annseg.layers.attention import AttentionProbe, attention, attention_weights
from annseg.layers.conv import Projection, conv_bn_act
from annseg.layers.nonlocal2d import NonLocal2d
from annseg.layers.pyramid import PyramidSampling

__all__ = ["AFNB", "APNB", "AttentionProbe", "NonLocal2d", "PyramidSampling", "Projection", "attention",
           "attention_weights", "conv_bn_act"]
