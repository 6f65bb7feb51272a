"""Quiet by default: known third-party deprecation warnings stay out of a stage's output.

Every entry point (the stages in scripts/, the benchmarks) calls `quiet_by_default()` first
thing in `main()`. It hides deprecation warnings that the libraries we build on raise about
each other (DeepSpeed and accelerate calling deprecated torch.distributed APIs, ...), which a
user cannot act on, so a run shows its stages, progress bars and results. It is not global:

- only DeprecationWarning / PendingDeprecationWarning / FutureWarning raised from inside the
  listed third-party packages, plus a short list of known messages, are filtered; a
  deprecation in *our* code (attributed to our module) still shows;
- `--verbose` on any stage's command line (removed before the stage parses its arguments)
  or LANGTOOLKIT_VERBOSE=1 shows everything; the flag is exported to child processes, so
  `python scripts/demo.py --verbose` and `accelerate launch ... --verbose` reach every worker;
- child processes of a quiet run get TORCH_CPP_LOG_LEVEL=ERROR (torch's C++ warnings, e.g.
  gloo's, are printed before Python could filter them) unless the user set it;
- in a multi-process run (LOCAL_RANK > 0, set by the launcher) the other processes do not repeat
  the main process's library messages: transformers' warnings and progress bars ("Loading weights")
  and DeepSpeed's INFO/WARNING lines show once, from local rank 0 (errors still show everywhere);
- known advice about a choice we made on purpose (transformers' note that resized embeddings start
  from the old rows' mean and covariance: our hf_mean padding rows) is dropped on every process;
- `launch_environment()` is the environment for an `accelerate launch` child (the demo's, the tests'):
  OMP_NUM_THREADS=1 stated (torch's launcher's own default, which it otherwise announces in a
  banner) and, without CUDA, DS_ACCELERATOR=cpu (DeepSpeed otherwise warns "Setting accelerator to
  CPU" in the launcher and in every process);
- `library_prints()` wraps a library call that print()s a banner on every process (DeepSpeed's
  "deepspeed_shm_comm_op built successfully" when the Accelerator starts on CPU): its stdout is
  dropped when quiet.
"""

import contextlib
import io
import logging
import os
import sys
import warnings

VERBOSE_FLAG = "--verbose"
VERBOSE_ENV = "LANGTOOLKIT_VERBOSE"

# Packages whose internal deprecation warnings are about each other, not about the user's code.
THIRD_PARTY = (
    "torch", "deepspeed", "accelerate", "transformers", "datasets", "huggingface_hub", "tokenizers",
    "evaluate", "lm_eval", "datatrove", "ray", "safetensors", "sentencepiece", "gguf", "jieba",
    "matplotlib", "tensorboard", "google.protobuf", "pkg_resources", "setuptools", "pydantic", "multiprocess",
)
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
# Known messages that do not come with a deprecation category, or are attributed to the
# caller's frame (regexes matched against the start of the message).
KNOWN_MESSAGES = (
    r".*torch\.distributed.*deprecated",
    r".*`torch\.cuda\.amp\..*` is deprecated",
    r".*TypedStorage is deprecated",
    r"No device id is provided via `init_process_group` or `barrier `",
    r".*barrier\(\): using the device under current context",
    r"The given NumPy array is not writable",
)
# Loggers that repeat INFO lines per process on every step of a small CPU run.
CHATTY_LOGGERS = {"DeepSpeed": logging.WARNING, "deepspeed": logging.WARNING}
# Library log records that are advice about a choice this toolkit made on purpose: (logger, message start).
KNOWN_LOG_MESSAGES = (
    ("transformers.modeling_utils", "The new embeddings will be initialized from a multivariate normal"),
    ("transformers.modeling_utils", "The new lm_head weights will be initialized from a multivariate normal"),
)


class _DropKnown(logging.Filter):
    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record):
        return not str(record.msg).startswith(self.prefixes)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def launch_environment(environment=None) -> dict:
    """The environment for an `accelerate launch` child process (see the module doc)."""
    environment = dict(os.environ if environment is None else environment)
    if is_verbose():
        return environment
    environment.setdefault("OMP_NUM_THREADS", "1")
    import torch

    if not torch.cuda.is_available():
        environment.setdefault("DS_ACCELERATOR", "cpu")
    return environment


@contextlib.contextmanager
def library_prints():
    """Drop what a library call print()s to stdout, unless --verbose (errors are exceptions and still raise)."""
    if is_verbose():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def quiet_by_default(argv=None) -> bool:
    """Filter known third-party warnings unless --verbose / LANGTOOLKIT_VERBOSE=1; True when quiet.

    Removes --verbose from `argv` (sys.argv by default, or the list a `main(argv)` parses) so
    the stage's HfArgumentParser never sees it, and exports the choice to child processes.
    """
    argv = sys.argv if argv is None else argv
    verbose = VERBOSE_FLAG in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    while VERBOSE_FLAG in argv:
        argv.remove(VERBOSE_FLAG)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return False
    modules = r"(" + "|".join(name.replace(".", r"\.") for name in THIRD_PARTY) + r")(\..*)?$"
    for category in DEPRECATIONS:
        warnings.filterwarnings("ignore", category=category, module=modules)
    for message in KNOWN_MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    for name, level in CHATTY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    by_logger = {}
    for name, prefix in KNOWN_LOG_MESSAGES:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        logging.getLogger(name).addFilter(_DropKnown(prefixes))
    if int(os.environ.get("LOCAL_RANK", "0") or 0) > 0:  # the main process shows library messages once
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            from transformers.utils import logging as transformers_logging

            transformers_logging.set_verbosity_error()
            transformers_logging.disable_progress_bar()
        except ImportError:
            pass
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    return True
