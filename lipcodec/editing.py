"""Video editing end to end: a video in, an edited video and a report out.

:func:`edit` decodes the video (:mod:`lipcodec.video`), resolves ``model`` to a diffusers
video-to-video pipeline (:func:`load_model`), checks the memory the run needs
(:func:`estimate_memory`), applies a plan with :func:`lipcodec.apply`, runs SDEdit
(noise to ``strength``, denoise ``strength * steps`` steps), watches every latent for
NaN/Inf, and decodes. With ``reference=True`` it first runs the unpruned pipeline from
the same noise and reports the fidelity of the pruned run against it.

>>> import lipcodec                                                      # doctest: +SKIP
>>> result = lipcodec.edit("in.mp4", "models/wan-v2v", prompt="a watercolor", strength=0.6,
...                        planner="lipar", gop="keyint=8:bframes=2", recovery="duplicate")
>>> result.frames.shape, result.report.kept_ratio                       # doctest: +SKIP

``model`` resolution (first match wins; nothing is ever downloaded):

==============================  ==========================================================
a diffusers pipeline object     used as is (a Wan text-to-video pipeline is turned into
                                ``WanVideoToVideoPipeline`` sharing its modules)
a folder with model_index.json  ``DiffusionPipeline.from_pretrained(folder)``, local files
                                only; prompt embeddings may sit next to it in
                                ``prompt_embeds.safetensors`` (for pipelines saved without a
                                text encoder)
``"reference"``                 the embedded reference model (:mod:`lipcodec.models`; guidance
                                defaults to ``models.GUIDANCE`` = 2)
a checkpoint file (.pt, .pth,   a Self-Forcing / CausVid streaming checkpoint: edited by
.ckpt, .safetensors, .bin)      :func:`edit_stream` (``lipcodec edit --stream``) with a Wan VAE
==============================  ==========================================================
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import resource
import time
from pathlib import Path

import attrs
import numpy as np
import torch

from . import metrics
from .video import Video, read_video, wan_vae_codec

PROMPT_EMBEDS_FILE = "prompt_embeds.safetensors"
NO_PROMPT = "no prompt: pass prompt='...' (--prompt) describing the edited video"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class EditError(ValueError):
    """A problem the user can fix (model, prompt, settings, memory); the message says how."""


class NumericalError(EditError):
    """NaN or Inf appeared in latents or model outputs; the message says where."""


# -- model resolution ----------------------------------------------------------------------------
@attrs.define
class Model:
    """A resolved model: the pipeline, where it came from, and any saved prompt embeddings."""

    pipe: object
    source: str
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    embeds_prompt: str | None = None  # the prompt the saved embeddings were made from, if recorded
    guidance_scale: float = 5.0  # the model's default classifier-free guidance


def _not_available(what: str) -> EditError:
    return EditError(
        f"{what} is not available yet; pass a local diffusers Wan pipeline folder instead "
        "(model_index.json + components), e.g. one made by lipcodec.edit.save_tiny_model(DIR) to try things out"
    )


def _is_pipeline(obj) -> bool:
    return not isinstance(obj, (str, os.PathLike)) and hasattr(obj, "transformer") and callable(obj)


def load_model(model, *, device: str | None = None, dtype: torch.dtype | str | None = None) -> Model:
    """Resolve ``model`` by the table in the module docstring; move it to ``device``/``dtype``
    (the dtype applies to the transformer; the VAE stays float32)."""
    if isinstance(model, Model):
        resolved = model
    elif _is_pipeline(model):
        resolved = Model(model, type(model).__name__)
    elif isinstance(model, (str, os.PathLike)):
        resolved = _load_path(model)
    else:
        raise EditError(
            f"model={type(model).__name__} is not a diffusers pipeline, a folder, or 'reference'; "
            "pass e.g. a WanVideoToVideoPipeline or the path of a saved one"
        )
    resolved.pipe = _video_to_video(resolved.pipe)
    _check_adapter(resolved.pipe)
    if dtype is not None and resolve_dtype(dtype) != resolved.pipe.transformer.dtype:
        resolved.pipe.transformer.to(resolve_dtype(dtype))
    if device is not None:
        resolved.pipe.to(resolve_device(device))
    return resolved


def _load_path(model) -> Model:
    text = str(model)
    path = Path(model)
    if text == "reference":
        from . import models

        return Model(models.reference().pipeline(), "reference", guidance_scale=models.GUIDANCE)
    if path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES:
        raise EditError(
            f"{path} looks like a Self-Forcing/CausVid checkpoint, a chunk-causal model: edit with it by streaming "
            "(`lipcodec edit --stream --model CKPT --vae DIR --prompt-embeds FILE`, or lipcodec.editing.edit_stream)"
        )
    if path.is_file():
        raise EditError(f"model {path} is a file, not a diffusers pipeline folder: pass the folder with model_index.json")
    if not path.exists():
        raise FileNotFoundError(
            f"no model at {path}: pass a local diffusers pipeline folder (lipcodec never downloads; fetch one with "
            "`huggingface-cli download REPO --local-dir DIR` first), or a pipeline object in Python"
        )
    if not (path / "model_index.json").is_file():
        hint = " (this is a single model's folder: pass its parent pipeline folder)" if (path / "config.json").is_file() else ""
        raise EditError(f"{path} has no model_index.json, so it is not a diffusers pipeline folder{hint}")
    pipe = _from_pretrained(path)
    model = Model(pipe, str(path))
    embeds = path / PROMPT_EMBEDS_FILE
    if embeds.is_file():
        model.prompt_embeds, model.negative_prompt_embeds, model.embeds_prompt = load_prompt_embeds(embeds)
    return model


def _from_pretrained(path: Path):
    """``DiffusionPipeline.from_pretrained`` from local files; models that keep fp32 modules
    are loaded by hand when ``accelerate`` is missing (diffusers then refuses to load them)."""
    import diffusers
    from diffusers import DiffusionPipeline

    from diffusers.utils import logging as dlog

    index = json.loads((path / "model_index.json").read_text())
    overrides = {name: None for name, entry in index.items()
                 if not name.startswith("_") and isinstance(entry, list) and entry[0] is None}  # saved as None
    try:
        import accelerate  # noqa: F401
    except ImportError:
        for name, entry in index.items():
            if name.startswith("_") or not isinstance(entry, list) or entry[0] != "diffusers":
                continue
            cls = getattr(diffusers, entry[1], None)
            if cls is not None and getattr(cls, "_keep_in_fp32_modules", None) and (path / name).is_dir():
                overrides[name] = _load_model_by_hand(cls, path / name)
    verbosity, bars = dlog.get_verbosity(), dlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()  # no "install accelerate" advice, no loading bars
    dlog.disable_progress_bar()
    try:
        return DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **overrides)
    except (OSError, ValueError, KeyError) as error:
        raise EditError(f"cannot load the pipeline folder {path}: {error}") from None
    finally:
        dlog.set_verbosity(verbosity)
        if bars:
            dlog.enable_progress_bar()


def _load_model_by_hand(cls, folder: Path):
    from safetensors.torch import load_file

    model = cls.from_config(cls.load_config(str(folder)))
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["diffusion_pytorch_model.safetensors"]
    state = {}
    for name in files:
        if not (folder / name).is_file():
            raise EditError(f"{folder} has no {name}: save the model with safe_serialization=True (safetensors)")
        state.update(load_file(str(folder / name)))
    model.load_state_dict(state, strict=True)
    return model.eval()


def _video_to_video(pipe):
    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        params = {}
    if "video" in params:
        return pipe
    if type(pipe).__name__ == "WanPipeline":
        from diffusers import WanVideoToVideoPipeline

        return WanVideoToVideoPipeline.from_pipe(pipe)
    raise EditError(
        f"{type(pipe).__name__} takes no video input; lipcodec.edit needs a video-to-video pipeline "
        "such as diffusers' WanVideoToVideoPipeline"
    )


def _check_adapter(pipe) -> None:
    from .executor import adapters

    names = {cls.__name__ for cls in type(pipe.transformer).__mro__}
    if not names & set(adapters()):
        raise EditError(
            f"lipcodec cannot run plans inside {type(pipe.transformer).__name__} yet (supported: {', '.join(adapters())}); "
            "register an adapter with lipcodec.executor.register_adapter"
        )


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise EditError(f"dtype {dtype!r} is not supported: use one of float32, bfloat16, float16")
    return DTYPES[dtype]


def resolve_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EditError(f"device {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EditError(f"device {device!r} asked for, but no CUDA GPU is available here: use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise EditError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def load_prompt_embeds(path) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
    """Read ``prompt_embeds`` (and optional ``negative_prompt_embeds``) (1, L, D) from a
    safetensors file; the ``prompt`` metadata entry, if present, names the prompt they encode."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt embeddings at {path}: pass a safetensors file with a 'prompt_embeds' tensor")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys, meta = set(f.keys()), f.metadata() or {}
            if "prompt_embeds" not in keys:
                raise EditError(
                    f"{path} holds {sorted(keys)} but no 'prompt_embeds' tensor: save it with "
                    "safetensors.torch.save_file({'prompt_embeds': t, 'negative_prompt_embeds': n}, path)"
                )
            cond = f.get_tensor("prompt_embeds")
            uncond = f.get_tensor("negative_prompt_embeds") if "negative_prompt_embeds" in keys else None
    except EditError:
        raise
    except Exception as error:  # safetensors raises its own error types for non-safetensors files
        raise EditError(f"{path} is not a safetensors file ({error}); save embeddings with safetensors.torch.save_file") from None
    return cond, uncond, meta.get("prompt")


