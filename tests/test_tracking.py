import subprocess
import sys

OPEN_RUN = """
import sys
from imgx3d.tracking import Tracker
Tracker(sys.argv[1], "shared-experiment", run_name=sys.argv[2])
"""


def test_processes_starting_together_share_a_fresh_sqlite_store(tmp_path):
    """Parallel runs on a new mlflow.db race to create its tables and the experiment; all must start."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_RUN, uri, f"run{i}"], stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("shared-experiment")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run0", "run1", "run2"]
