"""The one owner of sslcli's on-disk formats: run directories, checkpoints and exported backbones.

Everything that writes or reads these files goes through this module (training, evals, export,
`ssl neighbors`), so a format change is made here once.

Run directory (`ssl pretrain --out DIR`):
  config.yaml, metrics.jsonl, summary.json, run.log, index-*.json,
  checkpoints/last.safetensors, checkpoints/epoch-NNNN.safetensors

Training checkpoint: one safetensors file, no pickle. Tensor keys by section:
  model/<key>        the method's state_dict (networks, centre, memories)
  optim/<i>/<name>   optimizer state of parameter i
  rng/<name>         every rank's RNG state, [world, L]
  engine/<name>      loop accumulators
  extra/<key>        other owned state (e.g. extra/bootstrap.window_ids)
Header (all strings): format "sslcli-train", format_version, config (YAML), arch, epoch, step,
time, optim_groups (JSON), backbone_prefix and student_backbone_prefix: the state-dict
prefixes (under model/) of the timm model that evals and export use by default (the teacher for the
DINO family, the encoder for SimSiam) and of the student's. Checkpoints written by sslcli 0.1.0
(format "sslcli-train-1", no prefixes) still load: their prefixes follow from the method name.

Exported backbone (`ssl export --format timm`): timm state-dict keys; header format
"sslcli-export", format_version, arch, timm_kwargs, image_size, mean, std, preset, epoch, which,
reported (0.1.0 wrote format "sslcli-export-1" with the same keys).

Writes are atomic and durable: a temporary file in the same folder, fsync, os.replace, fsync of
the folder; a failed write raises StorageError and leaves the previous file as it was. A run
directory is held by one `ssl pretrain` at a time (`run_lock`). Files are never unpickled: a
PyTorch `.pth` given as weights is refused with a line saying so.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from sslcli.config import Config
from sslcli.errors import CheckpointError, ConfigError, StorageError, UsageError
from sslcli.typed import from_dict, load_yaml

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

TRAIN_FORMAT = "sslcli-train"
EXPORT_FORMAT = "sslcli-export"
FORMAT_VERSION = 2
LEGACY_FORMATS = {"sslcli-train-1": TRAIN_FORMAT, "sslcli-export-1": EXPORT_FORMAT}  # sslcli 0.1.0 -> kind
SECTIONS = ("model", "optim", "rng", "engine", "extra")
WHICH = ("teacher", "student")

CHECKPOINTS = "checkpoints"
LAST = "last.safetensors"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOG_FILE = "run.log"
LOCK_FILE = ".lock"
INIT_FILE = "init_from.json"  # model.init_from runs: the weights' path, kind and sha256
TMP_SUFFIX = ".tmp"
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; a bare pickle (protocol >= 2)


# ----------------------------------------------------------------------------- run directory


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS / LAST


def epoch_checkpoint(run_dir: Path, epoch: int) -> Path:
    return run_dir / CHECKPOINTS / f"epoch-{epoch:04d}.safetensors"


def resolve_weights_file(weights: str | Path) -> Path:
    """A run directory -> its last checkpoint; a file -> itself. CheckpointError when missing."""
    path = Path(weights)
    if path.is_dir():
        path = last_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"weights not found: '{weights}' (a run directory, a training checkpoint "
                              "or an exported .safetensors file)")
    return path


def read_json(path: Path) -> dict | None:
    """A JSON object file; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_jsonl(path: Path) -> list[dict]:
    """The records of a .jsonl file (metrics.jsonl); a line that does not parse (cut by a crash of
    the machine) is skipped. [] when the file does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory holding `checkpoint` (DIR/checkpoints/x.safetensors), or None."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else None


# ----------------------------------------------------------------------------- safetensors I/O


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (the directory entry is the folder's data)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows, where a directory cannot be opened
        return
    try:
        with suppress(OSError):  # some network filesystems refuse to fsync a directory
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_reason(e: BaseException) -> str:
    """'No space left on device' from an OSError, 'File too large (os error 27)' from safetensors."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e).split("I/O error: ")[-1]