def save_prompt_embeds(path, prompt_embeds, negative_prompt_embeds=None, *, prompt: str | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {"prompt_embeds": prompt_embeds.contiguous()}
    if negative_prompt_embeds is not None:
        tensors["negative_prompt_embeds"] = negative_prompt_embeds.contiguous()
    save_file(tensors, str(path), metadata={"prompt": prompt} if prompt else None)
    return Path(path)


def save_tiny_model(folder, *, seed: int = 0) -> Path:
    """Write diffusers' tiny Wan test configs (random weights, no text encoder) as a pipeline
    folder, with random prompt embeddings in ``prompt_embeds.safetensors``. For trying the
    CLI and for tests; its output is noise-like, not a real edit."""
    from .fidelity import tiny_wan_pipeline

    folder = Path(folder)
    pipe = tiny_wan_pipeline(seed)
    pipe.save_pretrained(str(folder))
    g = torch.Generator().manual_seed(seed)
    dim = pipe.transformer.config.text_dim
    save_prompt_embeds(folder / PROMPT_EMBEDS_FILE, torch.randn(1, 16, dim, generator=g),
                       torch.randn(1, 16, dim, generator=g), prompt="random tiny-model embedding")
    return folder


# -- memory ---------------------------------------------------------------------------------------
@attrs.frozen
class MemoryEstimate:
    """Rough peak bytes of one edit, by part (see :func:`estimate_memory`)."""

    parts: dict
    device: str

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))


