"""Fault injection: kill -9, full disks, crashed workers and ranks, two runs into one --out.

    python benchmarks/faults.py                       # everything, about 10 minutes on 2 CPU cores
    python benchmarks/faults.py --kills 20 --epochs 4 --only kills,disk
    python benchmarks/faults.py --json > faults.json  # the rows as JSON on stdout

Scenarios (each runs the real `ssl` command in a subprocess; --out holds every run directory):
  kills     one DINO run of the demo's size (the demo preset, one metrics line per step, enough
            epochs that every kill lands) is killed with SIGKILL --kills times: some early (start-up,
            restore, first steps), some at a random moment of the epoch after the attempt's first
            new checkpoint, some inside a checkpoint write (the file half written), some at the
            bootstrap epoch end of an AdaSim run, and some inside `ssl eval knn --cache` feature
            writing. Every attempt but the "early" ones trains at least one epoch before it dies. After every kill each file
            under the run directory must read back whole (safetensors, JSON, YAML, JSONL) and the
            next `ssl pretrain --out DIR --resume` must succeed; at the end the per-step losses must
            equal those of an uninterrupted run, float for float (and the k-NN report that of an
            uninterrupted eval). "recovery" is the time from a resume's start to its first new step.
  disk      a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG as on a full
            disk) while a checkpoint and while a feature file is written: exit 1 with one line naming
            the file and the cause; the previous checkpoint is unchanged and resumes.
  crash     SIGKILL to the data-loading worker, then to one of `--procs 2` training processes:
            every process exits within a bounded time with one line, the checkpoint stays whole.
  lock      a second `ssl pretrain` into the --out of a running one: exit 2 at once.

Kills "inside a write" are placed by running the command under this script's --child mode, which
wraps sslcli's safetensors writer (or Bootstrapper.end_epoch) so that it writes half the file,
prints a marker and sleeps: the parent kills on the marker. Nothing in sslcli knows about it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "FAULTPOINT"
DEMO = ["--preset", "demo", "--data", "builtin:shapes", "--set", "train.log_every=1", "--set", "monitor.knn_every=0"]
EVAL = ["eval", "knn", "--train", "builtin:shapes:train", "--val", "builtin:shapes:val", "--device", "cpu",
        "--workers", "0", "--json"]


# ----------------------------------------------------------------------------- child: fault points


def install_faultpoint(kind: str, nth: int) -> None:
    """Make the nth write of `kind` (checkpoint | features) stop half-way, or the nth bootstrap
    epoch end (bootstrap) stop at its start, print MARKER and sleep until killed."""
    if kind in ("checkpoint", "features"):
        from safetensors.torch import save

        import sslcli.runfiles as runfiles
        calls = [0]

        def half_then_sleep(tensors, filename, metadata=None):
            data = save(tensors, metadata=metadata)
            is_checkpoint = f"{os.sep}checkpoints{os.sep}" in str(filename)
            if is_checkpoint == (kind == "checkpoint"):
                calls[0] += 1
                if calls[0] == nth:
                    with open(filename, "wb") as f:
                        f.write(data[: len(data) // 2])
                        f.flush()
                        os.fsync(f.fileno())
                    print(f"{MARKER} {kind} {filename}", file=sys.stderr, flush=True)
                    time.sleep(600)
            with open(filename, "wb") as f:
                f.write(data)

        runfiles.save_file = half_then_sleep
    elif kind == "bootstrap":
        from sslcli.bootstrap import Bootstrapper
        real, calls = Bootstrapper.end_epoch, [0]

        def stop_then_end(self):
            calls[0] += 1
            if calls[0] == nth:
                print(f"{MARKER} bootstrap", file=sys.stderr, flush=True)
                time.sleep(600)
            return real(self)

        Bootstrapper.end_epoch = stop_then_end


def child_main(kind: str, nth: int, args: list[str]) -> None:
    if kind != "none":
        install_faultpoint(kind, nth)
    from sslcli.cli.app import app
    app(args, prog_name="ssl")


# ----------------------------------------------------------------------------- parent: running and killing


@dataclass
class Outcome:
    rc: int | None
    killed: bool
    seconds: float
    stderr: list[str]
    recovery: float | None = None  # seconds from start to the first metrics line past `from_step`


@dataclass
class Runner:
    """Starts `ssl` under --child with a fault point, kills it on a marker or after a delay."""

    fsize_limit: int | None = None
    log: list[str] = field(default_factory=list)

    def run(self, args: list[str], fault: str = "none", nth: int = 1, kill_after: float | None = None,
            on_marker: bool = False, watch: Path | None = None, from_step: int = -1, kill: Callable | None = None,
            timeout: float = 900) -> Outcome:
        cmd = [sys.executable, __file__, "--child", fault, "--nth", str(nth), "--", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=self._limits, env=dict(os.environ, OMP_NUM_THREADS="1"))
        lines: list[str] = []
        marked = threading.Event()
        reader = threading.Thread(target=_read_lines, args=(proc.stderr, lines, marked), daemon=True)
        reader.start()
        start, killed, recovery = time.monotonic(), False, None
        stale = _inode(watch / "metrics.jsonl") if watch is not None else None
        while proc.poll() is None:
            now = time.monotonic() - start
            if (recovery is None and watch is not None and _inode(watch / "metrics.jsonl") != stale
                    and _last_step(watch) > from_step):  # rewritten on resume, then a new step
                recovery = now
            if (on_marker and marked.is_set()) or (kill_after is not None and now >= kill_after):
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            if kill is not None and kill(proc, now):
                killed = proc.wait() == -signal.SIGKILL
                break
            if now > timeout:
                proc.kill()
                raise RuntimeError(f"timed out: {' '.join(args)}")
            time.sleep(0.02)
        rc = proc.wait()
        reader.join(timeout=5)
        seconds = time.monotonic() - start
        self.log.append(f"{' '.join(args)} [fault {fault}] -> rc {rc}{' (killed)' if killed else ''} in {seconds:.1f} s")
        return Outcome(rc, killed, seconds, [line for line in lines if not line.startswith(MARKER)], recovery)

    def _limits(self) -> None:
        if self.fsize_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.fsize_limit, self.fsize_limit))


def _read_lines(stream, lines: list[str], marked: threading.Event) -> None:
    for line in stream:
        lines.append(line.rstrip("\n"))
        if line.startswith(MARKER):
            marked.set()


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def _last_step(run_dir: Path) -> int:
    try:
        tail = (run_dir / "metrics.jsonl").read_bytes()[-4096:].decode(errors="ignore").splitlines()
    except OSError:
        return -1
    for line in reversed(tail):
        try:
            return int(json.loads(line).get("step", -1))
        except ValueError:
            continue
    return -1


def step_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def checkpoint_step(run_dir: Path) -> int:
    from sslcli.runfiles import last_checkpoint, read_checkpoint_header
    path = last_checkpoint(run_dir)
    return read_checkpoint_header(path).step if path.is_file() else -1


def broken_files(folder: Path) -> tuple[list[str], int]:
    """(files that do not read back whole, temporary files left by a killed writer)."""
    import yaml
    from safetensors import safe_open
    broken, temps = [], 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.endswith(".tmp"):
            temps += 1
            continue
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        f.get_tensor(key)
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".jsonl":
                [json.loads(line) for line in path.read_text().splitlines()]
            elif path.suffix == ".yaml":
                yaml.safe_load(path.read_text())
        except Exception as e:  # any failure to read back is what this scenario looks for
            broken.append(f"{path.relative_to(folder)}: {type(e).__name__}")
    return broken, temps


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def one_error_line(out: Outcome) -> str:
    errors = [line for line in out.stderr if line.startswith("error:")]
    return errors[0] if len(errors) == 1 and "Traceback" not in "\n".join(out.stderr) else ""


# ----------------------------------------------------------------------------- scenarios


def kills_scenario(r: Runner, out: Path, kills: int, epochs: int, rng: random.Random) -> list[dict]:
    """`kills` SIGKILLs over one DINO run, one AdaSim run and one cached k-NN eval (see module doc)."""
    n_boot, n_eval = max(1, kills // 10), max(1, kills // 10)
    n_ckpt = max(1, kills // 5)
    n_random = (kills - n_ckpt - n_boot - n_eval) // 2
    plan = ["checkpoint"] * n_ckpt + ["random"] * n_random + ["early"] * (kills - n_ckpt - n_boot - n_eval - n_random)
    rng.shuffle(plan)
    rows = [_killed_training(r, out / "dino", DEMO, max(epochs, n_ckpt + n_random + 1), plan, rng, "demo (DINO)")]
    adasim = ["--preset", "demo-adasim", *DEMO[2:]]
    rows.append(_killed_training(r, out / "adasim", adasim, n_boot + 1, ["bootstrap"] * n_boot, rng, "demo-adasim"))
    rows.append(_killed_eval(r, out, out / "dino-ref", n_eval))
    return rows


def _killed_training(r: Runner, out: Path, preset: list[str], epochs: int, plan: list[str], rng: random.Random,
                     name: str) -> dict:
    ref, victim = out.with_name(out.name + "-ref"), out
    ep = ["--set", f"train.epochs={epochs}", "--quiet"]
    if not (ref / "summary.json").is_file():
        r.run(["pretrain", *preset, *ep, "--out", str(ref)])
    kills, recoveries, broken, temps, failures = 0, [], [], 0, []
    for kind in plan + ["finish"]:
        resume = (victim / "checkpoints" / "last.safetensors").is_file()
        args = ["pretrain", "--out", str(victim), "--resume", "--quiet"] if resume else \
            ["pretrain", *preset, *ep, "--out", str(victim)]
        start_step = checkpoint_step(victim)
        if kind == "early":  # start-up, restore, the first steps: no progress
            o = r.run(args, kill_after=rng.uniform(0.5, 10.0), watch=victim, from_step=start_step)
        elif kind == "random":  # anywhere in the epoch after this attempt's first new checkpoint
            o = r.run(args, kill=_after_new_checkpoint(victim, start_step, rng.uniform(0.0, 12.0)), watch=victim,
                      from_step=start_step)
        elif kind == "finish":
            o = r.run(args, watch=victim, from_step=start_step)
        else:  # inside the second checkpoint write (or bootstrap epoch end): one epoch of progress first
            o = r.run(args, fault=kind, nth=2, on_marker=True, watch=victim, from_step=start_step)
        if resume and o.recovery is not None:
            recoveries.append(o.recovery)
        if o.killed:
            kills += 1
            bad, t = broken_files(victim)
            broken += bad
            temps += t
        elif o.rc != 0:
            failures.append(f"rc {o.rc}: {' | '.join(o.stderr[-2:])}")
    ref_losses, got = step_losses(ref), step_losses(victim)
    return {"scenario": f"kill -9 x{kills}: {name}, {epochs} epochs", "kills": kills,
            "plan": {k: plan.count(k) for k in sorted(set(plan))}, "finished": (victim / "summary.json").is_file(),
            "failures": failures, "broken_files": broken, "temp_files_seen": temps,
            "steps": len(got), "losses_equal": got == ref_losses,
            "max_loss_diff": max((abs(got.get(s, float("inf")) - v) for s, v in ref_losses.items()), default=0.0),
            "worst_recovery_s": round(max(recoveries), 1) if recoveries else None}


def _after_new_checkpoint(run_dir: Path, start_step: int, delay: float):
    """A Runner `kill` callback: SIGKILL `delay` s after a checkpoint past `start_step` appeared."""
    seen: list[float] = []

    def kill(proc, now):
        if not seen and checkpoint_step(run_dir) > start_step:
            seen.append(now)
        if seen and now >= seen[0] + delay:
            proc.send_signal(signal.SIGKILL)
            return True
        return False

    return kill


def _killed_eval(r: Runner, out: Path, weights: Path, kills: int) -> dict:
    cache, ref_cache = out / "eval-cache", out / "eval-cache-ref"
    args = [*EVAL, "--weights", str(weights)]
    reference = r.run([*args, "--cache", str(ref_cache), "--out", str(out / "eval-ref.json")])
    done, broken, temps = 0, [], 0
    for i in range(kills):
        o = r.run([*args, "--cache", str(cache)], fault="features", nth=1 + i % 2, on_marker=True)
        done += o.killed
        bad, t = broken_files(cache)
        broken, temps = broken + bad, temps + t
    final = r.run([*args, "--cache", str(cache), "--out", str(out / "eval-final.json")])
    same = final.rc == 0 and reference.rc == 0 and _knn(out / "eval-final.json") == _knn(out / "eval-ref.json")
    return {"scenario": f"kill -9 x{done}: ssl eval knn --cache (feature writes)", "kills": done,
            "finished": final.rc == 0, "failures": [] if final.rc == 0 else final.stderr[-2:],
            "broken_files": broken, "temp_files_seen": temps, "losses_equal": same}


def _knn(path: Path) -> dict:
    report = json.loads(path.read_text())
    return {k: v for k, v in report.items() if k not in ("seconds", "timings", "cache")}


def disk_scenario(r: Runner, out: Path) -> list[dict]:
    run = out / "disk"
    if not (run / "checkpoints" / "last.safetensors").is_file():
        r.run(["pretrain", *DEMO, "--set", "train.epochs=1", "--quiet", "--out", str(run)])
    last = run / "checkpoints" / "last.safetensors"
    before = sha1(last)
    limited = Runner(fsize_limit=last.stat().st_size // 2, log=r.log)
    full = limited.run(["pretrain", "--out", str(run), "--resume", "--set", "train.epochs=2", "--quiet"])
    intact = sha1(last) == before and not broken_files(run)[0]
    resumed = r.run(["pretrain", "--out", str(run), "--resume", "--set", "train.epochs=2", "--quiet"])
    rows = [{"scenario": "disk full during a checkpoint write", "rc": full.rc, "line": one_error_line(full),
             "previous_checkpoint_intact": intact, "resumed": resumed.rc == 0}]
    cache = out / "disk-cache"
    feats = Runner(fsize_limit=64 * 1024, log=r.log).run([*EVAL, "--weights", str(run), "--cache", str(cache)])
    rows.append({"scenario": "disk full during a feature-file write", "rc": feats.rc, "line": one_error_line(feats),
                 "previous_checkpoint_intact": not broken_files(cache)[0], "resumed": None})
    return rows


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
    except OSError:
        return ""


def crash_scenario(r: Runner, out: Path) -> list[dict]:
    rows = []
    for what, procs in (("a data-loading worker", 1), ("training process 1 of --procs 2", 2)):
        run = out / f"crash-{procs}"
        extra = ["--procs", "2"] if procs == 2 else []
        victim: dict = {}

        def kill_it(proc, now, run=run, procs=procs, victim=victim):
            if victim or not (run / "checkpoints" / "last.safetensors").is_file() or _last_step(run) < 40:
                return False
            kids = [p for p in _children(proc.pid) if "resource_tracker" not in _cmdline(p)]
            if procs == 2:  # the ranks are the main process's children; rank 1 started second
                kids = sorted(k for k in kids if "spawn_main" in _cmdline(k))[1:2]
            if kids:
                victim.update(pid=kids[0], at=now)
                os.kill(kids[0], signal.SIGKILL)
            return False

        o = r.run(["pretrain", *DEMO, "--set", "train.epochs=3", "--quiet", "--out", str(run), *extra], kill=kill_it)
        waited = o.seconds - victim["at"] if victim else None
        resumed = r.run(["pretrain", "--out", str(run), "--resume", "--quiet", *extra])
        rows.append({"scenario": f"SIGKILL to {what}", "rc": o.rc, "line": one_error_line(o), "stderr": o.stderr[-6:],
                     "exit_after_s": round(waited, 1) if waited is not None else None,
                     "previous_checkpoint_intact": not broken_files(run)[0], "resumed": resumed.rc == 0})
    return rows


def lock_scenario(r: Runner, out: Path) -> list[dict]:
    run, second = out / "lock", {}

    def start_second(proc, now):
        if second or not (run / "config.yaml").is_file():
            return False
        second["outcome"] = r.run(["pretrain", *DEMO, "--set", "train.epochs=1", "--quiet", "--out", str(run)])
        proc.send_signal(signal.SIGKILL)
        return True

    r.run(["pretrain", *DEMO, "--set", "train.epochs=2", "--quiet", "--out", str(run)], kill=start_second)
    o = second["outcome"]
    return [{"scenario": "a second ssl pretrain into a running run's --out", "rc": o.rc, "line": one_error_line(o),
             "exit_after_s": round(o.seconds, 1)}]


# ----------------------------------------------------------------------------- main


def render(rows: list[dict]) -> str:
    lines = ["| scenario | outcome |", "|---|---|"]
    for row in rows:
        if "kills" in row:
            ok = row["finished"] and not row["failures"] and not row["broken_files"] and row["losses_equal"]
            detail = (f"{'survived' if ok else 'FAILED'}: {row['kills']} kills, resumed every time: "
                      f"{not row['failures']}, files that did not read back: {len(row['broken_files'])}, "
                      f"results equal to the uninterrupted run: {row['losses_equal']}")
            if row.get("worst_recovery_s") is not None:
                detail += f", worst recovery {row['worst_recovery_s']} s"
        else:
            detail = f"exit {row['rc']}, `{row['line'] or 'NOT ONE LINE'}`"
            if row.get("exit_after_s") is not None:
                detail += f", {row['exit_after_s']} s after the fault"
            if "previous_checkpoint_intact" in row:
                detail += f", previous file intact: {row['previous_checkpoint_intact']}"
            if row.get("resumed") is not None:
                detail += f", resumed: {row['resumed']}"
        lines.append(f"| {row['scenario']} | {detail} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--only", default="kills,disk,crash,lock")
    p.add_argument("--out", type=Path, default=Path("runs/faults"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--nth", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        return child_main(args.child, args.nth, args.rest[1:] if args.rest[:1] == ["--"] else args.rest)
    scenarios = {"kills": lambda r: kills_scenario(r, args.out, args.kills, args.epochs, random.Random(args.seed)),
                 "disk": lambda r: disk_scenario(r, args.out), "crash": lambda r: crash_scenario(r, args.out),
                 "lock": lambda r: lock_scenario(r, args.out)}
    unknown = set(args.only.split(",")) - set(scenarios)
    if unknown:
        p.error(f"unknown scenario {sorted(unknown)} (valid: {', '.join(scenarios)})")
    runner, rows, started = Runner(), [], time.time()
    for name in args.only.split(","):
        rows += scenarios[name](runner)
    if args.json:
        print(json.dumps({"rows": rows, "commands": runner.log, "seconds": round(time.time() - started)}, indent=2))
    else:
        print(render(rows))
        print(f"\n{len(runner.log)} commands in {time.time() - started:.0f} s; run directories under {args.out}")


if __name__ == "__main__":
    main()
