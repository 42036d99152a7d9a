"""`caravan quantize`: a GGUF model written again with its matrices in another format, as
llama.cpp's llama-quantize does (src/llama-quant.cpp), with gguf-py's reference quantizers.

Which tensors change, from llama-quant.cpp:

- `tensor_allows_quantization`: only tensors of two or more dimensions whose name ends in
  "weight", and none of a list of small or sensitive ones (norms, MoE routers, positional
  embeddings, ...). 1-D tensors (norms, biases) keep their type.
- `llama_tensor_get_type_impl`, for a block-quantized target: the output projection, and the
  token embedding when the output is tied to it, get more bits. llama.cpp picks Q6_K there
  (Q8_0 when the target is Q8_0 or the row does not split into blocks); gguf-py has no Q6_K
  quantizer, so caravan uses Q8_0, as the default SmolLM2 file has it.
- `tensor_type_fallback`: a row length that is not a multiple of the block size gets F16,
  llama.cpp's last resort ("must use F16 due to unusual shape"). For the 32-weight block types
  offered here llama.cpp has no intermediate fallback and stops with an error; caravan writes
  F16 and warns instead.
- a tensor already in the chosen type is copied as it is; a quantized one is dequantized first
  (llama-quantize --allow-requantize), with a warning: accuracy is lost twice.

Every key of the input is kept with its GGUF type; general.file_type is set to the new
llama_ftype and general.quantization_version to GGML_QUANT_VERSION, as llama.cpp does. The
work goes tensor by tensor, in slices of rows, so memory holds one output tensor and one slice
of f32 values, never the model twice.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGUFValueType, GGUFWriter, LlamaFileType
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize
from tqdm import tqdm

from .gguf_file import GGUFFile, TensorInfo

log = logging.getLogger(__name__)

# What `--type` offers: the types gguf-py's `quantize` implements, with the llama_ftype each
# one's file declares (llama.h; gguf.LlamaFileType). K-quants and i-quants have no quantizer
# in gguf-py.
FILE_TYPES: dict[QT, LlamaFileType] = {
    QT.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    QT.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    QT.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    QT.Q5_1: LlamaFileType.MOSTLY_Q5_1,
    QT.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    QT.F16: LlamaFileType.MOSTLY_F16,
    QT.BF16: LlamaFileType.MOSTLY_BF16,
    QT.F32: LlamaFileType.ALL_F32,
}
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)  # not block-quantized: ggml_is_quantized is false

# Tensors llama.cpp never quantizes, by a part of their name (llama-quant.cpp,
# tensor_allows_quantization): norms, MoE routers, and small or position tensors of other
# architectures.
KEEP_NAME_PARTS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    *(f"time_mix_{part}.weight" for part in (
        "first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2", "decay_w1", "decay_w2", "lerp_fused")),
    "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
KEEP_NAMES = ("position_embd.weight", "token_types.weight")  # LLM_TENSOR_POS_EMBD, LLM_TENSOR_TOKEN_TYPES
TOKEN_EMBEDDINGS = ("token_embd.weight", "per_layer_token_embd.weight")
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")  # llama.cpp drops them from its output

SLICE_VALUES = 1 << 22  # weights dequantized at once: 16 MiB of f32 per slice


class QuantizeError(ValueError):
    """The input, the type or the output path will not do; the message says which and why."""


def offered() -> str:
    return ", ".join(t.name for t in FILE_TYPES)


def parse_type(text: str) -> QT:
    """`--type` (any case) -> the tensor type it stands for."""
    name = text.strip().upper()
    for ttype in FILE_TYPES:
        if ttype.name == name:
            return ttype
    known = {t.name for t in QT} | {f.name.removeprefix("MOSTLY_") for f in LlamaFileType}
    why = "gguf-py has no quantizer for it" if name in known else "unknown type"
    raise QuantizeError(f"--type {text}: {why} (offered: {offered()})")


def n_dims(shape: tuple[int, ...]) -> int:
    """Dimensions as ggml_n_dims counts them: trailing dimensions of 1 do not count."""
    n = len(shape)
    while n > 1 and shape[n - 1] == 1:
        n -= 1
    return n


def allows_quantization(info: TensorInfo) -> bool:
    """llama-quant.cpp's tensor_allows_quantization (quantize_output_tensor on, as by default)."""
    name = info.name
    if n_dims(info.shape) < 2 or not name.endswith("weight") or name in KEEP_NAMES:
        return False
    return not any(part in name for part in KEEP_NAME_PARTS)