def estimate_memory(frames: int, height: int, width: int, pipe=None, *, dtype=torch.float32,
                    device: str = "cpu", cfg: bool = True) -> MemoryEstimate:
    """Estimate peak bytes for ``frames`` pixel frames of ``height`` x ``width``.

    Deliberately rough (within ~2x), meant to refuse hopeless runs before they start:

    - frames: T H W 3 bytes (uint8) x 2 (decoded + PIL copy) + T H W 3 x 4 bytes x 3
      (float input, decoded output, post-processing)
    - vae: a 4-frame causal chunk at full resolution, ``base_dim`` channels, x 8 live
      activations, float32
    - latents: C F h w x 4 bytes x 8 (clean, noise, noisy, predictions, scheduler history)
    - transformer: weights + per call S tokens x (6 x inner + ffn) x dtype bytes; on CPU
      the attention matrix (heads x S x S float32, x 2 for softmax) as PyTorch's math
      kernel materialises it; on CUDA none (flash / memory-efficient kernels).
    """
    tf, sp, z_dim, base_dim = 4, 8, 16, 96
    inner, ffn, heads, patch, params, tdim = 1536, 8960, 12, (1, 2, 2), 1_419_000_000, 4096
    if pipe is not None:
        vae, tr = getattr(pipe, "vae", None), pipe.transformer
        if vae is not None:
            cfg_v = vae.config
            tf = int(getattr(cfg_v, "scale_factor_temporal", None) or getattr(pipe, "vae_scale_factor_temporal", 4))
            sp = int(getattr(cfg_v, "scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor_spatial", 8))
            z_dim, base_dim = int(cfg_v.z_dim), int(getattr(cfg_v, "base_dim", base_dim))
        c = tr.config
        heads = int(c.num_attention_heads)
        inner, ffn, patch = heads * int(c.attention_head_dim), int(c.ffn_dim), tuple(c.patch_size)
        params = sum(p.numel() for p in tr.parameters())
        tdim = int(getattr(c, "text_dim", tdim))
    dsize = torch.empty(0, dtype=dtype).element_size()
    lf, lh, lw = (frames - 1) // tf + 1, height // sp, width // sp
    tokens = (lf // patch[0]) * (lh // patch[1]) * (lw // patch[2])
    pixels = frames * height * width * 3
    parts = {
        "frames": pixels * 2 + pixels * 4 * 3,
        "vae": 4 * height * width * base_dim * 4 * 8,
        "latents": z_dim * lf * lh * lw * 4 * 8,
        "weights": params * dsize,
        "activations": tokens * (6 * inner + ffn) * dsize + 512 * tdim * dsize * (2 if cfg else 1),
    }
    if str(device).startswith("cpu"):
        parts["attention"] = heads * tokens * tokens * 4 * 2
    return MemoryEstimate(parts, str(device))


def available_memory(device="cpu") -> int:
    """Free bytes: ``torch.cuda.mem_get_info`` on CUDA; MemAvailable from /proc/meminfo on
    CPU (else free pages from ``os.sysconf``)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def parse_bytes(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"1.5GiB"``, ``"1000"`` -> bytes (binary units)."""
    units = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    s = str(text).strip().lower().removesuffix("ib").removesuffix("b")
    number, unit = (s[:-1], s[-1]) if s and s[-1] in units else (s, "")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise EditError(f"memory size {text!r} must look like 512M, 2G or a number of bytes") from None
    if not value > 0:
        raise EditError(f"memory size {text!r} must be positive")
    return int(value)


def check_memory(estimate: MemoryEstimate, limit: int | None, *, size: tuple[int, int], frames: int) -> None:
    """Refuse with the estimate and a smaller setting when ``estimate`` exceeds ``limit``
    (None = what is available on the device now)."""
    if limit is None:
        limit = available_memory(estimate.device)
    if estimate.total <= limit:
        return
    scale = math.sqrt(limit / estimate.total)
    h, w = size
    fit_h, fit_w = max(16, int(h * scale) // 16 * 16), max(16, int(w * scale) // 16 * 16)
    fit_frames = max(1, int(frames * limit / estimate.total) // 4 * 4 + 1)
    biggest = max(estimate.parts, key=estimate.parts.get)
    raise EditError(
        f"this edit needs about {human_bytes(estimate.total)} on {estimate.device} ({frames} frames {w}x{h}; "
        f"largest part: {biggest} {human_bytes(estimate.parts[biggest])}) but only {human_bytes(limit)} is available: "
        f"try --size {fit_w}x{fit_h} or --max-frames {fit_frames} (Python: size=, max_frames=)"
    )


def _probe(path: Path, fps, size, max_frames) -> tuple[int, int, int] | None:
    """(frames, height, width) the read will produce, from the container header; None if unknown."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            h, w = stream.codec_context.height, stream.codec_context.width
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            count = stream.frames or 0
            if not count and stream.duration and stream.time_base and rate:
                count = int(float(stream.duration * stream.time_base) * rate)
            if not count and container.duration and rate:
                count = int(container.duration / 1_000_000 * rate)
    except Exception:  # read_video reports unreadable files properly
        return None
    if not count or not h or not w:
        return None
    if fps and rate:
        count = int(count * fps / rate)
    if max_frames:
        count = min(count, max_frames)
    count = max(1, (count - 1) // 4 * 4 + 1)
    h, w = size if size else (h // 16 * 16, w // 16 * 16)
    return count, h, w


# -- the report -------------------------------------------------------------------------------------
@attrs.define
class EditReport:
    """What one edit did and cost. ``fidelity`` is set when a reference (unpruned) run was made."""

    model: str
    planner: str
    gop: str
    recovery: str
    restore: str
    strength: float
    steps: int
    denoise_steps: int
    seed: int
    frames: int
    size: tuple[int, int]
    fps: float
    latent_shape: tuple[int, ...]
    kept_ratio: float
    kept_tokens: int
    tokens: int
    frame_types: str
    frame_kept: list[float]
    model_calls: int
    seconds: float
    total_seconds: float
    peak_memory: int
    peak_memory_kind: str
    memory_estimate: int
    fidelity: dict | None = None

    def to_dict(self) -> dict:
        return attrs.asdict(self)

    def table(self) -> str:
        h, w = self.size
        lines = [
            f"model    {self.model}",
            f"video    {self.frames} frames {w}x{h} @ {self.fps:g} fps, latents {tuple(self.latent_shape)}",
            f"edit     strength {self.strength:g}, {self.steps} steps ({self.denoise_steps} run), seed {self.seed}",
            f"plan     {self.planner}, gop {self.gop}, recovery {self.recovery}, restore {self.restore}",
            f"kept     {self.kept_tokens}/{self.tokens} tokens ({self.kept_ratio:.1%}), frame types {self.frame_types}",
            "         per frame " + " ".join(f"{t}{k:.0%}" for t, k in zip(self.frame_types, self.frame_kept)),
            f"time     {self.seconds:.2f} s denoise+decode ({self.model_calls} model calls), {self.total_seconds:.2f} s total",
            f"memory   peak {human_bytes(self.peak_memory)} ({self.peak_memory_kind}), "
            f"estimated {human_bytes(self.memory_estimate)}",
        ]
        if self.fidelity:
            f = self.fidelity
            lines.append(
                f"fidelity vs unpruned: PSNR {f['psnr']:.2f} dB, SSIM {f['ssim']:.4f}, latent PSNR {f['latent_psnr']:.2f} dB, "
                f"speed-up {f['speedup']:.2f}x ({f['unpruned_seconds']:.2f} s unpruned)"
            )
        return "\n".join(lines)


@attrs.define(eq=False)
class EditResult:
    """``frames`` (T, H, W, 3) uint8 edited video; ``report``; final ``latents``; the ``plan``."""

    frames: np.ndarray
    report: EditReport
    latents: torch.Tensor
    fps: float
    plan: object
    reference_frames: np.ndarray | None = None

    def __iter__(self):  # frames, report = lipcodec.edit(...)
        return iter((self.frames, self.report))


def _patch(obj, name: str, value, undo: list) -> None:
    """Set an instance attribute; ``undo`` gets the callable that puts back what was there."""
    had, previous = name in obj.__dict__, obj.__dict__.get(name)
    setattr(obj, name, value)
    undo.append(lambda: setattr(obj, name, previous) if had else obj.__dict__.pop(name, None))


@contextlib.contextmanager
def cached_encode(vae, cache: dict):
    """Reuse the VAE encoding while the same video comes in (the pipeline encodes it on
    every call; the posterior mode is deterministic), so repeated runs of one video pay
    for one encode."""
    encode, undo = vae.encode, []

    def encode_once(x, *args, **kwargs):
        hit = cache.get("x")
        if hit is not None and hit.shape == x.shape and hit.device == x.device and torch.equal(hit, x):
            return cache["out"]
        out = encode(x, *args, **kwargs)
        cache.update(x=x.detach().clone(), out=out)
        return out

    _patch(vae, "encode", encode_once, undo)
    try:
        yield
    finally:
        while undo:
            undo.pop()()


# -- NaN/Inf watch -----------------------------------------------------------------------------------
def _first_bad(x: torch.Tensor) -> tuple | None:
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return None
    return tuple((~finite).nonzero()[0].tolist())


def _frame_text(index: tuple, temporal_factor: int) -> str:
    from .gop import pixel_frames_of_latent

    if len(index) < 5:
        return f"index {index}"
    frame = index[2]
    pixels = pixel_frames_of_latent(frame, temporal_factor)
    span = f"{pixels.start}" if len(pixels) == 1 else f"{pixels.start}-{pixels.stop - 1}"
    return f"latent frame {frame} (pixel frames {span}), channel {index[1]}, row {index[3]}, col {index[4]}"


class _Watch:
    """Checks the VAE encoding, every transformer output and the final latents for NaN/Inf."""

    def __init__(self, pipe, temporal_factor: int, progress):
        self.pipe, self.tf, self.step, self.call = pipe, temporal_factor, 0, 0
        self.progress = progress
        self._undo = []

    def __enter__(self):
        vae, transformer = self.pipe.vae, self.pipe.transformer
        encode = vae.encode

        def checked_encode(*args, **kwargs):
            out = encode(*args, **kwargs)
            dist = getattr(out, "latent_dist", None)
            z = dist.mean if dist is not None else (out[0] if isinstance(out, tuple) else None)
            if isinstance(z, torch.Tensor):
                self.check(z, "the VAE encoding of the input video", "check the VAE weights, or use --dtype float32")
            return out

        _patch(vae, "encode", checked_encode, self._undo)

        def hook(module, args, output):
            sample = getattr(output, "sample", None)
            sample = sample if sample is not None else (output[0] if isinstance(output, (tuple, list)) else output)
            self.call += 1
            self.check(sample, f"the transformer output at denoising step {self.step} (model call {self.call})",
                       "check the model weights, or use --dtype float32 (float16 overflows easily)")

        handle = transformer.register_forward_hook(hook)
        self._undo.append(handle.remove)
        return self

    def on_step_end(self, pipe, i, t, kwargs):
        self.step = i + 1
        if self.progress is not None:
            self.progress.update()
        return {}

    def check(self, x: torch.Tensor, where: str, fix: str) -> None:
        bad = _first_bad(x.detach())
        if bad is not None:
            kind = "NaN" if torch.isnan(x).any() else "Inf"
            raise NumericalError(f"{kind} in {where}, first at {_frame_text(bad, self.tf)}: {fix}")

    def __exit__(self, *exc):
        while self._undo:
            self._undo.pop()()


# -- the edit -----------------------------------------------------------------------------------------
def _check_settings(strength, steps, guidance_scale):
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise EditError(f"steps={steps!r} must be an int >= 1 (10-50 is typical)")
    if not (isinstance(strength, (int, float)) and 0 < strength <= 1):
        raise EditError(f"strength={strength!r} is out of range: use 0 < strength <= 1 (0.3 keeps much of the input)")
    if int(steps * strength) < 1:
        raise EditError(
            f"strength {strength:g} with {steps} steps runs no denoising step (int(steps * strength) = 0): "
            f"raise steps to at least {math.ceil(1 / strength)} or raise strength"
        )
    if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise EditError(f"guidance_scale={guidance_scale!r} must be a finite number >= 0")


def _embeddings(model: Model, prompt, prompt_embeds, negative_prompt_embeds, negative_prompt):
    """Keyword arguments for the pipeline's text inputs, or a clear error."""
    pipe = model.pipe
    vocabulary = getattr(pipe, "vocabulary", None)  # a word-conditioned model (the embedded one)
    for word in (prompt, negative_prompt):
        if vocabulary is not None and word is not None and str(word).strip().lower() not in (*vocabulary, ""):
            raise EditError(f"unknown edit word {word!r}: the {model.source} model knows {', '.join(vocabulary)}")
    has_encoder = getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "tokenizer", None) is not None
    if isinstance(prompt_embeds, (str, os.PathLike)):
        prompt_embeds, negative_prompt_embeds, embeds_prompt = load_prompt_embeds(prompt_embeds)
    elif prompt_embeds is None and model.prompt_embeds is not None and not (has_encoder and prompt is not None):
        prompt_embeds, embeds_prompt = model.prompt_embeds, model.embeds_prompt
        negative_prompt_embeds = model.negative_prompt_embeds if negative_prompt_embeds is None else negative_prompt_embeds
        if prompt is not None and embeds_prompt is not None and prompt != embeds_prompt:
            raise EditError(
                f"the model has no text encoder and its saved embeddings encode {embeds_prompt!r}, not {prompt!r}: "
                "drop --prompt, or pass --prompt-embeds FILE made from your prompt"
            )
    if prompt_embeds is not None:
        dim = pipe.transformer.config.text_dim
        for name, t in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if t is None:
                continue
            if t.ndim != 3 or t.shape[-1] != dim:
                raise EditError(f"{name} has shape {tuple(t.shape)}; the model takes (1, L, {dim})")
            if not torch.isfinite(t).all():
                raise NumericalError(f"{name} contains NaN or Inf: regenerate the prompt embeddings")
        return {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
    if not has_encoder:
        raise EditError(
            f"{model.source} has no text encoder, so a text prompt cannot be encoded: pass prompt embeddings "
            f"(--prompt-embeds FILE / prompt_embeds=; a safetensors file with 'prompt_embeds' (1, L, D)), "
            f"or save them as {PROMPT_EMBEDS_FILE} in the model folder"
        )
    if prompt is None:
        raise EditError(NO_PROMPT)
    return {"prompt": prompt, "negative_prompt": negative_prompt}


def _peak_memory_start(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "CUDA allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS"


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_pipeline(pipe, frames: np.ndarray, *, text: dict, steps: int, strength: float, guidance_scale: float,
                 seed: int, progress: bool = False, desc: str = "denoise") -> tuple[torch.Tensor, np.ndarray, int]:
    """One SDEdit run with NaN/Inf checks: (final latents, decoded float frames in [0, 1], calls)."""
    from PIL import Image
    from tqdm.auto import tqdm

    from .fidelity import decode_latents

    device = pipe.transformer.device
    height, width = frames.shape[1:3]
    tf = int(getattr(pipe, "vae_scale_factor_temporal", 4))
    text = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in text.items()}
    if text.get("negative_prompt_embeds") is None and "prompt_embeds" in text and guidance_scale > 1:
        guidance_scale = 1.0  # no unconditional embedding: classifier-free guidance is off
    old_config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=int(steps * strength), desc=desc, unit="step", disable=not progress, leave=False)
    try:
        with bar, _Watch(pipe, tf, bar) as watch, torch.no_grad():
            latents = pipe(
                video=[Image.fromarray(f) for f in frames], height=height, width=width, num_inference_steps=steps,
                strength=strength, guidance_scale=guidance_scale,
                generator=torch.Generator(device).manual_seed(seed), output_type="latent",
                callback_on_step_end=watch.on_step_end, **text,
            ).frames.float()
            watch.check(latents, "the final latents", "check the model weights and scheduler settings")
            pixels = decode_latents(pipe, latents)
            if not np.isfinite(pixels).all():
                raise NumericalError("NaN or Inf in the decoded frames (VAE decoder): check the VAE weights")
    finally:
        pipe._progress_bar_config = old_config
    return latents, pixels, watch.call


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(frames) * 255.0), 0, 255).astype(np.uint8)


