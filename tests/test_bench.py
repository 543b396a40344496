"""Every benchmark still runs as README says (`python -m bench.<name> --quick`) and ends with one JSON
object holding each figure beside its baseline. Figures are not judged here (tests do not time
things); a benchmark that no longer runs, or drops a figure, fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from d2d.runtime.services import SERVICES

ROOT = Path(__file__).resolve().parents[1]

# Per benchmark: figures that must be present, each with the baseline it is printed beside.
FIGURES = {
    "ingest": [
        "durable_ingest_events_per_s", "raw_publish_async_msgs_per_s", "ratio_vs_publish_async",
        "bus_p50_ms_linger_on", "bus_p99_ms_linger_on", "bus_p50_ms_linger_off", "bus_p99_ms_linger_off",
        "relay_batches_linger_on", "relay_batches_linger_off", "auth_on_events_per_s", "auth_off_events_per_s",
        "auth_ratio",
    ],
    "features": [
        "replay_events_per_s", "scan_eventlog_read_events_per_s", "replay_ratio_vs_eventlog_read_scan",
        "online_1_row", "empty_handler_1_row", "online_1_row_p50_ratio_vs_empty", "frame_rows_per_s",
        "frame_partitioned_rows_per_s", "frame_partitioned_vs_single_process", "bytes_per_entity",
    ],
    "faults": [
        "baseline_appends_per_s", "fault_appends_per_s", "load_held", "faults_injected", "events_acknowledged",
        "events_found", "predicts_answered", "decisions_logged", "poison_inputs",
    ],
    "feedback": [
        "outcomes_joined_per_s", "raw_outcome_rows_per_s", "ratio_vs_raw", "decisions_joined_per_s",
        "raw_copy_decisions_per_s",
    ],
    "replay": [
        "raw_scan_events_per_s", "verify_events_per_s", "verify_decisions_per_s", "verify_vs_raw_scan", "ope",
    ],
    "registry": ["train_examples_per_s", "xgb_alone_train_rows_per_s", "ratio_end_to_end_vs_xgb_alone"],
    "serving": [
        "predict_calls_per_s", "empty_calls_per_s", "ratio_throughput_vs_empty", "predict_p50_ms", "empty_p50_ms",
        "ratio_p50_vs_empty", "ratio_p99_vs_empty", "ratio_batching_on_vs_off", "remote_predict_calls_per_s",
        "remote_ratio_p50_vs_empty", "serving_rss_bytes", "serving_remote_rss_bytes",
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_benchmark_runs_quick_and_ends_with_its_figures(name: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--quick", "--tmp-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    figures = json.loads(last)
    assert figures["bench"] == name and figures["quick"] is True
    missing = [key for key in FIGURES[name] if figures.get(key) in (None, 0, {})]
    assert not missing, f"bench.{name} printed no {missing}"
    if name == "features":  # the partitioned frame is the same frame
        assert figures["frame_partitioned_equal"] is True
    if name == "replay":  # verify of a log nothing tampered with finds nothing
        assert figures["verify_ok"] is True and figures["verify_differences"] == 0
    if name == "faults":  # what the benchmark exists to show, whatever the speed
        assert figures["events_lost"] == 0 and figures["events_found"] == figures["events_acknowledged"]
        assert figures["events_duplicated_in_log"] == 0 and figures["events_duplicated_on_stream"] == 0
        # every registered process killed once, and NATS and Postgres
        assert figures["poison_answered_imprecisely"] == 0 and figures["faults_injected"] == len(SERVICES) + 2


def test_cpu_meter_counts_children_that_started_and_exited_during_the_phase() -> None:
    """A worker process started and reaped between start() and stop() is the root's CPU, not
    "other processes" (bench.features' partitioned frame runs in such workers)."""
    from bench._common import CpuMeter

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"
    meter = CpuMeter({"me": (os.getpid(), True)})
    meter.start()
    subprocess.run([sys.executable, "-c", burn], check=True)
    cpu = meter.stop()
    assert cpu["me"] >= 0.5, cpu  # the child's 0.5 CPU-s at least; missing it counted ~0