@dataclass(frozen=True)
class TensorPlan:
    info: TensorInfo
    type: QT  # what it is written as
    note: str = ""  # why it is not the requested type, when it is not


def plan_tensor(info: TensorInfo, target: QT, tied_output: bool) -> TensorPlan:
    """The type one tensor gets for a `target` file type (llama_tensor_get_type)."""
    if not allows_quantization(info):
        return TensorPlan(info, info.type)
    if target in FLOAT_TYPES:
        return TensorPlan(info, target)
    new, note = target, ""
    if info.name == "output.weight" or (tied_output and info.name in TOKEN_EMBEDDINGS):
        new = QT.Q8_0
        if target != QT.Q8_0:
            what = "the output projection" if info.name == "output.weight" else "tied to the output projection"
            note = f"{what}: Q8_0 (llama.cpp's Q6_K has no quantizer in gguf-py)"
    block_size = GGML_QUANT_SIZES[new][0]
    if info.shape[0] % block_size:
        new, note = QT.F16, f"row length {info.shape[0]} is not a multiple of the {new.name} block size {block_size}: F16"
    return TensorPlan(info, new, note)


def row_bytes(ttype: QT, row_length: int) -> int:
    block_size, type_size = GGML_QUANT_SIZES[ttype]
    return row_length // block_size * type_size


@dataclass
class QuantizeReport:
    file_type: str  # what --type asked for
    n_tensors: int = 0
    n_converted: int = 0  # written in another type than they had
    n_kept: int = 0  # copied as they were
    notes: list[str] = field(default_factory=list)  # tensor: why it got another type than asked
    requantized_from: list[str] = field(default_factory=list)  # quantized input types that were dequantized
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def quantize_model(src_path: str | os.PathLike[str], dst_path: str | os.PathLike[str], target: QT,
                   progress: bool = True) -> QuantizeReport:
    """Write src_path's model to dst_path with its matrices in `target` (see the module doc)."""
    if target not in FILE_TYPES:
        raise QuantizeError(f"type {target.name} is not offered (offered: {offered()})")
    t0 = time.perf_counter()
    src = GGUFFile(src_path)
    dst = Path(dst_path)
    if dst.exists() or dst.is_symlink():
        raise QuantizeError(f"{dst}: already exists; remove it or give another output path")
    arch = _model_architecture(src)
    tied_output = "output.weight" not in src.tensors
    plans = [plan_tensor(info, target, tied_output) for info in src.tensors.values()]
    report = _planned_report(src, target, plans)
    for plan in plans:
        if plan.type != plan.info.type:
            _check_dequantizable(plan.info)
    _write_model(src, dst, arch, target, plans, report, progress)
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def _model_architecture(src: GGUFFile) -> str:
    """src's general.architecture, after checking that src is a whole model file."""
    arch = src.metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise QuantizeError(f"{src.path}: no general.architecture; only a model file can be quantized")
    split_count = src.metadata.get("split.count", 1)
    if isinstance(split_count, int) and split_count > 1:
        raise QuantizeError(f"{src.path} is one part of a model split in {split_count} files; merge them first "
                            "(llama-gguf-split --merge)")
    return arch


def _planned_report(src: GGUFFile, target: QT, plans: list[TensorPlan]) -> QuantizeReport:
    """The report before writing: the plans' notes and the quantized types to re-quantize, each
    logged as a warning."""
    report = QuantizeReport(target.name, n_tensors=len(plans))
    for plan in plans:
        if plan.note:
            report.notes.append(f"{plan.info.name}: {plan.note}")
            log.warning("%s: %s", plan.info.name, plan.note)
    requantized = sorted({p.info.type.name for p in plans if p.type != p.info.type and p.info.type not in FLOAT_TYPES})
    if requantized:
        report.requantized_from = requantized
        log.warning("%s is already quantized (%s): re-quantizing dequantizes it first, so accuracy is lost twice; "
                    "quantize from the F16/F32 file where you have it", src.path, ", ".join(requantized))
    return report


