import pytest

from jaxgpt import config
from jaxgpt.errors import JaxgptError


def test_yaml_then_overrides_then_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_layer: 3\ntrain:\n  lr: 1.0e-3\n  steps: 10\n")
    cfg = config.load(path, ["train.steps=20", "model.dropout=0.1", "seed=7", "train.lr=3e-4"])
    assert (cfg.model.n_layer, cfg.train.steps, cfg.model.dropout, cfg.seed) == (3, 20, 0.1, 7)
    assert cfg.train.lr == pytest.approx(3e-4)


def test_preset_sets_sizes_and_explicit_keys_win():
    cfg = config.load(None, ["model.preset=gpt2", "model.n_layer=4"])
    assert (cfg.model.n_embd, cfg.model.n_head, cfg.model.n_layer, cfg.model.block_size) == (768, 12, 4, 1024)


@pytest.mark.parametrize("override, fragment", [
    ("train.step=3", "did you mean 'train.steps'"),
    ("model.nlayer=3", "did you mean 'model.n_layer'"),
    ("train.steps=abc", "'train.steps' expects an integer, got 'abc'"),
    ("model.dropout=high", "'model.dropout' expects a number"),
    ("train.progress=maybe", "'train.progress' expects true or false"),
    ("model.preset=gpt3", "unknown model.preset 'gpt3'"),
    ("steps", "not of the form key=value"),
])
def test_bad_overrides_are_one_line_errors(override, fragment):
    with pytest.raises(JaxgptError) as err:
        config.load(None, [override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(JaxgptError, match="not valid YAML"):
        config.load(bad)
    with pytest.raises(JaxgptError, match="not found"):
        config.load(tmp_path / "missing.yaml")


def test_json_round_trip(tmp_path):
    cfg = config.load(None, ["model.preset=small", "train.steps=5", "data.tokenizer=char"])
    config.save_json(cfg, tmp_path / "c.json")
    assert config.load_json(tmp_path / "c.json") == cfg


def test_shipped_configs_load():
    import dataclasses
    import pathlib

    from jaxgpt.active.loop import ActiveConfig

    active_keys = {f"active.{f.name}" for f in dataclasses.fields(ActiveConfig)}
    for path in sorted(pathlib.Path(__file__).parents[1].glob("configs/*.yaml")):
        flat = config.read_yaml(path)
        # `active:` settings belong to `jaxgpt active`, which reads them itself.
        assert {k for k in flat if k.startswith("active.")} <= active_keys, path
        config.build({k: v for k, v in flat.items() if not k.startswith("active.")})
