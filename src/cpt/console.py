"""What a run prints: cpt's own lines (and its one progress bar), not the libraries' chatter.

Quiet by default: third-party warnings (deprecation notices, a bitsandbytes kernel-hub message at
import), the libraries' info logging and the `datasets` progress bars are filtered; errors still
show. `-v` / `--verbose` (or `setup_logging(verbose=True)`) lets everything through. Download bars
of a hub model stay: during a long download they are the only sign of progress.

    cpt -v train examples/quickstart.yaml
    python -m pytest tests/test_console.py -q
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

from cpt.config import redact

# Loggers of libraries a run goes through; their warnings concern the library, not the run.
LIBRARY_LOGGERS = ("transformers", "accelerate", "datasets", "peft", "bitsandbytes", "kernels", "torch", "mlflow",
                   "wandb", "urllib3", "filelock", "fsspec", "absl", "tensorboard", "gguf", "huggingface_hub")


def setup_logging(verbose: bool = False, keep_warnings: tuple[type[Warning], ...] = ()) -> None:
    """cpt's log lines on stderr (rich on a terminal, timestamped lines otherwise, secrets redacted);
    unless `verbose`, the libraries quiet. `keep_warnings`: cpt's own warning categories, always shown."""
    from rich.logging import RichHandler

    class Redact(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.msg = redact(str(record.msg))
            if record.args:
                record.args = tuple(redact(a) if isinstance(a, str) else a for a in (record.args if isinstance(record.args, tuple) else (record.args,)))
            return True

    handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False) if sys.stderr.isatty() else logging.StreamHandler()
    if not isinstance(handler, RichHandler):
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler.addFilter(Redact())
    root = logging.getLogger("cpt")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    quiet_libraries(verbose, keep_warnings)


def quiet_libraries(verbose: bool = False, keep_warnings: tuple[type[Warning], ...] = ()) -> None:
    """Filter the libraries' warnings, info logging and `datasets` bars (nothing when `verbose`).

    Environment switches are set only where the user has not set them, and before the libraries
    read them at import (transformers and datasets configure their loggers once, from these)."""
    if verbose:
        return
    for var, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DATASETS_VERBOSITY", "error"),
                       ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"), ("WANDB_SILENT", "true"),
                       ("TF_CPP_MIN_LOG_LEVEL", "2")):
        os.environ.setdefault(var, value)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for lib, call in (("transformers", "utils.logging.set_verbosity_error"), ("datasets", "disable_progress_bars"),
                      ("datasets", "utils.logging.set_verbosity_error")):
        module = sys.modules.get(lib)  # already imported: its switches were read; flip them directly
        if module is not None:
            fn = module
            try:
                for part in call.split("."):
                    fn = getattr(fn, part)
                fn()
            except AttributeError:
                pass
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"cpt(\.|$)")
    for category in keep_warnings:
        warnings.filterwarnings("default", category=category)
