from pathlib import Path

import pytest

from annseg.convert.mmconfig import ABSENT, NotLiteral, parse_config_text, setting

TEXT = """norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    decode_head=dict(type='ANNHead', in_index=[2, 3], key_pool_scales=(1, 2, 4), dropout_ratio=0.1,
                     norm_cfg=norm_cfg, act_cfg=None),
    test_cfg={'mode': 'slide', 'crop_size': (769, 769), 'stride': (513, 513)})
scales = [x / 2 for x in range(4)]
"""


def test_literals_and_dict_calls_become_values():
    config = parse_config_text(TEXT, "f")
    head = config["model"]["decode_head"]
    assert head["key_pool_scales"] == (1, 2, 4) and head["in_index"] == [2, 3] and head["act_cfg"] is None
    assert config["norm_cfg"] == {"type": "SyncBN", "requires_grad": True}
    assert config["model"]["test_cfg"] == {"mode": "slide", "crop_size": (769, 769), "stride": (513, 513)}
    assert head["norm_cfg"] == NotLiteral("norm_cfg") and isinstance(config["scales"], NotLiteral)


def test_setting_reads_dotted_keys_and_refuses_expressions():
    config = parse_config_text(TEXT, "f")
    assert setting(config, "model.decode_head.dropout_ratio", "f") == 0.1
    assert setting(config, "model.decode_head.query_scales", "f", (1,)) == (1,)  # left out: the default
    assert setting(config, "model.auxiliary_head.type", "f", ABSENT) is ABSENT
    assert setting(config, "model.decode_head.act_cfg.type", "f", "ReLU") is None  # act_cfg=None: no activation
    with pytest.raises(ValueError, match=r"f: its config's model\.decode_head\.norm_cfg\.type is norm_cfg, not a literal"):
        setting(config, "model.decode_head.norm_cfg.type", "f")
    with pytest.raises(ValueError, match="scales is"):
        setting(config, "scales", "f")


def test_code_in_the_text_never_runs(tmp_path: Path):
    marker = tmp_path / "ran"
    text = f"x = __import__('pathlib').Path({str(marker)!r}).touch()\nmodel = dict(a=open({str(marker)!r}, 'w'))\n"
    config = parse_config_text(text, "f")
    assert isinstance(config["x"], NotLiteral) and isinstance(config["model"]["a"], NotLiteral)
    assert not marker.exists()


def test_text_that_is_not_python_names_the_source_and_line():
    with pytest.raises(ValueError, match=r"ckpt: its config text is not a Python config \(line 2"):
        parse_config_text("model = dict(\n  type='x',,)\n", "ckpt")