def edit(
    video,
    model,
    *,
    prompt: str | None = None,
    strength: float = 0.6,
    steps: int = 10,
    planner="lipar",
    gop=None,
    recovery: str = "none",
    restore: str = "copy",
    seed: int = 0,
    reference: bool = False,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    prompt_embeds=None,
    negative_prompt_embeds: torch.Tensor | None = None,
    device: str | None = None,
    dtype=None,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
    memory_limit: int | None = None,
    progress: bool = False,
    vae=None,
    compile: bool = False,
    kept_multiple: int | None = None,
    **planner_params,
) -> EditResult | StreamEdit:
    """Edit ``video`` with ``model``, computing only the tokens the plan keeps.

    A Self-Forcing/CausVid checkpoint file as ``model`` is chunk-causal: it is streamed with
    :func:`edit_stream` (``vae`` = a local Wan VAE folder, ``prompt_embeds`` required) and a
    :class:`StreamEdit` comes back (frames, fps, kept ratio, per-chunk seconds, fidelity).

    Important:
        video: a path (decoded with :func:`lipcodec.video.read_video`, fitted to Wan's grid),
            a :class:`~lipcodec.video.Video`, or (T, H, W, 3) uint8 frames (4k+1, sides % 16).
        model: see the table in the module docstring (pipeline, folder, "reference", checkpoint).
        prompt: the edit's text (needs a text encoder; else ``prompt_embeds``).
        strength: SDEdit strength in (0, 1]: noise level the video is taken to.
        steps: scheduler steps for strength 1; ``int(steps * strength)`` are run.
        planner, gop, planner_params: passed to :func:`lipcodec.apply` (a name, object or
            :class:`~lipcodec.Plan`; an x264 params string; e.g. ``target_kept=0.5``).
        recovery, restore: executor modes (docs/executor.md).
        seed: noise seed; a reference run uses the same noise.
        reference: also run unpruned from the same noise; fills ``report.fidelity``.

    To tinker with:
        guidance_scale, negative_prompt, prompt_embeds (tensor or safetensors path),
        negative_prompt_embeds, device, dtype (transformer only), fps, size (H, W),
        max_frames, memory_limit (bytes; default: free memory on the device), progress,
        compile (``torch.compile`` the transformer's blocks in place: faster on a GPU once
        compiled, and the first steps pay the compilation), kept_multiple (round the kept
        count up to a multiple, e.g. 128: :meth:`~lipcodec.Plan.padded`; with ``compile``,
        plans in one bucket share one compiled graph; full-sequence models only).
    """
    if isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() in CHECKPOINT_SUFFIXES:
        if kept_multiple is not None:
            raise EditError(f"kept_multiple={kept_multiple}: a chunk-causal checkpoint streams, and streaming "
                            "plans are not padded; drop kept_multiple")
        return edit_stream(
            video, model, prompt=prompt, strength=strength, steps=steps, planner=planner, gop=gop,
            recovery=recovery, seed=seed, reference=reference, vae=vae, prompt_embeds=prompt_embeds, fps=fps,
            size=size, max_frames=max_frames, device=device, dtype=dtype, compile=compile, progress=progress,
            **planner_params,
        )
    t_start = time.perf_counter()
    built = build_planner(planner, planner_params)
    check_modes(recovery, restore)
    session = prepare(
        video, model, prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds, strength=strength, steps=steps, guidance_scale=guidance_scale,
        seed=seed, device=device, dtype=dtype, fps=fps, size=size, max_frames=max_frames, memory_limit=memory_limit,
        progress=progress, motion=_wants_motion(built), compile=compile,
    )
    gop = parse_gop(gop)
    if _is_plan(built):
        check_plan_grid(built, session.pipe, session.frames.shape)
    reference_run = session.run_unpruned() if reference else None
    run = session.run(built, gop=gop, recovery=recovery, restore=restore, kept_multiple=kept_multiple)
    fidelity = fidelity_of(reference_run, run) if reference else None
    n, h, w = session.frames.shape[:3]
    plan = run.plan
    report = EditReport(
        model=session.model.source, planner=_planner_name(built), gop=gop_label(gop, built), recovery=recovery,
        restore=restore, strength=float(strength), steps=steps, denoise_steps=int(steps * strength), seed=seed,
        frames=n, size=(h, w), fps=float(session.video.fps), latent_shape=tuple(run.latents.shape[1:]),
        kept_ratio=plan.kept_ratio, kept_tokens=plan.num_kept, tokens=plan.grid.size, frame_types=plan.frame_types,
        frame_kept=[float(v) for v in plan.frame_kept], model_calls=run.calls, seconds=run.seconds,
        total_seconds=time.perf_counter() - t_start, peak_memory=run.peak_memory, peak_memory_kind=run.peak_memory_kind,
        memory_estimate=session.estimate.total, fidelity=fidelity,
    )
    return EditResult(to_uint8(run.pixels), report, run.latents.cpu(), float(session.video.fps), plan,
                      None if reference_run is None else to_uint8(reference_run.pixels))


