"""llmquant: the local-LLM quantization workflow in one library and one CLI.

Data flow (see DESIGN.md): source -> recipe -> format -> writer -> runtime; eval, fit, ladder on top.
"""

__version__ = "0.1.0"
