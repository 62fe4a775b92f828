"""slowllama: fine-tune Llama models that do not fit in memory by streaming their blocks from SSD.

The command lines are finetune.py and test_gen.py; slowllama.run.loop.finetune is the same run as a function.
"""

__version__ = "0.2.0"