def parse_gop(gop):
    from .gop import GOP

    if not isinstance(gop, str):
        return gop
    try:
        return GOP.from_x264_params(gop)
    except (ValueError, TypeError) as error:
        raise EditError(f"gop {gop!r}: {error}") from None


def gop_label(gop, planner=None) -> str:
    if gop is not None:
        return str(gop)
    return "from plan" if _is_plan(planner) else "default"


@attrs.define(eq=False)
class Run:
    """One pipeline run: final latents, decoded float frames, time, calls, plan (None = unpruned)."""

    latents: torch.Tensor
    pixels: np.ndarray
    seconds: float
    calls: int
    plan: object = None
    peak_memory: int = 0
    peak_memory_kind: str = ""


@attrs.define(eq=False)
class Session:
    """A model, a decoded video and the SDEdit settings, ready for several runs with the
    same noise (what :func:`edit`, ``lipcodec compare`` and ``lipcodec bench`` share)."""

    model: Model
    video: Video
    text: dict
    settings: dict
    estimate: MemoryEstimate
    encode_cache: dict = attrs.field(factory=dict)

    @property
    def pipe(self):
        return self.model.pipe

    @property
    def frames(self) -> np.ndarray:
        return self.video.frames

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    def _timed(self, desc: str) -> Run:
        dev = self.device
        _peak_memory_start(dev)
        _sync(dev)
        t0 = time.perf_counter()
        with cached_encode(self.pipe.vae, self.encode_cache):
            latents, pixels, calls = run_pipeline(self.pipe, self.frames, text=self.text, desc=desc, **self.settings)
        _sync(dev)
        seconds = time.perf_counter() - t0
        peak, kind = _peak_memory(dev)
        return Run(latents, pixels, seconds, calls, None, peak, kind)

    def run_unpruned(self) -> Run:
        from . import remove

        remove(self.pipe)
        return self._timed("unpruned")

    def run(self, planner, *, gop=None, recovery: str = "none", restore: str = "copy", desc: str = "pruned",
            clean_refresh: int = 0, kept_multiple: int | None = None, **planner_params) -> Run:
        from . import apply

        built = build_planner(planner, planner_params)
        check_modes(recovery, restore)
        if _is_plan(built):
            check_plan_grid(built, self.pipe, self.frames.shape)
            plan_kwargs = {}
        else:
            plan_kwargs = dict(gop=parse_gop(gop), seed=self.settings["seed"], frames=self.frames,
                               motion=self.video.motion)
        try:
            codec = apply(self.pipe, built, recovery=recovery, restore=restore, clean_refresh=clean_refresh,
                          kept_multiple=kept_multiple, **plan_kwargs)
        except ValueError as error:
            raise EditError(str(error)) from None
        try:
            run = self._timed(desc)
            run.plan = codec.plan
        finally:
            codec.remove()
        return run


