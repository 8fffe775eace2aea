"""``aegaeon models add FILE.gguf``: a GGUF file rewritten as a Hugging Face model folder.

Everything that knows GGUF is transformers' own GGUF reader, reused rather than re-written: the
metadata → config keys, the GGUF → Hugging Face tensor names, the per-architecture fixes (such as
Llama's q/k un-permutation) and the tokenizer. What this module adds is the writing: tensors are
dequantized one at a time and streamed to disk, so the model never sits in memory whole, and each
keeps the narrowest dtype that holds its values exactly.

::

    FILE.gguf ──convert──▶ <models>/.NAME.…importing/ ──validate──▶ rename ──▶ <models>/NAME/
                           config.json             model.safetensors
                           tokenizer.json          tokenizer_config.json (with the chat template)
                           generation_config.json  .aegaeon-gguf-origin.json (which file it was)

The folder is written hidden (the registry skips dot-names) and renamed into place only once the
same checks as for a linked folder accept it, so a running model-store never sees it half-written
and a refused file leaves nothing behind. It records the file it came from (``ORIGIN_FILE``), so
adding that same file again is known as harmless rather than refused as a taken name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from aegaeon.life_locks import abandoned, claim

from .registry import ModelError

log = logging.getLogger(__name__)

STAGING_GRACE_S = 60.0
"""A staging folder younger than this is never swept (its import may not have locked it yet)."""

GGUF_SUFFIX = ".gguf"

ORIGIN_FILE = ".aegaeon-gguf-origin.json"
"""In an imported folder: the GGUF file it was converted from, as it was then (``gguf_origin``).
Hidden, and no model file: the registry, the host cache, a peer's copy and ``models.file`` read
only config, safetensors and tokenizer files by name (``models.file`` refuses dot-names)."""

_NON_NAME = re.compile(r"[^A-Za-z0-9_-]+")


def is_gguf_file(path: Path) -> bool:
    """Whether ``models add`` treats ``path`` as a GGUF file (by its suffix) rather than a folder."""
    return path.suffix.lower() == GGUF_SUFFIX and not path.is_dir()


def name_from_file(path: Path) -> str:
    """A model name from a file name: ``Llama-3.2-1B-Q4_K_M.gguf`` → ``Llama-3-2-1B-Q4_K_M``
    (GGUF names are full of dots, which model names cannot hold)."""
    return _NON_NAME.sub("-", path.stem).lstrip("-_")[:64]


def gguf_origin(path: Path) -> dict[str, Any]:
    """What an import records of the GGUF file ``path``: its resolved path, size and modification
    time. Raises ModelError when it cannot be read."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise ModelError(f"{path}: unreadable ({exc.strerror})") from None
    return {"source": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def imported_from(folder: Path, path: Path) -> bool:
    """Whether ``folder`` was imported from the GGUF file ``path`` as it is now (the same file,
    neither rewritten nor replaced since)."""
    try:
        return json.loads((folder / ORIGIN_FILE).read_text()) == gguf_origin(path)
    except (OSError, ValueError):  # no record (not an import, or an older one), or no file
        return False


# ---------------------------------------------------------------------------- pure helpers


def kept_precision(values: Any, ggml_type: int) -> Any:
    """``values`` (a float32 tensor, as dequantized) in the narrowest dtype that holds them exactly.

    F16 and BF16 tensors go back to their own dtype (unless an architecture fix changed their values
    beyond it); quantized ones stay F32, the precision their dequantized values are computed in."""
    import torch
    from gguf import GGMLQuantizationType

    narrow = {GGMLQuantizationType.F16: torch.float16, GGMLQuantizationType.BF16: torch.bfloat16}
    dtype = narrow.get(GGMLQuantizationType(ggml_type))
    if dtype is not None:
        candidate = values.to(dtype)
        if torch.equal(candidate.to(torch.float32), values):
            return candidate
    return values


def safetensors_header(entries: list[tuple[str, str, list[int], int]]) -> bytes:
    """The length-prefixed header of a safetensors file whose tensors (name, dtype, shape, nbytes)
    lie back to back in this order, padded with spaces so the data starts 8-byte aligned."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


_SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
"""safetensors' name of each torch dtype a converted tensor can have."""


class SafetensorsStream:
    """Writes one safetensors file a tensor at a time, holding none of them in memory.

    The format allows no gaps between tensors, so 4-byte tensors go first and 2-byte ones after
    them (each then starts aligned to its element size); each group waits in a scratch file beside
    the output until ``finish`` writes the header and appends both. Use it in a ``with`` block: the
    scratch files are gone when it ends, finished or not."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bytes_by_dtype: dict[str, int] = {}
        self._scratch = contextlib.ExitStack()
        self._groups: dict[int, tuple[IO[bytes], list[tuple[str, str, list[int], int]]]] = {}

    def __enter__(self) -> SafetensorsStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._scratch.close()

    def add(self, name: str, tensor: Any) -> None:
        import torch

        dtype = _SAFETENSORS_DTYPE[str(tensor.dtype).removeprefix("torch.")]
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        size = tensor.element_size()
        if size not in self._groups:
            new_file = tempfile.TemporaryFile(dir=self.path.parent)  # noqa: SIM115 (closed in __exit__)
            self._groups[size] = (self._scratch.enter_context(new_file), [])
        scratch, entries = self._groups[size]
        scratch.write(memoryview(raw))
        entries.append((name, dtype, list(tensor.shape), raw.nbytes))
        self.bytes_by_dtype[dtype] = self.bytes_by_dtype.get(dtype, 0) + raw.nbytes

    def finish(self) -> None:
        groups = [self._groups[size] for size in sorted(self._groups, reverse=True)]
        with self.path.open("wb") as out:
            out.write(safetensors_header([e for _, entries in groups for e in entries]))
            for scratch, _ in groups:
                scratch.seek(0)
                shutil.copyfileobj(scratch, out, 16 << 20)


# ---------------------------------------------------------------------------- reading the file


def _open(path: Path) -> Any:
    from gguf import GGUFReader

    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        return GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError) as exc:
        raise ModelError(f"{path}: not a readable GGUF file ({exc})") from None


def _architecture(reader: Any, path: Path) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelError(f"{path}: GGUF metadata has no general.architecture")
    return str(field.contents())


def _parsed_metadata(path: Path, architecture: str) -> dict[str, Any]:
    """transformers' reading of the metadata: ``config``, ``tokenizer`` and ``tokenizer_config``."""
    from transformers.modeling_gguf_pytorch_utils import (
        GGUF_SUPPORTED_ARCHITECTURES,
        load_gguf_checkpoint,
    )

    try:
        return dict(load_gguf_checkpoint(str(path), return_tensors=False))
    except ValueError as exc:
        known = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
        raise ModelError(
            f"{path}: transformers cannot read GGUF architecture {architecture!r}: {exc} "
            f"(its GGUF reader knows {', '.join(known)})"
        ) from None
    except (KeyError, IndexError, TypeError) as exc:
        raise ModelError(
            f"{path}: unreadable GGUF metadata ({type(exc).__name__}: {exc})"
        ) from None


def _hf_config(settings: dict[str, Any], path: Path) -> Any:
    """The transformers config of a causal LM from the keys transformers read from the metadata."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = settings.get("model_type")
    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(model_type))
    if not isinstance(architecture, str):
        raise ModelError(f"{path}: model type {model_type!r} is not a text-generation model")
    keys = {k: v for k, v in settings.items() if k not in ("model_type", "_model_name_or_path")}
    config = AutoConfig.for_model(str(model_type), **keys)
    config.architectures = [architecture]
    return config


class TensorMapping:
    """GGUF tensor → Hugging Face tensor, by transformers' GGUF loader: its name map, built from a
    weightless (meta-device) model of the config, and its architecture's tensor processor."""

    def __init__(self, architecture: str, config: Any, settings: dict[str, Any]) -> None:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=settings)
        self.names = get_gguf_hf_weights_map(model, self.processor)
        self.required = {name for name, _ in model.named_parameters()}  # tied weights once
        self.assembled: dict[str, Any] = {}  # where MoE processors gather expert slices

    def convert(self, gguf_name: str, values: Any) -> tuple[str, Any] | None:
        """The Hugging Face name and values of one dequantized tensor, or None for a tensor the
        model has no place for (transformers drops those too)."""
        result = self.processor.process(
            weights=values,
            name=gguf_name,
            tensor_key_mapping=self.names,
            parsed_parameters={"tensors": self.assembled},
        )
        if result.name not in self.names:
            return None
        return self.names[result.name], result.weights


