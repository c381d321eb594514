"""`python -m emulator`: run the Tencent OCR emulator."""

from emulator.cli import main

main()