def prepare(
    video, model, *, prompt=None, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
    strength: float = 0.6, steps: int = 10, guidance_scale: float | None = None, seed: int = 0, device=None, dtype=None,
    fps=None, size=None, max_frames=None, memory_limit=None, progress: bool = False, motion: bool = False,
    compile: bool = False,
) -> Session:
    """Check settings, resolve the model and prompt, estimate memory (from the file header
    before decoding, then from the frames), decode. Raises :class:`EditError` and friends.
    ``compile``: ``torch.compile`` the transformer's blocks in place (diffusers'
    ``compile_repeated_blocks``, static shapes: one compilation per sequence length)."""
    _check_settings(strength, steps, 1.0 if guidance_scale is None else guidance_scale)
    if isinstance(video, (str, os.PathLike)) and not Path(video).exists():
        raise FileNotFoundError(f"no video at {video}: check the path")
    resolved = load_model(model, device=device, dtype=dtype)
    if compile:  # lipcodec's gather/scatter sit outside the blocks, its recovery inside only as a processor
        resolved.pipe.transformer.compile_repeated_blocks(dynamic=False)
    guidance_scale = resolved.guidance_scale if guidance_scale is None else guidance_scale
    pipe = resolved.pipe
    text = _embeddings(resolved, prompt, prompt_embeds, negative_prompt_embeds, negative_prompt)
    dev = pipe.transformer.device
    cfg = guidance_scale > 1 and (text.get("negative_prompt_embeds") is not None or "prompt" in text)

    def estimate(n, h, w):
        return estimate_memory(n, h, w, pipe, dtype=pipe.transformer.dtype, device=str(dev), cfg=cfg)

    if isinstance(video, (str, os.PathLike)):
        path = Path(video)
        probed = _probe(path, fps, size, max_frames) if path.is_file() else None
        if probed is not None:  # refuse before decoding a video that cannot fit
            n, h, w = probed
            check_memory(estimate(n, h, w), memory_limit, size=(h, w), frames=n)
        video = read_video(path, fps=fps, size=size, max_frames=max_frames, fit="wan", progress=progress, motion=motion)
    elif not isinstance(video, Video):
        video = Video(frames=_check_frames(video), fps=float(fps or 16.0), source_size=tuple(np.shape(video)[1:3]))
    n, h, w = video.frames.shape[:3]
    est = estimate(n, h, w)
    check_memory(est, memory_limit, size=(h, w), frames=n)
    settings = dict(steps=steps, strength=strength, guidance_scale=guidance_scale, seed=seed, progress=progress)
    return Session(resolved, video, text, settings, est)


