"""What the Python fuzz targets (fuzz_gguf.py, fuzz_safetensors.py) share: the atheris (libFuzzer for CPython)
driver, the contract of the exporter's readers, and a bound on memory.

The readers' contract (tools/dysco_export/errors.py, __main__.py): a damaged input file raises ExportError whose
message starts with the file's path (the command line prints it on one line and exits with code 2). Any other
exception is a bug, and so is a MemoryError: a length field must be checked against the file before anything is
allocated from it. The address space is capped at what the imports use plus MEMORY_HEADROOM_MB, so that an
allocation sized from a corrupt field fails at once instead of swapping; libFuzzer's -rss_limit_mb and -timeout
catch the rest (memory that is really touched, hangs).
"""
import logging
import os
import resource
import sys
import tempfile
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import atheris  # noqa: E402

MEMORY_HEADROOM_MB = 1024


def instrumented():
    """Context manager: modules of the exporter (and the gguf package) imported under it get coverage."""
    return atheris.instrument_imports(include=["tools.dysco_export", "gguf"])


def scratch_path(name):
    """A path in a private temporary folder where each input is written (the readers take a path)."""
    return os.path.join(tempfile.mkdtemp(prefix="dysco_fuzz_"), name)


def check_export_error(error, path):
    message = str(error)
    if not message.startswith(path + ":"):
        raise AssertionError(f"ExportError does not name the file: {message!r}")


def cap_address_space():
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))  # kB
    limit = (vm // 1024 + MEMORY_HEADROOM_MB) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run(test_one_input, custom_mutator=None):
    # Damaged inputs make numpy warn (overflow in dequantization) and gguf log (duplicate keys): noise here.
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    cap_address_space()
    atheris.Setup(sys.argv, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()
