"""A minimal reader and writer of the safetensors format (8-byte little-endian header length, JSON header,
raw little-endian tensor data), so that the exporter needs no extra dependency.

Supported dtypes: F32, F16, BF16 (and U8, which packages use for alignment padding). Reading maps the file copy-on-write: tensors stay backed by the page
cache until the caller converts them.
"""
import json
import math
import os
import struct
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .errors import ExportError

# safetensors dtype -> (numpy dtype used to map the bytes, torch dtype of the tensor)
_DTYPES = {
    "F32": (np.float32, torch.float32),
    "F16": (np.float16, torch.float16),
    "BF16": (np.int16, torch.bfloat16),  # numpy has no bfloat16: map as int16, view as bfloat16
    "U8": (np.uint8, torch.uint8),  # the padding entries of a package's weights.safetensors
}
_TORCH_TO_ST = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8"}
_MAX_HEADER = 100 * 1024 * 1024


_MAX_DIMS = 8  # no model tensor has more; numpy refuses more than 32


def _parse_entry(info) -> Optional[Tuple[str, List[int], int, int]]:
    """(dtype, shape, begin, end) of one tensor's header entry, or None when it is not
    {"dtype": str, "shape": [count, ...], "data_offsets": [begin, end]} with counts in [0, 2**63) (tensor sizes
    are int64; a zero elsewhere in the shape keeps the product small, so each count is checked alone), at most
    _MAX_DIMS of them, and begin <= end."""
    def is_count(x):
        return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63

    if not isinstance(info, dict):
        return None
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or not isinstance(shape, list) or not all(is_count(d) for d in shape):
        return None
    if len(shape) > _MAX_DIMS:
        return None
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(o) for o in offsets):
        return None
    if offsets[0] > offsets[1]:
        return None
    return dtype, shape, offsets[0], offsets[1]


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of one .safetensors file, by name."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ExportError(f"{path}: truncated safetensors file (no header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise ExportError(f"{path}: corrupt or truncated safetensors header (length {header_len}, "
                                  f"file size {size})")
            raw = f.read(header_len)
    except OSError as e:
        raise ExportError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise ExportError(f"{path}: corrupt safetensors header ({e})") from None
    except RecursionError:
        raise ExportError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    data_start = 8 + header_len
    data_size = size - data_start
    mapped = np.memmap(path, dtype=np.uint8, mode="c", offset=data_start, shape=(data_size,)) \
        if data_size > 0 else np.zeros((0,), dtype=np.uint8)
    out: Dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entry = _parse_entry(info)
        if entry is None:
            raise ExportError(f"{path}: corrupt safetensors header entry for tensor {name!r}")
        dtype, shape, begin, end = entry
        if dtype not in _DTYPES:
            raise ExportError(f"{path}: tensor {name!r} has unsupported dtype {dtype} (supported: F32, F16, BF16, U8)")
        np_dtype, torch_dtype = _DTYPES[dtype]
        itemsize = np.dtype(np_dtype).itemsize
        # numpy refuses a shape whose non-zero counts times the item size pass 2**63 - 1 bytes, even when a
        # zero count makes the array empty (found by fuzz_safetensors: [0, 2**63 - 1] of F16).
        if math.prod(d for d in shape if d) * itemsize > 2**63 - 1:
            raise ExportError(f"{path}: tensor {name!r} has shape {shape}, too large for {dtype}")
        numel = math.prod(shape)  # Python integers: no overflow
        if end - begin != numel * itemsize:
            raise ExportError(f"{path}: tensor {name!r} has inconsistent data offsets {begin}..{end} for "
                              f"shape {shape} {dtype}")
        if end > data_size:
            raise ExportError(f"{path}: truncated safetensors file (tensor {name!r} ends at byte "
                              f"{data_start + end}, file has {size})")
        array = mapped[begin:end].view(np_dtype).reshape(shape)
        out[name] = torch.from_numpy(array).view(torch_dtype)
    return out


def read_checkpoint_tensors(checkpoint_dir: str) -> Dict[str, torch.Tensor]:
    """Tensors of a Hugging Face checkpoint: model.safetensors, or the shards named by
    model.safetensors.index.json."""
    index_path = os.path.join(checkpoint_dir, "model.safetensors.index.json")
    single = os.path.join(checkpoint_dir, "model.safetensors")
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ExportError(f"{index_path}: corrupt safetensors index ({e})") from None
        tensors: Dict[str, torch.Tensor] = {}
        for shard in shards:
            shard_path = os.path.join(checkpoint_dir, shard)
            if not os.path.exists(shard_path):
                raise ExportError(f"{shard_path}: missing safetensors shard (listed in {index_path})")
            tensors.update(read_safetensors(shard_path))
        for name, shard in weight_map.items():
            if name not in tensors:
                raise ExportError(f"{os.path.join(checkpoint_dir, shard)}: missing tensor {name!r} "
                                  f"(listed in {index_path})")
        return tensors
    if os.path.exists(single):
        return read_safetensors(single)
    raise ExportError(f"{checkpoint_dir}: no model.safetensors or model.safetensors.index.json")


def write_safetensors(path: str, tensors: Dict[str, torch.Tensor],
                      metadata: Optional[Dict[str, str]] = None) -> None:
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    blobs = []
    for name, tensor in tensors.items():
        t = tensor.detach().contiguous().cpu()
        if t.dtype not in _TORCH_TO_ST:
            raise ValueError(f"write_safetensors: unsupported dtype {t.dtype} of {name}")
        blob = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        header[name] = {"dtype": _TORCH_TO_ST[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format pads the header so that data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


# A package's weights file (docs/model-interface.md "weights.safetensors"): every tensor's data starts at a
# multiple of ALIGNMENT bytes from the start of the file, so that the loader can use the mapped bytes as they
# are (vector loads, and the GPU copy) without copying them first.
ALIGNMENT = 64
PADDING_PREFIX = "__padding__."


class TensorSpec:
    """One tensor to write: its name, dtype and shape up front (the header is written first), and a function
    that makes its data when its turn comes, so that only one tensor at a time is in memory."""

    def __init__(self, name: str, dtype: torch.dtype, shape, make: Callable[[], torch.Tensor]):
        if dtype not in _TORCH_TO_ST:
            raise ValueError(f"unsupported dtype {dtype} of {name}")
        self.name, self.dtype, self.shape, self.make = name, dtype, tuple(int(d) for d in shape), make

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


def aligned_layout(specs: List[TensorSpec], alignment: int = ALIGNMENT):
    """The header dict and the write plan [(spec or padding byte count, begin, end)]. The safetensors format
    (and the `safetensors` library) wants the data section fully covered, without holes, so a tensor whose
    byte size is not a multiple of `alignment` is followed by a U8 padding entry named __padding__.<k>."""
    header: Dict[str, object] = {}
    plan = []
    offset = 0
    for spec in specs:
        if spec.name in header or spec.name.startswith(PADDING_PREFIX):
            raise ValueError(f"duplicate or reserved tensor name {spec.name}")
        end = offset + spec.nbytes
        header[spec.name] = {"dtype": _TORCH_TO_ST[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, end]}
        plan.append((spec, offset, end))
        offset = end
        pad = -offset % alignment
        if pad:
            name = f"{PADDING_PREFIX}{len(plan)}"
            header[name] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
            plan.append((pad, offset, offset + pad))
            offset += pad
    return header, plan


def write_safetensors_streamed(path: str, specs: List[TensorSpec], metadata: Optional[Dict[str, str]] = None,
                               alignment: int = ALIGNMENT, progress: Optional[Callable[[str, int], None]] = None
                               ) -> int:
    """Writes `specs` tensor by tensor, each at an `alignment`-aligned file offset (the header is padded with
    spaces, which the format allows). Each spec's tensor is converted to its dtype, checked against its shape,
    written and dropped before the next is made. Returns the file size. Written to path + ".tmp", renamed
    at the end."""
    header, plan = aligned_layout(specs, alignment)
    if metadata:
        header = dict({"__metadata__": dict(metadata)}, **header)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % alignment)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for item, begin, end in plan:
            if isinstance(item, int):
                f.write(bytes(item))
                continue
            t = item.make().detach()
            if tuple(t.shape) != item.shape:
                raise ValueError(f"tensor {item.name} has shape {list(t.shape)}, expected {list(item.shape)}")
            t = t.to(device="cpu", dtype=item.dtype).contiguous()
            data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
            f.write(memoryview(data))
            del t, data
            if progress is not None:
                progress(item.name, end)
    os.replace(tmp, path)
    return 8 + len(raw) + (plan[-1][2] if plan else 0)