def room_to_recompile(graphs: int):
    """A context in which dynamo's recompile limit (per code object, default 8) is at least
    ``graphs``: for runs over blocks compiled with static shapes that meet several kept
    counts, which past the limit would run eagerly (one logged warning) and be timed so."""
    import torch._dynamo.config as dynamo

    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    return dynamo.patch(**{name: max(getattr(dynamo, name), graphs)})


def fidelity_of(reference: Run, run: Run, *, reference_warp: float | None = None) -> dict:
    """Pruned vs unpruned: PSNR (MSE pooled over frames, :func:`metrics.pooled_psnr`) and mean
    SSIM, per-frame PSNR/SSIM (pixels in [0, 1]), latent PSNR/MSE, warp error of both
    outputs (``reference_warp`` if already known), speed-up."""
    frame_psnr = metrics.psnr(reference.pixels, run.pixels)
    frame_ssim = metrics.ssim(reference.pixels, run.pixels)
    lat = metrics.latent_error(reference.latents, run.latents)
    several = len(run.pixels) > 1
    return {
        "psnr": metrics.pooled_psnr(frame_psnr), "ssim": float(frame_ssim.mean()),
        "latent_psnr": lat.psnr, "latent_mse": lat.mse,
        "warp_error": float(metrics.warp_error(run.pixels).mean()) if several else 0.0,
        "unpruned_warp_error": reference_warp if reference_warp is not None else (
            float(metrics.warp_error(reference.pixels).mean()) if several else 0.0),
        "unpruned_seconds": reference.seconds, "speedup": metrics.speedup(reference.seconds, run.seconds),
        "frame_psnr": [float(v) for v in frame_psnr], "frame_ssim": [float(v) for v in frame_ssim],
    }


def build_planner(planner, params: dict | None = None):
    """A planner object (or the Plan given) from a name/object and parameters; bad names
    and out-of-range parameters become :class:`EditError` listing what is valid."""
    from . import planners

    if _is_plan(planner):
        if params:
            raise EditError(f"planner parameters {sorted(params)} do nothing with a ready Plan: drop them")
        return planner
    try:
        return planners.get(planner, **(params or {}))
    except (ValueError, TypeError) as error:
        raise EditError(str(error)) from None


def check_modes(recovery: str, restore: str) -> None:
    from .attention import RECOVERY_MODES
    from .executor import RESTORE_MODES

    if recovery not in RECOVERY_MODES:
        raise EditError(f"unknown recovery {recovery!r}; available: {', '.join(RECOVERY_MODES)}")
    if restore not in RESTORE_MODES:
        raise EditError(f"unknown restore {restore!r}; available: {', '.join(RESTORE_MODES)}")


