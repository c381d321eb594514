"""A local stand-in for Tencent's RecognizeMacaoIDCardOCR endpoint, and specimen ID cards.

Test and demo tooling only: the worker never imports this package. See emulator/README.md.
"""
