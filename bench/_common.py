"""Helpers shared by the bench scripts: device sync, peak memory in a fresh subprocess, table and JSON output."""

import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from glm_tune import atomic

MEMORY_MARKER = "BENCH_MEMORY_RESULT "


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_bytes(field):
    """VmRSS (now) or VmHWM (peak) of this process, from /proc/self/status (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory_bytes(device):
    """CUDA: torch.cuda.max_memory_allocated; CPU: this process's peak RSS (what the interpreter and torch hold
    included). Both only ever grow, which is why a measurement gets a fresh process (run_memory_child).
    Not getrusage's ru_maxrss: in a child, Linux counts the parent's RSS at the fork in it (measured: 2.0 GB in a child
    of a 2 GB parent), while VmHWM belongs to the child's own address space."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if Path("/proc/self/status").exists():
        return rss_bytes("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def report_memory(result):
    """Child side: hand `result` (a JSON-able dict) back to run_memory_child."""
    print(MEMORY_MARKER + json.dumps(result), flush=True)


def run_memory_child(script, argv):
    """Run `python script *argv` in a fresh interpreter and return the dict it passed to report_memory."""
    proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(MEMORY_MARKER):
            return json.loads(line[len(MEMORY_MARKER):])
    raise RuntimeError(f"memory subprocess failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def print_rows(rows):
    """(label, value) pairs as an aligned two-column table."""
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def generation_rows(label, results):
    """Table rows for bench_generate's results ({batch size: figures}), three a batch size."""
    rows = []
    for bs, g in results.items():
        rows += [(f"{label} bs={bs}: new tokens/s", f"{g['gen_tokens_per_s']:.1f}"),
                 (f"{label} bs={bs}: decode tokens/s", f"{g['decode_tokens_per_s']:.1f}"),
                 (f"{label} bs={bs}: time to first token s", f"{g['ttft_s']:.3f}")]
    return rows


def report(rows, result, json_path=None):
    """The table on stdout and, with --json, `result` as indented JSON at `json_path` (written atomically)."""
    print_rows(rows)
    if json_path:
        atomic.write_json(json_path, result)


def cpu_name():
    """The CPU's model name (Linux), for the results table: bf16 speed differs by CPU kind."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
