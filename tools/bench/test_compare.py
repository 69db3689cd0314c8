"""compare.py labels its figures by the load average at the start and the
hypervisor's steal during the run: quiet only at or below 0.5 and 5 %, else
"under load", and --quiet on a loaded machine exits 2 after writing them
marked so. Run: python3 -m unittest discover -s tools/bench
"""

import json
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402

# A stand-in for `motif bench --json`: one JSON line.
FAKE_MOTIF = "import json; print(json.dumps({'adapter': 'fake', 'unet_step_s': 1.0}))"


# /proc/stat counters: user nice system idle iowait irq softirq steal guest guest_nice.
CPU_START = [1000, 0, 100, 5000, 0, 0, 0, 10, 0, 0]


def cpu_after(busy, steal):
    """CPU_START after `busy` jiffies of user time and `steal` stolen ones."""
    end = list(CPU_START)
    end[0] += busy
    end[7] += steal
    return end


def run(load, *extra, steal=(100, 0)):
    """Runs compare.main with `load` as /proc/loadavg's averages and
    `steal` = (busy, stolen) jiffies between /proc/stat's two readings;
    returns (exit status, reports.json, table.md)."""
    with tempfile.TemporaryDirectory() as out:
        fake = Path(out) / "motif"
        fake.write_text(f"#!{sys.executable}\n{FAKE_MOTIF}\n")
        fake.chmod(0o755)
        argv = ["compare.py", "--model", out, "--only", "motif", "--motif", str(fake),
                "--out", out, *extra]
        code = 0
        cpu = [CPU_START, cpu_after(*steal)]
        with mock.patch.object(compare, "load_average", return_value=load), \
                mock.patch.object(compare, "cpu_times", side_effect=cpu), \
                mock.patch.object(sys, "argv", argv), mock.patch("builtins.print"):
            try:
                compare.main()
            except SystemExit as e:
                code = e.code
        return code, json.loads((Path(out) / "reports.json").read_text()), (Path(out) / "table.md").read_text()


class LoadLabel(unittest.TestCase):
    def test_a_loaded_machine_is_never_labelled_quiet(self):
        code, report, table = run([4.89, 2.51, 2.21], "--quiet")
        self.assertEqual(code, 2)
        self.assertEqual(report["conditions"], "under load")
        self.assertEqual(report["load_average"]["start"], [4.89, 2.51, 2.21])
        self.assertIn("**under load**", table)
        self.assertIn("4.89 2.51 2.21", table)

    def test_a_quiet_machine_is_labelled_quiet(self):
        code, report, table = run([0.3, 0.2, 0.1], "--quiet")
        self.assertEqual(code, 0)
        self.assertEqual(report["conditions"], "quiet")
        self.assertIn("**quiet**", table)

    def test_just_above_the_threshold_is_under_load(self):
        code, report, _ = run([0.51, 0.2, 0.1])
        self.assertEqual(code, 0)
        self.assertEqual(report["conditions"], "under load")

    def test_an_unknown_load_is_not_quiet(self):
        _, report, _ = run(None)
        self.assertEqual(report["conditions"], "under load")

    def test_a_low_load_with_hypervisor_steal_is_under_load(self):
        # 25 of 125 jiffies stolen: 20 %, as a busy host gives its guests.
        code, report, table = run([0.1, 0.1, 0.1], "--quiet", steal=(100, 25))
        self.assertEqual(code, 2)
        self.assertEqual(report["conditions"], "under load")
        self.assertAlmostEqual(report["steal"]["share"], 0.2)
        self.assertIn("steal 20.0%", table)

    def test_a_little_steal_is_still_quiet(self):
        code, report, _ = run([0.1, 0.1, 0.1], "--quiet", steal=(200, 4))
        self.assertEqual(code, 0)
        self.assertEqual(report["conditions"], "quiet")

    def test_unknown_steal_is_not_quiet(self):
        with mock.patch.object(compare, "steal_share", return_value=None):
            _, report, _ = run([0.1, 0.1, 0.1])
        self.assertEqual(report["conditions"], "under load")


if __name__ == "__main__":
    unittest.main()
