"""GGUF files: the validated header parser, the tensor source, the atomic writer, the per-tensor
recipes (llama.cpp's mixtures) and the importance-matrix file formats."""
