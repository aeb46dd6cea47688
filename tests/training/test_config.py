"""Run files, recipes, dotted overrides and their errors."""

from __future__ import annotations

import json

import pytest

from training.config import from_dict, list_recipes, load_config


def test_recipes_load_and_differ():
    assert {"clip", "cots"} <= set(list_recipes())
    clip, cots = load_config("clip"), load_config("cots")
    assert clip.enabled_units() == ["clip"]
    assert cots.enabled_units() == ["instance"]
    assert clip.name == "clip"


def test_overrides_coerce_to_field_types(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("optim:\n  lr: 1e-4\ndata:\n  batch_size: 16\n")
    cfg = load_config(
        run,
        [
            "optim.lr=3e-5",
            "data.crop_scale=[0.5, 1]",
            "objectives.clip.enabled=true",
            "model.options.image_size=160",
            "name=my-run",
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-5) and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 16
    assert cfg.data.crop_scale == (0.5, 1.0)
    assert cfg.objectives.clip.enabled is True
    assert cfg.model.options == {"image_size": 160}
    assert cfg.name == "my-run"
    assert load_config(run).name == "run"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("nosuch.x=1", "unknown config key 'nosuch'"),
        ("data.batch_size=abc", "config key 'data.batch_size': 'abc' is not a valid int"),
        ("data.batch_size=1.5", "is not a valid int"),
        ("objectives.clip.enabled=maybe", "is not a valid bool"),
        ("data.crop_scale=[1]", "is not a valid"),
        ("optim.lr", "must look like section.key=value"),
        ("objectives.cookie.pairs=image", "config key 'objectives.cookie.pairs': 'image' is not"),
        (
            "objectives.cookie.pairs=[[image,text]]",
            "config key 'objectives.cookie.pairs[0]': ['image', 'text'] is not a valid tuple",
        ),
        ("objectives.cookie.pairs=[[image,text,x]]", "'objectives.cookie.pairs[0]'"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config("cots", [override])


def test_missing_run_file():
    with pytest.raises(FileNotFoundError, match="no run file or recipe 'nope'"):
        load_config("nope")


def test_a_list_of_pairs_from_the_command_line_and_back():
    cfg = load_config("cots", ["objectives.cookie.pairs=[[image,text,1],[text,text_tower,0.5]]"])
    assert cfg.objectives.cookie.pairs == [("image", "text", 1.0), ("text", "text_tower", 0.5)]
    assert from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # as saved with a run