# ---------------------------------------------------------------------------- writing the folder


def _write_weights(
    reader: Any, mapping: TensorMapping, out: Path, path: Path, progress: bool
) -> str:
    """Dequantize every tensor into ``out/model.safetensors``; returns the dominant dtype."""
    import numpy as np
    import torch
    from gguf import dequantize
    from tqdm import tqdm

    written: set[str] = set()
    total = sum(int(t.n_bytes) for t in reader.tensors)
    with (
        SafetensorsStream(out / "model.safetensors") as stream,
        tqdm(total=total, unit="B", unit_scale=True, desc=f"converting {path.name}",
             disable=not progress) as bar,
    ):  # fmt: skip
        for tensor in reader.tensors:
            try:
                values = dequantize(tensor.data, tensor.tensor_type)
            except NotImplementedError:
                raise ModelError(
                    f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, "
                    "a type the gguf package cannot dequantize"
                ) from None
            converted = mapping.convert(tensor.name, values)
            if converted is not None:
                hf_name, hf_values = converted
                as_float = torch.from_numpy(np.array(hf_values, dtype=np.float32))
                stream.add(hf_name, kept_precision(as_float, tensor.tensor_type))
                written.add(hf_name)
            bar.update(int(tensor.n_bytes))
        for hf_name, assembled in mapping.assembled.items():
            stream.add(hf_name, torch.as_tensor(assembled, dtype=torch.float32))
            written.add(hf_name)
        stream.finish()
    missing = sorted(mapping.required - written)
    if missing:
        raise ModelError(
            f"{path}: no tensor for {missing[:4]}{'...' if len(missing) > 4 else ''} "
            f"({len(missing)} of the model's {len(mapping.required)} weights)"
        )
    dominant = max(stream.bytes_by_dtype, key=lambda d: stream.bytes_by_dtype[d])
    return {st: torch_name for torch_name, st in _SAFETENSORS_DTYPE.items()}[dominant]


