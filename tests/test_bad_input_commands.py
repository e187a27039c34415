"""Bad input, by class: each command on a missing path, a file where a folder belongs, or the wrong kind of
folder. Through `cpt.cli.main`, as a user runs it: exit code 2, one line on stderr that names the path,
no traceback, nothing written. (`eval`, `merge` and `generate` have their own cases beside their fixes;
the source formats `inspect` reads are in the data suite.) docs/reliability.md lists these classes.

    python -m pytest tests/test_bad_input_commands.py -q
"""
from __future__ import annotations

import errno
import os

import pytest

import cpt.api
import cpt.cli
from cpt.cli import main


def _one_line_error(capsys, argv: list[str], *words: str) -> str:
    """`cpt argv` exits 2 with one line on stderr naming every one of `words`, and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("cpt"), err
    for w in words:
        assert str(w) in err, f"{w!r} not in {err!r}"
    return err


@pytest.fixture()
def paths(tmp_path):
    """A missing path, a plain file, an empty folder and a run folder with a checkpoint."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("a plain file\n")
    run = tmp_path / "run"
    (run / "checkpoint-4").mkdir(parents=True)
    (run / "checkpoint-4" / "COMPLETE").write_text("{}")
    (run / "checkpoint-4" / "config.yaml").write_text("train:\n  max_steps: 4\n")
    (run / "config.yaml").write_text("train:\n  max_steps: 4\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    return {"missing": tmp_path / "missing", "file": tmp_path / "notes.txt", "empty": tmp_path / "empty", "run": run,
            "checkpoint": run / "checkpoint-4"}


@pytest.fixture()
def no_model_load(monkeypatch):
    def load(*a, **k):
        raise AssertionError("the model was loaded before the paths were checked")
    monkeypatch.setattr(cpt.api, "build_model", load)


# ---------------------------------------------------------------------------- config files: train, plan, config


@pytest.mark.parametrize("command", ["train", "plan", "config"])
@pytest.mark.parametrize("kind, words", [
    ("missing", ["not found", "check the path"]),
    ("empty", ["is a folder", "YAML file"]),
    ("run", ["is a folder", "a run's config is"]),
    ("file", ["top level must be a mapping"]),
])
def test_config_argument_of_the_wrong_kind(capsys, paths, no_model_load, command, kind, words):
    _one_line_error(capsys, [command, str(paths[kind])], paths[kind], *words)


@pytest.mark.parametrize("command", ["train", "plan", "config"])
def test_config_with_a_syntax_error_names_the_line(capsys, tmp_path, no_model_load, command):
    p = tmp_path / "run.yaml"
    p.write_text("model:\n  name_or_path: x\ntrain:\n  max_steps: [3\n")
    _one_line_error(capsys, [command, str(p)], f"{p}, line 5", "not valid YAML")


@pytest.mark.parametrize("command", ["train", "plan", "config"])
def test_flat_override_with_a_typo(capsys, no_model_load, command):
    _one_line_error(capsys, [command, "max_step=3"], "'max_step'", "Did you mean 'train.max_steps'")


# ---------------------------------------------------------------------------- train's locations


def _train(tmp_path, *extra):
    docs = tmp_path / "docs.txt"
    docs.write_text("a document\n")
    return ["train", "model.name_or_path=unused", f"data.path={docs}", f"data.cache_dir={tmp_path / 'cache'}", *extra]


@pytest.mark.parametrize("kind, words", [
    ("file", ["output.output_dir", "is a file", "choose another output.output_dir"]),
    ("checkpoint", ["output.output_dir", "is a checkpoint of another run", f"output.resume="]),
])
def test_train_output_dir_of_the_wrong_kind(capsys, tmp_path, paths, no_model_load, kind, words):
    argv = _train(tmp_path, f"output.output_dir={paths[kind]}")
    before = sorted(tmp_path.rglob("*"))
    _one_line_error(capsys, argv, paths[kind], *words)
    assert sorted(tmp_path.rglob("*")) == before


def test_train_output_dir_on_a_full_disk(capsys, tmp_path, no_model_load, monkeypatch):
    import cpt.checkpoint as ckpt

    real_open = open

    def full(file, *a, **k):
        if ".cpt-write-probe" in str(file):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(ckpt, "open", full, raising=False)
    _one_line_error(capsys, _train(tmp_path, f"output.output_dir={tmp_path / 'run'}"), "output.output_dir",
                    tmp_path / "run", "the disk is full")


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_train_data_path_of_the_wrong_kind(capsys, tmp_path, paths, no_model_load, kind):
    _one_line_error(capsys, ["train", "model.name_or_path=unused", f"data.path={paths[kind]}",
                             f"output.output_dir={tmp_path / 'out'}"], "data.sources[0].path", paths[kind])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind, words", [
    ("missing", ["no such file or folder", "hub name"]),
    ("empty", ["holds no model", "config.json"]),
    ("file", ["is a file, not a model"]),
    ("run", ["is a trained adapter, not a base model", "cpt merge"]),
])
def test_train_model_path_of_the_wrong_kind(capsys, tmp_path, paths, no_model_load, kind, words):
    (paths["run"] / "adapter_config.json").write_text("{}")  # a finished run's folder holds its adapter
    argv = _train(tmp_path, f"output.output_dir={tmp_path / 'out'}")
    argv[1] = f"model.name_or_path={paths[kind]}"
    _one_line_error(capsys, argv, "model.name_or_path", paths[kind], *words)
    assert not (tmp_path / "out").exists()


def test_train_without_any_data(capsys, tmp_path, no_model_load):
    _one_line_error(capsys, ["train", "model.name_or_path=unused", f"output.output_dir={tmp_path / 'out'}"],
                    "no training data", "data.path")


def test_an_os_error_inside_a_command_is_one_line(capsys, monkeypatch):
    """Whatever a command meets on disk (a folder it may not read, a full disk) ends in one line naming it."""
    def refused(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/runs/locked")
    monkeypatch.setattr(cpt.cli, "cmd_config", refused)
    _one_line_error(capsys, ["config"], "Permission denied", "/srv/runs/locked", "-v")


# ---------------------------------------------------------------------------- report


@pytest.mark.parametrize("kind, words", [
    ("missing", ["no such run folder"]),
    ("file", ["is a file", "output_dir"]),
    ("empty", ["is not a run folder", "metrics.jsonl"]),
    ("checkpoint", ["is a checkpoint", "cpt report"]),
])
def test_report_on_the_wrong_kind_of_folder(capsys, paths, kind, words):
    err = _one_line_error(capsys, ["report", str(paths[kind])], paths[kind], *words)
    assert not (paths[kind] / "report.html").exists()
    if kind == "checkpoint":
        assert err.endswith(f"cpt report {paths['run']}")


def test_report_on_a_folder_of_runs_names_them(capsys, paths, tmp_path):
    _one_line_error(capsys, ["report", str(tmp_path)], "is not a run folder", paths["run"])


def test_report_on_a_run_folder_that_cannot_be_written(capsys, paths, monkeypatch):
    import cpt.report

    def refused(run, plots, out):
        raise PermissionError(errno.EACCES, "Permission denied", str(out / "report.html.tmp"))
    monkeypatch.setattr(cpt.report, "render_html", refused)
    _one_line_error(capsys, ["report", str(paths["run"])], paths["run"], "Permission denied")


# ---------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("kind, words", [("missing", ["no such file, folder or glob"]), ("empty", ["holds no"])])
def test_inspect_on_a_missing_path_or_a_folder_without_documents(capsys, paths, kind, words):
    _one_line_error(capsys, ["inspect", str(paths[kind])], paths[kind], *words)
