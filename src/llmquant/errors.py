"""Named errors shown to users as one clear line (the CLI prints ``str(err)``, never a traceback)."""

from __future__ import annotations


class LlmquantError(Exception):
    """Base of every error llmquant reports to a user."""


class ModelFileError(LlmquantError):
    """A model file is missing, not a GGUF, truncated or has an invalid header."""

    def __init__(self, path: object, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class UnknownTypeError(LlmquantError):
    """A quantization type / ftype name that llmquant does not know."""

    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = known
        super().__init__(f"unknown type {name!r}; expected one of: {', '.join(known)}")


class DestinationError(LlmquantError):
    """The output path cannot be written (folder missing, exists without --force, ...)."""

    def __init__(self, path: object, problem: str):
        self.path = path
        super().__init__(f"{path}: {problem}")


class TensorDataError(LlmquantError):
    """A tensor's values cannot be quantized (NaN/Inf, wrong shape, ...)."""

    def __init__(self, tensor: str, problem: str):
        self.tensor = tensor
        super().__init__(f"tensor {tensor!r}: {problem}")


class RequantizeError(LlmquantError):
    """The source is already quantized and --allow-requantize was not given."""


class FormatError(LlmquantError):
    """Bad arguments to a block format (row length, importance length, ...)."""


class RecipeError(LlmquantError):
    """llama.cpp's type rules cannot place a tensor (bad hyper-parameters, no fallback type, ...)."""

    def __init__(self, tensor: str, problem: str):
        self.tensor = tensor
        self.problem = problem
        super().__init__(f"tensor {tensor!r}: {problem}" if tensor else problem)


class ImatrixRequiredError(LlmquantError):
    """The chosen ftype / overrides put a tensor in a type that needs an importance matrix."""

    def __init__(self, tensor: str, qtype: str, ftype: str):
        self.tensor = tensor
        self.qtype = qtype
        self.ftype = ftype
        super().__init__(
            f"{ftype} needs an importance matrix (--imatrix): tensor {tensor!r} would be {qtype}"
        )


class EvalError(LlmquantError):
    """Evaluation cannot run as asked: bad context size, too little text, mismatched vocabularies."""

    def __init__(self, problem: str, value: object = None):
        self.problem = problem
        self.value = value
        super().__init__(problem)


class EvalTextError(EvalError):
    """The evaluation text is missing, empty, binary or too short."""

    def __init__(self, path: object, problem: str):
        self.path = path
        super().__init__(f"{path}: {problem}", path)


class UnsupportedModelError(LlmquantError):
    """A Hugging Face model llmquant cannot convert (architecture, tokenizer, weight format)."""


class UnsafeFormatError(LlmquantError):
    """A PyTorch pickle checkpoint (.bin) was found and reading pickles was not allowed."""

    def __init__(self, path: object, problem: str):
        self.path = path
        super().__init__(f"{path}: {problem}")


class LogitsFileError(LlmquantError):
    """A base-logits file (llama-perplexity's --kl-divergence-base format) is missing, truncated or
    does not match the model or the evaluation asked for."""

    def __init__(self, path: object, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class DiskSpaceError(LlmquantError):
    """Not enough free disk space for a file about to be written (nothing was written)."""

    def __init__(self, path: object, need: int, free: int, what: str = "file"):
        self.path, self.need, self.free = path, need, free
        super().__init__(
            f"{path}: not enough free disk space for the {what}: it needs {need / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB are free there; free space or choose another --out")


class LadderError(LlmquantError):
    """The ladder cannot run as asked (bad --keep, ...)."""


class OptionError(LlmquantError):
    """A command-line option with a value it cannot take, or two spellings of one option (ours and
    llama.cpp's, or a positional argument and its option) given different values."""

    def __init__(self, option: str, problem: str):
        self.option = option
        super().__init__(f"{option}: {problem}")


class CalibrationError(LlmquantError):
    """Calibration cannot run as asked: too little text, an empty folder, a model without ``blk.*``
    matrix multiplications, imatrix files that do not fit the model; for GPTQ/AWQ, widths that do not
    divide the group size, an architecture without layer mappings, an already-quantized source."""


class DiskFullError(DestinationError):
    """Not enough free space for an output (checked before writing), or the disk filled up while
    writing (ENOSPC); the partial file has been removed."""

    def __init__(self, path: object, problem: str, *, needed: int | None = None, free: int | None = None):
        self.needed = needed
        self.free = free
        super().__init__(path, problem)
class MissingExtraError(LlmquantError):
    """An optional dependency group is not installed (e.g. torch + transformers for HF formats)."""

    def __init__(self, extra: str, what: str):
        self.extra = extra
        super().__init__(f"{what} needs the [{extra}] extra: pip install 'llmquant[{extra}]'")


class CheckpointLoadError(LlmquantError):
    """transformers cannot load a Hugging Face checkpoint here (its quantization format needs a GPU
    or a package that is not installed, or the files are broken)."""

    def __init__(self, path: object, method: str, problem: str):
        self.path = path
        self.method = method
        super().__init__(f"{path}: cannot load this {method} checkpoint on CPU: {problem}")