def write_atomically(path: Path, write: Callable[[str], None], what: str = "file") -> None:
    """write(tmp) into a temporary file next to `path`, fsync it, rename it over `path`, fsync the
    folder: whenever the process dies, `path` holds the old content or the new, never a part.

    A failed write (disk full, file-size limit, permissions) removes the temporary file and raises
    StorageError naming `what`, the file and the cause; `path` is untouched. A process killed
    mid-write leaves a `.NAME.*.tmp` file, which `remove_stale_temp` clears on the next start.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise StorageError(f"cannot write {what} '{path}': {_write_reason(e)} (the previous file is unchanged)") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_save(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path, what: str = "file") -> None:
    """A safetensors file written with `write_atomically`."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), what)


def atomic_write_text(path: Path, text: str, what: str = "file") -> None:
    """A text file written with `write_atomically`."""
    write_atomically(path, lambda tmp: Path(tmp).write_text(text), what)


def remove_stale_temp(folder: Path) -> list[Path]:
    """Delete the temporary files that killed writers left in `folder` (call it holding the run lock)."""
    stale = sorted(folder.glob(f".*{TMP_SUFFIX}")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def is_locked(run_dir: Path) -> bool:
    """Whether a process holds `run_lock(run_dir)` now (False without flock support)."""
    try:
        f = open(run_dir / LOCK_FILE)
    except OSError:
        return False
    with f:
        try:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
    return False


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for one training run: two runs writing into one --out would overwrite each
    other's checkpoints. An flock on RUN_DIR/.lock, released by the kernel when the process ends,
    so a killed run never leaves a stale lock. UsageError when another process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK_FILE, "a+")
    try:
        if fcntl is not None:  # no flock on Windows: no lock there
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UsageError(f"run directory '{run_dir}' is in use by another ssl pretrain ({holder}): wait for it "
                         "to end or choose another --out") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        f.close()


def read_metadata(path: Path) -> dict[str, str]:
    """The string header of a safetensors file; CheckpointError when it is not one (a truncated
    or garbage file, a PyTorch pickle, which is never unpickled)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several types for a non-safetensors file
        if _starts_with(path, PICKLE_MAGIC):
            raise CheckpointError(f"'{path}' is a PyTorch pickle file: sslcli never unpickles weights (loading a "
                                  "pickle can run code); give a run directory, a checkpoint or an `ssl export` "
                                  ".safetensors file") from None
        reason = str(e).split(": ")[-1] if isinstance(e, SafetensorError) else type(e).__name__
        raise CheckpointError(f"'{path}' is not a valid safetensors file ({reason})") from None


def _starts_with(path: Path, magics: tuple[bytes, ...]) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(magics)


def read_tensors(path: Path, prefix: str = "") -> dict[str, Tensor]:
    """Every tensor whose key starts with `prefix`, keyed without it."""
    with safe_open(str(path), framework="pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def read_sections(path: Path) -> dict[str, dict[str, Tensor]]:
    """All tensors of a training checkpoint split by section: {"model": {...}, "optim": ...}."""
    out: dict[str, dict[str, Tensor]] = {s: {} for s in SECTIONS}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            section, _, rest = key.partition("/")
            if section not in out:
                raise CheckpointError(f"'{path}': unknown checkpoint section in key '{key}'")
            out[section][rest] = f.get_tensor(key)
    return out


def write_sections(path: Path, sections: dict[str, dict[str, Tensor]], header: "CheckpointHeader",
                   extra_meta: dict[str, str]) -> None:
    """Inverse of read_sections: `section/key` tensors and the header, atomically."""
    tensors = {f"{s}/{k}": v for s, entries in sections.items() for k, v in entries.items()}
    atomic_save(tensors, {**extra_meta, **header.to_metadata()}, path, what="checkpoint")


# ----------------------------------------------------------------------------- headers


def format_of(meta: dict[str, str]) -> tuple[str | None, int]:
    """(kind, version) of a header: kind TRAIN_FORMAT, EXPORT_FORMAT or None (not ours)."""
    fmt = meta.get("format")
    if fmt in LEGACY_FORMATS:
        return LEGACY_FORMATS[fmt], 1
    if fmt in (TRAIN_FORMAT, EXPORT_FORMAT):
        return fmt, int(meta.get("format_version", FORMAT_VERSION))
    return None, 0


def parse_config(text: str, path: Path) -> Config:
    """The run config stored in a checkpoint header or config.yaml."""
    try:
        return from_dict(Config, _legacy_config(load_yaml(text, str(path))))  # guarded: a crafted header may hold an alias bomb
    except (ConfigError, yaml.YAMLError, TypeError) as e:
        raise CheckpointError(f"'{path}' has an unreadable config ({e})") from None


def _legacy_config(data: dict) -> dict:
    """0.1.0 wrote every method field for every method (one MethodConfig): keep the method's own."""
    method = data.get("method")
    if isinstance(method, dict) and method.get("name") == "simsiam":
        data["method"] = {k: v for k, v in method.items() if k in ("name", "out_dim", "hidden_dim", "pred_dim",
                                                                    "fix_pred_lr")}
    elif isinstance(method, dict):
        data["method"] = {k: v for k, v in method.items() if k not in ("pred_dim", "fix_pred_lr")}
    return data


