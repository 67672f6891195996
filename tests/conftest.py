import sys
from pathlib import Path

# make tests/helpers.py importable as `helpers`
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


# -- Hugging Face folders of the default model (need the [hf] extra), built once per session ----------------
@pytest.fixture(scope="session")
def hf_smollm(tmp_path_factory) -> Path:
    """The embedded SmolLM2 as an fp32 HF folder made by transformers' GGUF loader (tests/hfmodel.py)."""
    from hfmodel import build_default_hf_folder

    return build_default_hf_folder(tmp_path_factory.mktemp("hf") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def smollm_f32_gguf(tmp_path_factory) -> Path:
    """The embedded model's F32 rendering (the base the HF folder must match)."""
    from gguf import LlamaFileType

    from helpers import default_model_path
    from llmquant.quantize import quantize_model

    dst = tmp_path_factory.mktemp("f32") / "SmolLM2-135M-Instruct-F32.gguf"
    quantize_model(default_model_path(), dst, LlamaFileType.ALL_F32, threads=2)
    return dst


@pytest.fixture(scope="session")
def ct_smollm(hf_smollm, tmp_path_factory) -> Path:
    """A compressed-tensors W4A16 g64 (pack-quantized) checkpoint of ``hf_smollm``, made with the
    compressed-tensors package."""
    from hfmodel import write_compressed_tensors

    return write_compressed_tensors(hf_smollm, tmp_path_factory.mktemp("ct") / "SmolLM2-W4A16-g64")
