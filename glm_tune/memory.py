"""Peak memory of a stretch of work: GPU (the CUDA allocator's peak) and CPU (this process's resident set, sampled by
a background thread, as the seed's TorchTracemalloc did), both as before / used / peak in MiB."""

import threading

import psutil
import torch

MIB = 2**20


class MemoryTracker:
    """with MemoryTracker() as mem: ...; then mem.report() -> 'GPU ... | CPU ...' (GPU only where CUDA is)."""

    def __init__(self, interval=0.05):
        self.interval = interval
        self.process = psutil.Process()

    def __enter__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.gpu_begin = torch.cuda.memory_allocated()
        self.cpu_begin = self.cpu_peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(self.interval):
            self.cpu_peak = max(self.cpu_peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.cpu_end = self.process.memory_info().rss
        self.cpu_peak = max(self.cpu_peak, self.cpu_end)
        if self.cuda:
            torch.cuda.synchronize()
            self.gpu_end, self.gpu_peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        return False

    def numbers(self):
        """{gpu,cpu}_{begin,used,peak}_mib: memory at the start, the change over the stretch, the stretch's peak."""
        out = {"cpu_begin_mib": self.cpu_begin / MIB, "cpu_used_mib": (self.cpu_end - self.cpu_begin) / MIB,
               "cpu_peak_mib": self.cpu_peak / MIB}
        if self.cuda:
            out.update(gpu_begin_mib=self.gpu_begin / MIB, gpu_used_mib=(self.gpu_end - self.gpu_begin) / MIB,
                       gpu_peak_mib=self.gpu_peak / MIB)
        return out

    def report(self):
        n = self.numbers()
        parts = [f"{kind.upper()} memory: before {n[f'{kind}_begin_mib']:.0f} MiB, used {n[f'{kind}_used_mib']:+.0f} "
                 f"MiB, peak {n[f'{kind}_peak_mib']:.0f} MiB" for kind in ("gpu", "cpu") if f"{kind}_peak_mib" in n]
        return " | ".join(parts)