def _write_tokenizer(path: Path, out: Path) -> None:
    """transformers' tokenizer of the file, saved with its chat template in tokenizer_config.json."""
    from transformers import AutoTokenizer

    # Read from a folder holding only the file: a tokenizer_config.json beside it (a GGUF kept in
    # some model's folder) would otherwise leak into the tokenizer, e.g. its tokenizer_class.
    with tempfile.TemporaryDirectory() as alone:
        (Path(alone) / path.name).symlink_to(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=path.name)
        except Exception as exc:  # every failure of the file's tokenizer data is one refusal
            raise ModelError(f"{path}: its tokenizer cannot be read: {exc}") from None
    tokenizer.save_pretrained(str(out), save_jinja_files=False)


def _write_configs(config: Any, dtype: str, out: Path) -> None:
    import torch

    config.dtype = getattr(torch, dtype)
    config.save_pretrained(str(out))
    special = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id")}
    generation = {k: v for k, v in special.items() if v is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def convert_gguf(path: Path, out: Path, progress: bool = True) -> None:
    """Write the Hugging Face folder of the GGUF file ``path`` into the existing folder ``out``.
    Raises ModelError naming the file and the cause (not GGUF, architecture or tensor type not
    supported, weights missing, no tokenizer)."""
    reader = _open(path)
    architecture = _architecture(reader, path)
    settings = _parsed_metadata(path, architecture)["config"]
    config = _hf_config(settings, path)
    mapping = TensorMapping(architecture, config, settings)
    _write_tokenizer(path, out)  # before the long part: a file without a tokenizer fails fast
    dtype = _write_weights(reader, mapping, out, path, progress)
    _write_configs(config, dtype, out)


def import_gguf(
    path: Path, target: Path, validate: Callable[[Path], object], progress: bool = True
) -> Path:
    """Convert the GGUF file ``path`` into the model folder ``target`` (which must not exist), keep
    it only if ``validate(folder)`` accepts it, and return ``target``. Raises ModelError."""
    origin = gguf_origin(path)  # before converting: a file rewritten meanwhile is another one
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_imports(target.parent)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".importing", dir=target.parent)
    )
    lock = claim(staging)  # held while this import runs (see the sweep)
    try:
        convert_gguf(path, staging, progress)
        validate(staging)
        (staging / ORIGIN_FILE).write_text(json.dumps(origin, indent=2) + "\n")
        staging.chmod(0o755)  # as readable as a folder made by hand (mkdtemp makes 0700)
        staging.rename(target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelError(f"{path}: cannot write {target}: {exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    return target


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0  # gone meanwhile: nothing to sweep


def remove_abandoned_imports(models_dir: Path) -> list[Path]:
    """Remove the staging folders of imports whose process is gone (killed mid-conversion: up to
    twice the converted model's size on disk, in hidden folders). A running import holds a lock
    on its staging folder, which the kernel drops when its process dies."""
    removed = [staging for staging in models_dir.glob(".*.importing")
               if _age_s(staging) >= STAGING_GRACE_S and abandoned(staging)]  # fmt: skip
    for staging in removed:
        shutil.rmtree(staging, ignore_errors=True)
    if removed:
        log.warning("removed %d abandoned GGUF imports: %s", len(removed), removed)
    return removed
