"""Background DreamBooth LoRA training jobs for the lora_sd page: a job outlives the browser session that started it
and the page that shows it, because everything about it lives in its folder and the page reads that on every run.

    <jobs_dir>/<job id>/
        job.json          what was asked: the command line, the prompt, when, the runner's pid
        images/           the uploaded instance images
        train.log         the trainer's stdout and stderr
        out/              train_lora_sd.py's --output_dir: progress.json (step, loss, status), validation/,
                          checkpoint-N/, pytorch_lora_weights.safetensors, loss_curve.png
        exit.json         written by the runner when the trainer ends: its exit status

The runner (`python -m glm_tune.sd_jobs run <job dir>`) starts the trainer, waits for it and writes exit.json; it
leads its own process group, so that stopping a job stops both. A job whose runner is gone without an exit.json was
killed (a machine restart, SIGKILL): it shows as stopped and can be resumed from its last checkpoint.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from glm_tune.atomic import write_bytes, write_json
from glm_tune.errors import UserError, first_line
from glm_tune.sd_lora import IMAGE_SUFFIXES, LORA_FILE, PROGRESS_FILE, REPO_ROOT

TRAIN_SCRIPT = REPO_ROOT / "APP_example" / "lora_sd" / "train_lora_sd.py"
JOB_FILE, EXIT_FILE, LOG_FILE = "job.json", "exit.json", "train.log"
_children = {}  # pid -> Popen of the runners this process started: polled so that none is left a zombie


@dataclass
class JobStatus:
    job_dir: Path
    state: str  # running | done | failed | stopped
    step: int
    total_steps: int
    loss: float | None
    seconds_per_step: float | None
    error: str | None
    job: dict

    @property
    def out_dir(self):
        return self.job_dir / "out"

    @property
    def adapter(self):
        path = self.out_dir / LORA_FILE
        return path if path.is_file() else None

    def validation_images(self):
        """The newest validation step's images (paths), or []."""
        folder = self.out_dir / "validation"
        files = sorted(folder.glob("step-*.png")) if folder.is_dir() else []
        if not files:
            return []
        last = files[-1].name.split("-")[1]
        return [f for f in files if f.name.split("-")[1] == last]


def save_uploads(folder, uploads):
    """Write uploaded (name, bytes) pairs as images into `folder`; a file that is not an image is a UserError naming
    it, and nothing is written then."""
    import io

    checked = []
    for name, data in uploads:
        safe = Path(name).name
        if not safe or Path(safe).suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(f"{name}: not an image file (expected {' '.join(IMAGE_SUFFIXES)})")
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise UserError(f"{name}: not an image that can be read ({first_line(err)})") from None
        checked.append((safe, data))
    if not checked:
        raise UserError("no images: upload a few pictures of the subject")
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, data) in enumerate(checked):
        write_bytes(folder / f"{i:03d}-{name}", data)
    return folder


def start_job(jobs_dir, instance_prompt, uploads=None, instance_dir=None, flags=(), env=None):
    """A new job folder with the uploads (or `instance_dir`'s images), and its runner started; returns the folder."""
    jobs_dir = Path(jobs_dir)
    job_dir = jobs_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    if uploads:
        images = save_uploads(job_dir / "images", uploads)
    elif instance_dir is not None:
        images = Path(instance_dir)
    else:
        raise UserError("no images: upload a few pictures of the subject")
    command = [sys.executable, str(TRAIN_SCRIPT), "--instance_data_dir", str(images), "--instance_prompt",
               instance_prompt, *map(str, flags), "--output_dir", str(job_dir / "out")]
    job = {"id": job_dir.name, "instance_prompt": instance_prompt, "command": command, "created": time.time(),
           "flags": list(map(str, flags))}
    job_dir.mkdir(parents=True, exist_ok=True)
    write_json(job_dir / JOB_FILE, job)
    launch(job_dir, env=env)
    return job_dir


def resume_job(job_dir, env=None):
    """Start a stopped or failed job again, from its newest checkpoint."""
    status = job_status(job_dir)
    if status.state == "running":
        raise UserError(f"{job_dir.name}: still running")
    job = status.job
    if "--resume_from_checkpoint" not in job["command"]:
        job["command"] = [*job["command"], "--resume_from_checkpoint", "latest"]
    write_json(Path(job_dir) / JOB_FILE, job)
    (Path(job_dir) / EXIT_FILE).unlink(missing_ok=True)
    launch(Path(job_dir), env=env)


def launch(job_dir, env=None):
    log = open(job_dir / LOG_FILE, "ab")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "glm_tune.sd_jobs", "run", str(job_dir)], cwd=REPO_ROOT,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {})})
    finally:
        log.close()
    _children[proc.pid] = proc
    job = json.loads((job_dir / JOB_FILE).read_text())
    job.update(runner_pid=proc.pid, started=time.time())
    write_json(job_dir / JOB_FILE, job)
    return proc.pid


def stop_job(job_dir):
    """Stop a running job (its runner's whole process group); it can be resumed later."""
    job = json.loads((Path(job_dir) / JOB_FILE).read_text())
    pid = job.get("runner_pid")
    if pid and _alive(pid):
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        proc = _children.get(pid)
        if proc is not None:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(pid, signal.SIGKILL)
                proc.wait()


def _alive(pid):
    proc = _children.get(pid)
    if proc is not None:
        return proc.poll() is None  # reaps it when it has ended
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (ended, not yet reaped by a parent that is not us) is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def last_error(job_dir):
    """The trainer's `error: ...` line, else the last line of its log."""
    try:
        lines = [line.strip() for line in (Path(job_dir) / LOG_FILE).read_text(errors="replace").replace(
            "\r", "\n").splitlines() if line.strip()]
    except OSError:
        return None
    errors = [line for line in lines if line.startswith("error:")]
    return errors[-1] if errors else (lines[-1] if lines else None)


def job_status(job_dir):
    job_dir = Path(job_dir)
    job = _read_json(job_dir / JOB_FILE) or {}
    progress = _read_json(job_dir / "out" / PROGRESS_FILE) or {}
    finished = _read_json(job_dir / EXIT_FILE)
    error = None
    if finished is not None:
        code = finished.get("returncode")
        state = "done" if code == 0 else "stopped" if isinstance(code, int) and code < 0 else "failed"
        if state == "failed":
            error = progress.get("error") or last_error(job_dir)
    elif job.get("runner_pid") and _alive(job["runner_pid"]):
        state = "running"
    else:
        state = "stopped"
    return JobStatus(job_dir, state, progress.get("step", 0), progress.get("total_steps", 0), progress.get("loss"),
                     progress.get("seconds_per_step"), error, job)


def list_jobs(jobs_dir):
    """Job folders, newest first."""
    jobs_dir = Path(jobs_dir)
    if not jobs_dir.is_dir():
        return []
    return sorted((p for p in jobs_dir.iterdir() if (p / JOB_FILE).is_file()), key=lambda p: p.name, reverse=True)


def run(job_dir):
    """The runner: the job's command, then exit.json with its exit status. SIGTERM is passed on to the trainer."""
    job_dir = Path(job_dir)
    job = json.loads((job_dir / JOB_FILE).read_text())
    child = subprocess.Popen(job["command"], cwd=REPO_ROOT)

    def forward(signum, frame):
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    returncode = child.wait()
    write_json(job_dir / EXIT_FILE, {"returncode": returncode, "finished": time.time()})
    return returncode


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "run":
        sys.exit("usage: python -m glm_tune.sd_jobs run JOB_DIR")
    sys.exit(0 if run(sys.argv[2]) == 0 else 1)