def _write_model(src: GGUFFile, dst: Path, arch: str, target: QT, plans: list[TensorPlan], report: QuantizeReport,
                 progress: bool) -> None:
    """Write the file to a hidden temporary beside dst and rename it into place, so that dst is
    either whole or absent."""
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        writer = _writer(src, tmp, arch, target)
        for plan in plans:
            shape = tuple(reversed(plan.info.shape))  # gguf-py's writer takes numpy order
            n_bytes = plan.info.n_rows * row_bytes(plan.type, plan.info.shape[0])
            writer.add_tensor_info(plan.info.name, shape, np.dtype(np.float32), n_bytes, raw_dtype=plan.type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensors(src, writer, target, plans, report, progress)
        writer.close()
        os.replace(tmp, dst)
    except OSError as exc:
        raise QuantizeError(f"{dst}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_tensors(src: GGUFFile, writer: GGUFWriter, target: QT, plans: list[TensorPlan], report: QuantizeReport,
                   progress: bool) -> None:
    """Each tensor's data in its planned type, one at a time, counted in the report."""
    with tqdm(total=sum(p.info.n_bytes for p in plans), unit="B", unit_scale=True, file=sys.stderr,
              disable=not progress, desc=f"quantize {target.name}") as bar:
        for plan in plans:
            data = _convert(src, plan, bar)
            writer.write_tensor_data(data)
            report.bytes_in += plan.info.n_bytes
            report.bytes_out += data.nbytes
            del data
            src.release(plan.info.name)
            if plan.type == plan.info.type:
                report.n_kept += 1
            else:
                report.n_converted += 1


def _check_dequantizable(info: TensorInfo) -> None:
    """Fail before writing anything when gguf-py cannot read a tensor that must change type."""
    try:
        dequantize(np.zeros((1, row_bytes(info.type, info.shape[0])), np.uint8), info.type)
    except NotImplementedError:
        raise QuantizeError(f"{info.name}: gguf-py cannot dequantize type {info.type.name}, so it cannot be "
                            "re-quantized") from None


def _writer(src: GGUFFile, path: Path, arch: str, target: QT) -> GGUFWriter:
    """A GGUFWriter holding every key of src with its own GGUF type, the file type replaced."""
    writer = GGUFWriter(path, arch=arch)
    writer.data_alignment = src.alignment
    replaced = {
        "general.file_type": (int(FILE_TYPES[target]), GGUFValueType.UINT32),
        "general.quantization_version": (GGML_QUANT_VERSION, GGUFValueType.UINT32),
    }
    for key, value in src.metadata.items():
        if key == "general.architecture" or key in SPLIT_KEYS:
            continue
        vtype, item_type = src.value_types[key]
        if key in replaced:
            value, vtype = replaced.pop(key)
            item_type = None
        elif vtype == GGUFValueType.ARRAY:
            if item_type == GGUFValueType.ARRAY:
                raise QuantizeError(f"{src.path}: metadata key {key} is an array of arrays, which llama.cpp does not read")
            value = value.tolist() if isinstance(value, np.ndarray) else list(value)
            if not value:
                raise QuantizeError(f"{src.path}: metadata key {key} is an empty array, which gguf-py cannot write")
        writer.add_key_value(key, value, vtype, sub_type=item_type)
    for key, (value, vtype) in replaced.items():
        writer.add_key_value(key, value, vtype)
    return writer


def _convert(src: GGUFFile, plan: TensorPlan, bar: tqdm) -> np.ndarray:
    """The tensor's bytes in plan.type, (rows, row bytes) uint8: as stored when the type does not
    change, else dequantized and quantized again slice by slice."""
    info = plan.info
    raw = np.frombuffer(src.tensor_bytes(info.name), np.uint8).reshape(info.n_rows, info.row_bytes)
    if plan.type == info.type:
        bar.update(info.n_bytes)
        return raw
    out = np.empty((info.n_rows, row_bytes(plan.type, info.shape[0])), np.uint8)
    step = max(1, SLICE_VALUES // info.shape[0])
    for start in range(0, info.n_rows, step):
        values = dequantize(raw[start : start + step], info.type).astype(np.float32, copy=False)  # (rows, row length)
        out[start : start + step] = quantize(values, plan.type).view(np.uint8).reshape(len(values), -1)
        bar.update(len(values) * info.row_bytes)
    return out
