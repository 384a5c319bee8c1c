"""The release-format checkpoint folder: resolve, read, write (crash-safe) and merge.

A krea2 checkpoint is a folder with `model.safetensors` (released tensor layout) and `config.json`:
    {"model": {official DiT fields}, "text_encoder": spec, "autoencoder": spec, "sampling": {...}, "resolution": px}
Released files are named `raw` / `turbo` (paths from KREA2_RAW / KREA2_TURBO) or given as a .safetensors path.
Tensor-file loading (meta-device build, mmap, one-line errors) lives in `krea2.models.loading`; resumable training
state (DCP) is another thing, in `krea2.train.checkpoint`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from krea2.errors import Krea2Error
from krea2.models.dit import DiT, DiTConfig, get_config
from krea2.models.loading import UMASK, check_state_dict, infer_config, read_safetensors, strip_prefix
from krea2.sampling import SamplingConfig, sampling_preset

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# checkpoints shipped in the package: name -> folder under assets/ (the world base, its distilled Turbo student and
# its post-trained chain: SFT, merge, preference optimisation, RL)
SHIPPED = {"world": "world", "world-turbo": "world_turbo", "world-rl": "world_rl"}
RELEASED = {"raw": ("KREA2_RAW", "raw"), "turbo": ("KREA2_TURBO", "turbo")}  # name: (env var, sampling preset)
RELEASED_TEXT_ENCODER = "qwen3-vl"
RELEASED_AUTOENCODER = "qwen-image"
MERGE_METHODS = ("average", "task_arithmetic", "ties")


@dataclass
class CheckpointInfo:
    """Where a checkpoint's weights are and how to run them.

    `model` is None for a bare released file (the architecture is read off the tensor shapes when loading);
    `extra` is a folder's config.json without its `model` block, verbatim ({} for a bare file).
    """

    model_path: Path
    model: DiTConfig | None
    text_encoder: str
    autoencoder: str
    sampling: SamplingConfig
    resolution: int
    extra: dict = field(default_factory=dict)

    def config(self, model: DiTConfig | None = None) -> dict:
        """The config.json a folder of this checkpoint carries (a folder's own values verbatim)."""
        model = model or self.model
        if model is None:
            raise Krea2Error(f"{self.model_path} has no config; pass the model config read off its tensors")
        return {"model": model.to_dict(), "text_encoder": self.text_encoder, "autoencoder": self.autoencoder,
                "sampling": asdict(self.sampling), "resolution": self.resolution, **self.extra}


def sampling_from_dict(d: dict | None, default: str = "raw") -> SamplingConfig:
    """{"preset": name, **overrides} -> SamplingConfig; KeyError (unknown preset) or TypeError (unknown field)."""
    d = dict(d or {})
    preset = d.pop("preset", default)
    return sampling_preset(preset, **d)


def resolve_checkpoint(spec: str) -> CheckpointInfo:
    """`world`, `world-turbo`, `world-rl`, `raw`, `turbo`, a krea2 checkpoint folder, or a released-layout .safetensors
    file.

    Raises Krea2Error when the spec names nothing usable (the message says what to pass instead).
    """
    if spec in SHIPPED:
        path = ASSETS / SHIPPED[spec]
        if not (path / "model.safetensors").is_file():
            raise Krea2Error(f"the {spec} checkpoint is not in this install (src/krea2/assets/{SHIPPED[spec]}); "
                             "reinstall krea2, or train it (see the Makefile) and pass --checkpoint DIR")
        return read_checkpoint_dir(path)
    if spec in RELEASED:
        env, preset = RELEASED[spec]
        value = os.environ.get(env)
        if not value:
            raise Krea2Error(f"--checkpoint {spec} needs the released file: set {env}=/path/to/krea-2-{spec}"
                             ".safetensors (download it from Hugging Face krea/Krea-2-" + spec.capitalize() + ")")
        return released_info(Path(value), preset)
    path = Path(spec)
    if path.is_dir():
        return read_checkpoint_dir(path)
    if path.suffix == ".safetensors" or path.exists():
        return released_info(path, "turbo" if "turbo" in path.name.lower() else "raw")
    raise Krea2Error(f"checkpoint not found: {spec} (use world, world-turbo, raw, turbo, a checkpoint folder or a "
                     ".safetensors file)")


def released_info(path: Path, preset: str) -> CheckpointInfo:
    """A bare released file runs with the released encoders, the named sampling preset and 1024 px."""
    if path.is_dir():
        return read_checkpoint_dir(path)
    return CheckpointInfo(path, None, RELEASED_TEXT_ENCODER, RELEASED_AUTOENCODER, sampling_preset(preset), 1024)


def read_checkpoint_dir(path: Path) -> CheckpointInfo:
    """Read a folder's config.json (weights are not opened); Krea2Error if the folder or its config is not valid."""
    path = Path(path)
    cfg_path, model_path = path / "config.json", path / "model.safetensors"
    if not cfg_path.is_file() or not model_path.is_file():
        raise Krea2Error(f"{path} is not a krea2 checkpoint folder (needs config.json and model.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text())
        model_cfg = DiTConfig.from_dict(cfg["model"])
        sampling = sampling_from_dict(cfg.get("sampling"))
    except (ValueError, KeyError, TypeError) as e:
        raise Krea2Error(f"{cfg_path} is not a valid krea2 config ({e}); it needs a 'model' block and a valid "
                         "'sampling' block") from None
    return CheckpointInfo(model_path, model_cfg, cfg.get("text_encoder", RELEASED_TEXT_ENCODER),
                          cfg.get("autoencoder", RELEASED_AUTOENCODER), sampling,
                          int(cfg.get("resolution", 1024)), {k: v for k, v in cfg.items() if k not in {"model"}})


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def publish_dir(path: str | Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Run fill(tmp) on a hidden sibling folder, fsync it, then rename it to `path`.

    Readers see either no folder, the old folder, or the complete new one; a crash leaves only a hidden
    `.<name>.*.tmp` sibling. Raises Krea2Error if `path` is a file, or a non-empty folder and overwrite is False.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise Krea2Error(f"{path} exists and is not a folder; choose another output folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise Krea2Error(f"{path} already exists and is not empty; choose another output folder or overwrite it "
                         "(--overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = None
    try:
        fill(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        # mkdtemp makes 0700 and safetensors' save_file writes 0600: give everything the permissions a plain
        # mkdir / open() would, so a published checkpoint is readable where any other file is
        for f in tmp.rglob("*"):
            if not f.is_symlink():
                os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~UMASK)
        os.chmod(tmp, 0o777 & ~UMASK)
        if path.exists():  # renaming onto a non-empty folder fails: move the old one aside first
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)  # put the previous folder back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def write_checkpoint(path: str | Path, state_dict: dict[str, Tensor], config: dict, dtype: torch.dtype | None = None,
                     overwrite: bool = False) -> Path:
    """Write a checkpoint folder from released-layout tensors and a full config dict (with a `model` block).

    Tensors are cast to dtype (None: as given). Crash-safe (see publish_dir). Raises Krea2Error if the tensors do
    not match config["model"], or the folder exists and is not empty while overwrite is False.
    """
    cfg = DiTConfig.from_dict(config["model"])
    with torch.device("meta"):  # names and shapes only: no memory, no init
        reference = DiT(cfg)
    check_state_dict(reference, state_dict, source="the weights to write")
    sd = {k: (v.to(dtype) if dtype is not None else v).detach().contiguous().cpu() for k, v in state_dict.items()}

    def fill(tmp: Path) -> None:
        save_file(sd, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")  # last: a torn folder has no config

    return publish_dir(path, fill, overwrite=overwrite)


def write_checkpoint_dir(path: str | Path, model: DiT, text_encoder: str, autoencoder: str,
                         sampling: SamplingConfig | dict, resolution: int, dtype: torch.dtype | None = None,
                         extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write `model` as a checkpoint folder (see write_checkpoint; `extra` adds top-level config.json entries)."""
    sampling = asdict(sampling) if isinstance(sampling, SamplingConfig) else sampling
    config = {"model": model.cfg.to_dict(), "text_encoder": text_encoder, "autoencoder": autoencoder,
              "sampling": sampling, "resolution": resolution, **(extra or {})}
    return write_checkpoint(path, model.state_dict(), config, dtype=dtype, overwrite=overwrite)


def save_random_checkpoint(path: str | Path, preset: str = "tiny-world", seed: int = 0, text_encoder: str = "minilm",
                           resolution: int = 32, overwrite: bool = False) -> Path:
    """A randomly initialised checkpoint folder: for tests and the untrained demo path."""
    torch.manual_seed(seed)
    model = DiT(get_config(preset))
    with torch.no_grad():  # zero-initialised gains/modulations would make every output identical; perturb them
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith("mod.lin") or "modulation" in name:
                p.normal_(0, 0.02)
    sampling = {"steps": 8, "guidance": 1.5, "minres": resolution, "maxres": resolution * 5}
    return write_checkpoint_dir(path, model, text_encoder, "identity", sampling, resolution, overwrite=overwrite)


# ---- merging -------------------------------------------------------------------------------------------------------


def merge_weights(n: int, weights: Sequence[float] | None, method: str, has_base: bool, density: float) -> list[float]:
    """Check the merge arguments and return the factor each input's tensors (or task vectors) are multiplied by.

    average: weights normalised to sum 1 (None: uniform); task_arithmetic / ties: as given (None: 1.0 each).
    Raises a one-line Krea2Error for an unknown method, a weights count mismatch, a zero weight sum (average),
    a missing or superfluous base, or a density outside (0, 1].
    """
    if method not in MERGE_METHODS:
        raise Krea2Error(f"unknown merge method {method!r}; use one of {', '.join(MERGE_METHODS)}")
    if n < 1:
        raise Krea2Error("nothing to merge; pass at least one checkpoint")
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != n:
            raise Krea2Error(f"got {len(weights)} weight(s) for {n} checkpoint(s); pass one weight per checkpoint")
        if not all(math.isfinite(w) for w in weights):
            raise Krea2Error(f"merge weights must be finite numbers, got {weights}")
    if method == "average":
        if has_base:
            raise Krea2Error("a base is only used by task_arithmetic and ties; drop it for average")
        if weights is None:
            return [1.0 / n] * n
        total = sum(weights)
        if total == 0:
            raise Krea2Error(f"average weights {weights} sum to 0; they are normalised to sum 1")
        return [w / total for w in weights]
    if not has_base:
        raise Krea2Error(f"{method} merges task vectors (checkpoint - base); pass the base checkpoint they were "
                         "fine-tuned from (--base)")
    if method == "ties" and not 0 < density <= 1:
        raise Krea2Error(f"ties density must be in (0, 1] (the fraction of each task vector kept), got {density}")
    return weights if weights is not None else [1.0] * n


def _check_layout(ref: dict[str, Tensor], sd: dict[str, Tensor], what: str) -> None:
    missing, unexpected = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
    if missing or unexpected:
        raise Krea2Error(f"{what} does not match the first input: {len(missing)} missing tensor(s) {missing[:3]}, "
                         f"{len(unexpected)} unexpected {unexpected[:3]}; only one architecture can be merged")
    for k, v in ref.items():
        if sd[k].shape != v.shape:
            raise Krea2Error(f"{what} has {k} of shape {tuple(sd[k].shape)} but the first input has "
                             f"{tuple(v.shape)}; only one architecture can be merged")


def _ties(taus: Tensor, weights: Tensor, density: float) -> Tensor:
    """TIES on one tensor: taus (N, ...) task vectors -> merged task vector (...), fp32."""
    flat = taus.reshape(taus.shape[0], -1)
    n = flat.shape[1]
    if n == 0:
        return torch.zeros(taus.shape[1:])
    k = min(n, math.ceil(density * n))
    # trim: keep the k largest magnitudes of each task vector (all entries tied with the k-th are kept)
    kth = flat.abs().kthvalue(n - k + 1, dim=1, keepdim=True).values
    trimmed = torch.where(flat.abs() >= kth, flat, 0.0) * weights[:, None]
    sign = torch.sign(trimmed.sum(0))  # elect by total mass; a zero sum elects nothing (the entry stays at base)
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    merged = torch.where(agree, trimmed, 0.0).sum(0) / agree.sum(0).clamp(min=1)  # disjoint mean
    return merged.reshape(taus.shape[1:])


def _merge_tensors(sds: Sequence[dict[str, Tensor]], factors: list[float], method: str,
                   base: dict[str, Tensor] | None, density: float, uniform: bool) -> Iterator[tuple[str, Tensor]]:
    """(name, merged fp32 tensor) one at a time, so a caller can cast each before the next is computed."""
    for key in sds[0]:
        ts = [sd[key].float() for sd in sds]
        if method == "average":
            if uniform:  # sum then divide: the trainer's PMA average, bit for bit
                out = ts[0].clone()
                for t in ts[1:]:
                    out += t
                yield key, out / len(ts)
                continue
            out = factors[0] * ts[0]
            for w, t in zip(factors[1:], ts[1:], strict=True):
                out += w * t
            yield key, out
            continue
        b = base[key].float()
        if method == "task_arithmetic":
            delta = factors[0] * (ts[0] - b)
            for w, t in zip(factors[1:], ts[1:], strict=True):
                delta += w * (t - b)
            yield key, b + delta
        else:
            taus = torch.stack([t - b for t in ts])
            yield key, b + _ties(taus, torch.tensor(factors, dtype=torch.float32), density)


def _merged(sds: Sequence[dict[str, Tensor]], weights: Sequence[float] | None, method: str,
            base: dict[str, Tensor] | None, density: float) -> Iterator[tuple[str, Tensor]]:
    factors = merge_weights(len(sds), weights, method, base is not None, density)
    for i, sd in enumerate(sds[1:], start=1):
        _check_layout(sds[0], sd, f"input {i}")
    if base is not None:
        _check_layout(sds[0], base, "the base")
    return _merge_tensors(sds, factors, method, base, density, uniform=method == "average" and weights is None)


def merge_state_dicts(sds: list[dict[str, Tensor]], weights: list[float] | None = None, method: str = "average",
                      base: dict[str, Tensor] | None = None, density: float = 0.2) -> dict[str, Tensor]:
    """Merge same-layout state dicts in fp32; returns fp32 tensors (on the inputs' device).

    - "average": Σ w_i θ_i with the weights normalised to sum 1 (None: uniform, computed as Σ θ_i / N, which is
      the trainer's PMA average). No base.
    - "task_arithmetic" (Ilharco et al. 2023): base + Σ w_i (θ_i − base); weights are NOT normalised (None: 1.0
      each, i.e. the plain sum of task vectors). Needs base.
    - "ties" (TIES-merging, Yadav et al. 2023, arXiv 2306.01708), per tensor: task vectors τ_i = θ_i − base are
      trimmed to their ceil(density · numel) largest magnitudes (ties at the threshold kept) and scaled by w_i;
      the sign of each entry is elected by the summed mass Σ_i τ̂_i; the merged entry is the mean of the entries
      that agree with it (zero where the mass is exactly zero); result base + τ_m. Weights are not normalised
      (None: 1.0 each), so weights all λ give the paper's θ_init + λ τ_m. Needs base. The paper trims over the
      whole flattened model; per tensor (as mergekit does) keeps memory at one tensor.

    Raises a one-line Krea2Error on mismatched names/shapes (inputs or base), a weights count mismatch, an
    unknown method, a missing base (task_arithmetic, ties) or a base given to average.
    """
    return dict(_merged(sds, weights, method, base, density))


def _read_weights(spec: str | Path) -> tuple[CheckpointInfo, DiTConfig, dict[str, Tensor]]:
    info = resolve_checkpoint(str(spec))
    sd = strip_prefix(read_safetensors(info.model_path))  # memory-mapped: pages are read as tensors are merged
    return info, info.model or infer_config(sd), sd


def _check_architecture(cfg: DiTConfig, ref: DiTConfig, what: str, first: str) -> None:
    if cfg != ref:
        a, b = cfg.to_dict(), ref.to_dict()
        diff = next(k for k in a if a[k] != b[k])
        raise Krea2Error(f"{what} has a different architecture from {first} ({diff} {a[diff]} != {b[diff]}); "
                         "only checkpoints of one architecture can be merged")


def merge_checkpoints(folders: Sequence[str | Path], out: str | Path, weights: Sequence[float] | None = None,
                      method: str = "average", base: str | Path | None = None, density: float = 0.2,
                      dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Merge checkpoints (anything resolve_checkpoint takes) into a new checkpoint folder at `out`.

    The output carries the first input's config.json plus a `merge` entry {method, inputs, weights (the factors
    applied: normalised for average), base, density (ties)}; tensors are cast to dtype (None: as the first input
    stores each one). See merge_state_dicts for the methods. Raises a one-line Krea2Error on bad arguments (checked
    before any weights are read), differing architectures, or an existing non-empty `out` without overwrite.
    """
    factors = merge_weights(len(folders), weights, method, base is not None, density)
    if method == "average" and len(folders) < 2:  # (PMA may average one snapshot; a soup of one is a mistake)
        raise Krea2Error(f"an average needs at least 2 checkpoints, got {len(folders)}; pass more, or use "
                         "task_arithmetic with --base to scale one model's difference")
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:  # fail before reading gigabytes
        raise Krea2Error(f"{out} already exists and is not empty; choose another output folder or overwrite it "
                         "(--overwrite)")
    inputs = [_read_weights(f) for f in folders]
    first_info, first_cfg, _ = inputs[0]
    for spec, (info, cfg, _) in zip(folders[1:], inputs[1:], strict=True):
        _check_architecture(cfg, first_cfg, str(spec), str(folders[0]))
        for kind in ("text_encoder", "autoencoder"):  # same shapes, different inputs: the soup would mean nothing
            if getattr(info, kind) != getattr(first_info, kind):
                raise Krea2Error(f"{spec} was trained with {kind} {getattr(info, kind)!r} but {folders[0]} with "
                                 f"{getattr(first_info, kind)!r}; merge only checkpoints of the same encoders")
    base_sd = None
    if base is not None:
        _, base_cfg, base_sd = _read_weights(base)
        _check_architecture(base_cfg, first_cfg, f"the base {base}", str(folders[0]))
    sds = [sd for _, _, sd in inputs]
    merged = {k: v.to(dtype or sds[0][k].dtype) for k, v in _merged(sds, weights, method, base_sd, density)}
    record = {"method": method, "inputs": [str(f) for f in folders], "weights": factors,
              "base": None if base is None else str(base)}
    if method == "ties":
        record["density"] = density
    config = {**first_info.config(first_cfg), "merge": record}
    return write_checkpoint(out, merged, config, overwrite=overwrite)
