import dataclasses
import json

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
    import pathlib

    from jaxgpt.active.loop import ActiveConfig

    for path in sorted(pathlib.Path(__file__).parents[1].glob("configs/*.yaml")):
        flat = config.read_yaml(path)
        active = {k: v for k, v in flat.items() if k.startswith("active.")}  # `jaxgpt active`'s own settings
        config.build(active, ActiveConfig, "active.")
        cls = config.FinetuneRunConfig if any(k.startswith("finetune.") for k in flat) else \
            config.RLRunConfig if any(k.startswith("rl.") for k in flat) else config.Config
        config.build({k: v for k, v in flat.items() if k not in active}, cls)


def test_a_pretraining_run_dir_holds_only_pretraining_sections(train_tiny, tmp_path):
    run = train_tiny(tmp_path / "pre", {"train.steps": 1, "train.batch_size": 4, "train.eval_every": 1,
                                        "train.save_every": 1})
    assert set(json.loads((run / "config.json").read_text())) == {"model", "data", "train", "mesh", "seed"}
    assert type(config.load_json(run / "config.json")) is config.Config
    with pytest.raises(JaxgptError, match=r"'finetune.\*' keys belong to `jaxgpt finetune"):
        config.load(None, ["finetune.task=sft"])


@pytest.mark.parametrize("kind,key,value", [("pretrain", "", ""), ("finetune", "finetune.task", "classify"),
                                            ("rl", "rl.init_from", "RUN")])
def test_an_old_run_dir_with_every_commands_sections_still_loads(tmp_path, kind, key, value):
    # Older versions wrote every command's sections into every run dir, at their defaults where unused.
    old = {**config.to_dict(config.Config(seed=3)), "finetune": dataclasses.asdict(config.FinetuneConfig()),
           "rl": dataclasses.asdict(config.RLConfig())}
    if key:
        old[key.split(".")[0]][key.split(".")[1]] = value
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = config.load_json(tmp_path / "config.json")
    want = {"pretrain": config.Config(seed=3), "finetune": config.FinetuneRunConfig(
        seed=3, finetune=config.FinetuneConfig(task=value)), "rl": config.RLRunConfig(seed=3, rl=config.RLConfig(
            init_from=value))}[kind]
    assert cfg == want and type(cfg) is type(want)
    if kind == "pretrain":  # `jaxgpt train --run-dir RUN key=value` resumes from these keys
        assert config.load(None, {**config.read_json_flat(tmp_path / "config.json"), "train.steps": 9}).seed == 3


def test_an_unknown_section_in_a_run_dir_is_still_an_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**config.to_dict(config.Config()), "bogus": {"a": 1}}))
    with pytest.raises(JaxgptError, match="unknown config key 'bogus.a'"):
        config.load_json(tmp_path / "config.json")


def test_active_settings_take_the_same_typed_path(tmp_path):
    from jaxgpt import active

    (tmp_path / "pre").mkdir()
    config.save_json(config.Config(), tmp_path / "pre" / "config.json")  # all that --init-from is read for here
    cfg, settings = active.load_config(None, ["active.rounds=3", "active.keep_checkpoints=true", "train.steps=7"],
                                       str(tmp_path / "pre"))
    assert settings == active.ActiveConfig(rounds=3, keep_checkpoints=True)
    assert type(cfg) is config.FinetuneRunConfig and cfg.train.steps == 7
    for bad, message in [("active.rouns=3", "unknown config key 'active.rouns'; did you mean 'active.rounds'?"),
                         ("active.rounds=many", "config key 'active.rounds' expects an integer, got 'many'")]:
        with pytest.raises(JaxgptError) as e:
            active.load_config(None, [bad], str(tmp_path / "pre"))
        assert str(e.value) == message
