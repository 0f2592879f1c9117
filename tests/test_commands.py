"""The commands are their YAML files: each composes and names a function; --help, keys and new commands follow."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from autoenc.app import cli
from autoenc.app.compose import function
from autoenc.util.paths import CONFIGS
from conftest import cli_error, cli_here

FILES = {f.stem: f for f in sorted((CONFIGS / "command").glob("*.yaml"))}


def own_keys(name: str) -> set[str]:
    """The top-level keys a command's own YAML declares (not its base's), without its metadata."""
    return set(OmegaConf.load(FILES[name])) - {"defaults", "hydra", "run", "about"}


def composed(name: str):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose(f"command/{name}")


def test_the_configs_declare_the_commands_there_were():
    assert set(FILES) >= {"train", "evaluate", "sample", "reconstruct", "denoise", "encode", "decode",
                          "interpolate", "score", "compare"}


@pytest.mark.parametrize("name", FILES)
def test_every_command_yaml_composes_and_names_a_function_and_one_line(name):
    cfg = composed(name)
    assert callable(function(cfg.run)) and cfg.run.startswith("autoenc.")
    assert cfg.about and "\n" not in cfg.about
    assert own_keys(name) <= set(cfg)


def test_help_lists_exactly_the_commands_found_with_their_descriptions(capsys):
    cli_here("--help")
    out = capsys.readouterr().out
    block = out.split("commands:\n")[1].split("\n\n")[0].splitlines()
    listed = {line.split()[0]: line.split(None, 1)[1] for line in block}
    assert listed == {name: OmegaConf.load(f).about for name, f in FILES.items()}
    assert block[0].split()[0] == "train"


@pytest.mark.parametrize("name", [n for n in FILES if n != "train"])
def test_a_commands_help_shows_its_own_keys_and_no_other_commands(name, capsys):
    with pytest.raises(SystemExit) as exit_:  # Hydra's --help ends the process with 0
        cli_here(name, "--help")
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith(f"autoenc {name}: {OmegaConf.load(FILES[name]).about}")
    mine = set(composed(name))
    others = set().union(*(own_keys(n) for n in FILES if n != "train")) - mine
    assert all(f"\n{k}:" in out or f"\n'{k}':" in out for k in own_keys(name))
    assert not [k for k in others if f"\n{k}:" in out or f"\n'{k}':" in out]


def test_a_key_of_another_command_is_refused_in_one_line(capsys):
    line = cli_error(capsys, "sample", "ckpt=x.ckpt", "pairs=3")
    assert line == ("autoenc: error: Could not override 'pairs': `autoenc sample` has no key pairs "
                    "(see `autoenc sample --help`)")
    assert "Could not override 'noise': `autoenc sample` has no key noise" in cli_error(capsys, "sample", "noise=masking")
    line = cli_error(capsys, "sample", "ckpt=x.ckpt", "+pairs=3")
    assert line.startswith("autoenc: error: +pairs=3: `autoenc sample` has no key pairs; its keys are: ")
    assert set(line.split("its keys are: ")[1].split(", ")) == set(composed("sample")) - {"run", "about"}
    # the same key where the command takes it gets past composition to the checkpoint
    assert "checkpoint /no/such.ckpt does not exist" in cli_error(capsys, "interpolate", "ckpt=/no/such.ckpt", "pairs=3")


def test_a_run_that_names_no_function_is_one_line(capsys):
    line = cli_error(capsys, "encode", "run=no_such_module:f")
    assert line == "autoenc: error: run=no_such_module:f is not a function: name one as module:function"


HELLO = """# @package _global_
defaults:
  - /use
  - _self_

run: hello_command:hello
about: writes a greeting with the seed
greeting: hello
"""


def test_a_command_from_another_config_directory_runs_through_the_cli(tmp_path, monkeypatch, capsys):
    (tmp_path / "configs" / "command").mkdir(parents=True)
    (tmp_path / "configs" / "command" / "hello.yaml").write_text(HELLO)
    (tmp_path / "hello_command.py").write_text(
        "from pathlib import Path\n\n\ndef hello(cfg):\n    Path(cfg.out).write_text(f'{cfg.greeting} {cfg.seed}')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("AUTOENC_CONFIG_DIR", str(tmp_path / "configs"))
    cli_here("hello", "greeting=bonjour", "seed=7", f"out={tmp_path / 'said.txt'}")
    assert (tmp_path / "said.txt").read_text() == "bonjour 7"
    cli_here("--help")
    assert "  hello        writes a greeting with the seed" in capsys.readouterr().out
    assert "Could not override 'pairs'" in cli_error(capsys, "hello", "pairs=3")
    assert not (CONFIGS / "command" / "hello.yaml").exists()
    (tmp_path / "configs" / "command" / "nested.yaml").write_text(HELLO.split("\n", 1)[1])  # no @package line
    assert cli_error(capsys, "nested").endswith("nested.yaml must start with the line `# @package _global_`: "
                                                "it is the command's root config")
    (tmp_path / "configs" / "command" / "idle.yaml").write_text(HELLO.replace("run: hello_command:hello", ""))
    assert cli_error(capsys, "idle") == ("autoenc: error: command/idle.yaml names no function; "
                                         "add `run: module:function` to it")
    # the same directory adds options to the config groups too, and the checks between groups see them
    (tmp_path / "configs" / "bottleneck").mkdir()
    (tmp_path / "configs" / "bottleneck" / "rates.yaml").write_text("_target_: autoenc.model.bottlenecks.Sigmoid\n")
    line = cli_error(capsys, "train", f"hydra.run.dir={tmp_path / 'run'}", "model=vae", "penalty=kl")
    assert "choose bottleneck=rates|sigmoid, or another penalty" in line
    monkeypatch.setenv("AUTOENC_CONFIG_DIR", str(tmp_path / "nowhere"))
    assert cli_error(capsys, "hello") == (f"autoenc: error: AUTOENC_CONFIG_DIR={tmp_path / 'nowhere'} is not a "
                                          "directory; point it at a folder of configs (with command/)")


def test_schema_imports_without_the_cli():
    code = "import sys, autoenc.app.schema; assert 'autoenc.app.cli' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
