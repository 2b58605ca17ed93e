"""A damaged or unusable workdir is bad input: one error naming the file, or a fallback."""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
from absl import logging

from bmnas_jax import checkpoint, pipeline
from bmnas_jax.errors import DataError
from bmnas_jax.genotype import GenotypeError
from experiments import cli
from tests.conftest import small_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


small_config = small_run_config


@pytest.fixture
def finished(finished_small_run):
  """One finished run (prepare, search, evaluate) to copy and damage (shared, never
  changed)."""
  return finished_small_run


@pytest.fixture
def copy(finished, tmp_path):
  target = str(tmp_path / "run")
  shutil.copytree(finished, target)
  return target


def newest(workdir, stage="search"):
  folder = os.path.join(workdir, stage, "checkpoints")
  return os.path.join(folder, str(max(int(n) for n in os.listdir(folder) if n.isdigit())))


def resume(workdir, stage="search"):
  return pipeline.run(small_config(stages=stage), workdir)


# ------------------------------------------------------------- the workdir itself

def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "run"
  path.write_text("")
  with pytest.raises(DataError, match=f"{path} is a file"):
    pipeline.run(small_config(), str(path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_workdir_in_a_read_only_folder(tmp_path):
  parent = tmp_path / "ro"
  parent.mkdir()
  parent.chmod(0o555)
  try:
    with pytest.raises(DataError, match=f"{parent / 'run'} cannot be created"):
      pipeline.run(small_config(), str(parent / "run"))
  finally:
    parent.chmod(0o755)


def test_genotype_that_is_a_folder(copy):
  folder = os.path.join(copy, "search")
  with pytest.raises(GenotypeError, match=f"{folder}: is a folder"):
    pipeline.run(small_config(stages="evaluate", **{"evaluate.genotype": folder}), copy)


def test_genotype_file_of_other_nodes_names_the_file(copy):
  path = os.path.join(copy, "search", "best_genotype.json")
  with open(path) as f:
    g = json.load(f)
  g["nodes"] = [n.replace("A_", "C_") for n in g["nodes"]]
  other = os.path.join(copy, "other_genotype.json")
  with open(other, "w") as f:
    json.dump(g, f)
  with pytest.raises(GenotypeError, match=f"^{other}: nodes: genotype has"):
    pipeline.run(small_config(stages="evaluate", **{"evaluate.genotype": other}), copy)


# ------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("damage", ["truncated meta", "garbage state metadata",
                                    "deleted state"])
def test_damaged_checkpoint_names_its_folder(copy, damage):
  step = newest(copy)
  if damage == "truncated meta":
    path = os.path.join(step, "meta", "metadata")
    with open(path, "r+") as f:
      f.truncate(40)
  elif damage == "garbage state metadata":
    with open(os.path.join(step, "state", "_METADATA"), "w") as f:
      f.write("garbage")
  else:
    shutil.rmtree(os.path.join(step, "state"))
  with pytest.raises(DataError, match=f"^{step}: damaged checkpoint"):
    resume(copy)


def test_unfinished_newest_checkpoint_falls_back(copy, monkeypatch):
  folder = os.path.join(copy, "search", "checkpoints")
  complete = newest(copy)
  os.makedirs(os.path.join(folder, "7"))                      # empty
  shutil.copytree(complete, os.path.join(folder, "9"))       # cut short before finalizing
  os.remove(os.path.join(folder, "9", "_CHECKPOINT_METADATA"))
  warnings = []
  monkeypatch.setattr(checkpoint.logging, "warning",
                      lambda msg, *args: warnings.append(msg % args))
  with open(os.path.join(copy, "search", "best_genotype.json")) as f:
    before = f.read()
  resume(copy)
  assert sorted(os.listdir(folder)) == sorted(
      n for n in os.listdir(os.path.dirname(complete)) if n not in ("7", "9"))
  [line] = [w for w in warnings if "incomplete" in w]
  assert "[9, 7]" in line and f"checkpoint {os.path.basename(complete)}" in line
  with open(os.path.join(copy, "search", "best_genotype.json")) as f:
    assert f.read() == before


# ------------------------------------------------------------- the project's JSON files

@pytest.mark.parametrize("name", ["evaluate/metrics.json", "search/summary.json",
                                  "search/metrics.jsonl"])
def test_truncated_json_names_the_file(copy, name):
  path = os.path.join(copy, name)
  with open(path, "r+") as f:
    f.truncate(os.path.getsize(path) - 7)            # mid-line: the last record cut short
  with pytest.raises(DataError, match=f"^{path}(, line \\d+)?: not valid JSON"):
    pipeline.run(small_config(stages="report"), copy)


def test_truncated_metrics_json_in_the_pipeline(tmp_path):
  path = tmp_path / "metrics.json"
  path.write_text('{"metric": "acc')
  with pytest.raises(DataError, match=f"^{path}: not valid JSON"):
    pipeline._read_json(str(path))


# ------------------------------------------------------------- disk full

def test_disk_full_while_writing_the_report(copy, monkeypatch):
  from bmnas_jax.report import report

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(report, "write_text_atomic", full)
  with pytest.raises(DataError, match=f"^{os.path.join(copy, 'report.md')}: cannot write: "
                                      f"No space left on device"):
    report.write_report(small_config(), copy)


def test_disk_full_while_writing_a_checkpoint_names_the_file(copy, monkeypatch, capsys):
  """An OSError of a full disk that names its file reaches the entry point as one line."""
  def save(self, step, state, meta):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(self.directory,
                                                                         str(step)))

  monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
  monkeypatch.setattr(sys, "argv", ["main"])
  shutil.rmtree(os.path.join(copy, "evaluate"))
  with pytest.raises(SystemExit) as e:
    cli.run(lambda argv: resume(copy, "evaluate"))
  assert e.value.code == 1
  step = os.path.join(copy, "evaluate", "checkpoints", "0")
  assert capsys.readouterr().err.splitlines()[-1] == (
      f"error: DataError: {step}: cannot write: No space left on device")


def test_disk_error_of_a_write(tmp_path):
  with pytest.raises(DataError, match=f"^{tmp_path / 'x'}: cannot write: Read-only"):
    with checkpoint.disk_errors(tmp_path / "x"):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS))
  with pytest.raises(OSError):                                    # any other error: a bug
    with checkpoint.disk_errors(tmp_path / "x"):
      raise OSError(errno.EIO, os.strerror(errno.EIO))


# ------------------------------------------------------------- the one line

def test_long_message_is_cut_to_one_short_line(capsys):
  path = "/runs/a/search/checkpoints/3"
  with pytest.raises(SystemExit):
    cli.fail(f"DataError: {path}: damaged checkpoint ({'x' * 5000}\nmore\nlines)")
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and len(err.rstrip("\n")) <= cli.MAX_LINE
  assert err.startswith(f"error: DataError: {path}: damaged") and err.rstrip().endswith("...")


def test_entry_point_reports_one_line(tmp_path):
  path = tmp_path / "run"
  path.write_text("")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config=experiments/configs/planted.py",
       f"--workdir={path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip() == f"error: DataError: --workdir={path} is a file, not a folder"