def check_plan_grid(plan, pipe, frames_shape) -> None:
    from .plan import Grid

    t, h, w = frames_shape[:3]
    tf = int(getattr(pipe, "vae_scale_factor_temporal", 4))
    sp = int(getattr(pipe, "vae_scale_factor_spatial", 8))
    latent = (1, 1, (t - 1) // tf + 1, h // sp, w // sp)
    grid = Grid.from_latents(latent, tuple(pipe.transformer.config.patch_size))
    if plan.grid != grid:
        raise EditError(
            f"the plan's token grid {tuple(plan.grid)} does not fit this video ({t} frames {w}x{h} -> token grid "
            f"{tuple(grid)}): plan on this video, or pass a planner name instead of a Plan"
        )


def _check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise EditError(f"frames must be (T, H, W, 3) uint8, got shape {frames.shape} dtype {frames.dtype}")
    t, h, w, _ = frames.shape
    if (t - 1) % 4 or h % 16 or w % 16:
        raise EditError(
            f"{t} frames of {w}x{h}: Wan needs 4k+1 frames and sides that are multiples of 16; "
            "read the file with lipcodec.video.read_video(path, fit='wan') or pass the path"
        )
    return frames


def _is_plan(planner) -> bool:
    from .plan import Plan

    return isinstance(planner, Plan)


def _planner_name(planner) -> str:
    if isinstance(planner, str):
        return planner
    if _is_plan(planner):
        return str(planner.meta.get("planner", "plan"))
    if isinstance(getattr(planner, "name", None), str):
        return planner.name
    return str(getattr(planner, "name", type(planner).__name__))


def _wants_motion(planner) -> bool:
    return _planner_name(planner) == "bitstream"


__all__ = [
    "EditError", "EditReport", "EditResult", "MemoryEstimate", "Model", "NumericalError", "Run", "Session",
    "available_memory", "check_memory", "edit", "estimate_memory", "fidelity_of", "load_model", "load_prompt_embeds",
    "parse_bytes", "prepare", "run_pipeline", "save_prompt_embeds", "save_tiny_model",
]


# -- streaming edits -------------------------------------------------------------------------------
@attrs.frozen
class StreamEdit:
    """A streamed edit: frames, and per chunk what it kept and cost."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    fps: float
    kept_ratio: float
    chunk_seconds: tuple[float, ...]  # per chunk, planning included (a chunk planned ahead: in the one before)
    plan_seconds: float  # host time of all planning (on CUDA, planning ahead overlaps the GPU's work)
    fidelity: dict | None  # vs an unpruned stream from the same noise (reference=True); speed-up over chunks 1..
    chunk_kept: tuple[float, ...] = ()  # per chunk, its computed share of tokens

    def table(self) -> str:
        total = sum(self.chunk_seconds)
        per_chunk = f" (per chunk {' '.join(f'{k:.0%}' for k in self.chunk_kept)})" if self.chunk_kept else ""
        lines = [
            f"stream   {len(self.chunk_seconds)} chunks, kept {self.kept_ratio:.1%} of tokens{per_chunk}",
            f"time     {total:.2f} s denoising ({len(self.frames) / total:.1f} output frames/s), "
            f"{self.plan_seconds:.2f} s of planning (host); per chunk "
            + " ".join(f"{1e3 * s:.0f}ms" for s in self.chunk_seconds),
        ]
        if self.fidelity is not None:
            f = self.fidelity
            lines.append(f"fidelity vs unpruned stream: PSNR {f['psnr']:.2f} dB, SSIM {f['ssim']:.4f}, "
                         f"latent PSNR {f['latent_psnr']:.2f} dB, speed-up {f['speedup']:.2f}x (chunks 1..)")
        return "\n".join(lines)


def edit_stream(
    video, model="reference", *, prompt: str | None = None, strength: float = 0.5, steps: int = 4,
    planner="lipar", gop=None, recovery: str = "none", first_chunk: str = "full", seed: int = 0,
    reference: bool = False, vae=None, prompt_embeds=None, fps=None, size=None, max_frames=None,
    device=None, dtype=None, compile: bool = False, progress: bool = False, **plan_kwargs,
) -> StreamEdit:
    """Edit ``video`` chunk by chunk with a chunk-causal model and :class:`lipcodec.StreamRunner`.

    ``model`` is ``"reference"`` (the embedded model, trained with clean-cache chunks; the
    prompt is a word of its vocabulary) or a Self-Forcing/CausVid generator checkpoint in the
    original Wan key layout (then ``vae`` is a local diffusers ``AutoencoderKLWan`` folder and
    ``prompt_embeds`` a safetensors file of text embeddings; nothing is downloaded; a
    diffusers ``config.json`` beside the checkpoint overrides the config read off the weights). The
    clip is encoded once; the DiT streams the latents in chunks of 3 latent frames:
    ``steps`` steps from ``strength`` x 1000 down (flow shift 1 for the embedded model, 5 for
    Self-Forcing), a clean pass per chunk, a KV cache of sink 1 + window 6. ``device``
    (default cpu) holds the transformer and the autoencoder; ``dtype`` is the transformer's
    (the autoencoder stays float32); ``compile`` is :class:`StreamRunner`'s (GPU: faster
    once compiled, and the first stream pays the compilation).
    """
    from .stream_planning import causal_gop
    from .streaming import StreamConfig, StreamRunner

    _check_settings(strength, steps, 1.0)
    try:  # what can be checked is checked before the video is decoded
        gop = causal_gop(parse_gop(gop))
    except ValueError as error:
        raise EditError(str(error)) from None
    if str(model) == "reference" and prompt is None:
        raise EditError(NO_PROMPT)
    device = resolve_device("cpu" if device is None else device)
    dtype = resolve_dtype("float32" if dtype is None else dtype)
    if not isinstance(video, Video):
        video = read_video(video, fps=fps, size=size, max_frames=max_frames, fit="wan", progress=progress,
                           motion=_wants_motion(planner))
    if str(model) == "reference":
        from . import models

        ref = models.reference(device=device, dtype=dtype)
        try:
            embeds = ref.embed(prompt)
        except ValueError as error:
            raise EditError(str(error)) from None
        transformer, shift, encode, decode = ref.transformer, 1.0, ref.encode, ref.decode
    elif isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() in CHECKPOINT_SUFFIXES:
        if not Path(model).is_file():
            raise FileNotFoundError(f"no checkpoint at {model}: check the path")
        if vae is None or prompt_embeds is None:
            raise EditError(
                f"streaming {Path(model).name} needs the Wan VAE and the text embeddings the checkpoint does not "
                "carry: pass --vae DIR (a local AutoencoderKLWan folder) and --prompt-embeds FILE"
            )
        from .checkpoints import CheckpointError, load_wan_checkpoint

        beside = Path(model).parent / "config.json"  # a diffusers transformer config, if the shapes are not Wan's
        config = {k: v for k, v in json.loads(beside.read_text()).items() if not k.startswith("_")} if beside.is_file() else None
        try:
            transformer = load_wan_checkpoint(model, config=config, dtype=dtype, device=device).eval()
        except CheckpointError as error:
            raise EditError(f"{model}: {error}") from None
        embeds = prompt_embeds if torch.is_tensor(prompt_embeds) else load_prompt_embeds(prompt_embeds)[0]
        embeds = embeds.to(device, transformer.dtype)
        shift = 5.0
        if not (Path(vae) / "config.json").is_file():
            raise EditError(f"--vae {vae} is not a diffusers model folder (no config.json): pass an AutoencoderKLWan folder")
        encode, decode = wan_vae_codec(vae, device=device)
    else:
        raise EditError(
            f"--stream needs a chunk-causal model; {model} is neither 'reference' nor a Self-Forcing/CausVid "
            "checkpoint file: use --model reference, or a .pt/.safetensors generator with --vae and --prompt-embeds"
        )
    latents = encode(video.frames)  # (1, 16, F, h, w)
    timesteps = tuple(1000.0 * strength * (steps - i) / steps for i in range(steps))
    config = StreamConfig(timesteps=timesteps, shift=shift, recovery=recovery, first_chunk=first_chunk, seed=seed)

    def stream(plan_with):
        runner = StreamRunner(transformer, embeds, config, planner=plan_with, gop=gop, compile=compile,
                              motion=video.motion, **plan_kwargs)
        chunks = list(runner.run([latents]))
        return torch.cat([c.latents for c in chunks], 2), chunks

    with torch.no_grad():
        out, chunks = stream(planner)
        fidelity = None
        frames = decode(out)
        if reference:
            full, full_chunks = stream("intra")

            def run(latents, pixels, chunks):  # timed from chunk 1: chunk 0 pays one-time setup (kernels, compilation)
                return Run(latents, pixels / 255.0, sum(c.seconds for c in chunks[1:] or chunks), calls=0)

            fidelity = fidelity_of(run(full, decode(full), full_chunks), run(out, frames, chunks))
    kept = sum(c.kept for c in chunks) / sum(c.tokens for c in chunks)
    return StreamEdit(
        frames, video.fps, kept, tuple(c.seconds for c in chunks), sum(c.plan_seconds for c in chunks),
        fidelity, tuple(c.kept_ratio for c in chunks),
    )

