"""`kit demo`, the README's main job, end to end on the CPU."""

import pandas as pd
from click.testing import CliRunner

from kit.cli import cli


def test_demo_end_to_end(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "demo.csv"),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    accuracy = float(result.output.strip().splitlines()[-1].split("demo accuracy: ")[1].split("%")[0])
    assert accuracy > 90  # 1,197 training digits, 8 epochs, two runs
    table = pd.read_csv(tmp_path / "demo.csv")
    assert list(table.columns) == ["ID", "Labels"] and len(table) == 300
    assert (tmp_path / "demo.probs.npz").is_file()
    assert len(list((tmp_path / "w").glob("demo-*/report/REPORT.md"))) == 1
