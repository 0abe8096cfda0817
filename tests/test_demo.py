"""`kit demo`, the README's main job, end to end on the CPU."""

import pandas as pd
import pytest
from click.testing import CliRunner

from kit.cli import cli
from kit.cli.demo import submission_accuracy


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "demo.csv"),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    accuracy = submission_accuracy(tmp_path / "demo.csv", tmp_path / "w" / "data" / "test_labels.csv")
    assert accuracy > 0.9  # 1,197 training digits, 8 epochs, two runs
    assert result.output.strip().splitlines()[-1].startswith("demo accuracy: ")
    table = pd.read_csv(tmp_path / "demo.csv")
    assert list(table.columns) == ["ID", "Labels"] and len(table) == 300
    assert (tmp_path / "demo.probs.npz").is_file()
    assert len(list((tmp_path / "w").glob("demo-*/report/REPORT.md"))) == 1
