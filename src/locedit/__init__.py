"""locedit: does Causal Tracing's localization predict where a model edit succeeds?"""

__version__ = "0.1.0"
