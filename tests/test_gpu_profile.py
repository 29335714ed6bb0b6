"""benchmarks/gpu_profile.py's CPU-side part: the summary of an `ncu --page raw --csv` file (the profile section's
ncu runs need the GPU machine)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
RAW = '''"ID","Process ID","Kernel Name","Block Size","Grid Size","gpu__time_duration.sum",\
"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",\
"smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","launch__registers_per_thread"
"","","","","","nsecond","ratio","ratio","register/thread"
"0","123","nf4_gemv_kernel<__nv_bfloat16, 1, true>","(256, 1, 1)","(896, 1, 1)","27,456","12.5","1.25","80"
'''


def _summarize(tmp_path, text):
    path = tmp_path / "raw.csv"
    path.write_text(text)
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_profile.py"), "summarize", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_summary_ranks_the_stalls_and_names_the_kernel(tmp_path):
    run = _summarize(tmp_path, RAW)
    assert run.returncode == 0, run.stderr
    assert "nf4_gemv_kernel<__nv_bfloat16, 1, true>  grid (896, 1, 1)" in run.stdout
    # each value with the unit of ncu's units row (the H100 run of 2026-12-05 printed µs under a "ns" label)
    assert "duration                     27,456 nsecond" in run.stdout
    assert "registers / thread           80 register/thread" in run.stdout
    assert "warp stalls (cycles per issued instruction): long_scoreboard 12.50, barrier 1.25" in run.stdout


def test_a_file_without_kernel_rows_is_an_error_naming_ncu_message(tmp_path):
    run = _summarize(tmp_path, '"==PROF== No kernels were profiled."\n')
    assert run.returncode != 0 and "no kernel rows" in run.stderr and "No kernels were profiled" in run.stderr
