"""The config tree is found from a built wheel, and users can add their own config directories."""

import subprocess
import sys
import zipfile

import pytest

from .conftest import REPO, run_cli


@pytest.mark.slow
def test_wheel_carries_conf_and_finds_it(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
                   check=True, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("prefrun-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "prefrun/conf/train.yaml" in names and "prefrun/conf/loss/dpo.yaml" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    found = subprocess.run([sys.executable, "-c", "from prefrun.cli import config_dir; print(config_dir())"],
                           cwd=tmp_path, env={"PYTHONPATH": str(target)}, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == str(target / "prefrun" / "conf")


def test_user_config_dir_adds_options(tmp_path):
    user = tmp_path / "my_conf" / "loss"
    user.mkdir(parents=True)
    (user / "my_dpo.yaml").write_text("_target_: prefrun.losses.dpo_loss\n_partial_: true\nbeta: 0.77\n"
                                      "label_smoothing: 0.1\nnll_weight: 0.0\n")
    job = run_cli(["train", "--config-dir", str(tmp_path / "my_conf"), "loss=my_dpo", "--cfg", "job"], tmp_path).stdout
    assert "beta: 0.77" in job and "label_smoothing: 0.1" in job
    job = run_cli(["train", f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "loss=my_dpo", "--cfg", "job"],
                  tmp_path).stdout
    assert "beta: 0.77" in job