def read_run_config(run_dir: Path) -> Config:
    path = run_dir / CONFIG_FILE
    try:
        text = path.read_text()
    except OSError as e:
        raise CheckpointError(f"cannot read run config '{path}': {e.strerror}") from None
    return parse_config(text, path)


@dataclass
class CheckpointHeader:
    """The header of a training checkpoint, typed."""

    config_yaml: str
    arch: str
    epoch: int
    step: int
    time: str
    backbone_prefix: str  # under model/, e.g. "teacher.backbone.model."
    student_backbone_prefix: str
    steps_per_epoch: int = 0  # 0: unknown (checkpoints written before 0.2)
    version: int = FORMAT_VERSION

    def to_metadata(self) -> dict[str, str]:
        return {"format": TRAIN_FORMAT, "format_version": str(self.version), "config": self.config_yaml,
                "arch": self.arch, "epoch": str(self.epoch), "step": str(self.step), "time": self.time, "backbone_prefix": self.backbone_prefix,
                "student_backbone_prefix": self.student_backbone_prefix, "steps_per_epoch": str(self.steps_per_epoch)}

    @property
    def config(self) -> Config:
        return parse_config(self.config_yaml, Path("<checkpoint header>"))

    def prefix(self, which: str) -> str:
        """`model/`-qualified key prefix of the teacher (evaluated) or student backbone's timm model."""
        if which not in WHICH:
            raise CheckpointError(f"--which must be teacher or student, got '{which}'")
        return "model/" + (self.backbone_prefix if which == "teacher" else self.student_backbone_prefix)


# Where 0.1.0 checkpoints kept their backbones (no prefix in the header): by method name.
_LEGACY_PREFIXES = {"simsiam": ("student.backbone.model.", "student.backbone.model.")}
_LEGACY_DEFAULT = ("teacher.backbone.model.", "student.backbone.model.")


def read_checkpoint_header(path: Path) -> CheckpointHeader:
    """CheckpointError unless `path` is a training checkpoint (any format version)."""
    meta = read_metadata(path)
    kind, version = format_of(meta)
    if kind != TRAIN_FORMAT:
        raise CheckpointError(f"'{path}' is not an sslcli training checkpoint (format {meta.get('format')!r}): "
                              "give a run directory or one of its checkpoints/*.safetensors")
    if "config" not in meta:
        raise CheckpointError(f"checkpoint '{path}' has no config in its header")
    if "backbone_prefix" in meta:
        prefixes = (meta["backbone_prefix"], meta.get("student_backbone_prefix", meta["backbone_prefix"]))
    else:
        method = parse_config(meta["config"], path).method.name
        prefixes = _LEGACY_PREFIXES.get(method, _LEGACY_DEFAULT)
    return CheckpointHeader(meta["config"], meta.get("arch", ""), int(meta.get("epoch", 0)),
                            int(meta.get("step", 0)), meta.get("time", ""),
                            prefixes[0], prefixes[1], int(meta.get("steps_per_epoch", 0)), version)
